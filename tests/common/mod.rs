//! Shared helpers for the integration tests: in-process nodes, real `herald` processes, a webhook
//! receiver, HTTP calls, metric parsing and polling with deadlines (never sleep-and-hope).

#![allow(dead_code)]

pub mod cluster;
pub mod history;
pub mod load;
pub mod rng;
pub mod views;

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use herald::node::{NodeBuilder, RunningNode};
use serde_json::Value;

pub use history::{Arrival, History};

/// How long any condition may take to become true before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A node started in this process on a free port with its own data directory.
pub struct TestNode {
    pub node: RunningNode,
    pub url: String,
    pub dir: tempfile::TempDir,
}

/// Starts `builder` on 127.0.0.1:0 with a fresh data dir and the Prometheus recorder installed.
pub async fn start_node(builder: NodeBuilder) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    start_node_in(builder, dir).await
}

/// Starts `builder` with `dir` as its data dir (to restart a node on the same WAL).
pub async fn start_node_in(mut builder: NodeBuilder, dir: tempfile::TempDir) -> TestNode {
    let c = builder.config_mut();
    c.http.addr = "127.0.0.1:0".into();
    c.data_dir = dir.path().to_path_buf();
    if !c.peer_tls.insecure && c.peer_tls.ca.is_none() {
        peer_tls(c, &dir.path().join("peer-tls"));
    }
    let node = builder
        .metrics(herald::metrics::install_prometheus())
        .start()
        .await
        .expect("node starts");
    let url = format!("http://{}", node.http_addr());
    let t = TestNode { node, url, dir };
    let url = t.url.clone();
    eventually("node ready", || {
        let url = url.clone();
        async move { (get(&format!("{url}/readyz")).await.0 == 200).then_some(()) }
    })
    .await;
    t
}

/// The test process's CA of `cluster`, made on first use.
pub fn test_ca(cluster: &str) -> Arc<herald::pki::Ca> {
    static CAS: std::sync::OnceLock<Mutex<std::collections::HashMap<String, Arc<herald::pki::Ca>>>> =
        std::sync::OnceLock::new();
    let mut cas = CAS.get_or_init(Default::default).lock().expect("lock");
    cas.entry(cluster.to_string())
        .or_insert_with(|| Arc::new(herald::pki::Ca::generate(cluster).expect("a test CA")))
        .clone()
}

/// Certificate material for node `id` of `cluster` from the test CA: an authenticated peer, for
/// tests that play a node by hand.
pub fn node_tls(cluster: &str, id: u64) -> Arc<herald::transport::PeerTls> {
    let n = test_ca(cluster)
        .issue_node(id, &[], &[], 1)
        .expect("a node certificate");
    Arc::new(herald::transport::PeerTls::from_pem(&n.ca_pem, &n.cert_pem, &n.key_pem, cluster, id).expect("usable"))
}

/// Gives `c` mutual TLS between nodes: a certificate for its node id from the test CA of its
/// cluster, written to `dir`.
pub fn peer_tls(c: &mut herald::config::Config, dir: &std::path::Path) {
    let localhost = ["127.0.0.1".parse().expect("ip")];
    test_ca(&c.cluster_id)
        .issue_node(c.node_id, &["localhost".into()], &localhost, 1)
        .expect("a node certificate")
        .save(dir, true)
        .expect("write the node certificate");
    let (ca, cert, key) = herald::pki::NodeCert::paths(dir);
    c.peer_tls.ca = Some(ca);
    c.peer_tls.cert = Some(cert);
    c.peer_tls.key = Some(key);
}

/// Starts `builders` as one cluster (node ids 1..=n, the first one the seed) and waits until every
/// node sees every member up and a leader.
pub async fn cluster(builders: Vec<NodeBuilder>) -> Vec<TestNode> {
    let mut nodes: Vec<TestNode> = Vec::new();
    let n = builders.len();
    for (i, mut b) in builders.into_iter().enumerate() {
        let c = b.config_mut();
        c.node_id = i as u64 + 1;
        if let Some(first) = nodes.first() {
            c.cluster.join = vec![first.node.core().membership().peer_addr().to_string()];
        }
        nodes.push(start_node(b).await);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let ids: Vec<u64> = (1..=n as u64).collect();
    views::wait_formed(&urls, &ids).await;
    nodes
}

/// Polls `f` every 20 ms until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(what, DEADLINE, f).await
}

