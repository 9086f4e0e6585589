//! The transport front: peers, dialers with reconnect, the accept path, and sending.
//!
//! Connection layout: every node **dials** each peer added with [`Transport::add_peer`] and sends
//! to that peer only over this outbound connection; it **receives** over the connections other
//! nodes dialed to it (accepted by [`Transport::serve`] or [`Transport::accept`]). Two nodes that
//! know each other therefore hold two connections, one per direction. This avoids any tie-breaking
//! when both dial at once, keeps each writer single-producer, and lets a node receive from nodes it
//! does not know yet (a joining node). Inbound connections are unique per node id and channel: a
//! second one from the same id for the same channel is refused as a duplicate in the handshake.
//!
//! A transport dials for one [`Channel`] (`TransportConfig::channel`). Alone, it accepts and
//! drives connections of any channel; in a node, the peer bus (`super::bus`) runs two of them,
//! control and events, and its accept loop hands each connection to the transport of its
//! channel, on that transport's runtime ([`Transport::adopt`]). A transport spawns every task on
//! the runtime it was created in, whichever thread calls it.
//!
//! Sending never blocks on the network: [`Transport::send`] queues the envelope in the peer's
//! bounded queue (`send_queue` envelopes) whether or not the peer is connected, and fails with
//! [`SendError::QueueFull`] when the queue is full; [`Transport::send_async`] waits for room
//! instead. Queued envelopes are written once a connection is up, in order. Envelopes in a batch
//! that was being written when a connection broke are lost (at-most-once per attempt; Raft
//! retransmits and events are acknowledged end to end).
//!
//! Reconnects: a dialer whose peer is unreachable backs off (jittered, exponential, up to
//! `backoff_max`). When a node accepts an inbound connection from a peer whose dialer is waiting
//! in that backoff, the peer is evidently up again (typically it just restarted), so the dialer is
//! woken to redial at once, from the shortest delay. A dialer still waiting for its TCP connection
//! then gives that attempt up and dials again: it may be waiting on a SYN sent while the peer was
//! down, to an address nobody held, which only the kernel's retransmission a second or more later
//! would answer (a container restarted on a compose network). A connected dialer is never
//! disturbed.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prost::Message;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::conn::{self, ConnOptions, ConnectionEnd, ConnectionError};
use super::handshake::{handshake_on, Established, HandshakeError, PeerInfo, Side};
use super::wire::{Channel, Envelope};
use super::TransportConfig;

/// A connection that lives at least this long resets the reconnect backoff; one that breaks
/// sooner keeps backing off, so a peer that accepts and immediately drops is not hammered.
const STABLE_CONNECTION: Duration = Duration::from_secs(1);

/// Pause after a failed `accept()` (e.g. out of file descriptors) before accepting again.
pub(super) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Opens streams to peers. The transport is generic over it so tests (and a network simulator)
/// can run the whole transport over in-memory streams; [`TcpConnector`] is the real one.
pub trait Connector: Send + Sync + 'static {
    /// The stream type produced.
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    /// Opens a stream to `addr` (the address `peer` was added with) and returns it with the
    /// remote address it reached (used for the loopback rule when no secret is configured).
    fn connect(&self, peer: u64, addr: &str) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
}

/// Dials peers over TCP (`host:port`, names resolved by the system resolver) with `TCP_NODELAY`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    type Stream = TcpStream;

    async fn connect(&self, _peer: u64, addr: &str) -> io::Result<(TcpStream, SocketAddr)> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let remote = stream.peer_addr()?;
        Ok((stream, remote))
    }
}

/// The state of the outbound connection to one peer, published through a `watch` channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerLink {
    /// Whether the outbound connection is established (handshake done, not yet broken).
    pub connected: bool,
    /// How many times a connection to this peer was established (reconnects included).
    pub connects: u64,
    /// Why the last connection attempt failed or the last connection ended; cleared on connect.
    pub last_error: Option<String>,
    /// Connection attempts that failed since the last established connection.
    pub failed_dials: u64,
}

