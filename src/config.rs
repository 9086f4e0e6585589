//! Node configuration: one struct with defaults, loaded from a TOML file, overridden by `HERALD_*`
//! environment variables and flags (the CLI applies those), and checked by [`Config::validate`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::subscription::SubscriptionSpec;

/// Everything a node needs to run. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's id, unique in the cluster (`--node-id`, `HERALD_NODE_ID`).
    pub node_id: u64,
    /// Take the node id from the host name's trailing ordinal plus one: `herald-0` is node 1
    /// (`--node-id-from-hostname`, `HERALD_NODE_ID_FROM_HOSTNAME`), for StatefulSet pods.
    pub node_id_from_hostname: bool,
    /// Name of the cluster; nodes of different clusters refuse each other.
    pub cluster_id: String,
    /// Where the WAL, dead letters and subscriptions are stored (`--data-dir`, `HERALD_DATA_DIR`).
    pub data_dir: PathBuf,
    /// `text` (readable) or `json` log lines (`--log-format`, `HERALD_LOG_FORMAT`).
    pub log_format: LogFormat,
    /// How long SIGTERM waits for in-flight events before exiting (they stay in the WAL).
    pub shutdown_timeout_ms: u64,
    /// The HTTP API.
    pub http: HttpConfig,
    /// The write-ahead log.
    pub wal: WalConfig,
    /// Handler instances, mailboxes and supervision.
    pub handlers: HandlerConfig,
    /// Bearer tokens.
    pub auth: AuthConfig,
    /// The peer transport and joining a cluster.
    pub cluster: ClusterConfig,
    /// Mutual TLS between nodes.
    pub peer_tls: PeerTlsConfig,
    /// The Raft group that replicates membership.
    pub raft: RaftConfig,
    /// Traces: where they are exported, how many are started.
    pub telemetry: TelemetryConfig,
    /// Subscriptions declared at start-up (created if missing, updated if changed).
    pub subscriptions: Vec<SubscriptionSpec>,
}

/// Cluster membership: where peers connect and whom to join; node monitoring and the event plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Peer listen address (`--peer`, `HERALD_PEER`). Empty: the HTTP address's IP with the HTTP
    /// port + 100 (port 0 when the HTTP port is 0).
    pub peer: String,
    /// The peer address other nodes dial (`--advertise`, `HERALD_ADVERTISE`); a host name is
    /// fine. Empty: the bound peer address.
    pub advertise: String,
    /// Peer addresses of existing members to join (`--join`, `HERALD_JOIN=a,b`); host names
    /// resolve. Empty: a new node starts its own cluster (or resumes the one on disk).
    pub join: Vec<String>,
    /// Removed: the HMAC cluster secret was replaced by mutual TLS (`[peer_tls]`). Kept only so
    /// that a configuration still naming it gets an error that says what to do.
    #[serde(skip_serializing)]
    pub secret_file: Option<PathBuf>,
    /// How often every peer is pinged.
    pub ping_interval_ms: u64,
    /// Phi above which a peer is suspect: routers skip it and re-send what it has not acked.
    pub phi_threshold: f64,
    /// The failure detector's floor for the standard deviation of ping intervals (a higher floor
    /// tolerates more jitter before suspecting).
    pub min_std_deviation_ms: u64,
    /// The leader marks a member down after it was suspect or degraded this long (its
    /// subscriptions move), and up again after it was healthy this long.
    pub down_after_ms: u64,
    /// How many peers each node watches (pings and judges), 1 to 64. Each member is watched by
    /// this many others, chosen from the member list alike on every node (`monitor::Ring`), and
    /// the leader marks it down when most of them report it suspect, degraded or gone: idle
    /// monitoring traffic is O(monitors) per node, not O(nodes). A cluster of up to
    /// `monitors + 1` nodes is watched by everyone, as before this key existed.
    pub monitors: usize,
    /// A peer that reports a backlog while one of its handler worker threads has been wedged
    /// (blocked by a handler) this long is degraded: routers avoid it, the leader marks it down.
    pub degraded_after_ms: u64,
    /// A forwarded event not acked within this long is sent again.
    pub redeliver_after_ms: u64,
    /// How many finished `(subscription, event id)` pairs a handler node remembers to drop
    /// duplicate deliveries.
    pub dedup_window: usize,
    /// Whether a node that is not a member yet joins at once (`auto`) or waits, pending, until an
    /// admin approves it with `POST /v1/cluster/nodes/{id}/approve` (`manual`). Applied by the
    /// member a joining node asks (its seed): set it alike on every node.
    pub join_approval: JoinApproval,
    /// Most inbound peer connections handshaking at once; beyond it a new one is closed at once
    /// and counted in `herald_transport_connections_refused_total{reason="too_many_pending"}`.
    pub max_pending_handshakes: usize,
}

/// How a new node joins (`cluster.join_approval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum JoinApproval {
    /// Any node that passes the peer handshake joins.
    #[default]
    Auto,
    /// A new node waits until an admin approves it.
    Manual,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            peer: String::new(),
            advertise: String::new(),
            join: Vec::new(),
            secret_file: None,
            ping_interval_ms: 200,
            phi_threshold: 8.0,
            min_std_deviation_ms: 50,
            down_after_ms: 1000,
            monitors: crate::types::DEFAULT_MONITORS,
            degraded_after_ms: 3000,
            redeliver_after_ms: 5000,
            dedup_window: 100_000,
            join_approval: JoinApproval::Auto,
            max_pending_handshakes: 256,
        }
    }
}

