//! The peer transport through its public API: over in-memory streams (a `Connector` built on
//! `tokio::io::duplex`) and over real TCP on 127.0.0.1. Every wait has a deadline; no test sleeps
//! to synchronise.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use herald::pki::Ca;
use herald::transport::wire::{envelope::Body, Ping};
use herald::transport::{
    handshake_on, Channel, ConnectionError, Connector, Envelope, FrameError, HandshakeError, Identity, PeerInfo,
    PeerTls, SendError, Side, Transport, TransportConfig,
};
use tokio::io::{duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long any condition may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {DEADLINE:?}"),
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1))
}

/// The certificate of node `id` from the test CA named `ca` (each name its own CA of cluster
/// "test-cluster", made once per process).
fn tls(ca: &str, id: u64) -> Arc<PeerTls> {
    static CAS: OnceLock<Mutex<HashMap<String, Arc<Ca>>>> = OnceLock::new();
    let ca = CAS
        .get_or_init(Default::default)
        .lock()
        .expect("lock")
        .entry(ca.to_string())
        .or_insert_with(|| Arc::new(Ca::generate("test-cluster").expect("ca")))
        .clone();
    let n = ca.issue_node(id, &[], &[], 1).expect("issue");
    Arc::new(PeerTls::from_pem(&n.ca_pem, &n.cert_pem, &n.key_pem, "test-cluster", id).expect("load"))
}

/// Node `id`'s transport settings: mutual TLS with a certificate from the CA named `ca`, or
/// insecure (plaintext, loopback) peers with `None`.
fn config(id: u64, addr: &str, ca: Option<&str>) -> TransportConfig {
    let mut c = TransportConfig::new("test-cluster", id, addr).with_tls(ca.map(|ca| tls(ca, id)));
    // Reconnect quickly in tests.
    c.backoff_min = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(200);
    c
}

fn app(text: &str) -> Envelope {
    Envelope::app(Bytes::copy_from_slice(text.as_bytes()))
}