/// Why an envelope could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The peer was never added (or was removed).
    #[error("node {0} is not a known peer of this transport; add it with add_peer first")]
    UnknownPeer(u64),
    /// The peer's queue is full: it is slow, or unreachable and the queue filled up meanwhile.
    #[error("the send queue to node {peer} is full ({capacity} envelopes); the peer is slow or unreachable")]
    QueueFull {
        /// The peer.
        peer: u64,
        /// The queue's capacity (`send_queue`).
        capacity: usize,
    },
    /// The envelope is larger than any peer accepts.
    #[error("an envelope of {len} bytes exceeds the transport max_frame_len of {max} bytes")]
    TooLarge {
        /// The encoded length.
        len: usize,
        /// `max_frame_len`.
        max: usize,
    },
    /// The transport was shut down or the peer removed while waiting.
    #[error("the transport to node {0} is shut down")]
    Closed(u64),
}

/// An accepted inbound connection.
#[derive(Debug)]
pub struct InboundConnection {
    /// The authenticated peer.
    pub peer: PeerInfo,
    /// The task driving the connection; resolves to how it ended. Dropping it detaches the task.
    pub task: JoinHandle<Result<ConnectionEnd, ConnectionError>>,
}

/// The peer transport of one node. Cheap to clone; the last clone dropped (or
/// [`shutdown`](Transport::shutdown)) stops every task and closes every connection.
///
/// Must be created inside a tokio runtime: every task it starts runs there, whichever thread
/// calls it later.
pub struct Transport<C: Connector = TcpConnector> {
    /// Shared by all clones.
    inner: Arc<Inner<C>>,
}

impl<C: Connector> Clone for Transport<C> {
    fn clone(&self) -> Self {
        Transport {
            inner: self.inner.clone(),
        }
    }
}

/// What the `Transport` handles own. Tasks hold only [`Shared`], so dropping the last handle
/// drops this and cancels them.
struct Inner<C> {
    /// State shared with the tasks.
    shared: Arc<Shared>,
    /// Opens outbound streams; shared with the dialers.
    connector: Arc<C>,
    /// Outbound peers by node id. Read on every send, written on add/remove.
    peers: RwLock<HashMap<u64, Outbound>>,
}

impl<C> Drop for Inner<C> {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// State the spawned tasks need.
struct Shared {
    /// The configuration (identity, limits, timeouts).
    config: TransportConfig,
    /// The runtime the transport was created in; every task is spawned there.
    runtime: tokio::runtime::Handle,
    /// The driver's slice of the configuration.
    conn: ConnOptions,
    /// Where received envelopes go.
    inbound_tx: mpsc::Sender<(u64, Envelope)>,
    /// Established inbound connections by node id and channel (the duplicate check reads it).
    inbound: Mutex<HashMap<(u64, Channel), InboundEntry>>,
    /// Distinguishes successive inbound connections of one node id.
    next_conn: AtomicU64,
    /// Cancelled on shutdown; every task runs under it (or a child of it).
    shutdown: CancellationToken,
    /// Peers cut off by fault injection ([`Transport::cut_off`]); shared by the transports of a bus.
    cut: Arc<RwLock<std::collections::HashSet<u64>>>,
    /// The wake-ups of the outbound peers' dialers by node id (kept with `Inner::peers`), poked by
    /// the accept path.
    wakes: Mutex<HashMap<u64, Arc<Wake>>>,
}

/// Cuts a dialer's reconnect backoff short when its peer connects to this node.
#[derive(Default)]
struct Wake {
    /// Whether the dialer is connected. Held while poking and while the dialer connects, so a
    /// wake-up can neither reach a connected dialer nor outlive its connecting.
    connected: Mutex<bool>,
    /// Holds at most one wake-up (a permit) until the dialer waits on it.
    notify: Notify,
}

impl Wake {
    /// Wakes the dialer unless it is connected: one waiting for its TCP connection dials again,
    /// one in its handshake keeps the wake-up for its next backoff. Returns whether it was woken.
    fn poke(&self) -> bool {
        let connected = lock(&self.connected);
        if !*connected {
            self.notify.notify_one();
        }
        !*connected
    }

