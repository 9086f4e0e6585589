//! Local clusters of `herald node` processes: the one harness that starts, waits for, kills,
//! stops and restarts node processes on this machine.
//!
//! Used by `herald up` (`up`), by the `herald-bench` scenarios that start nodes, and by the
//! process tests (`tests/common/cluster.rs`); not part of the API (hence `#[doc(hidden)]`).
//!
//! A [`Harness`] owns a directory and the processes it started: each node gets a data dir
//! (`node-<id>/`) and a log file (`node-<id>.log`) taking its stdout and stderr there, its own
//! HTTP and peer ports (fixed, or free ones), a `--join` list, and the extra arguments and
//! environment of the harness. It signals only the processes it started, by their pid, and
//! SIGKILLs every one still running when it is dropped (also on error and panic). It waits by
//! polling with a deadline, never by sleeping for a guessed time.
//!
//! **Certificates.** Nodes talk mutual TLS by default: the harness keeps a throwaway CA in
//! `<dir>/tls/` (made on first use, reused when the directory is used again, as `herald up` does)
//! and issues each node a certificate in `<dir>/tls/node-<id>/` before starting it, passing
//! `--peer-ca`, `--peer-cert` and `--peer-key`. [`Harness::insecure_peers`] runs plaintext peers
//! instead (for comparisons). This is the one use of the crate the harness makes (`pki`).
//!
//! It does not parse argv, install signal handlers or print anything but its progress lines
//! (when asked to): those belong to its callers.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often a waiting harness looks at its nodes again.
const POLL: Duration = Duration::from_millis(50);
/// How long one HTTP probe of a node may take (loopback: far less, unless the node is stuck).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often [`Harness::wait_ready`] reports progress, when it reports at all.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The line a node prints on stdout once it listens (`cli`'s `NodeBuilder::run`), which gives
/// the HTTP address of a node started on port 0.
const LISTENING: &str = "listening on http://";

/// What went wrong with a harness's node processes.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A file or directory operation failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "open", …).
        what: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The program could not be started (or signalled, or waited for).
    #[error("cannot {what} node {id}: {source}")]
    Process {
        /// What was being done ("start", "kill", …).
        what: &'static str,
        /// The node.
        id: u64,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A node exited while it was expected to run.
    #[error("node {id} exited ({status}); see {}\n{tail}", log.display())]
    Exited {
        /// The node.
        id: u64,
        /// Its exit status.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// Some nodes were not ready in time.
    #[error("nodes {waiting:?} not ready after {within:?}; see their logs in {}", dir.display())]
    NotReady {
        /// The nodes still not ready.
        waiting: Vec<u64>,
        /// How long the harness waited.
        within: Duration,
        /// The harness's directory (the logs).
        dir: PathBuf,
    },
    /// A node did not exit within its deadline after SIGTERM (it was SIGKILLed then).
    #[error("node {id} did not stop within {within:?} of SIGTERM; killed it")]
    StopTimeout {
        /// The node.
        id: u64,
        /// The deadline it missed.
        within: Duration,
    },
    /// The id names no node of this harness, or one already started.
    #[error("node {id} {problem}")]
    Node {
        /// The node.
        id: u64,
        /// "is not one of the started nodes", "is already running", …
        problem: &'static str,
    },
    /// Not enough free ports were found.
    #[error("cannot find {0} free ports on 127.0.0.1 between 20000 and 32000")]
    NoFreePorts(usize),
    /// No running node answered `GET /v1/cluster` with a leader.
    #[error("no running node knows a leader{0}")]
    NoLeader(String),
    /// The cluster's certificates could not be made or read.
    #[error("certificates: {0}")]
    Pki(#[from] crate::pki::PkiError),
}

/// For callers whose errors are messages (`herald up`, `herald-bench`).
impl From<HarnessError> for String {
    fn from(e: HarnessError) -> String {
        e.to_string()
    }
}

/// Short for results of the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// The ports of the nodes of [`Harness::start_cluster`].
#[derive(Debug, Clone)]
pub enum Ports {
    /// The node picks its HTTP port (port 0; the harness reads it from the node's output and
    /// keeps it for restarts); the peer port is a free one found here.
    Free,
    /// Node i listens on HTTP port `base + i - 1` and peer port `base + 100 + i - 1`.
    Base(u16),
    /// (HTTP, peer) port of node 1, 2, … in order.
    Fixed(Vec<(u16, u16)>),
}

impl Ports {
    /// The HTTP and peer addresses of node `id` (1-based): `(IP:port, IP:port)`.
    pub fn of(&self, id: u64) -> Result<(String, String)> {
        let (http, peer) = match self {
            Ports::Free => (0, free_ports(1)?[0]),
            Ports::Base(base) => {
                let off = id.checked_sub(1).and_then(|o| u16::try_from(o).ok());
                let http = off.and_then(|o| base.checked_add(o));
                let peer = off.and_then(|o| base.checked_add(100)?.checked_add(o));
                match (http, peer) {
                    (Some(h), Some(p)) => (h, p),
                    _ => {
                        return Err(HarnessError::Node {
                            id,
                            problem: "has no port below 65536 at this base port",
                        })
                    }
                }
            }
            Ports::Fixed(list) => *id
                .checked_sub(1)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| list.get(i))
                .ok_or(HarnessError::Node {
                    id,
                    problem: "has no ports in the fixed list",
                })?,
        };
        Ok((format!("127.0.0.1:{http}"), format!("127.0.0.1:{peer}")))
    }
}

/// The leader as one node sees it ([`Harness::leader`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leader {
    /// The leader's node id.
    pub id: u64,
    /// The Raft term it leads.
    pub term: u64,
    /// The node that answered.
    pub by: u64,
}

