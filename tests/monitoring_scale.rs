//! Node monitoring at 100 nodes, in virtual time (issue 16, point 4): a seeded discrete-event
//! simulation — no sockets, no sleeps — in which every node runs the monitor's pure core
//! (`monitor::Ring` to choose whom it pings, the real `monitor::PhiDetector` on the pongs it gets,
//! `monitor::is_news` to decide what it tells the leader) and the leader combines the reports
//! with `monitor::Suspicions::verdict`, as `src/monitor.rs` documents.
//!
//! The network delays every message by 0.2–2 ms (uniform, seeded) and drops one in a thousand.
//! The committed membership table is modelled as visible to every node at the leader's decision
//! (a Raft commit takes a few ms more on the real cluster). Failover time is measured from a kill
//! to the leader's `MarkDown` decision.
//!
//! Measured and printed (`--nocapture`), asserted with generous bounds:
//! * control messages (pings, pongs, reports) sent per node per second at idle, with the bounded
//!   set (`cluster.monitors` = 5) and with everyone watching everyone (as before);
//! * failover p50/p99 over 20 kills of random non-leader nodes, for a killed process (its
//!   connections break and it refuses new ones, as after a SIGKILL on a live host) with the default
//!   settings, for a silent node (a lost host or a SIGSTOP: no connection breaks, only silence)
//!   with the defaults, and for a silent node with faster settings; each killed node is restarted
//!   and must be marked up again;
//! * no healthy node is ever marked down, not at idle with drops, and not when one of its
//!   watchers is cut off from it while another lies that it is gone.
//!
//! ```text
//! HERALD_SIM_SEED=<n> cargo test --test monitoring_scale -- --nocapture
//! ```

#[allow(dead_code)]
#[path = "common/rng.rs"]
mod rng;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use herald::monitor::{is_news, PeerState, PhiDetector, Ring, Suspicion, Suspicions, Verdict, DEFAULT_MONITORS};
use rng::Rng;

const NODES: u64 = 100;
const LEADER: u64 = 1;
const KILLS: usize = 20;
const DROP: f64 = 0.001;
/// The leader re-evaluates at least this often (as `leader_duties` does).
const LEADER_TICK_US: u64 = 100_000;

/// The `cluster.*` settings a run uses.
#[derive(Debug, Clone, Copy)]
struct Settings {
    ping_interval: Duration,
    phi_threshold: f64,
    min_std: Duration,
    down_after: Duration,
    monitors: usize,
}

/// The defaults of `ClusterConfig` (README, configuration table).
const DEFAULTS: Settings = Settings {
    ping_interval: Duration::from_millis(200),
    phi_threshold: 8.0,
    min_std: Duration::from_millis(50),
    down_after: Duration::from_millis(1000),
    monitors: DEFAULT_MONITORS,
};

impl Settings {
    fn interval_us(&self) -> u64 {
        self.ping_interval.as_micros() as u64
    }