    /// Records whether the dialer is connected; connecting discards a pending wake-up, stale now.
    fn set_connected(&self, yes: bool) {
        let mut connected = lock(&self.connected);
        *connected = yes;
        if yes {
            // Consumes the permit, if any (a fresh `Notified` takes it on its first poll).
            std::pin::pin!(self.notify.notified()).enable();
        }
    }
}

/// One established inbound connection.
struct InboundEntry {
    /// Which connection of this node id it is, so a stale task does not remove its successor.
    conn_id: u64,
    /// Cancels the connection's task.
    cancel: CancellationToken,
    /// Who it is.
    peer: PeerInfo,
}

/// One outbound peer.
struct Outbound {
    /// The peer's queue; the dialer task owns the receiver across reconnects.
    tx: mpsc::Sender<Envelope>,
    /// The address to dial; updated in place by `add_peer`, read before each attempt.
    addr: watch::Sender<String>,
    /// The connection state the dialer publishes.
    link: watch::Receiver<PeerLink>,
    /// Stops the dialer (and its connection).
    cancel: CancellationToken,
}

impl Drop for Outbound {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Transport<TcpConnector> {
    /// A transport dialing peers over TCP. Received envelopes are sent to `inbound` as
    /// `(peer node id, envelope)`; when `inbound` is full the connections stop reading.
    ///
    /// Fails when the configuration is invalid (see [`TransportConfig::validate`]).
    pub fn new(config: TransportConfig, inbound: mpsc::Sender<(u64, Envelope)>) -> crate::Result<Self> {
        Transport::with_connector(config, TcpConnector, inbound)
    }
}

impl<C: Connector> Transport<C> {
    /// A TCP transport that shares `other`'s fault injection ([`cut_off`](Self::cut_off)): the
    /// bus's events transport, cut off whenever its control transport is.
    pub(crate) fn new_sharing_faults(
        config: TransportConfig,
        inbound: mpsc::Sender<(u64, Envelope)>,
        other: &Transport<C>,
    ) -> crate::Result<Transport<TcpConnector>> {
        Transport::<TcpConnector>::build(config, TcpConnector, inbound, other.inner.shared.cut.clone())
    }

    /// A transport dialing peers with `connector` (e.g. in-memory streams in tests).
    pub fn with_connector(
        config: TransportConfig,
        connector: C,
        inbound: mpsc::Sender<(u64, Envelope)>,
    ) -> crate::Result<Self> {
        Transport::build(config, connector, inbound, Arc::default())
    }

