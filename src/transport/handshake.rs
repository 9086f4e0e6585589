//! The connection handshake: who is on the other end, and may it talk to us.
//!
//! Runs on any `AsyncRead + AsyncWrite + Unpin` stream, identically on the dialing and the
//! accepting side (there is no client/server asymmetry in the protocol), in three rounds where both
//! sides send before they read:
//!
//! 1. **Hello ↔ Hello**: protocol version, cluster id, node id, a fresh random 32-byte nonce, the
//!    address the sender wants to be dialed at, and the [`Channel`] the connection is for (named
//!    by the dialer; an accepting side sends `Unspecified` and takes the dialer's, see
//!    [`handshake_on`]).
//! 2. **Proof ↔ Proof**: each side checks the other's Hello (same version and cluster id, not our
//!    own node id, the node id we dialed, loopback when no secret is configured, one agreed
//!    channel), then sends `HMAC-SHA256(secret, other's nonce || own node id as u64 big-endian ||
//!    cluster id || channel as one byte)`. The channel is in the MAC so that a connection's class
//!    is as authenticated as its node id: a Hello whose channel was altered on the way fails both
//!    proofs.
//! 3. **Accepted ↔ Accepted**: each side verifies the other's proof in constant time
//!    (`Mac::verify_slice`) and that the node id is not already connected on that channel, then
//!    says yes.
//!
//! Whenever a side refuses, it sends a [`Refusal`] *instead of* its next step, closes its write
//! half and waits briefly for the other side to hang up (so the refusal is not lost to a TCP reset).
//! The other side, reading a refusal where it expected a step, returns the same error variant with
//! [`Side::Peer`], so a misconfiguration is reported with the same explanation on both nodes.
//! Proofs are checked before the duplicate test, so an unauthenticated peer cannot probe which
//! nodes are connected. Every send and receive is bounded by the step timeout.
//!
//! With no secret configured the MAC key is empty: two secret-less nodes still complete the
//! handshake (only over loopback), and a secret-less node never talks to one that has a secret.
//!
//! What this does not do: encrypt, or authenticate frames after the handshake. It keeps nodes of
//! different clusters, stray clients and nodes without the secret out; an attacker on the network
//! path can still read or hijack a connection. Run the peer network on a private network, or under
//! a tunnel (WireGuard, a TLS-terminating sidecar), when that matters.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Framed;

use super::frame::{FrameCodec, FrameError, HANDSHAKE_MAX_FRAME_LEN};
use super::wire::{self, handshake::Step, Channel, Hello, Proof, Refusal, RefusalCode, PROTOCOL_VERSION};

/// Length of the random nonce each side sends.
pub const NONCE_LEN: usize = 32;

/// How long a refusing side waits for the other side to hang up after its refusal.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

type HmacSha256 = Hmac<Sha256>;

/// The shared cluster secret. Its `Debug` output never shows the bytes.
#[derive(Clone)]
pub struct ClusterSecret(Arc<[u8]>);

impl ClusterSecret {
    /// A secret from its bytes, or `None` when they are empty (an empty secret is no secret).
    pub fn new(bytes: impl AsRef<[u8]>) -> Option<Self> {
        let bytes = bytes.as_ref();
        (!bytes.is_empty()).then(|| ClusterSecret(Arc::from(bytes)))
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret(<{} bytes, redacted>)", self.0.len())
    }
}

/// Who this node is, as presented in the handshake.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The cluster this node belongs to; peers with another id are refused.
    pub cluster_id: String,
    /// This node's id, unique in the cluster (at least 1).
    pub node_id: u64,
    /// The address peers should dial to reach this node, sent in the Hello so a node that accepts
    /// a connection learns where to dial back.
    pub advertise_addr: String,
    /// The cluster secret proved in the handshake. `None`: only loopback peers are accepted.
    pub secret: Option<ClusterSecret>,
}

/// Which side of a handshake refused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// This node refused (and told the peer why).
    Local,
    /// The peer refused and told us why.
    Peer,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Local => "this node",
            Side::Peer => "the peer",
        })
    }
}