/// How to start one node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// `--node-id`.
    pub id: u64,
    /// `--http`, IP:port; port 0 lets the node choose (the harness learns the port).
    pub http: String,
    /// `--peer`, IP:port (what other nodes `--join`).
    pub peer: String,
    /// One `--join` per entry (none: the node founds a new cluster).
    pub join: Vec<String>,
    /// More arguments of `node`, after the harness's own extra arguments.
    pub args: Vec<String>,
}

/// One node of a harness: its addresses, files and (while it runs) its process.
#[derive(Debug)]
pub struct Node {
    spec: NodeSpec,
    /// The HTTP address it listens on; `None` while a node started on port 0 has not said.
    http: Option<String>,
    /// `http://` and [`Node::http`].
    url: String,
    data: PathBuf,
    log: PathBuf,
    /// Where this start's output begins in the log (the log is appended to on restart).
    log_start: u64,
    /// `None` once the harness reaped it (killed, stopped, or found exited).
    child: Option<Child>,
    ready: bool,
}

impl Node {
    /// The node id.
    pub fn id(&self) -> u64 {
        self.spec.id
    }

    /// `IP:port` of its HTTP API (empty until a node started on port 0 announced it).
    pub fn http(&self) -> &str {
        self.http.as_deref().unwrap_or("")
    }

    /// `http://IP:port` of its HTTP API (empty until a node started on port 0 announced it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Learns the HTTP address of a node started on port 0 from its output.
    fn learn_address(&mut self) {
        if self.http.is_none() {
            self.http = self.announced();
            if let Some(http) = &self.http {
                self.url = format!("http://{http}");
            }
        }
    }

    /// `IP:port` of its peer listener.
    pub fn peer(&self) -> &str {
        &self.spec.peer
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Its log file (stdout and stderr).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it was started and not yet killed, stopped or found exited.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The last `lines` lines of its log, under a header naming the node and the file.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let mut out = format!("--- node {} ({}), last lines:\n", self.id(), self.log.display());
        for l in &all[all.len().saturating_sub(lines)..] {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs or after it was reaped.
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = match self.child.as_mut()?.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return None,
            // Not ours to wait for any more (already reaped elsewhere): count it as gone.
            Err(_) => ExitStatus::default(),
        };
        self.child = None;
        Some(status)
    }

    fn exit_error(&self, status: ExitStatus) -> HarnessError {
        HarnessError::Exited {
            id: self.id(),
            status,
            log: self.log.clone(),
            tail: self.log_tail(TAIL_LINES),
        }
    }

    /// The HTTP address this start of the node printed, if it has.
    fn announced(&self) -> Option<String> {
        let mut f = File::open(&self.log).ok()?;
        f.seek(SeekFrom::Start(self.log_start)).ok()?;
        let mut text = String::new();
        f.read_to_string(&mut text).ok()?;
        text.lines()
            .find_map(|l| l.split(LISTENING).nth(1))
            .map(|a| a.trim().to_string())
    }
}

