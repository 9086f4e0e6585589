//! `herald-bench cluster` (the benchmark process) and `herald-bench node` (its node processes).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use metrics::{Counter, Gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::Value;

use super::tls::HeraldPeers;
use super::{percentile, record, BenchNodeArgs, ClusterArgs};
use herald::config::FsyncPolicy;
use herald::handler::{Delivery, HandlerResult};
use herald::harness::{Harness, Ports};
use herald::node::NodeBuilder;

/// Events handled by `bench-sink`.
const SINK_EVENTS: &str = "herald_bench_sink_events_total";
/// Publish → handle latency seen by `bench-sink` (from the `t` field of the event): events per
/// bucket of [`latency_buckets`], label `le` the bucket's upper bound, counts *not* cumulative.
/// One counter per bucket, so the sink pays one atomic addition per event, as the NATS
/// receivers' buckets do (`nats.rs`), instead of the exporter's buffered histogram samples.
const SINK_LATENCY: &str = "herald_bench_sink_latency_events_total";
/// Wall-clock time of the last event `bench-sink` handled on this node.
const SINK_LAST: &str = "herald_bench_sink_last_handled_unix_seconds";
/// Wall-clock time of the first event of each failover round (`r` field) handled on this node.
const SINK_FIRST: &str = "herald_bench_sink_first_handled_unix_seconds";
/// The handler name.
pub(super) const SINK: &str = "bench-sink";
/// The soak's failing handler (see [`BenchFlaky`]).
pub(super) const FLAKY: &str = "bench-flaky";
const TOPIC: &str = "bench.cluster";
const FAILOVER_TOPIC: &str = "bench.failover";
const GROUP: &str = "sink";
/// Requests a paced publisher has in flight at most.
const MAX_INFLIGHT: usize = 32;

/// 10 µs … 100 s, 20 buckets per decade (each 12 % wide).
pub(super) fn latency_buckets() -> Vec<f64> {
    (0..=140).map(|i| 1e-5 * 10f64.powf(f64::from(i) / 20.0)).collect()
}

pub(super) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub(super) fn unix_seconds() -> f64 {
    unix_nanos() as f64 / 1e9
}

// ---------------------------------------------------------------- the node side

struct SinkMetrics {
    events: Counter,
    /// Upper bounds of the latency buckets (the last counter is `+Inf`).
    bounds: Vec<f64>,
    latency: Vec<Counter>,
    last: Gauge,
    rounds: Mutex<HashSet<u64>>,
}

fn sink_metrics() -> &'static SinkMetrics {
    static M: OnceLock<SinkMetrics> = OnceLock::new();
    M.get_or_init(|| SinkMetrics {
        events: metrics::counter!(SINK_EVENTS),
        bounds: latency_buckets(),
        latency: latency_buckets()
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_string()])
            .map(|le| metrics::counter!(SINK_LATENCY, "le" => le))
            .collect(),
        last: metrics::gauge!(SINK_LAST),
        rounds: Mutex::new(HashSet::new()),
    })
}

/// The payload the benchmark publishes: publish time (unix ns), and the failover round if any.
/// Padding fields (`p`) are ignored.
#[derive(serde::Deserialize, Debug, PartialEq)]
pub(super) struct Stamp {
    pub(super) t: u64,
    #[serde(default)]
    pub(super) r: Option<u64>,
}

/// The stamp of an event's data: `{"t": unix_ns, …}`, or a bare integer of unix microseconds
/// (the 16-byte payload, which has no room for an object).
/// Every receiver (Herald's handlers and the NATS subscribers) calls it once per event, so it
/// is cheap in both shapes: a bare integer is read without building a JSON error first.
pub(super) fn stamp_of(data: &[u8]) -> Option<Stamp> {
    if data.first().is_some_and(u8::is_ascii_digit) {
        let us: u64 = std::str::from_utf8(data).ok()?.parse().ok()?;
        return Some(Stamp {
            t: us.saturating_mul(1000),
            r: None,
        });
    }
    serde_json::from_slice::<Stamp>(data).ok()
}

/// Smallest payload that holds an object stamp `{"t":<19 digits>,"p":""}`.
const MIN_OBJECT_PAYLOAD: usize = 32;

/// Whether [`payload`] can make exactly `size` bytes.
pub(super) fn payload_size_ok(size: usize) -> bool {
    size == 16 || size >= MIN_OBJECT_PAYLOAD
}

/// Exactly `size` bytes of JSON stamped with `t_nanos`: a bare 16-digit integer of unix µs for
/// 16 B, else `{"t":ns,"p":"xxx…"}` padded to `size` (see [`payload_size_ok`]).
pub(super) fn payload(size: usize, t_nanos: u64) -> String {
    if size < MIN_OBJECT_PAYLOAD {
        return (t_nanos / 1000).to_string();
    }
    let head = format!("{{\"t\":{t_nanos},\"p\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(size);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// The no-op handler: records the count, the latency and (per round) the first handling time.
struct BenchSink;

impl Actor for BenchSink {
    type Context = Context<Self>;
}

impl Handler<Delivery> for BenchSink {
    type Result = HandlerResult;
    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        let now = unix_nanos();
        let m = sink_metrics();
        m.events.increment(1);
        m.last.set(now as f64 / 1e9);
        if let Some(stamp) = stamp_of(&d.event.data) {
            let seconds = now.saturating_sub(stamp.t) as f64 / 1e9;
            m.latency[m.bounds.partition_point(|b| *b < seconds)].increment(1);
            if slow_limit().is_some_and(|limit| seconds > limit) {
                // On the node's log (the cluster directory's node-<id>.log, kept with --keep).
                eprintln!(
                    "bench-sink slow event: published at {} us (unix), handled {:.3} ms later",
                    stamp.t / 1000,
                    seconds * 1e3
                );
            }
            if let Some(r) = stamp.r {
                if m.rounds.lock().unwrap_or_else(|p| p.into_inner()).insert(r) {
                    metrics::gauge!(SINK_FIRST, "round" => r.to_string()).set(now as f64 / 1e9);
                }
            }
        }
        Ok(())
    }
}

/// `HERALD_BENCH_SLOW_MS`: the sink logs every event handled later than this after it was
/// published (to find where a latency tail comes from: when its slow events were published).
fn slow_limit() -> Option<f64> {
    static LIMIT: OnceLock<Option<f64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let ms: f64 = std::env::var("HERALD_BENCH_SLOW_MS").ok()?.parse().ok()?;
        Some(ms / 1e3)
    })
}

/// A handler that fails some events, for the soak (`soak.rs`): `{"f":1}` fails on every attempt
/// (so it is dead-lettered), `{"f":2}` on its first attempt only (so it is retried); anything
/// else succeeds.
struct BenchFlaky;

impl Actor for BenchFlaky {
    type Context = Context<Self>;
}

#[derive(serde::Deserialize)]
struct Flaky {
    #[serde(default)]
    f: u8,
}

/// Why `bench-flaky` fails the `attempt`-th delivery of an event with `data`, if it does.
pub(super) fn flaky_failure(data: &[u8], attempt: u32) -> Option<&'static str> {
    match serde_json::from_slice::<Flaky>(data).map_or(0, |x| x.f) {
        1 => Some("bench-flaky: this event fails on every attempt"),
        2 if attempt == 1 => Some("bench-flaky: this event fails on its first attempt"),
        _ => None,
    }
}

impl Handler<Delivery> for BenchFlaky {
    type Result = HandlerResult;
    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        match flaky_failure(&d.event.data, d.attempt) {
            Some(why) => Err(herald::handler::HandlerError::msg(why)),
            None => Ok(()),
        }
    }
}

