//! The peer bus: a node's connections to its peers, split by what they carry, so control traffic
//! never queues behind event traffic.
//!
//! Two [`Transport`]s share the one peer listener:
//!
//! * **control** — Raft messages, forwarded proposals and their answers, pings and pongs. Its
//!   connections, queues and tasks run on the runtime that started the bus (the membership thread,
//!   `herald-cluster`); what it receives goes to the membership service, which hands Raft messages
//!   and proposals to the Raft driver and pongs to the monitor, and answers pings.
//! * **events** — the event plane's `App` payloads (event batches, acks, lane credits). Its
//!   connections, queues and tasks run on the bus's own thread, `herald-events`; what it receives
//!   goes straight to the relay's sink.
//!
//! Each node therefore dials two connections to every peer, one per channel, each with its own
//! bounded send queue and writer. The channel is named by the dialer in its handshake Hello, inside
//! the TLS session (see [`handshake`](mod@super::handshake)), so a connection's channel is as
//! authenticated as its node id. The listener's accept loop runs the handshake (TLS included) on
//! the control runtime, then hands an events connection to the events runtime: the TLS session
//! moves as it is, and only its socket is re-registered there ([`Socket`]), so no event byte is
//! read or written by the membership thread.
//!
//! **Certificate reload.** When the node's TLS material comes from files, the bus re-reads them
//! every `reload_interval` ([`Bus::watch_tls`]) and new connections use new material.
//!
//! **Authorisation by channel.** An `App` payload arriving on a control connection, or anything
//! else arriving on an events connection, is dropped, counted in
//! `herald_transport_wrong_channel_total{channel}` and logged: a peer cannot bypass the separation
//! (nor feed the relay through the membership thread). Keepalives are the transports' own.
//!
//! Fault injection ([`Transport::cut_off`]) is shared: cutting a peer off on either transport
//! cuts it off on both.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::handshake::handshake_on;
use super::peers::ACCEPT_ERROR_PAUSE;
use super::wire::{envelope::Body, Channel};
use super::{Envelope, Transport, TransportConfig, WRONG_CHANNEL_TOTAL};
use crate::Error;

/// Envelopes each channel's receive queue holds before its connections stop reading.
const INBOUND: usize = 4096;

/// A node's two peer transports and the thread the events channel runs on. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    /// Shared by all clones.
    inner: Arc<Inner>,
}

struct Inner {
    /// Raft, proposals, pings and pongs; on the runtime that started the bus.
    control: Transport,
    /// The event plane's `App` payloads; on `herald-events`.
    events: Transport,
    /// The `herald-events` thread; `None` once stopped.
    thread: Mutex<Option<EventsThread>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.control.shutdown();
        self.events.shutdown();
        if let Some(t) = self.thread.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            t.stop();
        }
    }
}