/// Receives `n` envelopes from `rx`.
async fn recv_n(rx: &mut mpsc::Receiver<(u64, Envelope)>, n: usize) -> Vec<(u64, Envelope)> {
    within(&format!("receiving {n} envelopes"), async {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            got.push(rx.recv().await.expect("inbound channel open"));
        }
        got
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// An in-memory network.

/// A duplex stream that counts the `poll_write` calls that wrote bytes (i.e. `write` syscalls
/// on a socket).
struct Counting {
    inner: DuplexStream,
    writes: Arc<AtomicUsize>,
}

impl AsyncRead for Counting {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counting {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type AcceptResult = Result<PeerInfo, HandshakeError>;

/// Named in-memory listeners. Dialing a name hands the other end of a fresh duplex stream to
/// the transport listening under it.
#[derive(Clone, Default)]
struct MemNet {
    listeners: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<DuplexStream>>>>,
    /// Writes made by dialers' streams.
    writes: Arc<AtomicUsize>,
    /// When set, dialing a name nobody listens under is never answered (like a SYN sent to an
    /// address no host holds) instead of refused; counts such dials.
    silent_when_absent: Option<Arc<tokio::sync::watch::Sender<usize>>>,
}

impl MemNet {
    /// A transport on this network under `addr`; also returns its inbound envelopes and the
    /// result of every handshake it accepts.
    fn node(
        &self,
        config: TransportConfig,
    ) -> (
        Transport<MemConnector>,
        mpsc::Receiver<(u64, Envelope)>,
        mpsc::UnboundedReceiver<AcceptResult>,
    ) {
        let addr = config.identity.advertise_addr.clone();
        let (inbound_tx, inbound_rx) = mpsc::channel(1024);
        let t =
            Transport::with_connector(config, MemConnector { net: self.clone() }, inbound_tx).expect("valid config");
        let (stream_tx, mut stream_rx) = mpsc::unbounded_channel::<DuplexStream>();
        self.listeners.lock().expect("lock").insert(addr, stream_tx);
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let acceptor = t.clone();
        tokio::spawn(async move {
            while let Some(stream) = stream_rx.recv().await {
                let acceptor = acceptor.clone();
                let results_tx = results_tx.clone();
                tokio::spawn(async move {
                    let r = acceptor.accept(stream, loopback()).await.map(|c| c.peer);
                    let _ = results_tx.send(r);
                });
            }
        });
        (t, inbound_rx, results_rx)
    }

    /// A raw stream to the transport listening under `addr`, for hand-played peers.
    fn dial_raw(&self, addr: &str) -> DuplexStream {
        let (a, b) = duplex(64 * 1024);
        let tx = self
            .listeners
            .lock()
            .expect("lock")
            .get(addr)
            .cloned()
            .expect("listener");
        tx.send(b).expect("listener alive");
        a
    }
}

struct MemConnector {
    net: MemNet,
}

impl Connector for MemConnector {
    type Stream = Counting;

    async fn connect(&self, _peer: u64, addr: &str) -> io::Result<(Counting, SocketAddr)> {
        let tx = self.net.listeners.lock().expect("lock").get(addr).cloned();
        if let (None, Some(silent)) = (&tx, &self.net.silent_when_absent) {
            silent.send_modify(|n| *n += 1);
            std::future::pending::<()>().await;
        }
        let tx = tx.ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        let (a, b) = duplex(64 * 1024);
        tx.send(b)
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        let stream = Counting {
            inner: a,
            writes: self.net.writes.clone(),
        };
        Ok((stream, loopback()))
    }
}

async fn next_accept(results: &mut mpsc::UnboundedReceiver<AcceptResult>) -> AcceptResult {
    within("an accepted handshake", results.recv())
        .await
        .expect("acceptor alive")
}

/// The error the dialer of `t` reports for `peer`, once its link has one.
async fn dial_error<C: Connector>(t: &Transport<C>, peer: u64) -> String {
    let mut link = t.link(peer).expect("known peer");
    let l = within("a dial error", link.wait_for(|l| l.last_error.is_some()))
        .await
        .expect("dialer alive");
    l.last_error.clone().expect("checked")
}

fn identity(id: u64, ca: Option<&str>) -> Identity {
    config(id, &format!("mem:{id}"), ca).identity
}

// ---------------------------------------------------------------------------------------------
// Happy paths.

#[tokio::test]
async fn many_frames_round_trip_in_memory_in_order() {
    let net = MemNet::default();
    let (a, mut a_rx, _) = net.node(config(1, "mem:1", Some("s3cret")));
    let (b, mut b_rx, mut b_accepts) = net.node(config(2, "mem:2", Some("s3cret")));
    a.add_peer(2, "mem:2");
    b.add_peer(1, "mem:1");
    let accepted = next_accept(&mut b_accepts).await.expect("b admits a");
    assert_eq!((accepted.node_id, accepted.advertise_addr.as_str()), (1, "mem:1"));

    const N: u64 = 5_000;
    let sender = a.clone();
    tokio::spawn(async move {
        for seq in 0..N {
            let env = match seq % 3 {
                0 => Envelope::ping(seq, seq as i64),
                1 => Envelope::raft(seq.to_be_bytes().to_vec()),
                _ => Envelope::app(seq.to_be_bytes().to_vec()),
            };
            sender.send_async(2, env).await.expect("queued");
        }
    });
    b.send(1, app("hello a")).expect("queued");

    let got = recv_n(&mut b_rx, N as usize).await;
    for (seq, (from, env)) in got.into_iter().enumerate() {
        assert_eq!(from, 1);
        let seq = seq as u64;
        let want = match seq % 3 {
            0 => Envelope::ping(seq, seq as i64),
            1 => Envelope::raft(seq.to_be_bytes().to_vec()),
            _ => Envelope::app(seq.to_be_bytes().to_vec()),
        };
        assert_eq!(env, want, "envelope {seq}");
    }
    assert_eq!(recv_n(&mut a_rx, 1).await, vec![(2, app("hello a"))]);
    assert!(a.is_connected(2) && b.is_connected(1));
    assert_eq!(b.inbound_peers().iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![1]);
}

/// A transport listening on 127.0.0.1:0.
async fn tcp_node(
    id: u64,
    secret: Option<&str>,
) -> (
    Transport,
    mpsc::Receiver<(u64, Envelope)>,
    SocketAddr,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tcp_node_on(listener, config(id, &addr.to_string(), secret)).await
}

async fn tcp_node_on(
    listener: TcpListener,
    config: TransportConfig,
) -> (
    Transport,
    mpsc::Receiver<(u64, Envelope)>,
    SocketAddr,
    tokio::task::JoinHandle<()>,
) {
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel(1024);
    let t = Transport::new(config, tx).expect("valid config");
    let serving = t.serve(listener);
    (t, rx, addr, serving)
}

#[tokio::test]
async fn many_frames_round_trip_over_tcp() {
    let (a, mut a_rx, a_addr, _) = tcp_node(1, Some("s3cret")).await;
    let (b, mut b_rx, b_addr, _) = tcp_node(2, Some("s3cret")).await;
    a.add_peer(2, b_addr.to_string());
    b.add_peer(1, a_addr.to_string());

    const N: u64 = 20_000;
    let sender = a.clone();
    tokio::spawn(async move {
        for seq in 0..N {
            // Some large frames too, so batches span several reads on the other side.
            let env = if seq % 1000 == 0 {
                Envelope::app(vec![seq as u8; 200_000])
            } else {
                Envelope::ping(seq, 0)
            };
            sender.send_async(2, env).await.expect("queued");
        }
    });
    b.send(1, app("hello a")).expect("queued");

    let got = recv_n(&mut b_rx, N as usize).await;
    for (seq, (from, env)) in got.into_iter().enumerate() {
        assert_eq!(from, 1);
        let seq = seq as u64;
        match env.body {
            Some(Body::App(data)) => assert!(seq % 1000 == 0 && data.len() == 200_000 && data[0] == seq as u8),
            Some(Body::Ping(Ping { seq: s, .. })) => assert_eq!(s, seq),
            other => panic!("unexpected envelope {seq}: {other:?}"),
        }
    }
    assert_eq!(recv_n(&mut a_rx, 1).await, vec![(2, app("hello a"))]);
    let peers = b.inbound_peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(
        (peers[0].node_id, peers[0].advertise_addr.clone()),
        (1, a_addr.to_string())
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals.

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_on_both_sides() {
    let net = MemNet::default();
    let (a, _a_rx, _) = net.node(config(1, "mem:1", Some("one")));
    let (_b, mut b_rx, mut b_accepts) = net.node(config(2, "mem:2", Some("two")));
    a.add_peer(2, "mem:2");
    match next_accept(&mut b_accepts).await {
        Err(HandshakeError::Tls { message }) => {
            assert!(message.contains("certificate"), "{message}")
        }
        other => panic!("b: expected a TLS refusal, got {other:?}"),
    }
    let err = dial_error(&a, 2).await;
    assert!(err.contains("TLS handshake failed"), "{err}");
    assert!(!a.is_connected(2));
    assert!(b_rx.try_recv().is_err(), "nothing was delivered");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_over_tcp() {
    let (_b, _b_rx, b_addr, _) = tcp_node(2, Some("right")).await;
    let stream = TcpStream::connect(b_addr).await.expect("connect");
    let me = config(1, "127.0.0.1:9", Some("wrong")).identity;
    let r = within(
        "handshake",
        handshake_on(
            stream,
            &me,
            b_addr,
            Some(2),
            Some(Channel::Control),
            Duration::from_secs(5),
            |_, _| false,
        ),
    )
    .await;
    assert!(matches!(r, Err(HandshakeError::Tls { .. })), "{r:?}");
}

#[tokio::test]
async fn different_cluster_is_refused_on_both_sides() {
    let net = MemNet::default();
    let (a, _a_rx, _) = net.node(config(1, "mem:1", Some("s")));
    let mut other = config(2, "mem:2", Some("s"));
    other.identity.cluster_id = "another-cluster".into();
    let (_b, _b_rx, mut b_accepts) = net.node(other);
    a.add_peer(2, "mem:2");
    match next_accept(&mut b_accepts).await {
        Err(HandshakeError::ClusterMismatch { message, .. }) => {
            assert!(
                message.contains("another-cluster") && message.contains("test-cluster"),
                "{message}"
            )
        }
        other => panic!("b: expected ClusterMismatch, got {other:?}"),
    }
    let err = dial_error(&a, 2).await;
    assert!(err.contains("cluster id mismatch"), "{err}");
}

#[tokio::test]
async fn duplicate_node_id_is_refused_and_the_first_connection_keeps_working() {
    let net = MemNet::default();
    let (a, _a_rx, _) = net.node(config(1, "mem:1", Some("s")));
    let (_b, mut b_rx, mut b_accepts) = net.node(config(2, "mem:2", Some("s")));
    a.add_peer(2, "mem:2");
    next_accept(&mut b_accepts).await.expect("b admits a");

    // A second process with node 1's certificate.
    let raw = net.dial_raw("mem:2");
    let r = within(
        "impostor handshake",
        handshake_on(
            raw,
            &identity(1, Some("s")),
            loopback(),
            Some(2),
            Some(Channel::Control),
            Duration::from_secs(5),
            |_, _| false,
        ),
    )
    .await;
    assert!(
        matches!(r, Err(HandshakeError::DuplicateNodeId { by: Side::Peer, .. })),
        "impostor: {r:?}"
    );
    match next_accept(&mut b_accepts).await {
        Err(HandshakeError::DuplicateNodeId {
            by: Side::Local,
            message,
        }) => {
            assert!(message.contains("node 1"), "{message}")
        }
        other => panic!("b: expected DuplicateNodeId, got {other:?}"),
    }

    a.send(2, app("still here")).expect("queued");
    assert_eq!(recv_n(&mut b_rx, 1).await, vec![(1, app("still here"))]);
}

#[tokio::test]
async fn non_loopback_peer_is_refused_with_insecure_peers() {
    let net = MemNet::default();
    let (b, _b_rx, _) = net.node(config(2, "mem:2", None));
    let (raw, theirs) = duplex(64 * 1024);
    let remote: SocketAddr = "192.0.2.7:7070".parse().expect("addr");
    let me = identity(1, None);
    let (mine, accepted) = within("both handshakes", async {
        tokio::join!(
            handshake_on(
                raw,
                &me,
                loopback(),
                Some(2),
                Some(Channel::Control),
                Duration::from_secs(5),
                |_, _| false
            ),
            b.accept(theirs, remote),
        )
    })
    .await;
    match accepted {
        Err(HandshakeError::InsecureNonLoopback {
            by: Side::Local,
            message,
        }) => {
            assert!(
                message.contains("192.0.2.7:7070") && message.contains("--peer-cert"),
                "{message}"
            )
        }
        other => panic!("b: expected InsecureNonLoopback, got {other:?}"),
    }
    assert!(
        matches!(mine, Err(HandshakeError::InsecureNonLoopback { by: Side::Peer, .. })),
        "peer: {mine:?}"
    );

    // The same address is fine with mutual TLS.
    let (c, _c_rx, _) = net.node(config(3, "mem:3", Some("s")));
    let (raw, theirs) = duplex(64 * 1024);
    let me = identity(1, Some("s"));
    let (mine, accepted) = within("both handshakes", async {
        tokio::join!(
            handshake_on(
                raw,
                &me,
                loopback(),
                Some(3),
                Some(Channel::Control),
                Duration::from_secs(5),
                |_, _| false
            ),
            c.accept(theirs, remote),
        )
    })
    .await;
    assert!(mine.is_ok(), "{mine:?}");
    assert_eq!(accepted.expect("admitted").peer.remote_addr, remote);
}

// ---------------------------------------------------------------------------------------------
// Bad input.

#[tokio::test]
async fn garbage_instead_of_hello_is_dropped_and_the_listener_keeps_accepting() {
    let (b, mut b_rx, b_addr, _) = tcp_node(2, None).await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: herald\r\n\r\n"[..],
        &[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff][..],
    ] {
        let mut raw = TcpStream::connect(b_addr).await.expect("connect");
        raw.write_all(garbage).await.expect("write garbage");
        let mut rest = Vec::new();
        // Closed (EOF, or a reset when our garbage was left unread): either way, dropped.
        let _ = within("the listener drops the garbage connection", raw.read_to_end(&mut rest)).await;
    }

    // The same refusal as a value, in memory.
    let (raw, mut theirs) = duplex(1024);
    theirs.write_all(b"\x00\x00\x00\x02\xff\xff").await.expect("write");
    let r = within("accept", b.accept(raw, loopback())).await;
    drop(theirs);
    assert!(
        matches!(r, Err(HandshakeError::Frame(FrameError::Decode { .. }))),
        "{r:?}"
    );

    // A good peer still gets in.
    let (a, _a_rx, _, _) = tcp_node(1, None).await;
    a.add_peer(2, b_addr.to_string());
    a.send(2, app("after the garbage")).expect("queued");
    assert_eq!(recv_n(&mut b_rx, 1).await, vec![(1, app("after the garbage"))]);
}

#[tokio::test]
async fn oversized_frame_drops_that_connection_only() {
    let net = MemNet::default();
    let mut small = config(2, "mem:2", Some("s"));
    small.max_frame_len = 4096;
    let (b, mut b_rx, mut b_accepts) = net.node(small);
    let mut a_config = config(1, "mem:1", Some("s"));
    a_config.max_frame_len = 4096;
    let (a, _a_rx, _) = net.node(a_config);
    a.add_peer(2, "mem:2");
    a.send(2, app("before")).expect("queued");
    assert_eq!(recv_n(&mut b_rx, 1).await, vec![(1, app("before"))]);
    next_accept(&mut b_accepts).await.expect("b admits a");

    // Node 3, played by hand, completes the handshake and then announces a 1 MB frame.
    let (raw, theirs) = duplex(64 * 1024);
    let me = identity(3, Some("s"));
    let (mine, accepted) = within("both handshakes", async {
        tokio::join!(
            handshake_on(
                raw,
                &me,
                loopback(),
                Some(2),
                Some(Channel::Control),
                Duration::from_secs(5),
                |_, _| false
            ),
            b.accept(theirs, loopback()),
        )
    })
    .await;
    let mut mine = mine.expect("node 3 admitted");
    let conn = accepted.expect("b admits node 3");
    assert_eq!(conn.peer.node_id, 3);
    let mut frame = BytesMut::new();
    frame.put_u32(1_000_000);
    frame.put_slice(&[0u8; 100]);
    mine.stream.write_all(&frame).await.expect("write");
    match within("node 3's connection ends", conn.task).await.expect("task") {
        Err(ConnectionError::Read(FrameError::TooLarge {
            len: 1_000_000,
            max: 4096,
        })) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let mut rest = Vec::new();
    // TLS: the node drops the connection without a close_notify, which reads as an early EOF.
    match within("node 3 sees the close", mine.stream.read_to_end(&mut rest)).await {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}"),
    }

    // The sender refuses what the receiver would drop; node 1's connection is unaffected.
    match a.send(2, Envelope::app(vec![0u8; 5000])) {
        Err(SendError::TooLarge { max: 4096, .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    a.send(2, app("after")).expect("queued");
    assert_eq!(recv_n(&mut b_rx, 1).await, vec![(1, app("after"))]);
    assert_eq!(
        a.link(2).expect("peer").borrow().connects,
        1,
        "node 1 never reconnected"
    );
}

// ---------------------------------------------------------------------------------------------
// Batching, queues, reconnects.

#[tokio::test]
async fn many_small_frames_need_far_fewer_writes() {
    const N: u64 = 10_000;
    let net = MemNet::default();
    let (a, _a_rx, _) = net.node(config(1, "mem:1", None));
    let (_b, mut b_rx, _) = net.node(config(2, "mem:2", None));
    a.add_peer(2, "mem:2");
    let mut link = a.link(2).expect("peer");
    within("connect", link.wait_for(|l| l.connected))
        .await
        .expect("dialer alive");
    let before = net.writes.load(Ordering::Relaxed);

    let sender = a.clone();
    tokio::spawn(async move {
        for seq in 0..N {
            sender.send_async(2, Envelope::ping(seq, 0)).await.expect("queued");
        }
    });
    let got = recv_n(&mut b_rx, N as usize).await;
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, (_, e))| *e == Envelope::ping(i as u64, 0)));
    let writes = net.writes.load(Ordering::Relaxed) - before;
    assert!(writes > 0);
    assert!(
        (writes as u64) < N / 10,
        "{writes} writes for {N} frames: the writer does not coalesce"
    );
}

#[tokio::test]
async fn send_fails_for_unknown_peers_and_full_queues() {
    let net = MemNet::default();
    let mut c = config(1, "mem:1", None);
    c.send_queue = 4;
    let (a, _a_rx, _) = net.node(c);
    assert!(matches!(a.send(9, app("x")), Err(SendError::UnknownPeer(9))));
    // Nobody listens at mem:2: the queue fills and then refuses.
    assert!(a.add_peer(2, "mem:2"));
    for i in 0..4 {
        a.send(2, app(&i.to_string())).expect("room in the queue");
    }
    match a.send(2, app("one too many")) {
        Err(SendError::QueueFull { peer: 2, capacity: 4 }) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
    // Once node 2 appears, the queued envelopes are delivered in order.
    let (_b, mut b_rx, _) = net.node(config(2, "mem:2", None));
    let got = recv_n(&mut b_rx, 4).await;
    assert_eq!(got, (0..4).map(|i| (1, app(&i.to_string()))).collect::<Vec<_>>());
    // Own id and a known id are not new peers.
    assert!(!a.add_peer(1, "mem:1"));
    assert!(!a.add_peer(2, "mem:2"));
    assert!(a.remove_peer(2));
    assert!(matches!(a.send(2, app("x")), Err(SendError::UnknownPeer(2))));
}

#[tokio::test]
async fn dialer_reconnects_when_the_peer_drops_the_connection() {
    let net = MemNet::default();
    let (a, _a_rx, _) = net.node(config(1, "mem:1", None));
    let (b, mut b_rx, _) = net.node(config(2, "mem:2", None));
    a.add_peer(2, "mem:2");
    let mut link = a.link(2).expect("peer");
    within("connect", link.wait_for(|l| l.connected))
        .await
        .expect("dialer alive");
    // b closes the inbound connection from a (as when it forgets a removed member).
    assert!(b.remove_peer(1));
    within("reconnect", link.wait_for(|l| l.connected && l.connects >= 2))
        .await
        .expect("dialer alive");
    a.send(2, app("again")).expect("queued");
    assert_eq!(recv_n(&mut b_rx, 1).await, vec![(1, app("again"))]);
}

#[tokio::test]
async fn messages_flow_again_after_the_peer_listener_comes_back_on_the_same_port() {
    let (a, _a_rx, _, _) = tcp_node(1, None).await;
    let (b, mut b_rx, b_addr, b_serving) = tcp_node(2, None).await;
    a.add_peer(2, b_addr.to_string());
    let mut link = a.link(2).expect("peer");
    a.send(2, app("one")).expect("queued");
    assert_eq!(recv_n(&mut b_rx, 1).await, vec![(1, app("one"))]);

    // Node 2 goes away: its listener and connections close.
    b.shutdown();
    drop(b);
    within("b's listener closes", b_serving).await.expect("accept loop");
    within("a notices", link.wait_for(|l| !l.connected))
        .await
        .expect("dialer alive");

    // Node 2 comes back on the same port.
    let listener = TcpListener::bind(b_addr).await.expect("rebind the same port");
    let (_b2, mut b2_rx, _, _) = tcp_node_on(listener, config(2, &b_addr.to_string(), None)).await;
    within("a reconnects", link.wait_for(|l| l.connected && l.connects >= 2))
        .await
        .expect("dialer alive");
    a.send(2, app("two")).expect("queued");
    assert_eq!(recv_n(&mut b2_rx, 1).await, vec![(1, app("two"))]);
}

/// A restarted peer connects to this node at once; this node's dialer towards it, backing off
/// meanwhile, is woken by that inbound connection instead of sleeping out its backoff.
#[tokio::test]
async fn a_restarted_peer_is_redialed_as_soon_as_it_connects_not_after_the_backoff() {
    const BACKOFF: Duration = Duration::from_secs(60);
    /// Far less than what is left of the backoff (at least 48 s with the ±20% jitter).
    const FAST: Duration = Duration::from_secs(5);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a_addr = listener.local_addr().expect("addr");
    let mut a_config = config(1, &a_addr.to_string(), None);
    a_config.backoff_min = BACKOFF;
    a_config.backoff_max = BACKOFF;
    let (a, _a_rx, _, _) = tcp_node_on(listener, a_config).await;
    let (b, _b_rx, b_addr, b_serving) = tcp_node(2, None).await;
    a.add_peer(2, b_addr.to_string());
    b.add_peer(1, a_addr.to_string());
    let mut link = a.link(2).expect("peer");
    within("connect", link.wait_for(|l| l.connected))
        .await
        .expect("dialer alive");

    // Node 2 goes away: a's dialer loses its connection and starts a long backoff.
    b.shutdown();
    drop(b);
    within("b's listener closes", b_serving).await.expect("accept loop");
    within("a notices", link.wait_for(|l| !l.connected))
        .await
        .expect("dialer alive");

    // Node 2 restarts on the same port and dials node 1 (with the short test backoff).
    let listener = TcpListener::bind(b_addr).await.expect("rebind the same port");
    let (b2, mut b2_rx, _, _) = tcp_node_on(listener, config(2, &b_addr.to_string(), None)).await;
    b2.add_peer(1, a_addr.to_string());
    let redialed = tokio::time::timeout(FAST, link.wait_for(|l| l.connected && l.connects >= 2))
        .await
        .map(|l| l.map(|_| ()));
    match redialed {
        Ok(alive) => alive.expect("dialer alive"),
        Err(_) => panic!(
            "a did not redial the restarted node 2 within {FAST:?} (its backoff is {BACKOFF:?}): {:?}",
            *link.borrow()
        ),
    }
    a.send(2, app("welcome back")).expect("queued");
    assert_eq!(recv_n(&mut b2_rx, 1).await, vec![(1, app("welcome back"))]);
}

/// A peer restarting on an address nobody held while it was down: this node's dial towards it
/// waits on a connection that does not come (a SYN to such an address is answered only by the
/// kernel's retransmission, a second or more later). When the peer connects to this node, that
/// dial starts again at once instead of waiting out `connect_timeout`. CI saw a restarted
/// container's peer reach it only 0.8 s after it came up, long enough for the restarted node to
/// suspect that healthy peer (no answers to its pings came back) and send again deliveries the
/// peer had handled.
#[tokio::test(start_paused = true)]
async fn a_dial_waiting_on_a_peer_that_was_down_starts_again_when_the_peer_connects() {
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(600);
    let silent = Arc::new(tokio::sync::watch::Sender::new(0));
    let net = MemNet {
        silent_when_absent: Some(silent.clone()),
        ..MemNet::default()
    };
    let mut a_config = config(1, "mem:1", None);
    a_config.connect_timeout = CONNECT_TIMEOUT;
    let (a, _a_rx, mut a_accepts) = net.node(a_config);
    // Node 2 is down: node 1's dial towards it hangs.
    a.add_peer(2, "mem:2");
    within("a dial that hangs", silent.subscribe().wait_for(|n| *n == 1))
        .await
        .expect("sender alive");

    // Node 2 comes up and dials node 1.
    let up = tokio::time::Instant::now();
    let (b, mut b_rx, _) = net.node(config(2, "mem:2", None));
    b.add_peer(1, "mem:1");
    assert_eq!(next_accept(&mut a_accepts).await.expect("a admits b").node_id, 2);
    let mut link = a.link(2).expect("peer");
    let redialed = tokio::time::timeout(CONNECT_TIMEOUT / 2, link.wait_for(|l| l.connected))
        .await
        .is_ok();
    assert!(
        redialed,
        "node 1 was still waiting on its dial to node 2 after {:?} (connect_timeout {CONNECT_TIMEOUT:?}): {:?}",
        up.elapsed(),
        *link.borrow()
    );
    assert_eq!(*silent.borrow(), 1, "one dial hung, the next one connected");
    a.send(2, app("hello")).expect("queued");
    assert_eq!(recv_n(&mut b_rx, 1).await, vec![(1, app("hello"))]);
}

/// A peer connecting while this node's dialer towards it is connected leaves no wake-up behind:
/// when that connection later breaks, the dialer backs off as usual.
#[tokio::test(start_paused = true)]
async fn a_connected_dialer_is_not_woken_when_its_peer_connects() {
    const BACKOFF: Duration = Duration::from_secs(60);
    let net = MemNet::default();
    let mut a_config = config(1, "mem:1", None);
    a_config.backoff_min = BACKOFF;
    a_config.backoff_max = BACKOFF;
    a_config.backoff_jitter = 0.0;
    let (a, _a_rx, mut a_accepts) = net.node(a_config);
    let (b, _b_rx, _) = net.node(config(2, "mem:2", None));
    a.add_peer(2, "mem:2");
    let mut link = a.link(2).expect("peer");
    within("connect", link.wait_for(|l| l.connected))
        .await
        .expect("dialer alive");

    // Node 2 connects to node 1 while node 1's dialer is connected.
    b.add_peer(1, "mem:1");
    assert_eq!(next_accept(&mut a_accepts).await.expect("a admits b").node_id, 2);

    // Node 2 forgets node 1: both connections close and node 2 stops dialing. (The clock is
    // paused, so noticing the close takes no time on it.)
    let down = tokio::time::Instant::now();
    assert!(b.remove_peer(1));
    tokio::time::timeout(BACKOFF * 2, link.wait_for(|l| l.connected && l.connects >= 2))
        .await
        .expect("a reconnects after its backoff")
        .expect("dialer alive");
    assert!(
        down.elapsed() >= BACKOFF,
        "a redialed after {:?}, before its {BACKOFF:?} backoff: a stale wake-up",
        down.elapsed()
    );
}
