//! A seeded, deterministic simulation of the event plane of three nodes (issue 17, point 4).
//!
//! Each node is the real router (routing table, slot choice, window reservations), the real relay
//! (outbound: pending table, lanes, parking, re-routing, redelivery; inbound: fencing, the dedup
//! window, acks and credits), the real handler supervisors running a real actix actor, and the
//! real ingress (admission, reservations, the WAL, per-event trackers, start-up replay) on a
//! store written on the calling thread ([`Store::open_inline`]: the same writer, without its
//! thread, so virtual time stands still while it writes). They run on one single-threaded Tokio
//! runtime in virtual time, over an in-process network ([`SimNet`], the relay's [`EventNet`]
//! seam) that delays messages, resets connections (losing what was in flight on them), and cuts
//! links one way or both. Nodes crash (the process is gone: what it had in memory is lost, its
//! WAL file stays as the kernel holds it) and restart on their WAL. A node's disk fails for a
//! while (writes, syncs and growth fail with ENOSPC or EIO: [`FailingDisk`]); its store refuses
//! writes and recovers on its ticker, which runs in virtual time. While a node is down, its disk
//! may change a bit of one WAL record ([`flip_a_bit`]): the checksum must catch it. Some seeds run
//! `wal.fsync = "interval"`. The scenario plays membership and the monitor: it
//! moves placements to new epochs (each node learns of it at its own time, so nodes disagree for
//! a while and fencing decides), marks a crashed node suspect and moves its instances, and flips
//! one node's view of a peer to suspect and back. Publishes are single events or batches.
//! Handlers (a sync actor, pipelined, and an async one that sometimes outlasts the call timeout)
//! fail some attempts (retries), and fail some events for good (dead letters).
//!
//! Every random choice (the network's, the scenario's, the router's two random choices, delivery
//! ids and lanes) comes from the seed, and event ids are numbered, so a seed replays exactly:
//!
//! ```text
//! HERALD_EVENT_SIM_SEED=<n> cargo test --lib event_sim -- --nocapture
//! ```
//!
//! `HERALD_EVENT_SIM_SEEDS=<count>` runs seeds `1..=count` instead of the default 40.
//!
//! Checked at the end of every seed (the promises of README "Delivery guarantees"):
//! - every event acknowledged (`ack=accepted` or `processed`, answered or not) reached every
//!   subscription of its topic: a successful run with the published payload, or a dead letter —
//!   except, in seeds that run `wal.fsync = "interval"`, one whose node crashed before its
//!   append was durable (after the node's last flush; a store recovering from a failed disk
//!   writes again what the fault undid) (README "Delivery guarantees", the `wal.fsync` table; the
//!   simulation's crash keeps the WAL file as the kernel holds it, so redb's commits that were
//!   not durable are lost, as with a killed process), and one whose WAL record a disk changed
//!   (quarantined at the replay);
//! - an `ack=processed` answer says what happened: `ok` only with a successful run, `dead_lettered`
//!   only with a dead letter;
//! - no duplicates on one node: a `(subscription, event)` runs successfully at most once per run
//!   of a hosting node (its dedup window is in memory); runs on two nodes or in two runs of one
//!   (after a re-route or a crash) are counted and printed;
//! - `ack=none` is at most once: a `(subscription, event)` is handed to a handler at most once;
//! - an event that was refused is never run, and a batch is accepted whole or refused whole;
//! - per-key order in the stable phase: one origin's keyed events run in publish order;
//! - at the end, every node's store takes writes (its disk works again) and its WAL is empty
//!   (every event finished, so every record was acked away);
//! - a seed run twice gives the same trace.
//!
//! Not simulated: the membership service and monitor themselves (`tests/simulation.rs` runs
//! those), damage to redb's own pages, and wall-clock steps (no decision reads the wall clock:
//! ARCHITECTURE.md, "Time").

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Context, Handler};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::event::Event;
use crate::handler::supervisor::{DeadLetterError, DeadLetterSink, Policy};
use crate::handler::{Delivery, HandlerError, HandlerRegistry, HandlerResult};
use crate::ingress::store::{flip_a_bit, Disk, FailingDisk, Store};
use crate::ingress::{AckMode, Ingress, PublishError};
use crate::monitor::{Health, PeerState, Progress};
use crate::relay::{returns, PeerAsk, Relay, RelayConfig, ASK_QUEUE};
use crate::router::{Placement, Router, RouterParts, Workers};
use crate::subscription::{HandlerSpec, SubscriptionSpec};
use crate::transport::{Body, Envelope, EventNet, SendError, Sending};
use crate::types::{fnv1a, mix, SubscriptionKey, FNV_OFFSET};

const NODES: u64 = 3;
/// Events published during the faulty phase.
const EVENTS: u64 = 400;
/// Keyed events published from one node in the stable phase.
const ORDERED: u64 = 60;
/// How long a publish may wait for its outcomes (virtual time).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts before a dead letter.
const MAX_ATTEMPTS: u32 = 3;
/// How long a handler call may take (`handlers.call_timeout_ms`).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// SplitMix64: the scenario's generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// One direction of a connection between two nodes: messages in order, each delivered at its time.
struct Link {
    tx: mpsc::UnboundedSender<(u64, Instant, Bytes)>,
    /// Bumped when the connection resets: what was queued under an older one is lost.
    generation: Arc<AtomicU64>,
    /// When the last message queued is delivered (a later one is not delivered before it).
    last: Instant,
}

struct World {
    rng: Rng,
    inboxes: BTreeMap<u64, mpsc::Sender<(u64, Bytes)>>,
    links: BTreeMap<(u64, u64), Link>,
    /// Directions (from, to) whose messages are dropped.
    cut: BTreeSet<(u64, u64)>,
    /// Per mille of sends that reset their connection.
    reset_per_mille: u64,
    trace: Vec<String>,
    start: Instant,
}

impl World {
    fn log(&mut self, line: String) {
        let at = self.start.elapsed().as_millis();
        self.trace.push(format!("{at:>7} {line}"));
    }