    /// How long a report lives at the leader unless repeated (news is repeated every interval).
    fn stale(&self) -> Duration {
        self.ping_interval * 5
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// The process is gone, the host is not: connections break and redials are refused.
    Crash,
    /// The host is gone or the process frozen: nothing breaks, nothing answers.
    Silent,
}

#[derive(Debug, Clone)]
enum Msg {
    Ping,
    Pong,
    Report(Vec<Suspicion>),
}

#[derive(Debug, Clone)]
enum Ev {
    Tick {
        node: u64,
        life: u32,
    },
    Deliver {
        from: u64,
        to: u64,
        msg: Msg,
    },
    /// `watcher`'s connection to `peer` broke and the redial was refused.
    LinkBroken {
        watcher: u64,
        peer: u64,
    },
    LeaderTick,
}

/// What one node knows of one peer it watches (the monitor's `Watched` plus its `Health` entry).
struct Watched {
    detector: PhiDetector,
    state: PeerState,
    since_us: u64,
    unreachable: bool,
    /// The last (state, unreachable) reported to the leader.
    reported: (PeerState, bool),
}

struct Node {
    alive: bool,
    /// Bumped at each restart, so the ticks of a previous life stop.
    life: u32,
    watched: BTreeMap<u64, Watched>,
}

struct Sim {
    seed: u64,
    s: Settings,
    rng: Rng,
    now_us: u64,
    base: Instant,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Ev>>,
    seq: u64,
    nodes: BTreeMap<u64, Node>,
    /// The committed table: member → up.
    table: BTreeMap<u64, bool>,
    ring: Ring,
    suspicions: Suspicions,
    /// Messages sent by each node (since the last reset).
    sent: BTreeMap<u64, u64>,
    /// Cut links (both directions).
    cut: BTreeSet<(u64, u64)>,
    /// (time, node, verdict) of every decision.
    decisions: Vec<(u64, u64, Verdict)>,
    /// Suspect reports the leader heard, per (watcher, target).
    heard_suspect: BTreeSet<(u64, u64)>,
    /// A watcher that lies: every interval it reports (target) gone.
    liar: Option<(u64, u64)>,
}

impl Sim {
    fn new(seed: u64, s: Settings) -> Sim {
        let mut rng = Rng::new(seed);
        let table: BTreeMap<u64, bool> = (1..=NODES).map(|id| (id, true)).collect();
        let mut sim = Sim {
            seed,
            s,
            now_us: 0,
            // Far enough from the process start that subtracting a report's age never underflows.
            base: Instant::now() + Duration::from_secs(3600),
            queue: BinaryHeap::new(),
            events: Vec::new(),
            seq: 0,
            nodes: BTreeMap::new(),
            ring: Ring::new(table.iter().map(|(&id, &up)| (id, up))),
            table,
            suspicions: Suspicions::default(),
            sent: BTreeMap::new(),
            cut: BTreeSet::new(),
            decisions: Vec::new(),
            heard_suspect: BTreeSet::new(),
            liar: None,
            rng: Rng::new(0),
        };
        for id in 1..=NODES {
            sim.nodes.insert(
                id,
                Node {
                    alive: true,
                    life: 0,
                    watched: BTreeMap::new(),
                },
            );
            // Nodes start at different moments within one interval.
            let at = rng.below(s.interval_us());
            sim.schedule(at, Ev::Tick { node: id, life: 0 });
        }
        sim.schedule(LEADER_TICK_US, Ev::LeaderTick);
        sim.rng = rng;
        sim
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now_us)
    }

