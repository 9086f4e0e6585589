//! The `herald` command line: `node`, `up`, `publish`, `subscribe`, `status`, `health`, `token`.
//!
//! Every node flag has a `HERALD_*` environment variable and a TOML key; flags beat the
//! environment, which beats the file, which beats the defaults. This module also installs the
//! process-wide pieces a binary owns: the tracing subscriber and the Prometheus recorder.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, FsyncPolicy, LogFormat};
use crate::error::Result;
use crate::node::NodeBuilder;
// `herald up`'s flags belong to `up`, and the table formatter to `text`, both below this module;
// these are their public paths.
pub use crate::text::table;
pub use crate::up::UpArgs;

/// Herald: an actor-based distributed event processing runtime.
#[derive(Parser)]
#[command(name = "herald", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (serves the HTTP API; runs the handlers registered in this binary).
    Node(Box<NodeArgs>),
    /// Run a local cluster of N node processes of this binary; Ctrl-C stops them all.
    Up(UpArgs),
    /// Publish one JSON event.
    Publish(PublishArgs),
    /// Create or update a subscription.
    Subscribe(SubscribeArgs),
    /// Show members, leader, subscriptions and placements as tables.
    Status(ClientArgs),
    /// Exit 0 when the node answers ready (`/readyz`, or `/healthz` with --live): a container
    /// health check for images without a shell.
    Health(HealthArgs),
    /// A live view of the cluster in the terminal: members, and rates per node, topic and
    /// subscription, refreshed in place (Ctrl-C to quit).
    Top(TopArgs),
    /// Make the certificates of mutual TLS between nodes: a cluster CA, and node certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// API token tools.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect or repair a stopped node's store offline.
    #[command(subcommand)]
    Wal(WalCommand),
}