/// Like [`eventually`] with a deadline of the caller's choosing (for long end-to-end waits).
pub async fn within<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

fn client() -> awc::Client {
    awc::Client::builder().timeout(Duration::from_secs(30)).finish()
}

/// An HTTP answer: status, JSON body (or `Value::String` of a non-JSON body), headers.
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub headers: awc::http::header::HeaderMap,
}

/// A body as JSON, or as `Value::String` when it is not JSON.
pub fn json_or_text(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// One request with `client`: status, headers and raw body, or why there was no answer
/// (connection refused or reset, timeout). The one HTTP client call of the tests.
pub async fn send(
    client: &awc::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<web::Bytes>,
) -> Result<(u16, awc::http::header::HeaderMap, web::Bytes), String> {
    let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = client.request(method, url);
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let mut r = req.send_body(body.into()).await.map_err(|e| format!("{url}: {e}"))?;
    let bytes = r
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| format!("{url}: reading the body: {e}"))?;
    Ok((r.status().as_u16(), r.headers().clone(), bytes))
}

/// GET; returns status and body.
pub async fn get(url: &str) -> (u16, Value) {
    let a = request("GET", url, &[], "").await;
    (a.status, a.body)
}

/// GET the raw text of a URL (e.g. `/metrics`).
pub async fn get_text(url: &str) -> String {
    let (_, _, bytes) = send(&client(), "GET", url, &[], "")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A request with any method, headers and body, which must get an answer.
pub async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<web::Bytes>) -> Answer {
    let (status, headers, bytes) = send(&client(), method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {e}"));
    Answer {
        status,
        body: json_or_text(&bytes),
        headers,
    }
}

/// POST a JSON body.
pub async fn post_json(url: &str, body: &Value) -> Answer {
    request("POST", url, &[("content-type", "application/json")], body.to_string()).await
}

/// Creates the subscription `spec` through the node at `url`, which must answer 201.
pub async fn subscribe(url: &str, spec: &Value) {
    let a = post_json(&format!("{url}/v1/subscriptions"), spec).await;
    assert_eq!(a.status, 201, "POST {url}/v1/subscriptions {spec}: {}", a.body);
}

/// A port that was free a moment ago (below the ephemeral range, so no outgoing connection takes
/// it meanwhile; released at once, so start what binds it right after), e.g. for a webhook URL
/// that nothing listens on yet.
pub fn free_port() -> u16 {
    herald::harness::free_ports(1).expect("a free port")[0]
}

/// A base port whose ports `base..base+n` and `base+100..base+100+n` are all free right now (the
/// layout of `herald up` and `harness::Ports::Base`), below the ephemeral range (where outgoing
/// connections take their ports), and a different one at each call (tests run in parallel).
pub fn free_port_base(n: u16) -> u16 {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for attempt in 0..200u32 {
        let seed = std::process::id()
            .wrapping_mul(7919)
            .wrapping_add((call * 200 + attempt).wrapping_mul(104_729));
        let base = 20_000 + (seed % 12_000) as u16;
        let free = (0..n)
            .flat_map(|i| [base + i, base + 100 + i])
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free block of {n} HTTP and peer ports found")
}

/// The values of the samples `name{labels}` in a Prometheus text exposition; labels given as
/// `k="v"` pairs must all be present on the line.
pub fn samples<'a>(text: &'a str, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(move |l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .filter(move |l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The value of the first sample `name{labels}` (see [`samples`]).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text, name, labels).next()
}

/// The sum of every sample `name{labels}` (see [`samples`]; 0 when there is none).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name, labels).sum()
}

/// One request the webhook receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A webhook receiver on 127.0.0.1:0 that records every POST; `fail_first` answers 500 to that
/// many requests first.
pub struct Receiver {
    pub url: String,
    pub received: Arc<Mutex<Vec<Received>>>,
    handle: actix_web::dev::ServerHandle,
}

impl Receiver {
    pub async fn start(fail_first: usize) -> Receiver {
        Receiver::start_with("127.0.0.1:0", fail_first, Duration::ZERO).await
    }

    pub fn events(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

/// A real `herald` process (the binary under test), stopped by pid when dropped.
pub struct Proc {
    pub child: Child,
    pub url: String,
}

/// The URL of a started node's "listening on" line on its (piped) stdout, read by a thread.
pub fn listening_on(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.split("listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    rx
}

/// Waits for a started node's "listening on" line (killing it if none comes) and returns it as a
/// [`Proc`], which kills the node when dropped.
fn announced(mut child: Child) -> Proc {
    let url = listening_on(&mut child).recv_timeout(DEADLINE).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("herald did not report its address within {DEADLINE:?}")
    });
    Proc { child, url }
}

/// `herald node <args>` (plus `--http 127.0.0.1:0` unless given) with `env`, stdout piped.
fn node_cmd(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.arg("node");
    if !args.contains(&"--http") {
        cmd.args(["--http", "127.0.0.1:0"]);
    }
    // A lone node on loopback: its peers do not matter to these tests (the cluster tests run
    // mutual TLS through the harness).
    if !args
        .iter()
        .any(|a| a.starts_with("--peer-") || *a == "--insecure-peers")
    {
        cmd.arg("--insecure-peers");
    }
    cmd.args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(Stdio::piped());
    cmd
}

/// Starts `herald node` with `args` (plus `--http 127.0.0.1:0` unless given) and waits for its
/// "listening on" line.
pub fn spawn_herald(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = node_cmd(args, env);
    cmd.stderr(Stdio::inherit());
    let child = cmd.spawn().expect("spawn herald");
    let proc = announced(child);
    wait_ready(&proc.url);
    proc
}

impl Proc {
    /// SIGKILL: no chance to flush or drain.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then its exit status, polled (so receivers and clients on the test's runtime keep
    /// running while the node drains), failing the test after [`DEADLINE`].
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        assert!(sent.success(), "kill -TERM {pid}: {sent}");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "herald (pid {pid}) did not exit within {DEADLINE:?} of SIGTERM"
            );
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// [`Proc::terminate`] of a node the test is done with.
pub async fn terminate(mut proc: Proc) -> std::process::ExitStatus {
    proc.terminate().await
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Receiver {
    /// A receiver on exactly `addr` (e.g. `127.0.0.1:PORT` that a subscription already points at).
    pub async fn start_on(addr: &str) -> Receiver {
        Receiver::start_with(addr, 0, Duration::ZERO).await
    }

    /// A receiver on `addr` (`127.0.0.1:0` for any free port) that answers 500 to the first
    /// `fail_first` requests and takes `delay` before answering each request (a slow endpoint).
    pub async fn start_with(addr: &str, fail_first: usize, delay: Duration) -> Receiver {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let failures = Arc::new(Mutex::new(fail_first));
        let r = received.clone();
        let (addr, handle) = serve(addr, 1, move |req, body| {
            let r = r.clone();
            let failures = failures.clone();
            async move {
                if !delay.is_zero() {
                    actix_rt::time::sleep(delay).await;
                }
                {
                    let mut f = failures.lock().unwrap();
                    if *f > 0 {
                        *f -= 1;
                        return HttpResponse::InternalServerError().finish();
                    }
                }
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                r.lock().unwrap().push(Received { headers, body });
                HttpResponse::Ok().finish()
            }
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            received,
            handle,
        }
    }

    /// The CloudEvent ids of the events received so far (the webhook posts structured
    /// CloudEvents), in arrival order.
    pub fn ids(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter_map(|e| e.body["id"].as_str().map(str::to_string))
            .collect()
    }
}

/// An HTTP server for the test on `addr` (port 0: a free one) with `workers` threads, answering
/// every request with `answer`, run on the test's runtime: its address and handle. The one server
/// behind [`Receiver`] and [`EventRecorder`].
pub fn serve<F, Fut>(addr: &str, workers: usize, answer: F) -> (std::net::SocketAddr, actix_web::dev::ServerHandle)
where
    F: Fn(HttpRequest, web::Bytes) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = HttpResponse> + 'static,
{
    let server = HttpServer::new(move || {
        let answer = answer.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| answer(req, body)))
    })
    .workers(workers)
    .disable_signals()
    .bind(addr)
    .unwrap_or_else(|e| panic!("bind a test HTTP server on {addr}: {e}"));
    let bound = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    (bound, handle)
}

/// Waits (with the deadline) for a stderr line containing `needle`; returns every line read.
pub fn lines_until(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let start = Instant::now();
    let mut lines = Vec::new();
    loop {
        let left = DEADLINE.checked_sub(start.elapsed()).unwrap_or_default();
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                lines.push(line);
                if found {
                    return lines;
                }
            }
            Err(e) => panic!("no stderr line containing {needle:?} ({e}); got:\n{}", lines.join("\n")),
        }
    }
}