/// Mutual TLS between nodes (`[peer_tls]`). Every node needs a certificate signed by the
/// cluster's CA and naming its node id (`herald cert`); without one a node refuses to start,
/// unless `insecure` is set, which allows plaintext peers on loopback only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerTlsConfig {
    /// The cluster CA certificate(s), PEM (`--peer-ca`, `HERALD_PEER_CA`). Several may be listed
    /// to rotate the CA.
    pub ca: Option<PathBuf>,
    /// This node's certificate, PEM (`--peer-cert`, `HERALD_PEER_CERT`).
    pub cert: Option<PathBuf>,
    /// This node's private key, PEM (`--peer-key`, `HERALD_PEER_KEY`).
    pub key: Option<PathBuf>,
    /// Plaintext, unauthenticated peers, allowed only when the peer address is loopback
    /// (`--insecure-peers`, `HERALD_INSECURE_PEERS`); logs a warning at start.
    pub insecure: bool,
    /// How often the three files are re-read; a renewed certificate is used for new connections
    /// without a restart.
    pub reload_interval_ms: u64,
}

impl Default for PeerTlsConfig {
    fn default() -> Self {
        PeerTlsConfig {
            ca: None,
            cert: None,
            key: None,
            insecure: false,
            reload_interval_ms: 10_000,
        }
    }
}

/// How a node talks to its peers, from [`Config::peer_security`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSecurity {
    /// Mutual TLS with these files.
    Tls {
        /// The CA certificate(s).
        ca: PathBuf,
        /// The node certificate.
        cert: PathBuf,
        /// The node key.
        key: PathBuf,
    },
    /// Plaintext on loopback (`peer_tls.insecure`).
    Insecure,
}

/// The membership Raft group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// How many members vote (the first to join); the rest are learners, promoted when a voter
    /// leaves.
    pub voters: usize,
    /// One Raft tick.
    pub tick_ms: u64,
    /// Ticks of leader silence before an election.
    pub election_ticks: usize,
    /// Ticks between leader heartbeats (3: every 300 ms, a third of the shortest election
    /// timeout; the leader sends one to every member, learners included, so at 20 nodes this is
    /// most of an idle leader's traffic).
    pub heartbeat_ticks: usize,
    /// Placement's bounded-load factor: no node gets more than this times the average instances.
    pub load_factor: f64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            voters: 3,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 3,
            load_factor: crate::types::DEFAULT_LOAD_FACTOR,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// HTTP API settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address (`--http`, `HERALD_HTTP`). Port 0 picks a free port.
    pub addr: String,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Most events accepted in one batch publish.
    pub max_batch_events: usize,
    /// Most HTTP connections served at once; beyond it new connections wait in the listen backlog
    /// until one closes. Split evenly among the HTTP workers (at most one worker per connection).
    pub max_connections: usize,
    /// A client must send a request's whole head (request line and headers) within this long
    /// after connecting or its previous response, or gets 408 and is disconnected (slowloris).
    pub request_timeout_ms: u64,
    /// A request's whole body must arrive within this long after its head, or it gets 408.
    pub body_timeout_ms: u64,
    /// Serve non-loopback clients even though no tokens are configured. Without it, a node with no
    /// tokens binds loopback only.
    pub allow_unauthenticated_remote: bool,
    /// The HTTP address other nodes use to reach this one, host:port (`--advertise-http`,
    /// `HERALD_ADVERTISE_HTTP`). Empty: the bound address, where an unspecified IP (`0.0.0.0`,
    /// `::`) is replaced by the host of `cluster.advertise`.
    pub advertise: String,
    /// PEM certificate chain to serve the API over TLS (`--tls-cert`, `HERALD_TLS_CERT`); needs
    /// `tls_key`. Unset: plain HTTP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (`--tls-key`, `HERALD_TLS_KEY`).
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): with it, every HTTP client must present a certificate signed by
    /// one of them (mutual TLS; `--tls-client-ca`, `HERALD_TLS_CLIENT_CA`). Needs `tls_cert`.
    pub tls_client_ca: Option<PathBuf>,
    /// `GET /metrics` needs a token with the `read` scope (off by default: Prometheus scrapes
    /// without one; `--metrics-auth`, `HERALD_METRICS_AUTH`).
    pub metrics_auth: bool,
    /// A publish to a topic without any subscription is refused with 404 `no_subscription`
    /// instead of being accepted and dropped (`--require-subscription`,
    /// `HERALD_REQUIRE_SUBSCRIPTION`; a publish may also ask for it with
    /// `?require_subscription=true`).
    pub require_subscription: bool,
}

/// Traces (OpenTelemetry). A node makes spans of the `herald::trace` target (publish, forward,
/// deliver, webhook, replays) for sampled events; `herald node` (the process layer) exports them
/// over OTLP/HTTP when `otlp_endpoint` is set. An embedded node exports nothing itself: its spans
/// go to the embedding application's subscriber.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP (protobuf) collector, like `http://localhost:4318`; spans go to
    /// `<url>/v1/traces` (`--otlp-endpoint`, `HERALD_OTLP_ENDPOINT`; else the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`). Unset: no export, and no trace is started.
    pub otlp_endpoint: Option<String>,
    /// Share of publishes *without* a `traceparent` that start a new trace, from 0 to 1
    /// (`--trace-sample-ratio`, `HERALD_TRACE_SAMPLE_RATIO`). A publish that brings a
    /// `traceparent` follows its `sampled` flag instead.
    pub sample_ratio: f64,
    /// The `service.name` resource attribute of the exported spans.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "herald".to_string(),
        }
    }
}