/// `herald wal …` (the node must be stopped: its store is locked while it runs).
#[derive(Subcommand)]
enum WalCommand {
    /// Count the WAL records and dead letters and list the damaged ones (checksum failed,
    /// undecodable); exits 1 if there are any, 2 if the store cannot be read.
    Check {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Move the damaged records to the quarantine tables (what a node does at start).
    Repair {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// `herald token …`.
#[derive(Subcommand)]
enum TokenCommand {
    /// Read a token from stdin and print its `sha256:<hex>` form, which a tokens file or
    /// `auth.tokens` may hold instead of the token (e.g. `admin sha256:… ops`).
    Hash,
}

/// `herald cert …`.
#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Make a cluster CA: writes ca.pem and ca.key (mode 0600) in --dir. Keep ca.key secret: it
    /// admits nodes to the cluster.
    Ca {
        /// Where to write ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// The cluster id the CA is for (nodes must run with the same --cluster-id).
        #[arg(long, default_value = "herald", env = "HERALD_CLUSTER_ID")]
        cluster: String,
        /// Validity in days.
        #[arg(long, default_value_t = crate::pki::CA_DAYS)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate signed by the CA in --ca-dir: writes node.pem, node.key (mode
    /// 0600) and a copy of ca.pem in --out. The certificate names the node id as
    /// `spiffe://<cluster>/node/<id>`, and the DNS names and IPs given (for HTTP TLS).
    Node {
        /// The directory with ca.pem and ca.key (`herald cert ca`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where to write node.pem, node.key and ca.pem.
        #[arg(long)]
        out: PathBuf,
        /// The node id.
        #[arg(
            long,
            required_unless_present = "id_from_hostname",
            conflicts_with = "id_from_hostname"
        )]
        id: Option<u64>,
        /// Take the node id from the host name's trailing ordinal + 1 (pod herald-0 is node 1), as
        /// `herald node --node-id-from-hostname` does.
        #[arg(long)]
        id_from_hostname: bool,
        /// A DNS name for the certificate; repeat for several. Default: this host's name and
        /// localhost.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// An IP address for the certificate; repeat for several. Default: 127.0.0.1.
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = crate::pki::NODE_DAYS)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Runs `herald cert …`, printing what it wrote.
fn cert(command: CertCommand) -> std::result::Result<(), String> {
    use crate::pki::{Ca, NodeCert};
    match command {
        CertCommand::Ca {
            dir,
            cluster,
            days,
            force,
        } => {
            let ca = Ca::generate_for(&cluster, days).map_err(|e| e.to_string())?;
            ca.save(&dir, force).map_err(|e| e.to_string())?;
            println!(
                "wrote {} and {} (CA of cluster {cluster:?}, valid {days} days); keep ca.key secret",
                dir.join(crate::pki::CA_CERT_FILE).display(),
                dir.join(crate::pki::CA_KEY_FILE).display()
            );
            Ok(())
        }
        CertCommand::Node {
            ca_dir,
            out,
            id,
            id_from_hostname: _,
            mut dns,
            mut ips,
            days,
            force,
        } => {
            let host = crate::config::hostname().ok();
            let id = match id {
                Some(id) => id,
                None => {
                    let host = host.clone().ok_or("cannot read this machine's host name")?;
                    crate::config::node_id_from_hostname(&host).ok_or_else(|| {
                        format!("host name {host:?} does not end in -<ordinal> (like herald-0); give --id instead")
                    })?
                }
            };
            if dns.is_empty() {
                dns.extend(host.filter(|h| !h.is_empty()));
                dns.push("localhost".into());
                dns.dedup();
            }
            if ips.is_empty() {
                ips.push(std::net::IpAddr::from([127, 0, 0, 1]));
            }
            let ca = Ca::load(&ca_dir).map_err(|e| e.to_string())?;
            let node = ca.issue_node(id, &dns, &ips, days).map_err(|e| e.to_string())?;
            node.save(&out, force).map_err(|e| e.to_string())?;
            let (ca_path, cert, key) = NodeCert::paths(&out);
            println!(
                "wrote {}, {} and {} for node {id} of cluster {:?} (valid {days} days)",
                cert.display(),
                key.display(),
                ca_path.display(),
                ca.cluster()
            );
            Ok(())
        }
    }
}

/// Flags of `herald node`. Each overrides the matching key of the `--config` file.
#[derive(Parser, Debug, Default)]
#[command(name = "herald-node")]
pub struct NodeArgs {
    /// TOML configuration file (keys as in the README's configuration reference).
    #[arg(long, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id, unique in the cluster [key: node_id, default 1].
    #[arg(long, env = "HERALD_NODE_ID")]
    pub node_id: Option<u64>,
    /// Take the node id from the host name's trailing ordinal + 1 (pod `herald-0` is node 1)
    /// [key: node_id_from_hostname].
    #[arg(long, env = "HERALD_NODE_ID_FROM_HOSTNAME", conflicts_with = "node_id")]
    pub node_id_from_hostname: bool,
    /// HTTP listen address, IP:port [key: http.addr, default 127.0.0.1:7070]. Without auth tokens
    /// only loopback is served.
    #[arg(long, env = "HERALD_HTTP")]
    pub http: Option<String>,
    /// Directory for the WAL, dead letters and subscriptions [key: data_dir, default ./herald-data].
    #[arg(long, env = "HERALD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format [key: log_format, default text]. Filter with RUST_LOG (e.g. RUST_LOG=herald=debug).
    #[arg(long, env = "HERALD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Worker threads for handler instances, 0 = one per core [key: handlers.workers].
    #[arg(long, env = "HERALD_WORKERS")]
    pub workers: Option<usize>,
    /// Events queued per handler instance before publishing answers 429 [key: handlers.mailbox_capacity, default 4096].
    #[arg(long, env = "HERALD_MAILBOX_CAPACITY")]
    pub mailbox_capacity: Option<usize>,
    /// Default attempts before an event is dead-lettered [key: handlers.max_attempts, default 5].
    #[arg(long, env = "HERALD_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// What a crash keeps: every acknowledged event (always), all but the last wal.flush_interval_ms (interval), or nothing since the start (never) [key: wal.fsync, default always].
    #[arg(long, env = "HERALD_WAL_FSYNC", value_enum)]
    pub wal_fsync: Option<FsyncPolicy>,
    /// Largest request body in bytes; larger gets 413 [key: http.max_body_bytes, default 1048576].
    #[arg(long, env = "HERALD_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Name of the cluster [key: cluster_id, default herald].
    #[arg(long, env = "HERALD_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Peer listen address, IP:port [key: cluster.peer, default: the HTTP IP with the HTTP port + 100].
    #[arg(long, env = "HERALD_PEER")]
    pub peer: Option<String>,
    /// HTTP address other nodes use, host:port [key: http.advertise, default: the bound HTTP
    /// address, with 0.0.0.0 replaced by the host of --advertise].
    #[arg(long, env = "HERALD_ADVERTISE_HTTP")]
    pub advertise_http: Option<String>,
    /// Peer address other nodes dial, host:port [key: cluster.advertise, default: the bound peer address].
    #[arg(long, env = "HERALD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Peer address of a member to join; repeat or comma-separate for several [key: cluster.join].
    /// Without it a new node starts its own cluster.
    #[arg(long, env = "HERALD_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Removed (replaced by mutual TLS): naming it fails with what to do instead.
    #[arg(long, env = "HERALD_CLUSTER_SECRET_FILE", hide = true)]
    pub cluster_secret_file: Option<PathBuf>,
    /// The cluster CA certificate(s), PEM, for mutual TLS between nodes [key: peer_tls.ca].
    #[arg(long, env = "HERALD_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
    /// This node's certificate, PEM, naming its node id (`herald cert node`) [key: peer_tls.cert].
    #[arg(long, env = "HERALD_PEER_CERT")]
    pub peer_cert: Option<PathBuf>,
    /// This node's private key, PEM [key: peer_tls.key].
    #[arg(long, env = "HERALD_PEER_KEY")]
    pub peer_key: Option<PathBuf>,
    /// Plaintext, unauthenticated peers, only on loopback (development) [key: peer_tls.insecure].
    #[arg(long, env = "HERALD_INSECURE_PEERS")]
    pub insecure_peers: bool,
    /// File of API bearer tokens, one `<scopes> <token> [name]` per line (scopes admin, publish,
    /// `publish:<topic pattern>`, read; the token plain or as `herald token hash` prints it)
    /// [key: auth.tokens_file]. With tokens the API may be served to other hosts.
    #[arg(long, env = "HERALD_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Serve the API to other hosts although no tokens are configured (e.g. inside a private
    /// container network whose ports are published on loopback only) [key: http.allow_unauthenticated_remote].
    #[arg(long, env = "HERALD_ALLOW_UNAUTHENTICATED_REMOTE")]
    pub allow_unauthenticated_remote: bool,
    /// PEM certificate chain: serve the API over https (needs --tls-key) [key: http.tls_cert].
    #[arg(long, env = "HERALD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [key: http.tls_key].
    #[arg(long, env = "HERALD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): API clients must present a certificate signed by it (mutual TLS)
    /// [key: http.tls_client_ca].
    #[arg(long, env = "HERALD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// `GET /metrics` needs a token with the `read` scope [key: http.metrics_auth, default false].
    #[arg(long, env = "HERALD_METRICS_AUTH")]
    pub metrics_auth: bool,
    /// Refuse publishes to topics without any subscription (404 no_subscription) instead of
    /// accepting and dropping them [key: http.require_subscription, default false].
    #[arg(long, env = "HERALD_REQUIRE_SUBSCRIPTION")]
    pub require_subscription: bool,
    /// Export traces to this OTLP/HTTP collector (`http://host:4318`; `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// is read when nothing else sets it) [key: telemetry.otlp_endpoint].
    #[arg(long, env = "HERALD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of publishes without a traceparent that start a trace, 0 to 1 [key: telemetry.sample_ratio, default 1].
    #[arg(long, env = "HERALD_TRACE_SAMPLE_RATIO")]
    pub trace_sample_ratio: Option<f64>,
}

impl NodeArgs {
    /// The configuration: defaults, then the file, then these flags/variables; validated.
    pub fn load(self) -> Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.node_id {
            c.node_id = v;
            c.node_id_from_hostname = false;
        }
        if let Some(v) = self.http {
            c.http.addr = v;
        }
        if let Some(v) = self.data_dir {
            c.data_dir = v;
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        if let Some(v) = self.workers {
            c.handlers.workers = v;
        }
        if let Some(v) = self.mailbox_capacity {
            c.handlers.mailbox_capacity = v;
        }
        if let Some(v) = self.max_attempts {
            c.handlers.max_attempts = v;
        }
        if let Some(v) = self.wal_fsync {
            c.wal.fsync = v;
        }
        if let Some(v) = self.max_body_bytes {
            c.http.max_body_bytes = v;
        }
        if let Some(v) = self.cluster_id {
            c.cluster_id = v;
        }
        if let Some(v) = self.peer {
            c.cluster.peer = v;
        }
        if let Some(v) = self.advertise {
            c.cluster.advertise = v;
        }
        if let Some(v) = self.advertise_http {
            c.http.advertise = v;
        }
        if !self.join.is_empty() {
            c.cluster.join = self.join;
        }
        if let Some(v) = self.cluster_secret_file {
            c.cluster.secret_file = Some(v);
        }
        if let Some(v) = self.peer_ca {
            c.peer_tls.ca = Some(v);
        }
        if let Some(v) = self.peer_cert {
            c.peer_tls.cert = Some(v);
        }
        if let Some(v) = self.peer_key {
            c.peer_tls.key = Some(v);
        }
        if self.insecure_peers {
            c.peer_tls.insecure = true;
        }
        if self.node_id_from_hostname {
            c.node_id_from_hostname = true;
        }
        if let Some(v) = self.tokens_file {
            c.auth.tokens_file = Some(v);
        }
        if self.allow_unauthenticated_remote {
            c.http.allow_unauthenticated_remote = true;
        }
        if let Some(v) = self.tls_cert {
            c.http.tls_cert = Some(v);
        }
        if let Some(v) = self.tls_key {
            c.http.tls_key = Some(v);
        }
        if let Some(v) = self.tls_client_ca {
            c.http.tls_client_ca = Some(v);
        }
        if self.metrics_auth {
            c.http.metrics_auth = true;
        }
        if self.require_subscription {
            c.http.require_subscription = true;
        }
        if let Some(v) = self.otlp_endpoint {
            c.telemetry.otlp_endpoint = Some(v);
        }
        if let Some(v) = self.trace_sample_ratio {
            c.telemetry.sample_ratio = v;
        }
        if c.telemetry.otlp_endpoint.is_none() {
            // The standard variable, below every Herald setting.
            c.telemetry.otlp_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                .ok()
                .filter(|v| !v.is_empty());
        }
        c.resolve().map_err(with_how_to_set)?;
        c.validate().map_err(with_how_to_set)?;
        Ok(c)
    }
}

/// One setting of `herald node`'s command line: its flag, its environment variable and the
/// config key its help names (`[key: …]`). Read from the flag definitions above, the one table.
struct Setting {
    key: String,
    flag: String,
    env: Option<String>,
}

/// Every [`Setting`] of `herald node`.
fn node_settings() -> Vec<Setting> {
    use clap::CommandFactory;
    let command = NodeArgs::command();
    command
        .get_arguments()
        .filter_map(|a| {
            let help = a.get_long_help().or(a.get_help())?.to_string();
            let (_, rest) = help.split_once("[key: ")?;
            let key: String = rest
                .chars()
                .take_while(|c| !matches!(c, ',' | ']') && !c.is_whitespace())
                .collect();
            Some(Setting {
                key,
                flag: format!("--{}", a.get_long()?),
                env: a.get_env().map(|e| e.to_string_lossy().into_owned()),
            })
        })
        .collect()
}

/// How to set config key `key` (`handlers.mailbox_capacity`, `cluster.join[0]`): its flag and
/// environment variable when it has them, else where it goes in the config file.
fn how_to_set(key: &str) -> String {
    let bare = key.split('[').next().unwrap_or(key);
    if let Some(s) = node_settings().into_iter().find(|s| s.key == bare) {
        return match s.env {
            Some(env) => format!("`{bare}`: {} or {env}, or the config file", s.flag),
            None => format!("`{bare}`: {}, or the config file", s.flag),
        };
    }
    match bare.split_once('.') {
        Some((section, name)) => {
            format!("`{bare}`: only in the config file (--config, HERALD_CONFIG), as `{name} = …` under `[{section}]`")
        }
        None => format!("`{bare}`: only in the config file (--config, HERALD_CONFIG), as `{bare} = …`"),
    }
}

/// Adds to a configuration error how to set the key it names, and the other settings its
/// message names that have a flag (`must not exceed handlers.mailbox_capacity`).
fn with_how_to_set(e: crate::error::Error) -> crate::error::Error {
    let crate::error::Error::Config { key, message } = e else {
        return e;
    };
    let mut how = vec![how_to_set(&key)];
    let settings = node_settings();
    for word in message.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')) {
        let word = word.trim_matches('.');
        if word != key && word.contains('.') && settings.iter().any(|s| s.key == word) {
            how.push(how_to_set(word));
        }
    }
    crate::error::Error::Config {
        message: format!("{message} (set {})", how.join("; ")),
        key,
    }
}

/// The environment variables this program reads: those of every command's flags, the one list.
fn known_env() -> std::collections::BTreeSet<String> {
    fn walk(c: &clap::Command, out: &mut std::collections::BTreeSet<String>) {
        for a in c.get_arguments() {
            if let Some(env) = a.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in c.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(&<Cli as clap::CommandFactory>::command(), &mut out);
    out
}

/// The `HERALD_`-prefixed names among `names` that this program does not read (misspelt ones).
fn unknown_env(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let known = known_env();
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with("HERALD_") && !known.contains(n))
        .collect();
    unknown.sort();
    unknown
}

/// Warns about `HERALD_*` environment variables no setting reads: a misspelt one would
/// otherwise be ignored without a word.
fn warn_unknown_env() {
    let unknown = unknown_env(std::env::vars_os().map(|(k, _)| k.to_string_lossy().into_owned()));
    if !unknown.is_empty() {
        let known: Vec<String> = known_env().into_iter().collect();
        tracing::warn!(
            unknown = %unknown.join(", "),
            known = %known.join(", "),
            "ignoring environment variables that no setting reads (misspelt?)"
        );
    }
}

/// A node's base URL from `--url`: `http://` or `https://` URLs as given, a bare `host:port` as
/// `http://host:port`; anything else is refused with what is expected.
fn node_url(s: &str) -> std::result::Result<String, String> {
    let s = s.trim();
    let url = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    match url::Url::parse(&url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty()) => Ok(url),
        Ok(u) if !matches!(u.scheme(), "http" | "https") => Err(format!(
            "{s:?} is not an http(s) URL; expected http://host:port or host:port"
        )),
        _ => Err(format!(
            "{s:?} is not a node address; expected http://host:port or host:port"
        )),
    }
}

/// Where a client command sends its request.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Base URL of any node (`http://host:port`, `https://host:port`, or just `host:port`).
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070", value_parser = node_url)]
    pub url: String,
    /// Bearer token (needed when the node has tokens configured).
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How https is trusted.
    #[command(flatten)]
    pub tls: ClientTls,
}