/// Herald's Prometheus recorder plus fine buckets for the sink's latency histogram (the
/// exporter renders histograms without configured buckets as summaries, which cannot be
/// subtracted between runs).
fn install_recorder() -> Result<PrometheusHandle, String> {
    let recorder = PrometheusBuilder::new()
        // The same buckets as herald::metrics::install_prometheus (handler durations are
        // Herald's own histogram, rendered by the node).
        .set_buckets_for_metric(
            Matcher::Full(herald::metrics::PEER_PING_RTT.to_string()),
            &herald::metrics::ping_rtt_buckets(),
        )
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| "a metrics recorder is already installed".to_string())?;
    herald::metrics::describe();
    metrics::describe_counter!(SINK_EVENTS, "Events handled by the bench-sink handler.");
    metrics::describe_counter!(
        SINK_LATENCY,
        "Events bench-sink handled by publish-to-handling latency bucket (le: upper bound in seconds; not cumulative)."
    );
    metrics::describe_gauge!(
        SINK_LAST,
        Unit::Seconds,
        "Wall-clock time of the last event bench-sink handled."
    );
    metrics::describe_gauge!(
        SINK_FIRST,
        Unit::Seconds,
        "Wall-clock time of the first event of a failover round bench-sink handled here."
    );
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("herald-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        })
        .map_err(|e| e.to_string())?;
    Ok(handle)
}

/// `herald-bench node`: `herald node` with the `bench-sink` handler.
pub(super) fn node(a: BenchNodeArgs, builder: NodeBuilder) -> Result<(), String> {
    let config = a.node.load().map_err(|e| e.to_string())?;
    let metrics = install_recorder()?;
    builder
        .config(config)
        .metrics(metrics)
        .handler(SINK, || BenchSink)
        .handler(FLAKY, || BenchFlaky)
        .run()
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------- the benchmark side

pub(super) use herald::harness::free_ports;

/// The node processes of a scenario (`herald-bench node`), in their own directory, which is
/// removed when the cluster is dropped (unless kept); every node still running is SIGKILLed then,
/// also on error, Ctrl-C and panic.
pub(super) type Cluster = Harness;

/// Lines of each node's log printed when a run fails.
pub(super) const LOG_TAIL: usize = 15;

/// Starts one `herald-bench node` process per entry of `ports` ((HTTP, peer) of node 1, 2, …)
/// in a new directory `<tmp>/<name>-<pid>-<n>`; node 1 founds the cluster, the others join it.
/// The peers talk mutual TLS (the harness issues every node a certificate from a CA in
/// `<dir>/tls/`), or plaintext with `insecure` (`--insecure-peers`).
pub(super) fn start(
    name: &str,
    ports: Vec<(u16, u16)>,
    wal_fsync: Option<FsyncPolicy>,
    insecure: bool,
    keep: bool,
) -> Result<Cluster, String> {
    start_with(name, ports, wal_fsync, insecure, keep, &[])
}

/// [`start`] with more arguments for every node.
pub(super) fn start_with(
    name: &str,
    ports: Vec<(u16, u16)>,
    wal_fsync: Option<FsyncPolicy>,
    insecure: bool,
    keep: bool,
    extra: &[String],
) -> Result<Cluster, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    let fsync = wal_fsync.map(|f| match f {
        FsyncPolicy::Always => "always",
        FsyncPolicy::Interval => "interval",
        FsyncPolicy::Never => "never",
    });
    let mut c = Harness::temporary(exe, name)?
        .keep_dir(keep)
        .progress(true)
        .args(fsync.into_iter().flat_map(|f| ["--wal-fsync", f]))
        .args(extra);
    if insecure {
        c = c.insecure_peers();
    }
    if keep {
        eprintln!("the nodes' data and logs are kept in {}", c.dir().display());
    }
    c.start_cluster(ports.len() as u64, &Ports::Fixed(ports))?;
    Ok(c)
}

/// The same cluster on free ports.
pub(super) fn start_on_free_ports(
    name: &str,
    nodes: usize,
    wal_fsync: Option<FsyncPolicy>,
    insecure: bool,
    keep: bool,
) -> Result<Cluster, String> {
    start_on_free_ports_with(name, nodes, wal_fsync, insecure, keep, &[])
}

/// [`start_on_free_ports`] with more arguments for every node.
pub(super) fn start_on_free_ports_with(
    name: &str,
    nodes: usize,
    wal_fsync: Option<FsyncPolicy>,
    insecure: bool,
    keep: bool,
    extra: &[String],
) -> Result<Cluster, String> {
    let p = free_ports(2 * nodes)?;
    start_with(
        name,
        p.chunks(2).map(|c| (c[0], c[1])).collect(),
        wal_fsync,
        insecure,
        keep,
        extra,
    )
}

/// Checks, once the nodes are ready, that they run the peer transport asked for: with mTLS the
/// harness passed each node its certificate (`<dir>/tls/node-<id>/node.pem`) and no node warned
/// about insecure peers; with plaintext every node did.
pub(super) fn check_peers(c: &Cluster, insecure: bool) -> Result<(), String> {
    for n in c.nodes() {
        let log = std::fs::read_to_string(n.log()).map_err(|e| format!("cannot read {}: {e}", n.log().display()))?;
        let cert = super::tls::harness_ca_dir(c.dir()).join(format!("node-{}/node.pem", n.id()));
        if !super::tls::log_shows_peers(&log, insecure) || cert.is_file() == insecure {
            return Err(format!(
                "node {} does not run {} peers (log {}, certificate {})",
                n.id(),
                if insecure { "plaintext" } else { "mTLS" },
                n.log().display(),
                cert.display()
            ));
        }
    }
    Ok(())
}

/// `IP:port` of node `id`'s HTTP API (empty for an unknown node).
pub(super) fn http(c: &Cluster, id: u64) -> String {
    c.node(id).map(|n| n.http().to_string()).unwrap_or_default()
}

/// An HTTP client for the nodes, with at most `limit` connections: pooled connections are dropped
/// after 1 s idle, well before the nodes' 5 s keep-alive, so that none a node closed is reused
/// (awc's own default keeps them 15 s, and a request on one that the node had closed failed with
/// "connector has been disconnected" after a quiet phase of a scenario).
pub(super) fn node_client(timeout: Duration, limit: usize) -> awc::Client {
    awc::Client::builder()
        .timeout(timeout)
        .connector(
            awc::Connector::new()
                .limit(limit)
                .conn_keep_alive(Duration::from_secs(1)),
        )
        .finish()
}

/// awc's default connection limit, for [`node_client`].
pub(super) const CONNECTIONS: usize = 100;