    fn build(
        config: TransportConfig,
        connector: C,
        inbound: mpsc::Sender<(u64, Envelope)>,
        cut: Arc<RwLock<std::collections::HashSet<u64>>>,
    ) -> crate::Result<Self> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            crate::Error::io(
                "the peer transport must be created inside a tokio runtime",
                io::Error::other(e),
            )
        })?;
        let conn = ConnOptions {
            max_frame_len: config.max_frame_len,
            write_batch_bytes: config.write_batch_bytes,
            keepalive_interval: config.keepalive_interval,
            idle_timeout: config.idle_timeout,
        };
        let shared = Arc::new(Shared {
            config,
            runtime,
            conn,
            inbound_tx: inbound,
            inbound: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            cut,
            wakes: Mutex::new(HashMap::new()),
        });
        Ok(Transport {
            inner: Arc::new(Inner {
                shared,
                connector: Arc::new(connector),
                peers: RwLock::new(HashMap::new()),
            }),
        })
    }

    /// The runtime this transport's tasks run on.
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.inner.shared.runtime
    }

    /// Cancelled when this transport shuts down.
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.inner.shared.shutdown.clone()
    }

    /// Whether node `id` has an established inbound connection on `channel`.
    pub(crate) fn has_inbound(&self, id: u64, channel: Channel) -> bool {
        lock(&self.inner.shared.inbound).contains_key(&(id, channel))
    }

    /// Registers an inbound connection that completed its handshake elsewhere (the bus's accept
    /// loop) and drives it on this transport's runtime. `open` gives the stream, called on that
    /// runtime (a TCP socket must be registered with the reactor of the runtime that polls it).
    pub(crate) fn adopt<S, F>(
        &self,
        peer: PeerInfo,
        channel: Channel,
        read_buf: bytes::BytesMut,
        open: F,
    ) -> Result<InboundConnection, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        F: FnOnce() -> io::Result<S> + Send + 'static,
    {
        self.inner.shared.adopt(peer, channel, read_buf, open)
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.shared.config.identity.node_id
    }

    /// The configuration in force.
    pub fn config(&self) -> &TransportConfig {
        &self.inner.shared.config
    }

    /// Starts dialing peer `id` at `addr` (keeping a connection up, reconnecting with jittered
    /// exponential backoff). Returns `true` when the peer is new. For a known peer the address is
    /// replaced and used from the next connection attempt; its queue is kept. This node's own id
    /// is ignored (returns `false`), and so is any peer after [`shutdown`](Self::shutdown).
    pub fn add_peer(&self, id: u64, addr: impl Into<String>) -> bool {
        let addr = addr.into();
        if self.inner.shared.shutdown.is_cancelled() {
            return false;
        }
        if id == self.node_id() {
            tracing::debug!(peer = id, "not dialing this node's own id");
            return false;
        }
        let mut peers = self.inner.peers.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = peers.get(&id) {
            p.addr.send_replace(addr);
            return false;
        }
        let shared = &self.inner.shared;
        let (tx, outbound) = mpsc::channel(shared.config.send_queue);
        let (addr_tx, addr_rx) = watch::channel(addr);
        let (link_tx, link_rx) = watch::channel(PeerLink::default());
        let cancel = shared.shutdown.child_token();
        let wake = Arc::new(Wake::default());
        lock(&shared.wakes).insert(id, wake.clone());
        let dialer = Dialer {
            shared: shared.clone(),
            connector: self.inner.connector.clone(),
            peer: id,
            addr: addr_rx,
            link: link_tx,
            wake,
            outbound,
        };
        shared
            .runtime
            .spawn(cancel.clone().run_until_cancelled_owned(dialer.run()));
        peers.insert(
            id,
            Outbound {
                tx,
                addr: addr_tx,
                link: link_rx,
                cancel,
            },
        );
        true
    }

    /// The peer this transport dials at `addr`, if any (the lowest id when several share it).
    pub fn peer_at(&self, addr: &str) -> Option<u64> {
        let peers = self.inner.peers.read().unwrap_or_else(PoisonError::into_inner);
        peers
            .iter()
            .filter(|(_, p)| *p.addr.borrow() == addr)
            .map(|(&id, _)| id)
            .min()
    }

    /// Forgets peer `id`: stops its dialer, closes its outbound and inbound connections and drops
    /// its queue. Returns whether anything was known about it. The peer may connect again (it is
    /// still authenticated by the cluster secret); the layers above decide who is a member.
    pub fn remove_peer(&self, id: u64) -> bool {
        let outbound = {
            let mut peers = self.inner.peers.write().unwrap_or_else(PoisonError::into_inner);
            lock(&self.inner.shared.wakes).remove(&id);
            peers.remove(&id)
        };
        let mut closed = false;
        lock(&self.inner.shared.inbound).retain(|&(peer, _), entry| {
            if peer == id {
                entry.cancel.cancel();
                closed = true;
            }
            peer != id
        });
        outbound.is_some() || closed
    }

    /// Queues `envelope` for peer `id` without waiting: fails when the peer is unknown, its queue
    /// is full, or the envelope is larger than `max_frame_len`. Queued envelopes are sent in order
    /// once (or while) the peer is connected.
    pub fn send(&self, id: u64, envelope: Envelope) -> Result<(), SendError> {
        self.check_len(&envelope)?;
        if self.is_cut_off(id) {
            return Ok(());
        }
        let peers = self.inner.peers.read().unwrap_or_else(PoisonError::into_inner);
        let peer = peers.get(&id).ok_or(SendError::UnknownPeer(id))?;
        peer.tx.try_send(envelope).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::QueueFull {
                peer: id,
                capacity: self.inner.shared.config.send_queue,
            },
            mpsc::error::TrySendError::Closed(_) => SendError::Closed(id),
        })
    }

    /// Queues `envelope` for peer `id`, waiting for room in its queue.
    pub async fn send_async(&self, id: u64, envelope: Envelope) -> Result<(), SendError> {
        self.check_len(&envelope)?;
        if self.is_cut_off(id) {
            return Ok(());
        }
        let tx = {
            let peers = self.inner.peers.read().unwrap_or_else(PoisonError::into_inner);
            peers.get(&id).ok_or(SendError::UnknownPeer(id))?.tx.clone()
        };
        tx.send(envelope).await.map_err(|_| SendError::Closed(id))
    }

    /// Fault injection, for tests and drills: from now on every envelope to `peers` is dropped as
    /// if lost on the network (sends still succeed, connections stay up, nothing is reset: a
    /// silent partition). The receiving side must drop what arrives from them too; the node's
    /// dispatcher does, through [`Transport::is_cut_off`]. [`Transport::heal`] undoes it.
    pub fn cut_off(&self, peers: impl IntoIterator<Item = u64>) {
        self.inner
            .shared
            .cut
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(peers);
    }

    /// Ends every [`Transport::cut_off`].
    pub fn heal(&self) {
        self.inner
            .shared
            .cut
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Whether `peer` is cut off by fault injection.
    pub fn is_cut_off(&self, peer: u64) -> bool {
        let cut = self.inner.shared.cut.read().unwrap_or_else(PoisonError::into_inner);
        !cut.is_empty() && cut.contains(&peer)
    }

    fn check_len(&self, envelope: &Envelope) -> Result<(), SendError> {
        let len = envelope.encoded_len();
        let max = self.inner.shared.config.max_frame_len;
        if len > max {
            return Err(SendError::TooLarge { len, max });
        }
        Ok(())
    }

    /// The outbound connection state of peer `id`, to watch (e.g. `wait_for(|l| l.connected)`).
    pub fn link(&self, id: u64) -> Option<watch::Receiver<PeerLink>> {
        let peers = self.inner.peers.read().unwrap_or_else(PoisonError::into_inner);
        peers.get(&id).map(|p| p.link.clone())
    }

    /// Whether the outbound connection to peer `id` is up.
    pub fn is_connected(&self, id: u64) -> bool {
        self.link(id).is_some_and(|l| l.borrow().connected)
    }

    /// The peers connected to this node (inbound connections), with the addresses they advertise.
    pub fn inbound_peers(&self) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = lock(&self.inner.shared.inbound)
            .values()
            .map(|e| e.peer.clone())
            .collect();
        peers.sort_by_key(|p| p.node_id);
        // One entry per node, whichever of its channels are connected.
        peers.dedup_by_key(|p| p.node_id);
        peers
    }

    /// Accepts peer connections from `listener` in a background task until shutdown. Each
    /// connection is handshaken and driven in its own task; refusals and errors are logged and
    /// never stop the loop. The returned task ends (and the listener is closed) on
    /// [`shutdown`](Self::shutdown); aborting it stops accepting without touching connections.
    pub fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        let shared = self.inner.shared.clone();
        let cancel = shared.shutdown.clone();
        shared.runtime.clone().spawn(async move {
            cancel.run_until_cancelled_owned(accept_loop(shared, listener)).await;
        })
    }

    /// Handshakes an inbound `stream` coming from `remote` (pass a loopback address for in-memory
    /// streams) and, when admitted, drives it in a spawned task. Refusals are logged and returned.
    pub async fn accept<S>(&self, stream: S, remote: SocketAddr) -> Result<InboundConnection, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.inner.shared.accept(stream, remote).await
    }

    /// Stops every task and closes every connection now. Sends fail with
    /// [`SendError::UnknownPeer`] afterwards.
    pub fn shutdown(&self) {
        self.inner.shared.shutdown.cancel();
        {
            let mut peers = self.inner.peers.write().unwrap_or_else(PoisonError::into_inner);
            lock(&self.inner.shared.wakes).clear();
            peers.clear();
        }
        lock(&self.inner.shared.inbound).clear();
    }
}