/// How a client command trusts an https node.
#[derive(Args, Debug, Default, Clone)]
pub struct ClientTls {
    /// PEM CA certificate to trust for https URLs (a private CA); without it, the public web
    /// roots are trusted.
    #[arg(long, env = "HERALD_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for a node that requires one (http.tls_client_ca); needs
    /// --client-key and --ca-file.
    #[arg(long, env = "HERALD_CLIENT_CERT", requires_all = ["client_key", "ca_file"])]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, env = "HERALD_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ClientTls {
    /// An HTTP client for the CLI's requests: with `--ca-file`, https trusts exactly that CA (ring
    /// provider); without, the web roots.
    pub fn client(&self, timeout: std::time::Duration) -> std::result::Result<awc::Client, String> {
        let builder = awc::Client::builder().timeout(timeout);
        let Some(ca) = &self.ca_file else {
            // HTTP/1.1 only, as with `--ca-file` (whose TLS config offers only http/1.1): h2 0.3
            // is under RUSTSEC-2026-0258 (see deny.toml).
            let connector = awc::Connector::new().max_http_version(awc::http::Version::HTTP_11);
            return Ok(builder.connector(connector).finish());
        };
        let identity = self.client_cert.as_deref().zip(self.client_key.as_deref());
        let config = crate::http::tls::client_config(ca, identity).map_err(|e| e.to_string())?;
        let connector = awc::Connector::new().rustls_0_23(std::sync::Arc::new(config));
        Ok(builder.connector(connector).finish())
    }