async fn get(client: &awc::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut r = client.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    let body = r.body().limit(64 << 20).await.map_err(|e| format!("GET {url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("GET {url}: {} {}", r.status(), String::from_utf8_lossy(&body)));
    }
    Ok(body.to_vec())
}

/// `GET url` as text.
pub(super) async fn get_text(client: &awc::Client, url: &str) -> Result<String, String> {
    String::from_utf8(get(client, url).await?).map_err(|e| format!("GET {url}: {e}"))
}

pub(super) async fn get_json(client: &awc::Client, url: &str) -> Result<Value, String> {
    serde_json::from_slice(&get(client, url).await?).map_err(|e| format!("GET {url}: {e}"))
}

/// The sink's figures on one node, from its `/metrics`.
#[derive(Default, Clone, Debug)]
pub(super) struct Sink {
    pub(super) events: f64,
    /// Wall-clock time (unix s) of the last handled event.
    pub(super) last: f64,
    /// Cumulative bucket counts by upper bound (`f64::to_bits` orders non-negative floats).
    pub(super) buckets: BTreeMap<u64, f64>,
    /// First handling time per failover round.
    first: BTreeMap<u64, f64>,
}

impl Sink {
    pub(super) fn new(events: f64, last: f64, buckets: BTreeMap<u64, f64>) -> Sink {
        Sink {
            events,
            last,
            buckets,
            first: BTreeMap::new(),
        }
    }
}

/// Where a run's events are received: a snapshot of every receiver's counters.
pub(super) trait Sinks {
    async fn scrape(&self) -> Result<Vec<Sink>, String>;
}

/// The `bench-sink` handlers of a cluster, read from the nodes' `/metrics`.
struct NodeSinks<'a> {
    c: &'a Cluster,
    client: &'a awc::Client,
}

impl Sinks for NodeSinks<'_> {
    async fn scrape(&self) -> Result<Vec<Sink>, String> {
        scrape_all(self.c, self.client).await
    }
}

fn parse_metrics(text: &str) -> Sink {
    let mut s = Sink::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else { continue };
        if name == SINK_EVENTS {
            s.events = v;
        } else if name == SINK_LAST {
            s.last = v;
        } else if let Some(le) = name
            .strip_prefix(SINK_LATENCY)
            .and_then(|r| r.strip_prefix("{le=\""))
            .and_then(|r| r.strip_suffix("\"}"))
        {
            let le = if le.contains("Inf") {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            if le >= 0.0 {
                *s.buckets.entry(le.to_bits()).or_default() += v;
            }
        } else if let Some(r) = name
            .strip_prefix(SINK_FIRST)
            .and_then(|r| r.strip_prefix("{round=\""))
            .and_then(|r| r.strip_suffix("\"}"))
        {
            if let Ok(r) = r.parse() {
                s.first.insert(r, v);
            }
        }
    }
    // Per-bucket counts to cumulative ones (bounds in order: `to_bits` orders non-negative floats).
    let mut cumulative = 0.0;
    for count in s.buckets.values_mut() {
        cumulative += *count;
        *count = cumulative;
    }
    s
}

pub(super) async fn scrape(client: &awc::Client, http: &str) -> Result<Sink, String> {
    let body = get(client, &format!("http://{http}/metrics")).await?;
    Ok(parse_metrics(&String::from_utf8_lossy(&body)))
}

async fn scrape_all(c: &Cluster, client: &awc::Client) -> Result<Vec<Sink>, String> {
    let mut out = Vec::new();
    for n in c.nodes() {
        out.push(scrape(client, n.http()).await?);
    }
    Ok(out)
}

/// Every node's ping round trips (`herald_peer_ping_rtt_seconds`, all peers summed) as one
/// cumulative histogram: the control plane's latency as the failure detector sees it.
async fn ping_rtt(c: &Cluster, client: &awc::Client) -> Result<BTreeMap<u64, f64>, String> {
    let mut sum = BTreeMap::new();
    for n in c.nodes() {
        let body = get(client, &format!("http://{}/metrics", n.http())).await?;
        for (le, count) in ping_buckets(&String::from_utf8_lossy(&body)) {
            *sum.entry(le).or_insert(0.0) += count;
        }
    }
    Ok(sum)
}

/// The `(upper bound bits, cumulative count)` pairs of `herald_peer_ping_rtt_seconds` in a
/// Prometheus text exposition, one pair per bucket line (a line per peer).
fn ping_buckets(text: &str) -> Vec<(u64, f64)> {
    let prefix = format!("{}_bucket{{", herald::metrics::PEER_PING_RTT);
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let le = labels.split(',').find_map(|l| l.trim().strip_prefix("le=\""))?;
            let le = le.trim_end_matches('"');
            let le = if le.contains("Inf") {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le.to_bits(), value.trim().parse().ok()?))
        })
        .collect()
}

/// What a histogram gained between two scrapes.
fn since(before: &BTreeMap<u64, f64>, after: &BTreeMap<u64, f64>) -> BTreeMap<u64, f64> {
    after
        .iter()
        .map(|(le, n)| (*le, n - before.get(le).copied().unwrap_or(0.0)))
        .collect()
}

/// The `q` quantile (seconds) of a cumulative histogram, interpolated inside its bucket.
pub(super) fn quantile(buckets: &BTreeMap<u64, f64>, q: f64) -> f64 {
    let total = buckets.values().copied().fold(0.0, f64::max);
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (&bits, &count) in buckets {
        let le = f64::from_bits(bits);
        if count >= rank {
            if le.is_infinite() {
                return lo;
            }
            let frac = if count > below {
                (rank - below) / (count - below)
            } else {
                1.0
            };
            return lo + (le - lo) * frac;
        }
        (lo, below) = (le, count);
    }
    lo
}

/// Per-bucket sum over nodes of `after - before`.
pub(super) fn histogram_delta(before: &[Sink], after: &[Sink]) -> BTreeMap<u64, f64> {
    let mut out = BTreeMap::new();
    for (i, a) in after.iter().enumerate() {
        for (le, count) in &a.buckets {
            let was = before.get(i).and_then(|b| b.buckets.get(le)).copied().unwrap_or(0.0);
            *out.entry(*le).or_insert(0.0) += count - was;
        }
    }
    out
}

/// What a publisher did.
#[derive(Default, Clone, Debug)]
pub(super) struct Sent {
    /// Events the system took (HTTP 2xx, a flushed NATS publish, a JetStream ack).
    pub(super) accepted: u64,
    pub(super) requests: u64,
    /// 429/503 answers (the batch was retried, or dropped by a paced publisher).
    pub(super) overloaded: u64,
    pub(super) failed: u64,
    pub(super) error: Option<String>,
}

enum Answer {
    Accepted,
    Overloaded,
    Failed(String),
}

/// What each event of a batch holds.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Body {
    /// The failover round (`"r"`).
    round: Option<u64>,
    /// Exactly this many bytes per event (see [`payload`]); else the bare stamp.
    size: Option<usize>,
}

impl Body {
    pub(super) fn sized(size: usize) -> Body {
        Body {
            round: None,
            size: Some(size),
        }
    }
}

/// `[{"t":now},…]` (with `"r":round` for failover rounds), or `n` [`payload`]s of `body.size`.
fn batch_body(n: usize, body: Body) -> String {
    let t = unix_nanos();
    let one = match (body.round, body.size) {
        (Some(r), _) => format!("{{\"t\":{t},\"r\":{r}}}"),
        (None, Some(size)) => payload(size, t),
        (None, None) => format!("{{\"t\":{t}}}"),
    };
    let mut s = String::with_capacity(n * (one.len() + 1) + 2);
    s.push('[');
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&one);
    }
    s.push(']');
    s
}

async fn post_batch(client: &awc::Client, url: &str, n: usize, body: Body) -> Answer {
    let sent = client
        .post(url)
        .insert_header(("content-type", "application/json"))
        .send_body(batch_body(n, body))
        .await;
    match sent {
        Ok(mut r) => {
            let body = r.body().limit(64 << 20).await.unwrap_or_default();
            let status = r.status().as_u16();
            match status {
                200..=299 => Answer::Accepted,
                429 | 503 => Answer::Overloaded,
                _ => Answer::Failed(format!("{status} {}", String::from_utf8_lossy(&body))),
            }
        }
        Err(e) => Answer::Failed(e.to_string()),
    }
}