impl Shared {
    async fn accept<S>(self: &Arc<Self>, stream: S, remote: SocketAddr) -> Result<InboundConnection, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let result = handshake_on(
            stream,
            &self.config.identity,
            remote,
            None,
            None,
            self.config.handshake_timeout,
            |id, channel| lock(&self.inbound).contains_key(&(id, channel)),
        )
        .await;
        let est = match result {
            Ok(est) => est,
            Err(error) => {
                tracing::warn!(%remote, %error, "refused an inbound peer connection");
                return Err(error);
            }
        };
        let Established {
            peer,
            stream,
            read_buf,
            channel,
        } = est;
        self.adopt(peer, channel, read_buf, move || Ok(stream))
    }

    fn adopt<S, F>(
        self: &Arc<Self>,
        peer: PeerInfo,
        channel: Channel,
        read_buf: bytes::BytesMut,
        open: F,
    ) -> Result<InboundConnection, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        F: FnOnce() -> io::Result<S> + Send + 'static,
    {
        let id = peer.node_id;
        let remote = peer.remote_addr;
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let cancel = self.shutdown.child_token();
        {
            let mut inbound = lock(&self.inbound);
            if inbound.contains_key(&(id, channel)) {
                // Two handshakes from one node id finished at the same time; the first one won.
                let message =
                    format!("node {id} ({remote}) connected twice at the same time; keeping the first connection");
                tracing::warn!(%remote, peer = id, "{message}");
                return Err(HandshakeError::DuplicateNodeId {
                    by: Side::Local,
                    message,
                });
            }
            inbound.insert(
                (id, channel),
                InboundEntry {
                    conn_id,
                    cancel: cancel.clone(),
                    peer: peer.clone(),
                },
            );
        }
        tracing::info!(peer = id, %remote, advertise = %peer.advertise_addr, ?channel, "peer connected");
        // The peer is up: if our dialer towards it is backing off, it need not wait any longer.
        let wake = lock(&self.wakes).get(&id).cloned();
        if wake.is_some_and(|w| w.poke()) {
            tracing::debug!(peer = id, "woke the dialer of a peer that connected to this node");
        }
        let shared = self.clone();
        let task = self.runtime.spawn(async move {
            let _registered = Registered {
                shared: shared.clone(),
                peer: id,
                channel,
                conn_id,
            };
            let stream = match open() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(peer = id, %remote, error = %e, "cannot use an accepted peer connection");
                    return Err(ConnectionError::Read(e.into()));
                }
            };
            // Nothing is sent on inbound connections but keepalives; holding the sender keeps
            // the writer alive.
            let (_keep, mut outbound) = mpsc::channel(1);
            let run = conn::drive(stream, read_buf, id, &mut outbound, &shared.inbound_tx, &shared.conn);
            cancel
                .run_until_cancelled(run)
                .await
                .unwrap_or(Ok(ConnectionEnd::ClosedLocally))
        });
        Ok(InboundConnection { peer, task })
    }
}