/// Why a handshake failed. Refusals carry the side that refused and the refusing side's
/// explanation, which both sides report word for word.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The nodes run incompatible protocol versions.
    #[error("protocol version mismatch, refused by {by}: {message}")]
    VersionMismatch {
        /// Who refused.
        by: Side,
        /// The refusing side's explanation.
        message: String,
    },
    /// The nodes belong to different clusters.
    #[error("cluster id mismatch, refused by {by}: {message}")]
    ClusterMismatch {
        /// Who refused.
        by: Side,
        /// The refusing side's explanation.
        message: String,
    },
    /// The other side has our own node id.
    #[error("connection to itself or to a node with the same id, refused by {by}: {message}")]
    SelfConnection {
        /// Who refused.
        by: Side,
        /// The refusing side's explanation.
        message: String,
    },
    /// The dialed address answered with another node id than expected.
    #[error("unexpected node id, refused by {by}: {message}")]
    UnexpectedNodeId {
        /// Who refused.
        by: Side,
        /// The refusing side's explanation.
        message: String,
    },
    /// No secret is configured and the other side is not on loopback.
    #[error("non-loopback peer without a cluster secret, refused by {by}: {message}")]
    InsecureNonLoopback {
        /// Who refused.
        by: Side,
        /// The refusing side's explanation.
        message: String,
    },
    /// The proof of the cluster secret did not verify (different secrets).
    #[error("wrong cluster secret, refused by {by}: {message}")]
    BadProof {
        /// Who refused.
        by: Side,
        /// The refusing side's explanation.
        message: String,
    },
    /// A connection from this node id already exists.
    #[error("duplicate node id, refused by {by}: {message}")]
    DuplicateNodeId {
        /// Who refused.
        by: Side,
        /// The refusing side's explanation.
        message: String,
    },
    /// A malformed handshake (bad nonce, a step out of order).
    #[error("handshake protocol error, refused by {by}: {message}")]
    Protocol {
        /// Who refused.
        by: Side,
        /// What was wrong.
        message: String,
    },
    /// The peer refused with a reason code this build does not know.
    #[error("refused by the peer (reason code {code}): {message}")]
    Refused {
        /// The unknown code.
        code: i32,
        /// The peer's explanation.
        message: String,
    },
    /// A step did not finish in time.
    #[error(
        "handshake timed out after {after:?} while trying to {step}; the peer is not a herald \
         node, is overloaded, or the network drops packets"
    )]
    Timeout {
        /// What was being done.
        step: &'static str,
        /// The step timeout.
        after: Duration,
    },
    /// The peer closed the connection mid-handshake without a refusal.
    #[error("the peer closed the connection while this node tried to {step}")]
    Closed {
        /// What was being done.
        step: &'static str,
    },
    /// A handshake frame could not be read or written (garbage, oversized, I/O error).
    #[error("handshake failed: {0}")]
    Frame(#[from] FrameError),
}

impl HandshakeError {
    /// Who refused, for refusals; `None` for timeouts, closed streams and frame errors.
    pub fn refused_by(&self) -> Option<Side> {
        use HandshakeError::*;
        match self {
            VersionMismatch { by, .. }
            | ClusterMismatch { by, .. }
            | SelfConnection { by, .. }
            | UnexpectedNodeId { by, .. }
            | InsecureNonLoopback { by, .. }
            | BadProof { by, .. }
            | DuplicateNodeId { by, .. }
            | Protocol { by, .. } => Some(*by),
            Refused { .. } => Some(Side::Peer),
            Timeout { .. } | Closed { .. } | Frame(_) => None,
        }
    }

    /// The refusal to send for a locally detected refusal.
    fn to_refusal(&self) -> Option<Refusal> {
        use HandshakeError::*;
        let (code, message) = match self {
            VersionMismatch { message, .. } => (RefusalCode::VersionMismatch, message),
            ClusterMismatch { message, .. } => (RefusalCode::ClusterMismatch, message),
            SelfConnection { message, .. } => (RefusalCode::SelfConnection, message),
            UnexpectedNodeId { message, .. } => (RefusalCode::UnexpectedNodeId, message),
            InsecureNonLoopback { message, .. } => (RefusalCode::InsecureNonLoopback, message),
            BadProof { message, .. } => (RefusalCode::BadProof, message),
            DuplicateNodeId { message, .. } => (RefusalCode::DuplicateNodeId, message),
            Protocol { message, .. } => (RefusalCode::Protocol, message),
            Refused { .. } | Timeout { .. } | Closed { .. } | Frame(_) => return None,
        };
        Some(Refusal {
            code: code.into(),
            message: message.clone(),
        })
    }

    /// The error a received refusal stands for.
    fn from_refusal(r: Refusal) -> Self {
        let by = Side::Peer;
        let message = r.message;
        match RefusalCode::try_from(r.code) {
            Ok(RefusalCode::VersionMismatch) => HandshakeError::VersionMismatch { by, message },
            Ok(RefusalCode::ClusterMismatch) => HandshakeError::ClusterMismatch { by, message },
            Ok(RefusalCode::SelfConnection) => HandshakeError::SelfConnection { by, message },
            Ok(RefusalCode::UnexpectedNodeId) => HandshakeError::UnexpectedNodeId { by, message },
            Ok(RefusalCode::InsecureNonLoopback) => HandshakeError::InsecureNonLoopback { by, message },
            Ok(RefusalCode::BadProof) => HandshakeError::BadProof { by, message },
            Ok(RefusalCode::DuplicateNodeId) => HandshakeError::DuplicateNodeId { by, message },
            Ok(RefusalCode::Protocol) => HandshakeError::Protocol { by, message },
            Ok(RefusalCode::Unspecified) | Err(_) => HandshakeError::Refused { code: r.code, message },
        }
    }
}

