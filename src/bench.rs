//! `herald bench`: benchmark scenarios that print figures next to a peer measured in the same run.
//!
//! `local`: events/s from publish to a no-op Rust handler in one node (in-process publish, no
//! HTTP), with `ack=none` and `ack=accepted`, next to raw actix `do_send` to a no-op actor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use clap::{Args, Subcommand};
use tokio::sync::Notify;

use crate::config::{Config, FsyncPolicy};
use crate::event::Event;
use crate::handler::{Delivery, HandlerResult};
use crate::ingress::{AckMode, Ingress, PublishError};
use crate::node::Node;
use crate::subscription::SubscriptionSpec;

/// `herald bench` arguments.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Publish → no-op Rust handler in one node, vs raw actix do_send.
    Local(LocalArgs),
}

#[derive(Args, Debug)]
struct LocalArgs {
    /// Events per run.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Concurrent publishers for ack=accepted (each waits for its group commit).
    #[arg(long, default_value_t = 256)]
    publishers: usize,
    /// Events per publish call in the batched ack=accepted run (like one HTTP batch request).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Handler instances of the benchmark subscription.
    #[arg(long, default_value_t = 2)]
    instances: u32,
    /// WAL fsync policy for ack=accepted.
    #[arg(long, value_enum, default_value = "always")]
    wal_fsync: FsyncPolicy,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
}

/// Runs a scenario.
pub fn run(args: BenchArgs) -> Result<(), String> {
    match args.scenario {
        Scenario::Local(a) => actix_rt::System::new().block_on(local(a)),
    }
}

/// Counts handled events and wakes the benchmark when a target is reached.
struct Tally {
    seen: AtomicU64,
    target: AtomicU64,
    done: Notify,
}

impl Tally {
    fn hit(&self) {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.target.load(Ordering::Relaxed) {
            self.done.notify_one();
        }
    }

    async fn reset_and_wait(&self, target: u64, max: Duration, start: impl FnOnce()) -> Result<(), String> {
        self.seen.store(0, Ordering::SeqCst);
        self.target.store(target, Ordering::SeqCst);
        let notified = self.done.notified();
        start();
        tokio::time::timeout(max, notified).await.map_err(|_| {
            format!(
                "only {} of {target} events were handled within {max:?}",
                self.seen.load(Ordering::Relaxed)
            )
        })
    }
}

struct NoOp(Arc<Tally>);

impl Actor for NoOp {
    type Context = Context<Self>;
}

impl Handler<Delivery> for NoOp {
    type Result = HandlerResult;
    fn handle(&mut self, _: Delivery, _: &mut Context<Self>) -> HandlerResult {
        self.0.hit();
        Ok(())
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Ping;

struct RawNoOp(Arc<Tally>);

impl Actor for RawNoOp {
    type Context = Context<Self>;
}

impl Handler<Ping> for RawNoOp {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {
        self.0.hit();
    }
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

async fn publish_until_accepted(ingress: &Ingress, events: Vec<Event>, ack: AckMode) -> Result<(), String> {
    loop {
        match ingress.publish(events.clone(), ack, Duration::from_secs(30)).await {
            Ok(_) => return Ok(()),
            // Full mailboxes: the handlers are behind; let them run and retry (closed loop).
            Err(PublishError::Overloaded(_)) => tokio::task::yield_now().await,
            Err(other) => return Err(other.to_string()),
        }
    }
}

/// `publishers` concurrent tasks publish `events` in calls of `batch` with `ack=accepted`; events/s
/// until the handler has seen them all.
async fn publish_concurrently(
    ingress: &Arc<Ingress>,
    tally: &Tally,
    payload: &Event,
    events: u64,
    publishers: usize,
    batch: usize,
    max: Duration,
) -> Result<f64, String> {
    let calls = (events / (publishers * batch) as u64).max(1);
    let total = calls * (publishers * batch) as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let ing = ingress.clone();
        let events = vec![payload.clone(); batch];
        tasks.push(actix_rt::spawn(async move {
            for _ in 0..calls {
                publish_until_accepted(&ing, events.clone(), AckMode::Accepted).await?;
            }
            Ok::<(), String>(())
        }));
    }
    tally.reset_and_wait(total, max, || {}).await?;
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn local(a: LocalArgs) -> Result<(), String> {
    let max = Duration::from_secs(a.max_seconds);
    let dir = std::env::temp_dir().join(format!("herald-bench-{}", std::process::id()));
    let tally = Arc::new(Tally {
        seen: AtomicU64::new(0),
        target: AtomicU64::new(u64::MAX),
        done: Notify::new(),
    });
    let mut config = Config::default();
    config.http.addr = "127.0.0.1:0".into();
    config.data_dir = dir.clone();
    config.wal.fsync = a.wal_fsync;
    let t = tally.clone();
    let node = Node::builder()
        .config(config)
        .handler("noop", move || NoOp(t.clone()))
        .subscription(SubscriptionSpec::rust("bench", "noop", "noop").instances(a.instances))
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let ingress = node.ingress().clone();
    let payload =
        Event::json("bench", &serde_json::json!({"user_id": 1, "username": "bench"})).map_err(|e| e.to_string())?;
    println!(
        "herald bench local: {} events per run, {} runs, {} instances, wal.fsync={:?}",
        a.events, a.runs, a.instances, a.wal_fsync
    );

    // Raw actix: do_send from one task to one no-op actor on another thread.
    let mut raw = Vec::new();
    let arbiter = Arbiter::new();
    let t = tally.clone();
    let addr = RawNoOp::start_in_arbiter(&arbiter.handle(), move |_| RawNoOp(t));
    for _ in 0..a.runs {
        let started = Instant::now();
        tally
            .reset_and_wait(a.events, max, || {
                for _ in 0..a.events {
                    addr.do_send(Ping);
                }
            })
            .await?;
        raw.push(a.events as f64 / started.elapsed().as_secs_f64());
    }
    arbiter.stop();

    let mut none = Vec::new();
    for _ in 0..a.runs {
        let started = Instant::now();
        let ing = ingress.clone();
        let ev = payload.clone();
        let events = a.events;
        let publisher = actix_rt::spawn(async move {
            for _ in 0..events {
                publish_until_accepted(&ing, vec![ev.clone()], AckMode::None).await?;
            }
            Ok::<(), String>(())
        });
        tally.reset_and_wait(a.events, max, || {}).await?;
        publisher.await.map_err(|e| e.to_string())??;
        none.push(a.events as f64 / started.elapsed().as_secs_f64());
    }

    let mut accepted = Vec::new();
    for _ in 0..a.runs {
        accepted.push(publish_concurrently(&ingress, &tally, &payload, a.events, a.publishers, 1, max).await?);
    }
    let mut batched = Vec::new();
    for _ in 0..a.runs {
        batched.push(
            publish_concurrently(&ingress, &tally, &payload, a.events, a.publishers.min(16), a.batch, max).await?,
        );
    }
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    let raw = median(raw);
    let rows = [
        ("raw actix do_send".to_string(), raw),
        ("herald ack=none".to_string(), median(none)),
        (format!("herald ack=accepted x{}", a.publishers), median(accepted)),
        (format!("herald ack=accepted batch {}", a.batch), median(batched)),
    ];
    println!(
        "\n{:<30} {:>12} {:>12} {:>12} {:>8}",
        "scenario", "median ev/s", "min ev/s", "max ev/s", "vs raw"
    );
    for (name, (m, lo, hi)) in rows {
        println!("{name:<30} {m:>12.0} {lo:>12.0} {hi:>12.0} {:>7.2}x", m / raw.0);
    }
    Ok(())
}
