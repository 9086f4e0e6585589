//! Failover of event delivery across real `herald node` processes on 127.0.0.1: a webhook
//! subscription's host is killed (SIGKILL) or frozen (SIGSTOP) while events are published to
//! another node; a CPU-saturated machine marks no node down; per-key order holds
//! across instances on three nodes; a rolling restart under load loses nothing.
//!
//! An [`EventRecorder`] in the test is the webhook endpoint and records every event it gets in a
//! [`History`], where the publishers record every attempt and its answer and the tests the faults
//! and the placements they saw. The kill and freeze tests, per-key order and the rolling restart
//! judge that history with the checker (`common::history::check`): every id that got a 202
//! (`ack=accepted`) arrives at least once with the data and key published under it, nothing
//! refused or never published arrives, duplicates only where a placement change allows them, and
//! per-key order where the README promises it (the rules of README's "Delivery guarantees"); a
//! failure prints a counter-example. The kill and freeze tests also assert the failover itself (the
//! host suspected, marked down, its placement moved and events handled elsewhere — within a
//! bound after a kill, while still frozen after a SIGSTOP), and print how long failover took
//! (`cargo test --test failover -- --nocapture`).
//!
//! Every node gets its own temporary data dir and free ports, logs at `warn` to a file that is
//! printed when a test fails, and is killed by pid when dropped; a frozen node is SIGCONTed by a
//! guard; every wait is a poll with a deadline; every load loop is bounded in count and time. The
//! tests of this file take a file-wide lock and run one at a time: each runs three nodes under
//! thousands of events (and one saturates the CPU on purpose), which on a 2-core machine would
//! otherwise disturb the others' fault timing.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::history::{self, Event};
use common::load::*;
use common::views::*;
use common::*;
use serde_json::json;

/// How long every acknowledged event may take to arrive once publishing ended.
const DELIVERY: Duration = Duration::from_secs(60);
/// Events published in the kill and freeze scenarios.
const FAILOVER_EVENTS: usize = 20_000;
/// Events per batch publish in the kill and freeze scenarios.
const FAILOVER_BATCH: usize = 200;
/// How long after a SIGKILL of the subscription's host the survivors may take to mark it down,
/// place the subscription elsewhere and handle events themselves. A bound far above the tens of
/// milliseconds measured (README, "Failover and node monitoring"), so that a regression to tens of
/// seconds fails; it is not a speed benchmark.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);
/// The host of the subscription stays frozen at least this long...
const FREEZE: Duration = Duration::from_secs(3);
/// ...and until the survivors have suspected it, marked it down, moved its placement and handled
/// events themselves, which must all happen within this long of the SIGSTOP.
const FREEZE_LIMIT: Duration = Duration::from_secs(15);
/// How long the CPU is saturated in the false-positive scenario.
const HOG: Duration = Duration::from_secs(30);

/// One test of this file at a time (see the module docs).
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the test body `test` on a fresh actix system while holding [`SERIAL`] (a failed test
/// poisons nothing: the next one takes the lock anyway).
fn serially<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    actix_rt::System::new().block_on(test());
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// A node stopped with SIGSTOP; SIGCONTed when resumed or dropped (also when the test fails).
struct Frozen {
    pid: u32,
    resumed: bool,
}

impl Frozen {
    fn freeze(nodes: &Cluster, id: u64) -> Frozen {
        let pid = nodes
            .iter()
            .find(|n| n.id() == id)
            .and_then(|n| n.pid())
            .expect("a running node");
        nodes.signal(id, "STOP");
        Frozen { pid, resumed: false }
    }

    fn resume(mut self) {
        self.resumed = true;
        let status = Command::new("kill").args(["-CONT", &self.pid.to_string()]).status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "kill -CONT {}: {status:?}",
            self.pid
        );
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.resumed {
            let _ = Command::new("kill").args(["-CONT", &self.pid.to_string()]).status();
        }
    }
}

/// Busy threads in the test process that saturate the CPU until `limit` passes or they are
/// dropped (stopped by a flag and joined).
struct CpuHog {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl CpuHog {
    fn start(threads: usize, limit: Duration) -> CpuHog {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
                        for i in 0..100_000u64 {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
                        }
                    }
                    x
                })
            })
            .collect();
        CpuHog { stop, threads }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kill and freeze

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Freeze,
}