    /// A request error for people: an untrusted certificate says to pass `--ca-file`.
    pub fn explain(&self, url: &str, e: impl std::fmt::Display) -> String {
        let text = e.to_string();
        let lower = text.to_ascii_lowercase();
        if lower.contains("unknownissuer") || lower.contains("invalid peer certificate") {
            match &self.ca_file {
                None => format!(
                    "cannot reach {url}: the node's TLS certificate is not trusted ({text}); pass --ca-file with the CA that signed it (or set HERALD_CA_FILE)"
                ),
                Some(ca) => format!(
                    "cannot reach {url}: the node's TLS certificate is not signed by the CA of {} ({text})",
                    ca.display()
                ),
            }
        } else if lower.contains("certificaterequired") || lower.contains("certificate required") {
            format!("cannot reach {url}: the node requires a client certificate ({text}); pass --client-cert and --client-key")
        } else {
            format!("cannot reach {url}: {text}")
        }
    }
}

/// `herald health`.
#[derive(Args, Debug)]
struct HealthArgs {
    /// Base URL of the node (`http://host:port`, `https://host:port`, or just `host:port`).
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070", value_parser = node_url)]
    url: String,
    /// Check liveness (`/healthz`) rather than readiness (`/readyz`).
    #[arg(long)]
    live: bool,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    #[command(flatten)]
    tls: ClientTls,
}

/// `herald top`.
#[derive(Args, Debug)]
struct TopArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Seconds between refreshes (rates are computed over this interval).
    #[arg(long, default_value_t = 1.0, value_parser = top_interval)]
    interval: f64,
    /// Draw this many frames, then exit (for scripts; without it, runs until Ctrl-C).
    #[arg(long)]
    frames: Option<u64>,
}

/// `--interval`: between 0.1 and 3600 seconds.
fn top_interval(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not an interval; expected seconds between 0.1 and 3600, e.g. 2 or 0.5"
        )),
    }
}

