//! The peer transport (DESIGN §8): connections between the nodes of a cluster.
//!
//! Owns peer connections, the handshake, framing, write batching and reconnects. It carries
//! [`Envelope`]s — Raft messages as opaque bytes, pings and pongs, forwarded proposals, opaque
//! application payloads — and knows nothing of actors, Raft or events. Everything runs on plain
//! tokio tasks (no actix), and the core is generic over the stream type, so tests run it over
//! `tokio::io::duplex` (or a network simulator) exactly as over TCP.
//!
//! A node does not use one [`Transport`] for everything: its [`Bus`] owns two, one per
//! [`Channel`] — **control** (Raft, proposals, pings, pongs; on the membership thread) and
//! **events** (the event plane's `App` payloads; on the `herald-events` thread) — with their own
//! connections and queues per peer, behind the one peer listener, so control traffic never
//! queues behind event batches. Each channel accepts only its own message types.
//!
//! * [`wire`] — the prost schema (`Envelope`, the handshake messages); tags are the schema.
//! * [`frame`] — the byte layout of a connection (4-byte big-endian length + prost payload), the
//!   codec and the frame limit. Framing is documented there and only there.
//! * [`tls`] — mutual TLS 1.3: the node's certificate material (`PeerTls`), its reload, the
//!   peer certificate check, and [`PeerStream`].
//! * `record` — [`Sealed`], the TLS 1.3 record layer after rustls's handshake: records sealed and
//!   opened in place with ring, key updates, `close_notify`; reads 64 KiB at a time once busy.
//! * [`handshake`](mod@handshake) — TLS, then Hello/Accepted with the cluster id, node ids and
//!   channel, each node id checked against the peer's certificate; its refusals and their messages.
//! * `conn` — the driver of one established connection: the coalescing writer (one `write_all`
//!   per batch of queued envelopes), the reader, keepalives and the idle timeout.
//! * `peers` — the [`Transport`] front: one dialer task per peer with jittered exponential
//!   backoff, the accept path ([`Transport::serve`] for TCP, [`Transport::accept`] for any stream),
//!   and the bounded per-peer send queues. The connection layout and the `send` semantics are
//!   described there.
//! * `bus` — the [`Bus`]: the control and events transports of a node, the `herald-events`
//!   thread, the shared accept loop that hands each connection to its channel's transport, and
//!   the authorisation of inbound messages by channel.
//! * `net` — [`PeerNet`], what the control plane (membership, monitor) asks of the network, and
//!   the bus's implementation of it; a deterministic simulator implements it in-process.
//!
//! ```no_run
//! # async fn demo() -> herald::Result<()> {
//! use herald::transport::{Envelope, Transport, TransportConfig};
//!
//! let (inbound_tx, mut inbound_rx) = tokio::sync::mpsc::channel(1024);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7100").await.expect("bind");
//! let config = TransportConfig::new("herald", 1, "127.0.0.1:7100");
//! let transport = Transport::new(config, inbound_tx)?;
//! transport.serve(listener);
//! transport.add_peer(2, "127.0.0.1:7200");
//! transport.send(2, Envelope::ping(1, 0)).expect("queued");
//! while let Some((from, envelope)) = inbound_rx.recv().await {
//!     println!("{from}: {envelope:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! Metrics (DESIGN §11): `herald_transport_frames_total{direction="in"|"out"}` and
//! `herald_transport_bytes_total{direction}`, counting envelope frames after the handshake
//! (keepalives included) and their bytes on the wire (length headers included), and
//! `herald_transport_wrong_channel_total{channel}`, the messages the bus dropped because they
//! arrived on a channel that may not carry them. Register their descriptions with [`describe`].

mod bus;
mod conn;
pub mod frame;
pub mod handshake;
mod net;
mod peers;
mod record;
pub mod tls;
pub mod wire;

use std::time::Duration;

pub use bus::{channel_name, wrong_channel, Bus, APP_QUEUE};
pub use conn::{ConnectionEnd, ConnectionError};
pub use frame::{FrameError, DEFAULT_MAX_FRAME_LEN};
pub use handshake::{handshake_on, Established, HandshakeError, Identity, PeerInfo, Side};
pub(crate) use net::EventNet;
#[cfg(test)]
pub(crate) use net::Sending;
pub use net::{PeerNet, Probe, ProbeError};
pub use peers::{Connector, InboundConnection, PeerLink, SendError, TcpConnector, Transport};
pub use record::Sealed;
pub use tls::{PeerStream, PeerTls, TlsError, TlsFiles};
pub use wire::{envelope::Body, Channel, Envelope};

