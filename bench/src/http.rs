//! `herald-bench http`: what Herald's HTTP publish costs on top of HTTP itself. One Herald node
//! (`herald-bench node`, a subscription whose handler is the no-op `bench-sink`) next to a bare
//! actix-web server (`herald-bench bare-http`, hidden) whose `POST /v1/topics/{topic}/events`
//! reads the body and answers 202 with a JSON body of the shape and size of Herald's publish
//! answer, and nothing else. Both are separate processes on 127.0.0.1 with actix-web's default
//! worker count (one per core: neither sets it), so the ratio Herald/bare is what routing, the
//! WAL (with `ack=accepted`) and the handler delivery cost per request.
//!
//! Every request carries one event (`--size` bytes of JSON, 128 by default) over HTTP/1.1
//! keep-alive connections, and the systems alternate run by run (the order rotates, so no system
//! always runs first). Two measurements:
//!
//! * **Max throughput, closed loop**: per `--concurrency` value `c`, `c` connections each send a
//!   request, wait for its answer, and send the next, for `--seconds` (or `--requests`, whichever
//!   comes first). Events/s = 2xx answers / elapsed time. A 429/503 (Herald's bounded mailboxes)
//!   is counted, not retried, and the connection pauses 1 ms.
//! * **Latency, open loop** (the wrk2 method, free of coordinated omission): `--rate` requests/s
//!   for `--latency-seconds`, on a fixed schedule: request `n` is due at `start + n / rate`, and
//!   the requests are dealt round-robin to `--latency-connections` connections (request `n` to
//!   connection `n mod C`, so each connection's requests are `C / rate` apart). Each connection
//!   sends its next request at its due time, or as soon as the previous answer is in when it is
//!   late, and the latency of a request is measured from its **due** time, not from when it was
//!   actually sent: a stall of the server delays every request due during the stall, and each of
//!   them reports the delay, as a user sending at that rate would see it (a closed-loop client
//!   would send fewer requests during the stall and report one slow one).
//!
//! The load generator lives in this process. It is a minimal HTTP/1.1 client (one prebuilt
//! request, responses parsed with `httparse`, `Content-Length` bodies only), not awc: on a small
//! machine the generator shares the cores with the servers, and a heavier client would both lower
//! every figure and pull the ratio towards 1. The closed loop runs on this process's one
//! runtime thread (async sockets, at most one core); the open loop runs one blocking thread per
//! connection with a 1 ns timer slack, because async timers have a 1 ms granularity that would
//! add up to 1 ms to every latency. The generator's own timing error (how late a sender thread
//! woke for a due request) is printed per run: it is part of the measured latencies.
//!
//! After every Herald run the benchmark waits until `bench-sink` has handled every accepted
//! event, so a backlog of one run does not slow the next (of either system).

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use clap::{Args, ValueEnum};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cluster::{
    free_ports, http, payload, payload_size_ok, scrape, settled, subscribe, unix_nanos, Cluster, LOG_TAIL,
};
use super::compare::{self, fmt_size, Metric, Row};
use herald::config::FsyncPolicy;

const TOPIC: &str = "bench.http";
/// The publish path of Herald (`POST /v1/topics/{topic}/events`) and of the bare server.
const ROUTE: &str = "/v1/topics/{topic}/events";
/// Longest wait for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed requests (errors, unexpected statuses) after which a connection stops.
const MAX_FAILURES: u64 = 5;
/// Largest response the generator buffers.
const MAX_RESPONSE: usize = 1 << 20;
/// The bare server's event id: as long as Herald's (a ULID, 26 characters).
const BARE_ID: &str = "01KB00000000000000000BARE0";
/// Goal of the issue: HTTP publish events/s at least this share of the bare handler's.
const GOAL_RATIO: f64 = 0.8;

/// `herald-bench http` arguments.
#[derive(Args, Debug)]
pub(super) struct HttpArgs {
    /// Runs per figure; in each run every system is measured once, in a rotating order (the
    /// median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    runs: u64,
    /// Connections of the closed-loop (max throughput) runs, each with one request in flight.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
    concurrency: Vec<usize>,
    /// Seconds of each closed-loop run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Most requests of one closed-loop run (it ends at whichever of this and --seconds comes first).
    #[arg(long, default_value_t = 5_000_000)]
    requests: u64,
    /// Requests/s of the open-loop (latency) runs; one event per request.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Seconds of each open-loop run.
    #[arg(long, default_value_t = 5.0)]
    latency_seconds: f64,
    /// Connections (one sender thread each) of the open-loop runs.
    #[arg(long, default_value_t = 32)]
    latency_connections: usize,
    /// Bytes of JSON data per event (16, or 32 and more).
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Herald's ack modes to measure (the publish API's default is accepted).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Ack::Accepted, Ack::None])]
    ack: Vec<Ack>,
    /// Handler instances of the subscription (all on the one node).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    instances: u32,
    /// WAL fsync policy of the Herald node (default: the node default, always).
    #[arg(long, value_enum)]
    wal_fsync: Option<FsyncPolicy>,
    /// Also write the table's rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A few seconds in all: 1 run, concurrency 1 and 8, 0.5 s runs, 1 s of latency at 1,000/s.
    #[arg(long)]
    smoke: bool,
    /// Keep the node's data directory and the logs (the paths are printed) instead of removing them.
    #[arg(long)]
    keep: bool,
}

