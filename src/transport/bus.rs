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
//!   goes straight to the relay's sink. A node runs the relay's tasks on that thread too (on
//!   `events().runtime()`), so event batches pass between the relay and the connections without
//!   waking another thread.
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
//! **Bounded, with backpressure.** Each channel's receive queue holds [`INBOUND`] envelopes and
//! the relay's sink ([`APP_QUEUE`] payloads) is bounded too: when the relay falls behind, the
//! events channel's delivery task waits for room, its receive queue fills, its connections stop
//! reading, and TCP pushes back on the senders, whose bounded send queues then refuse or wait.
//! Nothing is dropped. The control channel has its own connections, queue and task on another
//! runtime, so a full relay sink never holds back Raft messages or pings.
//!
//! **Handshakes are capped.** At most `max_pending_handshakes` inbound connections handshake at
//! once; one more is closed at once and counted in `herald_transport_connections_refused_total`
//! (`reason="too_many_pending"`). Refusals are logged at WARN at most once per
//! [`LogLimit::EVERY`](crate::types::LogLimit::EVERY) per reason, with how many were not logged.
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

/// `App` payloads the relay's sink holds (the capacity of the channel given to [`Bus::start`]):
/// when it is full, the events channel stops reading until the relay takes some.
pub const APP_QUEUE: usize = 1024;