/// `connections` concurrent publishers send `total` events in batches as fast as the node
/// takes them (a 429 is retried after 2 ms), until `deadline`.
async fn saturate(
    client: &awc::Client,
    url: &str,
    total: u64,
    batch: usize,
    body: Body,
    connections: usize,
    deadline: Instant,
) -> Sent {
    let next = Rc::new(Cell::new(0u64));
    let sent = Rc::new(RefCell::new(Sent::default()));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, url, next, sent) = (client.clone(), url.to_string(), next.clone(), sent.clone());
        tasks.push(actix_rt::spawn(async move {
            loop {
                let start = next.get();
                if start >= total || Instant::now() >= deadline {
                    return;
                }
                let n = (total - start).min(batch as u64);
                next.set(start + n);
                let mut failures = 0;
                loop {
                    if Instant::now() >= deadline {
                        return;
                    }
                    let answer = post_batch(&client, &url, n as usize, body).await;
                    let pause = {
                        let mut s = sent.borrow_mut();
                        s.requests += 1;
                        match answer {
                            Answer::Accepted => {
                                s.accepted += n;
                                None
                            }
                            Answer::Overloaded => {
                                s.overloaded += 1;
                                Some(Duration::from_millis(2))
                            }
                            Answer::Failed(e) => {
                                s.failed += 1;
                                s.error = Some(e);
                                failures += 1;
                                Some(Duration::from_millis(50))
                            }
                        }
                    };
                    match pause {
                        None => break,
                        Some(_) if failures >= 5 => return,
                        Some(d) => actix_rt::time::sleep(d).await,
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let s = sent.borrow().clone();
    s
}

/// Publishes `rate` events/s (a batch every 10 ms) until `stop` is set or `deadline`, with at
/// most [`MAX_INFLIGHT`] requests outstanding; a refused batch is counted, not retried.
async fn paced(
    client: awc::Client,
    url: String,
    rate: u64,
    batch: usize,
    body: Body,
    stop: Rc<Cell<bool>>,
    deadline: Instant,
) -> Sent {
    let started = Instant::now();
    let inflight = Rc::new(Cell::new(0usize));
    let sent = Rc::new(RefCell::new(Sent::default()));
    let mut issued = 0u64;
    let mut interval = actix_rt::time::interval(Duration::from_millis(10));
    while !stop.get() && Instant::now() < deadline {
        interval.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        let mut requests = 0;
        while issued < due && inflight.get() < MAX_INFLIGHT && requests < 16 {
            let n = (due - issued).min(batch as u64);
            issued += n;
            requests += 1;
            inflight.set(inflight.get() + 1);
            let (client, url, inflight, sent) = (client.clone(), url.clone(), inflight.clone(), sent.clone());
            actix_rt::spawn(async move {
                let answer = post_batch(&client, &url, n as usize, body).await;
                let mut s = sent.borrow_mut();
                s.requests += 1;
                match answer {
                    Answer::Accepted => s.accepted += n,
                    Answer::Overloaded => s.overloaded += 1,
                    Answer::Failed(e) => {
                        s.failed += 1;
                        s.error = Some(e);
                    }
                }
                inflight.set(inflight.get() - 1);
            });
        }
    }
    let wait = Instant::now() + Duration::from_secs(35);
    while inflight.get() > 0 && Instant::now() < wait {
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    let s = sent.borrow().clone();
    s
}

/// One measured run.
pub(super) struct Run {
    name: String,
    pub(super) sent: Sent,
    pub(super) handled: u64,
    /// Handled events / (last handled − publish start).
    pub(super) rate: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) p999_ms: f64,
    /// Events handled on the ingress node (must be 0: it runs no instance).
    on_ingress: u64,
}

/// Runs `publish`, waits until the sink has handled what was accepted, and reads the figures.
async fn measure(
    c: &Cluster,
    client: &awc::Client,
    ingress: u64,
    name: String,
    publish: impl std::future::Future<Output = Sent>,
) -> Result<Run, String> {
    let at = c
        .nodes()
        .iter()
        .position(|n| n.id() == ingress)
        .ok_or_else(|| format!("node {ingress} is not one of the started nodes"))?;
    measure_with(&NodeSinks { c, client }, Some(at), name, publish).await
}

/// Runs `publish`, waits until `sinks` have received what was accepted (or made no progress for
/// 10 s), and reads the figures; `ingress` is the index of a sink that must receive nothing.
pub(super) async fn measure_with(
    sinks: &impl Sinks,
    ingress: Option<usize>,
    name: String,
    publish: impl std::future::Future<Output = Sent>,
) -> Result<Run, String> {
    let before = sinks.scrape().await?;
    let start = unix_seconds();
    let sent = publish.await;
    if sent.accepted == 0 {
        return Err(format!(
            "{name}: no event was accepted ({} requests, {} refused, {} failed; last error: {})",
            sent.requests,
            sent.overloaded,
            sent.failed,
            sent.error.as_deref().unwrap_or("-")
        ));
    }
    let count = |s: &[Sink]| s.iter().map(|x| x.events).sum::<f64>();
    let base = count(&before);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut progress = (0u64, Instant::now());
    let after = loop {
        let now = sinks.scrape().await?;
        let handled = (count(&now) - base) as u64;
        if handled >= sent.accepted || Instant::now() > deadline {
            break now;
        }
        if handled > progress.0 {
            progress = (handled, Instant::now());
        } else if progress.1.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "{name}: {handled} of {} accepted events handled; no progress for 10 s",
                sent.accepted
            );
            break now;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    };
    let handled = (count(&after) - base) as u64;
    let last = after.iter().map(|s| s.last).fold(0.0, f64::max);
    let hist = histogram_delta(&before, &after);
    let on_ingress = ingress.map_or(0.0, |i| after[i].events - before[i].events) as u64;
    Ok(Run {
        name,
        sent,
        handled,
        rate: handled as f64 / (last - start).max(1e-9),
        p50_ms: quantile(&hist, 0.5) * 1000.0,
        p99_ms: quantile(&hist, 0.99) * 1000.0,
        p999_ms: quantile(&hist, 0.999) * 1000.0,
        on_ingress,
    })
}

pub(super) async fn subscribe(c: &Cluster, client: &awc::Client, topic: &str, instances: u32) -> Result<(), String> {
    let spec = serde_json::json!({
        "topic": topic, "group": GROUP, "handler": {"kind": "rust", "name": SINK}, "instances": instances,
    });
    create_subscription(c, client, &spec).await
}

/// `POST /v1/subscriptions` with `spec` on node 1: an error with the answer unless it is a 2xx.
pub(super) async fn create_subscription(
    c: &Cluster,
    client: &awc::Client,
    spec: &serde_json::Value,
) -> Result<(), String> {
    let url = format!("http://{}/v1/subscriptions", http(c, 1));
    let mut r = client
        .post(&url)
        .send_json(spec)
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    if !r.status().is_success() {
        let body = r.body().await.unwrap_or_default();
        return Err(format!("POST {url}: {} {}", r.status(), String::from_utf8_lossy(&body)));
    }
    Ok(())
}

/// The membership and `topic`'s placement as every running node sees them: `Some((epoch,
/// nodes))` when all agree that the given nodes are all up and there is a leader.
async fn agreed(c: &Cluster, client: &awc::Client, topic: &str) -> Option<(u64, Vec<u64>)> {
    let mut seen: Option<(u64, Vec<u64>)> = None;
    for n in c.nodes() {
        let view = get_json(client, &format!("http://{}/v1/cluster", n.http()))
            .await
            .ok()?;
        view["leader"].as_u64()?;
        let members = view["members"].as_array()?;
        let up = members.iter().filter(|m| m["status"] == "up").count();
        if members.len() != c.nodes().len() || up != c.nodes().len() {
            return None;
        }
        let places = get_json(client, &format!("http://{}/v1/cluster/placements", n.http()))
            .await
            .ok()?;
        let p = places
            .as_array()?
            .iter()
            .find(|p| p["topic"] == topic && p["group"] == GROUP)?;
        let nodes: Vec<u64> = p["nodes"].as_array()?.iter().filter_map(Value::as_u64).collect();
        let this = (p["epoch"].as_u64()?, nodes);
        if this.1.is_empty() || seen.as_ref().is_some_and(|s| *s != this) {
            return None;
        }
        seen = Some(this);
    }
    seen
}

/// Waits until every node agrees on `topic`'s placement, every member is up, and nothing
/// changed for `quiet`; returns the placed nodes.
pub(super) async fn settled(
    c: &Cluster,
    client: &awc::Client,
    topic: &str,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<u64>, String> {
    let started = Instant::now();
    let mut last: Option<((u64, Vec<u64>), Instant)> = None;
    loop {
        match agreed(c, client, topic).await {
            Some(now) => match &last {
                Some((was, since)) if *was == now => {
                    if since.elapsed() >= quiet {
                        return Ok(now.1);
                    }
                }
                _ => last = Some((now, Instant::now())),
            },
            None => last = None,
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "the nodes did not agree on the placement of {topic} with every member up within {timeout:?}"
            ));
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

/// `herald-bench cluster`.
pub(super) fn run(mut a: ClusterArgs) -> Result<(), String> {
    if a.smoke {
        a.events = a.events.min(20_000);
        a.seconds = a.seconds.min(10);
        a.latency_rate = a.latency_rate.min(5_000);
        a.latency_seconds = 1;
        a.failovers = a.failovers.min(2);
    }
    if !(1..=1000).contains(&a.batch) {
        return Err("--batch must be 1 to 1000 (the nodes' http.max_batch_events)".into());
    }
    if a.connections == 0 || a.events == 0 || a.latency_rate == 0 || a.failover_rate == 0 {
        return Err("--connections, --events, --latency-rate and --failover-rate must be positive".into());
    }
    if a.tracing_rounds > 0 {
        return tracing_cost(&a);
    }
    if u32::from(a.base_port) + 102 > u32::from(u16::MAX) || a.base_port < 1024 {
        return Err(format!(
            "--base-port {} leaves no room for 3 HTTP and 3 peer ports",
            a.base_port
        ));
    }
    // A node of another cluster on these ports would be joined (and confuse every figure).
    for port in (0..3).flat_map(|i| [a.base_port + i, a.base_port + 100 + i]) {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .map_err(|e| format!("port {port} is not free ({e}); choose other ports with --base-port"))?;
    }
    let ports = (0..3).map(|i| (a.base_port + i, a.base_port + 100 + i)).collect();
    let insecure = a.herald_peers == HeraldPeers::Plaintext;
    let mut c = start("herald-bench-cluster", ports, a.wal_fsync, insecure, a.keep)?;
    let mut plain = match a.herald_peers {
        HeraldPeers::Both => Some(start_on_free_ports(
            "herald-bench-cluster-plaintext",
            3,
            a.wal_fsync,
            true,
            a.keep,
        )?),
        _ => None,
    };
    let outcome = actix_rt::System::new().block_on(async {
        let signal = herald::node::shutdown_signal();
        tokio::select! {
            r = scenario(&mut c, plain.as_mut(), &a) => r,
            _ = signal => Err("interrupted".to_string()),
        }
    });
    if outcome.is_err() {
        c.print_logs(LOG_TAIL);
        if let Some(p) = &plain {
            p.print_logs(LOG_TAIL);
        }
    }
    drop(plain);
    drop(c);
    outcome
}

/// An OTLP/HTTP sink for `--tracing-rounds`: answers every request 200 after reading its body
/// (discarded), on 127.0.0.1:0, one thread per connection; counts the requests and body bytes.
fn otlp_sink() -> Result<(String, std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>), String> {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("OTLP sink: {e}"))?;
    let url = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
    let counts: std::sync::Arc<[AtomicU64; 2]> = std::sync::Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let c = counts.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                c[0].fetch_add(1, Ordering::Relaxed);
                c[1].fetch_add(len as u64, Ordering::Relaxed);
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            });
        }
    });
    Ok((url, counts))
}

