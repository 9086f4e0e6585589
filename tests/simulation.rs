//! A seeded, deterministic simulation of the real membership service (TigerBeetle/turmoil style).
//!
//! Five nodes, each the real `membership::service::Core` — the Raft driver applying the
//! membership table, the control dispatch, the monitor (pings, phi), the leader's duties
//! (configuration changes, MarkDown/MarkUp, placement) and the join path through `--join` seeds —
//! run on one single-threaded Tokio runtime with paused (virtual) time, over an in-process network
//! ([`NodeNet`], the service's `PeerNet` seam) that loses, duplicates, delays and reorders messages,
//! partitions the nodes and cuts single directions. Every random choice (the network's, the start
//! order and times, tick skew, election timeouts, proposal sequence numbers, which nodes are cut
//! off or crash and for how long) comes from one seeded PRNG, so a failing seed replays exactly:
//!
//! ```text
//! HERALD_SIM_SEED=<n> cargo test --test simulation -- --nocapture
//! ```
//!
//! `HERALD_SIM_SEEDS=<count>` runs seeds `1..=count` instead of the default 20;
//! `HERALD_SIM_TRACE=1` prints every seed's trace.
//!
//! Per seed:
//! 1. **Formation.** The five nodes start at random times in a random order with one shared
//!    `--join` list: the first seed (node 1) bootstraps, the others probe the seeds and send their
//!    `Join` through them — node 1's own `Join` may commit after others' (the formation race of
//!    issue 18). A probe of a seed the prober's bus is already connected to is refused, as the
//!    real handshake refuses it (a duplicate of that connection), and fails the seed: nodes take
//!    the ids of seeds they know from their table or their bus. Subscriptions are proposed on random nodes; the cluster must settle.
//! 2. **Partition** 3/2 (the 3 holding a quorum of voters): proposals on the 2 fail without
//!    changing their state; proposals on the 3 commit.
//! 3. **Crash and restart** of a random node on its storage, sometimes with a proposal in flight.
//! 4. **Heal**, retry some failed proposals; everything converges.
//! 5. **Failover.** A non-leader crashes: the real leader duties mark it down within
//!    [`FAILOVER_BOUND`] and move its instances; it restarts, rejoins and is marked up.
//! 6. **One-way cuts** between the leader and a follower, or of all of one node's links in one
//!    direction, for a while; then heal and converge.
//! 7. **Failed disk.** A follower's Raft storage fails its writes: its driver stops while its
//!    process runs on; the leader marks it down within [`FAILOVER_BOUND`] and the others go on;
//!    it restarts on the repaired disk and rejoins.
//!
//! Invariants checked throughout: one leader per term; two nodes at the same applied index hold
//! the same table; a node's applied index never goes back within a run of it; one placement per
//! epoch, and epochs never go back; no service task dies. At the end: every node holds the same
//! table, every member up at its addresses, every acknowledged subscription and no failed one,
//! every instance placed on an up member.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::config::{Config, JoinApproval};
use herald::handler::SubscriptionKey;
use herald::membership::raft_node::{DriverConfig, ProposeError, RaftStatus};
use herald::membership::service::{membership_problems, next_conf_action, Core, CoreConfig, Handle};
use herald::membership::state::{Command, MembershipState};
use herald::membership::storage::{LogStoreError, MemStorage, RaftLogStore};
use herald::monitor::{Health, MonitorConfig, Progress};
use herald::placement::NodeStatus;
use herald::subscription::{HandlerSpec, SubscriptionSpec};
use herald::transport::{Envelope, HandshakeError, PeerLink, PeerNet, Probe, ProbeError, SendError, Side};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

use common::rng::Rng;

const CLUSTER: &str = "sim";
const NODES: u64 = 5;
const DEFAULT_SEEDS: u64 = 20;
/// The driver's proposal timeout.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a proposal that must commit may keep being retried (virtual time).
const COMMIT_DEADLINE: Duration = Duration::from_secs(120);
/// How long the cluster may take to settle (virtual time).
const SETTLE_DEADLINE: Duration = Duration::from_secs(180);
/// How long the leader may take to mark a crashed member down and move its instances (virtual
/// time; the README promises about a second, the bound only catches a regression to tens).
const FAILOVER_BOUND: Duration = Duration::from_secs(10);
/// The bound of a control channel's inbound queue, as a node's (`membership::service`).
const INBOX: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Seeds and the PRNG

/// The seeds to run: `HERALD_SIM_SEED=<n>` replays one, `HERALD_SIM_SEEDS=<count>` runs `1..=count`.
fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("HERALD_SIM_SEED") {
        let seed = s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("HERALD_SIM_SEED={s:?} is not a number"));
        return vec![seed];
    }
    let count = std::env::var("HERALD_SIM_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_SEEDS);
    (1..=count).collect()
}