/// `herald top`: see [`crate::top`].
async fn top(a: TopArgs) -> ClientResult {
    let interval = std::time::Duration::from_secs_f64(a.interval);
    let client = a.client.tls.client(interval.max(std::time::Duration::from_secs(2)))?;
    let source = crate::top::Source {
        url: a.client.url.clone(),
        token: a.client.token.clone(),
        client,
    };
    crate::top::run(source, interval, a.frames)
        .await
        .map_err(|e| a.client.tls.explain(&a.client.url, e))
}

/// `herald publish`.
#[derive(Args, Debug)]
struct PublishArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Topic to publish to.
    topic: String,
    /// The event's data, as JSON (e.g. '{"user_id":1}').
    json: String,
    /// Partition key: events with the same key are handled in order by one instance.
    #[arg(long)]
    key: Option<String>,
    /// Event id (idempotency key); generated when absent.
    #[arg(long)]
    id: Option<String>,
    /// none | accepted | processed.
    #[arg(long, default_value = "accepted")]
    ack: String,
    /// With --ack processed: how long to wait, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
}

/// `herald subscribe`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["handler", "webhook"])))]
struct SubscribeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Topic to subscribe to.
    topic: String,
    /// Group name (each group gets every event once).
    group: String,
    /// A Rust handler registered in the node binary, or `log` for the built-in log handler.
    #[arg(long)]
    handler: Option<String>,
    /// Deliver to this http URL as CloudEvents (the built-in webhook handler).
    #[arg(long)]
    webhook: Option<String>,
    /// Handler instances.
    #[arg(long, default_value_t = 1)]
    instances: u32,
    /// Attempts before dead-lettering (node default when absent).
    #[arg(long)]
    max_attempts: Option<u32>,
}

/// The entry points that own the process: they read the command line and the environment, install
/// the tracing subscriber and the Prometheus recorder, and wait for signals. They are methods of
/// [`NodeBuilder`] so that a user's `main` is one call, but they live here because the command line
/// is the top layer: `node` builds, starts and stops a node and must not depend on this module.
impl NodeBuilder {
    /// Reads `herald node` flags, `HERALD_*` variables and the `--config` file into the
    /// configuration (flags beat environment beats file beats defaults).
    pub fn from_env_and_args(mut self) -> Result<Self> {
        let args = NodeArgs::parse();
        self.config = args.load()?;
        Ok(self)
    }

    /// Runs the whole `herald` command line (`node`, `up`, `publish`, `subscribe`, `status`,
    /// `health`) with this builder's handlers: the one call a user's binary needs in `main`.
    pub fn main(self) -> std::process::ExitCode {
        main_with(self)
    }

    /// Runs the node until SIGINT or SIGTERM, then shuts down gracefully. It owns the process: it
    /// installs the tracing subscriber (`log_format`, `RUST_LOG`) and, unless a handle was given
    /// with [`NodeBuilder::metrics`], the Prometheus recorder. To embed a node in a process that
    /// already has its own, use [`NodeBuilder::start`].
    pub fn run(mut self) -> Result<()> {
        // The recorder before the trace exporter, which takes its counter of dropped spans when
        // it is installed (a handle taken earlier counts into no recorder).
        if self.metrics.is_none() {
            self.metrics = Some(crate::metrics::install_prometheus());
        }
        // Flushes the spans still queued when it drops, after the node has shut down.
        let _telemetry = init_logging_and_traces(&self.config);
        warn_unknown_env();
        actix_rt::System::new().block_on(async move {
            let node = self.start().await?;
            // Catch SIGTERM/SIGINT before announcing the address: a signal sent as soon as the
            // line appears must drain the node, not kill it with the default action.
            let signal = crate::node::shutdown_signal();
            // One machine-readable line on stdout, for scripts and tests that start nodes on port 0.
            let scheme = if node.core().config().http.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            println!(
                "herald node {} listening on {scheme}://{}",
                node.core().config().node_id,
                node.http_addr()
            );
            signal.await;
            tracing::info!("shutdown signal received; draining");
            node.shutdown().await;
            Ok(())
        })
    }
}

/// Installs the tracing subscriber: readable text or JSON lines, filtered by `RUST_LOG`
/// (default `info`). Safe to call twice (the second call does nothing).
pub fn init_logging(format: LogFormat) {
    let _ = install_subscriber(format, None);
}

/// [`init_logging`], plus the OTLP trace exporter when `telemetry.otlp_endpoint` is set (see
/// `telemetry`). The returned handle exports what is still queued when it drops. A node process
/// calls this once; an embedded node gets neither (the application's subscriber gets its spans).
pub fn init_logging_and_traces(config: &Config) -> Option<crate::telemetry::Telemetry> {
    install_subscriber(config.log_format, Some(config))
}

/// The log layer of the process's subscriber: text or JSON on stderr, filtered by `RUST_LOG`
/// (default `info`), never showing the trace spans (nor their fields on log lines).
type LogLayer = tracing_subscriber::filter::Filtered<
    Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>,
    tracing_subscriber::filter::EnvFilter,
    tracing_subscriber::Registry,
>;

/// The registry with the log layer: what the trace layer is stacked on.
type LogStack = tracing_subscriber::layer::Layered<LogLayer, tracing_subscriber::Registry>;