/// Removes an inbound connection's registry entry when its task ends or is cancelled.
struct Registered {
    /// The registry's owner.
    shared: Arc<Shared>,
    /// The peer's node id.
    peer: u64,
    /// The connection's channel.
    channel: Channel,
    /// This connection's id, so a newer connection of the same peer is left alone.
    conn_id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut inbound = lock(&self.shared.inbound);
        let key = (self.peer, self.channel);
        if inbound.get(&key).is_some_and(|e| e.conn_id == self.conn_id) {
            inbound.remove(&key);
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%remote, %error, "cannot set TCP_NODELAY on a peer connection");
                }
                let shared = shared.clone();
                let cancel = shared.shutdown.clone();
                shared
                    .runtime
                    .clone()
                    .spawn(cancel.run_until_cancelled_owned(async move {
                        // Refusals are logged by `accept`.
                        let _ = shared.accept(stream, remote).await;
                    }));
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a peer connection failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Why a dial attempt failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("connecting did not finish within {0:?}")]
    ConnectTimeout(Duration),
    /// The peer connected to this node while this attempt was still connecting.
    #[error("the peer connected to this node while this dial was connecting; dialing again")]
    Superseded,
    #[error(transparent)]
    Handshake(HandshakeError),
}

/// The task keeping the outbound connection to one peer up.
struct Dialer<C> {
    /// Configuration and the inbound channel.
    shared: Arc<Shared>,
    /// Opens streams.
    connector: Arc<C>,
    /// The peer's node id (the handshake insists on it).
    peer: u64,
    /// The address to dial, re-read before every attempt.
    addr: watch::Receiver<String>,
    /// Where the connection state is published.
    link: watch::Sender<PeerLink>,
    /// Poked when the peer connects to this node, to end a backoff early.
    wake: Arc<Wake>,
    /// The peer's queue, kept across reconnects.
    outbound: mpsc::Receiver<Envelope>,
}