    fn reset(&mut self, from: u64, to: u64) {
        if let Some(link) = self.links.get(&(from, to)) {
            link.generation.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type Shared = Arc<Mutex<World>>;

/// The running nodes, by id − 1 (a restarted node replaces its crashed run).
type Nodes = Rc<RefCell<Vec<Rc<Node>>>>;

/// What ends a fault (or applies a placement on one node), at its time.
type Undo = Box<dyn FnOnce(&Nodes, &Shared)>;

/// A node's events channel in the simulation.
struct SimNet {
    me: u64,
    /// False once this run of the node crashed: it sends nothing more.
    alive: Arc<AtomicBool>,
    world: Shared,
}

impl SimNet {
    fn deliver(&self, to: u64, envelope: Envelope) -> Result<(), SendError> {
        let Some(Body::App(bytes)) = envelope.body else {
            return Ok(());
        };
        if !self.alive.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut w = self.world.lock().unwrap();
        let from = self.me;
        if w.cut.contains(&(from, to)) {
            w.log(format!("{from}->{to} cut {}B", bytes.len()));
            return Ok(());
        }
        if w.rng.below(1000) < w.reset_per_mille {
            w.log(format!("{from}->{to} reset"));
            w.reset(from, to);
            return Ok(());
        }
        let delay = w.rng.millis(0, 8);
        let world = self.world.clone();
        let link = w.links.entry((from, to)).or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Instant, Bytes)>();
            let generation = Arc::new(AtomicU64::new(0));
            let current = generation.clone();
            tokio::spawn(async move {
                while let Some((g, at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    // To the node's current run, if it runs (a crashed one receives nothing).
                    let inbox = world.lock().unwrap().inboxes.get(&to).cloned();
                    if let Some(inbox) = inbox.filter(|_| current.load(Ordering::Relaxed) == g) {
                        let _ = inbox.send((from, bytes)).await;
                    }
                }
            });
            Link {
                tx,
                generation,
                last: Instant::now(),
            }
        });
        let at = (Instant::now() + delay).max(link.last);
        link.last = at;
        let g = link.generation.load(Ordering::Relaxed);
        let _ = link.tx.send((g, at, bytes));
        Ok(())
    }
}

impl EventNet for SimNet {
    fn send(&self, id: u64, envelope: Envelope) -> Result<(), SendError> {
        self.deliver(id, envelope)
    }

    fn send_async(&self, id: u64, envelope: Envelope) -> Sending<'_> {
        let sent = self.deliver(id, envelope);
        Box::pin(async move { sent })
    }

    fn max_frame_len(&self) -> usize {
        crate::transport::DEFAULT_MAX_FRAME_LEN
    }
}

/// One call of a handler.
#[derive(Debug, Clone)]
struct Run {
    node: u64,
    /// Which run of the node (0, then 1 after its first restart …).
    life: u64,
    sub: SubscriptionKey,
    id: String,
    attempt: u32,
    ok: bool,
    data: Bytes,
}

#[derive(Default)]
struct History {
    runs: Vec<Run>,
    dead: Vec<(SubscriptionKey, String)>,
    /// How often each kind of thing the scenario means to exercise happened.
    seen: BTreeMap<&'static str, u64>,
    /// Orders WAL appends, flushes and crashes (one thread: a counter is exact).
    clock: u64,
    /// With `wal.fsync = "interval"`: the clock of each node run's last tick that left its store
    /// healthy (a flush, or a recovery): everything it had appended before is durable.
    flushed: BTreeMap<(u64, u64), u64>,
    /// With `wal.fsync = "interval"`: each crashed node run's last flush before the crash. What
    /// it appended after that was not durable, and the crash may have lost it.
    crashed: BTreeMap<(u64, u64), u64>,
    /// Events whose WAL record a disk changed: the replay quarantines it, so what was not
    /// delivered before the crash is lost.
    corrupted: BTreeSet<String>,
}

impl History {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Whether the promise lets `s` be lost: a disk changed its record, or its node crashed
    /// before its append was durable.
    fn may_lose(&self, s: &Sent) -> bool {
        self.corrupted.contains(&s.id) || self.unflushed_at_crash(s)
    }

    /// With `interval`: `s`'s node crashed, and its append was not durable yet: it came after
    /// the node's last tick that left its store healthy (a flush, or a recovery from a failed
    /// disk, which writes again what the fault undid).
    fn unflushed_at_crash(&self, s: &Sent) -> bool {
        self.crashed.get(&s.origin).is_some_and(|flushed| s.appended > *flushed)
    }
}

/// Counts one `what` in `record`.
fn saw(record: &Record, what: &'static str) {
    *record.lock().unwrap().seen.entry(what).or_default() += 1;
}

/// What every run of the test must have exercised, over all its seeds.
const EXERCISED: &[&str] = &[
    "batch",
    "call past the timeout",
    "crash",
    "disk fault",
    "record changed on disk",
    "publish refused by a failed disk",
    "unflushed event lost by a crash",
    "dead letter",
    "fault",
    "refused publish",
];

type Record = Arc<Mutex<History>>;

/// Whether attempt `attempt` of event `id` fails in `group`: about one event in eight fails its
/// first attempts, one in forty every attempt (a dead letter).
fn fails(id: &str, group: &str, attempt: u32) -> bool {
    let h = mix(fnv1a(fnv1a(FNV_OFFSET, id.as_bytes()), group.as_bytes()));
    h % 40 == 0 || (h % 8 == 1 && attempt < 3)
}

struct SimHandler {
    node: u64,
    life: u64,
    alive: Arc<AtomicBool>,
    record: Record,
    world: Shared,
}

impl Actor for SimHandler {
    type Context = Context<Self>;
}

impl SimHandler {
    /// Records a call that succeeds when `ok`; false when this run of the node crashed (nothing
    /// runs: its supervisors only wind down).
    fn begin(&self, d: &Delivery, ok: bool) -> bool {
        if !self.alive.load(Ordering::Relaxed) {
            return false;
        }
        self.world.lock().unwrap().log(format!(
            "run {} {} {} #{} {}",
            self.node,
            d.subscription,
            d.event.id,
            d.attempt,
            if ok { "ok" } else { "err" }
        ));
        self.record.lock().unwrap().runs.push(Run {
            node: self.node,
            life: self.life,
            sub: (*d.subscription).clone(),
            id: d.event.id.clone(),
            attempt: d.attempt,
            ok,
            data: d.event.data.clone(),
        });
        true
    }
}

fn answer(ok: bool) -> HandlerResult {
    if ok {
        Ok(())
    } else {
        Err(HandlerError::msg("simulated failure"))
    }
}