impl Bus {
    /// Starts the bus for `config` (its `channel` is ignored): the control transport on the
    /// current tokio runtime, delivering what it receives (but `App` payloads) to
    /// `control_inbound`; the events transport on a new `herald-events` thread, delivering the
    /// `App` payloads it receives (and nothing else) to `app`. Call [`Bus::serve`] to accept peers.
    pub fn start(
        config: TransportConfig,
        control_inbound: mpsc::Sender<(u64, Envelope)>,
        app: mpsc::UnboundedSender<(u64, Bytes)>,
    ) -> crate::Result<Bus> {
        let mut control_config = config.clone();
        control_config.channel = Channel::Control;
        let (control_tx, control_rx) = mpsc::channel(INBOUND);
        let control = Transport::new(control_config, control_tx)?;
        let thread = EventsThread::start().map_err(|e| Error::io("cannot start the herald-events thread", e))?;
        let mut events_config = config;
        events_config.channel = Channel::Events;
        let (events_tx, events_rx) = mpsc::channel(INBOUND);
        let events = {
            let _runtime = thread.handle.enter();
            Transport::new_sharing_faults(events_config, events_tx, &control)?
        };
        let stop = control.shutdown_token();
        tokio::spawn(stop.run_until_cancelled_owned(deliver_control(control.clone(), control_rx, control_inbound)));
        let stop = events.shutdown_token();
        thread
            .handle
            .spawn(stop.run_until_cancelled_owned(deliver_events(events.clone(), events_rx, app)));
        Ok(Bus {
            inner: Arc::new(Inner {
                control,
                events,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The control channel (Raft, proposals, pings, pongs).
    pub fn control(&self) -> &Transport {
        &self.inner.control
    }

    /// The events channel (event batches, acks, lane credits: `App` payloads only).
    pub fn events(&self) -> &Transport {
        &self.inner.events
    }

    /// The transport of `channel`.
    fn transport(&self, channel: Channel) -> &Transport {
        match channel {
            Channel::Events => &self.inner.events,
            Channel::Control | Channel::Unspecified => &self.inner.control,
        }
    }

    /// Dials peer `id` at `addr` on both channels (see [`Transport::add_peer`]); returns whether it
    /// is new to the control channel.
    pub fn add_peer(&self, id: u64, addr: impl Into<String>) -> bool {
        let addr = addr.into();
        self.inner.events.add_peer(id, addr.clone());
        self.inner.control.add_peer(id, addr)
    }

    /// Stops dialing peer `id` on both channels and drops what was queued for it.
    pub fn remove_peer(&self, id: u64) {
        self.inner.events.remove_peer(id);
        self.inner.control.remove_peer(id);
    }

    /// Accepts peer connections of both channels from `listener`, in a task on the control
    /// runtime, until shutdown. Each is handshaken there; an events connection is then moved to
    /// the events runtime. Refusals are logged and never stop the loop.
    pub fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        let bus = self.clone();
        let cancel = self.inner.control.shutdown_token();
        self.inner.control.runtime().spawn(async move {
            cancel.run_until_cancelled_owned(accept_loop(bus, listener)).await;
        })
    }

    /// Closes every connection of both channels and stops the `herald-events` thread (joining it).
    pub fn shutdown(&self) {
        self.inner.control.shutdown();
        self.inner.events.shutdown();
        let thread = self.inner.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(t) = thread {
            t.stop();
        }
    }

    /// Re-reads the node's TLS files every `every` (on the control runtime) until shutdown;
    /// new connections use reloaded material. Nothing to do without files.
    pub fn watch_tls(&self, every: Duration) -> Option<JoinHandle<()>> {
        let tls = self.inner.control.config().identity.tls.clone()?;
        tls.files()?;
        let cancel = self.inner.control.shutdown_token();
        let task = async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match tls.reload_if_changed() {
                    Ok(true) => tracing::info!("reloaded the peer TLS certificate files; new connections use them"),
                    Ok(false) => {}
                    Err(error) => tracing::error!(
                        %error,
                        "the changed peer TLS files are not usable; keeping the previous certificate"
                    ),
                }
            }
        };
        Some(self.inner.control.runtime().spawn(async move {
            cancel.run_until_cancelled_owned(task).await;
        }))
    }

    /// Handshakes one inbound TCP stream and hands it to the transport of its channel.
    async fn accept(&self, stream: TcpStream, remote: SocketAddr) {
        let control = &self.inner.control;
        let config = control.config();
        let result = handshake_on(
            Socket::Registered(stream),
            &config.identity,
            remote,
            None,
            None,
            config.handshake_timeout,
            |id, channel| self.transport(channel).has_inbound(id, channel),
        )
        .await;
        let est = match result {
            Ok(est) => est,
            Err(error) => {
                tracing::warn!(%remote, %error, "refused an inbound peer connection");
                return;
            }
        };
        let channel = est.channel;
        let (peer, read_buf, mut stream) = (est.peer, est.read_buf, est.stream);
        let adopted = match channel {
            Channel::Events => match stream.io_mut().detach() {
                // The socket is registered with this (the control) runtime's reactor; it moves
                // to the events runtime, where `attach` registers it again. The TLS session
                // around it moves as it is.
                Ok(()) => self.inner.events.adopt(peer, channel, read_buf, move || {
                    stream.io_mut().attach()?;
                    Ok(stream)
                }),
                Err(error) => {
                    tracing::warn!(%remote, %error, "cannot move an events connection to its runtime");
                    return;
                }
            },
            Channel::Control | Channel::Unspecified => control.adopt(peer, channel, read_buf, move || Ok(stream)),
        };
        if let Err(error) = adopted {
            tracing::warn!(%remote, %error, "refused an inbound peer connection");
        }
    }
}

/// An accepted TCP socket that can move from one tokio runtime to another with whatever wraps it
/// (the TLS session): [`detach`](Self::detach) takes it off the current runtime's reactor,
/// [`attach`](Self::attach) registers it with the reactor of the runtime it is called on. Only a
/// registered socket reads or writes.
#[derive(Debug)]
pub(crate) enum Socket {
    /// Registered with a runtime's reactor.
    Registered(TcpStream),
    /// Between runtimes.
    Detached(std::net::TcpStream),
    /// Lost while moving (a failed conversion).
    Gone,
}

impl Socket {
    /// Takes the socket off the current runtime's reactor.
    pub(crate) fn detach(&mut self) -> std::io::Result<()> {
        match std::mem::replace(self, Socket::Gone) {
            Socket::Registered(s) => {
                *self = Socket::Detached(s.into_std()?);
                Ok(())
            }
            other => {
                *self = other;
                Err(not_registered())
            }
        }
    }

    /// Registers the socket with the reactor of the runtime this is called on.
    pub(crate) fn attach(&mut self) -> std::io::Result<()> {
        match std::mem::replace(self, Socket::Gone) {
            Socket::Detached(s) => {
                *self = Socket::Registered(TcpStream::from_std(s)?);
                Ok(())
            }
            other => {
                *self = other;
                Err(std::io::Error::other("the peer socket is not detached"))
            }
        }
    }

    fn registered(self: Pin<&mut Self>) -> std::io::Result<Pin<&mut TcpStream>> {
        match self.get_mut() {
            Socket::Registered(s) => Ok(Pin::new(s)),
            _ => Err(not_registered()),
        }
    }
}

fn not_registered() -> std::io::Error {
    std::io::Error::other("the peer socket is not registered with a runtime")
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.registered() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.registered() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.registered() {
            Ok(s) => s.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.registered() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.registered() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

async fn accept_loop(bus: Bus, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%remote, %error, "cannot set TCP_NODELAY on a peer connection");
                }
                let bus = bus.clone();
                let cancel = bus.inner.control.shutdown_token();
                tokio::spawn(cancel.run_until_cancelled_owned(async move { bus.accept(stream, remote).await }));
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a peer connection failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Hands what the control channel receives, but `App` payloads, to the membership service's
/// `room`; an `App` payload is refused (see [`wrong_channel`]). Runs on the control runtime until
/// the transport stops.
async fn deliver_control(
    control: Transport,
    mut inbound: mpsc::Receiver<(u64, Envelope)>,
    room: mpsc::Sender<(u64, Envelope)>,
) {
    while let Some((from, env)) = inbound.recv().await {
        if control.is_cut_off(from) {
            continue;
        }
        match &env.body {
            Some(body @ Body::App(_)) => wrong_channel(from, Channel::Control, body),
            Some(_) => {
                let sent = room.send((from, env)).await;
                if sent.is_err() {
                    // The membership service is gone: the node is stopping.
                    return;
                }
            }
            None => {}
        }
    }
}

/// Hands the `App` payloads the events channel receives to the relay's sink; anything else is
/// refused (see [`wrong_channel`]). Runs on `herald-events` until the transport stops.
async fn deliver_events(
    events: Transport,
    mut inbound: mpsc::Receiver<(u64, Envelope)>,
    app: mpsc::UnboundedSender<(u64, Bytes)>,
) {
    while let Some((from, env)) = inbound.recv().await {
        if events.is_cut_off(from) {
            continue;
        }
        let sent = match env.body {
            Some(Body::App(bytes)) => app.send((from, bytes)),
            Some(body) => {
                wrong_channel(from, Channel::Events, &body);
                Ok(())
            }
            None => Ok(()),
        };
        if sent.is_err() {
            // The relay is gone: the node is stopping.
            return;
        }
    }
}

/// Drops an envelope whose type may not use `channel`: counts it in
/// `herald_transport_wrong_channel_total{channel}` and logs it (at warn for the 1st, 2nd, 4th,
/// 8th … drop, so a misbehaving peer cannot flood the log).
pub fn wrong_channel(from: u64, channel: Channel, body: &Body) {
    static DROPPED: AtomicU64 = AtomicU64::new(0);
    let name = channel_name(channel);
    metrics::counter!(WRONG_CHANNEL_TOTAL, "channel" => name).increment(1);
    let n = DROPPED.fetch_add(1, Ordering::Relaxed) + 1;
    let kind = body_name(body);
    if n.is_power_of_two() {
        tracing::warn!(
            peer = from,
            channel = name,
            kind,
            dropped = n,
            "dropped a peer message sent on the wrong channel"
        );
    } else {
        tracing::debug!(
            peer = from,
            channel = name,
            kind,
            "dropped a peer message sent on the wrong channel"
        );
    }
}

/// `control` or `events`, as metrics and logs name the channels.
pub fn channel_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Events => "events",
        Channel::Control | Channel::Unspecified => "control",
    }
}

fn body_name(body: &Body) -> &'static str {
    match body {
        Body::Raft(_) => "raft",
        Body::Ping(_) => "ping",
        Body::Pong(_) => "pong",
        Body::Propose(_) => "proposal",
        Body::ProposeResult(_) => "proposal result",
        Body::App(_) => "app",
    }
}

