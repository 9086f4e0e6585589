//! Node monitoring (DESIGN §6): pings, a phi-accrual failure detector per peer, and the health
//! every router reads.
//!
//! * [`PhiDetector`] is the pure detector (Hayashibara et al., with the logistic approximation
//!   Akka uses): it keeps the last intervals between heartbeats and says how unlikely the current
//!   silence is, as `phi = -log10(P(a heartbeat is still to come))`. Phi 8 means one chance in
//!   10⁸ that a live peer would stay silent this long, given what it did so far.
//! * [`Health`] is what the rest of the node reads, lock-free: one [`PeerHealth`] per peer with its
//!   [`PeerState`] (`up`, `suspect`, `degraded`), its phi and since when it is in that state.
//!   Routers skip peers that are not `up` at once; the leader commits `MarkDown` once a peer
//!   stayed suspect or degraded for `cluster.down_after_ms`, and `MarkUp` once it is back `up` for
//!   as long.
//!   A peer whose connection broke and whose process refuses new ones is marked down without
//!   waiting: that is a failure, not a suspicion.
//! * `run` is the monitor task (on the membership thread, away from handler load): every
//!   `cluster.ping_interval_ms` it pings the peers this node watches and re-evaluates each, and
//!   tells the leader what is news.
//!
//! # Bounded monitoring
//!
//! Pinging every member costs O(n) messages per node and O(n²) in all. Instead each node watches
//! at most `cluster.monitors` peers (5 by default), so idle monitoring costs O(monitors) per node
//! whatever the cluster's size:
//!
//! * **Who watches whom** ([`Ring`]): the members ordered by a fixed hash of their id form a
//!   ring; each up member watches the next `monitors` up members (and the down ones between,
//!   whose return someone must see). Every node computes it from the committed table alone, so
//!   all agree without talking, and every member is watched by exactly `monitors` up members. A
//!   cluster of at most `monitors + 1` nodes is watched by everyone, as before.
//! * **Gossip to the leader** ([`Suspicion`], the `Suspicions` peer message): a watcher tells
//!   the Raft leader when its view of a peer changes, and repeats at every ping while its view is
//!   news ([`is_news`]: it disagrees with the committed table), so a lost message or a new leader
//!   costs one ping interval, and an idle cluster sends no reports at all. The leader accepts a
//!   report only from a member (the peer the transport authenticated), about another member.
//! * **The verdict** ([`Suspicions::verdict`]): the leader commits `MarkDown` when a strict
//!   majority of the member's watchers report it suspect or degraded for `cluster.down_after_ms`,
//!   or its process gone (then at once); `MarkUp` when a majority saw it up again for as long. One
//!   lying or cut-off watcher never outvotes the others (with 5 watchers it takes 3). With a
//!   single watcher (two nodes) that watcher decides.
//! * **The leader watches only its own share.** It could ping every member (O(n) on one node
//!   would be affordable), but its view would be one more vote, which the majority rule must not
//!   let decide alone (a leader cut off from a healthy node would otherwise mark it down), and
//!   the watch set would then change with every election. So the leader is a watcher like any
//!   other and learns the rest from the reports.
//! * **Voters also watch one another** (at most `raft.voters` − 1 more peers), so that when the
//!   leader's process dies the voters see it at once and one starts the election without waiting
//!   out the election timeout, however large the cluster. These extra views are reported too, but
//!   count only where the ring makes their sender a watcher.
//!
//! [`Health`] holds only the peers this node watches; for the others it says `up`, and routers
//! skip them once the table has them down. Peers a node sends events to are still judged by their
//! connections by the relay, as before. `tests/monitoring_scale.rs` runs this core (with the real
//! [`PhiDetector`]) for 100 nodes in virtual time: its traffic, failover times and the liar case.
//!
//! A peer is **suspect** when its phi exceeds `cluster.phi_threshold`, or when the connection to it
//! broke and cannot be re-established (a killed process on a live host refuses connections at
//! once, which is a stronger signal than silence). It is **degraded** when it answers pings but
//! reports a backlog while one of its handler worker threads has been wedged for
//! `cluster.degraded_after_ms` (see [`Progress`]): the frozen-but-connected node that heartbeats
//! alone never catch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use crate::transport::wire::{PeerView, Pong, Suspicions as WireSuspicions, MAX_PEER_VIEWS};
use crate::transport::{Envelope, PeerNet};
// Shared with the configuration, which refuses a `cluster.phi_threshold` above it; its public path.
pub use crate::types::MAX_PHI;
// The default of `cluster.monitors`, shared with the configuration; its public path.
pub use crate::types::DEFAULT_MONITORS;

/// Now on the clock of the tokio runtime this runs on: the wall clock's monotonic time in a node,
/// virtual time under a paused runtime (the deterministic simulation), so that phi, `down_after`
/// and report ages follow the same time as the runtime's timers. Outside a runtime, `Instant::now`.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// How many heartbeat intervals the detector remembers.
const WINDOW: usize = 100;

/// The phi-accrual failure detector of one peer.
#[derive(Debug, Clone)]
pub struct PhiDetector {
    intervals: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last: Instant,
    min_std_ms: f64,
}

impl PhiDetector {
    /// A detector that has heard nothing yet: it assumes heartbeats every `expected` (so a peer
    /// that never answers becomes suspect like one that fell silent) and counts silence from `now`.
    pub fn new(now: Instant, expected: Duration, min_std: Duration) -> Self {
        let mut d = PhiDetector {
            intervals: VecDeque::with_capacity(WINDOW),
            sum: 0.0,
            sum_sq: 0.0,
            last: now,
            min_std_ms: min_std.as_secs_f64() * 1000.0,
        };
        d.reset(now, expected);
        d
    }