/// FNV-1a, to fold every network decision into one number for the trace.
fn fnv(mut h: u64, words: &[u64]) -> u64 {
    for w in words {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

// ---------------------------------------------------------------------------------------------
// What every task shares: the trace and the invariants

struct World {
    start: Instant,
    /// Events, in order, with their virtual time: two runs of one seed must produce the same.
    trace: Mutex<Vec<String>>,
    /// Broken invariants (the run fails at its next check).
    violations: Mutex<Vec<String>>,
    /// The table at each applied index, as first seen on any node (its snapshot encoding).
    tables: Mutex<BTreeMap<u64, Vec<u8>>>,
    /// The placement of each epoch, as first seen.
    placements: Mutex<BTreeMap<u64, String>>,
    /// The leader of each term, as seen by the status watchers.
    leaders: Mutex<BTreeMap<u64, u64>>,
}

impl World {
    fn new() -> World {
        World {
            start: Instant::now(),
            trace: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            tables: Mutex::new(BTreeMap::new()),
            placements: Mutex::new(BTreeMap::new()),
            leaders: Mutex::new(BTreeMap::new()),
        }
    }

    fn event(&self, what: impl AsRef<str>) {
        let ms = (Instant::now() - self.start).as_millis();
        self.trace.lock().unwrap().push(format!("{ms:>7}ms {}", what.as_ref()));
    }

    fn violation(&self, what: String) {
        self.event(format!("VIOLATION {what}"));
        self.violations.lock().unwrap().push(what);
    }
}

// ---------------------------------------------------------------------------------------------
// The network

/// What became of a message (counted, and folded into the digest).
const SENT: u64 = 0;
const LOST: u64 = 1;
const CUT: u64 = 2;
const TO_DOWN_NODE: u64 = 3;
const DELIVERED: u64 = 4;
const DUPLICATED: u64 = 5;

#[derive(Debug, Default)]
struct NetStats {
    sent: u64,
    lost: u64,
    cut: u64,
    to_down: u64,
    delivered: u64,
    duplicated: u64,
    digest: u64,
}

/// The peer address of node `id`; `--join` lists these.
fn addr(id: u64) -> String {
    format!("sim-{id}:7946")
}

/// The node behind a peer address.
fn node_at(addr: &str) -> Option<u64> {
    addr.strip_prefix("sim-")?.strip_suffix(":7946")?.parse().ok()
}

#[derive(Default)]
struct NetState {
    /// Directed cuts `(from, to)`: what `from` sends `to` is lost. A connection (a link, a probe)
    /// needs both directions, as a TCP handshake does.
    cut: BTreeSet<(u64, u64)>,
    /// The running nodes: their run (incarnation) and control inbox.
    up: BTreeMap<u64, (u64, mpsc::Sender<(u64, Envelope)>)>,
    /// Each running node's peers (added by its service) and the link state it reads of each.
    peers: BTreeMap<u64, BTreeMap<u64, watch::Sender<PeerLink>>>,
    /// Who reached each running node since it started (a real node knows them from their inbound
    /// connections and can dial them back).
    reached_by: BTreeMap<u64, BTreeSet<u64>>,
    /// Node starts so far (a start's run number).
    runs: u64,
    stats: NetStats,
}

impl NetState {
    fn connected(&self, a: u64, b: u64) -> bool {
        self.up.contains_key(&a)
            && self.up.contains_key(&b)
            && !self.cut.contains(&(a, b))
            && !self.cut.contains(&(b, a))
    }

    /// Brings every link's state in line with the nodes that run and the cuts.
    fn refresh_links(&self) {
        for (&a, peers) in &self.peers {
            for (&b, link) in peers {
                let connected = self.connected(a, b);
                link.send_if_modified(|l| {
                    if l.connected == connected {
                        return false;
                    }
                    l.connected = connected;
                    if connected {
                        l.connects += 1;
                        l.failed_dials = 0;
                        l.last_error = None;
                    } else {
                        l.failed_dials += 1;
                        l.last_error = Some("simulated: unreachable".into());
                    }
                    true
                });
            }
        }
    }
}

struct Net {
    world: Arc<World>,
    rng: Mutex<Rng>,
    drop_p: f64,
    dup_p: f64,
    max_delay_ms: u64,
    state: Mutex<NetState>,
    /// Probes refused because the prober's bus was already connected to the seed: (prober, seed).
    refused_probes: Mutex<Vec<(u64, u64)>>,
}

impl Net {
    fn note(st: &mut NetState, world: &World, what: u64, from: u64, to: u64, extra: u64) {
        let ms = (Instant::now() - world.start).as_millis() as u64;
        let s = &mut st.stats;
        match what {
            SENT => s.sent += 1,
            LOST => s.lost += 1,
            CUT => s.cut += 1,
            TO_DOWN_NODE => s.to_down += 1,
            DUPLICATED => s.duplicated += 1,
            _ => s.delivered += 1,
        }
        s.digest = fnv(s.digest, &[ms, what, from, to, extra]);
    }

    /// Node `id` starts (again): returns its run number.
    fn attach(&self, id: u64, inbox: mpsc::Sender<(u64, Envelope)>) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.runs += 1;
        let run = st.runs;
        st.up.insert(id, (run, inbox));
        st.peers.insert(id, BTreeMap::new());
        st.reached_by.insert(id, BTreeSet::new());
        st.refresh_links();
        run
    }

    /// Node `id` crashed: its connections break.
    fn detach(&self, id: u64) {
        let mut st = self.state.lock().unwrap();
        st.up.remove(&id);
        st.peers.remove(&id);
        st.reached_by.remove(&id);
        for by in st.reached_by.values_mut() {
            by.remove(&id);
        }
        st.refresh_links();
    }

    fn set_cuts(&self, cut: BTreeSet<(u64, u64)>) {
        let mut st = self.state.lock().unwrap();
        st.cut = cut;
        let up: Vec<u64> = st.up.keys().copied().collect();
        // A cut breaks the connections across it: neither side can dial the other back.
        for id in up {
            let cut = st.cut.clone();
            if let Some(by) = st.reached_by.get_mut(&id) {
                by.retain(|&from| !cut.contains(&(from, id)) && !cut.contains(&(id, from)));
            }
        }
        st.refresh_links();
    }

    fn send(self: &Arc<Self>, from: u64, to: u64, env: Envelope) -> Result<(), SendError> {
        let mut st = self.state.lock().unwrap();
        if !st.peers.get(&from).is_some_and(|p| p.contains_key(&to)) {
            return Err(SendError::UnknownPeer(to));
        }
        let (lost, dup, delay, dup_delay) = {
            let mut rng = self.rng.lock().unwrap();
            (
                rng.chance(self.drop_p),
                rng.chance(self.dup_p),
                rng.range(0, self.max_delay_ms),
                rng.range(0, self.max_delay_ms * 2),
            )
        };
        let size = prost::Message::encoded_len(&env) as u64;
        Net::note(&mut st, &self.world, SENT, from, to, size);
        if lost {
            Net::note(&mut st, &self.world, LOST, from, to, 0);
            return Ok(());
        }
        let Some(&(run, _)) = st.up.get(&to) else {
            Net::note(&mut st, &self.world, TO_DOWN_NODE, from, to, 0);
            return Ok(());
        };
        if !st.connected(from, to) {
            // The connection is down: what was queued on it is lost.
            Net::note(&mut st, &self.world, CUT, from, to, 0);
            return Ok(());
        }
        drop(st);
        if dup {
            let (net, env) = (self.clone(), env.clone());
            tokio::spawn(async move {
                sleep(Duration::from_millis(dup_delay)).await;
                net.deliver(from, to, run, env, DUPLICATED);
            });
        }
        let net = self.clone();
        tokio::spawn(async move {
            sleep(Duration::from_millis(delay)).await;
            net.deliver(from, to, run, env, DELIVERED);
        });
        Ok(())
    }

    /// Delivers a message that spent its delay on the wire, unless the connection broke meanwhile.
    fn deliver(&self, from: u64, to: u64, run: u64, env: Envelope, how: u64) {
        let mut st = self.state.lock().unwrap();
        let inbox = match st.up.get(&to) {
            Some((r, inbox)) if *r == run => inbox.clone(),
            _ => return Net::note(&mut st, &self.world, TO_DOWN_NODE, from, to, 0),
        };
        if st.cut.contains(&(from, to)) {
            return Net::note(&mut st, &self.world, CUT, from, to, 0);
        }
        st.reached_by.entry(to).or_default().insert(from);
        if inbox.try_send((from, env)).is_ok() {
            Net::note(&mut st, &self.world, how, from, to, 0);
        } else {
            Net::note(&mut st, &self.world, LOST, from, to, 1);
        }
    }
}

/// One node's view of the simulated network: the membership service's `PeerNet`.
struct NodeNet {
    id: u64,
    net: Arc<Net>,
}

impl PeerNet for NodeNet {
    fn add_peer(&self, id: u64, _addr: &str) {
        if id == self.id {
            return;
        }
        let mut st = self.net.state.lock().unwrap();
        let connected = st.connected(self.id, id);
        if let Some(peers) = st.peers.get_mut(&self.id) {
            peers.entry(id).or_insert_with(|| {
                watch::Sender::new(PeerLink {
                    connected,
                    connects: u64::from(connected),
                    ..PeerLink::default()
                })
            });
        }
    }

    fn remove_peer(&self, id: u64) {
        let mut st = self.net.state.lock().unwrap();
        if let Some(peers) = st.peers.get_mut(&self.id) {
            peers.remove(&id);
        }
    }

    fn send(&self, id: u64, envelope: Envelope) -> Result<(), SendError> {
        self.net.send(self.id, id, envelope)
    }

    fn link(&self, id: u64) -> Option<watch::Receiver<PeerLink>> {
        let st = self.net.state.lock().unwrap();
        st.peers.get(&self.id)?.get(&id).map(watch::Sender::subscribe)
    }

    fn dial_back(&self, id: u64) -> bool {
        let dial = {
            let st = self.net.state.lock().unwrap();
            let known = st.peers.get(&self.id).is_some_and(|p| p.contains_key(&id));
            let reached = st.reached_by.get(&self.id).is_some_and(|r| r.contains(&id));
            !known && reached
        };
        if dial {
            self.add_peer(id, &addr(id));
        }
        dial
    }

    fn is_cut_off(&self, _id: u64) -> bool {
        false
    }

    fn peer_at(&self, address: &str) -> Option<u64> {
        let st = self.net.state.lock().unwrap();
        st.peers.get(&self.id)?.keys().copied().find(|&id| addr(id) == address)
    }

    fn probe<'a>(&'a self, address: &'a str) -> Probe<'a> {
        Box::pin(async move {
            let Some(id) = node_at(address) else {
                return Err(ProbeError::Connect(
                    address.into(),
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a simulated address"),
                ));
            };
            // Whether the bus had a connection to the seed when the probe began (one it opens
            // meanwhile races the probe's, in either order).
            let had_connection = {
                let st = self.net.state.lock().unwrap();
                st.peers.get(&self.id).is_some_and(|p| p.contains_key(&id)) && st.connected(self.id, id)
            };
            let delay = self.net.rng.lock().unwrap().range(1, 5);
            sleep(Duration::from_millis(delay)).await;
            let (up, connected) = {
                let st = self.net.state.lock().unwrap();
                (st.up.contains_key(&id), st.connected(self.id, id))
            };
            if had_connection && connected {
                // The seed already has this node's control connection (its bus dials the seed):
                // the real handshake refuses the probe's as a duplicate.
                self.net.refused_probes.lock().unwrap().push((self.id, id));
                self.net
                    .world
                    .event(format!("node {} probes seed {id}: refused, already connected", self.id));
                Err(ProbeError::Handshake(
                    address.into(),
                    HandshakeError::DuplicateNodeId {
                        by: Side::Peer,
                        message: format!("node {} is already connected to node {id}", self.id),
                    },
                ))
            } else if connected {
                Ok(id)
            } else if !up {
                Err(ProbeError::Connect(
                    address.into(),
                    std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "simulated: not running"),
                ))
            } else {
                // Cut off: the dial times out, as `transport.connect_timeout` would.
                sleep(Duration::from_secs(3)).await;
                Err(ProbeError::Timeout(address.into()))
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The disks

/// A node's disk: memory storage (it survives a crash, as a disk would) whose writes fail while
/// `failing` is set (a failed or full disk).
#[derive(Clone, Default)]
struct Disk {
    mem: MemStorage,
    failing: Arc<AtomicBool>,
}

impl Disk {
    fn write(&self) -> Result<(), LogStoreError> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(LogStoreError::Corrupt {
                location: "simulated disk".into(),
                what: "a write failed (injected)".into(),
            });
        }
        Ok(())
    }
}

impl raft::Storage for Disk {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        self.mem.term(index)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.mem.snapshot(request_index, to)
    }
}

impl RaftLogStore for Disk {
    fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), LogStoreError> {
        self.write()?;
        self.mem.persist(entries, hard_state)
    }

    fn set_commit(&self, commit: u64) -> Result<(), LogStoreError> {
        self.write()?;
        self.mem.set_commit(commit)
    }

    fn set_conf_state(&self, conf_state: ConfState) -> Result<(), LogStoreError> {
        self.write()?;
        self.mem.set_conf_state(conf_state)
    }

    fn apply_snapshot(&self, snapshot: Snapshot) -> Result<(), LogStoreError> {
        self.write()?;
        self.mem.apply_snapshot(snapshot)
    }

    fn compact(&self, index: u64) -> Result<(), LogStoreError> {
        self.write()?;
        self.mem.compact(index)
    }

    fn create_snapshot(&self, index: u64, conf_state: ConfState, data: Vec<u8>) -> Result<(), LogStoreError> {
        self.write()?;
        self.mem.create_snapshot(index, conf_state, data)
    }
}

// ---------------------------------------------------------------------------------------------
// Watching the nodes

/// Records leadership changes and checks that no term has two leaders.
async fn watch_status(world: Arc<World>, id: u64, mut status: watch::Receiver<RaftStatus>) {
    loop {
        let s = status.borrow_and_update().clone();
        if s.is_leader {
            let mut leaders = world.leaders.lock().unwrap();
            match leaders.get(&s.term).copied() {
                Some(other) if other != id => {
                    drop(leaders);
                    world.violation(format!(
                        "election safety: nodes {other} and {id} both lead term {}",
                        s.term
                    ));
                }
                Some(_) => {}
                None => {
                    leaders.insert(s.term, id);
                    drop(leaders);
                    world.event(format!("node {id} leads term {}", s.term));
                }
            }
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Checks every table node `id` publishes: the same applied index means the same table on every
/// node, the applied index never goes back, an epoch names one placement, and the epoch never
/// goes back.
async fn watch_state(world: Arc<World>, id: u64, mut state: watch::Receiver<Arc<MembershipState>>) {
    let mut last = (0u64, 0u64);
    loop {
        let s = state.borrow_and_update().clone();
        let (index, epoch) = (s.applied_index(), s.epoch());
        if index > 0 {
            let bytes = s.to_snapshot();
            let mut tables = world.tables.lock().unwrap();
            let differs = tables.get(&index).is_some_and(|seen| *seen != bytes);
            tables.entry(index).or_insert(bytes);
            drop(tables);
            if differs {
                world.violation(format!(
                    "state machine safety: node {id}'s table at applied index {index} differs from another node's"
                ));
            }
        }
        if index < last.0 || epoch < last.1 {
            world.violation(format!(
                "node {id} went back from applied index {} epoch {} to {index} epoch {epoch}",
                last.0, last.1
            ));
        }
        last = (index, epoch);
        if epoch > 0 {
            let placement = format!("{:?}", s.placement());
            let mut placements = world.placements.lock().unwrap();
            let differs = placements.get(&epoch).is_some_and(|seen| *seen != placement);
            placements.entry(epoch).or_insert(placement);
            drop(placements);
            if differs {
                world.violation(format!("fencing: node {id} holds another placement for epoch {epoch}"));
            }
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated cluster

struct Node {
    disk: Disk,
    handle: Handle,
    /// `None` while crashed.
    core: Option<Core>,
    /// The status and state watchers.
    helpers: Vec<JoinHandle<()>>,
}

struct Sim {
    world: Arc<World>,
    net: Arc<Net>,
    rng: Rng,
    voters: usize,
    defaults: Config,
    handlers: BTreeMap<u64, Vec<String>>,
    nodes: BTreeMap<u64, Node>,
    next_topic: u64,
    /// Nodes whose disk failed: their Raft driver is expected to stop (and their watchers with it).
    disk_failed: BTreeSet<u64>,
}

fn spec(topic: &str, instances: u32) -> SubscriptionSpec {
    SubscriptionSpec {
        topic: topic.to_string(),
        group: "g".to_string(),
        handler: HandlerSpec::Log,
        instances,
        max_attempts: None,
    }
}

fn key(topic: &str) -> SubscriptionKey {
    SubscriptionKey {
        topic: topic.to_string(),
        group: "g".to_string(),
    }
}

impl Sim {
    /// Starts (or restarts) node `id` on `storage` as a node process would: the real service with
    /// one `--join` list shared by every node.
    fn start(&mut self, id: u64, disk: Disk) -> Result<(), String> {
        let mut driver = DriverConfig::new(id);
        // Skewed clocks and distinct election timeouts, all from the seed.
        driver.tick = Duration::from_millis(self.rng.range(90, 110));
        driver.election_ticks = self.rng.range(10, 19) as usize;
        // raft-rs would randomize the timeout with its own, unseeded RNG.
        driver.max_election_ticks = driver.election_ticks + 1;
        driver.heartbeat_ticks = 2;
        driver.propose_timeout = PROPOSE_TIMEOUT;
        driver.snapshot_every = self.rng.range(3, 12);
        driver.first_seq = Some(self.rng.next_u64());
        let c = &self.defaults.cluster;
        let config = CoreConfig {
            node_id: id,
            cluster_id: CLUSTER.into(),
            http: format!("10.0.0.{id}:8080"),
            advertise: addr(id),
            join: (1..=NODES).map(addr).collect(),
            handlers: self.handlers[&id].clone(),
            driver: driver.clone(),
            voters: self.voters,
            load_factor: self.defaults.raft.load_factor,
            monitor: MonitorConfig::from_cluster(c),
            down_after: Duration::from_millis(c.down_after_ms),
            health: Arc::new(Health::default()),
            progress: Arc::new(Progress::new(0)),
            join_approval: JoinApproval::Auto,
        };
        let (tx, rx) = mpsc::channel(INBOX);
        let run = self.net.attach(id, tx);
        let net = Arc::new(NodeNet {
            id,
            net: self.net.clone(),
        });
        let core = Core::start(config, net, rx, disk.clone()).map_err(|e| format!("node {id} does not start: {e}"))?;
        let handle = core.handle().clone();
        self.world.event(format!(
            "node {id} starts (run {run}, tick {:?}, election {} ticks, snapshot every {}) at applied index {}",
            driver.tick,
            driver.election_ticks,
            driver.snapshot_every,
            handle.state().borrow().applied_index()
        ));
        let helpers = vec![
            tokio::spawn(watch_status(self.world.clone(), id, handle.status())),
            tokio::spawn(watch_state(self.world.clone(), id, handle.state())),
        ];
        self.nodes.insert(
            id,
            Node {
                disk,
                handle,
                core: Some(core),
                helpers,
            },
        );
        Ok(())
    }

    /// Kills node `id`'s service (its storage survives, as a disk would).
    fn crash(&mut self, id: u64) {
        self.net.detach(id);
        let node = self.nodes.get_mut(&id).expect("a node");
        for h in node.helpers.drain(..) {
            h.abort();
        }
        node.core = None;
        self.world.event(format!("node {id} crashes"));
    }

    fn restart(&mut self, id: u64) -> Result<(), String> {
        let disk = self.nodes[&id].disk.clone();
        self.start(id, disk.clone())?;
        // The driver restored a fresh table from the storage's snapshot (and replays the log after
        // it once it runs).
        let snapshot = raft::Storage::snapshot(&disk, 0, id).map_err(|e| format!("no snapshot: {e}"))?;
        let restored = MembershipState::from_snapshot(&snapshot.data).map_err(|e| e.to_string())?;
        if self.state(id) != restored {
            return Err(format!(
                "restarted node {id} did not restore its snapshot: {:?}",
                self.state(id)
            ));
        }
        self.check()
    }

    fn up(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.core.is_some())
            .map(|(&id, _)| id)
            .collect()
    }

    fn state(&self, id: u64) -> MembershipState {
        (*self.nodes[&id].handle.state().borrow().clone()).clone()
    }

    fn status(&self, id: u64) -> RaftStatus {
        self.nodes[&id].handle.status().borrow().clone()
    }

    fn leader(&self) -> Option<u64> {
        self.up()
            .into_iter()
            .filter(|&id| self.status(id).is_leader)
            .max_by_key(|&id| self.status(id).term)
    }

    /// Fails on a broken invariant or a dead task.
    fn check(&mut self) -> Result<(), String> {
        for (id, node) in self.nodes.iter_mut() {
            if self.disk_failed.contains(id) {
                // Expected to stop; the process (its core) goes on until it is restarted.
                continue;
            }
            if let Some(why) = node.core.as_mut().and_then(Core::failure) {
                self.world.violation(format!("node {id}: {why}"));
                node.core = None;
            }
            if node.helpers.iter().any(JoinHandle::is_finished) {
                self.world.violation(format!("a watcher of node {id} stopped"));
                node.helpers.retain(|h| !h.is_finished());
            }
        }
        match self.world.violations.lock().unwrap().first() {
            Some(v) => Err(v.clone()),
            None => Ok(()),
        }
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        for (&id, node) in &self.nodes {
            if node.core.is_none() {
                s += &format!("\n  node {id}: down");
                continue;
            }
            let st = self.status(id);
            let state = self.state(id);
            s += &format!(
                "\n  node {id}: joined {} leader {} term {} commit {} applied {} voters {:?} learners {:?}; table: applied {} members {:?} subscriptions {} epoch {}",
                node.handle.is_joined(),
                st.leader,
                st.term,
                st.commit,
                st.applied,
                st.voters,
                st.learners,
                state.applied_index(),
                state
                    .members()
                    .values()
                    .map(|m| format!("{}:{:?}", m.id, m.status))
                    .collect::<Vec<_>>(),
                state.subscriptions().len(),
                state.epoch()
            );
        }
        s
    }

    async fn until(
        &mut self,
        what: &str,
        deadline: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Result<(), String> {
        let end = Instant::now() + deadline;
        loop {
            self.check()?;
            if done(self) {
                self.world.event(format!("reached: {what}"));
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(format!(
                    "timed out after {deadline:?} waiting for {what}:{}",
                    self.describe()
                ));
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// The leader of a settled cluster and a node picked at random among the others.
    fn leader_and_follower(&mut self) -> (u64, u64) {
        let leader = self.leader().expect("a settled cluster has a leader");
        let others: Vec<u64> = self.nodes.keys().copied().filter(|&id| id != leader).collect();
        (leader, self.rng.pick(&others))
    }

    /// Waits until the leader's table has `victim` down and none of its instances, and the
    /// placement has nothing left to move, within [`FAILOVER_BOUND`]; how long that took.
    async fn until_marked_down(&mut self, victim: u64, why: &str) -> Result<Duration, String> {
        let since = Instant::now();
        let what = format!("node {victim} ({why}) to be marked down and its instances moved");
        self.until(&what, FAILOVER_BOUND, |s| {
            let Some(leader) = s.leader() else { return false };
            let state = s.state(leader);
            state.member(victim).is_some_and(|m| m.status == NodeStatus::Down)
                && state.placement().values().all(|nodes| !nodes.contains(&victim))
                && state.proposed_placement(s.defaults.raft.load_factor).is_none()
        })
        .await?;
        Ok(Instant::now() - since)
    }

    /// Every node runs, is a member, follows one leader, has applied everything it committed and
    /// holds the same table, every member is up; the leader duties have nothing left to do.
    fn settled(&self) -> bool {
        let Some(leader) = self.leader() else {
            return false;
        };
        let ls = self.status(leader);
        let state = self.state(leader);
        // Every member votes or learns, every voter the rule wants votes (a voter the rule would
        // demote stays one: that needs joint consensus), and the duties have nothing left to do.
        let want = state.voter_set(self.voters);
        if self.up().len() != NODES as usize
            || state.members().len() != NODES as usize
            || state.members().values().any(|m| m.status != NodeStatus::Up)
            || !membership_problems(&state, &ls).is_empty()
            || !want.voters.iter().all(|v| ls.voters.contains(v))
            || next_conf_action(&state, &ls, self.voters).is_some()
            || state.proposed_placement(self.defaults.raft.load_factor).is_some()
        {
            return false;
        }
        self.nodes.iter().all(|(&id, node)| {
            let st = self.status(id);
            node.handle.is_joined()
                && st.leader == leader
                && st.term == ls.term
                && st.commit == ls.commit
                && st.applied == ls.commit
                && self.state(id) == state
        })
    }

    async fn propose_on(&mut self, id: u64, cmd: &Command) -> Result<Result<u64, ProposeError>, String> {
        let handle = self.nodes[&id].handle.clone();
        match timeout(PROPOSE_TIMEOUT * 3, handle.propose(cmd)).await {
            Ok(r) => Ok(r),
            Err(_) => Err(format!(
                "a proposal on node {id} got no answer within {:?}",
                PROPOSE_TIMEOUT * 3
            )),
        }
    }

    /// Proposes `cmd` on one of `on` until it commits (a client retrying).
    async fn commit(&mut self, label: &str, on: &[u64], cmd: &Command) -> Result<u64, String> {
        let end = Instant::now() + COMMIT_DEADLINE;
        loop {
            self.check()?;
            let id = self.rng.pick(on);
            let r = self.propose_on(id, cmd).await?;
            self.world.event(format!("{label} on node {id} -> {r:?}"));
            if let Ok(index) = r {
                self.check()?;
                return Ok(index);
            }
            if Instant::now() >= end {
                return Err(format!(
                    "{label} did not commit within {COMMIT_DEADLINE:?}:{}",
                    self.describe()
                ));
            }
            sleep(Duration::from_millis(250)).await;
        }
    }

    fn new_topic(&mut self, prefix: &str) -> String {
        self.next_topic += 1;
        format!("{prefix}-{}", self.next_topic)
    }

    /// Subscribes a new topic through any of `on` until it commits, and records it.
    async fn subscribe(&mut self, prefix: &str, on: &[u64], ledger: &mut Ledger) -> Result<(), String> {
        let topic = self.new_topic(prefix);
        let s = spec(&topic, self.rng.range(1, 3) as u32);
        self.commit(&format!("subscribe {topic}"), on, &Command::subscribe(&s))
            .await?;
        ledger.committed.insert(topic, s);
        Ok(())
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "a panic".to_string()
    }
}

/// What the test expects of the subscriptions.
#[derive(Default)]
struct Ledger {
    /// Answered `Ok`: must be on every node, with this spec.
    committed: BTreeMap<String, SubscriptionSpec>,
    /// Failed on the minority side and not retried: must be nowhere.
    failed: BTreeSet<String>,
    /// Outcome unknown (the proposer crashed): may or may not be there.
    unknown: BTreeSet<String>,
}

// ---------------------------------------------------------------------------------------------
// The scenario

async fn scenario(sim: &mut Sim) -> Result<(), String> {
    let mut ledger = Ledger::default();
    let ids: Vec<u64> = (1..=NODES).collect();

    // 1. Formation: every node starts at a random time, in a random order, with one `--join` list.
    let mut order = ids.clone();
    sim.rng.shuffle(&mut order);
    sim.world.event(format!("start order {order:?}, {} voters", sim.voters));
    // Sometimes one after the other, sometimes all at once (a compose file or a StatefulSet).
    let spread = if sim.rng.chance(0.5) { 1500 } else { 20 };
    for &id in &order {
        sleep(Duration::from_millis(sim.rng.range(0, spread))).await;
        sim.start(id, Disk::default())?;
    }
    for _ in 0..sim.rng.range(1, 3) {
        sim.subscribe("init", &ids, &mut ledger).await?;
    }
    sim.until("the cluster to form and settle", SETTLE_DEADLINE, Sim::settled)
        .await?;
    let leader = sim.leader().expect("settled");
    let voters = sim.status(leader).voters;
    sim.world.event(format!(
        "settled: leader {leader}, voters {voters:?}, learners {:?}, epoch {}",
        sim.status(leader).learners,
        sim.state(leader).epoch()
    ));

    // 2. Partition: 3 nodes holding a quorum of voters against 2.
    let majority: BTreeSet<u64> = loop {
        let mut shuffled = ids.clone();
        sim.rng.shuffle(&mut shuffled);
        let side: BTreeSet<u64> = shuffled[..3].iter().copied().collect();
        if side.iter().filter(|id| voters.contains(id)).count() * 2 > voters.len() {
            break side;
        }
    };
    let minority: Vec<u64> = ids.iter().copied().filter(|id| !majority.contains(id)).collect();
    let majority_ids: Vec<u64> = majority.iter().copied().collect();
    let before: BTreeMap<u64, MembershipState> = minority.iter().map(|&id| (id, sim.state(id))).collect();
    let across: BTreeSet<(u64, u64)> = majority
        .iter()
        .flat_map(|&a| minority.iter().flat_map(move |&b| [(a, b), (b, a)]))
        .collect();
    sim.net.set_cuts(across);
    sim.world
        .event(format!("partition: majority {majority_ids:?}, minority {minority:?}"));

    let mut sides: Vec<bool> = (0..sim.rng.range(1, 3))
        .map(|_| false)
        .chain((0..sim.rng.range(1, 3)).map(|_| true))
        .collect();
    sim.rng.shuffle(&mut sides);
    for on_majority in sides {
        if on_majority {
            sim.subscribe("major", &majority_ids, &mut ledger).await?;
        } else {
            let topic = sim.new_topic("minor");
            let on = sim.rng.pick(&minority);
            let r = sim.propose_on(on, &Command::subscribe(&spec(&topic, 1))).await?;
            sim.world
                .event(format!("subscribe {topic} on minority node {on} -> {r:?}"));
            match r {
                Err(ProposeError::NoLeader | ProposeError::Timeout(_)) => {
                    ledger.failed.insert(topic);
                }
                other => {
                    return Err(format!(
                        "a proposal on minority node {on} answered {other:?}; it must fail with NoLeader or Timeout:{}",
                        sim.describe()
                    ))
                }
            }
        }
    }
    let unchanged = |sim: &Sim| -> Result<(), String> {
        for (&id, state) in &before {
            if sim.state(id) != *state {
                return Err(format!(
                    "minority node {id}'s table changed during the partition:{}",
                    sim.describe()
                ));
            }
        }
        Ok(())
    };
    unchanged(sim)?;

    // 3. Crash a random node, sometimes with a proposal of its own in flight, and restart it on
    //    the same storage after a random downtime.
    let victim = sim.rng.pick(&ids);
    if sim.rng.chance(0.5) {
        let topic = sim.new_topic("inflight");
        let handle = sim.nodes[&victim].handle.clone();
        let cmd = Command::subscribe(&spec(&topic, 1));
        sim.world
            .event(format!("subscribe {topic} on node {victim}, in flight when it crashes"));
        tokio::spawn(async move {
            let _ = handle.propose(&cmd).await;
        });
        if majority.contains(&victim) {
            ledger.unknown.insert(topic);
        } else {
            ledger.failed.insert(topic);
        }
        sleep(Duration::from_millis(sim.rng.range(0, 60))).await;
    }
    sim.crash(victim);
    sleep(Duration::from_millis(sim.rng.range(0, 3000))).await;
    sim.restart(victim)?;
    // A client retries on the restarted node at once.
    let topic = sim.new_topic("restarted");
    let s = spec(&topic, 1);
    if majority.contains(&victim) {
        sim.commit(&format!("subscribe {topic}"), &[victim], &Command::subscribe(&s))
            .await?;
        ledger.committed.insert(topic, s);
    } else {
        let r = sim.propose_on(victim, &Command::subscribe(&s)).await?;
        sim.world.event(format!(
            "subscribe {topic} on restarted minority node {victim} -> {r:?}"
        ));
        match r {
            Err(ProposeError::NoLeader | ProposeError::Timeout(_)) => {
                ledger.failed.insert(topic);
            }
            other => {
                return Err(format!(
                    "a proposal on restarted minority node {victim} answered {other:?}; it must fail:{}",
                    sim.describe()
                ))
            }
        }
    }
    sim.subscribe("major", &majority_ids, &mut ledger).await?;
    // A restarted minority node restores the same table from its snapshot and log.
    unchanged(sim)?;

    // 4. Heal; retry some of the failed proposals; everything converges.
    sim.net.set_cuts(BTreeSet::new());
    sim.world.event("partition healed");
    let failed: Vec<String> = ledger.failed.iter().cloned().collect();
    for topic in failed {
        if sim.rng.chance(0.5) {
            let s = spec(&topic, 1);
            sim.commit(&format!("retry {topic}"), &ids, &Command::subscribe(&s))
                .await?;
            ledger.failed.remove(&topic);
            ledger.committed.insert(topic, s);
        }
    }
    sim.until(
        "the cluster to converge after the partition",
        SETTLE_DEADLINE,
        Sim::settled,
    )
    .await?;

    // 5. Failover: a member that is not the leader crashes; the leader marks it down and moves its
    //    instances within the bound; subscriptions still commit; it comes back and is marked up.
    let (_, victim) = sim.leader_and_follower();
    sim.crash(victim);
    let took = sim.until_marked_down(victim, "crashed").await?;
    sim.world.event(format!("failover of node {victim} took {took:?}"));
    let survivors: Vec<u64> = ids.iter().copied().filter(|&id| id != victim).collect();
    sim.subscribe("during-failover", &survivors, &mut ledger).await?;
    sleep(Duration::from_millis(sim.rng.range(0, 2000))).await;
    sim.restart(victim)?;
    sim.until(
        "the crashed member to rejoin and be marked up",
        SETTLE_DEADLINE,
        Sim::settled,
    )
    .await?;

    // 6. One-way cuts: between the leader and a follower, or all of one node's links in one
    //    direction (it hears everyone and nobody hears it, or the reverse); then heal.
    let (leader, follower) = sim.leader_and_follower();
    let cuts: BTreeSet<(u64, u64)> = match sim.rng.below(4) {
        0 => [(leader, follower)].into(),
        1 => [(follower, leader)].into(),
        2 => ids
            .iter()
            .filter(|&&id| id != follower)
            .map(|&id| (follower, id))
            .collect(),
        _ => ids
            .iter()
            .filter(|&&id| id != follower)
            .map(|&id| (id, follower))
            .collect(),
    };
    sim.world.event(format!("one-way cuts {cuts:?}"));
    sim.net.set_cuts(cuts);
    sim.subscribe("one-way", &ids, &mut ledger).await?;
    sleep(Duration::from_millis(sim.rng.range(500, 4000))).await;
    sim.net.set_cuts(BTreeSet::new());
    sim.world.event("one-way cut healed");
    sim.until(
        "the cluster to converge after the one-way cut",
        SETTLE_DEADLINE,
        Sim::settled,
    )
    .await?;

    // 7. A follower's disk fails: its Raft driver stops at its next write while its process runs on
    //    (connected, no longer answering); the leader marks it down within the bound and moves its
    //    instances; the others go on. The disk is replaced, the node restarts and rejoins.
    let (_, victim) = sim.leader_and_follower();
    sim.nodes[&victim].disk.failing.store(true, Ordering::Relaxed);
    sim.disk_failed.insert(victim);
    sim.world.event(format!("node {victim}'s disk fails"));
    let survivors: Vec<u64> = ids.iter().copied().filter(|&id| id != victim).collect();
    sim.subscribe("disk-failed", &survivors, &mut ledger).await?;
    let took = sim.until_marked_down(victim, "its disk failed").await?;
    sim.world
        .event(format!("node {victim} marked down {took:?} after its disk failed"));
    let stopped = sim
        .nodes
        .get_mut(&victim)
        .and_then(|n| n.core.as_mut())
        .and_then(Core::failure);
    if stopped.is_none() {
        return Err(format!("node {victim}'s disk failed but its Raft driver did not stop"));
    }
    sim.crash(victim);
    sim.nodes[&victim].disk.failing.store(false, Ordering::Relaxed);
    sim.disk_failed.remove(&victim);
    sim.restart(victim)?;
    sim.until(
        "the node with a new disk to rejoin and be marked up",
        SETTLE_DEADLINE,
        Sim::settled,
    )
    .await?;

    let leader = sim.leader().expect("settled");
    let state = sim.state(leader);
    let bytes: Vec<u64> = state.to_snapshot().into_iter().map(u64::from).collect();
    sim.world.event(format!(
        "converged: leader {leader} term {}, applied index {}, epoch {}, table digest {:016x}, subscriptions {:?}",
        sim.status(leader).term,
        state.applied_index(),
        state.epoch(),
        fnv(0, &bytes),
        state
            .subscriptions()
            .keys()
            .map(|k| k.topic.as_str())
            .collect::<Vec<_>>()
    ));

    // Every node holds the same table ...
    for &id in &ids {
        if sim.state(id) != state {
            return Err(format!("node {id} differs from the leader:{}", sim.describe()));
        }
    }
    // ... with every member up at its addresses ...
    for &id in &ids {
        let m = state.member(id).ok_or_else(|| format!("node {id} is not a member"))?;
        let handlers: BTreeSet<String> = sim.handlers[&id].iter().cloned().collect();
        if m.http != format!("10.0.0.{id}:8080")
            || m.peer != addr(id)
            || m.handlers != handlers
            || m.status != NodeStatus::Up
        {
            return Err(format!("member {id} is {m:?}"));
        }
    }
    // ... every acknowledged subscription, no failed one, nothing else ...
    for (topic, s) in &ledger.committed {
        if state.subscriptions().get(&key(topic)) != Some(s) {
            return Err(format!("acknowledged subscription {topic} is missing or different"));
        }
    }
    for k in state.subscriptions().keys() {
        if !ledger.committed.contains_key(&k.topic) && !ledger.unknown.contains(&k.topic) {
            return Err(format!(
                "subscription {} is present but was never acknowledged (failed: {})",
                k.topic,
                ledger.failed.contains(&k.topic)
            ));
        }
    }
    for topic in state.subscriptions().keys().map(|k| &k.topic) {
        if ledger.failed.contains(topic) {
            return Err(format!("failed proposal {topic} was committed"));
        }
    }
    // ... and every instance placed on an up member.
    for (k, s) in state.subscriptions() {
        let placed = state.placement_of(k);
        if placed.len() != s.instances as usize {
            return Err(format!(
                "subscription {} has {} instances placed, wants {}",
                k.topic,
                placed.len(),
                s.instances
            ));
        }
        if let Some(n) = placed
            .iter()
            .find(|&&n| state.member(n).is_none_or(|m| m.status != NodeStatus::Up))
        {
            return Err(format!(
                "subscription {} has an instance on node {n}, which is not up",
                k.topic
            ));
        }
    }
    Ok(())
}

/// A seed's run: its trace, and why it failed.
struct Outcome {
    trace: Vec<String>,
    error: Option<String>,
}

async fn simulate(seed: u64, world: Arc<World>) -> Option<String> {
    let mut rng = Rng::new(seed);
    let net = Arc::new(Net {
        world: world.clone(),
        rng: Mutex::new(Rng::new(rng.next_u64())),
        drop_p: rng.range(0, 8) as f64 / 100.0,
        dup_p: rng.range(0, 5) as f64 / 100.0,
        // Sometimes a fast LAN (the formation race needs one), sometimes a slow, lossy network.
        max_delay_ms: if rng.chance(0.3) {
            rng.range(1, 3)
        } else {
            rng.range(1, 40)
        },
        state: Mutex::new(NetState::default()),
        refused_probes: Mutex::new(Vec::new()),
    });
    let voters = if rng.chance(0.5) { 3 } else { 5 };
    let handlers = (1..=NODES)
        .map(|id| {
            let mut h = vec!["log".to_string()];
            if rng.chance(0.5) {
                h.push("webhook".to_string());
            }
            (id, h)
        })
        .collect();
    world.event(format!(
        "seed {seed}: drop {:.2}, duplicate {:.2}, delay 0..={} ms, {voters} voters",
        net.drop_p, net.dup_p, net.max_delay_ms
    ));
    let mut sim = Sim {
        world: world.clone(),
        net: net.clone(),
        rng,
        voters,
        defaults: Config::default(),
        handlers,
        nodes: BTreeMap::new(),
        next_topic: 0,
        disk_failed: BTreeSet::new(),
    };
    let mut error = scenario(&mut sim).await.err();
    if error.is_none() {
        error = sim.check().err();
    }
    let refused = net.refused_probes.lock().unwrap().clone();
    if error.is_none() && !refused.is_empty() {
        error = Some(format!(
            "a node probed a seed its bus was already connected to (prober, seed): {refused:?}; the \
             real handshake refuses such a probe with a warning about a duplicate node id"
        ));
    }
    let ids: Vec<u64> = sim.nodes.keys().copied().collect();
    for id in ids {
        sim.crash(id);
    }
    let stats = &net.state.lock().unwrap().stats;
    world.event(format!(
        "network: {} sent, {} lost, {} cut, {} to a down node, {} delivered, {} duplicated, digest {:016x}",
        stats.sent, stats.lost, stats.cut, stats.to_down, stats.delivered, stats.duplicated, stats.digest
    ));
    error
}

/// Real time one seed may take (a seed takes well under a second). A task that never awaits
/// something pending stops virtual time, and the whole runtime with it: such a seed is reported
/// as a failure with its trace so far, instead of hanging the test.
const REAL_TIME_LIMIT: Duration = Duration::from_secs(60);

/// Runs one seed on its own single-threaded runtime with paused time, on a thread of its own.
fn run_seed(seed: u64) -> Outcome {
    let (world_tx, world_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("sim-seed-{seed}"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("a runtime");
            let world = runtime.block_on(async { Arc::new(World::new()) });
            let _ = world_tx.send(world.clone());
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| runtime.block_on(simulate(seed, world))));
            let error = match run {
                Ok(error) => error,
                Err(p) => Some(format!("panicked: {}", panic_message(p))),
            };
            drop(runtime);
            let _ = done_tx.send(error);
        })
        .expect("a simulation thread");
    let world = world_rx.recv().expect("the simulation thread starts");
    let error = match done_rx.recv_timeout(REAL_TIME_LIMIT) {
        Ok(error) => error,
        Err(_) => Some(format!(
            "the run did not end within {REAL_TIME_LIMIT:?} of real time: a task spins without awaiting anything, so virtual time stopped (the trace ends where it started)"
        )),
    };
    let trace = world.trace.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Outcome { trace, error }
}

fn failure(seed: u64, outcome: &Outcome) -> String {
    let tail = outcome.trace.len().saturating_sub(80);
    format!(
        "simulation failed for seed {seed} (replay with HERALD_SIM_SEED={seed}): {}\n--- trace (last {} events) ---\n{}",
        outcome.error.as_deref().unwrap_or("?"),
        outcome.trace.len() - tail,
        outcome.trace[tail..].join("\n")
    )
}

#[test]
fn membership_group_survives_partitions_crashes_and_loss() {
    let started = std::time::Instant::now();
    let seeds = seeds();
    let mut failed = Vec::new();
    for &seed in &seeds {
        let outcome = run_seed(seed);
        if std::env::var_os("HERALD_SIM_TRACE").is_some() {
            eprintln!("--- seed {seed} ---\n{}", outcome.trace.join("\n"));
        }
        if outcome.error.is_some() {
            eprintln!("{}", failure(seed, &outcome));
            failed.push((seed, outcome));
        }
    }
    eprintln!(
        "simulation: {} of {} seeds passed in {:.1?}",
        seeds.len() - failed.len(),
        seeds.len(),
        started.elapsed()
    );
    if let Some((seed, outcome)) = failed.first() {
        let all: Vec<u64> = failed.iter().map(|(s, _)| *s).collect();
        panic!("{}\nfailing seeds: {all:?}", failure(*seed, outcome));
    }
}

/// Determinism: every seed, run twice, produces the same trace (events, their virtual times, the
/// digest of every network decision and the final state).
#[test]
fn every_seed_replays_identically() {
    for seed in seeds() {
        let first = run_seed(seed);
        let second = run_seed(seed);
        if first.trace != second.trace {
            let at = first
                .trace
                .iter()
                .zip(&second.trace)
                .position(|(a, b)| a != b)
                .unwrap_or(first.trace.len().min(second.trace.len()));
            panic!(
                "simulation failed for seed {seed} (replay with HERALD_SIM_SEED={seed}): two runs diverged at event {at}:\n  first:  {}\n  second: {}",
                first.trace.get(at).map_or("(end)", String::as_str),
                second.trace.get(at).map_or("(end)", String::as_str)
            );
        }
    }
}