/// Lines of a node's log that an [`HarnessError::Exited`] carries.
const TAIL_LINES: usize = 30;

/// The node processes of one local cluster and their directory. See the module docs.
#[derive(Debug)]
pub struct Harness {
    launch: Launch,
    dir: PathBuf,
    /// Remove `dir` when dropped (a directory the harness made for itself).
    remove_dir: bool,
    progress: bool,
    nodes: Vec<Node>,
}

/// How every node of a harness is run: the program, and the extra arguments and environment.
#[derive(Debug)]
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, Option<String>)>,
    /// Where the CA and the node certificates live; `None`: insecure peers.
    tls: Option<PathBuf>,
}

impl Harness {
    /// A harness running `program node …` with its nodes' data and logs in `dir` (created if
    /// missing, kept when the harness is dropped).
    pub fn new(program: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> Result<Harness> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| HarnessError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(Harness {
            launch: Launch {
                program: program.into(),
                args: Vec::new(),
                env: Vec::new(),
                tls: Some(dir.join("tls")),
            },
            dir,
            remove_dir: false,
            progress: false,
            nodes: Vec::new(),
        })
    }

    /// A harness in a new directory `<tmp>/<name>-<pid>-<n>` that is removed when the harness is
    /// dropped (unless [`Harness::keep_dir`]).
    pub fn temporary(program: impl Into<PathBuf>, name: &str) -> Result<Harness> {
        use std::sync::atomic::{AtomicU64, Ordering};
        // Several harnesses of one process (parallel tests) each get their own directory.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{name}-{}-{n}", std::process::id()));
        // A directory of an earlier process with this pid holds nothing of ours.
        let _ = std::fs::remove_dir_all(&dir);
        let mut h = Harness::new(program, dir)?;
        h.remove_dir = true;
        Ok(h)
    }

    /// Keeps (`true`) or removes the directory of a [`Harness::temporary`] when dropped.
    pub fn keep_dir(mut self, keep: bool) -> Harness {
        self.remove_dir = !keep;
        self
    }

    /// Adds arguments every node gets after the harness's own.
    pub fn args<I, S>(mut self, args: I) -> Harness
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.launch.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable of every node.
    pub fn env(mut self, key: &str, value: &str) -> Harness {
        self.launch.env.push((key.into(), Some(value.into())));
        self
    }

    /// Removes an inherited environment variable from every node.
    pub fn env_remove(mut self, key: &str) -> Harness {
        self.launch.env.push((key.into(), None));
        self
    }

    /// Runs the nodes with plaintext, unauthenticated peers (`--insecure-peers`, loopback only)
    /// instead of mutual TLS.
    pub fn insecure_peers(mut self) -> Harness {
        self.launch.tls = None;
        self.launch.args.push("--insecure-peers".into());
        self
    }

    /// Prints progress lines to stderr while waiting (`herald up`, the benchmarks).
    pub fn progress(mut self, on: bool) -> Harness {
        self.progress = on;
        self
    }

