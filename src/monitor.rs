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
//!   `cluster.ping_interval_ms` it pings each member and re-evaluates each peer.
//!
//! A peer is **suspect** when its phi exceeds `cluster.phi_threshold`, or when the connection to it
//! broke and cannot be re-established (a killed process on a live host refuses connections at
//! once, which is a stronger signal than silence). It is **degraded** when it answers pings but
//! reports a backlog while one of its handler worker threads has been wedged for
//! `cluster.degraded_after_ms` (see [`Progress`]): the frozen-but-connected node that heartbeats
//! alone never catch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use crate::transport::wire::Pong;
use crate::transport::{Envelope, Transport};
// Shared with the configuration, which refuses a `cluster.phi_threshold` above it; its public path.
pub use crate::types::MAX_PHI;

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
        match v {
            1 => PeerState::Suspect,
            2 => PeerState::Degraded,
            _ => PeerState::Up,
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
            origin: Instant::now(),
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
            .or_insert_with(|| Arc::new(PeerHealth::new(self.origin.elapsed().as_millis() as u64)))
            .clone()
    }

    /// Peer `id`'s state and how long it has been in it.
    pub fn state_for(&self, id: u64) -> (PeerState, Duration) {
        let p = self.peer(id);
        let since = Duration::from_millis(p.since_ms.load(Ordering::Acquire));
        (p.state(), self.origin.elapsed().saturating_sub(since))
    }

    /// Notified on every state change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn set(&self, id: u64, state: PeerState, phi: f64) -> bool {
        let p = self.peer(id);
        p.phi.store(phi.to_bits(), Ordering::Relaxed);
        if p.state() == state {
            return false;
        }
        p.since_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Release);
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
    /// Events queued or in progress at this node's handlers.
    pub backlog: AtomicU64,
    workers: Vec<Arc<AtomicU64>>,
}

/// How often each worker thread ticks its progress counter.
pub const WORKER_TICK: Duration = Duration::from_millis(100);

impl Progress {
    /// Progress for `workers` worker threads; each must run [`Progress::tick_worker`].
    pub fn new(workers: usize) -> Self {
        Progress {
            backlog: AtomicU64::new(0),
            workers: (0..workers).map(|_| Arc::default()).collect(),
        }
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
}

/// Answers a ping with this node's progress.
pub fn pong(seq: u64, sent_unix_nanos: i64, progress: &Progress) -> Envelope {
    Envelope::new(crate::transport::Body::Pong(Pong {
        seq,
        sent_unix_nanos,
        handled: progress.handled(),
        backlog: progress.backlog.load(Ordering::Relaxed),
    }))
}

fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// What the monitor knows of one peer.
struct Watched {
    detector: PhiDetector,
    handled: u64,
    backlog: u64,
    progressed: Instant,
    ever_connected: bool,
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
    /// Whether `id` is a member.
    fn is_member(&self, id: u64) -> bool;
    /// Every member's id, in ascending order.
    fn member_ids(&self) -> impl Iterator<Item = u64> + '_;
}

/// The monitor task: pings every member, feeds pongs to the detectors, and publishes each peer's
/// state in `health`. Wakes `changed` (the leader's duties) when a state changes.
pub(crate) async fn run<M: Members>(
    me: u64,
    config: MonitorConfig,
    health: Arc<Health>,
    transport: Transport,
    state: watch::Receiver<Arc<M>>,
    mut pongs: mpsc::UnboundedReceiver<(u64, Pong)>,
    changed: Arc<Notify>,
) {
    let mut watched: HashMap<u64, Watched> = HashMap::new();
    let mut tick = tokio::time::interval(config.ping_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    // A heartbeat after a silence this long restarts the detector's history.
    let gap = config.ping_interval * 10;
    // Poked when a peer's connection comes up or breaks (or a redial fails), so that a killed
    // peer is judged at once rather than at the next tick.
    let links_changed = Arc::new(Notify::new());
    loop {
        let ping = tokio::select! {
            _ = tick.tick() => true,
            _ = links_changed.notified() => false,
            pong = pongs.recv() => {
                let Some((from, pong)) = pong else { return };
                if let Some(w) = watched.get_mut(&from) {
                    let now = Instant::now();
                    if now.saturating_duration_since(w.detector.last()) > gap {
                        w.detector.reset(now, config.ping_interval);
                    } else {
                        w.detector.heartbeat(now);
                    }
                    let rtt = (unix_nanos() - pong.sent_unix_nanos).max(0) as f64 / 1e9;
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
        let now = Instant::now();
        let members = state.borrow().clone();
        watched.retain(|id, _| {
            let keep = members.is_member(*id);
            if !keep {
                health.forget(*id);
            }
            keep
        });
        seq += 1;
        for id in members.member_ids().filter(|id| *id != me) {
            let w = watched.entry(id).or_insert_with(|| {
                if let Some(mut link) = transport.link(id) {
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
                    phi_gauge: metrics::gauge!(crate::metrics::PEER_PHI, "peer" => id.to_string()),
                    rtt_gauge: metrics::gauge!(crate::metrics::PEER_RTT, "peer" => id.to_string()),
                    rtt_histogram: metrics::histogram!(crate::metrics::PEER_PING_RTT, "peer" => id.to_string()),
                }
            });
            if ping {
                let _ = transport.send(id, Envelope::ping(seq, unix_nanos()));
            }
            let link = transport.link(id).map(|l| l.borrow().clone()).unwrap_or_default();
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