/// `--tracing-rounds`: the cost of traces on cross-node ack=none throughput (see the flag).
fn tracing_cost(a: &ClusterArgs) -> Result<(), String> {
    let (sink, counts) = otlp_sink()?;
    let insecure = a.herald_peers == HeraldPeers::Plaintext;
    let variants: [(&str, Vec<String>); 3] = [
        ("tracing off", Vec::new()),
        (
            "tracing 1 %",
            vec![
                "--otlp-endpoint".into(),
                sink.clone(),
                "--trace-sample-ratio".into(),
                "0.01".into(),
            ],
        ),
        (
            "tracing 100 %",
            vec![
                "--otlp-endpoint".into(),
                sink.clone(),
                "--trace-sample-ratio".into(),
                "1".into(),
            ],
        ),
    ];
    let mut clusters = Vec::new();
    for (i, (name, extra)) in variants.iter().enumerate() {
        let c = start_on_free_ports_with(
            &format!("herald-bench-trace-{i}"),
            3,
            a.wal_fsync,
            insecure,
            a.keep,
            extra,
        )?;
        clusters.push((*name, c));
    }
    let outcome = actix_rt::System::new().block_on(async {
        let mut targets = Vec::new();
        for (name, c) in clusters.iter_mut() {
            let t = prepare(c, a.connections, a.instances).await?;
            println!(
                "{name}: publishing to node {}, {SINK} on nodes {:?}",
                t.ingress, t.hosts
            );
            let warm = (a.events / 10).clamp(1_000, 50_000);
            t.max_rate(
                c,
                "warm-up".into(),
                "none",
                Body::default(),
                warm,
                a.batch,
                a.connections,
                a.seconds,
            )
            .await?;
            targets.push(t);
        }
        println!(
            "\ncross-node ack=none max rate, {} events per run, batches of {}, {} connections, {} rounds \
             (off, 1 %, 100 % in turn)\n",
            a.events, a.batch, a.connections, a.tracing_rounds
        );
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 3];
        for round in 1..=a.tracing_rounds {
            for (i, ((name, c), t)) in clusters.iter().zip(&targets).enumerate() {
                let run = t
                    .max_rate(
                        c,
                        format!("{name}, round {round}"),
                        "none",
                        Body::default(),
                        a.events,
                        a.batch,
                        a.connections,
                        a.seconds,
                    )
                    .await?;
                println!(
                    "{:<28} {:>10.0} events/s  ({} accepted, {} handled)",
                    run.name, run.rate, run.sent.accepted, run.handled
                );
                rates[i].push(run.rate);
            }
        }
        let medians: Vec<f64> = rates.into_iter().map(|r| super::median(r).0).collect();
        println!();
        for (i, (name, _)) in clusters.iter().enumerate() {
            println!(
                "{name:<14} median {:>10.0} events/s   ratio to off {:.3}   cost {:+.1} %",
                medians[i],
                medians[i] / medians[0],
                (1.0 - medians[i] / medians[0]) * 100.0
            );
        }
        let client = node_client(Duration::from_secs(5), CONNECTIONS);
        for (name, c) in clusters.iter().skip(1) {
            let mut dropped = 0.0;
            for n in c.nodes() {
                let text = get_text(&client, &format!("{}/metrics", n.url()))
                    .await
                    .unwrap_or_default();
                dropped += text
                    .lines()
                    .filter(|l| l.starts_with(herald::metrics::TRACE_SPANS_DROPPED))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>();
            }
            println!("{name}: {dropped:.0} spans dropped (herald_trace_spans_dropped_total, all nodes)");
        }
        println!(
            "OTLP sink: {} export requests, {} MB",
            counts[0].load(std::sync::atomic::Ordering::Relaxed),
            counts[1].load(std::sync::atomic::Ordering::Relaxed) / 1_000_000
        );
        Ok::<(), String>(())
    });
    if outcome.is_err() {
        for (_, c) in &clusters {
            c.print_logs(LOG_TAIL);
        }
    }
    outcome
}