impl Handler<Delivery> for SimHandler {
    type Result = HandlerResult;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        let ok = !fails(&d.event.id, &d.subscription.group, d.attempt);
        answer(self.begin(&d, ok) && ok)
    }
}

/// An async handler (answered later, so not pipelined) that takes a while: up to 30 ms, and
/// past the call timeout on the first attempt of about one event in thirty (the supervisor fails
/// that attempt and retries; what the call then returns is ignored).
struct SlowHandler(SimHandler);

impl Actor for SlowHandler {
    type Context = Context<Self>;
}

impl Handler<Delivery> for SlowHandler {
    type Result = actix::ResponseFuture<HandlerResult>;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> Self::Result {
        let h = mix(fnv1a(FNV_OFFSET, d.event.id.as_bytes()) ^ u64::from(d.attempt));
        let times_out = d.attempt == 1 && h % 30 == 7;
        let delay = if times_out {
            CALL_TIMEOUT + CALL_TIMEOUT / 2
        } else {
            Duration::from_millis(h % 31)
        };
        let ok = !fails(&d.event.id, &d.subscription.group, d.attempt);
        let ran = self.0.begin(&d, ok && !times_out);
        if ran && times_out {
            saw(&self.0.record, "call past the timeout");
        }
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            answer(ran && ok)
        })
    }
}
struct SimDeadLetters(Record, Arc<AtomicBool>);

impl DeadLetterSink for SimDeadLetters {
    fn store(
        &self,
        sub: &SubscriptionKey,
        event: &Event,
        _attempts: u32,
        _error: &str,
    ) -> BoxFuture<'static, Result<(), DeadLetterError>> {
        if !self.1.load(Ordering::Relaxed) {
            // A crashed run stores nothing: the event stays in its origin's WAL.
            return Box::pin(async { Err("crashed".into()) });
        }
        self.0.lock().unwrap().dead.push((sub.clone(), event.id.clone()));
        saw(&self.0, "dead letter");
        Box::pin(async { Ok(()) })
    }
}

struct Node {
    id: u64,
    life: u64,
    /// `wal.fsync = "interval"` (else `always`).
    interval: bool,
    /// The placement epoch it follows (a node applies placements in order, as Raft does).
    epoch: AtomicU64,
    /// False once this run crashed.
    alive: Arc<AtomicBool>,
    router: Arc<Router>,
    ingress: Arc<Ingress>,
    health: Arc<Health>,
    store: Store,
    /// The disk its WAL is on (a restarted run gets a repaired one).
    disk: Arc<FailingDisk>,
    _asks: mpsc::Receiver<PeerAsk>,
}

impl Node {
    /// The process dies: it sends, receives and runs nothing more, and its WAL file is closed
    /// as it is on disk.
    fn crash(&self, world: &Shared, record: &Record) {
        self.alive.store(false, Ordering::Relaxed);
        self.store.crash();
        if self.interval {
            let mut h = record.lock().unwrap();
            let flushed = h.flushed.get(&(self.id, self.life)).copied().unwrap_or(0);
            h.crashed.insert((self.id, self.life), flushed);
        }
        let mut w = world.lock().unwrap();
        w.inboxes.remove(&self.id);
        for other in 1..=NODES {
            w.reset(self.id, other);
            w.reset(other, self.id);
        }
    }
}

/// Starts run `life` of node `id` on the WAL in `dir` (not ready until [`replay`]).
fn node(id: u64, life: u64, interval: bool, dir: &Path, world: &Shared, record: &Record) -> Rc<Node> {
    let (inbox_tx, inbox) = mpsc::channel(crate::transport::APP_QUEUE);
    world.lock().unwrap().inboxes.insert(id, inbox_tx);
    let alive = Arc::new(AtomicBool::new(true));
    let mut registry = HandlerRegistry::default();
    let (r, w, a) = (record.clone(), world.clone(), alive.clone());
    let handler = move || SimHandler {
        node: id,
        life,
        alive: a.clone(),
        record: r.clone(),
        world: w.clone(),
    };
    let slow = handler.clone();
    registry.register("sim", handler);
    registry.register("slow", move || SlowHandler(slow()));
    let health = Arc::new(Health::default());
    let (returns, returned) = returns();
    let router = Arc::new(Router::new(RouterParts {
        registry,
        workers: Workers::Here,
        policy: Policy {
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            call_timeout: CALL_TIMEOUT,
        },
        dead_letters: Arc::new(SimDeadLetters(record.clone(), alive.clone())),
        mailbox_capacity: 64,
        default_max_attempts: MAX_ATTEMPTS,
        webhook_timeout: Duration::from_secs(1),
        webhook_policy: Arc::default(),
        me: id,
        health: health.clone(),
        progress: Arc::new(Progress::new(1)),
        window: 64,
        returns: Arc::new(returns),
    }));
    let (asks_tx, asks) = mpsc::channel(ASK_QUEUE);
    let relay = Relay::start(
        Arc::new(SimNet {
            me: id,
            alive: alive.clone(),
            world: world.clone(),
        }),
        router.clone(),
        health.clone(),
        RelayConfig {
            redeliver_after: Duration::from_millis(1500),
            dedup_window: 100_000,
        },
        tokio::runtime::Handle::current(),
        inbox,
        returned,
        asks_tx,
    );
    let disk = Arc::new(FailingDisk::default());
    let store = Store::open_inline(
        dir,
        &crate::config::WalConfig {
            fsync: if interval {
                crate::config::FsyncPolicy::Interval
            } else {
                crate::config::FsyncPolicy::Always
            },
            ..Default::default()
        },
        crate::ingress::store::Retention::of(&crate::config::HandlerConfig::default()),
        Disk::failing(disk.clone()),
    )
    .expect("store");
    let ingress = Arc::new(Ingress::new(
        router.clone(),
        relay,
        store.clone(),
        64 << 20,
        crate::telemetry::Sampler::new(0.0),
    ));
    {
        // The store's ticker, in virtual time: housekeeping and the recovery from a failed disk,
        // and with `interval` a durable commit every `wal.flush_interval_ms`.
        let (store, alive, record) = (store.clone(), alive.clone(), record.clone());
        tokio::task::spawn_local(async move {
            let every = if interval {
                Duration::from_millis(crate::config::WalConfig::default().flush_interval_ms)
            } else {
                crate::ingress::store::TICK
            };
            while alive.load(Ordering::Relaxed) {
                tokio::time::sleep(every).await;
                if !alive.load(Ordering::Relaxed) {
                    return;
                }
                // A flush that failed (the disk) made nothing durable.
                if store.tick_inline(interval) && interval {
                    let mut h = record.lock().unwrap();
                    let now = h.tick();
                    h.flushed.insert((id, life), now);
                }
            }
        });
    }
    Rc::new(Node {
        id,
        life,
        interval,
        epoch: AtomicU64::new(0),
        alive,
        router,
        ingress,
        health,
        store,
        disk,
        _asks: asks,
    })
}