/// The other side of an established connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its node id (authenticated by the proof when a secret is configured).
    pub node_id: u64,
    /// The address it asks to be dialed at (from its Hello; not verified).
    pub advertise_addr: String,
    /// The address the stream comes from (as given to [`handshake`]).
    pub remote_addr: SocketAddr,
}

/// A stream that completed the handshake.
#[derive(Debug)]
pub struct Established<S> {
    /// Who is on the other end.
    pub peer: PeerInfo,
    /// The stream, positioned after the last handshake frame.
    pub stream: S,
    /// Bytes already read past the handshake (the first envelope frames); the reader must
    /// consume these before reading from `stream`.
    pub read_buf: BytesMut,
    /// What the connection carries, as both sides agreed and proved (never `Unspecified`).
    pub channel: Channel,
}

/// Runs the handshake on `stream` as `local`, for a [`Channel::Control`] connection.
///
/// * `remote_addr`: where the stream comes from. Used for the loopback rule when `local` has no
///   secret; in-memory streams pass a loopback address.
/// * `expected_peer`: when dialing a known peer, the node id it must answer with.
/// * `step_timeout`: the bound of each send and each receive.
/// * `is_connected`: whether a node id already has a connection (checked after its proof); such a
///   peer is refused as a duplicate.
pub async fn handshake<S>(
    stream: S,
    local: &Identity,
    remote_addr: SocketAddr,
    expected_peer: Option<u64>,
    step_timeout: Duration,
    is_connected: impl Fn(u64) -> bool,
) -> Result<Established<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    handshake_on(
        stream,
        local,
        remote_addr,
        expected_peer,
        Some(Channel::Control),
        step_timeout,
        |id, _| is_connected(id),
    )
    .await
}

/// Runs the handshake on `stream` as `local`, like [`handshake`], for a connection of `channel`.
///
/// A dialing side names the channel (`Some`); an accepting side passes `None` and takes the one
/// the dialer named, which [`Established::channel`] reports. When both sides name one they must
/// agree. A Hello naming no channel when this side names none either, or a channel this build
/// does not know, is refused as a protocol error. `is_connected(node id, channel)` is asked
/// after the peer's proof, for the agreed channel.
pub async fn handshake_on<S>(
    stream: S,
    local: &Identity,
    remote_addr: SocketAddr,
    expected_peer: Option<u64>,
    channel: Option<Channel>,
    step_timeout: Duration,
    is_connected: impl Fn(u64, Channel) -> bool,
) -> Result<Established<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut io = Steps {
        framed: Framed::new(stream, FrameCodec::new(HANDSHAKE_MAX_FRAME_LEN)),
        timeout: step_timeout,
    };
    let nonce = fresh_nonce();
    let hello = Hello {
        cluster_id: local.cluster_id.clone(),
        node_id: local.node_id,
        nonce: Bytes::copy_from_slice(&nonce),
        peer_addr: local.advertise_addr.clone(),
        protocol_version: PROTOCOL_VERSION,
        channel: channel.unwrap_or(Channel::Unspecified).into(),
    };

    // Round 1: Hello ↔ Hello.
    io.send(Step::Hello(hello), "send its Hello").await?;
    let theirs = match io.recv("receive the peer's Hello").await? {
        Step::Hello(h) => h,
        Step::Refusal(r) => return Err(HandshakeError::from_refusal(r)),
        other => return io.refuse(protocol_error("a Hello", &other)).await,
    };
    if let Err(e) = check_hello(local, &theirs, remote_addr, expected_peer) {
        return io.refuse(e).await;
    }
    let channel = match agree_channel(local, &theirs, remote_addr, channel) {
        Ok(c) => c,
        Err(e) => return io.refuse(e).await,
    };
    let peer = PeerInfo {
        node_id: theirs.node_id,
        advertise_addr: theirs.peer_addr.clone(),
        remote_addr,
    };

    // Round 2: Proof ↔ Proof.
    let mac = keyed_mac(local, &theirs.nonce, local.node_id, channel)
        .finalize()
        .into_bytes();
    let proof = Proof {
        mac: Bytes::copy_from_slice(&mac),
    };
    io.send(Step::Proof(proof), "send its proof").await?;
    let their_proof = match io.recv("receive the peer's proof").await? {
        Step::Proof(p) => p,
        Step::Refusal(r) => return Err(HandshakeError::from_refusal(r)),
        other => return io.refuse(protocol_error("a Proof", &other)).await,
    };
    if keyed_mac(local, &nonce, peer.node_id, channel)
        .verify_slice(&their_proof.mac)
        .is_err()
    {
        let message = match &local.secret {
            Some(_) => format!(
                "node {} ({remote_addr}) did not prove the cluster secret of node {}; give every \
                 node of the cluster the same cluster secret (--cluster-secret-file)",
                peer.node_id, local.node_id
            ),
            None => format!(
                "node {} ({remote_addr}) uses a cluster secret but node {} has none; give every \
                 node of the cluster the same cluster secret (--cluster-secret-file)",
                peer.node_id, local.node_id
            ),
        };
        return io
            .refuse(HandshakeError::BadProof {
                by: Side::Local,
                message,
            })
            .await;
    }
    if is_connected(peer.node_id, channel) {
        let message = format!(
            "node {} ({remote_addr}) is already connected to node {}; another process uses the \
             same node id (give each node a unique --node-id), or its previous connection has not \
             closed yet (the dialer retries)",
            peer.node_id, local.node_id
        );
        return io
            .refuse(HandshakeError::DuplicateNodeId {
                by: Side::Local,
                message,
            })
            .await;
    }

    // Round 3: Accepted ↔ Accepted.
    io.send(Step::Accepted(wire::Accepted {}), "send its acceptance")
        .await?;
    match io.recv("receive the peer's acceptance").await? {
        Step::Accepted(_) => {}
        Step::Refusal(r) => return Err(HandshakeError::from_refusal(r)),
        other => return io.refuse(protocol_error("an acceptance", &other)).await,
    }

    let parts = io.framed.into_parts();
    Ok(Established {
        peer,
        stream: parts.io,
        read_buf: parts.read_buf,
        channel,
    })
}

