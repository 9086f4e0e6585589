//! A seeded, deterministic simulation of the membership Raft group (TigerBeetle/turmoil style).
//!
//! Five [`raft_node`] drivers, each applying a [`MembershipState`], run on one single-threaded
//! Tokio runtime with paused (virtual) time. They are wired by an in-memory network that drops
//! messages, delays them and partitions the nodes; every random choice (drops, delays, tick skew,
//! election timeouts, which nodes are cut off, which node crashes and for how long) comes from
//! one seeded PRNG, so a failing seed replays exactly:
//!
//! ```text
//! HERALD_SIM_SEED=<n> cargo test --test simulation -- --nocapture
//! ```
//!
//! `HERALD_SIM_SEEDS=<count>` runs seeds `1..=count` instead of the default 20;
//! `HERALD_SIM_TRACE=1` prints every seed's trace.
//!
//! Per seed: node 1 bootstraps and the test, as the operator, proposes the `Join`s of nodes 1–5 in
//! a random order (node 1's own `Join` is not always first, as when nodes start together);
//! every node runs the leader duties of `membership::service` (Raft configuration from
//! `voter_set`, then `SetPlacement`). The cluster is split 3/2 with the 3 holding a quorum of
//! voters: proposals on the 2 must fail (`NoLeader`/`Timeout`) without changing their state, while
//! proposals on the 3 commit. A random node crashes (sometimes with a proposal in flight) and
//! restarts on the same `MemStorage`. The partition heals, some failed proposals are retried, and
//! every node must converge to the same state, which must be the committed history.
//!
//! Invariants checked throughout: one leader per term; every index applies the same command on
//! every node; an `Ok(index)` answer names the entry that holds the proposed command; no index is
//! applied twice; no driver or helper task dies.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use herald::handler::SubscriptionKey;
use herald::membership::raft_node::{self, Apply, DriverConfig, Inbound, Outbound, ProposeError, RaftStatus};
use herald::membership::service::{membership_problems, next_conf_action, ConfAction};
use herald::membership::state::{command, Command, CommandError, MembershipState};
use herald::membership::storage::MemStorage;
use herald::placement::{NodeStatus, DEFAULT_LOAD_FACTOR};
use herald::subscription::{HandlerSpec, SubscriptionSpec};
use raft::prelude::{ConfChangeType, ConfState};
use tokio::sync::{mpsc, oneshot, watch, Notify};
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
    /// Every applied normal entry, by index, as first applied by any node.
    committed: Mutex<BTreeMap<u64, Vec<u8>>>,
    /// The leader of each term, as seen by the status watchers.
    leaders: Mutex<BTreeMap<u64, u64>>,
}