    /// Forgets the history (after a long silence, whose interval would distort it) and seeds it
    /// with the expected interval.
    pub fn reset(&mut self, now: Instant, expected: Duration) {
        self.intervals.clear();
        self.sum = 0.0;
        self.sum_sq = 0.0;
        let ms = expected.as_secs_f64() * 1000.0;
        // Two samples around the expected interval, so the first real ones are weighed sensibly.
        self.push(ms - ms / 4.0);
        self.push(ms + ms / 4.0);
        self.last = now;
    }

    fn push(&mut self, ms: f64) {
        if self.intervals.len() == WINDOW {
            if let Some(old) = self.intervals.pop_front() {
                self.sum -= old;
                self.sum_sq -= old * old;
            }
        }
        self.intervals.push_back(ms);
        self.sum += ms;
        self.sum_sq += ms * ms;
    }

    /// Records a heartbeat at `now`.
    pub fn heartbeat(&mut self, now: Instant) {
        let ms = now.saturating_duration_since(self.last).as_secs_f64() * 1000.0;
        self.push(ms);
        self.last = now;
    }

    /// When the last heartbeat arrived.
    pub fn last(&self) -> Instant {
        self.last
    }

    /// The mean interval and its standard deviation (at least the configured minimum), in ms.
    pub fn stats(&self) -> (f64, f64) {
        let n = self.intervals.len().max(1) as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        (mean, var.sqrt().max(self.min_std_ms))
    }

    /// Phi at `now`: how unlikely the silence since the last heartbeat is.
    pub fn phi(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64() * 1000.0;
        let (mean, std) = self.stats();
        phi(elapsed, mean, std)
    }
}

/// `-log10(1 - F(elapsed))` for a normal distribution `(mean, std)`, with the logistic
/// approximation of the CDF; capped at [`MAX_PHI`].
pub fn phi(elapsed_ms: f64, mean_ms: f64, std_ms: f64) -> f64 {
    let y = (elapsed_ms - mean_ms) / std_ms;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    let p = if elapsed_ms > mean_ms {
        -(e / (1.0 + e)).log10()
    } else {
        -(1.0 - 1.0 / (1.0 + e)).log10()
    };
    if p.is_nan() {
        MAX_PHI
    } else {
        p.clamp(0.0, MAX_PHI)
    }
}

/// A peer's health as this node's detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PeerState {
    /// Heartbeats arrive and handlers make progress.
    Up = 0,
    /// Silent beyond the phi threshold, or its connection broke.
    Suspect = 1,
    /// Answers pings but finishes no event while it has a backlog.
    Degraded = 2,
}

impl PeerState {
    /// `up`, `suspect` or `degraded`.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Up => "up",
            PeerState::Suspect => "suspect",
            PeerState::Degraded => "degraded",
        }
    }

    fn from_u8(v: u8) -> Self {
        Self::decode(u32::from(v)).unwrap_or(PeerState::Up)
    }

    /// The state numbered `v` (its `repr`, as the `Suspicions` peer message carries it), if any.
    fn decode(v: u32) -> Option<Self> {
        match v {
            0 => Some(PeerState::Up),
            1 => Some(PeerState::Suspect),
            2 => Some(PeerState::Degraded),
            _ => None,
        }
    }
}

/// One peer's health, written by the monitor and read lock-free by routers.
#[derive(Debug)]
pub struct PeerHealth {
    state: AtomicU8,
    /// Its connection broke and could not be re-established: the process is gone, not slow.
    unreachable: std::sync::atomic::AtomicBool,
    phi: AtomicU64,
    /// Milliseconds since [`Health`] was created when `state` last changed.
    since_ms: AtomicU64,
}

impl PeerHealth {
    fn new(since_ms: u64) -> Self {
        PeerHealth {
            state: AtomicU8::new(PeerState::Up as u8),
            unreachable: std::sync::atomic::AtomicBool::new(false),
            phi: AtomicU64::new(0f64.to_bits()),
            since_ms: AtomicU64::new(since_ms),
        }
    }

    /// The current state.
    pub fn state(&self) -> PeerState {
        PeerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether routers may choose this peer.
    pub fn routable(&self) -> bool {
        self.state() == PeerState::Up
    }

    /// Whether its connection broke and reconnecting failed since (a killed process refuses
    /// connections): a failure, not a suspicion, so the leader need not wait `down_after`.
    pub fn unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Acquire)
    }

    /// The last phi computed.
    pub fn phi(&self) -> f64 {
        f64::from_bits(self.phi.load(Ordering::Relaxed))
    }
}

/// The health of every peer, shared by the monitor, the routers, the relay and the leader.
#[derive(Debug)]
pub struct Health {
    peers: RwLock<HashMap<u64, Arc<PeerHealth>>>,
    origin: Instant,
    /// Bumped whenever a peer changes state (the relay re-routes, the leader re-evaluates).
    changed: watch::Sender<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            peers: RwLock::new(HashMap::new()),
            origin: now(),
            changed: watch::Sender::new(0),
        }
    }
}

impl Health {
    /// The health of peer `id`. A peer never evaluated is `up`, since the moment it was first
    /// asked about (so "up for `down_after`" means the detector had that long to object).
    pub fn peer(&self, id: u64) -> Arc<PeerHealth> {
        if let Some(p) = self.peers.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return p.clone();
        }
        self.peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_insert_with(|| {
                Arc::new(PeerHealth::new(
                    now().saturating_duration_since(self.origin).as_millis() as u64,
                ))
            })
            .clone()
    }

    /// Peer `id`'s state and how long it has been in it.
    pub fn state_for(&self, id: u64) -> (PeerState, Duration) {
        let p = self.peer(id);
        let since = Duration::from_millis(p.since_ms.load(Ordering::Acquire));
        (
            p.state(),
            now().saturating_duration_since(self.origin).saturating_sub(since),
        )
    }

    /// Notified on every state change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn set(&self, id: u64, state: PeerState, phi: f64) -> bool {
        let p = self.peer(id);
        p.phi.store(phi.to_bits(), Ordering::Relaxed);
        if p.state() == state {
            return false;
        }
        p.since_ms.store(
            now().saturating_duration_since(self.origin).as_millis() as u64,
            Ordering::Release,
        );
        p.state.store(state as u8, Ordering::Release);
        self.changed.send_modify(|v| *v += 1);
        true
    }

    /// Records whether peer `id`'s process is gone; returns whether that changed (and then
    /// notifies [`Health::subscribe`]rs).
    fn set_unreachable(&self, id: u64, unreachable: bool) -> bool {
        let changed = self.peer(id).unreachable.swap(unreachable, Ordering::AcqRel) != unreachable;
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
        changed
    }

    fn forget(&self, id: u64) {
        self.peers.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }
}

