//! `herald-bench memory`: heap bytes per idle subscription instance and per in-flight event, in
//! one in-process node.
//!
//! This binary's global allocator is Herald's ([`herald::Allocator`]) behind [`Counting`], which
//! adds the size of every allocation and subtracts every free while counting is on (off: one
//! relaxed load per call, in every process of this binary). The figures are the net heap bytes a
//! step leaves allocated, divided by what it made; the allocator's own overhead and fragmentation
//! are not in them (RSS is in the `scale` scenario).
//!
//! 0. **a node**: from before `Node::builder()` to the node ready with no subscription;
//! 1. **idle instances**: `--subscriptions` one-instance subscriptions of a no-op Rust handler,
//!    created over HTTP, and one event published to each (an instance starts its actor for its
//!    first delivery); counted once every instance has handled its event and the heap is quiet;
//! 2. **in-flight events**: a subscription whose one instance holds its first delivery until
//!    released (an async handler: one event at a time), then `--events` events published in
//!    batches of 100, with `ack=accepted` (WAL) and with `ack=none`; counted once every publish
//!    returned and the heap is quiet; then released, and counted again once every event was
//!    handled (what is left after the backlog drained).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use clap::Args;
use tokio::sync::watch;

use super::{publish_until_accepted, record};
use herald::config::Config;
use herald::event::Event;
use herald::handler::{Delivery, HandlerResult};
use herald::ingress::AckMode;
use herald::node::Node;

static COUNTING: AtomicBool = AtomicBool::new(false);
static NET_BYTES: AtomicI64 = AtomicI64::new(0);

/// Herald's allocator, counting the net bytes allocated while [`count`] is on.
pub(super) struct Counting;