/// A ready cluster with the throughput subscription placed, and the clients that drive it.
pub(super) struct Target {
    client: awc::Client,
    poll: awc::Client,
    /// The node the publisher talks to (it runs no instance of the subscription).
    pub(super) ingress: u64,
    /// The nodes running the subscription's instances.
    pub(super) hosts: Vec<u64>,
}

/// Waits for the nodes, subscribes `bench-sink` x`instances` to the throughput topic, waits for
/// the placement to settle and picks an ingress node that runs no instance.
pub(super) async fn prepare(c: &mut Cluster, connections: usize, instances: u32) -> Result<Target, String> {
    let client = node_client(Duration::from_secs(30), connections + MAX_INFLIGHT + 8);
    let poll = node_client(Duration::from_secs(2), CONNECTIONS);
    c.wait_ready(Duration::from_secs(60)).await?;
    subscribe(c, &client, TOPIC, instances).await?;
    let hosts = settled(c, &poll, TOPIC, Duration::from_millis(500), Duration::from_secs(60)).await?;
    let ingress = c
        .ids()
        .into_iter()
        .find(|id| !hosts.contains(id))
        .ok_or("every node runs an instance; no ingress node is left")?;
    Ok(Target {
        client,
        poll,
        ingress,
        hosts,
    })
}

impl Target {
    fn url(&self, c: &Cluster, ack: &str) -> String {
        format!(
            "http://{}/v1/topics/{TOPIC}/events/batch?ack={ack}",
            http(c, self.ingress)
        )
    }

    /// `events` events in HTTP batches over `connections` connections as fast as the ingress
    /// takes them (for at most `seconds`), until the handlers have seen them.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn max_rate(
        &self,
        c: &Cluster,
        name: String,
        ack: &str,
        body: Body,
        events: u64,
        batch: usize,
        connections: usize,
        seconds: u64,
    ) -> Result<Run, String> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let url = self.url(c, ack);
        let publish = saturate(&self.client, &url, events, batch, body, connections, deadline);
        measure(c, &self.poll, self.ingress, name, publish).await
    }

    /// `rate` events/s for `seconds` (a batch every 10 ms), until the handlers have seen them.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn paced(
        &self,
        c: &Cluster,
        name: String,
        ack: &str,
        body: Body,
        rate: u64,
        batch: usize,
        seconds: u64,
    ) -> Result<Run, String> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let stop = Rc::new(Cell::new(false));
        let publish = paced(self.client.clone(), self.url(c, ack), rate, batch, body, stop, deadline);
        measure(c, &self.poll, self.ingress, name, publish).await
    }
}

/// The suffix of the names of the runs made on the plaintext cluster of `--herald-peers both`.
const PLAINTEXT_RUN: &str = ", plaintext peers";