    fn schedule(&mut self, at_us: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Some(ev));
        self.queue.push(Reverse((at_us, self.seq, self.events.len() - 1)));
    }

    fn send(&mut self, from: u64, to: u64, msg: Msg) {
        *self.sent.entry(from).or_default() += 1;
        if self.rng.chance(DROP) {
            return;
        }
        let delay = self.rng.range(200, 2000);
        self.schedule(self.now_us + delay, Ev::Deliver { from, to, msg });
    }

    /// Runs events until virtual time `until_us`, or until `stop` holds after an event.
    fn run_until(&mut self, until_us: u64, mut stop: impl FnMut(&Sim) -> bool) -> bool {
        while let Some(&Reverse((at, _, i))) = self.queue.peek() {
            if at > until_us {
                break;
            }
            self.queue.pop();
            self.now_us = at;
            let ev = self.events[i].take().expect("each event runs once");
            self.handle(ev);
            if stop(self) {
                return true;
            }
        }
        self.now_us = self.now_us.max(until_us);
        false
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Tick { node, life } => self.tick(node, life),
            Ev::Deliver { from, to, msg } => {
                if !self.nodes[&to].alive || self.cut.contains(&(from, to)) {
                    return;
                }
                match msg {
                    Msg::Ping => self.send(to, from, Msg::Pong),
                    Msg::Pong => {
                        let now = self.instant();
                        let gap = self.s.ping_interval * 10;
                        let interval = self.s.ping_interval;
                        if let Some(w) = self.nodes.get_mut(&to).and_then(|n| n.watched.get_mut(&from)) {
                            // A pong means the connection is up again.
                            w.unreachable = false;
                            if now.saturating_duration_since(w.detector.last()) > gap {
                                w.detector.reset(now, interval);
                            } else {
                                w.detector.heartbeat(now);
                            }
                        }
                    }
                    Msg::Report(entries) => {
                        if to == LEADER {
                            self.hear(from, &entries);
                        }
                    }
                }
            }
            Ev::LinkBroken { watcher, peer } => {
                if !self.nodes[&watcher].alive {
                    return;
                }
                if let Some(w) = self.nodes.get_mut(&watcher).and_then(|n| n.watched.get_mut(&peer)) {
                    w.unreachable = true;
                    // The monitor is poked by the link change and judges the peer at once.
                    self.evaluate(watcher, false);
                }
            }
            Ev::LeaderTick => {
                self.decide(None);
                if let Some((liar, target)) = self.liar {
                    let lie = Suspicion {
                        node: target,
                        state: PeerState::Suspect,
                        unreachable: true,
                        age: Duration::from_secs(60),
                    };
                    self.send(liar, LEADER, Msg::Report(vec![lie]));
                }
                self.schedule(self.now_us + LEADER_TICK_US, Ev::LeaderTick);
            }
        }
    }

    /// The leader records a member's report (the real leader checks that the authenticated sender
    /// is a member first) and re-evaluates the nodes it is about.
    fn hear(&mut self, from: u64, entries: &[Suspicion]) {
        let now = self.instant();
        for e in entries {
            if e.state != PeerState::Up {
                self.heard_suspect.insert((from, e.node));
            }
            self.suspicions.record(from, e, now);
        }
        for e in entries {
            self.decide(Some(e.node));
        }
    }

    /// The leader's status duty for `only` (or every member).
    fn decide(&mut self, only: Option<u64>) {
        let now = self.instant();
        let targets: Vec<u64> = match only {
            Some(t) => vec![t],
            None => self.table.keys().copied().collect(),
        };
        for t in targets {
            if t == LEADER {
                continue;
            }
            let up = self.table[&t];
            let watchers = self.ring.watchers_of(t, self.s.monitors);
            if let Some(v) = self
                .suspicions
                .verdict(t, up, &watchers, now, self.s.down_after, self.s.stale())
            {
                self.table.insert(t, v == Verdict::Up);
                self.ring = Ring::new(self.table.iter().map(|(&id, &up)| (id, up)));
                self.decisions.push((self.now_us, t, v));
            }
        }
    }

    /// One monitor tick of `node`: follow the ring, ping, judge, report.
    fn tick(&mut self, node: u64, life: u32) {
        let n = &self.nodes[&node];
        if !n.alive || n.life != life {
            return;
        }
        let now = self.instant();
        let targets = self.ring.watched_by(node, self.s.monitors);
        let (interval, min_std) = (self.s.ping_interval, self.s.min_std);
        let n = self.nodes.get_mut(&node).expect("node");
        n.watched.retain(|t, _| targets.contains(t));
        for &t in &targets {
            n.watched.entry(t).or_insert_with(|| Watched {
                detector: PhiDetector::new(now, interval, min_std),
                state: PeerState::Up,
                since_us: 0,
                unreachable: false,
                // A peer never judged is up, as `Health` has it: nothing to report yet.
                reported: (PeerState::Up, false),
            });
        }
        for t in targets {
            self.send(node, t, Msg::Ping);
        }
        self.evaluate(node, true);
        self.schedule(self.now_us + self.s.interval_us(), Ev::Tick { node, life });
    }

    /// `node` judges every peer it watches and tells the leader what changed, and (`repeat`, at
    /// its ticks) what is still news.
    fn evaluate(&mut self, node: u64, repeat: bool) {
        let now = self.instant();
        let now_us = self.now_us;
        let threshold = self.s.phi_threshold;
        let table = &self.table;
        let n = self.nodes.get_mut(&node).expect("node");
        let mut report = Vec::new();
        for (&t, w) in n.watched.iter_mut() {
            let phi = w.detector.phi(now);
            let next = if phi > threshold || w.unreachable {
                PeerState::Suspect
            } else {
                PeerState::Up
            };
            if next != w.state {
                w.state = next;
                w.since_us = now_us;
            }
            let view = (w.state, w.unreachable);
            let changed = w.reported != view;
            let news = is_news(w.state, table.get(&t).copied().unwrap_or(false));
            if changed || (repeat && news) {
                w.reported = view;
                report.push(Suspicion {
                    node: t,
                    state: w.state,
                    unreachable: w.unreachable,
                    age: Duration::from_micros(now_us - w.since_us),
                });
            }
        }
        if report.is_empty() {
            return;
        }
        if node == LEADER {
            self.hear(node, &report);
        } else {
            self.send(node, LEADER, Msg::Report(report));
        }
    }

    fn kill(&mut self, id: u64, how: Kill) {
        let n = self.nodes.get_mut(&id).expect("node");
        n.alive = false;
        n.watched.clear();
        if how == Kill::Crash {
            let watchers: Vec<u64> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.alive && n.watched.contains_key(&id))
                .map(|(&w, _)| w)
                .collect();
            for w in watchers {
                let delay = self.rng.range(200, 2000);
                self.schedule(self.now_us + delay, Ev::LinkBroken { watcher: w, peer: id });
            }
        }
    }

    fn restart(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).expect("node");
        n.alive = true;
        n.life += 1;
        let life = n.life;
        let at = self.now_us + self.rng.below(self.s.interval_us());
        self.schedule(at, Ev::Tick { node: id, life });
    }

    fn marked(&self, after_us: u64, id: u64, v: Verdict) -> Option<u64> {
        self.decisions
            .iter()
            .find(|(at, n, d)| *at >= after_us && *n == id && *d == v)
            .map(|(at, _, _)| *at)
    }

    /// Messages per node per second over the next `window` of virtual time: (mean, max).
    fn traffic(&mut self, window: Duration) -> (f64, f64) {
        self.sent.clear();
        let until = self.now_us + window.as_micros() as u64;
        self.run_until(until, |_| false);
        let secs = window.as_secs_f64();
        let total: u64 = self.sent.values().sum();
        let max = self.sent.values().copied().max().unwrap_or(0);
        (total as f64 / NODES as f64 / secs, max as f64 / secs)
    }
}

