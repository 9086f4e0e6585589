//! The connection handshake: who is on the other end, and may it talk to us.
//!
//! Runs on any `AsyncRead + AsyncWrite + Unpin` stream. The dialing side names the connection's
//! [`Channel`]; the accepting side takes it (see [`handshake_on`]).
//!
//! 1. **Mutual TLS 1.3** (`super::tls`), unless the node runs with insecure peers: the dialer is
//!    the TLS client, the acceptor the server, and each must present a certificate that chains to
//!    the cluster CA. The peer's node id and cluster come from its certificate (SAN URI
//!    `spiffe://<cluster>/node/<id>`), not from anything it says.
//! 2. **Hello ↔ Hello**, inside the TLS session: protocol version, cluster id, node id, the
//!    address the sender wants to be dialed at, and the channel (named by the dialer; an accepting
//!    side sends `Unspecified`). Each side checks the other's Hello: same version and cluster, not
//!    our own node id, the node id we dialed, **the node id its certificate names**, one agreed
//!    channel; with insecure peers, a loopback address.
//! 3. **Accepted ↔ Accepted**: each side checks that the node id is not already connected on that
//!    channel, then says yes.
//!
//! Whenever a side refuses, it sends a [`Refusal`] *instead of* its next step, closes its write
//! half and waits briefly for the other side to hang up (so the refusal is not lost to a TCP reset).
//! The other side, reading a refusal where it expected a step, returns the same error variant with
//! [`Side::Peer`], so a misconfiguration is reported with the same explanation on both nodes. A
//! TLS failure (no certificate, another CA, an expired certificate) is reported by both sides as
//! [`HandshakeError::Tls`] with rustls's reason or the alert the other side sent. The certificate
//! is checked before the duplicate test, so an unauthenticated peer cannot probe which nodes are
//! connected. Every step is bounded by the step timeout.
//!
//! Because the Hello travels inside the session whose client certificate names the sender, a
//! peer cannot claim another node's id (the old HMAC handshake signed whatever nonce it was
//! given, so proofs could be relayed between two nodes). With insecure peers (`--insecure-peers`,
//! loopback only) there is no authentication at all: any local process can claim any node id.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Framed;

use super::frame::{FrameCodec, FrameError, HANDSHAKE_MAX_FRAME_LEN};
use super::tls::{identity_of, PeerStream, PeerTls};
use super::wire::{self, handshake::Step, Channel, Hello, Refusal, RefusalCode, PROTOCOL_VERSION};

/// How long a refusing side waits for the other side to hang up after its refusal.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

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
    /// The node's certificate material for mutual TLS. `None`: insecure peers — plaintext,
    /// unauthenticated, loopback only.
    pub tls: Option<Arc<PeerTls>>,
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
    /// Insecure peers (no TLS) and the other side is not on loopback.
    #[error("non-loopback peer without TLS, refused by {by}: {message}")]
    InsecureNonLoopback {
        /// Who refused.
        by: Side,
        /// The refusing side's explanation.
        message: String,
    },
    /// The peer's certificate does not name the node it claims to be, or names no node.
    #[error("untrusted peer, refused by {by}: {message}")]
    Untrusted {
        /// Who refused.
        by: Side,
        /// The refusing side's explanation.
        message: String,
    },
    /// The TLS handshake failed: no certificate, a certificate from another CA or expired, a
    /// plaintext peer, or a TLS alert from the other side (which names its reason).
    #[error("TLS handshake failed: {message}")]
    Tls {
        /// rustls's reason, with what to check.
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
            | Untrusted { by, .. }
            | DuplicateNodeId { by, .. }
            | Protocol { by, .. } => Some(*by),
            Refused { .. } => Some(Side::Peer),
            Tls { .. } | Timeout { .. } | Closed { .. } | Frame(_) => None,
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
            Untrusted { message, .. } => (RefusalCode::Untrusted, message),
            DuplicateNodeId { message, .. } => (RefusalCode::DuplicateNodeId, message),
            Protocol { message, .. } => (RefusalCode::Protocol, message),
            Refused { .. } | Tls { .. } | Timeout { .. } | Closed { .. } | Frame(_) => return None,
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
            Ok(RefusalCode::Untrusted) => HandshakeError::Untrusted { by, message },
            Ok(RefusalCode::DuplicateNodeId) => HandshakeError::DuplicateNodeId { by, message },
            Ok(RefusalCode::Protocol) => HandshakeError::Protocol { by, message },
            Ok(RefusalCode::Unspecified) | Err(_) => HandshakeError::Refused { code: r.code, message },
        }
    }
}

