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
    /// The Raft group that replicates membership.
    pub raft: RaftConfig,
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
    /// File holding the cluster secret (`--cluster-secret-file`). Without a secret only loopback
    /// peers are accepted.
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
            degraded_after_ms: 3000,
            redeliver_after_ms: 5000,
            dedup_window: 100_000,
            join_approval: JoinApproval::Auto,
        }
    }
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
    /// Ticks between leader heartbeats.
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
            heartbeat_ticks: 2,
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
    /// Serve non-loopback clients even though no tokens are configured. Without it, a node with no
    /// tokens binds loopback only.
    pub allow_unauthenticated_remote: bool,
    /// The HTTP address other nodes use to reach this one, host:port (`--advertise-http`,
    /// `HERALD_ADVERTISE_HTTP`). Empty: the bound address, where an unspecified IP (`0.0.0.0`,
    /// `::`) is replaced by the host of `cluster.advertise`.
    pub advertise: String,
}

/// Write-ahead log settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalConfig {
    /// `always`: fsync every group commit before acknowledging (`ack=accepted` survives power loss);
    /// `never`: leave flushing to the OS (survives a process crash, not a power loss).
    pub fsync: FsyncPolicy,
    /// Most operations written in one group commit.
    pub max_batch: usize,
}

/// When the WAL is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every group commit.
    #[default]
    Always,
    /// Never explicitly.
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
    /// First restart/retry delay after a failure; doubles per consecutive failure.
    pub backoff_initial_ms: u64,
    /// Cap of the restart/retry delay.
    pub backoff_max_ms: u64,
    /// A handler call that takes longer fails and its instance is restarted.
    pub call_timeout_ms: u64,
    /// Timeout of one webhook POST.
    pub webhook_timeout_ms: u64,
}

/// Authentication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted bearer tokens. None configured: no auth, loopback only.
    pub tokens: Vec<TokenConfig>,
    /// A file of more tokens, one `<role> <token>` per line, `#` comments (`--tokens-file`,
    /// `HERALD_TOKENS_FILE`): keeps secrets out of the config file (a Kubernetes Secret, say).
    pub tokens_file: Option<PathBuf>,
}

/// One bearer token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The secret presented as `Authorization: Bearer <token>`.
    pub token: String,
    /// `publish` (publish events) or `admin` (everything).
    pub role: Role,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Publish events.
    Publish,
    /// Publish, and manage subscriptions, dead letters and the cluster.
    Admin,
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
            raft: RaftConfig::default(),
            subscriptions: Vec::new(),
        }
    }
}

/// This machine's host name: `$HOSTNAME` (set in containers and pods), else the kernel's.
fn hostname() -> Result<String> {
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

/// Parses a tokens file: one `<role> <token>` per line; blank lines and `#` comments are skipped.
pub fn parse_tokens(text: &str) -> std::result::Result<Vec<TokenConfig>, String> {
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(role), Some(token), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("line {}: expected `<role> <token>`", n + 1));
        };
        let role = match role {
            "admin" => Role::Admin,
            "publish" => Role::Publish,
            other => return Err(format!("line {}: unknown role {other:?} (admin or publish)", n + 1)),
        };
        tokens.push(TokenConfig {
            token: token.to_string(),
            role,
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
            allow_unauthenticated_remote: false,
            advertise: String::new(),
        }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            fsync: FsyncPolicy::Always,
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
            backoff_initial_ms: 50,
            backoff_max_ms: 5_000,
            call_timeout_ms: 30_000,
            webhook_timeout_ms: 10_000,
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

    /// Checks every setting; the error names the key to fix.
    pub fn validate(&self) -> Result<()> {
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
        let positive: [(&str, u64); 8] = [
            ("http.max_body_bytes", self.http.max_body_bytes as u64),
            ("http.max_batch_events", self.http.max_batch_events as u64),
            ("wal.max_batch", self.wal.max_batch as u64),
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
            if t.token.len() < 8 {
                return Err(Error::config(
                    format!("auth.tokens[{i}].token"),
                    "must be at least 8 characters",
                ));
            }
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
        let t = parse_tokens("# ops\nadmin  s3cret-admin\n\npublish s3cret-pub\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].role, t[0].token.as_str()), (Role::Admin, "s3cret-admin"));
        assert_eq!((t[1].role, t[1].token.as_str()), (Role::Publish, "s3cret-pub"));
        assert!(parse_tokens("root x").unwrap_err().contains("line 1: unknown role"));
        assert!(parse_tokens("admin\n")
            .unwrap_err()
            .contains("expected `<role> <token>`"));

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
        c.auth.tokens.push(TokenConfig {
            token: "short".into(),
            role: Role::Admin,
        });
        assert!(c.validate().unwrap_err().to_string().contains("auth.tokens[0].token"));
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
