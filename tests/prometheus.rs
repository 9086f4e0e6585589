//! A real Prometheus scrapes a cluster of three `herald node` processes: every
//! node delivers some events of a webhook subscription with an instance on each node, then Debian's
//! `prometheus` scrapes the three nodes every second and the test asks its HTTP API that all three
//! targets are up and that `herald_events_delivered_total` has samples for each, with the values
//! the nodes show. `promtool check metrics` passes on each node's `/metrics`.
//!
//! Needs `prometheus` and `promtool` (Debian's `prometheus` package), so it is `#[ignore]`d: a plain
//! `cargo test` lists it as ignored; CI runs it with `--include-ignored`, where a missing tool is a
//! failure.
//!
//! Everything listens on 127.0.0.1 on free ports; Prometheus keeps its TSDB in a temporary dir, logs
//! to a file printed when the test fails, and is killed by pid when dropped; every wait is a poll
//! with a deadline, and publishing is bounded in count and time.
//! `cargo test --test prometheus -- --nocapture` prints a summary.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::views::{placement_of, wait_formed};
use common::*;
use serde_json::{json, Value};

const TOPIC: &str = "scraped";
const GROUP: &str = "hook";
/// The metric Prometheus must have for every node.
const DELIVERED: &str = "herald_events_delivered_total";
/// How long Prometheus may take to start, to see every target up, and to have every node's samples.
const PROMETHEUS_DEADLINE: Duration = Duration::from_secs(60);
/// Publishing stops after this many events or this long, whether or not every node delivered some.
const MAX_EVENTS: usize = 300;
const PUBLISH_TIME: Duration = Duration::from_secs(30);
/// Between two polls of Prometheus's API.
const POLL: Duration = Duration::from_millis(200);

/// `prometheus` and `promtool` (the test fails without them: it runs only when asked for).
fn prometheus_tools() -> (PathBuf, PathBuf) {
    let install = "apt-get install prometheus";
    (require_tool("prometheus", install), require_tool("promtool", install))
}