impl<C: Connector> Dialer<C> {
    async fn run(mut self) {
        let cfg = &self.shared.config;
        let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max, cfg.backoff_jitter);
        let mut failures = 0u64;
        let peer = self.peer;
        loop {
            let addr = self.addr.borrow_and_update().clone();
            match self.dial(&addr).await {
                Ok(est) => {
                    failures = 0;
                    self.wake.set_connected(true);
                    tracing::info!(peer, %addr, "connected to peer");
                    self.link.send_modify(|l| {
                        l.connected = true;
                        l.connects += 1;
                        l.last_error = None;
                        l.failed_dials = 0;
                    });
                    let started = Instant::now();
                    let result = conn::drive(
                        est.stream,
                        est.read_buf,
                        peer,
                        &mut self.outbound,
                        &self.shared.inbound_tx,
                        &self.shared.conn,
                    )
                    .await;
                    self.wake.set_connected(false);
                    let reason = match result {
                        Ok(ConnectionEnd::ClosedLocally | ConnectionEnd::InboundClosed) => {
                            self.link.send_modify(|l| l.connected = false);
                            return;
                        }
                        Ok(ConnectionEnd::PeerClosed) => "the peer closed the connection".to_string(),
                        Err(e) => e.to_string(),
                    };
                    self.link.send_modify(|l| {
                        l.connected = false;
                        l.last_error = Some(reason);
                    });
                    if started.elapsed() >= STABLE_CONNECTION {
                        backoff.reset();
                    }
                }
                Err(DialError::Superseded) => {
                    tracing::debug!(peer, %addr, "the peer connected to this node while a dial was still connecting; dialing again");
                    backoff.reset();
                    continue;
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(peer, %addr, %error, failures, "cannot connect to peer; retrying with backoff");
                    } else {
                        tracing::debug!(peer, %addr, %error, failures, "cannot connect to peer; retrying with backoff");
                    }
                    self.link.send_modify(|l| {
                        l.last_error = Some(error.to_string());
                        l.failed_dials += 1;
                    });
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                // A new address is worth trying at once.
                Ok(()) = self.addr.changed() => {}
                // The peer connected to this node, so it is up: retry now, from the shortest delay.
                () = self.wake.notify.notified() => {
                    tracing::debug!(peer, "the peer connected to this node; redialing it now");
                    backoff.reset();
                }
            }
        }
    }

    async fn dial(&self, addr: &str) -> Result<Established<C::Stream>, DialError> {
        let cfg = &self.shared.config;
        let connect = tokio::time::timeout(cfg.connect_timeout, self.connector.connect(self.peer, addr));
        let (stream, remote) = tokio::select! {
            connected = connect => connected
                .map_err(|_| DialError::ConnectTimeout(cfg.connect_timeout))?
                .map_err(DialError::Connect)?,
            // The peer is up: this attempt may wait on a SYN it can no longer answer.
            () = self.wake.notify.notified() => return Err(DialError::Superseded),
        };
        handshake_on(
            stream,
            &cfg.identity,
            remote,
            Some(self.peer),
            Some(cfg.channel),
            cfg.handshake_timeout,
            |_, _| false,
        )
        .await
        .map_err(DialError::Handshake)
    }
}

/// Jittered exponential backoff: `min`, doubling up to `max`, each delay multiplied by a random
/// factor in `[1 - jitter, 1 + jitter]` so peers that lost a node together do not retry in step.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    /// First delay.
    min: Duration,
    /// Largest delay before jitter.
    max: Duration,
    /// Relative jitter, in `[0, 1)`.
    jitter: f64,
    /// The next delay before jitter.
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration, jitter: f64) -> Self {
        Backoff {
            min,
            max,
            jitter,
            current: min,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        if self.jitter > 0.0 {
            base.mul_f64(rand::rng().random_range(1.0 - self.jitter..=1.0 + self.jitter))
        } else {
            base
        }
    }

    /// Back to the first delay (after a connection that held).
    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_within_the_jitter() {
        let (min, max) = (Duration::from_millis(50), Duration::from_secs(5));
        let mut b = Backoff::new(min, max, 0.2);
        let mut base = min;
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= base.mul_f64(0.8) && d <= base.mul_f64(1.2),
                "{d:?} vs base {base:?}"
            );
            base = (base * 2).min(max);
        }
        assert_eq!(base, max);
        b.reset();
        let d = b.next_delay();
        assert!(d <= min.mul_f64(1.2), "{d:?}");
    }

    #[test]
    fn backoff_jitter_varies() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.2);
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 1, "jitter never varied: {seen:?}");
    }
}