/// The events connections' keepalive interval and idle timeout are the control ones times this
/// (9 s and 30 s by default). A node keeps an events connection to every member, mostly idle, so
/// their keepalives were a large part of an idle node's wake-ups; and a peer that dies or freezes
/// is found by the monitor over the control connection within about a second (the relay then
/// reroutes), so the events idle timeout only has to catch a connection that died silently while
/// its peer stayed healthy.
pub(super) const EVENTS_KEEPALIVE_FACTOR: u32 = 3;

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
    /// `App` payloads it receives (and nothing else) to `app` (bounded: give it [`APP_QUEUE`];
    /// when it is full the events connections stop reading). Call [`Bus::serve`] to accept peers.
    pub fn start(
        config: TransportConfig,
        control_inbound: mpsc::Sender<(u64, Envelope)>,
        app: mpsc::Sender<(u64, Bytes)>,
    ) -> crate::Result<Bus> {
        let mut control_config = config.clone();
        control_config.channel = Channel::Control;
        let (control_tx, control_rx) = mpsc::channel(INBOUND);
        let control = Transport::new(control_config, control_tx)?;
        let thread = EventsThread::start().map_err(|e| Error::io("cannot start the herald-events thread", e))?;
        let mut events_config = config;
        events_config.channel = Channel::Events;
        events_config.keepalive_interval *= EVENTS_KEEPALIVE_FACTOR;
        events_config.idle_timeout *= EVENTS_KEEPALIVE_FACTOR;
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
    async fn accept(&self, stream: TcpStream, remote: SocketAddr, pending: tokio::sync::OwnedSemaphorePermit) {
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
        drop(pending);
        let est = match result {
            Ok(est) => est,
            Err(error) => {
                refused("handshake", remote, &error);
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
            refused("handshake", remote, &error);
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

/// Counts an inbound connection refused for `reason` and logs it at WARN, at most once per
/// [`LogLimit::EVERY`](crate::types::LogLimit::EVERY) per reason (with how many were not logged
/// since), so a flood of bad connections cannot flood the log.
fn refused(reason: &'static str, remote: SocketAddr, error: &dyn std::fmt::Display) {
    static LIMITS: Mutex<Vec<(&str, crate::types::LogLimit)>> = Mutex::new(Vec::new());
    metrics::counter!(super::CONNECTIONS_REFUSED_TOTAL, "reason" => reason).increment(1);
    let log = {
        let mut limits = LIMITS.lock().unwrap_or_else(PoisonError::into_inner);
        let at = match limits.iter().position(|(r, _)| *r == reason) {
            Some(at) => at,
            None => {
                limits.push((reason, crate::types::LogLimit::default()));
                limits.len() - 1
            }
        };
        limits[at].1.hit(std::time::Instant::now())
    };
    match log {
        Some(suppressed) => {
            tracing::warn!(%remote, %error, reason, suppressed, "refused an inbound peer connection")
        }
        None => tracing::debug!(%remote, %error, reason, "refused an inbound peer connection"),
    }
}

async fn accept_loop(bus: Bus, listener: TcpListener) {
    let pending = Arc::new(tokio::sync::Semaphore::new(
        bus.inner.control.config().max_pending_handshakes,
    ));
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                // Taken before anything is spent on the connection; held until its handshake
                // is done (the connection then belongs to its transport).
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    drop(stream);
                    refused(
                        "too_many_pending",
                        remote,
                        &"too many handshakes under way (cluster.max_pending_handshakes)",
                    );
                    continue;
                };
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%remote, %error, "cannot set TCP_NODELAY on a peer connection");
                }
                let bus = bus.clone();
                let cancel = bus.inner.control.shutdown_token();
                tokio::spawn(cancel.run_until_cancelled_owned(async move { bus.accept(stream, remote, permit).await }));
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
    app: mpsc::Sender<(u64, Bytes)>,
) {
    while let Some((from, env)) = inbound.recv().await {
        if events.is_cut_off(from) {
            continue;
        }
        let sent = match env.body {
            // Waits while the relay's sink is full: meanwhile this channel's receive queue fills
            // and its connections stop reading (backpressure to the senders, nothing dropped).
            Some(Body::App(bytes)) => app.send((from, bytes)).await,
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
        Body::Suspicions(_) => "suspicions",
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
        app: mpsc::Receiver<(u64, Bytes)>,
    }

    async fn node(id: u64) -> Node {
        node_with(id, APP_QUEUE, 8192).await
    }

    async fn node_with(id: u64, app_queue: usize, send_queue: usize) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (control_tx, control) = mpsc::channel(64);
        let (app_tx, app) = mpsc::channel(app_queue);
        let mut config = TransportConfig::new("bus-test", id, addr.clone());
        config.backoff_min = Duration::from_millis(10);
        config.backoff_max = Duration::from_millis(200);
        config.send_queue = send_queue;
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
        let (app_tx, _app) = mpsc::channel(APP_QUEUE);
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
        // Filled once it stays full: a first `QueueFull` may only mean the writer is still
        // draining the queue into the socket's buffers.
        let filled = within("filling the events queue", async {
            let mut sent = 0u64;
            let mut full_since = None;
            loop {
                match a.events().send(2, batch.clone()) {
                    Ok(()) => {
                        sent += 1;
                        full_since = None;
                        tokio::task::yield_now().await;
                    }
                    Err(SendError::QueueFull { .. }) => {
                        let since = *full_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= Duration::from_millis(500) {
                            return sent;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("{e}"),
                }
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

    /// A relay that does not keep up fills the bounded app sink; the events channel then stops
    /// reading and the sender's queue fills (backpressure), the control channel still delivers at
    /// once, and once the relay reads again every payload arrives, in order: none was dropped.
    #[tokio::test]
    async fn a_full_app_sink_pushes_back_on_the_sender_drops_nothing_and_spares_control() {
        use crate::transport::SendError;

        let a = node_with(1, APP_QUEUE, 64).await;
        let mut b = node_with(2, 4, 8192).await;
        a.bus.add_peer(2, b.addr.clone());
        for t in [a.bus.control(), a.bus.events()] {
            let mut link = t.link(2).expect("peer added");
            within("connecting", link.wait_for(|l| l.connected))
                .await
                .expect("link");
        }
        // Node 2's relay reads nothing meanwhile. Node 1 sends until its queue towards node 2
        // stays full (node 2 stopped reading and TCP pushed back). Without backpressure node 2
        // keeps reading and buffers everything, the queue never stays full, and the cap only
        // keeps that failure from eating the memory.
        const CAP: u64 = 200_000;
        const STALLED: Duration = Duration::from_millis(500);
        let payload = |seq: u64| {
            let mut p = vec![0u8; 256];
            p[..8].copy_from_slice(&seq.to_be_bytes());
            Envelope::app(p)
        };
        let sent = within("node 1's events queue staying full", async {
            let mut seq = 0u64;
            let mut full_since = None;
            while seq < CAP {
                match a.bus.events().send(2, payload(seq)) {
                    Ok(()) => {
                        seq += 1;
                        full_since = None;
                        tokio::task::yield_now().await;
                    }
                    Err(SendError::QueueFull { .. }) => {
                        let since = *full_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= STALLED {
                            return seq;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            panic!("{CAP} payloads sent and node 2 never pushed back");
        })
        .await;

        a.bus.control().send(2, Envelope::ping(9, 0)).expect("queued");
        let (from, env) = within("the ping while the app sink is full", b.control.recv())
            .await
            .expect("open");
        assert_eq!(from, 1);
        assert!(matches!(env.body, Some(Body::Ping(Ping { seq: 9, .. }))), "{env:?}");

        within("every payload, in order", async {
            for want in 0..sent {
                let (from, p) = b.app.recv().await.expect("open");
                assert_eq!(from, 1);
                let got = u64::from_be_bytes(p[..8].try_into().expect("8 bytes"));
                assert_eq!(got, want, "a payload was dropped or reordered");
            }
        })
        .await;
        a.bus.shutdown();
        b.bus.shutdown();
    }

    /// More handshakes than `max_pending_handshakes` at once: the connections beyond it are
    /// closed at once (read EOF without a byte); once the slots are free, peers connect again.
    #[tokio::test]
    async fn connections_beyond_the_pending_handshake_cap_are_closed_at_once() {
        use tokio::io::AsyncReadExt;

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (control_tx, _control) = mpsc::channel(64);
        let (app_tx, _app) = mpsc::channel(APP_QUEUE);
        let mut config = TransportConfig::new("bus-test", 1, addr.to_string());
        config.max_pending_handshakes = 3;
        config.handshake_timeout = DEADLINE * 2;
        let bus = Bus::start(config, control_tx, app_tx).expect("bus starts");
        bus.serve(listener);
        // Three silent clients hold every handshake slot.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // Each later one is closed by the node (in order of arrival, after the three).
        for _ in 0..5 {
            let mut late = TcpStream::connect(addr).await.expect("connect");
            let mut buf = [0u8; 16];
            let n = within("the node closing a connection over the cap", late.read(&mut buf))
                .await
                .unwrap_or(0);
            assert_eq!(n, 0, "the node answered instead of closing");
        }
        // Once the slots are given up, a real peer's connection handshakes and is adopted.
        held.clear();
        let b = node(2).await;
        b.bus.add_peer(1, addr.to_string());
        let mut link = b.bus.control().link(1).expect("peer added");
        within("node 2 connecting once slots are free", link.wait_for(|l| l.connected))
            .await
            .expect("link");
        b.bus.shutdown();
        bus.shutdown();
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