/// Write-ahead log settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalConfig {
    /// What a crash keeps (see [`FsyncPolicy`]): `always` (every acknowledged event), `interval`
    /// (everything acknowledged before the last flush, at most `flush_interval_ms` old) or `never`
    /// (nothing written since the node started, unless it shut down cleanly).
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`: milliseconds between durable flushes (the most a crash loses).
    pub flush_interval_ms: u64,
    /// Most operations written in one group commit.
    pub max_batch: usize,
}

/// When the WAL is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every group commit is durable (fsynced) before its events are acknowledged: a process
    /// crash or a power loss loses nothing acknowledged.
    #[default]
    Always,
    /// Group commits are not durable when acknowledged; a durable flush every
    /// `wal.flush_interval_ms` makes everything committed before it durable. A crash loses at
    /// most the events acknowledged since the last completed flush.
    Interval,
    /// No commit is durable until the node shuts down cleanly: a process crash (SIGKILL, OOM, a
    /// panic that aborts) or a power loss loses everything accepted since the node started.
    Never,
}

/// Handler instances, mailboxes and supervision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HandlerConfig {
    /// Worker threads that run handler instances; 0 means one per CPU core.
    pub workers: usize,
    /// Events queued per handler instance; when full, publishing answers 429.
    pub mailbox_capacity: usize,
    /// Bytes of event data held in memory across all mailboxes; beyond it publishing answers 429.
    pub max_inflight_bytes: usize,
    /// Largest `instances` a subscription may ask for.
    pub max_instances: u32,
    /// Default `max_attempts` for subscriptions that do not set it.
    pub max_attempts: u32,
    /// Dead letters older than this many seconds are deleted (0: kept however old).
    pub dead_letter_max_age_s: u64,
    /// Most dead letters a node keeps; beyond it the oldest are deleted (0: no limit).
    pub dead_letter_max_count: u64,
    /// Delay before an event's first retry; doubles with each further retry of that event (the
    /// next event starts over).
    pub backoff_initial_ms: u64,
    /// Cap of the retry delay.
    pub backoff_max_ms: u64,
    /// A handler call that takes longer fails and its instance is restarted.
    pub call_timeout_ms: u64,
    /// Timeout of one webhook POST.
    pub webhook_timeout_ms: u64,
    /// Hosts and CIDR blocks webhooks may call (`hooks.example.com`, `*.example.com`,
    /// `10.0.0.0/8`). Empty: any destination not refused. Not empty: only these, and a match
    /// also permits what the built-in rules refuse (see `subscription::egress`).
    pub webhook_allow: Vec<String>,
    /// Hosts and CIDR blocks webhooks may never call; wins over `webhook_allow`. Link-local and
    /// cloud-metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254) are refused even when
    /// this is empty, unless `webhook_allow` lists them.
    pub webhook_deny: Vec<String>,
}

/// Authentication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted bearer tokens. None configured: no auth, loopback only.
    pub tokens: Vec<TokenConfig>,
    /// A file of more tokens, one `<scopes> <token> [name]` per line, `#` comments
    /// (`--tokens-file`, `HERALD_TOKENS_FILE`): keeps secrets out of the config file (a
    /// Kubernetes Secret, say). See [`parse_tokens`].
    pub tokens_file: Option<PathBuf>,
}

/// One bearer token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The secret presented as `Authorization: Bearer <token>`, or its SHA-256 as
    /// `sha256:<64 hex digits>` (what `herald token hash` prints), which keeps the secret itself
    /// out of files.
    pub token: String,
    /// What the token may do (see [`Scopes`]): `admin`, `publish`, `publish:<topic pattern>`,
    /// `read`, or several comma-separated (`read,publish:orders.*`).
    #[serde(alias = "scopes")]
    pub role: Scopes,
    /// The token's name in audit lines. Default: `sha256:` and the first 8 hex digits of the
    /// token's SHA-256 (never the token itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The prefix of a hashed token.
pub const SHA256_PREFIX: &str = "sha256:";

impl TokenConfig {
    /// A token with these scopes and no name.
    pub fn new(token: impl Into<String>, role: impl Into<Scopes>) -> Self {
        TokenConfig {
            token: token.into(),
            role: role.into(),
            name: None,
        }
    }

    /// The SHA-256 a presented token must hash to: the configured hash, or the hash of the
    /// plain token. `None` for a malformed `sha256:` value ([`Config::validate`] refuses it).
    pub fn digest(&self) -> Option<[u8; 32]> {
        match self.token.strip_prefix(SHA256_PREFIX) {
            Some(hex) => parse_hex32(hex),
            None => Some(sha256(self.token.as_bytes())),
        }
    }

    /// The name for audit lines: `name`, else `sha256:` + the first 8 hex digits of the hash.
    pub fn display_name(&self) -> String {
        match (&self.name, self.digest()) {
            (Some(n), _) => n.clone(),
            (None, Some(d)) => format!("{SHA256_PREFIX}{}", &hex(&d)[..8]),
            (None, None) => "invalid".to_string(),
        }
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// `sha256:<64 lower-case hex digits>` of a token: the form a tokens file may hold instead of it.
pub fn hash_token(token: &str) -> String {
    format!("{SHA256_PREFIX}{}", hex(&sha256(token.as_bytes())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// What a request needs: the scope an HTTP route declares.
///
/// `Admin` includes both others; `Publish` and `Read` are unrelated (neither includes the other),
/// so `Role` is only partially ordered: `have >= need` holds exactly when `have` grants `need`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Publish events.
    Publish,
    /// Read the cluster's state: members, subscriptions, placements (and `/metrics` with
    /// `http.metrics_auth`).
    Read,
    /// Everything: publish, read, and manage subscriptions, dead letters and the cluster.
    Admin,
}

impl PartialOrd for Role {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        use std::cmp::Ordering::*;
        match (self, other) {
            (a, b) if a == b => Some(Equal),
            (Role::Admin, _) => Some(Greater),
            (_, Role::Admin) => Some(Less),
            _ => None,
        }
    }
}

/// One grant of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Publish to any topic.
    Publish,
    /// Publish to the topics matching a pattern: topic characters, where `*` matches any run of
    /// characters (`orders.*` matches `orders.created` and `orders.eu.created`, not `orders`).
    PublishTopics(String),
    /// Read the cluster's state.
    Read,
}

/// A token's grants, written `admin`, `publish`, `publish:<pattern>`, `read`, or several of them
/// separated by commas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    /// The grants.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    /// Whether a request that needs `need` is allowed (a topic-limited publish scope grants
    /// `Publish`; check the topics with [`Scopes::may_publish`]).
    pub fn grants(&self, need: Role) -> bool {
        self.0.iter().any(|s| {
            let have = match s {
                Scope::Admin => Role::Admin,
                Scope::Publish | Scope::PublishTopics(_) => Role::Publish,
                Scope::Read => Role::Read,
            };
            have >= need
        })
    }

    /// Whether events may be published to `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.0.iter().any(|s| match s {
            Scope::Admin | Scope::Publish => true,
            Scope::PublishTopics(p) => topic_matches(p, topic),
            Scope::Read => false,
        })
    }

    /// Whether some topics may be refused (the token's only publish grants are patterns).
    pub fn topic_limited(&self) -> bool {
        !self.0.iter().any(|s| matches!(s, Scope::Admin | Scope::Publish))
    }
}