fn seed() -> u64 {
    std::env::var("HERALD_SIM_SEED")
        .ok()
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("HERALD_SIM_SEED={s:?} is not a number"))
        })
        .unwrap_or(16)
}

/// Nearest-rank percentile of `ms` (sorted here).
fn percentile(ms: &mut [f64], p: f64) -> f64 {
    ms.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * ms.len() as f64).ceil().max(1.0) as usize;
    ms[rank - 1]
}

/// Kills `KILLS` random non-leader nodes one after the other; returns the failover times (ms) and
/// the times until each restarted node was marked up again (ms).
fn failovers(sim: &mut Sim, how: Kill) -> (Vec<f64>, Vec<f64>) {
    let (mut down, mut up) = (Vec::new(), Vec::new());
    let seed = sim.seed;
    for i in 0..KILLS {
        let victim = 2 + sim.rng.below(NODES - 1);
        let killed_at = sim.now_us;
        let decisions = sim.decisions.len();
        sim.kill(victim, how);
        let deadline = killed_at + 10_000_000;
        let found = sim.run_until(deadline, |s| s.marked(killed_at, victim, Verdict::Down).is_some());
        assert!(
            found,
            "seed {seed}: kill {i} ({how:?}) of node {victim}: not marked down within 10 s"
        );
        let at = sim.marked(killed_at, victim, Verdict::Down).expect("marked down");
        down.push((at - killed_at) as f64 / 1000.0);
        // Only the victim was judged: no healthy node marked down meanwhile.
        let wrong: Vec<_> = sim.decisions[decisions..]
            .iter()
            .filter(|(_, n, _)| *n != victim)
            .collect();
        assert!(
            wrong.is_empty(),
            "seed {seed}: healthy nodes judged during kill {i}: {wrong:?}"
        );
        // Restarted after a while, it must be marked up again.
        let later = sim.now_us + 1_000_000;
        sim.run_until(later, |_| false);
        sim.restart(victim);
        let restarted = sim.now_us;
        let found = sim.run_until(restarted + 15_000_000, |s| {
            s.marked(restarted, victim, Verdict::Up).is_some()
        });
        assert!(
            found,
            "seed {seed}: node {victim} restarted but not marked up within 15 s"
        );
        let at = sim.marked(restarted, victim, Verdict::Up).expect("marked up");
        up.push((at - restarted) as f64 / 1000.0);
        let settle = sim.now_us + 1_000_000;
        sim.run_until(settle, |_| false);
    }
    (down, up)
}

