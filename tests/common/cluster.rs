//! Clusters of real `herald node` processes on 127.0.0.1 for the process tests, on
//! `herald::harness`: each node gets its own data dir and ports (HTTP on port 0, a free peer
//! port), logs to a file (the logs' ends are printed when the test fails), and is killed by pid
//! when the cluster is dropped. What is here is the tests' side: panics instead of errors, the
//! tests' environment, and the polling helpers (`converge`, `view`, `call`).

use std::process::ExitStatus;
use std::time::{Duration, Instant};

pub use herald::harness::Node;
use herald::harness::{Harness, NodeSpec, Ports};
use serde_json::Value;

use super::DEADLINE;

const BIN: &str = env!("CARGO_BIN_EXE_herald");

/// How long a cluster may take to converge after a change.
pub const CONVERGE: Duration = Duration::from_secs(30);

/// Lines of each node's log printed when a test fails.
const LOG_LINES: usize = 60;

/// The `herald node` processes of one test. Reads as the slice of its nodes (`nodes[0]`,
/// `nodes.iter()`, `for n in &nodes`); prints every node's log tail if the test panics.
pub struct Cluster {
    h: Harness,
}

impl Cluster {
    /// No nodes yet, in a temporary directory; the nodes log at `info`, and only their flags
    /// count (no settings inherited from the environment).
    pub fn new() -> Cluster {
        Cluster::with_env(&[])
    }

    /// [`Cluster::new`] with `env` set for every node (`HERALD_OTLP_ENDPOINT`, …).
    pub fn with_env(env: &[(&str, &str)]) -> Cluster {
        let mut h = Harness::temporary(BIN, "herald-test")
            .expect("harness directory")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        for var in [
            "HERALD_CONFIG",
            "HERALD_CLUSTER_ID",
            "HERALD_JOIN",
            "HERALD_ADVERTISE",
            "HERALD_CLUSTER_SECRET_FILE",
            "HERALD_TOKEN",
            "HERALD_LOG_FORMAT",
            "HERALD_OTLP_ENDPOINT",
            "HERALD_TRACE_SAMPLE_RATIO",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            h = h.env_remove(var);
        }
        for (k, v) in env {
            h = h.env(k, v);
        }
        Cluster { h }
    }

    /// Starts node `id` on peer address `peer` with `--join` for every address in `join` (none:
    /// a new cluster), without waiting for it.
    pub fn start(&mut self, id: u64, join: &[String], peer: String) {
        let spec = NodeSpec {
            id,
            http: "127.0.0.1:0".into(),
            peer,
            join: join.to_vec(),
            args: Vec::new(),
        };
        self.h.start(spec).unwrap_or_else(|e| panic!("start node {id}: {e}"));
    }

    /// Starts node `id` joining `join` on a free peer port and waits until every node is ready.
    pub async fn add(&mut self, id: u64, join: &[String]) {
        let (_, peer) = Ports::Free.of(id).unwrap_or_else(|e| panic!("ports of node {id}: {e}"));
        self.start(id, join, peer);
        self.ready().await;
    }

    /// Waits until every running node is ready (`/readyz`): a member that knows its leader and
    /// replayed its WAL.
    pub async fn ready(&mut self) {
        if let Err(e) = self.h.wait_ready(DEADLINE).await {
            panic!("{e}");
        }
    }

    /// SIGKILL node `id`: no chance to flush or drain.
    pub fn kill9(&mut self, id: u64) {
        self.h.kill(id).unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGTERM node `id`, then its exit status within [`DEADLINE`], polled without blocking the
    /// test's runtime (publishers keep running meanwhile).
    pub async fn terminate(&mut self, id: u64) -> ExitStatus {
        self.h.stop(id, DEADLINE).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts node `id` again on its data dir and ports (it must have been stopped).
    pub fn restart(&mut self, id: u64) {
        self.h.restart(id).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Sends `kill -<sig>` to node `id`.
    pub fn signal(&self, id: u64, sig: &str) {
        self.h.signal(id, sig).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl std::ops::Deref for Cluster {
    type Target = [Node];

    fn deref(&self) -> &[Node] {
        self.h.nodes()
    }
}

impl<'a> IntoIterator for &'a Cluster {
    type Item = &'a Node;
    type IntoIter = std::slice::Iter<'a, Node>;

    fn into_iter(self) -> Self::IntoIter {
        self.h.nodes().iter()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.h.print_logs(LOG_LINES);
        }
    }
}

/// Starts node 1 as a new cluster and nodes 2..=n joining it, one after the other (each once the
/// one before is ready, so they join in id order: the first three are the voters).
pub async fn start_cluster(n: u64) -> Cluster {
    start_cluster_with(n, &[]).await
}

/// [`start_cluster`] with `env` set for every node.
pub async fn start_cluster_with(n: u64, env: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster::with_env(env);
    let mut seed = Vec::new();
    for id in 1..=n {
        let (_, peer) = Ports::Free.of(id).unwrap_or_else(|e| panic!("ports of node {id}: {e}"));
        c.start(id, &seed, peer.clone());
        c.ready().await;
        if seed.is_empty() {
            seed.push(peer);
        }
    }
    c
}

/// The HTTP URLs of `nodes`.
pub fn urls<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<String> {
    nodes.into_iter().map(|n| n.url().to_string()).collect()
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
    let (status, _, bytes) = super::send(client, method, url, headers, body).await?;
    Ok((status, super::json_or_text(&bytes)))
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