use crate::Error;

/// Envelope frames sent and received, by `direction` (`in`, `out`).
pub const FRAMES_TOTAL: &str = "herald_transport_frames_total";
/// Bytes of envelope frames sent and received (length headers included), by `direction`.
pub const BYTES_TOTAL: &str = "herald_transport_bytes_total";
/// Messages dropped because their channel may not carry them, by `channel` (`control`, `events`).
pub const WRONG_CHANNEL_TOTAL: &str = "herald_transport_wrong_channel_total";
/// When the node's peer certificate in use expires, in Unix seconds (alert well before it).
pub const TLS_CERT_NOT_AFTER: &str = "herald_peer_tls_cert_not_after_seconds";
/// Reloads of changed peer TLS files, by `outcome` (`ok`, `refused`).
pub const TLS_RELOADS_TOTAL: &str = "herald_peer_tls_reloads_total";
/// Inbound peer connections refused, by `reason`: `too_many_pending` (closed at once because
/// `max_pending_handshakes` handshakes were under way) or `handshake` (the handshake failed).
pub const CONNECTIONS_REFUSED_TOTAL: &str = "herald_transport_connections_refused_total";

/// Registers the descriptions of the transport's metrics (shown as `# HELP`).
pub fn describe() {
    metrics::describe_counter!(
        FRAMES_TOTAL,
        "Peer transport frames after the handshake, keepalives included, by direction (in, out)."
    );
    metrics::describe_counter!(
        BYTES_TOTAL,
        metrics::Unit::Bytes,
        "Peer transport bytes on the wire after the handshake, length headers included, by direction (in, out)."
    );
    metrics::describe_gauge!(
        TLS_CERT_NOT_AFTER,
        "When this node's peer TLS certificate in use expires, in Unix seconds."
    );
    metrics::describe_counter!(
        TLS_RELOADS_TOTAL,
        "Reloads of changed peer TLS certificate files, by outcome (ok, refused: the old certificate stays in use)."
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Inbound peer connections refused, by reason (too_many_pending: closed at once because cluster.max_pending_handshakes handshakes were under way; handshake: the handshake failed)."
    );
    metrics::describe_counter!(
        WRONG_CHANNEL_TOTAL,
        "Peer messages dropped because they arrived on a channel that may not carry them (app payloads on control, anything else on events), by channel."
    );
}

/// Settings of a [`Transport`]. [`TransportConfig::new`] gives the defaults; the `transport.*`
/// names in validation errors are the suggested TOML keys.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Who this node is: cluster id, node id, advertised peer address, TLS material.
    pub identity: Identity,
    /// The channel this transport dials for, named in its handshakes (default control). The
    /// [`Bus`] sets it; a transport accepts connections of any channel.
    pub channel: Channel,
    /// Largest envelope payload sent or accepted (default 16 MiB). A peer sending more is
    /// disconnected; `send` refuses more. Must be the same on every node.
    pub max_frame_len: usize,
    /// Bound of the TLS handshake and of each handshake step (default 5 s), so a silent or slow
    /// peer cannot hold a slot.
    pub handshake_timeout: Duration,
    /// Bound of opening a stream to a peer (default 3 s).
    pub connect_timeout: Duration,
    /// Envelopes queued per peer before `send` fails with `QueueFull` (default 8192): a peer that
    /// is down or slow costs bounded memory.
    pub send_queue: usize,
    /// The writer stops draining the queue into one write once the batch holds this many bytes
    /// (default 1 MiB): large enough to amortise the syscall, small enough to bound latency.
    pub write_batch_bytes: usize,
    /// A keepalive is sent after this long without outbound traffic (default 3 s: a third of
    /// `idle_timeout`, so two may be lost or late before a connection is dropped; every
    /// connection of an idle node sends them, so this sets most of its idle wakeups).
    pub keepalive_interval: Duration,
    /// A connection with no inbound frame, keepalives included, for this long is dropped (default
    /// 10 s): it catches frozen peers and silent partitions that TCP alone reports after minutes.
    /// Generous, so a CPU-starved but alive peer is not disconnected; fast failure detection is
    /// the monitor's job, not this.
    pub idle_timeout: Duration,
    /// First reconnect delay (default 50 ms).
    pub backoff_min: Duration,
    /// Largest reconnect delay (default 5 s).
    pub backoff_max: Duration,
    /// Relative jitter of reconnect delays (default 0.2, i.e. ±20%), so nodes that lost the same
    /// peer do not reconnect in lockstep.
    pub backoff_jitter: f64,
    /// Most inbound connections handshaking at once (the bus's accept loop); beyond it a new
    /// connection is closed at once and counted in [`CONNECTIONS_REFUSED_TOTAL`], so a flood of
    /// half-open connections costs neither memory nor tasks without bound.
    pub max_pending_handshakes: usize,
}