/// Three nodes; one webhook instance on `host`; 20,000 events published to another node (four
/// publishers, each with its own partition key); the host is killed or frozen once a third were
/// accepted.
///
/// Asserted: the survivors show the host `down`, the placement leaves it, and the survivors
/// handle events — for a kill within [`FAILOVER_BOUND`]; for a freeze while the host is still
/// frozen (within [`FREEZE_LIMIT`]), after showing it `suspect` (phi; not merely `degraded`, which
/// a stuck backlog causes after `degraded_after_ms` — that alone would hide a broken phi detector);
/// and the checker's verdict on the history (every acknowledged event delivered with what was
/// published under it, duplicates only for events in flight at a placement change, per-key order
/// before the fault and after a kill once the new host handles events; README, "Delivery
/// guarantees").
async fn failover(name: &str, fault: Fault) {
    let mut nodes = start_cluster(3).await;
    let urls = urls(&nodes);
    wait_formed(&urls, &[1, 2, 3]).await;
    let rec = EventRecorder::start().await;
    let h = rec.history.clone();
    let topic = format!("failover.{name}");
    subscribe_webhook(&h, &urls[0], &topic, "hook", &rec.url, 1).await;
    let (epoch, placed) = record_placed(&h, &urls, &topic, "hook", 1).await;
    let host = placed[0];
    let ingress = nodes.iter().find(|n| n.id() != host).expect("another node");
    let (ingress_id, ingress_url) = (ingress.id(), ingress.url().to_string());
    let survivors: Vec<String> = nodes
        .iter()
        .filter(|n| n.id() != host)
        .map(|n| n.url().to_string())
        .collect();
    println!("[{name}] {topic}/hook placed on node {host} (epoch {epoch}); publishing to node {ingress_id}");

    let load = Load::start(LoadSpec {
        history: h.clone(),
        prefix: name.to_string(),
        topic: topic.clone(),
        urls: vec![ingress_url.clone()],
        total: FAILOVER_EVENTS,
        batch: FAILOVER_BATCH,
        publishers: 4,
        pace: None,
        rotate: false,
        keyed: true,
        time_limit: Duration::from_secs(60),
        answer_within: Duration::from_secs(5),
    });
    load.wait_accepted(FAILOVER_EVENTS / 3, Duration::from_secs(30)).await;

    let before = rec.len();
    let accepted_before = load.accepted();
    observe_placement(&h, &urls, &topic, "hook").await;
    let watch = FaultWatch::new(&h, &survivors, std::slice::from_ref(&ingress_url), host, &topic, "hook");
    let seen;
    match fault {
        Fault::Kill => {
            h.fault(host, history::Fault::Kill);
            nodes.kill9(host);
            seen = watch
                .until(
                    "the survivors mark the killed node down, place the subscription elsewhere and handle events",
                    FAILOVER_BOUND,
                    Observed::moved_on,
                )
                .await;
        }
        Fault::Freeze => {
            h.fault(host, history::Fault::Freeze);
            let frozen = Frozen::freeze(&nodes, host);
            seen = watch
                .until(
                    "while it is still frozen, the survivors show it suspect (phi), mark it down, place the subscription elsewhere and handle events",
                    FREEZE_LIMIT,
                    |o| o.failed_over() && watch.at.elapsed() >= FREEZE,
                )
                .await;
            frozen.resume();
            h.fault(host, history::Fault::Resume);
            // Back up: MarkUp, and the placement settles (the node that came back takes its share).
            wait_formed(&urls, &[1, 2, 3]).await;
            let settled = record_placed(&h, &urls, &topic, "hook", 1).await;
            println!(
                "[{name}] node {host} back up; placed on {:?} (epoch {})",
                settled.1, settled.0
            );
        }
    }
    println!("[{name}] {fault:?} of node {host} with {accepted_before} accepted and {before} received: {seen:?}");

    let progress = load.finish().await;
    progress.assert_no_fatal();
    assert_eq!(
        progress.accepted(),
        FAILOVER_EVENTS,
        "not every event was accepted within the time limit: {}",
        progress.summary()
    );
    let acked = progress.acknowledged();
    let waited = wait_received(&rec, &acked, DELIVERY).await;
    let all_in = watch.at.elapsed();
    let alive: Vec<String> = nodes
        .iter()
        .filter(|n| n.id() != host || matches!(fault, Fault::Freeze))
        .map(|n| n.url().to_string())
        .collect();
    record_placed(&h, &alive, &topic, "hook", 1).await;
    let all = rec.all();
    let (arrivals, distinct, duplicates) = counts(&all);
    let (first, stall, resumed) = after_fault(&all, watch.at).unwrap_or_default();
    println!(
        "[{name}] {fault:?} of node {host}: {} acknowledged, {arrivals} received ({distinct} distinct, {duplicates} duplicates); \
         first arrival {first:?} after the fault, longest stall of deliveries {stall:?} (ended {resumed:?} after the fault); \
         every acknowledged id arrived {all_in:?} after the fault ({waited:?} after publishing ended); retried refusals {:?}",
        acked.len(),
        progress.rejected()
    );
    let verdict = h.assert_guarantees();
    println!(
        "[{name}] the history keeps the delivery guarantees: {}",
        verdict.summary()
    );
    rec.stop().await;
}