/// The process's subscriber, not installed: the log, then the trace layer `otel` (OpenTelemetry)
/// when given, filtered to the trace target.
///
/// Without one, the trace layer's filter wants nothing, so no layer wants the trace target and
/// the event path makes no span ([`crate::telemetry::enabled`] is false). An absent layer
/// (`Option::None`) alone would want every span, and the log's per-layer filter would not stop
/// the registry from making (and dropping) a span per published event.
fn subscriber<L>(format: LogFormat, otel: Option<L>) -> impl tracing::Subscriber + Send + Sync
where
    L: tracing_subscriber::Layer<LogStack> + Send + Sync + 'static,
{
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(
            format!("{}=off", crate::telemetry::TARGET)
                .parse()
                .expect("a valid directive"),
        );
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt: LogLayer = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    }
    .with_filter(filter);
    let wanted = match otel {
        Some(_) => Targets::new().with_target(crate::telemetry::TARGET, tracing::Level::INFO),
        None => Targets::new(),
    };
    tracing_subscriber::registry().with(fmt).with(otel.with_filter(wanted))
}

fn install_subscriber(format: LogFormat, traces: Option<&Config>) -> Option<crate::telemetry::Telemetry> {
    use tracing_subscriber::util::SubscriberInitExt;
    let mut problem = None;
    let (otel, handle) = match traces.filter(|c| c.telemetry.otlp_endpoint.is_some()) {
        Some(c) => match crate::telemetry::install::<LogStack>(&c.telemetry, c.node_id, &c.cluster_id) {
            Ok((layer, handle)) => (Some(layer), Some(handle)),
            Err(e) => {
                problem = Some(e);
                (None, None)
            }
        },
        None => (None, None),
    };
    if subscriber(format, otel).try_init().is_err() {
        // A subscriber was installed before: it keeps the process, and no exporter runs.
        return None;
    }
    if let Some(h) = &handle {
        h.activate();
    }
    if let Some(e) = problem {
        tracing::error!(error = %e, "traces are not exported");
    } else if let (Some(c), Some(_)) = (traces, &handle) {
        tracing::info!(
            endpoint = c.telemetry.otlp_endpoint.as_deref().unwrap_or_default(),
            sample_ratio = c.telemetry.sample_ratio,
            "exporting traces over OTLP/HTTP"
        );
    }
    handle
}

