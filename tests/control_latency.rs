//! Control traffic under event load: two in-process nodes, a saturating
//! cross-node `ack=none` load for 30 s, and the control plane must not notice. No election may
//! start (the Raft term and the leader stay as they were on both nodes), and no peer's phi may
//! cross the failure detector's threshold. The ping round-trip times with and without the load
//! are printed (run with `--nocapture`), from the `herald_peer_ping_rtt_seconds` histogram.
//!
//! It also checks that the event traffic is off the membership thread: under the load the
//! `herald-cluster` threads use about the CPU they use without it, and `herald-events` threads do
//! the work (Linux, from `/proc/self/task`).
//!
//! The load is bounded in time (`HERALD_CONTROL_LOAD_SECS`, default 30) and in count, and stays on
//! 127.0.0.1. Every wait polls with a deadline; the sampling interval is a rate, not a wait for
//! something to happen.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::{Actor, Context, Handler};
use herald::handler::{Delivery, HandlerResult};
use herald::node::{Node, NodeBuilder};
use herald::subscription::SubscriptionSpec;

use common::{cluster, eventually, get, post_json, TestNode};

const TOPIC: &str = "cl.load";
/// The histogram the monitor records every ping's round trip in.
const PING_RTT: &str = "herald_peer_ping_rtt_seconds";
/// Concurrent publish requests.
const CONNECTIONS: usize = 8;
/// The count bound of the load (it normally ends on time first).
const MAX_EVENTS: u64 = 50_000_000;
/// Events per publish request.
const BATCH: usize = 1000;
/// Mailbox capacity (and so the window of events in flight towards the handler node): deep
/// mailboxes, as a throughput-minded deployment sets them, so the event plane keeps many
/// megabytes queued towards the peer.
const MAILBOX: usize = 32768;
/// Bytes of padding per event, so the load is bytes on the peer connection, not just requests.
const PADDING: usize = 1000;

/// Handles nothing, as fast as it can: the handler node is never the bottleneck.
struct Sink;

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Sink {
    type Result = HandlerResult;
    fn handle(&mut self, _: Delivery, _: &mut Context<Self>) -> HandlerResult {
        Ok(())
    }
}

/// `name` from the environment, else `default` (to explore other loads by hand).
fn setting(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn load_secs() -> u64 {
    setting("HERALD_CONTROL_LOAD_SECS", 30) as u64
}

fn batch() -> usize {
    setting("HERALD_CONTROL_LOAD_BATCH", BATCH)
}

/// Node 1 (the ingress, without the handler) and node 2 (the only node that can run `sink`).
async fn two_nodes() -> Vec<TestNode> {
    let mut builders = Vec::new();
    for id in 1..=2u64 {
        let mut b: NodeBuilder = Node::builder();
        if id == 2 {
            b = b.handler("sink", || Sink);
        }
        let c = b.config_mut();
        c.handlers.mailbox_capacity = setting("HERALD_CONTROL_LOAD_MAILBOX", MAILBOX);
        c.handlers.max_inflight_bytes = 1 << 30;
        c.http.max_batch_events = batch();
        c.http.max_body_bytes = 64 << 20;
        builders.push(b);
    }
    cluster(builders).await
}

/// What one node says of the control plane: term, leader, the highest phi of its peers.
fn control_view(n: &TestNode) -> (u64, Option<u64>, f64) {
    let v = n.node.core().cluster(n.node.http_addr());
    let phi = v.members.iter().map(|m| m.phi).fold(0.0, f64::max);
    (v.term, v.leader, phi)
}

/// The cumulative bucket counts of [`PING_RTT`], summed over every `peer` label, by upper bound.
fn rtt_buckets() -> BTreeMap<u64, f64> {
    let text = herald::metrics::install_prometheus().render();
    let mut buckets = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(&format!("{PING_RTT}_bucket{{"))) {
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else {
            continue;
        };
        // Upper bounds as nanoseconds (+Inf as u64::MAX), so they sort and add up exactly.
        let bound = if le == "+Inf" {
            u64::MAX
        } else {
            le.parse::<f64>().map_or(u64::MAX, |s| (s * 1e9).round() as u64)
        };
        *buckets.entry(bound).or_insert(0.0) += count;
    }
    buckets
}

/// Round trips recorded between two [`rtt_buckets`] snapshots: (count, p50, p99, max bucket), in
/// seconds; each quantile is the upper bound of the bucket it falls in.
fn rtt_quantiles(before: &BTreeMap<u64, f64>, after: &BTreeMap<u64, f64>) -> (f64, f64, f64, f64) {
    let delta: Vec<(u64, f64)> = after
        .iter()
        .map(|(b, c)| (*b, c - before.get(b).copied().unwrap_or(0.0)))
        .collect();
    let count = delta.last().map_or(0.0, |d| d.1);
    let at = |q: f64| {
        let want = (q * count).ceil().max(1.0);
        delta
            .iter()
            .find(|(_, c)| *c >= want)
            .map_or(f64::INFINITY, |(b, _)| *b as f64 / 1e9)
    };
    (count, at(0.5), at(0.99), at(1.0))
}