async fn scenario(c: &mut Cluster, mut plain: Option<&mut Cluster>, a: &ClusterArgs) -> Result<(), String> {
    let insecure = a.herald_peers == HeraldPeers::Plaintext;
    let t = prepare(c, a.connections, a.instances).await?;
    check_peers(c, insecure)?;
    let (ingress, hosts) = (t.ingress, &t.hosts);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "herald-bench cluster: 3 herald processes on 127.0.0.1 (http {}-{}, peer {}-{}), peers {}, {cores} cores, wal.fsync={}",
        a.base_port,
        a.base_port + 2,
        u32::from(a.base_port) + 100,
        u32::from(a.base_port) + 102,
        if insecure {
            "plaintext (--insecure-peers)"
        } else {
            "mutual TLS 1.3 (checked)"
        },
        match a.wal_fsync {
            Some(FsyncPolicy::Never) => "never",
            _ => "always",
        }
    );
    let plain_target = match plain.as_deref_mut() {
        Some(p) => {
            let pt = prepare(p, a.connections, a.instances).await?;
            check_peers(p, true)?;
            println!(
                "and for the max-rate runs, alternating with it: 3 more processes with plaintext peers (--insecure-peers), \
                 publishing to node {} of those, {SINK} on nodes {:?}",
                pt.ingress, pt.hosts
            );
            Some(pt)
        }
        None => None,
    };

    println!(
        "subscription {TOPIC}/{GROUP} -> {SINK} x{} on nodes {hosts:?}; publishing to node {ingress} (batches of {}, {} connections)\n",
        a.instances, a.batch, a.connections
    );

    // Warm-up: connections, the peer links' windows, the WAL file.
    let warm = (a.events / 10).clamp(1_000, 50_000);
    let body = Body::default();
    t.max_rate(
        c,
        "warm-up".into(),
        "none",
        body,
        warm,
        a.batch,
        a.connections,
        a.seconds,
    )
    .await?;
    if let (Some(p), Some(pt)) = (plain.as_deref(), &plain_target) {
        pt.max_rate(
            p,
            "warm-up".into(),
            "none",
            body,
            warm,
            a.batch,
            a.connections,
            a.seconds,
        )
        .await?;
    }

    // Control-plane latency: ping round trips over a quiet window, then during the ack=none
    // max-rate run (pings travel on the peer bus's control connections, events on its events
    // connections).
    let client = node_client(Duration::from_secs(10), CONNECTIONS);
    let quiet = Duration::from_secs(a.seconds.clamp(2, 10));
    let before = ping_rtt(c, &client).await?;
    tokio::time::sleep(quiet).await;
    let idle = since(&before, &ping_rtt(c, &client).await?);
    let mut loaded = BTreeMap::new();
    let mut runs = Vec::new();
    for ack in ["none", "accepted"] {
        // With a plaintext cluster too: it goes second for ack=none, first for ack=accepted.
        let plain_name = format!("ack={ack}, max rate{PLAINTEXT_RUN}");
        if let (Some(p), Some(pt), "accepted") = (plain.as_deref(), &plain_target, ack) {
            runs.push(
                pt.max_rate(
                    p,
                    plain_name.clone(),
                    ack,
                    body,
                    a.events,
                    a.batch,
                    a.connections,
                    a.seconds,
                )
                .await?,
            );
        }
        let name = format!("ack={ack}, max rate");
        let before = ping_rtt(c, &client).await?;
        runs.push(
            t.max_rate(c, name, ack, body, a.events, a.batch, a.connections, a.seconds)
                .await?,
        );
        if ack == "none" {
            loaded = since(&before, &ping_rtt(c, &client).await?);
        }
        if let (Some(p), Some(pt), "none") = (plain.as_deref(), &plain_target, ack) {
            runs.push(
                pt.max_rate(p, plain_name, ack, body, a.events, a.batch, a.connections, a.seconds)
                    .await?,
            );
        }
    }
    let rtt_ms = |h: &BTreeMap<u64, f64>, q: f64| quantile(h, q) * 1e3;
    let pings = |h: &BTreeMap<u64, f64>| h.values().copied().fold(0.0, f64::max);
    println!(
        "control plane (ping round trip, every node to every peer): idle {:.0} pings p50 {} ms p99 {} ms; \
         under ack=none max-rate load {:.0} pings p50 {} ms p99 {} ms\n",
        pings(&idle),
        fmt_ms(rtt_ms(&idle, 0.5)),
        fmt_ms(rtt_ms(&idle, 0.99)),
        pings(&loaded),
        fmt_ms(rtt_ms(&loaded, 0.5)),
        fmt_ms(rtt_ms(&loaded, 0.99)),
    );
    for ack in ["none", "accepted"] {
        let name = format!("ack={ack}, paced {}/s", a.latency_rate);
        runs.push(
            t.paced(c, name, ack, body, a.latency_rate, a.batch, a.latency_seconds)
                .await?,
        );
    }
    let goal = |name: &str, rate: f64| match name {
        "ack=none, max rate" => (">= 500000", if rate >= 500_000.0 { "yes" } else { "no" }),
        "ack=accepted, max rate" => (">= 100000", if rate >= 100_000.0 { "yes" } else { "no" }),
        _ => ("-", "-"),
    };
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let (g, met) = goal(&r.name, r.rate);
            let lost = r.sent.accepted.saturating_sub(r.handled);
            vec![
                r.name.clone(),
                r.sent.accepted.to_string(),
                r.handled.to_string(),
                format!("{:.0}", r.rate),
                g.to_string(),
                met.to_string(),
                fmt_ms(r.p50_ms),
                fmt_ms(r.p99_ms),
                r.sent.overloaded.to_string(),
                if lost > 0 { lost.to_string() } else { "0".into() },
            ]
        })
        .collect();
    println!("cross-node: publisher -> node {ingress} (HTTP batch) -> peer transport -> {SINK} on nodes {hosts:?}");
    println!(
        "{}",
        herald::cli::table(
            &[
                "RUN",
                "ACCEPTED",
                "HANDLED",
                "EVENTS/S",
                "GOAL EV/S",
                "MET",
                "P50 MS",
                "P99 MS",
                "429/503",
                "MISSING",
            ],
            &rows
        )
    );
    println!(
        "(events/s = handled / (last handled - publish start); latency = handling time - publish time of \
         the batch, from {} fine buckets, ±6 %)",
        latency_buckets().len()
    );
    for ack in ["none", "accepted"] {
        let rate = |name: String| runs.iter().find(|r| r.name == name).map(|r| r.rate);
        let mtls = rate(format!("ack={ack}, max rate"));
        if let (Some(m), Some(p)) = (mtls, rate(format!("ack={ack}, max rate{PLAINTEXT_RUN}"))) {
            println!(
                "ack={ack} max rate: mTLS / plaintext peers = {:.2}x{}",
                m / p,
                if ack == "none" {
                    " (goal >= 0.85x: within 15 %)"
                } else {
                    ""
                }
            );
        }
    }
    for r in &runs {
        if r.on_ingress > 0 {
            println!(
                "warning: {} events of '{}' were handled on the ingress node",
                r.on_ingress, r.name
            );
        }
        if r.sent.failed > 0 {
            println!(
                "warning: '{}' had {} failed requests; last error: {}",
                r.name,
                r.sent.failed,
                r.sent.error.as_deref().unwrap_or("-")
            );
        }
    }
    println!();

    let rounds = failover(c, &t.client, &t.poll, a.failovers, a.failover_rate, a.batch).await?;
    let row = |name: &str, mut ms: Vec<f64>| {
        ms.sort_by(|x, y| x.total_cmp(y));
        let p99 = percentile(&ms, 0.99);
        let met = match ms.is_empty() {
            true => "-",
            false if p99 <= 1000.0 => "yes",
            false => "no",
        };
        vec![
            name.to_string(),
            ms.len().to_string(),
            fmt_ms(percentile(&ms, 0.5)),
            fmt_ms(p99),
            format!(
                "{}-{}",
                fmt_ms(ms.first().copied().unwrap_or(f64::NAN)),
                fmt_ms(ms.last().copied().unwrap_or(f64::NAN))
            ),
            "p99 <= 1000".to_string(),
            met.to_string(),
        ]
    };
    let pick = |leader: bool| rounds.iter().filter(|r| r.1 == leader).map(|r| r.0).collect::<Vec<_>>();
    let mut rows = vec![row("all rounds", rounds.iter().map(|r| r.0).collect())];
    if !pick(true).is_empty() && !pick(false).is_empty() {
        rows.push(row("killed node was a follower", pick(false)));
        rows.push(row("killed node was the leader", pick(true)));
    }
    println!(
        "\nfailover: SIGKILL the node running {FAILOVER_TOPIC}/{GROUP} (1 instance) while {} events/s \
         (ack=accepted) go to a surviving node; kill -> first event handled on another node",
        a.failover_rate
    );
    println!(
        "{}",
        herald::cli::table(
            &["ROUNDS", "N", "P50 MS", "P99 MS", "MIN-MAX MS", "GOAL MS", "MET"],
            &rows
        )
    );
    println!(
        "for context, documented defaults of peers (not run here): Akka Cluster ~5 s to unreachable, \
         ~25 s to downed; Orleans ~15 s to declare a silo dead; Dapr actors ~3 s"
    );
    if let Some(path) = &a.json {
        let mut rows = Vec::new();
        for r in &runs {
            let (ack, what) = r.name.split_once(", ").unwrap_or((&r.name, ""));
            if what.starts_with("max rate") {
                rows.push(record::row(
                    "cluster",
                    ack,
                    what,
                    "events_per_second",
                    true,
                    &[r.rate],
                    None,
                ));
            } else {
                for (metric, v) in [("p50_ms", r.p50_ms), ("p99_ms", r.p99_ms)] {
                    rows.push(record::row("cluster", ack, what, metric, false, &[v], None));
                }
            }
        }
        for (case, h) in [
            ("ping RTT, idle", &idle),
            ("ping RTT, under ack=none max-rate load", &loaded),
        ] {
            for (metric, q) in [("p50_ms", 0.5), ("p99_ms", 0.99)] {
                rows.push(record::row(
                    "cluster",
                    "control",
                    case,
                    metric,
                    false,
                    &[rtt_ms(h, q)],
                    None,
                ));
            }
        }
        let mut failover_row = |case: &str, ms: Vec<f64>| {
            rows.push(record::row(
                "cluster",
                "ack=accepted",
                case,
                "samples_ms",
                false,
                &ms,
                None,
            ))
        };
        failover_row(
            "kill -> first event handled elsewhere",
            rounds.iter().map(|r| r.0).collect(),
        );
        if !pick(true).is_empty() && !pick(false).is_empty() {
            failover_row("... when the killed node was a follower", pick(false));
            failover_row("... when the killed node was the leader", pick(true));
        }
        let meta = serde_json::json!({
            "command": "herald-bench cluster",
            "time": chrono::Utc::now().to_rfc3339(),
            "cores": cores,
            "events": a.events,
            "batch": a.batch,
            "connections": a.connections,
            "instances": a.instances,
            "latency_rate": a.latency_rate,
            "failovers": a.failovers,
            "failover_rate": a.failover_rate,
            "herald_peers": format!("{:?}", a.herald_peers).to_lowercase(),
            "smoke": a.smoke,
        });
        record::write(path, meta, rows)?;
    }
    Ok(())
}