/// Like [`spawn_herald`], but with stderr piped: every stderr line of the node is sent to the
/// returned channel (and echoed to the test's stderr), until the process exits.
pub fn spawn_herald_stderr(args: &[&str], env: &[(&str, &str)]) -> (Proc, std::sync::mpsc::Receiver<String>) {
    let mut cmd = node_cmd(args, env);
    cmd.stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn herald");
    let stderr = child.stderr.take().expect("stderr");
    let (err_tx, err_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[herald stderr] {line}");
            let _ = err_tx.send(line);
        }
    });
    (announced(child), err_rx)
}

/// Blocks until `GET {url}/readyz` answers 200 (the node joined its cluster and replayed its WAL),
/// failing the test after [`DEADLINE`]. Plain HTTP/1.0 over a socket, so it works from sync code.
pub fn wait_ready(url: &str) {
    let start = Instant::now();
    loop {
        if get_blocking(url, "/readyz").is_some_and(|(status, _)| status == 200) {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "{url} was not ready within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.0 request from sync code: `method {url}{path}` with an optional JSON body, waiting
/// at most `timeout` for the answer. The status and body, or `None` if the node cannot be reached
/// or its answer is not HTTP.
pub fn request_blocking(
    method: &str,
    url: &str,
    path: &str,
    json: Option<&str>,
    timeout: Duration,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let request = match json {
        Some(body) => format!(
            "{method} {path} HTTP/1.0\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
        None => format!("{method} {path} HTTP/1.0\r\n\r\n"),
    };
    s.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let status = answer.split_whitespace().nth(1)?.parse().ok()?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// `GET {url}{path}` (see [`request_blocking`]): `None` if the node cannot be reached.
pub fn get_blocking(url: &str, path: &str) -> Option<(u16, String)> {
    request_blocking("GET", url, path, None, Duration::from_secs(2))
}

/// `POST {url}{path}` of a JSON body (see [`request_blocking`]); fails the test if the node does
/// not answer within 30 s.
pub fn post_json_blocking(url: &str, path: &str, body: &str) -> (u16, String) {
    request_blocking("POST", url, path, Some(body), Duration::from_secs(30))
        .unwrap_or_else(|| panic!("POST {url}{path}: no HTTP answer"))
}

/// A `herald` command with no inherited `HERALD_*` settings that could change its meaning.
pub fn herald_cmd(args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(args).stdin(Stdio::null()).env_remove("RUST_LOG");
    for var in [
        "HERALD_URL",
        "HERALD_TOKEN",
        "HERALD_CA_FILE",
        "HERALD_CONFIG",
        "HERALD_NODE_ID",
        "HERALD_HTTP",
        "HERALD_DATA_DIR",
        "HERALD_LOG_FORMAT",
        "HERALD_JOIN",
        "HERALD_PEER",
        "HERALD_ADVERTISE",
        "HERALD_ADVERTISE_HTTP",
        "HERALD_NODE_ID_FROM_HOSTNAME",
        "HERALD_TOKENS_FILE",
        "HERALD_ALLOW_UNAUTHENTICATED_REMOTE",
        "HERALD_CLUSTER_SECRET_FILE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Spawns `cmd` with stdout/stderr captured and waits (polling, with a deadline) for it to exit.
pub fn run_to_exit(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`herald {cmd:?}` did not exit within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

/// A webhook endpoint on 127.0.0.1:0 that records every CloudEvent POSTed to it (structured, as the
/// `webhook` handler sends them, or binary mode with `ce-id`) as a delivery in a [`History`]: id,
/// partition key, data, the subscription and attempt of the `x-herald-subscription` and
/// `x-herald-attempt` headers, the address it came from and the time. It answers 200 only after
/// recording. A request without an event id gets 400, so a malformed delivery shows up as a failed
/// attempt rather than a silent gap. Built for many thousands of events.
pub struct EventRecorder {
    pub url: String,
    pub history: History,
    handle: actix_web::dev::ServerHandle,
}

impl EventRecorder {
    pub async fn start() -> EventRecorder {
        EventRecorder::start_on("127.0.0.1:0", History::new()).await
    }

    /// A recorder listening on `addr` (e.g. a container network's gateway, for nodes in containers),
    /// recording into `history`.
    pub async fn start_on(addr: &str, history: History) -> EventRecorder {
        let h = history.clone();
        let (addr, handle) = serve(addr, 2, move |req, body| {
            let h = h.clone();
            async move {
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let id = body["id"].as_str().map(str::to_string).or_else(|| header("ce-id"));
                let Some(id) = id else {
                    return HttpResponse::BadRequest().body("no CloudEvent id");
                };
                let key = body["partitionkey"]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| header("ce-partitionkey"));
                h.deliver(history::Delivery {
                    id,
                    subscription: header("x-herald-subscription").unwrap_or_else(|| "?".to_string()),
                    key,
                    data: body.get("data").cloned().unwrap_or(Value::Null),
                    attempt: header("x-herald-attempt").and_then(|a| a.parse().ok()),
                    from: req.peer_addr().map(|a| a.ip().to_string()),
                });
                HttpResponse::Ok().finish()
            }
        });
        EventRecorder {
            url: format!("http://{addr}/events"),
            history,
            handle,
        }
    }

    /// How many events arrived so far (duplicates included).
    pub fn len(&self) -> usize {
        self.history.delivered_count()
    }

    /// The arrivals from number `from` on, in arrival order.
    pub fn since(&self, from: usize) -> Vec<Arrival> {
        self.history.arrivals_since(from)
    }

    /// Every arrival so far, in arrival order.
    pub fn all(&self) -> Vec<Arrival> {
        self.since(0)
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

/// The file `program` on `PATH`, if any.
pub fn find_on_path(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|f| f.is_file())
}

/// The file `program` on `PATH`, or a failure that says how to get it. For tests marked
/// `#[ignore = "needs <program>"]`: a plain `cargo test` lists them as ignored, and whoever runs
/// them (`-- --include-ignored`, as CI does) must have the tool — a missing one is a failure, never
/// a silent pass.
pub fn require_tool(program: &str, install: &str) -> std::path::PathBuf {
    find_on_path(program).unwrap_or_else(|| {
        panic!("{program} is not on PATH ({install}); this test runs only with --include-ignored, where it is required")
    })
}

/// Fails the test unless `promtool check metrics` accepts `text` without a word of complaint
/// (a lint problem prints a line and exits 3); `what` names the exposition. Runs off the runtime.
pub async fn assert_promtool_passes(promtool: &std::path::Path, text: String, what: &str) {
    let promtool = promtool.to_path_buf();
    let (status, said, text) = actix_rt::task::spawn_blocking(move || {
        let (status, said) = promtool_check(&promtool, &text);
        (status, said, text)
    })
    .await
    .expect("promtool thread");
    assert!(
        status.success() && said.trim().is_empty(),
        "promtool check metrics on {what} failed ({status}):\n{said}\n--- /metrics ---\n{text}"
    );
}

/// `promtool check metrics` on `text` (fed on stdin): its exit status, and its stdout and stderr
/// together (empty when the exposition has no problem).
pub fn promtool_check(promtool: &std::path::Path, text: &str) -> (std::process::ExitStatus, String) {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, said)
}

/// A path as the `&str` a command line takes.
pub fn p(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs `herald <args>` to completion off the test's runtime thread (so receivers and clients on
/// that thread keep running), failing the test if it has not exited within [`DEADLINE`].
pub async fn cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    actix_rt::task::spawn_blocking(move || run_to_exit(herald_cmd(&args)))
        .await
        .expect("cli thread")
}

/// Runs `herald <args>` to completion on this thread (for tests without a runtime), failing the
/// test if it has not exited within [`DEADLINE`].
pub fn cli_blocking(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    run_to_exit(herald_cmd(&args))
}

/// The `/metrics` text of the node at `url`.
pub async fn metrics_of(url: &str) -> String {
    get_text(&format!("{url}/metrics")).await
}

/// The sample `name{labels}` of the node at `url` (0 when it has none yet).
pub async fn metric_of(url: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&metrics_of(url).await, name, labels).unwrap_or(0.0)
}

/// Waits until the sample `name{labels}` of the node at `url` is at least `at_least`; returns it.
pub async fn wait_metric(url: &str, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
    let what = format!("{name}{labels:?} >= {at_least}");
    eventually(&what, || async move {
        Some(metric_of(url, name, labels).await).filter(|v| *v >= at_least)
    })
    .await
}

/// Fails unless `a` is the error answer `status` with `{"error":{"code": code}}`.
pub fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "expected {status} {code}: {}", a.body);
    assert_eq!(a.body["error"]["code"], code, "{}", a.body);
}
