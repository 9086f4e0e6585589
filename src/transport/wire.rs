//! The peer wire schema: the prost messages exchanged between nodes.
//!
//! Declared with `prost`'s derive (no `.proto` file, no `protoc`). **Field tags are the schema:**
//! never reuse, renumber or change the type of a tag; add new fields and new `oneof` variants with
//! fresh tags instead. A node that receives a variant it does not know decodes it as "no body" and
//! drops it, so new variants can be rolled out one node at a time.
//!
//! A connection first runs mutual TLS 1.3 (unless peers are insecure), then carries
//! [`Handshake`] frames inside the session (see [`super::handshake`](mod@super::handshake)), then
//! [`Envelope`] frames until it closes. How a frame is delimited is defined in
//! [`super::frame`].
//!
//! ```text
//! message Envelope {                       // absent body = keepalive, never handed to users
//!   oneof body {
//!     bytes          raft           = 1;   // one serialized raft-rs `eraftpb::Message`, opaque here
//!     Ping           ping           = 2;
//!     Pong           pong           = 3;
//!     Proposal       propose        = 4;   // a follower forwarding a proposal to the leader
//!     ProposalResult propose_result = 5;
//!     bytes          app            = 6;   // opaque payload for later users (event batches, acks)
//!     Suspicions     suspicions     = 7;   // a watcher's news about the peers it watches, to the leader
//!   }                                      // 8.. free; never reuse a retired tag
//! }
//! message Ping           { uint64 seq = 1; int64 sent_unix_nanos = 2; }
//! message Pong           { uint64 seq = 1; int64 sent_unix_nanos = 2;   // echoes the Ping
//!                          uint64 handled = 3; uint64 backlog = 4; }  // the answerer's progress
//! message Proposal       { uint64 id = 1; bytes command = 2; uint64 origin = 3; }  // origin 0 = sender
//! message ProposalResult { uint64 id = 1; string error = 2; }           // "" = accepted
//! message Suspicions     { repeated PeerView views = 1; }     // at most MAX_PEER_VIEWS are read
//! message PeerView       { uint64 node = 1; uint32 state = 2;   // 0 up, 1 suspect, 2 degraded
//!                          bool unreachable = 3; uint64 age_ms = 4; }
//!
//! message Handshake {
//!   oneof step { Hello hello = 1; Refusal refusal = 3; Accepted accepted = 4; }  // 2 retired
//! }
//! message Hello    { string cluster_id = 1; uint64 node_id = 2;   // 3 retired (HMAC nonce)
//!                    string peer_addr = 4; uint32 protocol_version = 5;
//!                    Channel channel = 6; }                // the dialer's; UNSPECIFIED from acceptors
//! message Refusal  { RefusalCode code = 1; string message = 2; }
//! message Accepted { }
//! enum RefusalCode { UNSPECIFIED = 0; VERSION_MISMATCH = 1; CLUSTER_MISMATCH = 2;
//!                    SELF_CONNECTION = 3; UNEXPECTED_NODE_ID = 4; INSECURE_NON_LOOPBACK = 5;
//!                    UNTRUSTED = 6; DUPLICATE_NODE_ID = 7; PROTOCOL = 8; }
//! enum Channel     { UNSPECIFIED = 0; CONTROL = 1; EVENTS = 2; }
//! ```

use bytes::Bytes;

/// The version of the handshake and envelope protocol this build speaks. Bumped only for an
/// incompatible change (adding fields or variants is compatible and does not bump it). Version 3:
/// mutual TLS replaced the HMAC proofs (version 2 named the connection's [`Channel`]).
pub const PROTOCOL_VERSION: u32 = 3;

/// One frame after the handshake. An envelope without a body is a keepalive: it proves the
/// connection is alive and is consumed by the transport.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    /// What the frame carries; `None` for keepalives and for variants this node does not know.
    #[prost(oneof = "envelope::Body", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub body: Option<envelope::Body>,
}

impl Envelope {
    /// An envelope carrying `body`.
    pub fn new(body: envelope::Body) -> Self {
        Envelope { body: Some(body) }
    }