impl From<Role> for Scopes {
    fn from(r: Role) -> Self {
        Scopes(vec![match r {
            Role::Admin => Scope::Admin,
            Role::Publish => Scope::Publish,
            Role::Read => Scope::Read,
        }])
    }
}

impl std::fmt::Display for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match s {
                Scope::Admin => f.write_str("admin")?,
                Scope::Publish => f.write_str("publish")?,
                Scope::PublishTopics(p) => write!(f, "publish:{p}")?,
                Scope::Read => f.write_str("read")?,
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Scopes {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut scopes = Vec::new();
        for word in s.split(',').map(str::trim) {
            let scope = match word {
                "admin" => Scope::Admin,
                "publish" => Scope::Publish,
                "read" => Scope::Read,
                w => match w.strip_prefix("publish:") {
                    Some(p) => {
                        let ok = (1..=200).contains(&p.len())
                            && p.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'*'));
                        if !ok {
                            return Err(format!(
                                "{w:?}: a topic pattern is topic characters ([a-zA-Z0-9._-]) and `*`"
                            ));
                        }
                        Scope::PublishTopics(p.to_string())
                    }
                    None => {
                        return Err(format!(
                            "unknown scope {w:?} (admin, publish, publish:<topic pattern> or read)"
                        ))
                    }
                },
            };
            scopes.push(scope);
        }
        Ok(Scopes(scopes))
    }
}

impl TryFrom<String> for Scopes {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<Scopes> for String {
    fn from(s: Scopes) -> String {
        s.to_string()
    }
}

/// Whether `topic` matches `pattern`, where `*` matches any run of characters.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), topic.as_bytes());
    // Greedy glob with backtracking to the last `*` (linear in practice, no recursion).
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            node_id_from_hostname: false,
            cluster_id: "herald".to_string(),
            data_dir: PathBuf::from("herald-data"),
            log_format: LogFormat::Text,
            shutdown_timeout_ms: 10_000,
            http: HttpConfig::default(),
            wal: WalConfig::default(),
            handlers: HandlerConfig::default(),
            auth: AuthConfig::default(),
            cluster: ClusterConfig::default(),
            peer_tls: PeerTlsConfig::default(),
            raft: RaftConfig::default(),
            telemetry: TelemetryConfig::default(),
            subscriptions: Vec::new(),
        }
    }
}

/// This machine's host name: `$HOSTNAME` (set in containers and pods), else the kernel's.
pub(crate) fn hostname() -> Result<String> {
    if let Ok(h) = std::env::var("HOSTNAME") {
        if !h.trim().is_empty() {
            return Ok(h.trim().to_string());
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .map_err(|e| Error::config("node_id_from_hostname", format!("cannot read the host name: {e}")))
}

/// `name-N` → node id N + 1 (StatefulSet ordinals start at 0, node ids at 1).
pub fn node_id_from_hostname(host: &str) -> Option<u64> {
    // A pod's host name is its name; a FQDN's first label is.
    let name = host.split('.').next()?;
    let (_, ordinal) = name.rsplit_once('-')?;
    if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ordinal.parse::<u64>().ok()?.checked_add(1)
}

/// Parses a tokens file: one `<scopes> <token> [name]` per line (scopes as in [`Scopes`]; the
/// token plain or as `sha256:<64 hex>`); blank lines and `#` comments are skipped.
pub fn parse_tokens(text: &str) -> std::result::Result<Vec<TokenConfig>, String> {
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(role), Some(token), name, None) = (words.next(), words.next(), words.next(), words.next()) else {
            return Err(format!("line {}: expected `<scopes> <token> [name]`", n + 1));
        };
        let role = role.parse::<Scopes>().map_err(|e| format!("line {}: {e}", n + 1))?;
        tokens.push(TokenConfig {
            token: token.to_string(),
            role,
            name: name.map(str::to_string),
        });
    }
    Ok(tokens)
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: "127.0.0.1:7070".to_string(),
            max_body_bytes: 1024 * 1024,
            max_batch_events: 1000,
            max_connections: 25_000,
            request_timeout_ms: 5_000,
            body_timeout_ms: 30_000,
            allow_unauthenticated_remote: false,
            advertise: String::new(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            metrics_auth: false,
            require_subscription: false,
        }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            fsync: FsyncPolicy::Always,
            flush_interval_ms: 100,
            max_batch: 4096,
        }
    }
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            workers: 0,
            mailbox_capacity: 4096,
            max_inflight_bytes: 256 * 1024 * 1024,
            max_instances: 256,
            max_attempts: 5,
            dead_letter_max_age_s: 30 * 24 * 3600,
            dead_letter_max_count: 1_000_000,
            backoff_initial_ms: 50,
            backoff_max_ms: 5_000,
            call_timeout_ms: 30_000,
            webhook_timeout_ms: 10_000,
            webhook_allow: Vec::new(),
            webhook_deny: Vec::new(),
        }
    }
}