/// This node's handler progress, reported in every pong for gray-failure detection.
///
/// Progress is measured on the worker threads that run handler instances: each ticks a counter
/// every [`WORKER_TICK`] from a task of its own, and the node's progress is the smallest of those
/// counters. A worker wedged by a handler that blocks its thread stops ticking, so the node stops
/// progressing while events wait: that node is *degraded*. A handler that is merely slow or hung
/// in an `await` does not block its thread (its call times out and is retried), so a slow
/// downstream does not make its node degraded and does not get healthy nodes marked down one
/// after the other as its subscription moves.
#[derive(Debug, Default)]
pub struct Progress {
    /// The load counter of each handler instance of this node (events queued or in progress
    /// there), registered by [`Progress::track`]; the node's backlog is their sum, added up when
    /// a pong asks for it rather than counted again on every event (one contended counter less
    /// per event between the publisher and the handler threads).
    instances: Mutex<Vec<Weak<AtomicUsize>>>,
    workers: Vec<Arc<AtomicU64>>,
}

/// How often each worker thread ticks its progress counter: well inside `degraded_after_ms`
/// (3 s by default; a worker is judged stuck only after several missed ticks), and seldom enough
/// that an idle node's workers wake 4 times a second each.
pub const WORKER_TICK: Duration = Duration::from_millis(250);

impl Progress {
    /// Progress for `workers` worker threads; each must run [`Progress::tick_worker`].
    pub fn new(workers: usize) -> Self {
        Progress {
            instances: Mutex::default(),
            workers: (0..workers).map(|_| Arc::default()).collect(),
        }
    }

    /// Counts `load` (one handler instance's events queued or in progress) in the backlog for
    /// as long as the instance holds it.
    pub fn track(&self, load: &Arc<AtomicUsize>) {
        let mut instances = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        instances.retain(|w| w.strong_count() > 0);
        instances.push(Arc::downgrade(load));
    }

    /// Events queued or in progress at this node's handler instances (those still running).
    pub fn backlog(&self) -> u64 {
        let mut instances = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        let mut sum = 0u64;
        instances.retain(|w| match w.upgrade() {
            Some(load) => {
                sum += load.load(Ordering::Relaxed) as u64;
                true
            }
            None => false,
        });
        sum
    }