    /// An envelope carrying one serialized raft message.
    pub fn raft(message: impl Into<Bytes>) -> Self {
        Envelope::new(envelope::Body::Raft(message.into()))
    }

    /// An envelope carrying an opaque application payload.
    pub fn app(payload: impl Into<Bytes>) -> Self {
        Envelope::new(envelope::Body::App(payload.into()))
    }

    /// An envelope carrying a ping.
    pub fn ping(seq: u64, sent_unix_nanos: i64) -> Self {
        Envelope::new(envelope::Body::Ping(Ping { seq, sent_unix_nanos }))
    }

    /// Whether this is a keepalive (or a variant this build does not know).
    pub fn is_keepalive(&self) -> bool {
        self.body.is_none()
    }
}

/// The `oneof body` of [`Envelope`].
pub mod envelope {
    use bytes::Bytes;

    /// What an [`Envelope`](super::Envelope) carries. Tags are listed in the module docs.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// One serialized raft-rs message; the transport never looks inside.
        #[prost(bytes = "bytes", tag = "1")]
        Raft(Bytes),
        /// A liveness probe; the receiver answers with a [`Pong`](super::Pong).
        #[prost(message, tag = "2")]
        Ping(super::Ping),
        /// The answer to a [`Ping`](super::Ping).
        #[prost(message, tag = "3")]
        Pong(super::Pong),
        /// A proposal forwarded to the Raft leader.
        #[prost(message, tag = "4")]
        Propose(super::Proposal),
        /// The leader's answer to a forwarded proposal.
        #[prost(message, tag = "5")]
        ProposeResult(super::ProposalResult),
        /// An opaque payload for users above the transport (event batches, acks).
        #[prost(bytes = "bytes", tag = "6")]
        App(Bytes),
        /// A watcher's news about the peers it watches, sent to the Raft leader.
        #[prost(message, tag = "7")]
        Suspicions(super::Suspicions),
    }
}

/// The most [`PeerView`]s a receiver reads from one [`Suspicions`] (a watcher watches
/// `cluster.monitors` peers plus the down members between them; the rest are ignored).
pub const MAX_PEER_VIEWS: usize = 256;

/// A watcher's news about the peers it watches (the monitor's "Bounded monitoring").
#[derive(Clone, PartialEq, prost::Message)]
pub struct Suspicions {
    /// One view per peer; only the first [`MAX_PEER_VIEWS`] are read.
    #[prost(message, repeated, tag = "1")]
    pub views: Vec<PeerView>,
}

/// How a watcher sees one peer it watches.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerView {
    /// The watched peer.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// 0 up, 1 suspect, 2 degraded (`monitor::PeerState`); unknown values are ignored.
    #[prost(uint32, tag = "2")]
    pub state: u32,
    /// Its connection broke and it refuses new ones: its process is gone.
    #[prost(bool, tag = "3")]
    pub unreachable: bool,
    /// For how long the watcher has seen it in `state`, in milliseconds.
    #[prost(uint64, tag = "4")]
    pub age_ms: u64,
}

/// A liveness probe, used by the failure detector to measure round trips.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    /// Sequence number, so the answer can be matched to its probe.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Sender's clock when the ping left, in nanoseconds (for the RTT; only the sender reads it,
    /// from the echo). Herald sends its monotonic clock (since its monitor started), so a step of
    /// the wall clock cannot make a round trip look negative or hours long; the name is the
    /// field's first meaning, kept so the API and wire stay as they were.
    #[prost(int64, tag = "2")]
    pub sent_unix_nanos: i64,
}

/// The answer to a [`Ping`]: echoes its fields so the prober computes the RTT on its own clock.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Pong {
    /// The ping's sequence number.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The ping's `sent_unix_nanos`, echoed unchanged.
    #[prost(int64, tag = "2")]
    pub sent_unix_nanos: i64,
    /// Events the answerer's handlers have finished so far (a counter; gray-failure detection).
    #[prost(uint64, tag = "3")]
    pub handled: u64,
    /// Events queued or in progress at the answerer's handlers.
    #[prost(uint64, tag = "4")]
    pub backlog: u64,
}