    /// The directory of the nodes' data dirs and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every node started so far, in the order started (also those since killed or stopped).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The ids of [`Harness::nodes`].
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(Node::id).collect()
    }

    /// Node `id`.
    pub fn node(&self, id: u64) -> Result<&Node> {
        self.nodes.iter().find(|n| n.id() == id).ok_or_else(|| unknown(id))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut Node> {
        self.nodes.iter_mut().find(|n| n.id() == id).ok_or_else(|| unknown(id))
    }

    /// Starts nodes 1..=n: node 1 founds the cluster, the others join it, in id order. Does not
    /// wait for them ([`Harness::wait_ready`]).
    pub fn start_cluster(&mut self, n: u64, ports: &Ports) -> Result<()> {
        let mut seed = None;
        for id in 1..=n {
            let (http, peer) = ports.of(id)?;
            let join: Vec<String> = seed.iter().cloned().collect();
            seed.get_or_insert_with(|| peer.clone());
            self.start(NodeSpec {
                id,
                http,
                peer,
                join,
                args: Vec::new(),
            })?;
        }
        Ok(())
    }

    /// Starts one node; its log starts empty. Does not wait for it ([`Harness::wait_ready`]).
    pub fn start(&mut self, spec: NodeSpec) -> Result<&Node> {
        if self.nodes.iter().any(|n| n.id() == spec.id) {
            return Err(HarnessError::Node {
                id: spec.id,
                problem: "was started already (restart it instead)",
            });
        }
        let id = spec.id;
        let log = self.dir.join(format!("node-{id}.log"));
        // Truncated: a log of an earlier run in the same directory is not this run's.
        File::create(&log).map_err(|source| HarnessError::Io {
            what: "create",
            path: log.clone(),
            source,
        })?;
        let known = !spec.http.ends_with(":0");
        let mut node = Node {
            http: known.then(|| spec.http.clone()),
            url: if known {
                format!("http://{}", spec.http)
            } else {
                String::new()
            },
            spec,
            data: self.dir.join(format!("node-{id}")),
            log,
            log_start: 0,
            child: None,
            ready: false,
        };
        self.launch.spawn(&mut node)?;
        self.nodes.push(node);
        Ok(&self.nodes[self.nodes.len() - 1])
    }

    /// Starts node `id` again, on the same data dir, ports and arguments, its output appended
    /// to its log; it must not be running. Does not wait for it ([`Harness::wait_ready`]).
    pub fn restart(&mut self, id: u64) -> Result<()> {
        // Not `node_mut`: `launch` is borrowed next to the node.
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id() == id)
            .ok_or_else(|| unknown(id))?;
        if node.running() {
            return Err(HarnessError::Node {
                id,
                problem: "is still running (kill or stop it first)",
            });
        }
        self.launch.spawn(node)
    }

    /// Waits until every running node answers `GET /readyz` with 200 (a member that knows its
    /// leader and replayed its WAL), polling within `within`. Fails at once, with the node's log
    /// tail, when a node exits.
    pub async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let client = awc::Client::builder().timeout(PROBE_TIMEOUT).finish();
        let started = Instant::now();
        let mut last_report = Instant::now();
        loop {
            for n in self.nodes.iter_mut().filter(|n| n.running() && !n.ready) {
                if let Some(status) = n.exited() {
                    return Err(n.exit_error(status));
                }
                n.learn_address();
                let Some(http) = &n.http else { continue };
                n.ready = client
                    .get(format!("http://{http}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if n.ready && self.progress {
                    eprintln!("node {} ready ({:.1} s)", n.id(), started.elapsed().as_secs_f64());
                }
            }
            let waiting: Vec<u64> = self
                .nodes
                .iter()
                .filter(|n| n.running() && !n.ready)
                .map(Node::id)
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if started.elapsed() > within {
                return Err(HarnessError::NotReady {
                    waiting,
                    within,
                    dir: self.dir.clone(),
                });
            }
            if self.progress && last_report.elapsed() > PROGRESS_EVERY {
                last_report = Instant::now();
                let running = self.nodes.iter().filter(|n| n.running()).count();
                eprintln!("waiting for {} of {running} nodes…", waiting.len());
            }
            actix_rt::time::sleep(POLL).await;
        }
    }

    /// Resolves when a running node exits on its own (for a caller that keeps a cluster up).
    pub async fn exited(&mut self) -> HarnessError {
        loop {
            for n in &mut self.nodes {
                if let Some(status) = n.exited() {
                    return n.exit_error(status);
                }
            }
            actix_rt::time::sleep(POLL).await;
        }
    }

    /// SIGKILL node `id` (no chance to flush or drain) and reap it.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let n = self.node_mut(id)?;
        let Some(mut child) = n.child.take() else {
            return Err(HarnessError::Node {
                id,
                problem: "is not running",
            });
        };
        // `Child::kill` signals the pid of the process this harness spawned, nothing else.
        child.kill().map_err(|source| HarnessError::Process {
            what: "kill",
            id,
            source,
        })?;
        child.wait().map_err(|source| HarnessError::Process {
            what: "wait for",
            id,
            source,
        })?;
        Ok(())
    }

    /// Sends `sig` (`"STOP"`, `"CONT"`, `"TERM"`, …) to node `id`'s process.
    pub fn signal(&self, id: u64, sig: &str) -> Result<()> {
        let pid = self.node(id)?.pid().ok_or(HarnessError::Node {
            id,
            problem: "is not running",
        })?;
        send_signal(pid, sig).map_err(|source| HarnessError::Process {
            what: "signal",
            id,
            source,
        })
    }

    /// SIGTERM node `id` and wait (polling) for it to exit within `within`; past that it is
    /// SIGKILLed and the answer is [`HarnessError::StopTimeout`].
    pub async fn stop(&mut self, id: u64, within: Duration) -> Result<ExitStatus> {
        self.signal(id, "TERM")?;
        let started = Instant::now();
        loop {
            let n = self.node_mut(id)?;
            if let Some(status) = n.exited() {
                return Ok(status);
            }
            if started.elapsed() > within {
                self.kill(id)?;
                return Err(HarnessError::StopTimeout { id, within });
            }
            actix_rt::time::sleep(POLL).await;
        }
    }

    /// SIGTERM every running node, wait for them, and SIGKILL whoever is left after `grace`,
    /// saying so on stderr.
    pub async fn stop_all(&mut self, grace: Duration) {
        let running: Vec<u64> = self.nodes.iter().filter(|n| n.running()).map(Node::id).collect();
        for &id in &running {
            let _ = self.signal(id, "TERM");
        }
        let started = Instant::now();
        while self.nodes.iter_mut().any(|n| n.running() && n.exited().is_none()) {
            if started.elapsed() > grace {
                for id in running {
                    if self.node(id).is_ok_and(Node::running) {
                        eprintln!("node {id} did not stop in time; killing it");
                        let _ = self.kill(id);
                    }
                }
                return;
            }
            actix_rt::time::sleep(POLL).await;
        }
    }

    /// The leader and its term, as the first running node that answers `GET /v1/cluster` with
    /// a leader sees them.
    pub async fn leader(&self) -> Result<Leader> {
        let client = awc::Client::builder().timeout(PROBE_TIMEOUT).finish();
        let mut why = String::new();
        for n in self.nodes.iter().filter(|n| n.running() && n.http.is_some()) {
            let url = format!("{}/v1/cluster", n.url);
            let answer = match client.get(&url).send().await {
                Ok(mut r) => r
                    .json::<serde_json::Value>()
                    .limit(16 << 20)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(view) => match view["leader"].as_u64() {
                    Some(id) => {
                        return Ok(Leader {
                            id,
                            term: view["term"].as_u64().unwrap_or(0),
                            by: n.id(),
                        })
                    }
                    None => why.push_str(&format!("\n  {url}: no leader")),
                },
                Err(e) => why.push_str(&format!("\n  {url}: {e}")),
            }
        }
        Err(HarnessError::NoLeader(why))
    }

    /// The last `lines` lines of every node's log (see [`Node::log_tail`]).
    pub fn log_tails(&self, lines: usize) -> String {
        self.nodes.iter().map(|n| n.log_tail(lines)).collect()
    }

    /// Prints [`Harness::log_tails`] to stderr.
    pub fn print_logs(&self, lines: usize) {
        eprint!("{}", self.log_tails(lines));
    }
}