#[test]
fn killing_the_host_of_a_subscription_loses_no_acknowledged_event() {
    serially(|| failover("kill", Fault::Kill));
}

#[test]
fn freezing_the_host_of_a_subscription_loses_no_acknowledged_event() {
    serially(|| failover("freeze", Fault::Freeze));
}

// ---------------------------------------------------------------------------------------------
// No false positives

#[test]
fn a_cpu_saturated_machine_marks_no_node_down() {
    serially(|| async {
        let nodes = start_cluster(3).await;
        let urls = urls(&nodes);
        wait_formed(&urls, &[1, 2, 3]).await;
        let rec = EventRecorder::start().await;
        let topic = "slow.machine";
        subscribe_webhook(&rec.history, &urls[0], topic, "hook", &rec.url, 1).await;
        let (epoch, placed) = wait_placed(&urls, topic, "hook", 1).await;
        let client = http(Duration::from_secs(5));
        let mut before = Vec::new();
        for u in &urls {
            before.push(view(&client, u, "/v1/cluster/placements").await.expect("placements"));
        }
        // Publish to the nodes that do not run the instance, so events cross nodes all along.
        let ingress: Vec<String> = nodes
            .iter()
            .filter(|n| !placed.contains(&n.id()))
            .map(|n| n.url().to_string())
            .collect();
        println!("[cpu] slow.machine/hook placed on {placed:?} (epoch {epoch}); saturating the CPU for {HOG:?}");

        let hog = CpuHog::start(4, HOG);
        let started = Instant::now();
        let load = Load::start(LoadSpec {
            history: rec.history.clone(),
            prefix: "cpu".to_string(),
            topic: topic.to_string(),
            urls: ingress,
            total: 6_000,
            batch: 20,
            publishers: 1,
            pace: Some(Duration::from_millis(100)),
            rotate: false,
            keyed: false,
            time_limit: HOG,
            answer_within: Duration::from_secs(5),
        });
        let mut polls = 0;
        let mut unanswered = 0;
        let mut not_up: Vec<String> = Vec::new();
        let mut downs: Vec<String> = Vec::new();
        let mut max_phi: BTreeMap<(u64, u64), f64> = BTreeMap::new();
        while started.elapsed() < HOG {
            let tick = Instant::now();
            for (observer, u) in nodes.iter().map(|n| n.id()).zip(&urls) {
                polls += 1;
                let Some(v) = view(&client, u, "/v1/cluster").await else {
                    unanswered += 1;
                    continue;
                };
                for m in v["members"].as_array().into_iter().flatten() {
                    let id = m["id"].as_u64().unwrap_or(0);
                    let status = m["status"].as_str().unwrap_or("?");
                    let phi = m["phi"].as_f64().unwrap_or(0.0);
                    let e = max_phi.entry((observer, id)).or_insert(0.0);
                    *e = e.max(phi);
                    let note = format!(
                        "node {observer} saw node {id} {status} (phi {phi:.2}) at {:?}",
                        started.elapsed()
                    );
                    if status == "down" {
                        downs.push(note.clone());
                    }
                    if status != "up" {
                        not_up.push(note);
                    }
                }
            }
            actix_rt::time::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed())).await;
        }
        drop(hog);
        let progress = load.stop().await;
        println!(
        "[cpu] {polls} polls of /v1/cluster ({unanswered} unanswered), {} non-up observations, {} down; max phi by (observer, peer): {max_phi:?}",
        not_up.len(),
        downs.len()
    );
        for n in not_up.iter().take(10) {
            println!("[cpu]   {n}");
        }
        assert!(downs.is_empty(), "a node was marked down while merely slow: {downs:#?}");
        progress.assert_no_fatal();
        assert!(
            progress.accepted() >= 1_000,
            "too few events flowed while the CPU was saturated: {}",
            progress.summary()
        );

        let acked = progress.acknowledged();
        wait_received(&rec, &acked, DELIVERY).await;
        let (arrivals, distinct, duplicates) = counts(&rec.all());
        println!(
            "[cpu] {} acknowledged, {arrivals} received ({distinct} distinct, {duplicates} duplicates); retried refusals {:?}",
            acked.len(),
            progress.rejected()
        );
        for (u, b) in urls.iter().zip(&before) {
            let after = view(&client, u, "/v1/cluster/placements").await.expect("placements");
            assert_eq!(&after, b, "the placements on {u} changed while the CPU was saturated");
        }
        converge(
            "every node still shows all three members up",
            &urls,
            "/v1/cluster",
            |views| {
                let want: Vec<(u64, String)> = (1..=3).map(|id| (id, "up".to_string())).collect();
                views.iter().all(|v| statuses(v) == want).then_some(())
            },
        )
        .await;
        rec.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// Order

#[test]
fn per_key_order_holds_with_instances_on_three_nodes() {
    serially(|| async {
        const KEYS: usize = 20;
        const PER_KEY: u64 = 100;
        let nodes = start_cluster(3).await;
        let urls = urls(&nodes);
        wait_formed(&urls, &[1, 2, 3]).await;
        let rec = EventRecorder::start().await;
        let topic = "ordered";
        subscribe_webhook(&rec.history, &urls[1], topic, "hook", &rec.url, 3).await;
        let (epoch, placed) = wait_placed(&urls, topic, "hook", 3).await;
        println!(
            "[order] ordered/hook placed on {placed:?} (epoch {epoch}); publishing to node {}",
            nodes[0].id()
        );

        // One publisher per key, each strictly sequential: seq n+1 is sent once seq n got its 202.
        let progress = Rc::new(Progress::new(rec.history.clone()));
        let until = Instant::now() + Duration::from_secs(60);
        let tasks: Vec<_> = (0..KEYS)
            .map(|k| {
                let p = progress.clone();
                let url = vec![urls[0].clone()];
                actix_rt::spawn(async move {
                    let client = http(Duration::from_secs(5));
                    let key = format!("key-{k}");
                    for seq in 0..PER_KEY {
                        let id = format!("order-{k}-{seq}");
                        let headers = [
                            ("content-type", "application/json"),
                            ("idempotency-key", id.as_str()),
                            ("x-herald-key", key.as_str()),
                        ];
                        let event = Event::new(id.clone(), Some(&key), json!({ "key": key, "seq": seq }));
                        let body = event.data.to_string();
                        let path = format!("/v1/topics/{topic}/events?ack=accepted");
                        let Some(answer) = publish_until_accepted(
                            &client,
                            &url,
                            0,
                            false,
                            &path,
                            &headers,
                            &body,
                            &[event],
                            &p,
                            until,
                        )
                        .await
                        else {
                            return;
                        };
                        if answer["id"] != id.as_str() {
                            *p.fatal.borrow_mut() = Some(format!("{id} was accepted as {answer}"));
                            return;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("publisher task");
        }
        progress.assert_no_fatal();
        assert_eq!(
            progress.accepted(),
            KEYS * PER_KEY as usize,
            "not every event was accepted within the time limit: {}",
            progress.summary()
        );
        let acked = progress.acknowledged();
        wait_received(&rec, &acked, DELIVERY).await;
        let (arrivals, distinct, duplicates) = counts(&rec.all());
        println!(
            "[order] {} acknowledged, {arrivals} received ({distinct} distinct, {duplicates} duplicates)",
            acked.len()
        );
        // No fault: every event once, each key's in publish order (with its key and data).
        let verdict = rec.history.assert_guarantees();
        println!("[order] {}", verdict.summary());
        // Keys are routed by rendezvous over all placed instances, not to the ingress node's own: the
        // order above held across nodes only if several nodes delivered.
        let mut delivered_by = BTreeMap::new();
        for n in &nodes {
            let text = get_text(&format!("{}/metrics", n.url())).await;
            let labels = [("topic", topic), ("group", "hook"), ("outcome", "ok")];
            delivered_by.insert(
                n.id(),
                metric(&text, "herald_events_delivered_total", &labels).unwrap_or(0.0) as u64,
            );
        }
        println!("[order] delivered by node: {delivered_by:?}");
        assert!(
            delivered_by.values().filter(|&&d| d > 0).count() >= 2,
            "{KEYS} keys published to node {} were all handled on one node, not spread over the instances on {placed:?}: {delivered_by:?}",
            nodes[0].id()
        );
        rec.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// Rolling restart

#[test]
fn a_rolling_restart_under_load_loses_no_acknowledged_event() {
    serially(|| async {
        let mut nodes = start_cluster(3).await;
        let urls = urls(&nodes);
        wait_formed(&urls, &[1, 2, 3]).await;
        let rec = EventRecorder::start().await;
        let topic = "rolling";
        let h = rec.history.clone();
        subscribe_webhook(&h, &urls[0], topic, "hook", &rec.url, 2).await;
        let (epoch, placed) = record_placed(&h, &urls, topic, "hook", 2).await;
        println!("[rolling] rolling/hook placed on {placed:?} (epoch {epoch})");

        // Continuous load on whichever nodes are up; stopped once the last node is back.
        let load = Load::start(LoadSpec {
            history: h.clone(),
            prefix: "rolling".to_string(),
            topic: topic.to_string(),
            urls: urls.clone(),
            total: 40_000,
            batch: 50,
            publishers: 2,
            pace: Some(Duration::from_millis(50)),
            rotate: true,
            keyed: false,
            time_limit: Duration::from_secs(75),
            answer_within: Duration::from_secs(5),
        });
        load.wait_accepted(500, Duration::from_secs(30)).await;
        let started = Instant::now();
        for i in 0..nodes.len() {
            let t = Instant::now();
            let id = nodes[i].id();
            observe_placement(&h, &urls, topic, "hook").await;
            h.fault(id, history::Fault::Restart);
            let status = nodes.terminate(id).await;
            assert!(status.success(), "SIGTERM ends node {id} cleanly: {status:?}");
            let stopped = t.elapsed();
            // Its drain moved its instances before it exited: the end of that fault's detection.
            observe_placement(&h, &urls, topic, "hook").await;
            nodes.restart(id);
            nodes.ready().await;
            h.fault(id, history::Fault::Start);
            assert_eq!(nodes[i].url(), urls[i], "node {id} kept its HTTP address");
            wait_formed(&urls, &[1, 2, 3]).await;
            println!(
                "[rolling] node {id} stopped in {stopped:?}, ready and all three up after {:?}; {} accepted so far",
                t.elapsed(),
                load.accepted()
            );
        }
        let restarts = started.elapsed();
        let progress = load.stop().await;
        progress.assert_no_fatal();
        let acked = progress.acknowledged();
        let waited = wait_received(&rec, &acked, DELIVERY).await;
        let (arrivals, distinct, duplicates) = counts(&rec.all());
        println!(
            "[rolling] restarts took {restarts:?}; {} acknowledged, {arrivals} received ({distinct} distinct, {duplicates} duplicates); all arrived {waited:?} after publishing stopped; retried refusals {:?}",
            acked.len(),
            progress.rejected()
        );
        wait_formed(&urls, &[1, 2, 3]).await;
        record_placed(&h, &urls, topic, "hook", 2).await;
        let verdict = h.assert_guarantees();
        println!(
            "[rolling] the history keeps the delivery guarantees: {}",
            verdict.summary()
        );
        rec.stop().await;
    });
}