/// `herald wal check|repair`: prints the inspection; 1 if check found undecodable records.
fn wal_tool(dir: &std::path::Path, repair: bool) -> ExitCode {
    match crate::ingress::store::inspect(dir, repair) {
        Ok(found) => {
            println!("{found}");
            let clean = found.bad_wal.is_empty() && found.bad_dead_letters.is_empty();
            ExitCode::from(if clean || found.repaired { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("herald wal: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs the CLI with `builder`'s handlers (see [`NodeBuilder::main`]).
pub fn main_with(builder: NodeBuilder) -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Node(args) => args.load().and_then(|config| builder.config(config).run()),
        Command::Up(a) => {
            return match crate::up::run(a) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald up: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Publish(a) => return client_main(publish(a)),
        Command::Subscribe(a) => return client_main(subscribe(a)),
        Command::Status(a) => return client_main(status(a)),
        Command::Health(a) => return client_main(health(a)),
        Command::Top(a) => return client_main(top(a)),
        Command::Cert(c) => {
            return match cert(c) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald cert: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Token(TokenCommand::Hash) => return token_hash(),
        Command::Wal(WalCommand::Check { data_dir }) => return wal_tool(&data_dir, false),
        Command::Wal(WalCommand::Repair { data_dir }) => return wal_tool(&data_dir, true),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::from(2)
        }
    }
}

/// A client command's error: already a message for the user.
type ClientResult = std::result::Result<(), String>;

fn client_main(fut: impl std::future::Future<Output = ClientResult>) -> ExitCode {
    match actix_rt::System::new().block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `herald token hash`: the first line of stdin (without its line end) → `sha256:<hex>`.
fn token_hash() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("herald: cannot read the token from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let token = line.trim_end_matches(['\n', '\r']);
    if token.len() < 8 || token.trim() != token {
        eprintln!("herald: give the token on stdin (at least 8 characters, no surrounding spaces), e.g. `printf %s \"$TOKEN\" | herald token hash`");
        return ExitCode::FAILURE;
    }
    println!("{}", crate::config::hash_token(token));
    ExitCode::SUCCESS
}

/// Sends a request and returns the JSON body of a 2xx answer, or the API's error message.
async fn request(
    client: &ClientArgs,
    method: awc::http::Method,
    path: &str,
    body: Option<(String, &str)>,
) -> std::result::Result<serde_json::Value, String> {
    let url = format!("{}{}", client.url.trim_end_matches('/'), path);
    let http = client.tls.client(std::time::Duration::from_secs(310))?;
    let mut req = http.request(method, &url);
    if let Some(t) = &client.token {
        req = req.bearer_auth(t);
    }
    let sent = match body {
        Some((b, content_type)) => req.insert_header(("content-type", content_type)).send_body(b).await,
        None => req.send().await,
    };
    let mut resp = sent.map_err(|e| client.tls.explain(&url, e))?;
    let bytes = resp
        .body()
        .limit(64 * 1024 * 1024)
        .await
        .map_err(|e| format!("reading the answer of {url}: {e}"))?;
    let value: serde_json::Value = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    if resp.status().is_success() {
        Ok(value)
    } else {
        let message = value["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        let code = value["error"]["code"].as_str().unwrap_or("error");
        Err(format!("{} {code}: {message}", resp.status().as_u16()))
    }
}

async fn health(a: HealthArgs) -> ClientResult {
    let path = if a.live { "/healthz" } else { "/readyz" };
    let url = format!("{}{path}", a.url.trim_end_matches('/'));
    let http = a.tls.client(std::time::Duration::from_millis(a.timeout_ms))?;
    let mut resp = http.get(&url).send().await.map_err(|e| a.tls.explain(&url, e))?;
    let body = resp.body().await.unwrap_or_default();
    let body = String::from_utf8_lossy(&body);
    if resp.status().is_success() {
        println!("{} {}", resp.status().as_u16(), body.trim());
        Ok(())
    } else {
        Err(format!("{url} answered {}: {}", resp.status().as_u16(), body.trim()))
    }
}

async fn publish(a: PublishArgs) -> ClientResult {
    serde_json::from_str::<serde_json::Value>(&a.json).map_err(|e| format!("the event data is not valid JSON: {e}"))?;
    let mut path = format!("/v1/topics/{}/events?ack={}", a.topic, a.ack);
    if let Some(t) = a.timeout_ms {
        path.push_str(&format!("&timeout_ms={t}"));
    }
    let url = format!("{}{}", a.client.url.trim_end_matches('/'), path);
    let http = a.client.tls.client(std::time::Duration::from_secs(310))?;
    let mut req = http.post(&url).insert_header(("content-type", "application/json"));
    if let Some(t) = &a.client.token {
        req = req.bearer_auth(t);
    }
    if let Some(k) = &a.key {
        req = req.insert_header(("x-herald-key", k.as_str()));
    }
    if let Some(id) = &a.id {
        req = req.insert_header(("idempotency-key", id.as_str()));
    }
    let mut resp = req.send_body(a.json).await.map_err(|e| a.client.tls.explain(&url, e))?;
    let body = resp.body().await.map_err(|e| format!("reading the answer: {e}"))?;
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if resp.status().is_success() {
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        Ok(())
    } else {
        Err(format!(
            "{} {}: {}",
            resp.status().as_u16(),
            value["error"]["code"].as_str().unwrap_or("error"),
            value["error"]["message"].as_str().unwrap_or("")
        ))
    }
}

async fn subscribe(a: SubscribeArgs) -> ClientResult {
    let handler = match (&a.handler, &a.webhook) {
        (Some(name), _) if name == "log" => serde_json::json!({ "kind": "log" }),
        (Some(name), _) => serde_json::json!({ "kind": "rust", "name": name }),
        (None, Some(url)) => serde_json::json!({ "kind": "webhook", "url": url }),
        (None, None) => return Err("give --handler NAME or --webhook URL".into()),
    };
    let mut spec = serde_json::json!({
        "topic": a.topic, "group": a.group, "handler": handler, "instances": a.instances,
    });
    if let Some(m) = a.max_attempts {
        spec["max_attempts"] = m.into();
    }
    let answer = request(
        &a.client,
        awc::http::Method::POST,
        "/v1/subscriptions",
        Some((spec.to_string(), "application/json")),
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&answer).unwrap_or_default());
    Ok(())
}

async fn status(c: ClientArgs) -> ClientResult {
    use awc::http::Method;
    let cluster = request(&c, Method::GET, "/v1/cluster", None).await?;
    let subs = request(&c, Method::GET, "/v1/subscriptions", None).await?;
    let placements = request(&c, Method::GET, "/v1/cluster/placements", None).await?;
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    // A JSON array as `a,b,c`.
    let join = |v: &serde_json::Value| v.as_array().into_iter().flatten().map(s).collect::<Vec<_>>().join(",");
    println!(
        "cluster {}  node {}  leader {}  term {}  epoch {}  ready {}\n",
        s(&cluster["cluster_id"]),
        s(&cluster["node_id"]),
        s(&cluster["leader"]),
        s(&cluster["term"]),
        s(&cluster["epoch"]),
        s(&cluster["ready"])
    );
    // Where the membership table and the Raft group disagree (normal for a moment while a node
    // joins or leaves; a fault if it lasts).
    for problem in cluster["problems"].as_array().into_iter().flatten() {
        println!("problem: {}", s(problem));
    }
    let members: Vec<Vec<String>> = cluster["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let handlers = join(&m["handlers"]);
            vec![
                s(&m["id"]),
                s(&m["status"]),
                s(&m["http"]),
                s(&m["peer"]),
                m["phi"]
                    .as_f64()
                    .map(|phi| format!("{phi:.2}"))
                    .unwrap_or_else(|| s(&m["phi"])),
                handlers,
            ]
        })
        .collect();
    println!(
        "{}\n",
        table(&["ID", "STATUS", "HTTP", "PEER", "PHI", "HANDLERS"], &members)
    );
    let subs: Vec<Vec<String>> = subs
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            let h = &x["handler"];
            let handler = match h["kind"].as_str() {
                Some("rust") => format!("rust:{}", s(&h["name"])),
                Some("webhook") => format!("webhook {}", s(&h["url"])),
                _ => s(&h["kind"]),
            };
            vec![
                s(&x["topic"]),
                s(&x["group"]),
                handler,
                s(&x["instances"]),
                s(&x["max_attempts"]),
            ]
        })
        .collect();
    println!(
        "{}\n",
        table(&["TOPIC", "GROUP", "HANDLER", "INSTANCES", "MAX_ATTEMPTS"], &subs)
    );
    let places: Vec<Vec<String>> = placements
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let nodes = join(&p["nodes"]);
            vec![s(&p["topic"]), s(&p["group"]), s(&p["epoch"]), nodes]
        })
        .collect();
    println!("{}", table(&["TOPIC", "GROUP", "EPOCH", "NODES"], &places));
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Without an exporter the node's own subscriber wants no trace span, so the event path makes
    /// none (it once made a `publish` span per event, sampled at the default ratio of 1, that no
    /// layer recorded: an absent trace layer wanted every span); with one, it wants them.
    #[test]
    fn without_an_exporter_the_process_subscriber_wants_no_trace_span() {
        use super::{subscriber, LogFormat};
        use tracing_subscriber::layer::Identity;
        for format in [LogFormat::Text, LogFormat::Json] {
            let none = subscriber::<Identity>(format, None);
            tracing::subscriber::with_default(none, || {
                assert!(
                    !crate::telemetry::enabled(),
                    "no exporter: the trace target is not wanted"
                );
                assert!(
                    !crate::telemetry::Sampler::new(1.0).start(),
                    "no exporter: no trace starts"
                );
                assert!(tracing::enabled!(tracing::Level::INFO), "the log still wants info");
            });
            let some = subscriber(format, Some(Identity::new()));
            tracing::subscriber::with_default(some, || {
                assert!(crate::telemetry::enabled(), "an exporter: the trace target is wanted");
                assert!(crate::telemetry::Sampler::new(1.0).start());
            });
        }
    }

    #[test]
    fn url_accepts_a_bare_host_and_port_and_says_what_it_expects() {
        assert_eq!(super::node_url("127.0.0.1:24270").unwrap(), "http://127.0.0.1:24270");
        assert_eq!(super::node_url("http://h:7070/").unwrap(), "http://h:7070/");
        assert_eq!(super::node_url("https://h").unwrap(), "https://h");
        for bad in ["ftp://h:21", "", "http://"] {
            let e = super::node_url(bad).unwrap_err();
            assert!(e.contains("expected http://host:port or host:port"), "{bad:?}: {e}");
        }
    }

    use super::*;

    #[test]
    fn unknown_herald_variables_are_found_among_the_ones_every_command_reads() {
        let names = [
            "HERALD_NODE_ID",
            "HERALD_NODEID",
            "PATH",
            "HERALD_URL",
            "HERALD_MAILBOX_CAPACITY",
            "HERALD_X",
        ];
        assert_eq!(
            unknown_env(names.map(String::from)),
            vec!["HERALD_NODEID".to_string(), "HERALD_X".to_string()]
        );
        // Every node flag's variable, and the client commands' too.
        let known = known_env();
        for v in [
            "HERALD_CONFIG",
            "HERALD_PEER_KEY",
            "HERALD_URL",
            "HERALD_TOKEN",
            "HERALD_CA_FILE",
        ] {
            assert!(known.contains(v), "{v} missing from {known:?}");
        }
    }

    #[test]
    fn a_config_error_says_how_to_set_the_keys_it_names() {
        // http.max_batch_events (1000 by default) has no flag; handlers.mailbox_capacity has one.
        let args = NodeArgs {
            mailbox_capacity: Some(10),
            ..NodeArgs::default()
        };
        let e = args.load().unwrap_err().to_string();
        assert!(e.contains("`http.max_batch_events`: only in the config file"), "{e}");
        assert!(e.contains("`max_batch_events = …` under `[http]`"), "{e}");
        assert!(
            e.contains("`handlers.mailbox_capacity`: --mailbox-capacity or HERALD_MAILBOX_CAPACITY"),
            "{e}"
        );
        // A key with a flag: named with it.
        let args = NodeArgs {
            max_attempts: Some(0),
            ..NodeArgs::default()
        };
        let e = args.load().unwrap_err().to_string();
        assert!(e.contains("--max-attempts or HERALD_MAX_ATTEMPTS"), "{e}");
        // Every [key: …] of the flags is a real key: parsing the help found each flag's key.
        for s in node_settings() {
            assert!(!s.key.is_empty() && !s.key.contains(' '), "{}: {:?}", s.flag, s.key);
        }
        assert!(node_settings().iter().any(|s| s.key == "handlers.mailbox_capacity"));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.toml");
        std::fs::write(
            &p,
            "node_id = 4\n[http]\naddr = \"127.0.0.1:9000\"\n[handlers]\nmailbox_capacity = 2000\n",
        )
        .unwrap();
        let args = NodeArgs {
            config: Some(p),
            http: Some("127.0.0.1:9100".into()),
            ..Default::default()
        };
        let c = args.load().unwrap();
        assert_eq!(c.node_id, 4, "file beats default");
        assert_eq!(c.http.addr, "127.0.0.1:9100", "flag beats file");
        assert_eq!(c.handlers.mailbox_capacity, 2000);
    }

    #[test]
    fn require_subscription_reaches_the_config() {
        assert!(!NodeArgs::default().load().unwrap().http.require_subscription);
        let args = NodeArgs {
            require_subscription: true,
            ..Default::default()
        };
        assert!(args.load().unwrap().http.require_subscription);
    }

    #[test]
    fn tls_flags_reach_the_config() {
        let args = NodeArgs {
            tls_cert: Some("node.pem".into()),
            tls_key: Some("node.key".into()),
            tls_client_ca: Some("ca.pem".into()),
            metrics_auth: true,
            ..Default::default()
        };
        let c = args.load().unwrap();
        assert_eq!(c.http.tls_cert.as_deref(), Some(std::path::Path::new("node.pem")));
        assert_eq!(c.http.tls_key.as_deref(), Some(std::path::Path::new("node.key")));
        assert_eq!(c.http.tls_client_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        assert!(c.http.metrics_auth);
        let e = NodeArgs {
            tls_cert: Some("node.pem".into()),
            ..Default::default()
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(e.contains("http.tls_key"), "{e}");
    }

    #[test]
    fn untrusted_certificates_say_to_pass_a_ca_file() {
        let e = "Connect error: invalid peer certificate: UnknownIssuer";
        let m = ClientTls::default().explain("https://h:1", e);
        assert!(m.contains("pass --ca-file") && m.contains("HERALD_CA_FILE"), "{m}");
        let with_ca = ClientTls {
            ca_file: Some("ca.pem".into()),
            ..Default::default()
        };
        assert!(with_ca
            .explain("https://h:1", e)
            .contains("not signed by the CA of ca.pem"));
        assert_eq!(
            ClientTls::default().explain("http://h:1", "refused"),
            "cannot reach http://h:1: refused"
        );
    }

    #[test]
    fn cli_help_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