/// A replicated command forwarded by a non-leader to the leader.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Proposal {
    /// Chosen by the forwarder to match the [`ProposalResult`].
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The serialized command, opaque to the transport.
    #[prost(bytes = "bytes", tag = "2")]
    pub command: Bytes,
    /// The node that made the proposal, when it is not the sender (a forward relayed after
    /// leadership moved); 0 = the sender.
    #[prost(uint64, tag = "3")]
    pub origin: u64,
}

/// The leader's answer to a [`Proposal`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProposalResult {
    /// The proposal's id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Empty when the proposal was accepted; otherwise why it was not (e.g. "not the leader").
    #[prost(string, tag = "2")]
    pub error: String,
}

/// One handshake frame. Exactly these are exchanged before the first [`Envelope`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Handshake {
    /// The step; `None` (an unknown or empty step) is a protocol error.
    #[prost(oneof = "handshake::Step", tags = "1, 3, 4")]
    pub step: Option<handshake::Step>,
}

/// The `oneof step` of [`Handshake`].
pub mod handshake {
    /// One handshake step. Tags are listed in the module docs.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Step {
        /// First frame of each side.
        #[prost(message, tag = "1")]
        Hello(super::Hello),
        // Tag 2 was the HMAC proof of protocol version 2; retired with it (mutual TLS proves
        // identities now). Do not reuse it.
        /// Sent instead of the next step when a side refuses the connection; the stream then closes.
        #[prost(message, tag = "3")]
        Refusal(super::Refusal),
        /// Second frame: this side checked the other's Hello (and certificate) and admits the
        /// connection.
        #[prost(message, tag = "4")]
        Accepted(super::Accepted),
    }
}

/// Who a node is, sent first by both sides.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// The sender's cluster id; both sides must agree.
    #[prost(string, tag = "1")]
    pub cluster_id: String,
    /// The sender's node id; unique in the cluster.
    #[prost(uint64, tag = "2")]
    pub node_id: u64,
    // Tag 3 was the HMAC nonce of protocol version 2; retired. Do not reuse it.
    /// The address other nodes should dial to reach the sender (its advertised peer address).
    #[prost(string, tag = "4")]
    pub peer_addr: String,
    /// The sender's [`PROTOCOL_VERSION`].
    #[prost(uint32, tag = "5")]
    pub protocol_version: u32,
    /// What the connection will carry ([`Channel`]): named by the dialer; an acceptor sends
    /// `Unspecified` and takes the dialer's.
    #[prost(enumeration = "Channel", tag = "6")]
    pub channel: i32,
}

/// Why a side refuses the connection; sent so the other side reports the same reason.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Refusal {
    /// Machine-readable reason ([`RefusalCode`]).
    #[prost(enumeration = "RefusalCode", tag = "1")]
    pub code: i32,
    /// The refusing side's explanation, including what to change.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// The admitting side's final "yes".
#[derive(Clone, PartialEq, prost::Message)]
pub struct Accepted {}

/// What a connection carries (see the peer bus, `transport::bus`). Named inside the TLS session,
/// so it is as authenticated as the node id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Channel {
    /// Not named: what an accepting side sends in its Hello.
    Unspecified = 0,
    /// Raft messages, forwarded proposals and their answers, pings and pongs.
    Control = 1,
    /// The event plane's `App` payloads (event batches, acks, lane credits).
    Events = 2,
}

/// Reasons for a [`Refusal`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum RefusalCode {
    /// A code this build does not know.
    Unspecified = 0,
    /// Different [`PROTOCOL_VERSION`]s.
    VersionMismatch = 1,
    /// Different cluster ids.
    ClusterMismatch = 2,
    /// The other side has this node's own id.
    SelfConnection = 3,
    /// The dialed address answered with another node id than the one it was added under.
    UnexpectedNodeId = 4,
    /// Insecure (plaintext) peers and the other side is not on loopback.
    InsecureNonLoopback = 5,
    /// The peer's certificate does not name the node it claims to be (or no node).
    Untrusted = 6,
    /// A connection from that node id is already established.
    DuplicateNodeId = 7,
    /// Malformed handshake (bad nonce, unexpected step).
    Protocol = 8,
}