fn summary(ms: &[f64]) -> String {
    let mut v = ms.to_vec();
    let p50 = percentile(&mut v, 50.0);
    let p99 = percentile(&mut v, 99.0);
    format!(
        "p50 {p50:.0} ms, p99 {p99:.0} ms (min {:.0}, max {:.0}, n {})",
        v[0],
        v[v.len() - 1],
        v.len()
    )
}

fn p99(ms: &[f64]) -> f64 {
    percentile(&mut ms.to_vec(), 99.0)
}

#[test]
fn a_hundred_nodes_watch_five_peers_each_and_fail_over_within_a_second() {
    let seed = seed();
    let started = Instant::now();
    println!("monitoring simulation: {NODES} nodes, seed {seed} (HERALD_SIM_SEED={seed} replays it)");

    // Idle traffic, bounded set, default settings.
    let mut sim = Sim::new(seed, DEFAULTS);
    sim.run_until(5_000_000, |_| false);
    let (mean, max) = sim.traffic(Duration::from_secs(10));
    let k = DEFAULTS.monitors as f64;
    let per_interval = 1.0 / DEFAULTS.ping_interval.as_secs_f64();
    let bound = 2.0 * (k + 1.0) * per_interval;
    assert!(
        sim.decisions.is_empty(),
        "seed {seed}: healthy nodes judged at idle: {:?}",
        sim.decisions
    );

    // The same with everyone watching everyone (as before `cluster.monitors`).
    let mut all = Sim::new(
        seed,
        Settings {
            monitors: NODES as usize,
            ..DEFAULTS
        },
    );
    all.run_until(1_000_000, |_| false);
    let (all_mean, _) = all.traffic(Duration::from_secs(2));
    println!(
        "idle control messages per node per second: {mean:.1} mean, {max:.1} max with {} monitors (bound {bound:.0}); {all_mean:.1} with everyone watching everyone ({:.0} expected: 2(n-1)/interval)",
        DEFAULTS.monitors,
        2.0 * (NODES as f64 - 1.0) * per_interval
    );
    assert!(
        mean <= bound && max <= bound,
        "seed {seed}: idle traffic {mean:.1} mean / {max:.1} max per node per second, above {bound:.0}"
    );
    assert!(
        all_mean > 5.0 * mean,
        "seed {seed}: all-pairs traffic {all_mean:.1} vs bounded {mean:.1}"
    );

    // A killed process (connections break, redials refused), default settings.
    let (crash, crash_up) = failovers(&mut sim, Kill::Crash);
    println!(
        "failover, killed process, defaults: {}; marked up after restart: {}",
        summary(&crash),
        summary(&crash_up)
    );

    // A silent node (lost host, SIGSTOP), default settings: phi crosses 8 ~0.5 s into the
    // silence, then `down_after` (1 s).
    let mut silent_sim = Sim::new(seed.wrapping_add(1), DEFAULTS);
    silent_sim.run_until(3_000_000, |_| false);
    let (silent, silent_up) = failovers(&mut silent_sim, Kill::Silent);
    println!(
        "failover, silent node, defaults (ping 200 ms, phi 8, min std 50 ms, down_after 1000 ms): {}; marked up: {}",
        summary(&silent),
        summary(&silent_up)
    );

    // A silent node with faster settings.
    let fast = Settings {
        ping_interval: Duration::from_millis(100),
        down_after: Duration::from_millis(300),
        ..DEFAULTS
    };
    let mut fast_sim = Sim::new(seed.wrapping_add(2), fast);
    fast_sim.run_until(3_000_000, |_| false);
    let (fast_down, fast_up) = failovers(&mut fast_sim, Kill::Silent);
    println!(
        "failover, silent node, ping 100 ms, phi 8, min std 50 ms, down_after 300 ms: {}; marked up: {}",
        summary(&fast_down),
        summary(&fast_up)
    );

    assert!(
        p99(&crash) <= 1000.0,
        "seed {seed}: killed-process failover p99 {} > 1 s",
        summary(&crash)
    );
    assert!(
        p99(&fast_down) <= 1000.0,
        "seed {seed}: silent failover with fast settings: {} > 1 s",
        summary(&fast_down)
    );
    // With the defaults a silent node cannot be marked down under ~1.5 s (detection + down_after).
    assert!(
        p99(&silent) <= 2500.0,
        "seed {seed}: silent failover with defaults: {}",
        summary(&silent)
    );
    for (what, up) in [("crash", &crash_up), ("silent", &silent_up), ("fast", &fast_up)] {
        assert!(
            p99(up) <= 5000.0,
            "seed {seed}: {what}: marked up too late: {}",
            summary(up)
        );
    }
    println!("simulated in {:.1} s of wall time", started.elapsed().as_secs_f64());
}