/// The connection's channel: the one the dialer named (`ours` when this side dials, the peer's
/// Hello otherwise); both must agree when both name one.
fn agree_channel(
    local: &Identity,
    theirs: &Hello,
    remote_addr: SocketAddr,
    ours: Option<Channel>,
) -> Result<Channel, HandshakeError> {
    let by = Side::Local;
    let them = theirs.node_id;
    let Ok(named) = Channel::try_from(theirs.channel) else {
        let message = format!(
            "node {them} ({remote_addr}) asked for channel {}, which node {} does not know; run the \
             same herald version on every node",
            theirs.channel, local.node_id
        );
        return Err(HandshakeError::Protocol { by, message });
    };
    match (ours, named) {
        (Some(c), Channel::Unspecified) | (None, c @ (Channel::Control | Channel::Events)) => Ok(c),
        (Some(a), b) if a == b => Ok(a),
        (Some(a), b) => {
            let message = format!(
                "node {them} ({remote_addr}) asked for the {b:?} channel on a connection node {} \
                 opened for the {a:?} channel",
                local.node_id
            );
            Err(HandshakeError::Protocol { by, message })
        }
        (None, Channel::Unspecified) => {
            let message = format!(
                "node {them} ({remote_addr}) did not name a channel (control or events) for the \
                 connection it opened; run the same herald version on every node"
            );
            Err(HandshakeError::Protocol { by, message })
        }
    }
}

/// The step-2 checks of the peer's Hello, in order of how fundamental the mismatch is.
fn check_hello(
    local: &Identity,
    theirs: &Hello,
    remote_addr: SocketAddr,
    expected_peer: Option<u64>,
) -> Result<(), HandshakeError> {
    let by = Side::Local;
    let me = local.node_id;
    let them = theirs.node_id;
    if theirs.protocol_version != PROTOCOL_VERSION {
        let message = format!(
            "node {them} ({remote_addr}) speaks transport protocol {}, node {me} speaks {}; run \
             the same herald version on every node",
            theirs.protocol_version, PROTOCOL_VERSION
        );
        return Err(HandshakeError::VersionMismatch { by, message });
    }
    if theirs.cluster_id != local.cluster_id {
        let message = format!(
            "node {them} ({remote_addr}) is in cluster {:?} but node {me} is in cluster {:?}; set \
             the same cluster id on every node, or remove this address from the peer list",
            theirs.cluster_id, local.cluster_id
        );
        return Err(HandshakeError::ClusterMismatch { by, message });
    }
    if them == me {
        let message = format!(
            "{remote_addr} answered with node id {me}, which is the id of this node; give each \
             node a unique --node-id, and do not list a node's own address as its peer"
        );
        return Err(HandshakeError::SelfConnection { by, message });
    }
    if let Some(expected) = expected_peer {
        if them != expected {
            let message = format!(
                "node {me} dialed node {expected} at {remote_addr} but node {them} answered; fix \
                 the address of node {expected} in the peer list"
            );
            return Err(HandshakeError::UnexpectedNodeId { by, message });
        }
    }
    if local.secret.is_none() && !is_loopback(&remote_addr) {
        let message = format!(
            "node {me} has no cluster secret configured, so it only talks to peers on loopback, \
             and {remote_addr} (node {them}) is not on loopback; configure the same \
             --cluster-secret-file on every node"
        );
        return Err(HandshakeError::InsecureNonLoopback { by, message });
    }
    if them == 0 {
        let message = format!("{remote_addr} sent node id 0, which no node may use");
        return Err(HandshakeError::Protocol { by, message });
    }
    if theirs.nonce.len() != NONCE_LEN {
        let message = format!(
            "node {them} ({remote_addr}) sent a {}-byte nonce instead of {NONCE_LEN} bytes",
            theirs.nonce.len()
        );
        return Err(HandshakeError::Protocol { by, message });
    }
    Ok(())
}