/// Replays node `n`'s WAL (its events are routed by the placement it follows) and marks it ready.
async fn replay(n: &Node, world: &Shared) {
    let replayed = n.ingress.replay_wal(|_, _| true).await.expect("WAL replay");
    world
        .lock()
        .unwrap()
        .log(format!("node {} replayed {replayed} events", n.id));
}

fn subscriptions() -> Vec<SubscriptionSpec> {
    let spec = |topic: &str, group: &str, handler: &str, instances| SubscriptionSpec {
        topic: topic.into(),
        group: group.into(),
        handler: HandlerSpec::Rust { name: handler.into() },
        instances,
        max_attempts: None,
    };
    vec![
        spec("orders", "billing", "sim", 2),
        spec("orders", "audit", "sim", 1),
        spec("users", "mail", "slow", 3),
    ]
}

/// A placement: each instance of each subscription on a random node of `up`.
fn place(rng: &mut Rng, subs: &[SubscriptionSpec], up: &[u64]) -> BTreeMap<SubscriptionKey, Vec<u64>> {
    subs.iter()
        .map(|s| {
            let key = SubscriptionKey {
                topic: s.topic.clone(),
                group: s.group.clone(),
            };
            let nodes = (0..s.instances).map(|_| up[rng.below(up.len() as u64) as usize]);
            (key, nodes.collect())
        })
        .collect()
}

/// What `Control::reconcile` does with a committed placement (`Router::follow`); one older than
/// the placement the node follows is ignored (moves are learnt at different times).
fn reconcile(node: &Node, subs: &[SubscriptionSpec], epoch: u64, placed: &BTreeMap<SubscriptionKey, Vec<u64>>) {
    if node.epoch.fetch_max(epoch, Ordering::Relaxed) >= epoch {
        return;
    }
    let here = |key: &SubscriptionKey| placed[key].iter().filter(|n| **n == node.id).count() as u32;
    node.router.follow(
        subs,
        here,
        Placement {
            epoch,
            subscriptions: placed.clone(),
        },
    );
}

/// How a publish ended.
#[derive(Debug, Clone)]
enum Published {
    /// Acknowledged; for `ack=processed`, each subscription's outcome.
    Ok(Option<Vec<(SubscriptionKey, String)>>),
    /// No answer reached the client: `ack=processed` gave up waiting, or the node crashed first.
    /// It was accepted (it is in the node's WAL), its outcome is unknown.
    Unanswered,
    /// Refused: nothing may run.
    Refused(String),
}

struct Sent {
    /// The publish call it was in (a batch is one call).
    call: u64,
    /// The node run it was published on.
    origin: (u64, u64),
    /// When it was appended to that run's WAL (`History::clock`): publishing writes the WAL
    /// before anything else runs.
    appended: u64,
    id: String,
    topic: String,
    data: Bytes,
    ack: AckMode,
    result: Published,
}

fn event(n: u64, topic: &str, key: Option<String>) -> Event {
    let mut e = Event::new(topic, format!("payload {n} of {topic}"), "text/plain");
    e.id = format!("e{n:05}");
    e.key = key;
    e
}

/// Publishes `e` on `node` and waits for its answer, as a client would: the answer of a node that
/// crashed meanwhile never reaches the client.
async fn publish(
    world: Shared,
    record: Record,
    node: Rc<Node>,
    call: u64,
    events: Vec<Event>,
    ack: AckMode,
) -> Vec<Sent> {
    let ingress = node.ingress.clone();
    let appended = record.lock().unwrap().tick();
    let sent: Vec<(String, String, Bytes)> = events
        .iter()
        .map(|e| (e.id.clone(), e.topic.clone(), e.data.clone()))
        .collect();
    let results: Vec<Published> = match ingress.publish_answers(events, ack, PUBLISH_TIMEOUT).await {
        Ok(answers) => answers
            .iter()
            .map(|a| {
                Published::Ok(a.outcomes.as_ref().map(|o| {
                    o.iter()
                        .map(|o| {
                            let key = SubscriptionKey {
                                topic: o.topic.clone(),
                                group: o.group.clone(),
                            };
                            (key, o.outcome.clone())
                        })
                        .collect()
                }))
            })
            .collect(),
        Err(PublishError::Timeout { .. }) => vec![Published::Unanswered; sent.len()],
        Err(e) => vec![Published::Refused(e.to_string()); sent.len()],
    };
    // Refusals come before anything is accepted (or awaited): only a later answer can be lost.
    let lost = !node.alive.load(Ordering::Relaxed);
    let mut w = world.lock().unwrap();
    sent.into_iter()
        .zip(results)
        .map(|((id, topic, data), result)| {
            let result = match result {
                Published::Refused(_) => result,
                _ if lost => Published::Unanswered,
                _ => result,
            };
            w.log(format!("answer {id}: {result:?}"));
            Sent {
                call,
                origin: (node.id, node.life),
                appended,
                id,
                topic,
                data,
                ack,
                result,
            }
        })
        .collect()
}

/// What one seed saw.
struct Outcome {
    trace: Vec<String>,
    sent: Vec<Sent>,
    history: History,
    ordered: Vec<(String, String)>,
    /// Each node's store once everything was delivered.
    stores: Vec<StoreAtEnd>,
}

struct StoreAtEnd {
    node: u64,
    /// Why it refuses writes, if it does (its disk works again by then).
    problem: Option<String>,
    /// The records its WAL still holds (every event is finished by then), as `seq: event id`.
    wal: Vec<String>,
}

fn run_seed(seed: u64) -> Outcome {
    simulate(seed, scenario(seed))
}