impl World {
    fn new() -> World {
        World {
            start: Instant::now(),
            trace: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            committed: Mutex::new(BTreeMap::new()),
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

    /// Whether the committed entry at `index` is `data` (an `Ok(index)` answer must name it).
    fn holds(&self, index: u64, data: &[u8]) -> bool {
        self.committed.lock().unwrap().get(&index).map(Vec::as_slice) == Some(data)
    }
}

/// The state every node should hold after applying the committed log up to `index`.
fn replay(world: &World, index: u64) -> MembershipState {
    let mut state = MembershipState::new(CLUSTER);
    for (&i, data) in world.committed.lock().unwrap().range(..=index) {
        let _ = state.apply_bytes(i, data);
    }
    state
}

// ---------------------------------------------------------------------------------------------
// The network

/// What became of a message (counted, and folded into the digest).
const SENT: u64 = 0;
const LOST: u64 = 1;
const CUT: u64 = 2;
const TO_DOWN_NODE: u64 = 3;
const DELIVERED: u64 = 4;

#[derive(Debug, Default)]
struct NetStats {
    sent: u64,
    lost: u64,
    cut: u64,
    to_down: u64,
    delivered: u64,
    digest: u64,
}

struct Net {
    world: Arc<World>,
    rng: Mutex<Rng>,
    drop_p: f64,
    max_delay_ms: u64,
    /// While partitioned: the majority side (messages between the sides are dropped).
    majority: Mutex<Option<BTreeSet<u64>>>,
    /// The running nodes' inboxes (a crashed node has none).
    inboxes: Mutex<BTreeMap<u64, mpsc::UnboundedSender<Inbound>>>,
    stats: Mutex<NetStats>,
}

impl Net {
    fn cut(&self, a: u64, b: u64) -> bool {
        match &*self.majority.lock().unwrap() {
            Some(side) => side.contains(&a) != side.contains(&b),
            None => false,
        }
    }

    fn note(&self, what: u64, from: u64, to: u64, extra: u64) {
        let ms = (Instant::now() - self.world.start).as_millis() as u64;
        let mut s = self.stats.lock().unwrap();
        match what {
            SENT => s.sent += 1,
            LOST => s.lost += 1,
            CUT => s.cut += 1,
            TO_DOWN_NODE => s.to_down += 1,
            _ => s.delivered += 1,
        }
        s.digest = fnv(s.digest, &[ms, what, from, to, extra]);
    }

    /// Delivers a message that has spent its delay on the wire.
    fn deliver(&self, from: u64, to: u64, msg: Inbound) {
        if self.cut(from, to) {
            self.note(CUT, from, to, 0);
            return;
        }
        let inbox = self.inboxes.lock().unwrap().get(&to).cloned();
        match inbox {
            Some(tx) if tx.send(msg).is_ok() => self.note(DELIVERED, from, to, 0),
            _ => self.note(TO_DOWN_NODE, from, to, 0),
        }
    }
}

/// Carries one driver's outbound messages: each is lost with probability `drop_p`, else delayed by
/// 0..=`max_delay_ms` and dropped if the sender and receiver are on different sides of a
/// partition when it is sent or when it arrives.
fn route(net: Arc<Net>, from: u64, mut out: mpsc::UnboundedReceiver<Outbound>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(m) = out.recv().await {
            let (to, msg, size) = match m {
                Outbound::Raft { to, bytes } => {
                    let n = bytes.len() as u64;
                    (to, Inbound::Raft { from, bytes }, n)
                }
                Outbound::Forward { to, origin, seq, data } => {
                    let n = data.len() as u64;
                    (
                        to,
                        Inbound::Forwarded {
                            from,
                            origin,
                            seq,
                            data,
                        },
                        n,
                    )
                }
                Outbound::Refuse { to, seq, error } => {
                    let n = error.len() as u64;
                    (to, Inbound::Refused { from, seq, error }, n)
                }
            };
            let (lost, delay) = {
                let mut rng = net.rng.lock().unwrap();
                (rng.chance(net.drop_p), rng.range(0, net.max_delay_ms))
            };
            net.note(SENT, from, to, size);
            if lost {
                net.note(LOST, from, to, 0);
                continue;
            }
            if net.cut(from, to) {
                net.note(CUT, from, to, 0);
                continue;
            }
            if !net.inboxes.lock().unwrap().contains_key(&to) {
                // What the real transport does when it cannot reach a peer.
                net.note(TO_DOWN_NODE, from, to, 0);
                let inbox = net.inboxes.lock().unwrap().get(&from).cloned();
                if let (Some(tx), Inbound::Raft { .. }) = (inbox, &msg) {
                    let _ = tx.send(Inbound::Unreachable(to));
                }
                continue;
            }
            let net = net.clone();
            tokio::spawn(async move {
                sleep(Duration::from_millis(delay)).await;
                net.deliver(from, to, msg);
            });
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The state machine as the driver sees it

struct SimApp {
    id: u64,
    state: MembershipState,
    /// What the test and the leader duties read.
    shared: Arc<Mutex<MembershipState>>,
    changed: Arc<Notify>,
    world: Arc<World>,
}

impl SimApp {
    fn publish(&self) {
        *self.shared.lock().unwrap() = self.state.clone();
        self.changed.notify_one();
    }
}

impl Apply for SimApp {
    fn apply(&mut self, index: u64, data: &[u8]) {
        let mismatch = {
            let mut log = self.world.committed.lock().unwrap();
            match log.get(&index) {
                Some(seen) => seen.as_slice() != data,
                None => {
                    log.insert(index, data.to_vec());
                    false
                }
            }
        };
        if mismatch {
            self.world.violation(format!(
                "state machine safety: node {} applied a different command at index {index} than another node",
                self.id
            ));
        }
        if let Err(e @ (CommandError::IndexNotAfterApplied { .. } | CommandError::Undecodable { .. })) =
            self.state.apply_bytes(index, data)
        {
            self.world.violation(format!("node {} at index {index}: {e}", self.id));
        }
        self.publish();
    }

    fn snapshot(&self) -> Vec<u8> {
        self.state.to_snapshot()
    }

    type Error = std::io::Error;

    fn restore(&mut self, data: &[u8]) -> Result<(), std::io::Error> {
        let state = MembershipState::from_snapshot(data).map_err(std::io::Error::other)?;
        if state.cluster_id() != CLUSTER {
            return Err(std::io::Error::other(format!(
                "snapshot of cluster {:?}",
                state.cluster_id()
            )));
        }
        self.state = state;
        self.publish();
        Ok(())
    }

    fn conf_changed(&mut self, _conf: &ConfState) {
        self.changed.notify_one();
    }
}

// ---------------------------------------------------------------------------------------------
// Talking to a driver

async fn propose(tx: &mpsc::UnboundedSender<Inbound>, data: Vec<u8>) -> Result<u64, ProposeError> {
    let (reply, answer) = oneshot::channel();
    tx.send(Inbound::Propose { data, reply })
        .map_err(|_| ProposeError::Stopped)?;
    answer.await.map_err(|_| ProposeError::Stopped)?
}

async fn conf_change(tx: &mpsc::UnboundedSender<Inbound>, id: u64, kind: ConfChangeType) -> Result<u64, ProposeError> {
    let (reply, answer) = oneshot::channel();
    tx.send(Inbound::ConfChange {
        change: raft_node::conf_change(id, kind),
        reply,
    })
    .map_err(|_| ProposeError::Stopped)?;
    answer.await.map_err(|_| ProposeError::Stopped)?
}

/// The leader duties of `membership::service`: one configuration change at a time towards
/// `voter_set(voters)`, then the placement.
async fn duties(
    world: Arc<World>,
    tx: mpsc::UnboundedSender<Inbound>,
    status: watch::Receiver<RaftStatus>,
    state: Arc<Mutex<MembershipState>>,
    changed: Arc<Notify>,
    voters: usize,
) {
    loop {
        let _ = timeout(Duration::from_millis(500), changed.notified()).await;
        let st = status.borrow().clone();
        if !st.is_leader {
            continue;
        }
        let state = state.lock().unwrap().clone();
        match next_conf_action(&state, &st, voters) {
            Some(ConfAction::Change(id, kind)) => {
                let r = conf_change(&tx, id, kind).await;
                world.event(format!("node {} duties: {kind:?} {id} -> {r:?}", st.id));
                if r.is_err() {
                    // As the real duties pause before a retry: a change that fails at once (a
                    // refused proposal) must not spin without letting virtual time advance.
                    sleep(Duration::from_millis(100)).await;
                }
                changed.notify_one();
                continue;
            }
            Some(ConfAction::TransferLeader(to)) => {
                world.event(format!("node {} duties: transfer leadership to {to}", st.id));
                let _ = tx.send(Inbound::TransferLeader(to));
                continue;
            }
            None if state.member(st.id).is_none() => continue,
            None => {}
        }
        if let Some(p) = state.proposed_placement(DEFAULT_LOAD_FACTOR) {
            let data = p.command().to_bytes();
            let r = propose(&tx, data.clone()).await;
            world.event(format!("node {} duties: placement epoch {} -> {r:?}", st.id, p.epoch));
            if let Ok(index) = r {
                if !world.holds(index, &data) {
                    world.violation(format!(
                        "node {}: placement epoch {} was answered Ok({index}) but another command is at that index",
                        st.id, p.epoch
                    ));
                }
            }
            changed.notify_one();
        }
    }
}

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

// ---------------------------------------------------------------------------------------------
// The simulated cluster

struct Node {
    storage: MemStorage,
    state: Arc<Mutex<MembershipState>>,
    tx: mpsc::UnboundedSender<Inbound>,
    status: watch::Receiver<RaftStatus>,
    /// `None` while crashed.
    driver: Option<JoinHandle<()>>,
    /// Router, leader duties, status watcher.
    helpers: Vec<JoinHandle<()>>,
}

/// Where a proposal that must commit is made.
enum Target {
    Leader,
    Node(u64),
    AnyOf(Vec<u64>),
}

struct Sim {
    world: Arc<World>,
    net: Arc<Net>,
    rng: Rng,
    voters: usize,
    handlers: BTreeMap<u64, Vec<String>>,
    nodes: BTreeMap<u64, Node>,
    next_topic: u64,
    /// The applied index at which each node's state was last compared with the committed log.
    verified: BTreeMap<u64, u64>,
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

fn join_command(id: u64, handlers: &[String]) -> Command {
    Command::join(
        id,
        format!("10.0.0.{id}:8080"),
        format!("10.0.0.{id}:7946"),
        handlers.iter().cloned(),
    )
}

fn key(topic: &str) -> SubscriptionKey {
    SubscriptionKey {
        topic: topic.to_string(),
        group: "g".to_string(),
    }
}

/// The topic of a `Subscribe` entry.
fn subscribed_topic(data: &[u8]) -> Option<String> {
    match Command::from_bytes(data).ok()?.kind? {
        command::Kind::Subscribe(rec) => Some(rec.topic),
        _ => None,
    }
}

impl Sim {
    /// Starts (or restarts) node `id` on `storage`, with a fresh state machine that the driver
    /// restores from the storage's snapshot.
    fn start(&mut self, id: u64, storage: MemStorage) -> Result<(), String> {
        let mut config = DriverConfig::new(id);
        // Skewed clocks and distinct election timeouts, all from the seed.
        config.tick = Duration::from_millis(self.rng.range(90, 110));
        config.election_ticks = self.rng.range(10, 19) as usize;
        // raft-rs would randomize the timeout with its own, unseeded RNG.
        config.max_election_ticks = config.election_ticks + 1;
        config.heartbeat_ticks = 2;
        config.propose_timeout = PROPOSE_TIMEOUT;
        config.snapshot_every = self.rng.range(3, 12);
        let state = Arc::new(Mutex::new(MembershipState::new(CLUSTER)));
        let changed = Arc::new(Notify::new());
        let app = SimApp {
            id,
            state: MembershipState::new(CLUSTER),
            shared: state.clone(),
            changed: changed.clone(),
            world: self.world.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        self.net.inboxes.lock().unwrap().insert(id, tx.clone());
        let (status, driver) = raft_node::spawn(config.clone(), storage.clone(), app, id == 1, rx, out_tx)
            .map_err(|e| format!("node {id} does not start: {e}"))?;
        self.world.event(format!(
            "node {id} starts (tick {:?}, election {} ticks, snapshot every {}) at applied index {}",
            config.tick,
            config.election_ticks,
            config.snapshot_every,
            state.lock().unwrap().applied_index()
        ));
        let helpers = vec![
            route(self.net.clone(), id, out_rx),
            tokio::spawn(duties(
                self.world.clone(),
                tx.clone(),
                status.clone(),
                state.clone(),
                changed,
                self.voters,
            )),
            tokio::spawn(watch_status(self.world.clone(), id, status.clone())),
        ];
        self.nodes.insert(
            id,
            Node {
                storage,
                state,
                tx,
                status,
                driver: Some(driver),
                helpers,
            },
        );
        Ok(())
    }

    /// Kills node `id`'s driver and helpers (its storage survives, as a disk would).
    async fn crash(&mut self, id: u64) {
        self.net.inboxes.lock().unwrap().remove(&id);
        let node = self.nodes.get_mut(&id).expect("a node");
        for h in node.helpers.drain(..) {
            h.abort();
        }
        if let Some(driver) = node.driver.take() {
            driver.abort();
            let _ = driver.await;
        }
        self.verified.remove(&id);
        self.world.event(format!("node {id} crashes"));
    }

    fn up(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.driver.is_some())
            .map(|(&id, _)| id)
            .collect()
    }

    fn state(&self, id: u64) -> MembershipState {
        self.nodes[&id].state.lock().unwrap().clone()
    }

    fn status(&self, id: u64) -> RaftStatus {
        self.nodes[&id].status.borrow().clone()
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
            if let Some(driver) = node.driver.as_mut() {
                if let Some(r) = driver.now_or_never() {
                    let why = match r {
                        Ok(()) => "it returned".to_string(),
                        Err(e) if e.is_panic() => panic_message(e.into_panic()),
                        Err(e) => e.to_string(),
                    };
                    self.world.violation(format!("the driver of node {id} stopped: {why}"));
                    node.driver = None;
                }
            }
            if node.helpers.iter().any(JoinHandle::is_finished) {
                self.world.violation(format!("a helper task of node {id} stopped"));
                node.helpers.retain(|h| !h.is_finished());
            }
        }
        // Every node's state is the committed log replayed up to its applied index (a restarted
        // node's restored state included).
        for id in self.up() {
            let state = self.state(id);
            if self.verified.get(&id) != Some(&state.applied_index()) {
                self.verified.insert(id, state.applied_index());
                if state != replay(&self.world, state.applied_index()) {
                    self.world.violation(format!(
                        "node {id}'s state at applied index {} is not the committed log replayed: {state:?}",
                        state.applied_index()
                    ));
                }
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
            if node.driver.is_none() {
                s += &format!("\n  node {id}: down");
                continue;
            }
            let st = self.status(id);
            let state = self.state(id);
            s += &format!(
                "\n  node {id}: leader {} term {} commit {} applied {} voters {:?} learners {:?}; state: applied {} members {:?} subscriptions {} epoch {}",
                st.leader,
                st.term,
                st.commit,
                st.applied,
                st.voters,
                st.learners,
                state.applied_index(),
                state.members().keys().collect::<Vec<_>>(),
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

    /// Every node is up, follows one leader, has applied everything it committed, and holds the
    /// same state; the leader duties have nothing left to do.
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
            || !membership_problems(&state, &ls).is_empty()
            || !want.voters.iter().all(|v| ls.voters.contains(v))
            || next_conf_action(&state, &ls, self.voters).is_some()
            || state.proposed_placement(DEFAULT_LOAD_FACTOR).is_some()
        {
            return false;
        }
        self.nodes.keys().all(|&id| {
            let st = self.status(id);
            st.leader == leader
                && st.term == ls.term
                && st.commit == ls.commit
                && st.applied == ls.commit
                && self.state(id) == state
        })
    }

    async fn propose_on(&mut self, id: u64, cmd: &Command) -> Result<Result<u64, ProposeError>, String> {
        let tx = self.nodes[&id].tx.clone();
        let data = cmd.to_bytes();
        match timeout(PROPOSE_TIMEOUT * 3, propose(&tx, data.clone())).await {
            Ok(Ok(index)) => {
                if !self.world.holds(index, &data) {
                    self.world.violation(format!(
                        "node {id} answered Ok({index}) to a {} proposal, but another command is at that index",
                        cmd.name()
                    ));
                }
                Ok(Ok(index))
            }
            Ok(r) => Ok(r),
            Err(_) => Err(format!(
                "a proposal on node {id} got no answer within {:?}",
                PROPOSE_TIMEOUT * 3
            )),
        }
    }

    /// Proposes `cmd` until it commits (a client retrying).
    async fn commit(&mut self, label: &str, target: Target, cmd: &Command) -> Result<u64, String> {
        let end = Instant::now() + COMMIT_DEADLINE;
        loop {
            self.check()?;
            let on = match &target {
                Target::Leader => self.leader(),
                Target::Node(id) => Some(*id),
                Target::AnyOf(ids) => Some(self.rng.pick(ids)),
            };
            if let Some(id) = on {
                let r = self.propose_on(id, cmd).await?;
                self.world.event(format!("{label} on node {id} -> {r:?}"));
                if let Ok(index) = r {
                    self.check()?;
                    return Ok(index);
                }
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

    // 1. Node 1 bootstraps; the operator joins every node in a random order; the leader duties
    //    add them as voters or learners and place the subscriptions.
    for &id in &ids {
        sim.start(id, MemStorage::new())?;
    }
    sim.until("node 1 to lead", Duration::from_secs(10), |s| s.status(1).is_leader)
        .await?;
    let mut order: Vec<u64> = ids.clone();
    // Node 1's own `Join` may come after others' (nodes started together with one
    // `--join` list); the leader must then wait for it rather than follow a table without it.
    sim.rng.shuffle(&mut order);
    sim.world.event(format!("join order {order:?}, {} voters", sim.voters));
    for &id in &order {
        let cmd = join_command(id, &sim.handlers[&id]);
        sim.commit(&format!("join {id}"), Target::Leader, &cmd).await?;
    }
    for _ in 0..sim.rng.range(1, 3) {
        let topic = sim.new_topic("init");
        let s = spec(&topic, sim.rng.range(1, 3) as u32);
        sim.commit(
            &format!("subscribe {topic}"),
            Target::AnyOf(ids.clone()),
            &Command::subscribe(&s),
        )
        .await?;
        ledger.committed.insert(topic, s);
    }
    sim.until("the cluster to settle", SETTLE_DEADLINE, Sim::settled)
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
    *sim.net.majority.lock().unwrap() = Some(majority.clone());
    sim.world
        .event(format!("partition: majority {majority_ids:?}, minority {minority:?}"));

    let minority_proposals = sim.rng.range(1, 3);
    let majority_proposals = sim.rng.range(1, 3);
    let mut sides: Vec<bool> = (0..minority_proposals)
        .map(|_| false)
        .chain((0..majority_proposals).map(|_| true))
        .collect();
    sim.rng.shuffle(&mut sides);
    for on_majority in sides {
        if on_majority {
            let topic = sim.new_topic("major");
            let s = spec(&topic, sim.rng.range(1, 3) as u32);
            sim.commit(
                &format!("subscribe {topic}"),
                Target::AnyOf(majority_ids.clone()),
                &Command::subscribe(&s),
            )
            .await?;
            ledger.committed.insert(topic, s);
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
    for (&id, state) in &before {
        if sim.state(id) != *state {
            return Err(format!(
                "minority node {id}'s state changed during the partition:{}",
                sim.describe()
            ));
        }
    }

    // 3. Crash a random node, sometimes with a proposal of its own in flight, and restart it on
    //    the same storage after a random downtime.
    let victim = sim.rng.pick(&ids);
    if sim.rng.chance(0.5) {
        let topic = sim.new_topic("inflight");
        let tx = sim.nodes[&victim].tx.clone();
        let data = Command::subscribe(&spec(&topic, 1)).to_bytes();
        sim.world
            .event(format!("subscribe {topic} on node {victim}, in flight when it crashes"));
        tokio::spawn(async move {
            let _ = propose(&tx, data).await;
        });
        if majority.contains(&victim) {
            ledger.unknown.insert(topic);
        } else {
            ledger.failed.insert(topic);
        }
        sleep(Duration::from_millis(sim.rng.range(0, 60))).await;
    }
    sim.crash(victim).await;
    sleep(Duration::from_millis(sim.rng.range(0, 3000))).await;
    let storage = sim.nodes[&victim].storage.clone();
    sim.start(victim, storage.clone())?;
    // The driver restored a fresh state from the storage's snapshot (and replays the log after it
    // once it runs).
    let snapshot = raft::Storage::snapshot(&storage, 0, victim).map_err(|e| format!("no snapshot: {e}"))?;
    let restored = MembershipState::from_snapshot(&snapshot.data).map_err(|e| e.to_string())?;
    if sim.state(victim) != restored {
        return Err(format!(
            "restarted node {victim} did not restore its snapshot: {:?}",
            sim.state(victim)
        ));
    }
    sim.check()?;
    // A client retries on the restarted node at once.
    let topic = sim.new_topic("restarted");
    let s = spec(&topic, 1);
    if majority.contains(&victim) {
        sim.commit(
            &format!("subscribe {topic}"),
            Target::Node(victim),
            &Command::subscribe(&s),
        )
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
    let topic = sim.new_topic("major");
    let s = spec(&topic, sim.rng.range(1, 3) as u32);
    sim.commit(
        &format!("subscribe {topic}"),
        Target::AnyOf(majority_ids.clone()),
        &Command::subscribe(&s),
    )
    .await?;
    ledger.committed.insert(topic, s);
    for (&id, state) in &before {
        // A restarted minority node restores the same state from its snapshot and log.
        if sim.state(id) != *state {
            return Err(format!(
                "minority node {id}'s state changed during the partition:{}",
                sim.describe()
            ));
        }
    }

    // 4. Heal; retry some of the failed proposals; everything converges to the committed history.
    *sim.net.majority.lock().unwrap() = None;
    sim.world.event("partition healed");
    let failed: Vec<String> = ledger.failed.iter().cloned().collect();
    for topic in failed {
        if sim.rng.chance(0.5) {
            let s = spec(&topic, 1);
            sim.commit(
                &format!("retry {topic}"),
                Target::AnyOf(ids.clone()),
                &Command::subscribe(&s),
            )
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
    let leader = sim.leader().expect("settled");
    let state = sim.state(leader);
    let bytes: Vec<u64> = state.to_snapshot().into_iter().map(u64::from).collect();
    sim.world.event(format!(
        "converged: leader {leader} term {}, applied index {}, epoch {}, state digest {:016x}, subscriptions {:?}",
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

    // Every node holds the committed history...
    let history = replay(&sim.world, state.applied_index());
    if state != history {
        return Err(format!(
            "the converged state is not the committed log replayed:\n  state:   {state:?}\n  history: {history:?}"
        ));
    }
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
            || m.peer != format!("10.0.0.{id}:7946")
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
    for data in sim.world.committed.lock().unwrap().values() {
        if let Some(topic) = subscribed_topic(data) {
            if ledger.failed.contains(&topic) {
                return Err(format!("failed proposal {topic} was committed to the log"));
            }
        }
    }
    // ... and a placement of every instance.
    for (k, s) in state.subscriptions() {
        if state.placement_of(k).len() != s.instances as usize {
            return Err(format!(
                "subscription {} has {} instances placed, wants {}",
                k.topic,
                state.placement_of(k).len(),
                s.instances
            ));
        }
    }
    if state.epoch() == 0 {
        return Err("no placement was ever committed".into());
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
        max_delay_ms: rng.range(1, 40),
        majority: Mutex::new(None),
        inboxes: Mutex::new(BTreeMap::new()),
        stats: Mutex::new(NetStats::default()),
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
        "seed {seed}: drop {:.2}, delay 0..={} ms, {voters} voters",
        net.drop_p, net.max_delay_ms
    ));
    let mut sim = Sim {
        world: world.clone(),
        net: net.clone(),
        rng,
        voters,
        handlers,
        nodes: BTreeMap::new(),
        next_topic: 0,
        verified: BTreeMap::new(),
    };
    let mut error = scenario(&mut sim).await.err();
    if error.is_none() {
        error = sim.check().err();
    }
    let stats = net.stats.lock().unwrap();
    world.event(format!(
        "network: {} sent, {} lost, {} cut by the partition, {} to a down node, {} delivered, digest {:016x}",
        stats.sent, stats.lost, stats.cut, stats.to_down, stats.delivered, stats.digest
    ));
    error
}

/// Runs one seed on its own single-threaded runtime with paused time.
fn run_seed(seed: u64) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let world = runtime.block_on(async { Arc::new(World::new()) });
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| runtime.block_on(simulate(seed, world.clone()))));
    let error = match run {
        Ok(error) => error,
        Err(p) => Some(format!("panicked: {}", panic_message(p))),
    };
    drop(runtime);
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