/// `herald-bench bare-http` arguments.
#[derive(Args, Debug)]
pub(super) struct BareHttpArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7500")]
    http: String,
}

/// A Herald ack mode of the publish request.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ack {
    Accepted,
    None,
}

impl Ack {
    fn as_str(self) -> &'static str {
        match self {
            Ack::Accepted => "accepted",
            Ack::None => "none",
        }
    }
}

// ---------------------------------------------------------------- the bare server

#[derive(serde::Serialize)]
struct BareAnswer {
    id: &'static str,
    topic: String,
    subscriptions: usize,
}

async fn bare_publish(topic: web::Path<String>, _body: web::Bytes) -> HttpResponse {
    HttpResponse::Accepted().json(BareAnswer {
        id: BARE_ID,
        topic: topic.into_inner(),
        subscriptions: 1,
    })
}

/// `herald-bench bare-http`: a bare actix-web server; `POST /v1/topics/{topic}/events` reads the
/// body and answers 202 `{"id","topic","subscriptions":1}`, like Herald's publish answer.
pub(super) fn bare_http(a: BareHttpArgs) -> Result<(), String> {
    actix_rt::System::new().block_on(async move {
        HttpServer::new(|| App::new().route(ROUTE, web::post().to(bare_publish)))
            .bind(a.http.as_str())
            .map_err(|e| format!("cannot bind {}: {e}", a.http))?
            .run()
            .await
            .map_err(|e| e.to_string())
    })
}

/// The bare server's process. Dropping it SIGKILLs it (by its pid) and removes its directory.
struct BareProc {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    keep: bool,
    addr: SocketAddr,
}