/// Runs `body` on a paused-time runtime of one thread with the crate's randomness seeded.
fn simulate<T>(seed: u64, body: impl std::future::Future<Output = T>) -> T {
    crate::types::seed_random(seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, body)
}

/// An empty simulated network drawing from `seed`.
fn world(seed: u64) -> Shared {
    Arc::new(Mutex::new(World {
        rng: Rng(seed ^ 0x5eed),
        inboxes: BTreeMap::new(),
        links: BTreeMap::new(),
        cut: BTreeSet::new(),
        reset_per_mille: 0,
        trace: Vec::new(),
        start: Instant::now(),
    }))
}

/// A directory for one node's WAL: in memory where the machine has a tmpfs at `/dev/shm` (each
/// commit is fsynced, as `wal.fsync = "always"` does, and a disk would make that the run's cost).
fn wal_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    };
    dir.expect("a temporary directory")
}

/// The placement the scenario has committed, and which nodes are down.
struct Plan {
    epoch: u64,
    placed: BTreeMap<SubscriptionKey, Vec<u64>>,
    down: BTreeSet<u64>,
    /// How many times each node restarted (its current run).
    lives: Vec<u64>,
    /// This seed's nodes run with `wal.fsync = "interval"` (else `always`).
    interval: bool,
}

impl Plan {
    fn up(&self) -> Vec<u64> {
        (1..=NODES).filter(|n| !self.down.contains(n)).collect()
    }

    /// Commits a new placement on the up nodes; each node applies it within 150 ms, in its own
    /// time (undos scheduled in `heal`).
    fn move_all(&mut self, rng: &mut Rng, subs: &[SubscriptionSpec], world: &Shared, heal: &mut Vec<(Instant, Undo)>) {
        self.epoch += 1;
        self.placed = place(rng, subs, &self.up());
        let (epoch, placed) = (self.epoch, &self.placed);
        world
            .lock()
            .unwrap()
            .log(format!("placement epoch {epoch}: {placed:?}"));
        for id in 1..=NODES {
            let (p, s) = (self.placed.clone(), subs.to_vec());
            heal.push((
                Instant::now() + rng.millis(0, 150),
                Box::new(move |nodes, _| reconcile(&nodes.borrow()[id as usize - 1], &s, epoch, &p)),
            ));
        }
    }
}