impl HandlerConfig {
    /// The number of worker threads to start.
    pub fn worker_threads(&self) -> usize {
        if self.workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            self.workers
        }
    }
}

impl Config {
    /// Reads a TOML file. Unknown keys are errors, so a typo does not silently fall back to a default.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Fills what comes from outside the file: the node id from the host name (when
    /// `node_id_from_hostname`), and the tokens of `auth.tokens_file` (read once: the field is
    /// cleared). `herald node` calls it before [`Config::validate`].
    pub fn resolve(&mut self) -> Result<()> {
        if self.node_id_from_hostname {
            let host = hostname()?;
            self.node_id = node_id_from_hostname(&host).ok_or_else(|| {
                Error::config(
                    "node_id_from_hostname",
                    format!("host name {host:?} does not end in -<ordinal> (like herald-0)"),
                )
            })?;
        }
        if let Some(path) = self.auth.tokens_file.take() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::config("auth.tokens_file", format!("cannot read {}: {e}", path.display())))?;
            let tokens = parse_tokens(&text)
                .map_err(|e| Error::config("auth.tokens_file", format!("{}: {e}", path.display())))?;
            self.auth.tokens.extend(tokens);
        }
        Ok(())
    }

    /// The HTTP listen address, parsed.
    pub fn http_addr(&self) -> Result<SocketAddr> {
        self.http.addr.parse().map_err(|_| {
            Error::config(
                "http.addr",
                format!("{:?} is not an IP:port address (e.g. 127.0.0.1:7070)", self.http.addr),
            )
        })
    }

    /// The HTTP address other nodes reach this one at (see [`HttpConfig::advertise`]), given the
    /// address the API is bound to.
    pub fn http_advertise(&self, bound: SocketAddr) -> String {
        if !self.http.advertise.is_empty() {
            return self.http.advertise.clone();
        }
        if bound.ip().is_unspecified() {
            if let Some((host, _)) = self.cluster.advertise.rsplit_once(':') {
                if !host.is_empty() {
                    return format!("{host}:{}", bound.port());
                }
            }
        }
        bound.to_string()
    }

    /// The peer listen address: `cluster.peer`, or the HTTP IP with the HTTP port + 100.
    pub fn peer_addr(&self) -> Result<SocketAddr> {
        if self.cluster.peer.is_empty() {
            let http = self.http_addr()?;
            let port = if http.port() == 0 {
                0
            } else {
                http.port().checked_add(100).unwrap_or(0)
            };
            return Ok(SocketAddr::new(http.ip(), port));
        }
        self.cluster.peer.parse().map_err(|_| {
            Error::config(
                "cluster.peer",
                format!("{:?} is not an IP:port address (e.g. 0.0.0.0:7170)", self.cluster.peer),
            )
        })
    }

    /// How this node talks to its peers: mutual TLS with the `[peer_tls]` files, or insecure
    /// peers when `peer_tls.insecure` is set and every peer address is loopback. A node with
    /// neither refuses to start with this error (secure by default); [`validate`](Self::validate)
    /// leaves that one check to the node's start.
    pub fn peer_security(&self) -> Result<PeerSecurity> {
        let t = &self.peer_tls;
        match (&t.ca, &t.cert, &t.key) {
            (Some(ca), Some(cert), Some(key)) => {
                if t.insecure {
                    return Err(Error::config(
                        "peer_tls.insecure",
                        "is set together with TLS files; drop --insecure-peers to use them",
                    ));
                }
                Ok(PeerSecurity::Tls {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                })
            }
            (None, None, None) if t.insecure => {
                let peer = self.peer_addr()?;
                if !peer.ip().is_loopback() {
                    return Err(Error::config(
                        "peer_tls.insecure",
                        format!(
                            "plaintext peers are allowed only on loopback, and the peer address is {peer}; \
                             give the node a certificate (--peer-ca, --peer-cert, --peer-key; see `herald cert`)"
                        ),
                    ));
                }
                let advertised = self
                    .cluster
                    .advertise
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_matches(['[', ']']));
                if let Some(host) = advertised.filter(|h| !h.is_empty()) {
                    let loopback =
                        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
                    if !loopback {
                        return Err(Error::config(
                            "peer_tls.insecure",
                            format!(
                                "plaintext peers are allowed only on loopback, and the advertised peer \
                                 address is {}; give the node a certificate (see `herald cert`)",
                                self.cluster.advertise
                            ),
                        ));
                    }
                }
                Ok(PeerSecurity::Insecure)
            }
            (None, None, None) => Err(Error::config(
                "peer_tls",
                "no certificate for the peer transport: give --peer-ca, --peer-cert and --peer-key \
                 (make them with `herald cert ca` and `herald cert node`; `herald up` does it for you), \
                 or pass --insecure-peers to run plaintext peers on loopback only",
            )),
            _ => {
                let missing: Vec<&str> = [
                    ("peer_tls.ca", &t.ca),
                    ("peer_tls.cert", &t.cert),
                    ("peer_tls.key", &t.key),
                ]
                .into_iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| k)
                .collect();
                Err(Error::config(
                    "peer_tls",
                    format!("give all three of ca, cert and key; missing: {}", missing.join(", ")),
                ))
            }
        }
    }

    /// The webhook egress policy of `handlers.webhook_allow` and `handlers.webhook_deny`.
    pub fn webhook_policy(&self) -> Result<crate::subscription::egress::EgressPolicy> {
        let h = &self.handlers;
        crate::subscription::egress::EgressPolicy::new(&h.webhook_allow, &h.webhook_deny).map_err(|e| {
            let key = if e.starts_with("handlers.webhook_allow") {
                "handlers.webhook_allow"
            } else {
                "handlers.webhook_deny"
            };
            Error::config(key, e)
        })
    }

    /// Adds the subscriptions declared in code (`NodeBuilder::subscribe`/`subscription`) to those
    /// of the config file. A code declaration of a topic/group the file declares too wins: the
    /// file's entry is dropped. Returns each `(file entry, code declaration)` pair that differed,
    /// for the caller to warn about.
    pub fn declare(&mut self, code: Vec<SubscriptionSpec>) -> Vec<(SubscriptionSpec, SubscriptionSpec)> {
        let mut overridden = Vec::new();
        for spec in code {
            let same = |f: &SubscriptionSpec| f.topic == spec.topic && f.group == spec.group;
            while let Some(i) = self.subscriptions.iter().position(same) {
                let file = self.subscriptions.remove(i);
                if file != spec {
                    overridden.push((file, spec.clone()));
                }
            }
            self.subscriptions.push(spec);
        }
        overridden
    }

    /// Checks every setting; the error names the key to fix.
    pub fn validate(&self) -> Result<()> {
        if self.cluster.secret_file.is_some() {
            return Err(Error::config(
                "cluster.secret_file",
                "was removed: nodes authenticate each other with mutual TLS now. Make a CA and node \
                 certificates with `herald cert ca` and `herald cert node`, and give each node \
                 --peer-ca, --peer-cert and --peer-key (README, Security)",
            ));
        }
        if self.peer_tls.reload_interval_ms == 0 {
            return Err(Error::config("peer_tls.reload_interval_ms", "must be greater than 0"));
        }
        match self.peer_security() {
            Ok(_) => {}
            Err(Error::Config { key, .. }) if key == "peer_tls" && self.peer_tls == PeerTlsConfig::default() => {}
            Err(e) => return Err(e),
        }
        if self.node_id == 0 {
            return Err(Error::config("node_id", "must be at least 1"));
        }
        crate::event::validate_name("cluster id", &self.cluster_id)
            .map_err(|e| Error::config("cluster_id", e.to_string()))?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(Error::config("data_dir", "must not be empty"));
        }
        self.http_addr()?;
        let h = &self.handlers;
        let positive: [(&str, u64); 13] = [
            ("http.max_body_bytes", self.http.max_body_bytes as u64),
            ("http.max_batch_events", self.http.max_batch_events as u64),
            ("http.max_connections", self.http.max_connections as u64),
            ("http.request_timeout_ms", self.http.request_timeout_ms),
            ("http.body_timeout_ms", self.http.body_timeout_ms),
            (
                "cluster.max_pending_handshakes",
                self.cluster.max_pending_handshakes as u64,
            ),
            ("wal.max_batch", self.wal.max_batch as u64),
            ("wal.flush_interval_ms", self.wal.flush_interval_ms),
            ("handlers.mailbox_capacity", h.mailbox_capacity as u64),
            ("handlers.max_inflight_bytes", h.max_inflight_bytes as u64),
            ("handlers.max_instances", u64::from(h.max_instances)),
            ("handlers.call_timeout_ms", h.call_timeout_ms),
            ("handlers.webhook_timeout_ms", h.webhook_timeout_ms),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(key, "must be greater than 0"));
            }
        }
        if h.max_inflight_bytes < self.http.max_body_bytes {
            return Err(Error::config(
                "handlers.max_inflight_bytes",
                "must be at least http.max_body_bytes, or no large event could ever be accepted",
            ));
        }
        self.webhook_policy()?;
        if h.max_attempts == 0 || h.max_attempts > crate::subscription::MAX_ATTEMPTS {
            return Err(Error::config(
                "handlers.max_attempts",
                format!("must be between 1 and {}", crate::subscription::MAX_ATTEMPTS),
            ));
        }
        if h.backoff_initial_ms > h.backoff_max_ms {
            return Err(Error::config(
                "handlers.backoff_initial_ms",
                "must not exceed handlers.backoff_max_ms",
            ));
        }
        if self.http.max_batch_events > h.mailbox_capacity {
            return Err(Error::config(
                "http.max_batch_events",
                "must not exceed handlers.mailbox_capacity, or a full batch could never be accepted",
            ));
        }
        self.peer_addr()?;
        let t = &self.telemetry;
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(Error::config("telemetry.sample_ratio", "must be between 0 and 1"));
        }
        if let Some(url) = &t.otlp_endpoint {
            match url::Url::parse(url) {
                Ok(u) if u.scheme() == "http" && u.host().is_some() => {}
                Ok(u) if u.scheme() == "https" => {
                    return Err(Error::config(
                        "telemetry.otlp_endpoint",
                        format!(
                            "{url:?}: only http:// is supported (run the collector, or an OpenTelemetry \
                             Collector agent, next to the node and let it forward over TLS)"
                        ),
                    ))
                }
                _ => {
                    return Err(Error::config(
                        "telemetry.otlp_endpoint",
                        format!("{url:?} is not an http:// URL like http://localhost:4318"),
                    ))
                }
            }
        }
        if t.service_name.is_empty() || t.service_name.len() > 256 {
            return Err(Error::config("telemetry.service_name", "must be 1 to 256 bytes"));
        }
        for (i, j) in self.cluster.join.iter().enumerate() {
            if j.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
                return Err(Error::config(
                    format!("cluster.join[{i}]"),
                    format!("{j:?} is not host:port"),
                ));
            }
        }
        let c = &self.cluster;
        for (key, v) in [
            ("cluster.ping_interval_ms", c.ping_interval_ms),
            ("cluster.min_std_deviation_ms", c.min_std_deviation_ms),
            ("cluster.down_after_ms", c.down_after_ms),
            ("cluster.degraded_after_ms", c.degraded_after_ms),
            ("cluster.redeliver_after_ms", c.redeliver_after_ms),
            ("cluster.dedup_window", c.dedup_window as u64),
        ] {
            if v == 0 {
                return Err(Error::config(key, "must be positive"));
            }
        }
        if !(1..=64).contains(&c.monitors) {
            return Err(Error::config(
                "cluster.monitors",
                "must be between 1 and 64 (5 is a good start; 3 or more lets the others outvote one wrong watcher)",
            ));
        }
        if !(c.phi_threshold > 0.0 && c.phi_threshold <= crate::types::MAX_PHI) {
            return Err(Error::config(
                "cluster.phi_threshold",
                "must be above 0 (8 is a good start)",
            ));
        }
        if self.raft.voters == 0 || self.raft.voters > 9 {
            return Err(Error::config("raft.voters", "must be between 1 and 9"));
        }
        if self.raft.tick_ms == 0
            || self.raft.heartbeat_ticks == 0
            || self.raft.election_ticks <= self.raft.heartbeat_ticks
        {
            return Err(Error::config(
                "raft.election_ticks",
                "raft.tick_ms and raft.heartbeat_ticks must be positive and election_ticks larger than heartbeat_ticks",
            ));
        }
        if !(1.0..=10.0).contains(&self.raft.load_factor) {
            return Err(Error::config("raft.load_factor", "must be between 1.0 and 10.0"));
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            if t.token.starts_with(SHA256_PREFIX) {
                if t.digest().is_none() {
                    return Err(Error::config(
                        format!("auth.tokens[{i}].token"),
                        "a hashed token is `sha256:` and 64 hex digits (see `herald token hash`)",
                    ));
                }
            } else if t.token.len() < 8 {
                return Err(Error::config(
                    format!("auth.tokens[{i}].token"),
                    "must be at least 8 characters",
                ));
            }
            if t.role.0.is_empty() {
                return Err(Error::config(format!("auth.tokens[{i}].role"), "must name a scope"));
            }
            if let Some(name) = &t.name {
                if name.is_empty() || name.len() > 100 || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(Error::config(
                        format!("auth.tokens[{i}].name"),
                        "must be 1 to 100 printable characters without spaces",
                    ));
                }
            }
        }
        match (&self.http.tls_cert, &self.http.tls_key) {
            (Some(_), None) => {
                return Err(Error::config(
                    "http.tls_key",
                    "http.tls_cert is set: give its private key too",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "http.tls_cert",
                    "http.tls_key is set: give its certificate too",
                ))
            }
            _ => {}
        }
        if self.http.tls_client_ca.is_some() && self.http.tls_cert.is_none() {
            return Err(Error::config(
                "http.tls_client_ca",
                "client certificates need TLS: set http.tls_cert and http.tls_key",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_come_from_statefulset_host_names() {
        assert_eq!(node_id_from_hostname("herald-0"), Some(1));
        assert_eq!(node_id_from_hostname("my-herald-12.herald-peers.default.svc"), Some(13));
        assert_eq!(node_id_from_hostname("herald"), None);
        assert_eq!(node_id_from_hostname("herald-"), None);
        assert_eq!(node_id_from_hostname("herald-x1"), None);
    }

    #[test]
    fn tokens_files_are_role_token_lines() {
        let t = parse_tokens("# ops\nadmin  s3cret-admin\n\npublish s3cret-pub ci\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].role.clone(), t[0].token.as_str()),
            (Role::Admin.into(), "s3cret-admin")
        );
        assert_eq!(
            (t[1].role.clone(), t[1].token.as_str()),
            (Role::Publish.into(), "s3cret-pub")
        );
        assert_eq!(t[1].name.as_deref(), Some("ci"));
        assert!(parse_tokens("root x").unwrap_err().contains("line 1: unknown scope"));
        assert!(parse_tokens("admin\n")
            .unwrap_err()
            .contains("expected `<scopes> <token> [name]`"));
        assert!(parse_tokens("admin a b c").is_err(), "too many words");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "publish publisher-token\n").unwrap();
        let mut c = Config::default();
        c.auth.tokens_file = Some(path);
        c.resolve().unwrap();
        assert_eq!(c.auth.tokens.len(), 1);
        assert_eq!(c.auth.tokens_file, None, "read once");
        c.validate().unwrap();
    }

    #[test]
    fn scopes_parse_and_grant() {
        let s: Scopes = "read,publish:orders.*".parse().unwrap();
        assert!(s.grants(Role::Read));
        assert!(s.grants(Role::Publish));
        assert!(!s.grants(Role::Admin));
        assert!(s.may_publish("orders.created"));
        assert!(!s.may_publish("users.x"));
        assert!(!s.may_publish("orders"));
        assert!(s.topic_limited());
        assert_eq!(s.to_string(), "read,publish:orders.*");
        let admin = Scopes::from(Role::Admin);
        assert!(admin.grants(Role::Read) && admin.grants(Role::Publish) && admin.may_publish("users.x"));
        assert!(!admin.topic_limited());
        let publish = Scopes::from(Role::Publish);
        assert!(!publish.grants(Role::Read), "publish does not read");
        assert!(!Scopes::from(Role::Read).grants(Role::Publish), "read does not publish");
        assert!(!Scopes::from(Role::Read).may_publish("orders.created"));
        // The old two roles keep their order; the new one is beside `publish`, below `admin`.
        assert!(Role::Admin > Role::Publish && Role::Admin > Role::Read);
        assert_eq!(Role::Publish.partial_cmp(&Role::Read), None);
        assert!("publish:orders/x".parse::<Scopes>().is_err());
        assert!("publish:".parse::<Scopes>().is_err());
        assert!("".parse::<Scopes>().is_err());
    }

    #[test]
    fn topic_patterns_glob() {
        assert!(topic_matches("orders.*", "orders.created"));
        assert!(topic_matches("orders.*", "orders.eu.created"));
        assert!(!topic_matches("orders.*", "orders"));
        assert!(!topic_matches("orders.*", "users.orders.x"));
        assert!(topic_matches("*.created", "users.created"));
        assert!(topic_matches("a*b*c", "axxbyyc"));
        assert!(!topic_matches("a*b*c", "axxbyy"));
        assert!(topic_matches("exact", "exact"));
        assert!(!topic_matches("exact", "exactly"));
        assert!(topic_matches("*", "anything"));
    }

    #[test]
    fn hashed_tokens_and_names() {
        let plain = TokenConfig::new("s3cret-admin", Role::Admin);
        let hashed = TokenConfig::new(hash_token("s3cret-admin"), Role::Admin);
        assert_eq!(plain.digest(), hashed.digest());
        assert_eq!(plain.digest(), Some(sha256(b"s3cret-admin")));
        let name = plain.display_name();
        assert!(name.starts_with("sha256:") && name.len() == 15, "{name}");
        assert!(!name.contains("s3cret"));
        assert_eq!(name, hashed.display_name());
        let named = TokenConfig {
            name: Some("ci".into()),
            ..plain
        };
        assert_eq!(named.display_name(), "ci");
        // A short hash is refused, naming the key; a hash is exempt from the length rule.
        let mut c = Config::default();
        c.auth.tokens.push(hashed);
        c.validate().unwrap();
        c.auth.tokens.push(TokenConfig::new("sha256:abcd", Role::Admin));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("auth.tokens[1].token") && e.contains("64 hex"), "{e}");
        let t = parse_tokens(&format!("read {} dashboard\n", hash_token("x"))).unwrap();
        assert_eq!(t[0].digest(), Some(sha256(b"x")));
    }

    #[test]
    fn tls_needs_both_cert_and_key() {
        let mut c = Config::default();
        c.http.tls_cert = Some("cert.pem".into());
        assert!(c.validate().unwrap_err().to_string().contains("http.tls_key"));
        let mut c = Config::default();
        c.http.tls_key = Some("key.pem".into());
        assert!(c.validate().unwrap_err().to_string().contains("http.tls_cert"));
        let mut c = Config::default();
        c.http.tls_client_ca = Some("ca.pem".into());
        assert!(c.validate().unwrap_err().to_string().contains("http.tls_client_ca"));
        let mut c = Config::default();
        c.http.tls_cert = Some("cert.pem".into());
        c.http.tls_key = Some("key.pem".into());
        c.validate().unwrap();
    }

    #[test]
    fn toml_tokens_take_scopes_and_names() {
        let c: Config = toml::from_str(
            "[[auth.tokens]]\ntoken = \"orders-publisher\"\nrole = \"publish:orders.*\"\nname = \"orders-svc\"\n",
        )
        .unwrap();
        assert!(c.auth.tokens[0].role.may_publish("orders.x"));
        assert_eq!(c.auth.tokens[0].display_name(), "orders-svc");
        assert!(toml::from_str::<Config>("[[auth.tokens]]\ntoken = \"xxxxxxxxx\"\nrole = \"root\"\n").is_err());
    }

    #[test]
    fn the_advertised_http_address_names_a_reachable_host() {
        let mut c = Config::default();
        let any: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        assert_eq!(c.http_advertise(any), "0.0.0.0:7070", "nothing better known");
        c.cluster.advertise = "herald-2:7170".into();
        assert_eq!(c.http_advertise(any), "herald-2:7070");
        assert_eq!(c.http_advertise("10.0.0.5:7070".parse().unwrap()), "10.0.0.5:7070");
        c.http.advertise = "api.example:80".into();
        assert_eq!(c.http_advertise(any), "api.example:80");
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_code_declaration_replaces_the_file_entry_of_its_subscription_and_says_so() {
        let mut c = Config::default();
        let file = SubscriptionSpec::rust("user.login", "audit", "audit-logins").instances(3);
        let other = SubscriptionSpec::rust("user.login", "trail", "audit-logins");
        c.subscriptions = vec![file.clone(), other.clone()];
        let code = SubscriptionSpec::rust("user.login", "audit", "audit-logins");
        let overridden = c.declare(vec![code.clone(), other.clone()]);
        assert_eq!(
            overridden,
            vec![(file, code.clone())],
            "only differing entries are reported"
        );
        assert_eq!(c.subscriptions, vec![code, other], "each subscription once, the code's");
    }

    #[test]
    fn validate_names_the_key() {
        let mut c = Config::default();
        c.http.addr = "nope".into();
        assert!(c.validate().unwrap_err().to_string().contains("http.addr"));
        let mut c = Config::default();
        c.handlers.mailbox_capacity = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("handlers.mailbox_capacity"));
        let mut c = Config::default();
        c.auth.tokens.push(TokenConfig::new("short", Role::Admin));
        assert!(c.validate().unwrap_err().to_string().contains("auth.tokens[0].token"));
    }

    #[test]
    fn monitors_must_be_between_1_and_64() {
        assert_eq!(Config::default().cluster.monitors, 5);
        for (n, ok) in [(0, false), (1, true), (5, true), (64, true), (65, false)] {
            let mut c = Config::default();
            c.cluster.monitors = n;
            match c.validate() {
                Ok(()) => assert!(ok, "{n} accepted"),
                Err(e) => {
                    assert!(!ok, "{n} refused: {e}");
                    assert!(e.to_string().contains("cluster.monitors"), "{e}");
                }
            }
        }
    }

    #[test]
    fn toml_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.toml");
        std::fs::write(&p, "node_id = 3\n[http]\naddr = \"127.0.0.1:0\"\n").unwrap();
        let c = Config::from_file(&p).unwrap();
        assert_eq!(c.node_id, 3);
        assert_eq!(c.http.addr, "127.0.0.1:0");
        std::fs::write(&p, "[http]\nadress = \"x\"\n").unwrap();
        let err = Config::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("adress"), "{err}");
    }
}