/// The failover rounds; returns kill → first handled on a survivor, in ms, and whether the
/// killed node was the Raft leader (then an election comes first), per round.
pub(super) async fn failover(
    c: &mut Cluster,
    client: &awc::Client,
    poll: &awc::Client,
    rounds: usize,
    rate: u64,
    batch: usize,
) -> Result<Vec<(f64, bool)>, String> {
    subscribe(c, client, FAILOVER_TOPIC, 1).await?;
    let mut times = Vec::new();
    for round in 1..=rounds {
        let r = round as u64;
        let placed = settled(
            c,
            poll,
            FAILOVER_TOPIC,
            Duration::from_millis(1500),
            Duration::from_secs(90),
        )
        .await?;
        let host = placed[0];
        let leader = get_json(poll, &format!("http://{}/v1/cluster", http(c, host)))
            .await
            .ok()
            .and_then(|v| v["leader"].as_u64());
        let survivors: Vec<u64> = c.ids().into_iter().filter(|id| *id != host).collect();
        let ingress = survivors[round % survivors.len()];
        let url = format!(
            "http://{}/v1/topics/{FAILOVER_TOPIC}/events/batch?ack=accepted",
            http(c, ingress)
        );
        let stop = Rc::new(Cell::new(false));
        let publisher = actix_rt::spawn(paced(
            client.clone(),
            url,
            rate,
            batch,
            Body {
                round: Some(r),
                size: None,
            },
            stop.clone(),
            Instant::now() + Duration::from_secs(120),
        ));
        let outcome = async {
            // The flow reaches the host before it is killed.
            let started = Instant::now();
            loop {
                if scrape(poll, &http(c, host)).await?.first.contains_key(&r) {
                    break;
                }
                if started.elapsed() > Duration::from_secs(15) {
                    return Err(format!("round {round}: no event reached node {host} within 15 s"));
                }
                actix_rt::time::sleep(Duration::from_millis(10)).await;
            }
            actix_rt::time::sleep(Duration::from_millis(300)).await;
            let killed_at = unix_seconds();
            let clock = chrono::Utc::now().format("%H:%M:%S%.3f").to_string();
            c.kill(host)?;
            let started = Instant::now();
            loop {
                let mut first: Option<(f64, u64)> = None;
                for &id in &survivors {
                    if let Ok(s) = scrape(poll, &http(c, id)).await {
                        if let Some(&t) = s.first.get(&r) {
                            if first.is_none_or(|(f, _)| t < f) {
                                first = Some((t, id));
                            }
                        }
                    }
                }
                if let Some((t, id)) = first {
                    return Ok(((t - killed_at) * 1000.0, id, clock));
                }
                if started.elapsed() > Duration::from_secs(60) {
                    return Err(format!(
                        "round {round}: no surviving node handled an event within 60 s of killing node {host}"
                    ));
                }
                actix_rt::time::sleep(Duration::from_millis(5)).await;
            }
        }
        .await;
        stop.set(true);
        let sent = publisher.await.unwrap_or_default();
        let (ms, on, clock) = outcome?;
        println!(
            "failover round {round}/{}: killed node {host}{} at {clock} UTC, publishing to node {ingress}: first event handled on node {on} {} ms after the kill ({} events accepted, {} refused, {} failed)",
            rounds,
            if leader == Some(host) { " (the Raft leader)" } else { "" },
            fmt_ms(ms),
            sent.accepted,
            sent.overloaded,
            sent.failed
        );
        times.push((ms, leader == Some(host)));
        if round < rounds {
            c.restart(host)?;
            c.wait_ready(Duration::from_secs(60)).await?;
        }
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_flaky_handler_fails_marked_events_always_or_once() {
        use super::flaky_failure;
        for attempt in 1..=3 {
            assert!(
                flaky_failure(br#"{"t":1,"f":1}"#, attempt).is_some(),
                "f=1, attempt {attempt}"
            );
            assert!(flaky_failure(br#"{"t":1,"f":0}"#, attempt).is_none());
            assert!(flaky_failure(b"not json", attempt).is_none());
        }
        assert!(flaky_failure(br#"{"t":1,"f":2}"#, 1).is_some());
        assert!(flaky_failure(br#"{"t":1,"f":2}"#, 2).is_none());
    }

    #[test]
    fn ping_buckets_are_read_per_peer_line() {
        let text = "# TYPE herald_peer_ping_rtt_seconds histogram\n\
            herald_peer_ping_rtt_seconds_bucket{peer=\"2\",le=\"0.001\"} 3\n\
            herald_peer_ping_rtt_seconds_bucket{peer=\"2\",le=\"+Inf\"} 4\n\
            herald_peer_ping_rtt_seconds_sum{peer=\"2\"} 0.01\n\
            herald_events_published_total{topic=\"t\"} 9\n";
        let b = super::ping_buckets(text);
        assert_eq!(b, vec![(0.001f64.to_bits(), 3.0), (f64::INFINITY.to_bits(), 4.0)]);
        let before: std::collections::BTreeMap<u64, f64> = [(0.001f64.to_bits(), 1.0)].into();
        let after: std::collections::BTreeMap<u64, f64> = b.into_iter().collect();
        assert_eq!(super::since(&before, &after)[&0.001f64.to_bits()], 2.0);
    }

    use super::*;

    #[test]
    fn metrics_parse_and_quantiles_interpolate() {
        let text = "# TYPE x counter\n\
            herald_bench_sink_events_total 30\n\
            herald_bench_sink_last_handled_unix_seconds 1700000000.25\n\
            herald_bench_sink_latency_events_total{le=\"0.002\"} 10\n\
            herald_bench_sink_latency_events_total{le=\"+Inf\"} 10\n\
            herald_bench_sink_latency_events_total{le=\"0.001\"} 10\n\
            herald_bench_sink_first_handled_unix_seconds{round=\"3\"} 1700000000.5\n";
        let s = parse_metrics(text);
        assert_eq!(s.events, 30.0);
        assert_eq!(s.last, 1_700_000_000.25);
        assert_eq!(s.first.get(&3), Some(&1_700_000_000.5));
        assert_eq!(s.buckets.len(), 3);
        assert!((quantile(&s.buckets, 0.5) - 0.0015).abs() < 1e-9);
        assert_eq!(
            quantile(&s.buckets, 0.99),
            0.002,
            "the +Inf bucket reports its lower bound"
        );
        let d = histogram_delta(std::slice::from_ref(&s), std::slice::from_ref(&s));
        assert!(d.values().all(|v| *v == 0.0));
    }

    #[test]
    fn payloads_have_the_exact_size_and_carry_the_stamp() {
        let t = 1_765_000_000_123_456_789u64;
        for size in [16, 32, 128, 1024] {
            assert!(payload_size_ok(size));
            let p = payload(size, t);
            assert_eq!(p.len(), size, "{p}");
            let s = stamp_of(p.as_bytes()).unwrap();
            let want = if size == 16 { t / 1000 * 1000 } else { t };
            assert_eq!(s, Stamp { t: want, r: None });
        }
        assert!(!payload_size_ok(20));
        assert_eq!(stamp_of(br#"{"t":5,"r":2}"#), Some(Stamp { t: 5, r: Some(2) }));
        assert_eq!(stamp_of(b"nope"), None);
    }

    #[test]
    fn batch_bodies_are_json_arrays_of_stamps() {
        let v: Vec<Value> = serde_json::from_str(&batch_body(
            3,
            Body {
                round: Some(7),
                size: None,
            },
        ))
        .unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0]["r"], 7);
        assert!(v[2]["t"].as_u64().unwrap() > 0);
    }
}