async fn scenario(seed: u64) -> Outcome {
    let world = world(seed);
    let record: Record = Arc::default();
    let dirs: Vec<tempfile::TempDir> = (1..=NODES).map(|_| wal_dir()).collect();
    let subs = subscriptions();
    let mut rng = Rng(seed);
    let mut plan = Plan {
        epoch: 1,
        placed: BTreeMap::new(),
        down: BTreeSet::new(),
        lives: vec![0; NODES as usize],
        interval: false,
    };
    plan.interval = rng.chance(30);
    if plan.interval {
        world.lock().unwrap().log("wal.fsync = interval".into());
    }
    plan.placed = place(&mut rng, &subs, &plan.up());
    let mut started = Vec::new();
    for id in 1..=NODES {
        let n = node(id, 0, plan.interval, dirs[id as usize - 1].path(), &world, &record);
        reconcile(&n, &subs, plan.epoch, &plan.placed);
        replay(&n, &world).await;
        started.push(n);
    }
    let nodes: Nodes = Rc::new(RefCell::new(started));

    // The faulty phase: publishes from every running node while the scenario injects faults.
    world.lock().unwrap().reset_per_mille = 5 + rng.below(30);
    let mut publishes = Vec::new();
    let mut next_fault = Instant::now() + rng.millis(20, 200);
    let mut heal: Vec<(Instant, Undo)> = Vec::new();
    // The crashed node and when it restarts (one at a time: the others keep a majority's work).
    let mut restart: Option<(Instant, u64)> = None;
    let mut n = 0;
    let mut call = 0;
    while n < EVENTS {
        tokio::time::sleep(rng.millis(0, 12)).await;
        let now = Instant::now();
        heal.sort_by_key(|(at, _)| *at);
        while heal.first().is_some_and(|(at, _)| *at <= now) {
            let (_, undo) = heal.remove(0);
            undo(&nodes, &world);
        }
        if let Some((_, id)) = restart.filter(|(at, _)| *at <= now) {
            restart = None;
            start_again(id, &dirs, &nodes, &world, &record, &subs, &mut plan).await;
        }
        if now >= next_fault {
            next_fault = now + rng.millis(50, 400);
            saw(&record, "fault");
            let (a, b) = (1 + rng.below(NODES), 1 + rng.below(NODES - 1));
            let b = if b >= a { b + 1 } else { b };
            let lasts = rng.millis(50, 2500);
            match rng.below(6) {
                0 => {
                    let both = rng.chance(50);
                    let mut w = world.lock().unwrap();
                    w.log(format!("fault: cut {a}->{b}{}", if both { " both ways" } else { "" }));
                    w.cut.insert((a, b));
                    w.reset(a, b);
                    if both {
                        w.cut.insert((b, a));
                        w.reset(b, a);
                    }
                    heal.push((
                        now + lasts,
                        Box::new(move |_, world| {
                            let mut w = world.lock().unwrap();
                            w.log(format!("heal: {a}<->{b}"));
                            w.cut.remove(&(a, b));
                            w.cut.remove(&(b, a));
                        }),
                    ));
                }
                1 => {
                    world.lock().unwrap().log(format!("fault: {a} sees {b} suspect"));
                    nodes.borrow()[a as usize - 1].health.set(b, PeerState::Suspect, 9.0);
                    heal.push((
                        now + lasts,
                        Box::new(move |nodes, world| {
                            world.lock().unwrap().log(format!("heal: {a} sees {b} up"));
                            nodes.borrow()[a as usize - 1].health.set(b, PeerState::Up, 0.0);
                        }),
                    ));
                }
                2 => {
                    world.lock().unwrap().log("fault: placement moves".into());
                    plan.move_all(&mut rng, &subs, &world, &mut heal);
                }
                3 if restart.is_none() => {
                    // A crash: the monitor suspects it at once here, the leader moves its
                    // instances (MarkDown), it restarts on its WAL a while later.
                    world.lock().unwrap().log(format!("fault: node {a} crashes"));
                    saw(&record, "crash");
                    nodes.borrow()[a as usize - 1].crash(&world, &record);
                    if rng.chance(40) {
                        // Its disk changed a bit of a record while it was down: the checksum
                        // must catch it at the replay (quarantined, never run with other bytes).
                        let (pick, bit) = (rng.below(1 << 20), rng.below(1 << 20));
                        if let Some((seq, id)) = flip_a_bit(dirs[a as usize - 1].path(), pick, bit) {
                            world
                                .lock()
                                .unwrap()
                                .log(format!("fault: node {a}'s disk changed WAL record {seq} ({id})"));
                            saw(&record, "record changed on disk");
                            record.lock().unwrap().corrupted.insert(id);
                        }
                    }
                    plan.down.insert(a);
                    for other in (1..=NODES).filter(|o| *o != a) {
                        nodes.borrow()[other as usize - 1]
                            .health
                            .set(a, PeerState::Suspect, 9.0);
                    }
                    plan.move_all(&mut rng, &subs, &world, &mut heal);
                    restart = Some((now + rng.millis(500, 4000), a));
                }
                4 if !plan.down.contains(&a) => {
                    // Its WAL's disk fails (full, or I/O errors) for a while: its publishes are
                    // refused, its acks wait, the store recovers on a tick once it works again.
                    let errno = if rng.chance(50) { 28 } else { 5 };
                    let n = nodes.borrow()[a as usize - 1].clone();
                    world
                        .lock()
                        .unwrap()
                        .log(format!("fault: node {a}'s disk fails (errno {errno})"));
                    saw(&record, "disk fault");
                    n.disk.fail_with(errno);
                    heal.push((
                        now + lasts,
                        Box::new(move |_, world| {
                            world.lock().unwrap().log(format!("heal: node {a}'s disk works"));
                            n.disk.fail_with(0);
                        }),
                    ));
                }
                _ => {
                    let mut w = world.lock().unwrap();
                    w.log(format!("fault: reset {a}->{b}"));
                    w.reset(a, b);
                }
            }
        }
        let up = plan.up();
        let origin = up[rng.below(up.len() as u64) as usize];
        let topic = if rng.chance(60) { "orders" } else { "users" };
        let ack = match rng.below(20) {
            0..=10 => AckMode::Processed,
            11..=16 => AckMode::Accepted,
            _ => AckMode::None,
        };
        // One event per call mostly; a batch (accepted whole or refused whole) now and then.
        let size = if rng.chance(25) { 2 + rng.below(6) } else { 1 };
        let events: Vec<Event> = (0..size)
            .map(|i| {
                let key = rng.chance(40).then(|| format!("k{}", rng.below(6)));
                event(n + i, topic, key)
            })
            .collect();
        n += size;
        call += 1;
        if size > 1 {
            saw(&record, "batch");
        }
        world.lock().unwrap().log(format!(
            "publish {} on {origin} ack={ack:?} ({size} events)",
            events[0].id
        ));
        let node = nodes.borrow()[origin as usize - 1].clone();
        publishes.push(tokio::task::spawn_local(publish(
            world.clone(),
            record.clone(),
            node,
            call,
            events,
            ack,
        )));
    }

    // Heal: a crashed node restarts, every cut and suspicion ends, every node learns the last
    // placement.
    if let Some((_, id)) = restart.take() {
        start_again(id, &dirs, &nodes, &world, &record, &subs, &mut plan).await;
    }
    heal.sort_by_key(|(at, _)| *at);
    for (_, undo) in heal.drain(..) {
        undo(&nodes, &world);
    }
    for n in nodes.borrow().iter() {
        for other in (1..=NODES).filter(|o| *o != n.id) {
            n.health.set(other, PeerState::Up, 0.0);
        }
    }
    {
        let mut w = world.lock().unwrap();
        w.log("healed".into());
        w.cut.clear();
        w.reset_per_mille = 0;
    }
    let mut sent = Vec::new();
    for p in publishes {
        sent.extend(p.await.expect("publish task"));
    }

    // The stable phase: keyed events from one node, in order, no faults.
    let origin = 1 + rng.below(NODES);
    let node = nodes.borrow()[origin as usize - 1].clone();
    let mut ordered = Vec::new();
    let mut stable = Vec::new();
    for n in 0..ORDERED {
        let key = format!("o{}", rng.below(4));
        let e = event(EVENTS * 2 + n, "orders", Some(key.clone()));
        let id = e.id.clone();
        call += 1;
        let sent = publish(
            world.clone(),
            record.clone(),
            node.clone(),
            call,
            vec![e],
            AckMode::Accepted,
        )
        .await;
        if !matches!(sent[0].result, Published::Refused(_)) {
            ordered.push((key, id));
        }
        stable.extend(sent);
    }
    sent.extend(stable);

    // Everything acknowledged must arrive: wait (bounded, virtual time) until it has.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && !missing(&sent, &subs, &record.lock().unwrap(), false).is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A little longer, for any duplicate still on its way (and a few store ticks).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stores = nodes
        .borrow()
        .iter()
        .map(|n| StoreAtEnd {
            node: n.id,
            problem: n.store.problem().map(|e| e.to_string()),
            wal: n
                .store
                .wal_chunk(None, u64::MAX, 1000)
                // A store that cannot read is reported by its problem.
                .unwrap_or_default()
                .into_iter()
                .map(|(seq, r)| match r.ok().and_then(|r| r.event) {
                    Some(e) => format!("{seq}: {}", e.id),
                    None => format!("{seq}: undecodable"),
                })
                .collect(),
        })
        .collect();
    let history = std::mem::take(&mut *record.lock().unwrap());
    let trace = std::mem::take(&mut world.lock().unwrap().trace);
    drop(nodes);
    drop(dirs);
    Outcome {
        trace,
        sent,
        history,
        ordered,
        stores,
    }
}

/// Restarts crashed node `id` (its next run) on its WAL: it follows the committed placement,
/// replays, and the others see it up again (it takes instances at the next placement move).
async fn start_again(
    id: u64,
    dirs: &[tempfile::TempDir],
    nodes: &Nodes,
    world: &Shared,
    record: &Record,
    subs: &[SubscriptionSpec],
    plan: &mut Plan,
) {
    world.lock().unwrap().log(format!("node {id} restarts"));
    plan.lives[id as usize - 1] += 1;
    let life = plan.lives[id as usize - 1];
    let n = node(id, life, plan.interval, dirs[id as usize - 1].path(), world, record);
    reconcile(&n, subs, plan.epoch, &plan.placed);
    nodes.borrow_mut()[id as usize - 1] = n.clone();
    replay(&n, world).await;
    plan.down.remove(&id);
    for other in (1..=NODES).filter(|o| *o != id) {
        nodes.borrow()[other as usize - 1].health.set(id, PeerState::Up, 0.0);
    }
}