#[test]
fn one_cut_off_watcher_and_one_liar_cannot_get_a_healthy_node_marked_down() {
    let seed = seed();
    let mut sim = Sim::new(seed, DEFAULTS);
    sim.run_until(3_000_000, |_| false);
    // A healthy node, one of its watchers cut off from it, and another watcher that lies.
    let target = 2 + sim.rng.below(NODES - 1);
    let watchers = sim.ring.watchers_of(target, DEFAULTS.monitors);
    assert_eq!(watchers.len(), DEFAULTS.monitors);
    let cut_off = watchers[0];
    let liar = watchers[1];
    sim.cut.insert((cut_off, target));
    sim.cut.insert((target, cut_off));
    sim.liar = Some((liar, target));
    let until = sim.now_us + 20_000_000;
    sim.run_until(until, |_| false);
    // The test only means something if the leader heard both accusations.
    assert!(
        sim.heard_suspect.contains(&(cut_off, target)) && sim.heard_suspect.contains(&(liar, target)),
        "seed {seed}: the leader never heard the cut-off watcher {cut_off} or the liar {liar} about {target}"
    );
    assert!(
        sim.decisions.is_empty(),
        "seed {seed}: node {target} (watchers {watchers:?}, {cut_off} cut off, {liar} lying): {:?}",
        sim.decisions
    );
    // A third accusation is a majority: then it is marked down (the rule bites).
    let third = watchers[2];
    sim.cut.insert((third, target));
    sim.cut.insert((target, third));
    let third_cut = sim.now_us;
    let found = sim.run_until(third_cut + 10_000_000, |s| !s.decisions.is_empty());
    assert!(
        found,
        "seed {seed}: three of five watchers accusing node {target} did not mark it down"
    );
    assert_eq!(sim.decisions[0].1, target);
    println!(
        "node {target}: one watcher cut off and one lying for 20 s: not marked down; a third cut off: marked down after {:.0} ms",
        (sim.decisions[0].0 - third_cut) as f64 / 1000.0
    );
}