fn add(bytes: usize, sign: i64) {
    if COUNTING.load(Ordering::Relaxed) {
        NET_BYTES.fetch_add(sign * bytes as i64, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on unchanged to Herald's allocator; the counting only reads the
// layouts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = herald::Allocator.alloc(layout);
        if !p.is_null() {
            add(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = herald::Allocator.alloc_zeroed(layout);
        if !p.is_null() {
            add(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        herald::Allocator.dealloc(ptr, layout);
        add(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = herald::Allocator.realloc(ptr, layout, new_size);
        if !p.is_null() {
            add(layout.size(), -1);
            add(new_size, 1);
        }
        p
    }
}

/// Starts counting from zero.
fn count() {
    NET_BYTES.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
}

fn counted() -> i64 {
    NET_BYTES.load(Ordering::SeqCst)
}

/// `herald-bench memory` arguments.
#[derive(Args, Debug)]
pub(super) struct MemoryArgs {
    /// Idle one-instance subscriptions created.
    #[arg(long, default_value_t = 1000)]
    subscriptions: usize,
    /// Events held in flight per ack mode (at most the mailbox capacity, 4096).
    #[arg(long, default_value_t = 4000)]
    events: usize,
    /// A smoke run: 50 subscriptions, 400 events.
    #[arg(long)]
    smoke: bool,
    /// Also write the figures as JSON to this file (for `herald-bench report`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// Counts the events it handled.
struct Idle(Arc<AtomicU64>);

impl Actor for Idle {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Idle {
    type Result = HandlerResult;
    fn handle(&mut self, _: Delivery, _: &mut Context<Self>) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Holds every delivery until the watch says `true`; counts the events it handled.
struct Hold {
    release: watch::Receiver<bool>,
    handled: Arc<AtomicU64>,
}

impl Actor for Hold {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Hold {
    type Result = ResponseFuture<HandlerResult>;
    fn handle(&mut self, _: Delivery, _: &mut Context<Self>) -> Self::Result {
        let (mut release, handled) = (self.release.clone(), self.handled.clone());
        Box::pin(async move {
            // An error: the node is stopping, and the event may go.
            let _ = release.wait_for(|go| *go).await;
            handled.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }
}

/// Polls until `done`, within `max`.
async fn until(what: &str, max: Duration, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > max {
            return Err(format!("{what}: not within {max:?}"));
        }
        actix_rt::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Waits until the counted bytes change by less than 0.5 % over 200 ms (at most 10 s); returns them.
async fn quiet() -> i64 {
    let t0 = Instant::now();
    let mut last = counted();
    loop {
        actix_rt::time::sleep(Duration::from_millis(200)).await;
        let now = counted();
        if (now - last).abs() as f64 <= 0.005 * now.abs().max(1) as f64 || t0.elapsed() > Duration::from_secs(10) {
            return now;
        }
        last = now;
    }
}

/// `herald-bench memory`.
pub(super) fn run(mut a: MemoryArgs) -> Result<(), String> {
    if a.smoke {
        a.subscriptions = a.subscriptions.min(50);
        a.events = a.events.min(400);
    }
    if a.subscriptions == 0 || a.events == 0 || a.events > 4096 {
        return Err("--subscriptions must be positive and --events 1 to 4096".into());
    }
    actix_rt::System::new().block_on(measure(a))
}

async fn measure(a: MemoryArgs) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("herald-bench-memory-{}", std::process::id()));
    let made = Arc::new(AtomicU64::new(0)); // events the idle instances handled
    let handled = Arc::new(AtomicU64::new(0));
    let (release, held) = watch::channel(false);
    let mut config = Config::default();
    config.http.addr = "127.0.0.1:0".into();
    config.data_dir = dir.clone();
    // One node, in this process: no peers to protect.
    config.peer_tls.insecure = true;
    let (m, h) = (made.clone(), handled.clone());
    // The node itself, from before it starts to ready and quiet.
    count();
    let node = Node::builder()
        .config(config)
        .handler("idle", move || Idle(m.clone()))
        .handler("hold", move || Hold {
            release: held.clone(),
            handled: h.clone(),
        })
        .start()
        .await
        .map_err(|e| e.to_string())?;
    node.ready().await;
    let base = quiet().await as f64;
    println!(
        "a node, started and ready with no subscription: {:.0} KiB (net heap)",
        base / 1024.0
    );
    let outcome = steps(&a, &node, base, &made, &handled, &release).await;
    let _ = release.send(true);
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

async fn steps(
    a: &MemoryArgs,
    node: &herald::node::RunningNode,
    base: f64,
    made: &AtomicU64,
    handled: &AtomicU64,
    release: &watch::Sender<bool>,
) -> Result<(), String> {
    let client = crate::cluster::node_client(Duration::from_secs(30), crate::cluster::CONNECTIONS);
    let url = format!("http://{}/v1/subscriptions", node.http_addr());
    let subscribe = |topic: String, handler: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let spec = serde_json::json!({
                "topic": topic, "group": "g", "handler": {"kind": "rust", "name": handler}, "instances": 1,
            });
            let r = client
                .post(&url)
                .send_json(&spec)
                .await
                .map_err(|e| format!("POST {url}: {e}"))?;
            if !r.status().is_success() {
                return Err(format!("POST {url}: {}", r.status()));
            }
            Ok::<(), String>(())
        }
    };
    // Warm the client's connection and the HTTP path before counting.
    subscribe("memory.hold".into(), "hold").await?;
    println!(
        "herald-bench memory: one in-process node; {} idle subscriptions, {} events in flight per ack mode",
        a.subscriptions, a.events
    );

    count();
    for i in 0..a.subscriptions {
        subscribe(format!("memory.idle.{i}"), "idle").await?;
    }
    let publisher = node.publisher();
    let payload = serde_json::json!({"user_id": 1, "username": "bench"});
    for i in 0..a.subscriptions {
        let topic = format!("memory.idle.{i}");
        publish_until_accepted(
            &publisher,
            || Event::json(topic.as_str(), &payload).into_iter().collect(),
            AckMode::None,
        )
        .await?;
    }
    let n = a.subscriptions as u64;
    until(
        "every idle instance handled its event",
        Duration::from_secs(120),
        || made.load(Ordering::SeqCst) >= n,
    )
    .await?;
    let per_instance = quiet().await as f64 / a.subscriptions as f64;
    println!("idle subscription instance: {per_instance:.0} bytes (net heap, {n} instances)");

    let mut rows = Vec::new();
    let mut in_flight = Vec::new();
    let mut drained = Vec::new();
    let mut total = 0u64;
    for (ack, name) in [(AckMode::Accepted, "ack=accepted"), (AckMode::None, "ack=none")] {
        // The first event is taken by the handler and held; the rest wait behind it.
        count();
        let mut left = a.events;
        while left > 0 {
            let k = left.min(100);
            publish_until_accepted(
                &publisher,
                || {
                    (0..k)
                        .filter_map(|_| Event::json("memory.hold", &payload).ok())
                        .collect()
                },
                ack,
            )
            .await?;
            left -= k;
        }
        let bytes = quiet().await as f64 / a.events as f64;
        // Release, let them all be handled, and hold again for the next mode.
        total += a.events as u64;
        release.send_replace(true);
        until("every held event handled", Duration::from_secs(120), || {
            handled.load(Ordering::Relaxed) >= total
        })
        .await?;
        release.send_replace(false);
        let left_over = quiet().await as f64 / a.events as f64;
        println!("in-flight event, {name}: {bytes:.0} bytes; {left_over:.0} bytes each left once all were handled");
        in_flight.push((name, bytes));
        drained.push((name, left_over));
    }
    COUNTING.store(false, Ordering::SeqCst);
    rows.push(record::row(
        "memory",
        "",
        "a node, started and ready, no subscription (KiB)",
        "kib",
        false,
        &[base / 1024.0],
        None,
    ));
    rows.push(record::row(
        "memory",
        "",
        &format!("idle subscription instance ({} instances)", a.subscriptions),
        "bytes",
        false,
        &[per_instance],
        None,
    ));
    for ((mode, bytes), (_, left)) in in_flight.iter().zip(&drained) {
        let case = format!("in-flight event ({} held)", a.events);
        rows.push(record::row("memory", mode, &case, "bytes", false, &[*bytes], None));
        let case = format!("per event, left after the {} were handled", a.events);
        rows.push(record::row("memory", mode, &case, "bytes", false, &[*left], None));
    }
    if let Some(path) = &a.json {
        let meta = serde_json::json!({
            "command": "herald-bench memory",
            "time": chrono::Utc::now().to_rfc3339(),
            "subscriptions": a.subscriptions,
            "events": a.events,
        });
        record::write(path, meta, rows)?;
    }
    Ok(())
}