fn keys_of(subs: &[SubscriptionSpec], topic: &str) -> Vec<SubscriptionKey> {
    subs.iter()
        .filter(|s| s.topic == topic)
        .map(|s| SubscriptionKey {
            topic: s.topic.clone(),
            group: s.group.clone(),
        })
        .collect()
}

/// The acknowledged `(subscription, event)` pairs with neither a successful run nor a dead letter.
/// The (subscription, event) pairs an acknowledged event has not reached yet; with `lossy`, also
/// those of events a crash was allowed to lose (see [`History::may_lose`]).
fn missing(sent: &[Sent], subs: &[SubscriptionSpec], h: &History, lossy: bool) -> Vec<(SubscriptionKey, String)> {
    let done: BTreeSet<(&SubscriptionKey, &str)> = h
        .runs
        .iter()
        .filter(|r| r.ok)
        .map(|r| (&r.sub, r.id.as_str()))
        .chain(h.dead.iter().map(|(k, id)| (k, id.as_str())))
        .collect();
    let mut out = Vec::new();
    for s in sent.iter().filter(|s| s.ack != AckMode::None) {
        if matches!(s.result, Published::Refused(_)) || (!lossy && h.may_lose(s)) {
            continue;
        }
        for key in keys_of(subs, &s.topic) {
            if !done.contains(&(&key, s.id.as_str())) {
                out.push((key, s.id.clone()));
            }
        }
    }
    out
}

