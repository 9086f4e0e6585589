//! Clusters of real `herald node` processes on 127.0.0.1 for the process tests: each node gets
//! its own temporary data dir and free ports, logs to a file (printed when the test fails), and
//! is killed by pid when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{listening_on, wait_ready, Proc, DEADLINE};

const BIN: &str = env!("CARGO_BIN_EXE_herald");

/// How long a cluster may take to converge after a change.
pub const CONVERGE: Duration = Duration::from_secs(30);

/// A port that was free a moment ago (the listener is dropped at once, so start the node right
/// after asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// One `herald node` of a test cluster. Its log goes to a file, printed if the test fails.
pub struct Node {
    pub id: u64,
    pub proc: Proc,
    /// Holds the data dir (`data`) and the log (`node.log`); removed when the node is dropped.
    _dir: tempfile::TempDir,
    /// `127.0.0.1:PORT` of the peer listener (what others `--join`).
    pub peer: String,
    /// The `herald node` arguments, to start it again on the same data dir and ports.
    pub args: Vec<String>,
}

impl Node {
    /// Starts node `id`, joining the node whose peer address is `join` (none: a new cluster). With
    /// `fixed_http` the HTTP port is chosen here rather than by the node, so that a restart can
    /// reuse it (the peer port always is).
    pub fn start(id: u64, join: Option<&str>, fixed_http: bool) -> Node {
        let join: Vec<String> = join.map(String::from).into_iter().collect();
        Node::start_with(id, &join, format!("127.0.0.1:{}", free_port()), fixed_http)
    }

    /// Starts node `id` on peer address `peer` with `--join` for every address in `join` (as a
    /// compose file or StatefulSet does: the same list on every node, its first entry starting
    /// the cluster).
    pub fn start_with(id: u64, join: &[String], peer: String, fixed_http: bool) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args: Vec<String> = vec!["--node-id".into(), id.to_string()];
        let data = dir.path().join("data");
        args.extend(["--data-dir".into(), data.to_str().expect("utf-8 path").into()]);
        let http_port = if fixed_http { free_port() } else { 0 };
        args.extend(["--http".into(), format!("127.0.0.1:{http_port}")]);
        for seed in join {
            args.extend(["--join".into(), seed.clone()]);
        }
        args.extend(["--peer".into(), peer.clone()]);
        let proc = spawn(&args);
        Node {
            id,
            proc,
            _dir: dir,
            peer,
            args,
        }
    }

    pub fn url(&self) -> &str {
        &self.proc.url
    }

    /// `host:port` of the HTTP API, as the membership table records it.
    pub fn http(&self) -> &str {
        self.proc.url.trim_start_matches("http://")
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_log(&self.args);
        }
    }
}

/// Starts node 1 as a new cluster and nodes 2..=n joining it, one after the other (so they join in
/// id order).
pub fn start_cluster(n: u64, fixed_http: bool) -> Vec<Node> {
    let first = Node::start(1, None, fixed_http);
    let seed = first.peer.clone();
    let mut nodes = vec![first];
    for id in 2..=n {
        nodes.push(Node::start(id, Some(&seed), fixed_http));
    }
    nodes
}

/// The HTTP URLs of `nodes`.
pub fn urls<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<String> {
    nodes.into_iter().map(|n| n.url().to_string()).collect()
}

/// Where `herald node <args>` logs: `node.log` next to its data dir.
pub fn log_path(args: &[String]) -> PathBuf {
    let data = args
        .iter()
        .skip_while(|a| *a != "--data-dir")
        .nth(1)
        .expect("--data-dir");
    Path::new(data).with_file_name("node.log")
}

/// Prints the end of the log of `herald node <args>` to stderr.
pub fn print_log(args: &[String]) {
    let path = log_path(args);
    let log = std::fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    eprintln!("--- last lines of {} ({args:?}) ---", path.display());
    for line in &lines[lines.len().saturating_sub(60)..] {
        eprintln!("{line}");
    }
}

/// Starts `herald node <args>` (logging at `info` to [`log_path`]) and waits until it is ready: a
/// member that knows its leader and replayed its WAL. A node that never gets ready is killed.
pub fn spawn(args: &[String]) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(args))
        .expect("node log file");
    let mut cmd = Command::new(BIN);
    // Only the flags count: no settings inherited from the environment.
    for var in [
        "HERALD_CONFIG",
        "HERALD_CLUSTER_ID",
        "HERALD_JOIN",
        "HERALD_ADVERTISE",
        "HERALD_CLUSTER_SECRET_FILE",
        "HERALD_TOKEN",
        "HERALD_LOG_FORMAT",
    ] {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .arg("node")
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn herald");
    let url = listening_on(&mut child).recv_timeout(DEADLINE);
    let proc = Proc {
        child,
        url: url.clone().unwrap_or_default(),
    };
    // On a panic the node is killed when `proc` is dropped.
    if url.is_err() {
        print_log(args);
        panic!("herald node {args:?} did not report its address within {DEADLINE:?}");
    }
    if let Err(panic) = std::panic::catch_unwind(|| wait_ready(&proc.url)) {
        print_log(args);
        std::panic::resume_unwind(panic);
    }
    proc
}

/// An HTTP client with `timeout` for calls to nodes that may be down.
pub fn http(timeout: Duration) -> awc::Client {
    awc::Client::builder().timeout(timeout).finish()
}

/// One request: status and JSON body (or the body as a string), or why it got no answer
/// (connection refused, reset, timeout).
pub async fn call(
    client: &awc::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Result<(u16, Value), String> {
    let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = client.request(method, url);
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let mut r = req.send_body(body).await.map_err(|e| format!("{url}: {e}"))?;
    let bytes = r
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| format!("{url}: reading the body: {e}"))?;
    let body =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((r.status().as_u16(), body))
}

/// GET `url{path}`: the body if it answered 200.
pub async fn view(client: &awc::Client, url: &str, path: &str) -> Option<Value> {
    match call(client, "GET", &format!("{url}{path}"), &[], String::new()).await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// Polls `path` on every node in `urls` until `check` accepts their answers (in `urls` order; a
/// node that does not answer 200 fails the round), failing after [`CONVERGE`] with the last answers.
pub async fn converge<T>(what: &str, urls: &[String], path: &str, check: impl Fn(&[Value]) -> Option<T>) -> T {
    let client = http(Duration::from_secs(2));
    let start = Instant::now();
    loop {
        let mut answers = Vec::with_capacity(urls.len());
        for url in urls {
            answers.push(view(&client, url, path).await.unwrap_or(Value::Null));
        }
        if !answers.iter().any(Value::is_null) {
            if let Some(v) = check(&answers) {
                return v;
            }
        }
        assert!(
            start.elapsed() < CONVERGE,
            "timed out after {CONVERGE:?} waiting for: {what}\nlast answers of {urls:?} to {path} (null: no answer):\n{}",
            serde_json::to_string_pretty(&answers).unwrap_or_default()
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `kill -<sig> <pid>` to a process this test started.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed: {status:?}");
}

/// SIGTERM, then the exit status within [`DEADLINE`], polled without blocking the test's runtime
/// (the publishers keep running meanwhile).
pub async fn terminate(proc: &mut Proc) -> ExitStatus {
    let pid = proc.child.id();
    signal(pid, "TERM");
    let start = Instant::now();
    loop {
        if let Some(status) = proc.child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > DEADLINE {
            proc.kill9();
            panic!("herald (pid {pid}) did not stop within {DEADLINE:?} of SIGTERM");
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}
