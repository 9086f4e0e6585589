//! [`PeerNet`]: the control plane's view of the peer network, and the [`Bus`]'s implementation;
//! [`EventNet`]: the event plane's view of its channel, and the [`Transport`]'s implementation.
//!
//! The membership service and the monitor need a handful of operations of the network: add and
//! remove peers, send on the control channel, read a peer's link state, dial back a node that
//! dialed in, ask fault injection, and learn the node id behind a seed's address. They use them
//! through this trait, never through the [`Bus`] or a [`Transport`](super::Transport) directly, so
//! a deterministic simulator (`tests/simulation.rs`) runs the real membership service over an
//! in-process network in virtual time, while a node runs it over the bus.
//!
//! The relay likewise sends on the events channel only through [`EventNet`], so the event-plane
//! simulation (`event_sim`) runs the real relay, router and supervisors of several nodes over an
//! in-process network, while a node gives it the bus's events transport.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

use super::{handshake_on, Bus, Channel, Envelope, HandshakeError, PeerLink, SendError, Transport};

/// A boxed future of [`PeerNet::probe`].
pub type Probe<'a> = Pin<Box<dyn Future<Output = Result<u64, ProbeError>> + Send + 'a>>;

/// What the control plane (membership service, monitor) asks of the peer network.
pub trait PeerNet: Send + Sync + 'static {
    /// Dials peer `id` at `addr` (on every channel); a known peer's address is updated in place.
    fn add_peer(&self, id: u64, addr: &str);
    /// Stops dialing peer `id` and drops what was queued for it.
    fn remove_peer(&self, id: u64);
    /// Queues `envelope` for peer `id` on the control channel; never blocks.
    fn send(&self, id: u64, envelope: Envelope) -> Result<(), SendError>;
    /// The state of the outbound connection to `id`, or `None` when `id` is not a peer.
    fn link(&self, id: u64) -> Option<watch::Receiver<PeerLink>>;
    /// When `id` is not a peer but has connected to this node, adds it at the address it
    /// advertised (a joining node must answer the leader that dialed it before the member table
    /// names the leader). Returns whether it did.
    fn dial_back(&self, id: u64) -> bool;
    /// Whether fault injection cut this node off from `id` (its messages are then ignored).
    fn is_cut_off(&self, id: u64) -> bool;
    /// The peer this node dials at `addr` on the control channel, if any: a seed it already
    /// knows needs no probe (which the seed would refuse as a duplicate of that connection).
    fn peer_at(&self, addr: &str) -> Option<u64>;
    /// Learns the node id behind the peer address `addr` (a `--join` seed) with a handshake.
    fn probe<'a>(&'a self, addr: &'a str) -> Probe<'a>;
}

/// A boxed future of [`EventNet::send_async`].
pub(crate) type Sending<'a> = Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + 'a>>;

/// What the event plane (the relay) asks of its channel to the other nodes: send to a peer, and
/// how large a frame may be. Peers are added and removed by the membership service, on the bus.
pub(crate) trait EventNet: Send + Sync + 'static {
    /// Queues `envelope` for peer `id`; fails at once when its queue is full.
    fn send(&self, id: u64, envelope: Envelope) -> Result<(), SendError>;
    /// Queues `envelope` for peer `id`, waiting for room in its queue (backpressure).
    fn send_async(&self, id: u64, envelope: Envelope) -> Sending<'_>;
    /// The largest payload one envelope may carry.
    fn max_frame_len(&self) -> usize;
}

impl EventNet for Transport {
    fn send(&self, id: u64, envelope: Envelope) -> Result<(), SendError> {
        Transport::send(self, id, envelope)
    }

    fn send_async(&self, id: u64, envelope: Envelope) -> Sending<'_> {
        Box::pin(Transport::send_async(self, id, envelope))
    }

    fn max_frame_len(&self) -> usize {
        self.config().max_frame_len
    }
}

/// Why a seed could not be probed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No connection within the transport's `connect_timeout`.
    #[error("connecting to {0} timed out")]
    Timeout(String),
    /// The connection failed.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, #[source] std::io::Error),
    /// The handshake failed (another cluster, a bad certificate, …).
    #[error("handshake with {0} failed: {1}")]
    Handshake(String, #[source] HandshakeError),
}

impl ProbeError {
    /// The seed refused the probe as a duplicate of a connection this node already has to it.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, ProbeError::Handshake(_, HandshakeError::DuplicateNodeId { .. }))
    }
}

impl PeerNet for Bus {
    fn add_peer(&self, id: u64, addr: &str) {
        Bus::add_peer(self, id, addr);
    }

    fn remove_peer(&self, id: u64) {
        Bus::remove_peer(self, id);
    }

    fn send(&self, id: u64, envelope: Envelope) -> Result<(), SendError> {
        self.control().send(id, envelope)
    }

    fn link(&self, id: u64) -> Option<watch::Receiver<PeerLink>> {
        self.control().link(id)
    }

    fn dial_back(&self, id: u64) -> bool {
        let control = self.control();
        if control.link(id).is_some() {
            return false;
        }
        match control.inbound_peers().into_iter().find(|p| p.node_id == id) {
            Some(p) => Bus::add_peer(self, id, p.advertise_addr),
            None => false,
        }
    }

    fn is_cut_off(&self, id: u64) -> bool {
        self.control().is_cut_off(id)
    }

    fn peer_at(&self, addr: &str) -> Option<u64> {
        self.control().peer_at(addr)
    }

    /// A TCP connection and a control-channel handshake, then the connection is closed.
    fn probe<'a>(&'a self, addr: &'a str) -> Probe<'a> {
        Box::pin(async move {
            let tc = self.control().config();
            let stream = tokio::time::timeout(tc.connect_timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| ProbeError::Timeout(addr.to_string()))?
                .map_err(|e| ProbeError::Connect(addr.to_string(), e))?;
            let remote = stream
                .peer_addr()
                .map_err(|e| ProbeError::Connect(addr.to_string(), e))?;
            let established = handshake_on(
                stream,
                &tc.identity,
                remote,
                None,
                Some(Channel::Control),
                tc.handshake_timeout,
                |_, _| false,
            )
            .await
            .map_err(|e| ProbeError::Handshake(addr.to_string(), e))?;
            Ok(established.peer.node_id)
        })
    }
}