impl Launch {
    /// Runs `program node …` for `node`, appending its stdout and stderr to its log.
    fn spawn(&self, node: &mut Node) -> Result<()> {
        let id = node.id();
        let io_err = |what, source| HarnessError::Io {
            what,
            path: node.log.clone(),
            source,
        };
        let out = File::options()
            .append(true)
            .open(&node.log)
            .map_err(|e| io_err("open", e))?;
        let start = out.metadata().map_err(|e| io_err("read", e))?.len();
        let err = out.try_clone().map_err(|e| io_err("open", e))?;
        // A restart reuses the port the node chose the first time, so its URL stays the same.
        let http = node.http.clone().unwrap_or_else(|| node.spec.http.clone());
        let mut cmd = Command::new(&self.program);
        cmd.args([
            "node",
            "--node-id",
            &id.to_string(),
            "--http",
            &http,
            "--peer",
            &node.spec.peer,
        ])
        .arg("--data-dir")
        .arg(&node.data);
        for seed in &node.spec.join {
            cmd.args(["--join", seed]);
        }
        if let Some(dir) = &self.tls {
            let (ca, cert, key) = node_certificate(dir, id)?;
            cmd.arg("--peer-ca")
                .arg(ca)
                .arg("--peer-cert")
                .arg(cert)
                .arg("--peer-key")
                .arg(key);
        }
        cmd.args(&self.args).args(&node.spec.args);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| HarnessError::Process {
                what: "start",
                id,
                source,
            })?;
        node.child = Some(child);
        node.log_start = start;
        node.ready = false;
        Ok(())
    }
}