/// The other side of an established connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its node id (authenticated by its certificate, unless peers are insecure).
    pub node_id: u64,
    /// The address it asks to be dialed at (from its Hello; not verified).
    pub advertise_addr: String,
    /// The address the stream comes from (as given to [`handshake_on`]).
    pub remote_addr: SocketAddr,
}

/// A stream that completed the handshake.
#[derive(Debug)]
pub struct Established<S> {
    /// Who is on the other end.
    pub peer: PeerInfo,
    /// The stream (TLS unless peers are insecure), positioned after the last handshake frame.
    pub stream: PeerStream<S>,
    /// Bytes already read past the handshake (the first envelope frames); the reader must
    /// consume these before reading from `stream`.
    pub read_buf: BytesMut,
    /// What the connection carries, as both sides agreed and proved (never `Unspecified`).
    pub channel: Channel,
}

/// Runs the handshake on `stream` as `local`, for a connection of `channel`.
///
/// * `remote_addr`: where the stream comes from. Used for the loopback rule with insecure peers;
///   in-memory streams pass a loopback address.
/// * `expected_peer`: when dialing a known peer, the node id it must be.
/// * `channel`: a dialing side names the channel (`Some`) and is the TLS client; an accepting
///   side passes `None`, is the TLS server, and takes the channel the dialer named, which
///   [`Established::channel`] reports. A Hello naming no channel or one this build does not
///   know is refused as a protocol error.
/// * `step_timeout`: the bound of the TLS handshake and of each send and receive.
/// * `is_connected(node id, channel)`: whether that node already has a connection of that
///   channel (asked once its identity is established); such a peer is refused as a duplicate.
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
    let (stream, certified) = match &local.tls {
        Some(tls) => {
            let tls = secure(tls, stream, channel.is_some(), remote_addr, step_timeout).await?;
            let certified = identity_of(tls.peer_certificates());
            (PeerStream::Tls(Box::new(tls)), certified)
        }
        None => (PeerStream::Plain(stream), None),
    };
    let mut io = Steps {
        framed: Framed::new(stream, FrameCodec::new(HANDSHAKE_MAX_FRAME_LEN)),
        timeout: step_timeout,
    };
    let hello = Hello {
        cluster_id: local.cluster_id.clone(),
        node_id: local.node_id,
        peer_addr: local.advertise_addr.clone(),
        protocol_version: PROTOCOL_VERSION,
        channel: channel.unwrap_or(Channel::Unspecified).into(),
    };

    // Hello ↔ Hello.
    io.send(Step::Hello(hello), "send its Hello").await?;
    let theirs = match io.recv("receive the peer's Hello").await? {
        Step::Hello(h) => h,
        Step::Refusal(r) => return Err(HandshakeError::from_refusal(r)),
        other => return io.refuse(protocol_error("a Hello", &other)).await,
    };
    if let Err(e) = check_hello(local, &theirs, remote_addr, expected_peer) {
        return io.refuse(e).await;
    }
    if local.tls.is_some() {
        if let Err(e) = check_certified(local, &theirs, remote_addr, certified.as_ref()) {
            return io.refuse(e).await;
        }
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

    // Accepted ↔ Accepted.
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

/// The TLS handshake, as the client when `dialing`.
async fn secure<S>(
    tls: &PeerTls,
    stream: S,
    dialing: bool,
    remote_addr: SocketAddr,
    step_timeout: Duration,
) -> Result<super::Sealed<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let done = async {
        if dialing {
            tls.connect(stream).await
        } else {
            tls.accept(stream).await
        }
    };
    match tokio::time::timeout(step_timeout, done).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            let hint = tls_hint(&e);
            Err(HandshakeError::Tls {
                message: format!("with {remote_addr}: {e}{hint}"),
            })
        }
        Err(_) => Err(HandshakeError::Timeout {
            step: "complete the TLS handshake",
            after: step_timeout,
        }),
    }
}