/// `HMAC(secret, nonce || node_id (u64 BE) || cluster id || channel (one byte))`, ready to
/// finalize or verify.
fn keyed_mac(local: &Identity, nonce: &[u8], node_id: u64, channel: Channel) -> HmacSha256 {
    let key: &[u8] = local.secret.as_ref().map_or(&[], |s| &s.0);
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(nonce);
    mac.update(&node_id.to_be_bytes());
    mac.update(local.cluster_id.as_bytes());
    // Control = 1, Events = 2 (the wire values), never 0: `agree_channel` resolved it.
    mac.update(&[i32::from(channel) as u8]);
    mac
}

fn fresh_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
    nonce
}

/// Loopback, including IPv4-mapped IPv6 loopback (`::ffff:127.0.0.1`).
pub(crate) fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

fn protocol_error(expected: &str, got: &Step) -> HandshakeError {
    let got = match got {
        Step::Hello(_) => "a Hello",
        Step::Proof(_) => "a Proof",
        Step::Refusal(_) => "a Refusal",
        Step::Accepted(_) => "an acceptance",
    };
    HandshakeError::Protocol {
        by: Side::Local,
        message: format!("expected {expected} but received {got}; the peer runs an incompatible herald version"),
    }
}

/// The framed stream plus the step timeout.
struct Steps<S> {
    /// The stream, framed for handshake messages.
    framed: Framed<S, FrameCodec<wire::Handshake>>,
    /// Bound of each send and receive.
    timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Steps<S> {
    async fn send(&mut self, step: Step, what: &'static str) -> Result<(), HandshakeError> {
        let msg = wire::Handshake { step: Some(step) };
        match tokio::time::timeout(self.timeout, self.framed.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(FrameError::Io(e))) if is_disconnect(&e) => Err(HandshakeError::Closed { step: what }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(HandshakeError::Timeout {
                step: what,
                after: self.timeout,
            }),
        }
    }

    async fn recv(&mut self, what: &'static str) -> Result<Step, HandshakeError> {
        match tokio::time::timeout(self.timeout, self.framed.next()).await {
            Ok(Some(Ok((wire::Handshake { step: Some(step) }, _)))) => Ok(step),
            Ok(Some(Ok((wire::Handshake { step: None }, _)))) => Err(HandshakeError::Protocol {
                by: Side::Local,
                message: format!("received an empty or unknown handshake step while trying to {what}"),
            }),
            Ok(Some(Err(FrameError::Io(e)))) if is_disconnect(&e) => Err(HandshakeError::Closed { step: what }),
            Ok(Some(Err(e))) => Err(e.into()),
            Ok(None) => Err(HandshakeError::Closed { step: what }),
            Err(_) => Err(HandshakeError::Timeout {
                step: what,
                after: self.timeout,
            }),
        }
    }

    /// Sends the refusal for `err` (best effort), closes the write half, waits briefly for the
    /// peer to hang up so the refusal is read before any reset, and returns `err`.
    async fn refuse<T>(mut self, err: HandshakeError) -> Result<T, HandshakeError> {
        if let Some(refusal) = err.to_refusal() {
            let linger = self.timeout.min(REFUSAL_LINGER);
            let sent = tokio::time::timeout(
                linger,
                self.framed.send(wire::Handshake {
                    step: Some(Step::Refusal(refusal)),
                }),
            )
            .await;
            if matches!(sent, Ok(Ok(()))) {
                let stream = self.framed.get_mut();
                let _ = tokio::time::timeout(linger, async {
                    let _ = stream.shutdown().await;
                    let mut scratch = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut scratch).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
            }
        }
        Err(err)
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::duplex;

    const T: Duration = Duration::from_secs(5);

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 40000))
    }

    fn id(node_id: u64, secret: Option<&str>) -> Identity {
        Identity {
            cluster_id: "test".into(),
            node_id,
            advertise_addr: format!("127.0.0.1:{}", 7000 + node_id),
            secret: secret.and_then(ClusterSecret::new),
        }
    }