/// The CA in `dir` (made when missing) and node `id`'s certificate in `dir/node-<id>` (issued
/// when missing): the paths of the CA certificate, the node certificate and its key.
fn node_certificate(dir: &Path, id: u64) -> Result<(PathBuf, PathBuf, PathBuf)> {
    use crate::pki::{Ca, NodeCert, CA_CERT_FILE, NODE_DAYS};
    let ca = if dir.join(CA_CERT_FILE).exists() {
        Ca::load(dir)?
    } else {
        let ca = Ca::generate("herald")?;
        ca.save(dir, false)?;
        ca
    };
    let node_dir = dir.join(format!("node-{id}"));
    let paths = NodeCert::paths(&node_dir);
    if !paths.1.exists() {
        let localhost = [std::net::IpAddr::from([127, 0, 0, 1])];
        ca.issue_node(id, &["localhost".into()], &localhost, NODE_DAYS)?
            .save(&node_dir, true)?;
    }
    Ok(paths)
}

impl Drop for Harness {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn unknown(id: u64) -> HarnessError {
    HarnessError::Node {
        id,
        problem: "is not one of the started nodes",
    }
}

/// `kill -<sig> <pid>`.
fn send_signal(pid: u32, sig: &str) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("kill -{sig} {pid}: {status}")))
    }
}

/// `n` distinct free TCP ports on 127.0.0.1, below the ephemeral range (probed together, then
/// released: start the process that binds them right after).
///
/// A port is handed out once per process: a cluster started just before may not have bound the
/// ports it was given yet, and a second probe would find them free (seen in `bench nats`, whose
/// NATS servers got ports of a Herald cluster starting next to them, and failed to bind).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    // Below the kernel's ephemeral range (32768 and up by default): the ports that outgoing
    // connections take are drawn from there, so one of them could take a port between this probe
    // and the server's bind. Probing binds each port and keeps it until all are found.
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    if given.len() + n > usize::from(SPAN / 2) {
        // Long since bound (or abandoned): the range is reused rather than exhausted.
        given.clear();
    }
    let mut held = Vec::with_capacity(n);
    let first = rand::random_range(0..SPAN);
    for offset in 0..SPAN {
        if held.len() == n {
            break;
        }
        let port = LOW + (first + offset) % SPAN;
        if given.contains(&port) {
            continue;
        }
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    let ports: Vec<u16> = held
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
        .collect();
    if ports.len() < n {
        return Err(HarnessError::NoFreePorts(n));
    }
    given.extend(&ports);
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_ports_put_peers_100_above() {
        let p = Ports::Base(7070);
        assert_eq!(p.of(1).unwrap(), ("127.0.0.1:7070".into(), "127.0.0.1:7170".into()));
        assert_eq!(p.of(3).unwrap(), ("127.0.0.1:7072".into(), "127.0.0.1:7172".into()));
        assert!(Ports::Base(65_500).of(1).is_err(), "no peer port above 65535");
        assert!(p.of(0).is_err(), "ids start at 1");
        let f = Ports::Fixed(vec![(1, 2)]);
        assert_eq!(f.of(1).unwrap(), ("127.0.0.1:1".into(), "127.0.0.1:2".into()));
        assert!(f.of(2).is_err());
    }

    #[test]
    fn a_port_is_handed_out_once_even_after_its_probe_released_it() {
        // 60 windows of 20 ports from random starts in a range of 12,000 overlap with near
        // certainty (about 6 overlapping pairs expected) unless handed-out ports are skipped.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..60 {
            for p in free_ports(20).unwrap() {
                assert!(seen.insert(p), "port {p} handed out twice");
            }
        }
    }

    #[test]
    fn free_ports_are_distinct() {
        let p = free_ports(4).unwrap();
        let mut q = p.clone();
        q.sort_unstable();
        q.dedup();
        assert_eq!(q.len(), 4, "{p:?}");
    }
}