/// The `herald-events` thread and its current-thread runtime.
struct EventsThread {
    handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl EventsThread {
    fn start() -> std::io::Result<EventsThread> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("herald-events".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                });
            })?;
        Ok(EventsThread { handle, stop, thread })
    }

    /// Stops the runtime (dropping its tasks and connections) and joins the thread, unless called
    /// on that thread itself (then it ends once the call returns to its runtime).
    fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.thread().id() != std::thread::current().id() {
            let _ = self.thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use crate::transport::wire::Ping;

    const DEADLINE: Duration = Duration::from_secs(20);

    struct Node {
        bus: Bus,
        addr: String,
        control: mpsc::Receiver<(u64, Envelope)>,
        app: mpsc::UnboundedReceiver<(u64, Bytes)>,
    }

    async fn node(id: u64) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (control_tx, control) = mpsc::channel(64);
        let (app_tx, app) = mpsc::unbounded_channel();
        let mut config = TransportConfig::new("bus-test", id, addr.clone());
        config.backoff_min = Duration::from_millis(10);
        config.backoff_max = Duration::from_millis(200);
        let bus = Bus::start(config, control_tx, app_tx).expect("bus starts");
        bus.serve(listener);
        Node {
            bus,
            addr,
            control,
            app,
        }
    }

    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(DEADLINE, f)
            .await
            .unwrap_or_else(|_| panic!("{what}: not done within {DEADLINE:?}"))
    }

    /// Two buses connected both ways on both channels.
    async fn pair() -> (Node, Node) {
        let (a, b) = (node(1).await, node(2).await);
        a.bus.add_peer(2, b.addr.clone());
        b.bus.add_peer(1, a.addr.clone());
        for (bus, peer) in [(&a.bus, 2), (&b.bus, 1)] {
            for t in [bus.control(), bus.events()] {
                let mut link = t.link(peer).expect("peer added");
                within("connecting", link.wait_for(|l| l.connected))
                    .await
                    .expect("link");
            }
        }
        (a, b)
    }

    #[tokio::test]
    async fn each_channel_delivers_only_its_own_messages_to_its_room() {
        let (a, mut b) = pair().await;
        // On the wrong channel: dropped. Each is followed, on the same connection, by a message
        // that is allowed there, so once that one arrives the other was dropped (not delayed).
        a.bus.control().send(2, Envelope::app(&b"sneaky"[..])).expect("queued");
        a.bus.control().send(2, Envelope::ping(7, 0)).expect("queued");
        a.bus
            .events()
            .send(2, Envelope::raft(&b"vote for me"[..]))
            .expect("queued");
        a.bus.events().send(2, Envelope::ping(8, 0)).expect("queued");
        a.bus.events().send(2, Envelope::app(&b"batch"[..])).expect("queued");

        let (from, env) = within("the control message", b.control.recv()).await.expect("open");
        assert_eq!(from, 1);
        assert_eq!(
            env.body,
            Some(Body::Ping(Ping {
                seq: 7,
                sent_unix_nanos: 0
            }))
        );
        let (from, payload) = within("the event payload", b.app.recv()).await.expect("open");
        assert_eq!((from, &payload[..]), (1, &b"batch"[..]));
        assert!(b.control.try_recv().is_err(), "the events channel fed the control room");
        assert!(b.app.try_recv().is_err(), "the control channel fed the relay");

        // Each node holds one inbound connection per channel from the other.
        for ch in [Channel::Control, Channel::Events] {
            assert!(b.bus.transport(ch).has_inbound(1, ch), "{ch:?}");
            assert!(!b.bus.transport(ch).has_inbound(1, other(ch)), "{ch:?}");
        }
        a.bus.shutdown();
        b.bus.shutdown();
    }

    /// Invariant 1: a peer that stops reading its events connection fills that channel's queue,
    /// and control messages still go through at once (with one queue per peer, the ping would
    /// have waited behind the batches, or been refused as `QueueFull`).
    #[tokio::test]
    async fn a_full_events_queue_does_not_hold_back_control_messages() {
        use futures_util::StreamExt;
        use tokio_util::codec::FramedRead;

        use crate::transport::frame::FrameCodec;
        use crate::transport::SendError;

        // Node 2 played by hand: it admits both channels, reads its control connection and never
        // reads its events connection.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let identity = TransportConfig::new("bus-test", 2, addr.clone()).identity;
        let (control_tx, mut control_rx) = mpsc::unbounded_channel();
        let stalled = Arc::new(Mutex::new(Vec::new()));
        let held = stalled.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, remote)) = listener.accept().await else {
                    return;
                };
                let est = handshake_on(stream, &identity, remote, None, None, DEADLINE, |_, _| false)
                    .await
                    .expect("node 2 admits node 1");
                if est.channel == Channel::Events {
                    held.lock().expect("lock").push(est.stream);
                    continue;
                }
                let tx = control_tx.clone();
                tokio::spawn(async move {
                    let mut frames = FramedRead::new(est.stream, FrameCodec::<Envelope>::new(1 << 24));
                    frames.read_buffer_mut().extend_from_slice(&est.read_buf);
                    while let Some(Ok((env, _))) = frames.next().await {
                        if !env.is_keepalive() && tx.send(env).is_err() {
                            return;
                        }
                    }
                });
            }
        });

        let (control_tx, _control) = mpsc::channel(64);
        let (app_tx, _app) = mpsc::unbounded_channel();
        let mut config = TransportConfig::new("bus-test", 1, "127.0.0.1:1");
        config.send_queue = 64;
        let a = Bus::start(config, control_tx, app_tx).expect("bus starts");
        a.add_peer(2, addr);
        for t in [a.control(), a.events()] {
            let mut link = t.link(2).expect("peer added");
            within("connecting", link.wait_for(|l| l.connected))
                .await
                .expect("link");
        }
        let batch = Envelope::app(Bytes::from(vec![0u8; 1 << 20]));
        let filled = within("filling the events queue", async {
            let mut sent = 0u64;
            loop {
                match a.events().send(2, batch.clone()) {
                    Ok(()) => sent += 1,
                    Err(SendError::QueueFull { .. }) => return sent,
                    Err(e) => panic!("{e}"),
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(filled >= 64, "{filled} batches");

        a.control()
            .send(2, Envelope::ping(42, 0))
            .expect("the control queue has room");
        let env = within("the ping behind a full events queue", control_rx.recv())
            .await
            .expect("open");
        assert_eq!(
            env.body,
            Some(Body::Ping(Ping {
                seq: 42,
                sent_unix_nanos: 0
            }))
        );
        assert!(
            matches!(a.events().send(2, batch), Err(SendError::QueueFull { .. })),
            "the events connection stayed stalled"
        );
        assert!(!stalled.lock().expect("lock").is_empty());
        a.shutdown();
    }

    fn other(ch: Channel) -> Channel {
        match ch {
            Channel::Events => Channel::Control,
            _ => Channel::Events,
        }
    }

    #[tokio::test]
    async fn the_events_channel_runs_on_its_own_thread_and_shutdown_joins_it() {
        let (a, b) = pair().await;
        let events = a
            .bus
            .events()
            .runtime()
            .spawn(async { std::thread::current().name().map(String::from) });
        let control = a
            .bus
            .control()
            .runtime()
            .spawn(async { std::thread::current().name().map(String::from) });
        assert_eq!(events.await.expect("ran").as_deref(), Some("herald-events"));
        assert_ne!(control.await.expect("ran").as_deref(), Some("herald-events"));
        // Cutting a peer off on the control transport cuts it off on the events one too.
        a.bus.control().cut_off([2]);
        assert!(a.bus.events().is_cut_off(2));
        a.bus.control().heal();
        a.bus.shutdown();
        assert!(a.bus.inner.thread.lock().expect("lock").is_none());
        b.bus.shutdown();
    }
}