impl TransportConfig {
    /// The defaults for node `node_id` of `cluster_id`, advertising `advertise_addr` to peers,
    /// with insecure peers (plaintext, loopback only; see [`with_tls`](Self::with_tls)).
    pub fn new(cluster_id: impl Into<String>, node_id: u64, advertise_addr: impl Into<String>) -> Self {
        TransportConfig {
            identity: Identity {
                cluster_id: cluster_id.into(),
                node_id,
                advertise_addr: advertise_addr.into(),
                tls: None,
            },
            channel: Channel::Control,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            send_queue: 8192,
            write_batch_bytes: 1024 * 1024,
            keepalive_interval: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            backoff_jitter: 0.2,
            max_pending_handshakes: 256,
        }
    }

    /// Sets the node's TLS material (`None`: insecure peers, plaintext, loopback only).
    pub fn with_tls(mut self, tls: Option<std::sync::Arc<PeerTls>>) -> Self {
        self.identity.tls = tls;
        self
    }

    /// Checks the settings; the error names the offending key and what would be accepted.
    pub fn validate(&self) -> crate::Result<()> {
        if self.identity.node_id == 0 {
            return Err(Error::config("node_id", "must be at least 1"));
        }
        if self.channel == Channel::Unspecified {
            return Err(Error::config("transport.channel", "must be control or events"));
        }
        if self.identity.cluster_id.is_empty() {
            return Err(Error::config("cluster_id", "must not be empty"));
        }
        if !(64..=u32::MAX as usize).contains(&self.max_frame_len) {
            return Err(Error::config(
                "transport.max_frame_len",
                format!("must be between 64 bytes and 4 GiB, not {}", self.max_frame_len),
            ));
        }
        if self.send_queue == 0 {
            return Err(Error::config("transport.send_queue", "must be at least 1"));
        }
        if self.max_pending_handshakes == 0 {
            return Err(Error::config("cluster.max_pending_handshakes", "must be at least 1"));
        }
        if self.write_batch_bytes == 0 {
            return Err(Error::config("transport.write_batch_bytes", "must be at least 1"));
        }
        for (key, value) in [
            ("transport.handshake_timeout", self.handshake_timeout),
            ("transport.connect_timeout", self.connect_timeout),
            ("transport.keepalive_interval", self.keepalive_interval),
            ("transport.backoff_min", self.backoff_min),
        ] {
            if value.is_zero() {
                return Err(Error::config(key, "must be longer than zero"));
            }
        }
        if self.idle_timeout < self.keepalive_interval * 2 {
            return Err(Error::config(
                "transport.idle_timeout",
                format!(
                    "must be at least twice transport.keepalive_interval ({:?}), or idle connections are dropped",
                    self.keepalive_interval
                ),
            ));
        }
        if self.backoff_max < self.backoff_min {
            return Err(Error::config(
                "transport.backoff_max",
                format!(
                    "must not be shorter than transport.backoff_min ({:?})",
                    self.backoff_min
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.backoff_jitter) {
            return Err(Error::config("transport.backoff_jitter", "must be in [0, 1)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        let ok = TransportConfig::new("c", 1, "127.0.0.1:1");
        ok.validate().expect("defaults are valid");
        let mut c = ok.clone();
        c.send_queue = 0;
        assert!(c.validate().unwrap_err().to_string().contains("transport.send_queue"));
        let mut c = ok.clone();
        c.idle_timeout = c.keepalive_interval;
        assert!(c.validate().unwrap_err().to_string().contains("transport.idle_timeout"));
        let mut c = ok.clone();
        c.max_frame_len = 8;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("transport.max_frame_len"));
        let mut c = ok;
        c.identity.node_id = 0;
        assert!(c.validate().is_err());
    }
}