impl BareProc {
    fn start(port: u16, keep: bool) -> Result<BareProc, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
        let dir = std::env::temp_dir().join(format!("herald-bench-http-bare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let log = dir.join("bare-http.log");
        let out = File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(exe)
            .args(["bare-http", "--http", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start the bare-http server: {e}"))?;
        Ok(BareProc {
            child,
            dir,
            log,
            keep,
            addr,
        })
    }

    async fn wait_listening(&mut self, within: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the bare-http server exited ({status}) during start-up; see {}",
                    self.log.display()
                ));
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > within {
                return Err(format!(
                    "the bare-http server did not listen on {} within {within:?}",
                    self.addr
                ));
            }
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut out = format!("--- bare-http ({}), last lines:\n", self.log.display());
        for l in &lines[lines.len().saturating_sub(15)..] {
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}

impl Drop for BareProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if self.keep {
            eprintln!("kept the bare-http server's log in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------- the HTTP/1.1 client

/// A POST of `body` (JSON) to `path`, as raw HTTP/1.1 bytes.
pub(super) fn request(addr: SocketAddr, path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A complete response at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Parsed {
    pub(super) status: u16,
    /// Bytes of the head.
    pub(super) head: usize,
    /// Bytes of head and body.
    pub(super) len: usize,
    /// The server closes the connection after it.
    pub(super) close: bool,
}

/// Parses the response at the start of `buf`: `Ok(None)` while it is incomplete. Bodies must
/// have a `Content-Length` (both servers send one); chunked bodies are refused.
pub(super) fn parse_response(buf: &[u8]) -> Result<Option<Parsed>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(n)) => n,
        Err(e) => return Err(format!("bad HTTP response: {e}")),
    };
    let status = r.code.unwrap_or(0);
    let mut length = None;
    let mut close = r.version == Some(0);
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            length = Some(v.ok_or("bad Content-Length in a response")?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("a chunked response (the load generator reads Content-Length bodies only)".into());
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    let body = match (length, status) {
        (Some(n), _) => n,
        (None, 100..=199 | 204 | 304) => 0,
        (None, _) => return Err(format!("a {status} response without Content-Length")),
    };
    if buf.len() < head + body {
        return Ok(None);
    }
    Ok(Some(Parsed {
        status,
        head,
        len: head + body,
        close,
    }))
}

/// An answer: its status, whether the connection is to be reopened, and (not 2xx) its body.
#[derive(Debug)]
struct Answer {
    status: u16,
    close: bool,
    text: String,
}

impl Answer {
    /// The first response in `buf` once it is whole (taken out of `buf`), `None` while more
    /// bytes are needed; an error for a malformed or oversized response.
    fn complete(buf: &mut Vec<u8>) -> Result<Option<Answer>, String> {
        if let Some(p) = parse_response(buf)? {
            return Ok(Some(Answer::take(buf, &p)));
        }
        if buf.len() > MAX_RESPONSE {
            return Err("a response over 1 MiB".into());
        }
        Ok(None)
    }

    /// Takes the parsed response off the front of `buf`.
    fn take(buf: &mut Vec<u8>, p: &Parsed) -> Answer {
        let text = if (200..300).contains(&p.status) {
            String::new()
        } else {
            String::from_utf8_lossy(&buf[p.head..p.len]).chars().take(300).collect()
        };
        buf.drain(..p.len);
        Answer {
            status: p.status,
            close: p.close,
            text,
        }
    }
}

/// What to do with an answer.
enum Outcome {
    Ok,
    Refused,
    Failed(String),
}

fn outcome(a: &Answer) -> Outcome {
    match a.status {
        200..=299 => Outcome::Ok,
        429 | 503 => Outcome::Refused,
        s => Outcome::Failed(format!("answered {s} {}", a.text)),
    }
}

/// A keep-alive connection of the closed loop (async, on this process's runtime).
struct AsyncConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl AsyncConn {
    async fn connect(addr: SocketAddr) -> Result<AsyncConn, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(AsyncConn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    async fn exchange(&mut self, request: &[u8]) -> Result<Answer, String> {
        self.stream.write_all(request).await.map_err(|e| e.to_string())?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(answer) = Answer::complete(&mut self.buf)? {
                return Ok(answer);
            }
            let n = self.stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A keep-alive connection of the open loop (blocking, on its own thread).
struct SyncConn {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
}

impl SyncConn {
    fn connect(addr: SocketAddr) -> Result<SyncConn, String> {
        let stream = std::net::TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream
            .set_write_timeout(Some(REQUEST_TIMEOUT))
            .map_err(|e| e.to_string())?;
        Ok(SyncConn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    fn exchange(&mut self, request: &[u8]) -> Result<Answer, String> {
        self.stream.write_all(request).map_err(|e| e.to_string())?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(answer) = Answer::complete(&mut self.buf)? {
                return Ok(answer);
            }
            let n = self.stream.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

// ---------------------------------------------------------------- closed loop

/// What a closed-loop run did.
#[derive(Default, Debug, Clone)]
struct Load {
    ok: u64,
    refused: u64,
    failed: u64,
    error: Option<String>,
    seconds: f64,
}

impl Load {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds.max(1e-9)
    }

    fn fail(&mut self, e: String) {
        self.failed += 1;
        self.error = Some(e);
    }
}

/// `conns` connections, each one request in flight, for `seconds` or `max` requests in all.
async fn closed_loop(
    addr: SocketAddr,
    request: Arc<Vec<u8>>,
    conns: usize,
    seconds: f64,
    max: u64,
) -> Result<Load, String> {
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(AsyncConn::connect(addr).await?);
    }
    let issued = Rc::new(Cell::new(0u64));
    let load = Rc::new(RefCell::new(Load::default()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::with_capacity(conns);
    for conn in streams {
        let (request, issued, load) = (request.clone(), issued.clone(), load.clone());
        tasks.push(actix_rt::spawn(async move {
            let mut conn = Some(conn);
            let mut failures = 0;
            while Instant::now() < deadline && issued.get() < max && failures < MAX_FAILURES {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match AsyncConn::connect(addr).await {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            load.borrow_mut().fail(e);
                            return;
                        }
                    },
                };
                issued.set(issued.get() + 1);
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, c.exchange(&request))
                    .await
                    .unwrap_or_else(|_| Err("no answer within 10 s".into()));
                let pause = match answer {
                    Ok(a) => {
                        if a.close {
                            conn = None;
                        }
                        match outcome(&a) {
                            Outcome::Ok => {
                                load.borrow_mut().ok += 1;
                                false
                            }
                            Outcome::Refused => {
                                load.borrow_mut().refused += 1;
                                true
                            }
                            Outcome::Failed(e) => {
                                failures += 1;
                                load.borrow_mut().fail(e);
                                true
                            }
                        }
                    }
                    Err(e) => {
                        conn = None;
                        failures += 1;
                        load.borrow_mut().fail(e);
                        true
                    }
                };
                if pause {
                    actix_rt::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut l = load.borrow().clone();
    l.seconds = started.elapsed().as_secs_f64();
    Ok(l)
}

// ---------------------------------------------------------------- open loop

/// When request `n` of a schedule of `rate` requests/s is due, from the schedule's start.
pub(super) fn intended_offset(n: u64, rate: u64) -> Duration {
    Duration::from_nanos((u128::from(n) * 1_000_000_000 / u128::from(rate.max(1))) as u64)
}

/// The requests (indices into the shared schedule of `total`) that connection `i` of `conns` sends.
pub(super) fn connection_schedule(i: usize, conns: usize, total: u64) -> impl Iterator<Item = u64> {
    (i as u64..total).step_by(conns.max(1))
}

/// The latency of a request due at `due` whose answer came at `done`: from the intended send
/// time, so time the request spent waiting to be sent (behind a slow answer) counts.
pub(super) fn latency_from_intended(due: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(due)
}

/// The nearest-rank `p` quantile (0 < p ≤ 1) of sorted values: the smallest value with at least
/// `p` of all values at or below it.
pub(super) fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(ns: Option<u64>) -> f64 {
    ns.map_or(f64::NAN, |n| n as f64 / 1e6)
}

/// What an open-loop run did.
#[derive(Default, Debug)]
struct Paced {
    /// Latency of each 2xx answer from its due time, ns, sorted.
    latencies: Vec<u64>,
    /// How late the sender woke for the requests it slept for (not those it sent late because
    /// the previous answer came late): the generator's own timing error, ns, sorted.
    overshoot: Vec<u64>,
    ok: u64,
    refused: u64,
    failed: u64,
    /// Scheduled requests never sent (a connection gave up, or the run's time bound was hit).
    unsent: u64,
    error: Option<String>,
}

/// Lets this thread's sleeps end within about a microsecond of their deadline (the default
/// timer slack is 50 µs).
#[cfg(target_os = "linux")]
fn fine_timer_slack() {
    let one: libc::c_ulong = 1;
    let zero: libc::c_ulong = 0;
    // SAFETY: PR_SET_TIMERSLACK takes integers and changes only the calling thread's timer slack.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, one, zero, zero, zero) };
}

#[cfg(not(target_os = "linux"))]
fn fine_timer_slack() {}

/// One sender thread: the requests of connection `i`, each at its due time or as soon as the
/// connection is free, until `give_up`.
fn sender(
    addr: SocketAddr,
    mut conn: Option<SyncConn>,
    request: &[u8],
    schedule: impl Iterator<Item = u64>,
    start: Instant,
    rate: u64,
    give_up: Instant,
) -> Paced {
    fine_timer_slack();
    let mut out = Paced::default();
    for n in schedule {
        let due = start + intended_offset(n, rate);
        let now = Instant::now();
        if now >= give_up || out.failed >= MAX_FAILURES {
            out.unsent += 1;
            continue;
        }
        if due > now {
            std::thread::sleep(due - now);
            out.overshoot
                .push(Instant::now().saturating_duration_since(due).as_nanos() as u64);
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match SyncConn::connect(addr) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    out.failed += 1;
                    out.error = Some(e);
                    out.unsent += 1;
                    continue;
                }
            },
        };
        match c.exchange(request) {
            Ok(a) => {
                let done = Instant::now();
                if a.close {
                    conn = None;
                }
                match outcome(&a) {
                    Outcome::Ok => {
                        out.ok += 1;
                        out.latencies.push(latency_from_intended(due, done).as_nanos() as u64);
                    }
                    Outcome::Refused => out.refused += 1,
                    Outcome::Failed(e) => {
                        out.failed += 1;
                        out.error = Some(e);
                    }
                }
            }
            Err(e) => {
                conn = None;
                out.failed += 1;
                out.error = Some(e);
            }
        }
    }
    out
}

/// `rate` requests/s for `seconds` over `conns` connections (one thread each), latencies from
/// the due times. Gives up 30 s after the schedule's end.
fn open_loop(addr: SocketAddr, request: Arc<Vec<u8>>, rate: u64, seconds: f64, conns: usize) -> Result<Paced, String> {
    let total = ((rate as f64 * seconds).round() as u64).max(1);
    let conns = conns.clamp(1, total as usize);
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(SyncConn::connect(addr)?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let give_up = start + Duration::from_secs_f64(seconds) + Duration::from_secs(30);
    let parts: Vec<Paced> = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, conn)| {
                let request = request.as_slice();
                std::thread::Builder::new()
                    .name(format!("bench-http-{i}"))
                    .spawn_scoped(s, move || {
                        sender(
                            addr,
                            Some(conn),
                            request,
                            connection_schedule(i, conns, total),
                            start,
                            rate,
                            give_up,
                        )
                    })
                    .map_err(|e| format!("cannot start a sender thread: {e}"))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h?.join().map_err(|_| "a sender thread panicked".to_string()))
            .collect::<Result<Vec<_>, String>>()
    })?;
    let mut all = Paced::default();
    for p in parts {
        all.latencies.extend(p.latencies);
        all.overshoot.extend(p.overshoot);
        all.ok += p.ok;
        all.refused += p.refused;
        all.failed += p.failed;
        all.unsent += p.unsent;
        if p.error.is_some() {
            all.error = p.error;
        }
    }
    all.latencies.sort_unstable();
    all.overshoot.sort_unstable();
    Ok(all)
}

// ---------------------------------------------------------------- the scenario

/// A server under load: the bare one, or Herald with an ack mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    Bare,
    Herald(Ack),
}

impl Server {
    fn name(self) -> String {
        match self {
            Server::Bare => "bare".into(),
            Server::Herald(ack) => format!("herald ack={}", ack.as_str()),
        }
    }
}

/// The order of the systems in run `run` (1-based): rotated by one each run.
pub(super) fn rotation<T: Copy>(systems: &[T], run: u64) -> Vec<T> {
    let k = ((run.max(1) - 1) as usize) % systems.len().max(1);
    systems[k..].iter().chain(&systems[..k]).copied().collect()
}

struct Bench<'a> {
    c: &'a Cluster,
    bare: SocketAddr,
    herald: SocketAddr,
    poll: awc::Client,
    body: String,
    warnings: Vec<String>,
}

impl Bench<'_> {
    fn target(&self, s: Server) -> (SocketAddr, Arc<Vec<u8>>) {
        let ack = match s {
            Server::Herald(a) => a,
            Server::Bare => Ack::Accepted,
        };
        let path = format!("/v1/topics/{TOPIC}/events?ack={}", ack.as_str());
        let addr = match s {
            Server::Bare => self.bare,
            Server::Herald(_) => self.herald,
        };
        (addr, Arc::new(request(addr, &path, &self.body)))
    }

    async fn handled(&self) -> Result<f64, String> {
        Ok(scrape(&self.poll, &http(self.c, 1)).await?.events)
    }

    /// Waits until `bench-sink` has handled `accepted` events more than `base` (at most 60 s,
    /// or 10 s without progress).
    async fn drain(&mut self, name: &str, base: f64, accepted: u64) -> Result<(), String> {
        let started = Instant::now();
        let mut progress = (0u64, Instant::now());
        loop {
            let handled = (self.handled().await? - base).max(0.0) as u64;
            if handled >= accepted {
                return Ok(());
            }
            if handled > progress.0 {
                progress = (handled, Instant::now());
            }
            if started.elapsed() > Duration::from_secs(60) || progress.1.elapsed() > Duration::from_secs(10) {
                self.warnings.push(format!(
                    "{name}: bench-sink handled {handled} of {accepted} accepted events"
                ));
                return Ok(());
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn closed(&mut self, s: Server, name: &str, conns: usize, seconds: f64, max: u64) -> Result<Load, String> {
        let (addr, req) = self.target(s);
        let base = match s {
            Server::Herald(_) => self.handled().await?,
            Server::Bare => 0.0,
        };
        let l = closed_loop(addr, req, conns, seconds, max).await?;
        if l.ok == 0 {
            return Err(format!(
                "{name}: no request was accepted ({} refused, {} failed; last error: {})",
                l.refused,
                l.failed,
                l.error.as_deref().unwrap_or("-")
            ));
        }
        if l.failed > 0 {
            self.warnings.push(format!(
                "{name}: {} failed requests; last error: {}",
                l.failed,
                l.error.as_deref().unwrap_or("-")
            ));
        }
        if l.refused > 0 {
            self.warnings
                .push(format!("{name}: {} requests refused (429/503)", l.refused));
        }
        if let Server::Herald(_) = s {
            self.drain(name, base, l.ok).await?;
        }
        Ok(l)
    }

    async fn open(&mut self, s: Server, name: &str, a: &HttpArgs) -> Result<Paced, String> {
        let (addr, req) = self.target(s);
        let base = match s {
            Server::Herald(_) => self.handled().await?,
            Server::Bare => 0.0,
        };
        let (rate, seconds, conns) = (a.rate, a.latency_seconds, a.latency_connections);
        let p = tokio::task::spawn_blocking(move || open_loop(addr, req, rate, seconds, conns))
            .await
            .map_err(|e| format!("{name}: {e}"))??;
        if p.ok == 0 {
            return Err(format!(
                "{name}: no request was accepted ({} refused, {} failed; last error: {})",
                p.refused,
                p.failed,
                p.error.as_deref().unwrap_or("-")
            ));
        }
        if p.failed > 0 || p.refused > 0 || p.unsent > 0 {
            self.warnings.push(format!(
                "{name}: {} failed, {} refused (429/503), {} never sent (they are not in the percentiles); last error: {}",
                p.failed,
                p.refused,
                p.unsent,
                p.error.as_deref().unwrap_or("-")
            ));
        }
        if let Server::Herald(_) = s {
            self.drain(name, base, p.ok).await?;
        }
        Ok(p)
    }
}

async fn scenario(c: &mut Cluster, bare: &mut BareProc, a: &HttpArgs) -> Result<(), String> {
    let poll = crate::cluster::node_client(Duration::from_secs(5), crate::cluster::CONNECTIONS);
    c.wait_ready(Duration::from_secs(60)).await?;
    subscribe(c, &poll, TOPIC, a.instances).await?;
    settled(c, &poll, TOPIC, Duration::from_millis(300), Duration::from_secs(60)).await?;
    bare.wait_listening(Duration::from_secs(30)).await?;
    let herald: SocketAddr = http(c, 1).parse().map_err(|e| format!("{e}"))?;
    let mut b = Bench {
        c,
        bare: bare.addr,
        herald,
        poll,
        body: payload(a.size, unix_nanos()),
        warnings: Vec::new(),
    };

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let fsync = match a.wal_fsync {
        Some(FsyncPolicy::Never) => "never",
        _ => "always",
    };
    let acks: Vec<String> = a.ack.iter().map(|x| format!("ack={}", x.as_str())).collect();
    println!(
        "herald-bench http: HTTP publish, one event per request, Herald ({}) vs a bare actix-web handler \
         answering 202; {cores} cores, 127.0.0.1 only",
        acks.join(", ")
    );
    println!(
        "  herald: 1 node (http {herald}), subscription {TOPIC} -> bench-sink x{}, wal.fsync={fsync}",
        a.instances
    );
    println!(
        "  bare:   herald-bench bare-http (http {}): reads the body, answers 202 {{\"id\",\"topic\",\"subscriptions\"}}",
        b.bare
    );
    println!(
        "  both: POST /v1/topics/{TOPIC}/events, {} of JSON, HTTP/1.1 keep-alive, actix-web's default workers ({cores})",
        fmt_size(a.size)
    );
    println!(
        "  {} runs per figure, systems alternating; closed loop {} s per run at concurrency {}; open loop {}/s for {} s \
         over {} connections, latency from the intended send time\n",
        a.runs,
        a.seconds,
        a.concurrency.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", "),
        a.rate,
        a.latency_seconds,
        a.latency_connections
    );

    let mut systems = vec![Server::Bare];
    systems.extend(a.ack.iter().map(|x| Server::Herald(*x)));

    // Warm-up: connections, the WAL file, the handler's mailbox, the allocators.
    let top = a.concurrency.iter().copied().max().unwrap_or(1);
    for &s in &systems {
        let name = format!("{} warm-up", s.name());
        let l = b.closed(s, &name, top, a.seconds.min(1.0), a.requests).await?;
        eprintln!("{name}: {:.0} requests/s", l.rate());
    }

    // Closed loop: events/s per system, concurrency and run.
    let mut rates: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); a.concurrency.len()]; systems.len()];
    for run in 1..=a.runs {
        for (ci, &conns) in a.concurrency.iter().enumerate() {
            let mut line = format!("run {run}/{} c={conns}:", a.runs);
            for s in rotation(&systems, run) {
                let name = format!("{} c={conns} run {run}", s.name());
                let l = b.closed(s, &name, conns, a.seconds, a.requests).await?;
                let si = systems.iter().position(|x| *x == s).unwrap_or(0);
                rates[si][ci].push(l.rate());
                line.push_str(&format!(
                    "  {} {}/s",
                    s.name(),
                    compare::fmt_value(Metric::EventsPerSecond, l.rate())
                ));
            }
            eprintln!("{line}");
        }
    }

    // Open loop: latency percentiles per system and run.
    let mut lat: Vec<[Vec<f64>; 3]> = vec![[Vec::new(), Vec::new(), Vec::new()]; systems.len()];
    let mut lags: Vec<Vec<u64>> = vec![Vec::new(); systems.len()];
    for run in 1..=a.runs {
        let mut line = format!("run {run}/{} paced {}/s:", a.runs, a.rate);
        for s in rotation(&systems, run) {
            let name = format!("{} paced run {run}", s.name());
            let p = b.open(s, &name, a).await?;
            let si = systems.iter().position(|x| *x == s).unwrap_or(0);
            let q = [0.5, 0.99, 0.999].map(|q| ms(percentile(&p.latencies, q)));
            for (v, x) in lat[si].iter_mut().zip(q) {
                v.push(x);
            }
            lags[si].extend(percentile(&p.overshoot, 0.99));
            line.push_str(&format!(
                "  {} p50/p99/p99.9 {:.2}/{:.2}/{:.2} ms (sender wake-up lag p99 {:.3} ms)",
                s.name(),
                q[0],
                q[1],
                q[2],
                ms(percentile(&p.overshoot, 0.99))
            ));
        }
        eprintln!("{line}");
    }

    // Rows: each Herald mode against the bare server's figures of the same runs.
    let mut rows = Vec::new();
    for (si, s) in systems.iter().enumerate() {
        let Server::Herald(ack) = *s else { continue };
        for (ci, conns) in a.concurrency.iter().enumerate() {
            rows.push(Row {
                payload_bytes: a.size,
                label: Some(format!("ack={}, c={conns}", ack.as_str())),
                metric: Metric::EventsPerSecond,
                herald: rates[si][ci].clone(),
                peer: rates[0][ci].clone(),
                plain: vec![],
            });
        }
        for (mi, metric) in [Metric::P50Ms, Metric::P99Ms, Metric::P999Ms].into_iter().enumerate() {
            rows.push(Row {
                payload_bytes: a.size,
                label: Some(format!("ack={}, {}/s", ack.as_str(), a.rate)),
                metric,
                herald: lat[si][mi].clone(),
                peer: lat[0][mi].clone(),
                plain: vec![],
            });
        }
    }
    println!(
        "\nherald HTTP publish vs bare actix-web (202), {} runs each; events/s = 2xx answers/s at concurrency c \
         (closed loop); latency at {}/s (open loop, from the intended send time)",
        a.runs, a.rate
    );
    println!("{}", compare::table("bare", &rows));
    println!(
        "(ratio = Herald median / bare median; per-run ratios pair the runs of the same round; \
         c = connections with one request in flight each)"
    );
    let lag_line: Vec<String> = systems
        .iter()
        .zip(&lags)
        .map(|(s, l)| {
            let worst = l.iter().copied().max();
            format!("{} {:.3} ms", s.name(), ms(worst))
        })
        .collect();
    println!(
        "load generator timing: sender wake-up lag (woke - intended send time), worst per-run p99: {}",
        lag_line.join(", ")
    );
    let goal: Vec<String> = rows
        .iter()
        .filter(|r| r.metric == Metric::EventsPerSecond)
        .filter_map(|r| {
            let x = r.ratio()?;
            Some(format!(
                "{} {x:.2}x {}",
                r.label.as_deref().unwrap_or(""),
                if x >= GOAL_RATIO { "met" } else { "not met" }
            ))
        })
        .collect();
    println!("goal events/s >= {GOAL_RATIO}x bare: {}", goal.join("; "));
    for w in &b.warnings {
        println!("warning: {w}");
    }
    if let Some(path) = &a.json {
        let meta = json!({
            "command": "herald-bench http",
            "time": chrono::Utc::now().to_rfc3339(),
            "cores": cores,
            "runs": a.runs,
            "concurrency": a.concurrency,
            "seconds": a.seconds,
            "requests": a.requests,
            "rate": a.rate,
            "latency_seconds": a.latency_seconds,
            "latency_connections": a.latency_connections,
            "size": a.size,
            "instances": a.instances,
            "wal_fsync": fsync,
            "peer_description": "bare actix-web handler on the same path: reads the body, answers 202 with a JSON body like Herald's",
            "smoke": a.smoke,
            "warnings": b.warnings,
        });
        let doc = compare::json_rows("http", "", "bare", &meta, &rows);
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `herald-bench http`.
pub(super) fn run(mut a: HttpArgs) -> Result<(), String> {
    if a.smoke {
        a.runs = 1;
        a.concurrency = vec![1, 8];
        a.seconds = a.seconds.min(0.5);
        a.rate = a.rate.min(1_000);
        a.latency_seconds = a.latency_seconds.min(1.0);
        a.latency_connections = a.latency_connections.min(8);
    }
    a.concurrency.sort_unstable();
    a.concurrency.dedup();
    a.ack.dedup();
    if a.concurrency.is_empty() || a.concurrency.iter().any(|c| !(1..=1024).contains(c)) {
        return Err("--concurrency takes values from 1 to 1024".into());
    }
    if a.ack.is_empty() {
        return Err("--ack needs at least one mode".into());
    }
    let in_range = |s: f64| s > 0.0 && s <= 600.0;
    if !in_range(a.seconds) || !in_range(a.latency_seconds) {
        return Err("--seconds and --latency-seconds must be above 0 and at most 600".into());
    }
    if a.rate == 0 || a.requests == 0 || a.rate as f64 * a.latency_seconds > 20_000_000.0 {
        return Err("--rate and --requests must be positive, and --rate x --latency-seconds at most 20,000,000".into());
    }
    if !(1..=512).contains(&a.latency_connections) {
        return Err("--latency-connections takes 1 to 512".into());
    }
    if !payload_size_ok(a.size) {
        return Err(format!(
            "--size {}: use 16, or 32 and more (the payload holds a timestamp)",
            a.size
        ));
    }
    let ports = free_ports(3)?;
    let mut c = super::cluster::start(
        "herald-bench-http",
        vec![(ports[0], ports[1])],
        a.wal_fsync,
        false,
        a.keep,
    )?;
    let mut bare = BareProc::start(ports[2], a.keep)?;
    let started = Instant::now();
    let outcome = actix_rt::System::new().block_on(async {
        let signal = herald::node::shutdown_signal();
        tokio::select! {
            r = scenario(&mut c, &mut bare, &a) => r,
            _ = signal => Err("interrupted".to_string()),
        }
    });
    if outcome.is_err() {
        eprint!("{}{}", c.log_tails(LOG_TAIL), bare.log_tail());
    }
    drop(bare);
    drop(c);
    if outcome.is_ok() {
        println!("done in {:.1} s", started.elapsed().as_secs_f64());
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_deals_every_request_once_at_its_rate() {
        let (total, conns, rate) = (1000u64, 7usize, 5_000u64);
        let mut seen = vec![0u32; total as usize];
        for i in 0..conns {
            let mine: Vec<u64> = connection_schedule(i, conns, total).collect();
            for w in mine.windows(2) {
                // Each connection's requests are conns / rate apart.
                assert_eq!(
                    intended_offset(w[1], rate) - intended_offset(w[0], rate),
                    Duration::from_micros(7 * 200)
                );
            }
            for n in mine {
                seen[n as usize] += 1;
            }
        }
        assert!(seen.iter().all(|s| *s == 1));
        assert_eq!(intended_offset(0, rate), Duration::ZERO);
        assert_eq!(intended_offset(5_000, rate), Duration::from_secs(1));
        assert_eq!(intended_offset(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(connection_schedule(3, 4, 3).count(), 0);
    }

    /// One connection at 1,000/s against a server that answers in 100 µs but stalls 50 ms on the
    /// 10th request: every request due during the stall reports its wait.
    #[test]
    fn latency_from_the_intended_time_counts_the_wait_behind_a_stall() {
        let t0 = Instant::now();
        let (rate, total) = (1_000u64, 100u64);
        let mut free_at = t0;
        let mut from_intended = Vec::new();
        let mut from_sent = Vec::new();
        for n in connection_schedule(0, 1, total) {
            let due = t0 + intended_offset(n, rate);
            let sent = due.max(free_at);
            let service = if n == 10 {
                Duration::from_millis(50)
            } else {
                Duration::from_micros(100)
            };
            let done = sent + service;
            free_at = done;
            from_intended.push(latency_from_intended(due, done).as_nanos() as u64);
            from_sent.push(latency_from_intended(sent, done).as_nanos() as u64);
        }
        from_intended.sort_unstable();
        from_sent.sort_unstable();
        // From the send time only the stalled request is slow: p99 hides the stall.
        assert_eq!(percentile(&from_sent, 0.99), Some(100_000));
        // From the intended time the ~50 requests due during the stall waited: p50 shows it.
        assert!(percentile(&from_intended, 0.5).unwrap() > 1_000_000);
        assert_eq!(percentile(&from_intended, 1.0), Some(50_000_000));
        assert_eq!(latency_from_intended(t0 + Duration::from_millis(1), t0), Duration::ZERO);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), Some(500));
        assert_eq!(percentile(&v, 0.99), Some(990));
        assert_eq!(percentile(&v, 0.999), Some(999));
        assert_eq!(percentile(&v, 1.0), Some(1000));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 0.999), Some(7));
        assert_eq!(percentile(&[1, 2], 0.5), Some(1));
        assert_eq!(percentile(&[], 0.5), None);
        assert!(ms(None).is_nan());
        assert_eq!(ms(Some(1_500_000)), 1.5);
    }

    #[test]
    fn responses_parse_when_complete() {
        let r = b"HTTP/1.1 202 Accepted\r\ncontent-length: 5\r\ncontent-type: application/json\r\n\r\n{\"a\"}";
        let p = parse_response(r).unwrap().unwrap();
        assert_eq!((p.status, p.len, p.close), (202, r.len(), false));
        assert_eq!(&r[p.head..p.len], b"{\"a\"}");
        assert_eq!(parse_response(&r[..r.len() - 1]).unwrap(), None, "body incomplete");
        assert_eq!(parse_response(&r[..20]).unwrap(), None, "head incomplete");
        let mut two = r.to_vec();
        two.extend_from_slice(b"HTTP/1.1 429 Too");
        assert_eq!(parse_response(&two).unwrap().unwrap().len, r.len());
        let close = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_response(close).unwrap().unwrap().close);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert_eq!(
            parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap().len,
            27
        );
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn answers_are_taken_off_the_buffer() {
        let mut buf = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 4\r\n\r\nnopeHTTP/1.1".to_vec();
        let p = parse_response(&buf).unwrap().unwrap();
        let a = Answer::take(&mut buf, &p);
        assert_eq!((a.status, a.text.as_str()), (400, "nope"));
        assert_eq!(buf, b"HTTP/1.1");
        assert!(matches!(outcome(&a), Outcome::Failed(_)));
    }

    #[test]
    fn requests_carry_the_body_and_its_length() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 8080));
        let body = payload(128, 1);
        let r = String::from_utf8(request(addr, "/v1/topics/t/events?ack=none", &body)).unwrap();
        assert!(r.starts_with("POST /v1/topics/t/events?ack=none HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n"));
        assert!(r.contains("content-length: 128\r\n\r\n{\"t\":1,"));
        assert!(r.ends_with(&body));
    }

    #[test]
    fn systems_rotate_run_by_run() {
        let s = [1, 2, 3];
        assert_eq!(rotation(&s, 1), vec![1, 2, 3]);
        assert_eq!(rotation(&s, 2), vec![2, 3, 1]);
        assert_eq!(rotation(&s, 4), vec![1, 2, 3]);
        assert_eq!(rotation(&[9], 5), vec![9]);
    }

    #[test]
    fn the_bare_answer_has_the_shape_of_heralds() {
        let bare = serde_json::to_value(BareAnswer {
            id: BARE_ID,
            topic: "bench.http".into(),
            subscriptions: 1,
        })
        .unwrap();
        let herald = serde_json::to_value(herald::ingress::Published::accepted(
            ulid::Ulid::new().to_string(),
            "bench.http",
            1,
        ))
        .unwrap();
        assert_eq!(bare.to_string().len(), herald.to_string().len());
        let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&bare), keys(&herald));
    }
}