/// The checks of a TLS peer's Hello against its certificate: the certificate names a node of
/// this cluster, and the node the Hello claims to be.
fn check_certified(
    local: &Identity,
    theirs: &Hello,
    remote_addr: SocketAddr,
    certified: Option<&crate::pki::NodeIdentity>,
) -> Result<(), HandshakeError> {
    let by = Side::Local;
    let Some(cert) = certified else {
        let message = format!(
            "{remote_addr} presented a certificate that names no herald node (a SAN URI \
             spiffe://<cluster>/node/<id>); issue node certificates with `herald cert node`"
        );
        return Err(HandshakeError::Untrusted { by, message });
    };
    if cert.cluster != local.cluster_id {
        let message = format!(
            "{remote_addr} presented a certificate for {cert}, but node {} is in cluster {:?}",
            local.node_id, local.cluster_id
        );
        return Err(HandshakeError::ClusterMismatch { by, message });
    }
    if cert.node != theirs.node_id {
        let message = format!(
            "{remote_addr} claims to be node {} but its certificate is for node {}",
            theirs.node_id, cert.node
        );
        return Err(HandshakeError::Untrusted { by, message });
    }
    Ok(())
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
    if local.tls.is_none() && !is_loopback(&remote_addr) {
        let message = format!(
            "node {me} runs with insecure (plaintext) peers, so it only talks to peers on \
             loopback, and {remote_addr} (node {them}) is not on loopback; give every node a \
             certificate from the cluster CA (--peer-ca, --peer-cert, --peer-key)"
        );
        return Err(HandshakeError::InsecureNonLoopback { by, message });
    }
    if them == 0 {
        let message = format!("{remote_addr} sent node id 0, which no node may use");
        return Err(HandshakeError::Protocol { by, message });
    }
    Ok(())
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
    framed: Framed<PeerStream<S>, FrameCodec<wire::Handshake>>,
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

/// What to tell the operator after a failed TLS handshake, from its I/O error.
fn tls_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    let text = e.to_string().to_ascii_lowercase();
    if e.kind() == ErrorKind::InvalidData && text.contains("corrupt message") {
        "; the peer does not speak TLS (is it running with --insecure-peers?)"
    } else if matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    ) && !text.contains("alert")
    {
        // The connection went away under the handshake (a peer stopping or restarting): no
        // certificate advice, which would send the operator the wrong way.
        "; the connection closed during the handshake (the peer may be stopping or restarting)"
    } else {
        "; every node needs a certificate signed by the cluster CA (`herald cert node`) and the \
         same CA file (--peer-ca)"
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reset_during_the_tls_handshake_gives_no_certificate_advice() {
        use std::io::{Error, ErrorKind};
        const CERTIFICATE: &str = "certificate signed by the cluster CA";
        for (kind, error, hint) in [
            (
                ErrorKind::ConnectionReset,
                "Connection reset by peer (os error 104)",
                "closed during the handshake",
            ),
            (
                ErrorKind::ConnectionReset,
                "received fatal alert: CertificateRequired",
                CERTIFICATE,
            ),
            // A peer that refuses our certificate may just close: EOF keeps the advice.
            (ErrorKind::UnexpectedEof, "tls handshake eof", CERTIFICATE),
            (
                ErrorKind::InvalidData,
                "invalid peer certificate: UnknownIssuer",
                CERTIFICATE,
            ),
            (
                ErrorKind::InvalidData,
                "received corrupt message of type InvalidContentType",
                "does not speak TLS",
            ),
        ] {
            let said = super::tls_hint(&Error::new(kind, error));
            assert!(said.contains(hint), "{kind:?} {error:?}: {said}");
        }
    }

    use super::*;

    use std::sync::OnceLock;

    use tokio::io::duplex;

    use crate::pki::Ca;

    const T: Duration = Duration::from_secs(5);

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 40000))
    }

    /// The test cluster's CA (one per test process: generating one takes a moment).
    fn ca() -> &'static Ca {
        static CA: OnceLock<Ca> = OnceLock::new();
        CA.get_or_init(|| Ca::generate("test").expect("ca"))
    }

    fn tls_of(ca: &Ca, node: u64) -> Arc<PeerTls> {
        let n = ca.issue_node(node, &[], &[], 1).expect("issue");
        Arc::new(PeerTls::from_pem(&n.ca_pem, &n.cert_pem, &n.key_pem, ca.cluster(), node).expect("load"))
    }

    /// Node `node_id` of cluster "test": with a certificate from the test CA when `tls`, else an
    /// insecure (plaintext) peer.
    fn id(node_id: u64, tls: bool) -> Identity {
        Identity {
            cluster_id: "test".into(),
            node_id,
            advertise_addr: format!("127.0.0.1:{}", 7000 + node_id),
            tls: tls.then(|| tls_of(ca(), node_id)),
        }
    }

    /// Runs both sides over an in-memory stream, `a` dialing (control) and `b` accepting: `a`
    /// sees `a_remote`, `b` sees loopback.
    async fn pair(
        a: Identity,
        b: Identity,
        a_remote: SocketAddr,
        b_connected: &[u64],
    ) -> (Result<PeerInfo, HandshakeError>, Result<PeerInfo, HandshakeError>) {
        let (sa, sb) = duplex(4096);
        let fa = handshake_on(sa, &a, a_remote, None, Some(Channel::Control), T, |_, _| false);
        let fb = handshake_on(sb, &b, loopback(), None, None, T, |n, _| b_connected.contains(&n));
        let (ra, rb) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(fa, fb) })
            .await
            .expect("handshake finishes before the deadline");
        (ra.map(|e| e.peer), rb.map(|e| e.peer))
    }

    #[tokio::test]
    async fn tls_peers_are_admitted_both_ways_and_know_each_others_id() {
        let (a, b) = pair(id(1, true), id(2, true), loopback(), &[]).await;
        let a = a.expect("a admits b");
        let b = b.expect("b admits a");
        assert_eq!(a.node_id, 2);
        assert_eq!(a.advertise_addr, "127.0.0.1:7002");
        assert_eq!(b.node_id, 1);
    }

    #[tokio::test]
    async fn insecure_peers_on_loopback_are_admitted() {
        let (a, b) = pair(id(1, false), id(2, false), loopback(), &[]).await;
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_on_both_sides() {
        let stranger = Ca::generate("test").expect("ca");
        let mut b = id(2, false);
        b.tls = Some(tls_of(&stranger, 2));
        let (a, b) = pair(id(1, true), b, loopback(), &[]).await;
        for r in [a, b] {
            assert!(matches!(r, Err(HandshakeError::Tls { .. })), "{r:?}");
        }
    }

    #[tokio::test]
    async fn tls_on_one_side_only_is_refused_on_both_sides() {
        let (a, b) = pair(id(1, true), id(2, false), loopback(), &[]).await;
        assert!(matches!(a, Err(HandshakeError::Tls { .. })), "{a:?}");
        assert!(b.is_err(), "{b:?}");
        let (a, b) = pair(id(1, false), id(2, true), loopback(), &[]).await;
        assert!(a.is_err(), "{a:?}");
        match b {
            Err(HandshakeError::Tls { message }) => assert!(message.contains("--insecure-peers"), "{message}"),
            other => panic!("expected a TLS failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_dialer_without_a_client_certificate_is_refused() {
        // A TLS client that trusts the CA like a node but presents no certificate of its own.
        let b = id(2, true);
        let config = b.tls.as_ref().expect("tls").anonymous_client();
        let (sa, sb) = duplex(4096);
        let fb = handshake_on(sb, &b, loopback(), None, None, T, |_, _| false);
        let fa = async move {
            let name = rustls::pki_types::ServerName::try_from("herald-peer").expect("name");
            let connector = tokio_rustls::TlsConnector::from(config);
            // The server refuses after the client's (empty) certificate message; whatever the
            // client sees, it never gets a Hello.
            if let Ok(mut s) = connector.connect(name, sa).await {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            }
        };
        let (rb, ()) = tokio::join!(fb, fa);
        match rb {
            Err(HandshakeError::Tls { message }) => assert!(message.contains("no certificates"), "{message}"),
            other => panic!("expected a TLS refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn claiming_another_nodes_id_is_refused_on_both_sides() {
        // Node 1 has a valid certificate, for node 1, and says it is node 3.
        let mut liar = id(1, true);
        liar.node_id = 3;
        let (a, b) = pair(liar, id(2, true), loopback(), &[]).await;
        match b {
            Err(HandshakeError::Untrusted {
                by: Side::Local,
                message,
            }) => {
                assert!(
                    message.contains("claims to be node 3") && message.contains("for node 1"),
                    "{message}"
                )
            }
            other => panic!("expected Untrusted, got {other:?}"),
        }
        assert!(
            matches!(
                a,
                Err(HandshakeError::Untrusted { by: Side::Peer, .. })
                    | Err(HandshakeError::Untrusted { by: Side::Local, .. })
            ),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn different_cluster_is_refused_on_both_sides() {
        let mut b = id(2, false);
        b.cluster_id = "other".into();
        let (a, b) = pair(id(1, false), b, loopback(), &[]).await;
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
        let (a, b) = pair(id(1, true), id(1, true), loopback(), &[]).await;
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
        let (a, b) = pair(id(1, true), id(2, true), loopback(), &[1]).await;
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
    async fn non_loopback_insecure_peers_are_refused_and_the_peer_learns_why() {
        let remote = SocketAddr::from(([10, 1, 2, 3], 7070));
        let (a, b) = pair(id(1, false), id(2, false), remote, &[]).await;
        match a {
            Err(HandshakeError::InsecureNonLoopback {
                by: Side::Local,
                message,
            }) => {
                assert!(
                    message.contains("10.1.2.3:7070") && message.contains("--peer-cert"),
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
    async fn non_loopback_tls_peers_are_admitted() {
        let remote = SocketAddr::from(([10, 1, 2, 3], 7070));
        let (a, b) = pair(id(1, true), id(2, true), remote, &[]).await;
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    }

    #[tokio::test]
    async fn unexpected_node_id_is_refused() {
        let (sa, sb) = duplex(4096);
        let (a, b) = (id(1, true), id(3, true));
        let (ra, rb) = tokio::join!(
            handshake_on(sa, &a, loopback(), Some(2), Some(Channel::Control), T, |_, _| false),
            handshake_on(sb, &b, loopback(), None, None, T, |_, _| false),
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
        for tls in [false, true] {
            let (sa, _sb) = duplex(4096);
            let a = id(1, tls);
            let r = handshake_on(sa, &a, loopback(), None, None, Duration::from_millis(50), |_, _| false).await;
            assert!(matches!(r, Err(HandshakeError::Timeout { .. })), "{r:?}");
        }
    }

    #[tokio::test]
    async fn garbage_instead_of_hello_is_refused() {
        let (sa, mut sb) = duplex(4096);
        sb.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let a = id(1, false);
        let r = handshake_on(sa, &a, loopback(), None, None, T, |_, _| false).await;
        assert!(
            matches!(r, Err(HandshakeError::Frame(FrameError::TooLarge { .. }))),
            "{r:?}"
        );
        // Short garbage: a small length and bytes that are no Handshake.
        let (sa, mut sb) = duplex(4096);
        sb.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.expect("write");
        let r = handshake_on(sa, &a, loopback(), None, None, T, |_, _| false).await;
        assert!(
            matches!(r, Err(HandshakeError::Frame(FrameError::Decode { .. }))),
            "{r:?}"
        );
        // The same garbage to a TLS node is a TLS failure.
        let (sa, mut sb) = duplex(4096);
        sb.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let r = handshake_on(sa, &id(1, true), loopback(), None, None, T, |_, _| false).await;
        assert!(matches!(r, Err(HandshakeError::Tls { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn bytes_after_the_handshake_are_kept_for_the_reader() {
        use bytes::BufMut;
        let (sa, sb) = duplex(4096);
        let b = id(2, false);
        let fb = handshake_on(sb, &b, loopback(), None, None, T, |_, _| false);
        // Side a is played by hand so its acceptance and the first bytes after it arrive in one
        // write, i.e. in the same read on b's side.
        let fa = async {
            let a = id(1, false);
            let mut framed = Framed::new(sa, FrameCodec::<wire::Handshake>::new(HANDSHAKE_MAX_FRAME_LEN));
            let hello = Hello {
                cluster_id: a.cluster_id.clone(),
                node_id: 1,
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
                    step: Some(Step::Hello(_)),
                },
                _,
            ))) = framed.next().await
            else {
                panic!("expected b's Hello");
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

    #[tokio::test]
    async fn the_dialer_names_the_channel_and_both_sides_agree_on_it() {
        for channel in [Channel::Control, Channel::Events] {
            let (sa, sb) = duplex(4096);
            let (a, b) = (id(1, true), id(2, true));
            let (ra, rb) = tokio::join!(
                handshake_on(sa, &a, loopback(), Some(2), Some(channel), T, |_, _| false),
                handshake_on(sb, &b, loopback(), None, None, T, |_, _| false),
            );
            let (ea, eb) = (ra.expect("a admits b"), rb.expect("b admits a"));
            assert_eq!((ea.channel, eb.channel), (channel, channel));
            assert!(ea.stream.is_tls() && eb.stream.is_tls());
        }
    }

    #[tokio::test]
    async fn a_connection_without_an_agreed_channel_is_refused() {
        // Both name one, and they differ.
        let (sa, sb) = duplex(4096);
        let (a, b) = (id(1, false), id(2, false));
        let (ra, rb) = tokio::join!(
            handshake_on(sa, &a, loopback(), None, Some(Channel::Events), T, |_, _| false),
            handshake_on(sb, &b, loopback(), None, Some(Channel::Control), T, |_, _| false),
        );
        assert!(matches!(ra, Err(HandshakeError::Protocol { .. })), "{ra:?}");
        assert!(matches!(rb, Err(HandshakeError::Protocol { .. })), "{rb:?}");
        // Neither names one.
        let (sa, sb) = duplex(4096);
        let (ra, rb) = tokio::join!(
            handshake_on(sa, &a, loopback(), None, None, T, |_, _| false),
            handshake_on(sb, &b, loopback(), None, None, T, |_, _| false),
        );
        for r in [ra, rb] {
            match r {
                Err(HandshakeError::Protocol { message, .. }) => {
                    assert!(message.contains("did not name a channel"), "{message}")
                }
                other => panic!("expected a Protocol refusal, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn duplicates_are_per_channel() {
        // Node 1 already has a control connection: an events connection is not a duplicate.
        let (sa, sb) = duplex(4096);
        let (a, b) = (id(1, true), id(2, true));
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
}