/// The sum of the `herald_events_delivered_total{topic=TOPIC,outcome="ok"}` samples of an
/// exposition (0 when there are none).
fn delivered_ok(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{DELIVERED}{{")))
        .filter(|l| l.contains(&format!("topic=\"{TOPIC}\"")) && l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `delivered_ok` of every node's `/metrics`, in `urls` order.
async fn delivered_per_node(urls: &[String]) -> Vec<f64> {
    let mut v = Vec::with_capacity(urls.len());
    for url in urls {
        v.push(delivered_ok(&get_text(&format!("{url}/metrics")).await));
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The cluster

/// The sorted nodes of the placement of `TOPIC`/`GROUP` in a `/v1/cluster/placements` answer.
fn placed_on(placements: &Value) -> Option<Vec<u64>> {
    let (_, mut nodes) = placement_of(placements, TOPIC, GROUP)?;
    nodes.sort();
    Some(nodes)
}

/// Publishes `{"n": i}` with partition key `key-{i}` to `url` with `ack=processed`, retrying
/// refusals (429, 503, 504) and connection errors until `until`. Panics on any other answer.
async fn publish_processed(client: &awc::Client, url: &str, i: usize, until: Instant) {
    let target = format!("{url}/v1/topics/{TOPIC}/events?ack=processed&timeout_ms=5000");
    let key = format!("key-{i}");
    let headers = [("content-type", "application/json"), ("x-herald-key", key.as_str())];
    loop {
        let last = match call(client, "POST", &target, &headers, json!({ "n": i }).to_string()).await {
            Ok((200, _)) => return,
            Ok((status @ (429 | 503 | 504), body)) => format!("{status}: {body}"),
            Ok((status, body)) => panic!("POST {target} (key {key}) answered {status}: {body}"),
            Err(e) => e,
        };
        assert!(
            Instant::now() < until,
            "publishing took longer than {PUBLISH_TIME:?}; last refusal from {target}: {last}"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus

/// A `prometheus` process scraping the given targets, with its config, TSDB and log in a temporary
/// dir; killed by pid when dropped (its log printed first if the test is failing).
struct Prometheus {
    child: Child,
    /// `http://127.0.0.1:PORT` of its web API.
    url: String,
    log: PathBuf,
    /// Dropped after the process is killed.
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `bin` scraping `targets` (`host:port`, job `herald`, every second) and waits until
    /// `/-/ready` answers 200. Tries another port if the free one was taken meanwhile.
    async fn start(bin: &Path, targets: &[String]) -> Prometheus {
        let mut dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: herald\n    metrics_path: /metrics\n    static_configs:\n      \
                 - targets: [{}]\n",
                quoted.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let log = dir.path().join(format!("prometheus-{attempt}.log"));
            let out = std::fs::File::create(&log).expect("prometheus log file");
            let err = out.try_clone().expect("prometheus log file");
            let port = free_port();
            let child = Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=info")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let mut p = Prometheus {
                child,
                url: format!("http://127.0.0.1:{port}"),
                log,
                _dir: dir,
            };
            match p.wait_ready().await {
                Ok(()) => return p,
                Err(why) if attempt < 3 && p.log_text().contains("address already in use") => {
                    eprintln!("prometheus could not listen on port {port} ({why}); trying another port");
                    p.child.kill().ok();
                    p.child.wait().ok();
                    dir = std::mem::replace(&mut p._dir, tempfile::tempdir().expect("tempdir"));
                }
                Err(why) => panic!("prometheus did not get ready: {why}"),
            }
        }
    }

    /// Polls `/-/ready` until 200; an error if the process exits or [`PROMETHEUS_DEADLINE`] passes.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = http(Duration::from_secs(2));
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Err(format!("prometheus exited with {status}"));
            }
            if let Ok((200, _)) = call(&client, "GET", &format!("{}/-/ready", self.url), &[], String::new()).await {
                return Ok(());
            }
            if start.elapsed() > PROMETHEUS_DEADLINE {
                return Err(format!(
                    "{}/-/ready did not answer 200 within {PROMETHEUS_DEADLINE:?}",
                    self.url
                ));
            }
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn print_log(&self) {
        let log = self.log_text();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("--- last lines of {} ---", self.log.display());
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
    }

    /// GET `{url}{path}` of the HTTP API: the `data` of a `"status": "success"` answer.
    async fn api(&self, client: &awc::Client, path: &str) -> Result<Value, String> {
        let url = format!("{}{path}", self.url);
        match call(client, "GET", &url, &[], String::new()).await? {
            (200, body) if body["status"] == "success" => Ok(body["data"].clone()),
            (status, body) => Err(format!("GET {url}: {status} {body}")),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log();
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What Prometheus's `/api/v1/targets` says of one active target.
#[derive(Debug)]
struct Target {
    health: String,
    last_error: String,
    scrape_url: String,
}

/// The active targets of job `herald`, by `instance` label.
fn targets(data: &Value) -> BTreeMap<String, Target> {
    data["activeTargets"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter(|t| t["labels"]["job"] == "herald")
                .map(|t| {
                    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
                    (
                        s(&t["labels"]["instance"]),
                        Target {
                            health: s(&t["health"]),
                            last_error: s(&t["lastError"]),
                            scrape_url: s(&t["scrapeUrl"]),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Per `instance` of an instant-query answer for `herald_events_delivered_total`: how many series it
/// has, and the sum of its `topic=TOPIC, outcome="ok"` values.
fn samples(data: &Value) -> BTreeMap<String, (usize, f64)> {
    let mut per: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for r in data["result"].as_array().into_iter().flatten() {
        let m = &r["metric"];
        let e = per
            .entry(m["instance"].as_str().unwrap_or("?").to_string())
            .or_default();
        e.0 += 1;
        if m["topic"] == TOPIC && m["outcome"] == "ok" {
            e.1 += r["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    per
}

// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
#[ignore = "needs prometheus and promtool (apt-get install prometheus); CI runs it with --include-ignored"]
async fn prometheus_scrapes_every_node() {
    let (prometheus_bin, promtool) = prometheus_tools();
    let began = Instant::now();

    // A cluster of three, with a webhook subscription that has an instance on each node.
    let nodes = start_cluster(3).await;
    let urls = urls(&nodes);
    let ids: Vec<u64> = nodes.iter().map(|n| n.id()).collect();
    wait_formed(&urls, &ids).await;
    let recorder = EventRecorder::start().await;
    let spec = json!({
        "topic": TOPIC,
        "group": GROUP,
        "handler": { "kind": "webhook", "url": recorder.url },
        "instances": 3,
    });
    let a = post_json(&format!("{}/v1/subscriptions", urls[0]), &spec).await;
    assert_eq!(a.status, 201, "POST {}/v1/subscriptions {spec}: {}", urls[0], a.body);
    let ids: Vec<u64> = nodes.iter().map(|n| n.id()).collect();
    converge(
        &format!("every node shows {TOPIC}/{GROUP} placed on nodes {ids:?}"),
        &urls,
        "/v1/cluster/placements",
        |ps| ps.iter().all(|p| placed_on(p).as_ref() == Some(&ids)).then_some(()),
    )
    .await;

    // Publish to the three nodes in turn, each event with its own key (so that the events spread
    // over the instances), until every node's /metrics shows deliveries by its own instance.
    let client = http(Duration::from_secs(10));
    let publish_start = Instant::now();
    let until = publish_start + PUBLISH_TIME;
    let mut published = 0;
    let per_node = loop {
        for url in &urls {
            publish_processed(&client, url, published, until).await;
            published += 1;
        }
        let per_node = delivered_per_node(&urls).await;
        if per_node.iter().all(|&d| d > 0.0) {
            break per_node;
        }
        assert!(
            published < MAX_EVENTS && Instant::now() < until,
            "after {published} events (ack=processed) in {:?} not every node delivered some: \
             {DELIVERED}{{topic=\"{TOPIC}\",outcome=\"ok\"}} per node {:?} = {per_node:?}",
            publish_start.elapsed(),
            nodes.iter().map(|n| n.http()).collect::<Vec<_>>(),
        );
    };
    eprintln!(
        "published {published} events in {:?}; delivered per node: {}; the receiver got {}",
        publish_start.elapsed(),
        nodes
            .iter()
            .zip(&per_node)
            .map(|(n, d)| format!("node {} ({}) {d}", n.id(), n.http()))
            .collect::<Vec<_>>()
            .join(", "),
        recorder.len()
    );

    // Prometheus scrapes the three nodes.
    let instances: Vec<String> = nodes.iter().map(|n| n.http().to_string()).collect();
    let prom_start = Instant::now();
    let prometheus = Prometheus::start(&prometheus_bin, &instances).await;
    let api = http(Duration::from_secs(5));
    let ready_after = prom_start.elapsed();

    // 1. All three targets are up.
    let up = loop {
        let last = match prometheus.api(&api, "/api/v1/targets?state=active").await {
            Ok(data) => {
                let ts = targets(&data);
                let down: Vec<String> = instances
                    .iter()
                    .filter(|i| ts.get(*i).is_none_or(|t| t.health != "up"))
                    .map(|i| match ts.get(i) {
                        Some(t) => format!(
                            "{i}: health {:?}, last error {:?} ({})",
                            t.health, t.last_error, t.scrape_url
                        ),
                        None => format!("{i}: not an active target"),
                    })
                    .collect();
                if down.is_empty() && ts.len() == instances.len() {
                    break ts;
                }
                format!(
                    "targets not up: {down:?}; all active targets: {:?}",
                    ts.iter().map(|(i, t)| format!("{i} {}", t.health)).collect::<Vec<_>>()
                )
            }
            Err(e) => e,
        };
        assert!(
            prom_start.elapsed() < PROMETHEUS_DEADLINE,
            "Prometheus did not see every herald target up within {PROMETHEUS_DEADLINE:?}: {last}"
        );
        actix_rt::time::sleep(POLL).await;
    };
    let up_after = prom_start.elapsed();

    // 2. `herald_events_delivered_total` has samples for each, with the values the node shows.
    let query = format!(
        "/api/v1/query?query={}",
        url::form_urlencoded::byte_serialize(format!("{DELIVERED}{{job=\"herald\"}}").as_bytes()).collect::<String>()
    );
    let per_instance = loop {
        let last = match prometheus.api(&api, &query).await {
            Ok(data) => {
                let per = samples(&data);
                let now = delivered_per_node(&urls).await;
                let missing: Vec<String> = instances
                    .iter()
                    .zip(&now)
                    .filter_map(|(i, &node)| match per.get(i) {
                        None => Some(format!("{i}: no samples")),
                        Some(&(_, v)) if v <= 0.0 || v != node => Some(format!(
                            "{i}: {TOPIC}/ok is {v} in Prometheus, {node} on the node's /metrics"
                        )),
                        Some(_) => None,
                    })
                    .collect();
                if missing.is_empty() {
                    break per;
                }
                format!("{missing:?}; samples per instance (series, {TOPIC}/ok): {per:?}")
            }
            Err(e) => e,
        };
        assert!(
            prom_start.elapsed() < PROMETHEUS_DEADLINE,
            "Prometheus has no (or stale) {DELIVERED} samples for every node within {PROMETHEUS_DEADLINE:?}: {last}"
        );
        actix_rt::time::sleep(POLL).await;
    };
    let samples_after = prom_start.elapsed();
    eprintln!(
        "prometheus ready after {ready_after:?}; targets up after {up_after:?}: {}",
        up.iter()
            .map(|(i, t)| format!("{i} {}", t.health))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "{DELIVERED} samples after {samples_after:?}: {}",
        per_instance
            .iter()
            .map(|(i, (series, ok))| format!("{i} {series} series ({TOPIC}/ok {ok})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(prometheus);

    // 3. `promtool check metrics` passes on each node's exposition.
    for n in &nodes {
        let text = get_text(&format!("{}/metrics", n.url())).await;
        assert_promtool_passes(&promtool, text, &format!("node {} ({})", n.id(), n.url())).await;
    }
    eprintln!(
        "promtool check metrics passed on all {} nodes; the test took {:?}",
        nodes.len(),
        began.elapsed()
    );
    recorder.stop().await;
}