/// Every broken promise of one seed, as readable lines (empty: all held).
fn check(o: &Outcome) -> Vec<String> {
    let subs = subscriptions();
    let h = &o.history;
    let mut broken = Vec::new();
    for (key, id) in missing(&o.sent, &subs, h, false) {
        broken.push(format!("acknowledged event {id} never reached {key}"));
    }
    for st in &o.stores {
        if let Some(why) = &st.problem {
            broken.push(format!(
                "node {}'s store still refuses writes after its disk works: {why}",
                st.node
            ));
        }
        if !st.wal.is_empty() {
            broken.push(format!(
                "node {}'s WAL still holds {} records though every event was finished: {:?}",
                st.node,
                st.wal.len(),
                &st.wal[..st.wal.len().min(8)]
            ));
        }
    }
    let by_id: HashMap<&str, &Sent> = o.sent.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut ok_runs: BTreeMap<(u64, u64, &SubscriptionKey, &str), usize> = BTreeMap::new();
    let mut handed: BTreeMap<(&SubscriptionKey, &str), usize> = BTreeMap::new();
    for r in &h.runs {
        let Some(s) = by_id.get(r.id.as_str()) else {
            broken.push(format!("{} ran event {} that was never published", r.node, r.id));
            continue;
        };
        if let Published::Refused(why) = &s.result {
            broken.push(format!("refused event {} ({why}) ran on node {}", r.id, r.node));
        }
        if r.data != s.data {
            broken.push(format!("event {} ran on node {} with another payload", r.id, r.node));
        }
        if r.ok {
            *ok_runs.entry((r.node, r.life, &r.sub, r.id.as_str())).or_default() += 1;
        }
        if r.attempt == 1 {
            *handed.entry((&r.sub, r.id.as_str())).or_default() += 1;
        }
    }
    for ((node, life, key, id), n) in &ok_runs {
        if *n > 1 {
            broken.push(format!(
                "{key} ran {id} successfully {n} times on node {node} (run {life}; dedup window)"
            ));
        }
    }
    for s in o.sent.iter().filter(|s| s.ack == AckMode::None) {
        for key in keys_of(&subs, &s.topic) {
            let n = handed.get(&(&key, s.id.as_str())).copied().unwrap_or(0);
            if n > 1 {
                broken.push(format!("ack=none event {} handed to {key} {n} times", s.id));
            }
        }
    }
    let mut calls: BTreeMap<u64, BTreeSet<bool>> = BTreeMap::new();
    for s in &o.sent {
        calls
            .entry(s.call)
            .or_default()
            .insert(matches!(s.result, Published::Refused(_)));
    }
    for (call, refused) in calls {
        if refused.len() > 1 {
            broken.push(format!("publish call {call} was accepted in part and refused in part"));
        }
    }
    for s in &o.sent {
        let Published::Ok(Some(outcomes)) = &s.result else {
            continue;
        };
        for (key, outcome) in outcomes {
            let ran = h.runs.iter().any(|r| r.ok && &r.sub == key && r.id == s.id);
            let dead = h.dead.iter().any(|(k, id)| k == key && *id == s.id);
            let fine = match outcome.as_str() {
                "ok" => ran,
                "dead_lettered" => dead,
                _ => false,
            };
            if !fine {
                broken.push(format!(
                    "{} answered {outcome} for {key} (ran ok: {ran}, dead letter: {dead})",
                    s.id
                ));
            }
        }
    }
    // Per-key order of the stable phase: the first attempts of each key's events, per subscription.
    for key in keys_of(&subs, "orders") {
        let mut first: Vec<&str> = Vec::new();
        for r in h.runs.iter().filter(|r| r.sub == key && r.attempt == 1) {
            if o.ordered.iter().any(|(_, id)| *id == r.id) && !first.contains(&r.id.as_str()) {
                first.push(&r.id);
            }
        }
        for k in o.ordered.iter().map(|(k, _)| k).collect::<BTreeSet<_>>() {
            let want: Vec<&str> = o
                .ordered
                .iter()
                .filter(|(kk, _)| kk == k)
                .map(|(_, id)| id.as_str())
                .collect();
            let got: Vec<&str> = first.iter().copied().filter(|id| want.contains(id)).collect();
            if got != want {
                broken.push(format!("{key} ran key {k} out of order: {got:?}, published {want:?}"));
            }
        }
    }
    broken
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("HERALD_EVENT_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let n = std::env::var("HERALD_EVENT_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    (1..=n).collect()
}

#[test]
fn acknowledged_events_reach_every_subscription_under_faults() {
    let mut failed = Vec::new();
    let (mut runs, mut dup_nodes) = (0, 0);
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    for seed in seeds() {
        let o = run_seed(seed);
        let broken = check(&o);
        runs += o.history.runs.len();
        for (what, n) in &o.history.seen {
            *seen.entry(what).or_default() += n;
        }
        let refused = o
            .sent
            .iter()
            .filter(|s| matches!(s.result, Published::Refused(_)))
            .count();
        *seen.entry("refused publish").or_default() += refused as u64;
        let by_disk = o
            .sent
            .iter()
            .filter(|s| matches!(&s.result, Published::Refused(why) if why.starts_with("the write-ahead log is unavailable")))
            .count();
        *seen.entry("publish refused by a failed disk").or_default() += by_disk as u64;
        let unflushed = o.sent.iter().filter(|s| o.history.unflushed_at_crash(s)).count();
        *seen.entry("event unflushed at a crash").or_default() += unflushed as u64;
        // What the promise let go and was indeed lost, by why.
        let by_id: HashMap<&str, &Sent> = o.sent.iter().map(|s| (s.id.as_str(), s)).collect();
        for (_, id) in missing(&o.sent, &subscriptions(), &o.history, true) {
            let s = by_id[id.as_str()];
            if o.history.unflushed_at_crash(s) {
                *seen.entry("unflushed event lost by a crash").or_default() += 1;
            } else if o.history.corrupted.contains(&s.id) {
                *seen.entry("changed record lost").or_default() += 1;
            }
        }
        let mut nodes_per: BTreeMap<(&SubscriptionKey, &str), BTreeSet<(u64, u64)>> = BTreeMap::new();
        for r in o.history.runs.iter().filter(|r| r.ok) {
            nodes_per.entry((&r.sub, &r.id)).or_default().insert((r.node, r.life));
        }
        dup_nodes += nodes_per.values().filter(|n| n.len() > 1).count();
        if std::env::var_os("HERALD_EVENT_SIM_TRACE").is_some() {
            for line in &o.trace {
                println!("seed {seed}: {line}");
            }
        }
        if !broken.is_empty() {
            eprintln!("seed {seed}: {} broken promises, e.g.:", broken.len());
            for b in broken.iter().take(10) {
                eprintln!("  {b}");
            }
            eprintln!("  replay: HERALD_EVENT_SIM_SEED={seed} HERALD_EVENT_SIM_TRACE=1 cargo test --lib event_sim -- --nocapture");
            failed.push(seed);
        }
    }
    println!(
        "event-plane simulation: {} seeds, {runs} handler calls, {dup_nodes} events run on two nodes or runs of \
         one (after a re-route or crash), {seen:?}; failed seeds: {failed:?}",
        seeds().len()
    );
    assert!(failed.is_empty(), "seeds {failed:?} broke promises (see above)");
    // One seed replayed (`HERALD_EVENT_SIM_SEED`) need not exercise everything.
    let replay = std::env::var_os("HERALD_EVENT_SIM_SEED").is_some();
    for what in EXERCISED.iter().filter(|_| !replay) {
        assert!(
            seen.get(what).is_some_and(|n| *n > 0),
            "no {what} in any seed: the scenario misses it"
        );
    }
}

/// A link that drops what it is given without resetting (a black hole) until the window towards
/// the only instance is full of lost deliveries: once it carries again, they are sent again and
/// handled (each re-send reuses its own unit of the window; found by seed 227).
#[test]
fn a_window_full_of_lost_deliveries_is_sent_again_once_the_link_carries() {
    let (sent, history, refused) = simulate(1, async {
        let world = world(1);
        let record: Record = Arc::default();
        let dirs: Vec<tempfile::TempDir> = (1..=2).map(|_| wal_dir()).collect();
        let subs = subscriptions();
        // Everything on node 1 but `orders/audit`, on node 2 only.
        let placed: BTreeMap<SubscriptionKey, Vec<u64>> = subs
            .iter()
            .map(|s| {
                let key = SubscriptionKey {
                    topic: s.topic.clone(),
                    group: s.group.clone(),
                };
                let on = if s.group == "audit" { 2 } else { 1 };
                (key, vec![on; s.instances as usize])
            })
            .collect();
        let mut nodes = Vec::new();
        for id in 1..=2 {
            let n = node(id, 0, false, dirs[id as usize - 1].path(), &world, &record);
            reconcile(&n, &subs, 1, &placed);
            replay(&n, &world).await;
            nodes.push(n);
        }
        world.lock().unwrap().cut.insert((1, 2));
        let mut sent = Vec::new();
        let mut refused = 0;
        for n in 0..10_000 {
            let got = publish(
                world.clone(),
                record.clone(),
                nodes[0].clone(),
                n,
                vec![event(n, "orders", None)],
                AckMode::Accepted,
            )
            .await;
            let full = matches!(got[0].result, Published::Refused(_));
            sent.extend(got);
            if full {
                refused += 1;
                break;
            }
        }
        // Long enough for every lost delivery to be due again while the link is still cut.
        tokio::time::sleep(Duration::from_secs(30)).await;
        world.lock().unwrap().cut.remove(&(1, 2));
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline && !missing(&sent, &subs, &record.lock().unwrap(), false).is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let history = std::mem::take(&mut *record.lock().unwrap());
        drop(nodes);
        (sent, history, refused)
    });
    assert_eq!(
        refused, 1,
        "the window towards node 2 filled up (a publish was refused)"
    );
    let lost = missing(&sent, &subscriptions(), &history, false);
    assert!(
        lost.is_empty(),
        "{} of {} accepted events never reached their subscription after the link healed, e.g. {:?}",
        lost.len(),
        sent.len(),
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn a_seed_replays_exactly() {
    let a = run_seed(7);
    let b = run_seed(7);
    assert!(a.trace.len() > 100, "the trace records the run");
    let first_difference = a.trace.iter().zip(&b.trace).position(|(x, y)| x != y);
    assert!(
        a.trace == b.trace,
        "seed 7 ran differently twice: first difference at line {first_difference:?} ({:?} vs {:?})",
        first_difference.map(|i| &a.trace[i]),
        first_difference.map(|i| &b.trace[i]),
    );
}