    /// The ticking task of worker `i` (runs until its runtime stops).
    pub fn tick_worker(&self, i: usize) -> impl std::future::Future<Output = ()> + 'static {
        let counter = self.workers.get(i).cloned().unwrap_or_default();
        async move {
            let mut tick = tokio::time::interval(WORKER_TICK);
            loop {
                tick.tick().await;
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The progress counter: the ticks of the slowest worker.
    pub fn handled(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
}

/// The monitor's settings (`cluster.*`).
#[derive(Debug, Clone, Copy)]
pub struct MonitorConfig {
    /// How often each peer is pinged.
    pub ping_interval: Duration,
    /// Phi above which a peer is suspect.
    pub phi_threshold: f64,
    /// The detector's floor for the standard deviation of heartbeat intervals.
    pub min_std_deviation: Duration,
    /// A peer with a backlog whose worker threads made no progress for this long is degraded.
    pub degraded_after: Duration,
    /// How many peers this node watches (`cluster.monitors`; see [`Ring`]).
    pub monitors: usize,
}

impl MonitorConfig {
    /// The settings of a node's `[cluster]` section.
    pub fn from_cluster(c: &crate::config::ClusterConfig) -> Self {
        MonitorConfig {
            ping_interval: Duration::from_millis(c.ping_interval_ms),
            phi_threshold: c.phi_threshold,
            min_std_deviation: Duration::from_millis(c.min_std_deviation_ms),
            degraded_after: Duration::from_millis(c.degraded_after_ms),
            monitors: c.monitors,
        }
    }

    /// How long the leader keeps a watcher's report that was not repeated: news is repeated every
    /// ping interval, so five intervals lose a report only when its watcher stopped sending.
    pub fn stale_after(&self) -> Duration {
        self.ping_interval * 5
    }
}

/// Answers a ping with this node's progress.
pub fn pong(seq: u64, sent_unix_nanos: i64, progress: &Progress) -> Envelope {
    Envelope::new(crate::transport::Body::Pong(Pong {
        seq,
        sent_unix_nanos,
        handled: progress.handled(),
        backlog: progress.backlog(),
    }))
}

/// A watcher's news as the envelope sent to the leader ([`MAX_PEER_VIEWS`] views at most; the
/// receiver reads no more).
pub fn suspicions_envelope(views: &[Suspicion]) -> Envelope {
    Envelope::new(crate::transport::Body::Suspicions(WireSuspicions {
        views: views
            .iter()
            .take(MAX_PEER_VIEWS)
            .map(|s| PeerView {
                node: s.node,
                state: s.state as u32,
                unreachable: s.unreachable,
                age_ms: s.age.as_millis().min(u128::from(u64::MAX)) as u64,
            })
            .collect(),
    }))
}

/// The views of a received [`WireSuspicions`]: the first [`MAX_PEER_VIEWS`], without those whose
/// state this build does not know. Whether the sender may report them is the receiver's call.
pub fn read_suspicions(wire: &WireSuspicions) -> Vec<Suspicion> {
    wire.views
        .iter()
        .take(MAX_PEER_VIEWS)
        .filter_map(|v| {
            let state = PeerState::decode(v.state)?;
            Some(Suspicion {
                node: v.node,
                state,
                unreachable: v.unreachable,
                age: Duration::from_millis(v.age_ms),
            })
        })
        .collect()
}

/// The timestamp a ping carries and its pong echoes: nanoseconds on [`now`]'s monotonic clock since
/// `origin` (when this monitor started), so a round trip is measured on one clock that a step of
/// the wall clock (NTP, a VM resumed, an operator) cannot move. Counted from the monitor's own
/// start, not the process's: the simulation's nodes start at the same virtual times in every run
/// of a seed, so their pings encode the same bytes.
fn ping_nanos(origin: Instant) -> i64 {
    now().saturating_duration_since(origin).as_nanos() as i64
}

/// The round trip of a pong echoing `sent` ([`ping_nanos`] from the same `origin`), in seconds.
fn rtt_since(origin: Instant, sent: i64) -> f64 {
    (ping_nanos(origin) - sent).max(0) as f64 / 1e9
}

/// What the monitor knows of one peer.
struct Watched {
    detector: PhiDetector,
    handled: u64,
    backlog: u64,
    progressed: Instant,
    ever_connected: bool,
    /// The `(state, unreachable)` last sent to the leader.
    reported: (PeerState, bool),
    phi_gauge: metrics::Gauge,
    rtt_gauge: metrics::Gauge,
    rtt_histogram: metrics::Histogram,
}

/// The members the monitor watches, as the latest committed membership table knows them.
///
/// The replicated membership state implements it (in `membership::service`). The monitor sits
/// below membership (membership's service runs it, and the leader's duties read its [`Health`]),
/// so it reads the table through this rather than naming the membership state.
pub(crate) trait Members {
    /// Every member's id with whether the table has it up (any status but `down`): the
    /// [`Ring`]'s input.
    fn member_statuses(&self) -> impl Iterator<Item = (u64, bool)> + '_;
}

/// The monitor task: pings the peers this node watches ([`Ring::watched_by`]), feeds pongs to
/// the detectors, publishes each watched peer's state in `health`, and sends its news to
/// `reports` (the membership service hands them to the leader). It also watches the members in
/// `also` (a voter watches the other voters, so that a dead leader is noticed by the voters that
/// must replace it). Wakes `changed` (the leader's duties) when a state changes.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run<M: Members>(
    me: u64,
    config: MonitorConfig,
    health: Arc<Health>,
    net: Arc<dyn PeerNet>,
    state: watch::Receiver<Arc<M>>,
    mut pongs: mpsc::UnboundedReceiver<(u64, Pong)>,
    changed: Arc<Notify>,
    reports: mpsc::UnboundedSender<Vec<Suspicion>>,
    also: watch::Receiver<Vec<u64>>,
) {
    let mut watched: HashMap<u64, Watched> = HashMap::new();
    let mut tick = tokio::time::interval(config.ping_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let origin = now();
    // A heartbeat after a silence this long restarts the detector's history.
    let gap = config.ping_interval * 10;
    // Poked when a peer's connection comes up or breaks (or a redial fails), so that a killed
    // peer is judged at once rather than at the next tick.
    let links_changed = Arc::new(Notify::new());
    loop {
        let ping = tokio::select! {
            // A fixed order (not tokio's random one), so the simulation replays a seed.
            biased;
            _ = tick.tick() => true,
            _ = links_changed.notified() => false,
            pong = pongs.recv() => {
                let Some((from, pong)) = pong else { return };
                if let Some(w) = watched.get_mut(&from) {
                    let now = now();
                    if now.saturating_duration_since(w.detector.last()) > gap {
                        w.detector.reset(now, config.ping_interval);
                    } else {
                        w.detector.heartbeat(now);
                    }
                    let rtt = rtt_since(origin, pong.sent_unix_nanos);
                    w.rtt_gauge.set(rtt);
                    w.rtt_histogram.record(rtt);
                    if pong.handled != w.handled || pong.backlog == 0 {
                        w.progressed = now;
                    }
                    w.handled = pong.handled;
                    w.backlog = pong.backlog;
                }
                continue;
            }
        };
        let now = now();
        let members = state.borrow().clone();
        let statuses: HashMap<u64, bool> = members.member_statuses().collect();
        let mut targets = Ring::new(statuses.iter().map(|(&id, &up)| (id, up))).watched_by(me, config.monitors);
        for &id in also.borrow().iter() {
            if id != me && statuses.contains_key(&id) && !targets.contains(&id) {
                targets.push(id);
            }
        }
        // A peer this node no longer watches is judged by its own watchers: forget what this
        // node thought of it, so that a stale `suspect` does not keep routers away from it.
        watched.retain(|id, _| {
            let keep = targets.contains(id);
            if !keep {
                health.forget(*id);
            }
            keep
        });
        seq += 1;
        let mut news = Vec::new();
        for id in targets {
            let w = watched.entry(id).or_insert_with(|| {
                if let Some(mut link) = net.link(id) {
                    let poke = links_changed.clone();
                    // Ends when the peer is removed from the transport (its link sender drops).
                    tokio::spawn(async move {
                        while link.changed().await.is_ok() {
                            poke.notify_one();
                        }
                    });
                }
                Watched {
                    detector: PhiDetector::new(now, config.ping_interval, config.min_std_deviation),
                    handled: 0,
                    backlog: 0,
                    progressed: now,
                    ever_connected: false,
                    // A peer never judged is up (as `Health` has it): nothing to report yet.
                    reported: (PeerState::Up, false),
                    phi_gauge: metrics::gauge!(crate::metrics::PEER_PHI, "peer" => id.to_string()),
                    rtt_gauge: metrics::gauge!(crate::metrics::PEER_RTT, "peer" => id.to_string()),
                    rtt_histogram: metrics::histogram!(crate::metrics::PEER_PING_RTT, "peer" => id.to_string()),
                }
            });
            if ping {
                let _ = net.send(id, Envelope::ping(seq, ping_nanos(origin)));
            }
            let link = net.link(id).map(|l| l.borrow().clone()).unwrap_or_default();
            let connected = link.connected;
            w.ever_connected |= connected;
            let unreachable = w.ever_connected && !connected && link.failed_dials > 0;
            if health.set_unreachable(id, unreachable) {
                changed.notify_one();
            }
            let phi = w.detector.phi(now);
            w.phi_gauge.set(phi);
            let next = if phi > config.phi_threshold || (w.ever_connected && !connected) {
                PeerState::Suspect
            } else if w.backlog > 0 && now.saturating_duration_since(w.progressed) > config.degraded_after {
                PeerState::Degraded
            } else {
                PeerState::Up
            };
            let before = health.peer(id).state();
            if health.set(id, next, phi) {
                match next {
                    PeerState::Up => tracing::info!(peer = id, phi, from = before.as_str(), "peer is up again"),
                    _ => tracing::warn!(
                        peer = id,
                        phi,
                        connected,
                        backlog = w.backlog,
                        state = next.as_str(),
                        "peer is {}",
                        next.as_str()
                    ),
                }
                changed.notify_one();
            }
            // Tell the leader what changed and, at each ping, what is still news to it.
            let view = (next, unreachable);
            let committed_up = statuses.get(&id).copied().unwrap_or(false);
            if view != w.reported || (ping && is_news(next, committed_up)) {
                w.reported = view;
                news.push(Suspicion {
                    node: id,
                    state: next,
                    unreachable,
                    age: health.state_for(id).1,
                });
            }
        }
        if !news.is_empty() && reports.send(news).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bounded monitoring: who watches whom, and how the leader combines what the watchers report.
// Pure: no clock, no socket, no membership state — plain ids, statuses and instants in, answers
// out — so the unit tests below and `tests/monitoring_scale.rs` (100 nodes in virtual time) run
// the very code a node runs.

/// Where `id` sits on the monitoring ring: a fixed mix of the id (splitmix64's finaliser), so that
/// nodes that joined together (consecutive ids, often on one host or rack) do not watch only one
/// another, and every node computes the same ring from the same member list.
fn ring_position(id: u64) -> u64 {
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The monitoring ring of one membership table: the members ordered by a fixed hash of their id (splitmix64; then
/// id), each with whether the table says it is up.
///
/// Each **up** member watches the members that follow it on the ring up to and including the
/// `k`-th up one; the down members it passes on the way are watched too (someone must see them come
/// back). So when more than `k` members are up, every member is watched by exactly `k` up members
/// (its [`Ring::watchers_of`]) and an up node pings `k` peers plus the down ones between them;
/// with `k` or fewer other members, everyone watches everyone, as a small cluster always did.
/// A member the table has down watches nobody (its reports would not count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    /// `(id, up)` in ring order.
    order: Vec<(u64, bool)>,
}

impl Ring {
    /// The ring of `members` (`(id, up in the committed table)`, any order, no duplicates).
    pub fn new(members: impl IntoIterator<Item = (u64, bool)>) -> Ring {
        let mut order: Vec<(u64, bool)> = members.into_iter().collect();
        order.sort_by_key(|&(id, _)| (ring_position(id), id));
        order.dedup_by_key(|(id, _)| *id);
        Ring { order }
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.order.iter().position(|&(m, _)| m == id)
    }

    /// The peers `me` pings (empty when `me` is not an up member).
    pub fn watched_by(&self, me: u64, k: usize) -> Vec<u64> {
        let n = self.order.len();
        let Some(p) = self.position(me).filter(|&p| self.order[p].1) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut up = 0;
        for i in 1..n {
            if up >= k {
                break;
            }
            let (id, is_up) = self.order[(p + i) % n];
            out.push(id);
            up += usize::from(is_up);
        }
        out
    }

    /// The up members that watch `target`: the `k` up members before it on the ring (fewer when
    /// fewer are up). Only their reports count towards a verdict on `target`.
    pub fn watchers_of(&self, target: u64, k: usize) -> Vec<u64> {
        let n = self.order.len();
        let Some(q) = self.position(target) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(k);
        for i in 1..n {
            if out.len() >= k {
                break;
            }
            let (id, is_up) = self.order[(q + n - i) % n];
            if is_up {
                out.push(id);
            }
        }
        out
    }
}

/// One watcher's view of one watched peer, as it reports it to the leader.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Suspicion {
    /// The watched peer.
    pub node: u64,
    /// Its state as the watcher's detector sees it.
    pub state: PeerState,
    /// Its connection broke and it refuses new ones: its process is gone.
    pub unreachable: bool,
    /// How long the watcher has seen it in `state` (relative, so the clocks need not agree).
    pub age: Duration,
}

/// Whether a watcher's view of a peer is news to the leader, who must then hear it (again, every
/// ping interval, while it stays news: a lost report or a new leader costs one interval): the view
/// disagrees with the committed table (a peer the table has up that is not up here, or one it has
/// down that is up here). A view that agrees with the table is sent once when it changes and never
/// repeated, so an idle cluster sends no reports at all.
pub fn is_news(state: PeerState, committed_up: bool) -> bool {
    (state == PeerState::Up) != committed_up
}

/// What the leader should commit about a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `MarkDown`: a majority of its watchers saw it suspect or degraded for `down_after`, or gone.
    Down,
    /// `MarkUp`: a majority of its watchers saw it up for `down_after`.
    Up,
}

/// One report, as the leader keeps it.
#[derive(Debug, Clone, Copy)]
struct Report {
    state: PeerState,
    unreachable: bool,
    /// When the watcher started seeing `state` (on the leader's clock).
    since: Instant,
    /// When the leader last heard it.
    heard: Instant,
}

/// The leader's record of its watchers' reports, and the rule that turns them into verdicts.
///
/// **The rule.** A member the table has up is marked down when a strict majority of its current
/// watchers ([`Ring::watchers_of`], up members only) each report it suspect or degraded for at
/// least `down_after`, or report its process gone (then without waiting); a member the table has
/// down is marked up when a strict majority report it up for `down_after`. Reports that are not
/// refreshed within `stale` are forgotten (news is repeated every ping interval, so only a watcher
/// that stopped reporting goes stale). The denominator is every watcher, not only the ones that
/// spoke: one lying or cut-off watcher can never outvote the others — with `k` = 5 it takes 3 —
/// and silence is never agreement. With a single watcher (a two-node cluster) that watcher decides,
/// as there is nobody to contradict it. The cost: a node whose watchers mostly died with it waits
/// until those are marked down and the ring gives it new watchers, whose detectors then need their
/// own `down_after`.
#[derive(Debug, Default)]
pub struct Suspicions {
    /// target → watcher → its latest report.
    reports: HashMap<u64, HashMap<u64, Report>>,
}

impl Suspicions {
    /// Records `watcher`'s report heard at `now`. A report about the watcher itself is ignored;
    /// the caller checks that `watcher` is the authenticated sender and a member.
    pub fn record(&mut self, watcher: u64, s: &Suspicion, now: Instant) {
        if watcher == s.node {
            return;
        }
        let since = now.checked_sub(s.age).unwrap_or(now);
        let entry = self.reports.entry(s.node).or_default();
        let since = match entry.get(&watcher) {
            // The same view repeated: keep the earlier start (a delayed repeat must not reset it).
            Some(r) if r.state == s.state => r.since.min(since),
            _ => since,
        };
        entry.insert(
            watcher,
            Report {
                state: s.state,
                unreachable: s.unreachable,
                since,
                heard: now,
            },
        );
    }

    /// Keeps only the reports by and about the nodes `keep` accepts (the leader drops those of
    /// nodes that left the table, so the record stays as small as the table).
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.reports.retain(|target, by| {
            by.retain(|watcher, _| keep(*watcher));
            keep(*target) && !by.is_empty()
        });
    }

    /// Whether any report was heard within `stale` of `now`: only then can time passing change a
    /// [`verdict`](Self::verdict) (one from stale reports is always `None`).
    pub fn any_fresh(&self, now: Instant, stale: Duration) -> bool {
        self.reports
            .values()
            .flat_map(|by| by.values())
            .any(|r| now.saturating_duration_since(r.heard) <= stale)
    }

    /// The verdict on `target` (up in the table or not) given its current `watchers`, at `now`.
    pub fn verdict(
        &self,
        target: u64,
        committed_up: bool,
        watchers: &[u64],
        now: Instant,
        down_after: Duration,
        stale: Duration,
    ) -> Option<Verdict> {
        if watchers.is_empty() {
            return None;
        }
        let reports = self.reports.get(&target)?;
        let votes = watchers
            .iter()
            .filter(|w| **w != target)
            .filter_map(|w| reports.get(w))
            .filter(|r| now.saturating_duration_since(r.heard) <= stale)
            .filter(|r| {
                let held = now.saturating_duration_since(r.since) >= down_after;
                if committed_up {
                    r.state != PeerState::Up && (held || (r.state == PeerState::Suspect && r.unreachable))
                } else {
                    r.state == PeerState::Up && held
                }
            })
            .count();
        (votes > watchers.len() / 2).then_some(if committed_up { Verdict::Down } else { Verdict::Up })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_in_a_pong_is_the_sum_of_the_running_instances_loads() {
        let progress = Progress::new(1);
        let (a, b) = (Arc::new(AtomicUsize::new(3)), Arc::new(AtomicUsize::new(4)));
        progress.track(&a);
        progress.track(&b);
        let backlog = |p: &Progress| match pong(1, 0, p).body {
            Some(crate::transport::Body::Pong(pong)) => pong.backlog,
            other => panic!("a pong, not {other:?}"),
        };
        assert_eq!(backlog(&progress), 7);
        a.fetch_sub(3, Ordering::Relaxed);
        assert_eq!(backlog(&progress), 4, "loads are read when the pong is made");
        drop(b);
        assert_eq!(progress.backlog(), 0, "a stopped instance no longer counts");
        assert_eq!(progress.instances.lock().unwrap().len(), 1, "and is forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_trip_is_measured_on_the_monotonic_clock_of_the_runtime() {
        let origin = now();
        let sent = ping_nanos(origin);
        tokio::time::advance(Duration::from_millis(1500)).await;
        // Virtual time moved 1.5 s and the wall clock almost nothing: the RTT follows the former.
        let rtt = rtt_since(origin, sent);
        assert!((1.5..1.6).contains(&rtt), "rtt {rtt}");
        assert_eq!(
            rtt_since(origin, ping_nanos(origin) + 1_000_000_000),
            0.0,
            "an echo from the future is no RTT"
        );
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn phi_grows_with_silence_and_is_low_on_time() {
        let t0 = Instant::now();
        let mut d = PhiDetector::new(t0, 200 * MS, 50 * MS);
        let mut t = t0;
        for _ in 0..50 {
            t += 200 * MS;
            d.heartbeat(t);
        }
        assert!(d.phi(t + 100 * MS) < 1.0, "on time: {}", d.phi(t + 100 * MS));
        assert!(d.phi(t + 250 * MS) < 3.0);
        let p500 = d.phi(t + 500 * MS);
        let p1000 = d.phi(t + 1000 * MS);
        assert!(p500 > 8.0, "0.5 s of silence after steady 200 ms beats: phi {p500}");
        assert!(p1000 > p500);
        assert!(d.phi(t + 3600 * 1000 * MS) <= MAX_PHI);
    }

    #[test]
    fn jittery_heartbeats_raise_the_tolerance() {
        let t0 = Instant::now();
        let mut steady = PhiDetector::new(t0, 200 * MS, 10 * MS);
        let mut jittery = PhiDetector::new(t0, 200 * MS, 10 * MS);
        let (mut a, mut b) = (t0, t0);
        for i in 0..100 {
            a += 200 * MS;
            steady.heartbeat(a);
            b += if i % 2 == 0 { 100 * MS } else { 400 * MS };
            jittery.heartbeat(b);
        }
        assert!(jittery.phi(b + 600 * MS) < steady.phi(a + 600 * MS));
        assert!(jittery.phi(b + 600 * MS) < 8.0);
    }

    #[test]
    fn a_peer_never_heard_from_becomes_suspect() {
        let t0 = Instant::now();
        let d = PhiDetector::new(t0, 200 * MS, 50 * MS);
        assert!(d.phi(t0) < 1.0);
        assert!(d.phi(t0 + 1000 * MS) > 8.0);
    }

    #[test]
    fn reset_forgets_a_long_gap() {
        let t0 = Instant::now();
        let mut d = PhiDetector::new(t0, 200 * MS, 50 * MS);
        let later = t0 + 30_000 * MS;
        d.reset(later, 200 * MS);
        let (mean, _) = d.stats();
        assert!((mean - 200.0).abs() < 1.0);
        assert!(d.phi(later + 100 * MS) < 1.0);
    }

    #[test]
    fn health_tracks_state_changes() {
        let h = Health::default();
        let rx = h.subscribe();
        assert!(h.peer(2).routable());
        assert!(h.set(2, PeerState::Suspect, 9.0));
        assert!(!h.set(2, PeerState::Suspect, 10.0));
        assert!(rx.has_changed().unwrap());
        assert_eq!(h.state_for(2).0, PeerState::Suspect);
        assert!(!h.peer(2).routable());
        assert_eq!(h.peer(2).phi(), 10.0);
        h.forget(2);
        assert!(h.peer(2).routable());
    }

    fn ring(ids: impl IntoIterator<Item = u64>) -> Ring {
        Ring::new(ids.into_iter().map(|id| (id, true)))
    }

    #[test]
    fn small_clusters_watch_everyone() {
        for n in 1..=6u64 {
            let r = ring(1..=n);
            for me in 1..=n {
                let mut w = r.watched_by(me, DEFAULT_MONITORS);
                w.sort_unstable();
                let others: Vec<u64> = (1..=n).filter(|&i| i != me).collect();
                assert_eq!(w, others, "n={n}: node {me} watches every other member");
                assert_eq!(r.watchers_of(me, DEFAULT_MONITORS).len(), others.len());
            }
        }
    }

    #[test]
    fn every_node_is_watched_by_exactly_k_and_watches_k() {
        for (n, k) in [(7u64, 5usize), (100, 5), (100, 3), (40, 1)] {
            let r = ring(1..=n);
            let mut watched_by_count: HashMap<u64, usize> = HashMap::new();
            for me in 1..=n {
                let w = r.watched_by(me, k);
                assert_eq!(w.len(), k, "n={n}: node {me} watches k peers");
                assert!(!w.contains(&me));
                for t in w {
                    *watched_by_count.entry(t).or_default() += 1;
                    assert!(r.watchers_of(t, k).contains(&me), "watchers_of agrees with watched_by");
                }
            }
            for t in 1..=n {
                assert_eq!(watched_by_count[&t], k, "n={n}: node {t} is watched k times");
                assert_eq!(r.watchers_of(t, k).len(), k);
            }
        }
    }

    #[test]
    fn the_ring_is_the_same_whatever_order_members_come_in() {
        let mut ids: Vec<u64> = (1..=50).collect();
        let a = ring(ids.clone());
        ids.reverse();
        assert_eq!(a, ring(ids));
        // Consecutive ids do not all watch each other.
        let w = a.watched_by(10, 5);
        assert!(w.iter().any(|&t| t.abs_diff(10) > 5), "{w:?}");
    }

    #[test]
    fn down_members_are_watched_and_watch_nobody() {
        let n = 30u64;
        let r = Ring::new((1..=n).map(|id| (id, id % 4 != 0)));
        let mut watched: HashMap<u64, Vec<u64>> = HashMap::new();
        for me in 1..=n {
            let w = r.watched_by(me, 5);
            if me % 4 == 0 {
                assert!(w.is_empty(), "a down member watches nobody");
            }
            assert_eq!(
                w.iter().filter(|t| **t % 4 != 0).count(),
                if me % 4 == 0 { 0 } else { 5 }
            );
            for t in w {
                watched.entry(t).or_default().push(me);
            }
        }
        for t in 1..=n {
            let mut by = watched.remove(&t).unwrap_or_default();
            by.sort_unstable();
            let mut of = r.watchers_of(t, 5);
            of.sort_unstable();
            assert_eq!(by, of, "node {t}: its watchers are the up members that ping it");
            assert_eq!(of.len(), 5);
            assert!(of.iter().all(|w| w % 4 != 0));
        }
        assert!(
            r.watched_by(99, 5).is_empty() && r.watchers_of(99, 5).is_empty(),
            "not a member"
        );
    }

    fn suspicion(node: u64, state: PeerState, age_ms: u64) -> Suspicion {
        Suspicion {
            node,
            state,
            unreachable: false,
            age: Duration::from_millis(age_ms),
        }
    }

    const DOWN_AFTER: Duration = Duration::from_millis(1000);
    const STALE: Duration = Duration::from_millis(1000);

    #[test]
    fn a_majority_of_watchers_held_for_down_after_marks_down() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let watchers = [1, 2, 3, 4, 5];
        let mut s = Suspicions::default();
        let verdict = |s: &Suspicions, now| s.verdict(9, true, &watchers, now, DOWN_AFTER, STALE);
        s.record(1, &suspicion(9, PeerState::Suspect, 0), t0);
        s.record(2, &suspicion(9, PeerState::Suspect, 0), t0);
        assert_eq!(verdict(&s, t0 + DOWN_AFTER), None, "2 of 5 is no majority");
        s.record(3, &suspicion(9, PeerState::Degraded, 500), t0 + 600 * MS);
        assert_eq!(verdict(&s, t0 + 900 * MS), None, "not held for down_after yet");
        // Repeats keep the reports fresh.
        for w in [1, 2, 3] {
            s.record(w, &suspicion(9, PeerState::Suspect, 0), t0 + 1000 * MS);
        }
        // The third changed from degraded to suspect: its clock restarts.
        assert_eq!(verdict(&s, t0 + 1500 * MS), None);
        s.record(3, &suspicion(9, PeerState::Suspect, 1000), t0 + 1500 * MS);
        assert_eq!(verdict(&s, t0 + 1500 * MS), Some(Verdict::Down));
        assert_eq!(
            s.verdict(9, true, &watchers, t0 + 1500 * MS + STALE + MS, DOWN_AFTER, STALE),
            None,
            "reports not repeated go stale"
        );
    }

    /// The leader sleeps until something changes when no report is fresh: a verdict from stale
    /// reports is always `None`, so only fresh ones can fall due with time.
    #[test]
    fn only_fresh_reports_can_fall_due_and_stale_ones_never_give_a_verdict() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let watchers = [1, 2, 3];
        let mut s = Suspicions::default();
        assert!(!s.any_fresh(t0, STALE), "no report");
        for w in watchers {
            s.record(w, &suspicion(9, PeerState::Suspect, 0), t0);
        }
        assert!(s.any_fresh(t0 + STALE, STALE));
        let after = t0 + STALE + MS;
        assert!(!s.any_fresh(after, STALE));
        for later in [after, after + DOWN_AFTER, after + 100 * DOWN_AFTER] {
            assert_eq!(s.verdict(9, true, &watchers, later, DOWN_AFTER, STALE), None);
        }
    }

    #[test]
    fn one_lying_watcher_cannot_mark_a_node_down() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut s = Suspicions::default();
        let gone = Suspicion {
            unreachable: true,
            ..suspicion(9, PeerState::Suspect, 60_000)
        };
        s.record(1, &gone, t0);
        for watchers in [&[1u64, 2, 3, 4, 5][..], &[1, 2, 3], &[1, 2]] {
            assert_eq!(
                s.verdict(9, true, watchers, t0, DOWN_AFTER, STALE),
                None,
                "{watchers:?}"
            );
        }
        // Alone, it decides (nobody can contradict it).
        assert_eq!(s.verdict(9, true, &[1], t0, DOWN_AFTER, STALE), Some(Verdict::Down));
        // Only watchers count: reports from others, or about the reporter itself, do not.
        s.record(7, &gone, t0);
        s.record(8, &gone, t0);
        s.record(9, &Suspicion { node: 9, ..gone }, t0);
        assert_eq!(s.verdict(9, true, &[1, 2, 3, 4, 5], t0, DOWN_AFTER, STALE), None);
        // Two more watchers see the process gone: down at once, without waiting down_after.
        let fresh = Suspicion {
            age: Duration::ZERO,
            ..gone
        };
        s.record(2, &fresh, t0);
        s.record(3, &fresh, t0);
        assert_eq!(
            s.verdict(9, true, &[1, 2, 3, 4, 5], t0, DOWN_AFTER, STALE),
            Some(Verdict::Down)
        );
    }

    #[test]
    fn a_majority_seeing_a_down_node_up_marks_it_up() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut s = Suspicions::default();
        let watchers = [1, 2, 3];
        s.record(1, &suspicion(9, PeerState::Up, 1200), t0);
        assert_eq!(s.verdict(9, false, &watchers, t0, DOWN_AFTER, STALE), None);
        s.record(2, &suspicion(9, PeerState::Up, 200), t0);
        assert_eq!(s.verdict(9, false, &watchers, t0, DOWN_AFTER, STALE), None);
        assert_eq!(
            s.verdict(9, false, &watchers, t0 + 800 * MS, DOWN_AFTER, STALE),
            Some(Verdict::Up)
        );
        // Up reports say nothing against a node the table has up.
        assert_eq!(s.verdict(9, true, &watchers, t0 + 800 * MS, DOWN_AFTER, STALE), None);
        s.retain(|id| id != 2);
        assert_eq!(s.verdict(9, false, &watchers, t0 + 800 * MS, DOWN_AFTER, STALE), None);
        assert_eq!(
            s.verdict(9, false, &[1], t0 + 800 * MS, DOWN_AFTER, STALE),
            Some(Verdict::Up)
        );
        s.retain(|id| id != 1);
        assert_eq!(s.verdict(9, false, &[1], t0 + 800 * MS, DOWN_AFTER, STALE), None);
        assert!(s.reports.is_empty(), "nothing left about node 9");
    }

    #[test]
    fn received_views_are_bounded_and_unknown_states_dropped() {
        let view = |node, state| PeerView {
            node,
            state,
            unreachable: false,
            age_ms: 7,
        };
        let mut views: Vec<PeerView> = (0..MAX_PEER_VIEWS as u64 + 10).map(|n| view(n, 1)).collect();
        views[0].state = 9;
        let read = read_suspicions(&WireSuspicions { views });
        assert_eq!(
            read.len(),
            MAX_PEER_VIEWS - 1,
            "the unknown state and everything past the bound are dropped"
        );
        assert_eq!(read[0].node, 1);
        assert_eq!(read[0].state, PeerState::Suspect);
        assert_eq!(read[0].age, 7 * MS);
    }

    #[test]
    fn news_is_disagreement_with_the_table() {
        assert!(!is_news(PeerState::Up, true));
        assert!(is_news(PeerState::Suspect, true));
        assert!(is_news(PeerState::Degraded, true));
        assert!(is_news(PeerState::Up, false));
        assert!(!is_news(PeerState::Suspect, false));
    }
}