    /// Runs both sides over an in-memory stream: `a` sees `a_remote`, `b` sees loopback.
    async fn pair(
        a: Identity,
        b: Identity,
        a_remote: SocketAddr,
        b_connected: &[u64],
    ) -> (Result<PeerInfo, HandshakeError>, Result<PeerInfo, HandshakeError>) {
        let (sa, sb) = duplex(4096);
        let fa = handshake(sa, &a, a_remote, None, T, |_| false);
        let fb = handshake(sb, &b, loopback(), None, T, |n| b_connected.contains(&n));
        let (ra, rb) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(fa, fb) })
            .await
            .expect("handshake finishes before the deadline");
        (ra.map(|e| e.peer), rb.map(|e| e.peer))
    }

    #[tokio::test]
    async fn same_secret_is_admitted_both_ways() {
        let (a, b) = pair(id(1, Some("s3cret")), id(2, Some("s3cret")), loopback(), &[]).await;
        let a = a.expect("a admits b");
        let b = b.expect("b admits a");
        assert_eq!(a.node_id, 2);
        assert_eq!(a.advertise_addr, "127.0.0.1:7002");
        assert_eq!(b.node_id, 1);
    }

    #[tokio::test]
    async fn no_secret_on_loopback_is_admitted() {
        let (a, b) = pair(id(1, None), id(2, None), loopback(), &[]).await;
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_sides() {
        let (a, b) = pair(id(1, Some("one")), id(2, Some("two")), loopback(), &[]).await;
        for r in [a, b] {
            match r {
                Err(HandshakeError::BadProof { message, .. }) => assert!(message.contains("secret"), "{message}"),
                other => panic!("expected BadProof, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn secret_on_one_side_only_is_refused_on_both_sides() {
        let (a, b) = pair(id(1, Some("one")), id(2, None), loopback(), &[]).await;
        assert!(matches!(a, Err(HandshakeError::BadProof { .. })), "{a:?}");
        assert!(matches!(b, Err(HandshakeError::BadProof { .. })), "{b:?}");
    }

    #[tokio::test]
    async fn different_cluster_is_refused_on_both_sides() {
        let mut b = id(2, Some("s"));
        b.cluster_id = "other".into();
        let (a, b) = pair(id(1, Some("s")), b, loopback(), &[]).await;
        for r in [a, b] {
            match r {
                Err(HandshakeError::ClusterMismatch { message, .. }) => {
                    assert!(
                        message.contains("\"other\"") && message.contains("\"test\""),
                        "{message}"
                    )
                }
                other => panic!("expected ClusterMismatch, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn own_node_id_is_refused_on_both_sides() {
        let (a, b) = pair(id(1, None), id(1, None), loopback(), &[]).await;
        assert!(
            matches!(a, Err(HandshakeError::SelfConnection { by: Side::Local, .. })),
            "{a:?}"
        );
        assert!(
            matches!(b, Err(HandshakeError::SelfConnection { by: Side::Local, .. })),
            "{b:?}"
        );
    }

    #[tokio::test]
    async fn duplicate_node_id_is_refused_and_the_dialer_learns_why() {
        let (a, b) = pair(id(1, Some("s")), id(2, Some("s")), loopback(), &[1]).await;
        match b {
            Err(HandshakeError::DuplicateNodeId {
                by: Side::Local,
                message,
            }) => {
                assert!(message.contains("node 1"), "{message}")
            }
            other => panic!("expected a local DuplicateNodeId, got {other:?}"),
        }
        assert!(
            matches!(a, Err(HandshakeError::DuplicateNodeId { by: Side::Peer, .. })),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn non_loopback_without_secret_is_refused_and_the_peer_learns_why() {
        let remote = SocketAddr::from(([10, 1, 2, 3], 7070));
        let (a, b) = pair(id(1, None), id(2, None), remote, &[]).await;
        match a {
            Err(HandshakeError::InsecureNonLoopback {
                by: Side::Local,
                message,
            }) => {
                assert!(
                    message.contains("10.1.2.3:7070") && message.contains("secret"),
                    "{message}"
                )
            }
            other => panic!("expected a local InsecureNonLoopback, got {other:?}"),
        }
        assert!(
            matches!(b, Err(HandshakeError::InsecureNonLoopback { by: Side::Peer, .. })),
            "{b:?}"
        );
    }

    #[tokio::test]
    async fn non_loopback_with_secret_is_admitted() {
        let remote = SocketAddr::from(([10, 1, 2, 3], 7070));
        let (a, b) = pair(id(1, Some("s")), id(2, Some("s")), remote, &[]).await;
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    }

    #[tokio::test]
    async fn unexpected_node_id_is_refused() {
        let (sa, sb) = duplex(4096);
        let (a, b) = (id(1, None), id(3, None));
        let (ra, rb) = tokio::join!(
            handshake(sa, &a, loopback(), Some(2), T, |_| false),
            handshake(sb, &b, loopback(), None, T, |_| false),
        );
        assert!(
            matches!(ra, Err(HandshakeError::UnexpectedNodeId { by: Side::Local, .. })),
            "{ra:?}"
        );
        assert!(
            matches!(rb, Err(HandshakeError::UnexpectedNodeId { by: Side::Peer, .. })),
            "{rb:?}"
        );
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let (sa, _sb) = duplex(4096);
        let a = id(1, None);
        let r = handshake(sa, &a, loopback(), None, Duration::from_millis(50), |_| false).await;
        assert!(matches!(r, Err(HandshakeError::Timeout { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn garbage_instead_of_hello_is_a_frame_error() {
        let (sa, mut sb) = duplex(4096);
        sb.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let a = id(1, None);
        let r = handshake(sa, &a, loopback(), None, T, |_| false).await;
        assert!(
            matches!(r, Err(HandshakeError::Frame(FrameError::TooLarge { .. }))),
            "{r:?}"
        );
        // Short garbage: a small length and bytes that are no Handshake.
        let (sa, mut sb) = duplex(4096);
        sb.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.expect("write");
        let r = handshake(sa, &a, loopback(), None, T, |_| false).await;
        assert!(
            matches!(r, Err(HandshakeError::Frame(FrameError::Decode { .. }))),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn bytes_after_the_handshake_are_kept_for_the_reader() {
        use bytes::BufMut;
        let (sa, sb) = duplex(4096);
        let b = id(2, None);
        let fb = handshake(sb, &b, loopback(), None, T, |_| false);
        // Side a is played by hand so its acceptance and the first bytes after it arrive in one
        // write, i.e. in the same read on b's side.
        let fa = async {
            let a = id(1, None);
            let mut framed = Framed::new(sa, FrameCodec::<wire::Handshake>::new(HANDSHAKE_MAX_FRAME_LEN));
            let nonce = fresh_nonce();
            let hello = Hello {
                cluster_id: a.cluster_id.clone(),
                node_id: 1,
                nonce: Bytes::copy_from_slice(&nonce),
                peer_addr: a.advertise_addr.clone(),
                protocol_version: PROTOCOL_VERSION,
                channel: Channel::Control.into(),
            };
            framed
                .send(wire::Handshake {
                    step: Some(Step::Hello(hello)),
                })
                .await
                .expect("hello");
            let Some(Ok((
                wire::Handshake {
                    step: Some(Step::Hello(theirs)),
                },
                _,
            ))) = framed.next().await
            else {
                panic!("expected b's Hello");
            };
            let mac = keyed_mac(&a, &theirs.nonce, 1, Channel::Control)
                .finalize()
                .into_bytes();
            let proof = Proof {
                mac: Bytes::copy_from_slice(&mac),
            };
            framed
                .send(wire::Handshake {
                    step: Some(Step::Proof(proof)),
                })
                .await
                .expect("proof");
            let Some(Ok((
                wire::Handshake {
                    step: Some(Step::Proof(_)),
                },
                _,
            ))) = framed.next().await
            else {
                panic!("expected b's Proof");
            };
            let mut buf = BytesMut::new();
            let accepted = wire::Handshake {
                step: Some(Step::Accepted(wire::Accepted {})),
            };
            crate::transport::frame::encode_frame(&accepted, HANDSHAKE_MAX_FRAME_LEN, &mut buf).expect("fits");
            buf.put_slice(b"after");
            framed.get_mut().write_all(&buf).await.expect("write");
            framed
        };
        let (rb, _framed) = tokio::join!(fb, fa);
        let est = rb.expect("b admits the hand-played peer");
        assert_eq!(est.peer.node_id, 1);
        assert_eq!(&est.read_buf[..], b"after");
    }

    /// Plays a dialer by hand up to its proof: sends a Hello naming `named`, then a proof computed
    /// over `proved`, and returns what the accepting side concluded.
    async fn dial_by_hand(named: Channel, proved: Channel) -> Result<Channel, HandshakeError> {
        let (sa, sb) = duplex(4096);
        let b = id(2, Some("s"));
        let fb = handshake_on(sb, &b, loopback(), None, None, T, |_, _| false);
        let fa = async {
            let a = id(1, Some("s"));
            let mut framed = Framed::new(sa, FrameCodec::<wire::Handshake>::new(HANDSHAKE_MAX_FRAME_LEN));
            let hello = Hello {
                cluster_id: a.cluster_id.clone(),
                node_id: 1,
                nonce: Bytes::copy_from_slice(&fresh_nonce()),
                peer_addr: a.advertise_addr.clone(),
                protocol_version: PROTOCOL_VERSION,
                channel: named.into(),
            };
            let _ = framed
                .send(wire::Handshake {
                    step: Some(Step::Hello(hello)),
                })
                .await;
            let Some(Ok((
                wire::Handshake {
                    step: Some(Step::Hello(theirs)),
                },
                _,
            ))) = framed.next().await
            else {
                return framed;
            };
            let mac = keyed_mac(&a, &theirs.nonce, 1, proved).finalize().into_bytes();
            let proof = Proof {
                mac: Bytes::copy_from_slice(&mac),
            };
            let _ = framed
                .send(wire::Handshake {
                    step: Some(Step::Proof(proof)),
                })
                .await;
            // Read until b answers (acceptance or refusal) or hangs up.
            let _ = framed.next().await;
            let _ = framed
                .send(wire::Handshake {
                    step: Some(Step::Accepted(wire::Accepted {})),
                })
                .await;
            framed
        };
        let (rb, _framed) = tokio::join!(fb, fa);
        rb.map(|e| e.channel)
    }

    #[tokio::test]
    async fn the_dialer_names_the_channel_and_both_sides_agree_on_it() {
        for channel in [Channel::Control, Channel::Events] {
            let (sa, sb) = duplex(4096);
            let (a, b) = (id(1, Some("s")), id(2, Some("s")));
            let (ra, rb) = tokio::join!(
                handshake_on(sa, &a, loopback(), Some(2), Some(channel), T, |_, _| false),
                handshake_on(sb, &b, loopback(), None, None, T, |_, _| false),
            );
            assert_eq!(ra.expect("a admits b").channel, channel);
            assert_eq!(rb.expect("b admits a").channel, channel);
        }
        // The plain handshake is a control connection.
        let (sa, sb) = duplex(4096);
        let (a, b) = (id(1, None), id(2, None));
        let (ra, rb) = tokio::join!(
            handshake(sa, &a, loopback(), Some(2), T, |_| false),
            handshake_on(sb, &b, loopback(), None, None, T, |_, _| false),
        );
        assert_eq!(ra.expect("a admits b").channel, Channel::Control);
        assert_eq!(rb.expect("b admits a").channel, Channel::Control);
    }

    #[tokio::test]
    async fn the_proof_covers_the_channel() {
        assert_eq!(
            dial_by_hand(Channel::Events, Channel::Events).await.expect("admitted"),
            Channel::Events
        );
        // A Hello naming one channel with a proof over the other (the channel altered on the way,
        // or a peer claiming one class to use the other) does not verify.
        let r = dial_by_hand(Channel::Events, Channel::Control).await;
        assert!(
            matches!(r, Err(HandshakeError::BadProof { by: Side::Local, .. })),
            "{r:?}"
        );
        let r = dial_by_hand(Channel::Control, Channel::Events).await;
        assert!(
            matches!(r, Err(HandshakeError::BadProof { by: Side::Local, .. })),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_without_an_agreed_channel_is_refused() {
        // Neither side names one.
        let r = dial_by_hand(Channel::Unspecified, Channel::Control).await;
        match r {
            Err(HandshakeError::Protocol {
                by: Side::Local,
                message,
            }) => {
                assert!(message.contains("did not name a channel"), "{message}")
            }
            other => panic!("expected a Protocol refusal, got {other:?}"),
        }
        // Both name one, and they differ.
        let (sa, sb) = duplex(4096);
        let (a, b) = (id(1, None), id(2, None));
        let (ra, rb) = tokio::join!(
            handshake_on(sa, &a, loopback(), None, Some(Channel::Events), T, |_, _| false),
            handshake_on(sb, &b, loopback(), None, Some(Channel::Control), T, |_, _| false),
        );
        assert!(matches!(ra, Err(HandshakeError::Protocol { .. })), "{ra:?}");
        assert!(matches!(rb, Err(HandshakeError::Protocol { .. })), "{rb:?}");
    }

    #[tokio::test]
    async fn duplicates_are_per_channel() {
        // Node 1 already has a control connection: an events connection is not a duplicate.
        let (sa, sb) = duplex(4096);
        let (a, b) = (id(1, None), id(2, None));
        let connected = |n: u64, c: Channel| n == 1 && c == Channel::Control;
        let (ra, rb) = tokio::join!(
            handshake_on(sa, &a, loopback(), Some(2), Some(Channel::Events), T, |_, _| false),
            handshake_on(sb, &b, loopback(), None, None, T, connected),
        );
        assert!(ra.is_ok() && rb.is_ok(), "{ra:?} {rb:?}");
        let (sa, sb) = duplex(4096);
        let (ra, rb) = tokio::join!(
            handshake_on(sa, &a, loopback(), Some(2), Some(Channel::Control), T, |_, _| false),
            handshake_on(sb, &b, loopback(), None, None, T, connected),
        );
        assert!(
            matches!(rb, Err(HandshakeError::DuplicateNodeId { by: Side::Local, .. })),
            "{rb:?}"
        );
        assert!(
            matches!(ra, Err(HandshakeError::DuplicateNodeId { by: Side::Peer, .. })),
            "{ra:?}"
        );
    }

    #[test]
    fn loopback_rule() {
        assert!(is_loopback(&"127.0.0.1:1".parse().expect("addr")));
        assert!(is_loopback(&"[::1]:1".parse().expect("addr")));
        assert!(is_loopback(&"[::ffff:127.0.0.1]:1".parse().expect("addr")));
        assert!(!is_loopback(&"10.0.0.1:1".parse().expect("addr")));
        assert!(!is_loopback(&"[::ffff:10.0.0.1]:1".parse().expect("addr")));
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = ClusterSecret::new("hunter2").expect("non-empty");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(ClusterSecret::new("").is_none());
    }
}