/// CPU seconds (user + system) the threads of this process named `name` have used, from
/// `/proc/self/task` (Linux; 0 elsewhere). Clock ticks are taken as 100 per second (USER_HZ).
fn thread_cpu_seconds(name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        for i in [11, 12] {
            ticks += fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks as f64 / 100.0
}

fn ms(s: f64) -> String {
    if s.is_finite() {
        format!("{:.2} ms", s * 1e3)
    } else {
        "> 10 s".to_string()
    }
}

/// One publish body: [`batch`] events of about `PADDING` bytes each.
fn batch_body() -> String {
    let pad = "x".repeat(setting("HERALD_CONTROL_LOAD_PADDING", PADDING));
    let one = format!("{{\"p\":\"{pad}\"}}");
    format!("[{}]", vec![one; batch()].join(","))
}

#[derive(Default)]
struct LoadStats {
    requests: Cell<u64>,
    accepted: Cell<u64>,
    refused: Cell<u64>,
    failed: RefCell<Option<String>>,
}

/// Publishes to node `base` from `CONNECTIONS` concurrent requests until `until` or
/// [`MAX_EVENTS`]; a refusal (429/503) is retried after 2 ms. JSON batches of [`batch`] events;
/// or, with `HERALD_CONTROL_LOAD_EVENT_BYTES` set, single binary-mode events of that many bytes
/// (no JSON to parse, so the ingress passes far more bytes to the peer link).
async fn saturate(base: String, until: Instant, stats: Rc<LoadStats>) {
    let connections = setting("HERALD_CONTROL_LOAD_CONNECTIONS", CONNECTIONS);
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .connector(awc::Connector::new().limit(connections + 2))
        .finish();
    let event_bytes = setting("HERALD_CONTROL_LOAD_EVENT_BYTES", 0);
    let (url, body, batch) = if event_bytes > 0 {
        let url = format!("{base}/v1/topics/{TOPIC}/events?ack=none");
        (url, bytes::Bytes::from(vec![b'x'; event_bytes]), 1)
    } else {
        let url = format!("{base}/v1/topics/{TOPIC}/events/batch?ack=none");
        (url, bytes::Bytes::from(batch_body()), batch())
    };
    let next_id = Rc::new(Cell::new(0u64));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, url, body, stats, next_id) = (
            client.clone(),
            url.clone(),
            body.clone(),
            stats.clone(),
            next_id.clone(),
        );
        tasks.push(actix_rt::spawn(async move {
            while Instant::now() < until && stats.accepted.get() < MAX_EVENTS {
                let request = client.post(&url);
                let request = if event_bytes > 0 {
                    next_id.set(next_id.get() + 1);
                    request
                        .insert_header(("content-type", "application/octet-stream"))
                        .insert_header(("ce-specversion", "1.0"))
                        .insert_header(("ce-id", format!("load-{}", next_id.get())))
                        .insert_header(("ce-source", "control-latency-test"))
                        .insert_header(("ce-type", "load"))
                } else {
                    request.insert_header(("content-type", "application/json"))
                };
                let sent = request.send_body(body.clone()).await;
                stats.requests.set(stats.requests.get() + 1);
                match sent {
                    Ok(mut r) => {
                        let _ = r.body().limit(1 << 20).await;
                        match r.status().as_u16() {
                            200..=299 => stats.accepted.set(stats.accepted.get() + batch as u64),
                            429 | 503 => {
                                stats.refused.set(stats.refused.get() + 1);
                                actix_rt::time::sleep(Duration::from_millis(2)).await;
                            }
                            s => {
                                *stats.failed.borrow_mut() = Some(format!("{s} from {url}"));
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        *stats.failed.borrow_mut() = Some(format!("{url}: {e}"));
                        return;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Samples every node's control view every 100 ms for `d`: (max phi, every (term, leader) seen).
async fn watch_control(nodes: &[TestNode], d: Duration) -> (f64, Vec<(u64, Option<u64>)>) {
    let end = Instant::now() + d;
    let mut max_phi: f64 = 0.0;
    let mut seen = Vec::new();
    while Instant::now() < end {
        for n in nodes {
            let (term, leader, phi) = control_view(n);
            max_phi = max_phi.max(phi);
            if !seen.contains(&(term, leader)) {
                seen.push((term, leader));
            }
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    (max_phi, seen)
}

#[actix_rt::test]
async fn event_load_does_not_delay_control_traffic() {
    let secs = load_secs();
    let nodes = two_nodes().await;
    let spec = serde_json::to_value(SubscriptionSpec::rust(TOPIC, "g", "sink")).expect("spec");
    let a = post_json(&format!("{}/v1/subscriptions", nodes[0].url), &spec).await;
    assert!(a.status == 201 || a.status == 200, "subscribe: {}", a.body);
    eventually("the subscription is placed on node 2, seen by both nodes", || {
        let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
        async move {
            for u in &urls {
                let (_, ps) = get(&format!("{u}/v1/cluster/placements")).await;
                let p = ps.as_array()?.iter().find(|p| p["topic"] == TOPIC)?.clone();
                if p["nodes"] != serde_json::json!([2]) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let threshold = nodes[0].node.core().config().cluster.phi_threshold;

    // Without load: the baseline round trips (and the term and leader to keep).
    let (term0, leader0, _) = control_view(&nodes[0]);
    let idle_before = rtt_buckets();
    let idle_cpu_before = thread_cpu_seconds("herald-cluster");
    let idle_started = Instant::now();
    let (idle_phi, idle_seen) = watch_control(&nodes, Duration::from_secs(10)).await;
    let idle_cluster_rate =
        (thread_cpu_seconds("herald-cluster") - idle_cpu_before) / idle_started.elapsed().as_secs_f64();
    let idle_after = rtt_buckets();
    assert_eq!(
        idle_seen,
        vec![(term0, leader0)],
        "the cluster was not settled before the load"
    );

    // Under load: node 1 takes every event, node 2 handles them all.
    let cpu_before = ["herald-cluster", "herald-events"].map(thread_cpu_seconds);
    let stats = Rc::new(LoadStats::default());
    let started = Instant::now();
    let load = actix_rt::spawn(saturate(
        nodes[0].url.clone(),
        started + Duration::from_secs(secs),
        stats.clone(),
    ));
    let (load_phi, load_seen) = watch_control(&nodes, Duration::from_secs(secs)).await;
    let _ = load.await;
    let elapsed = started.elapsed().as_secs_f64();
    let load_after = rtt_buckets();
    let cpu_after = ["herald-cluster", "herald-events"].map(thread_cpu_seconds);
    let after: Vec<(u64, Option<u64>, f64)> = nodes.iter().map(control_view).collect();

    let forwarded = common::metric(
        &herald::metrics::install_prometheus().render(),
        "herald_events_forwarded_total",
        &[("peer", "2")],
    )
    .unwrap_or(0.0);
    let (idle_n, idle_p50, idle_p99, idle_max) = rtt_quantiles(&idle_before, &idle_after);
    let (load_n, load_p50, load_p99, load_max) = rtt_quantiles(&idle_after, &load_after);
    println!(
        "load: {} events accepted in {elapsed:.1} s ({:.0}/s), {} requests, {} refused, {forwarded} forwarded to node 2",
        stats.accepted.get(),
        stats.accepted.get() as f64 / elapsed,
        stats.requests.get(),
        stats.refused.get()
    );
    println!(
        "raft: term {term0}, leader {leader0:?} before; (term, leader) seen under load {load_seen:?}; after {:?}",
        after.iter().map(|a| (a.0, a.1)).collect::<Vec<_>>()
    );
    println!("phi (threshold {threshold}): max {idle_phi:.2} without load, max {load_phi:.2} under load");
    let (cluster_cpu, events_cpu) = (cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]);
    println!(
        "cpu under load (both nodes): herald-cluster {cluster_cpu:.2} s, herald-events {events_cpu:.2} s; \
         herald-cluster without load {:.2} s per 30 s",
        idle_cluster_rate * 30.0
    );
    println!(
        "ping rtt without load: {idle_n} pings, p50 <= {}, p99 <= {}, max <= {}",
        ms(idle_p50),
        ms(idle_p99),
        ms(idle_max)
    );
    println!(
        "ping rtt under load:   {load_n} pings, p50 <= {}, p99 <= {}, max <= {}",
        ms(load_p50),
        ms(load_p99),
        ms(load_max)
    );

    if let Some(f) = stats.failed.borrow().as_ref() {
        panic!("a publish failed: {f}");
    }
    assert!(
        forwarded > 0.0 && stats.accepted.get() > 0,
        "no event crossed to node 2: the load did not load the peer bus"
    );
    assert_eq!(
        load_seen,
        vec![(term0, leader0)],
        "an election started under event load (term, leader changed)"
    );
    assert!(
        load_phi < threshold,
        "a peer's phi reached {load_phi:.2} under event load (threshold {threshold})"
    );
    assert!(load_n > 0.0, "no ping was answered under load");
    if std::path::Path::new("/proc/self/task").exists() {
        // The event traffic is read and written on herald-events, not on the membership thread:
        // under load, herald-cluster works about as much as without (Raft ticks, pings), with a
        // margin for the handshakes and the scheduling noise of a loaded machine.
        let allowed = (3.0 * idle_cluster_rate + 0.02) * elapsed;
        assert!(
            cluster_cpu <= allowed,
            "herald-cluster used {cluster_cpu:.2} s of CPU under event load (at most {allowed:.2} s \
             expected): event traffic runs on the membership thread"
        );
        assert!(
            events_cpu > 0.0,
            "no CPU time on herald-events: the events channel is not there"
        );
    }
    for n in nodes.into_iter().rev() {
        n.node.shutdown().await;
    }
}
