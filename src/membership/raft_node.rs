//! The Raft driver: one task owns the `raft::RawNode` and does all of its I/O.
//!
//! Shaped like raft-rs's `five_mem_node` example: the loop ticks on a timer, steps inbound
//! messages, proposes, and on every `Ready` persists entries and hard state to the log store,
//! hands outbound messages to the network, applies committed entries to the application state
//! machine, and advances. Nothing else touches the `RawNode`, so there is no locking.
//!
//! The driver knows neither sockets nor the membership table: the network is a pair of channels
//! ([`Inbound`] in, [`Outbound`] out) and the application is the [`Apply`] trait. That keeps it
//! testable with plain channels and lets a network simulator stand in for the transport.
//!
//! Proposals: a proposal made on the leader is proposed directly; on a follower it is forwarded
//! to the leader ([`Outbound::Forward`]), which proposes it on the follower's behalf. Either way
//! the entry carries an 16-byte context `(origin node id, sequence)`; every node applies every
//! entry, so the origin learns that its proposal committed when it applies an entry with its own
//! context, without a reply message. A proposal that does not commit within the timeout fails.

use std::collections::HashMap;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
// Tokio's clock, like the tick timer: proposal deadlines must follow the same (possibly paused)
// time as the ticks, or a simulation with virtual time never times a proposal out.
use tokio::time::Instant;

use super::storage::RaftLogStore;

/// What the driver applies committed entries to (the membership state machine).
pub trait Apply: Send + 'static {
    /// Applies one committed normal entry at `index`.
    fn apply(&mut self, index: u64, data: &[u8]);
    /// The whole state, for a Raft snapshot.
    fn snapshot(&self) -> Vec<u8>;
    /// Why a snapshot could not be restored.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Replaces the state with a snapshot's.
    fn restore(&mut self, data: &[u8]) -> Result<(), Self::Error>;
    /// The voter set changed (after a committed configuration change).
    fn conf_changed(&mut self, _conf: &ConfState) {}
}

/// Driver settings.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// This node's Raft id (the node id).
    pub id: u64,
    /// One Raft tick.
    pub tick: Duration,
    /// Ticks without a leader heartbeat before a follower campaigns.
    pub election_ticks: usize,
    /// The exclusive upper bound of the election timeout raft-rs draws (at random, in
    /// `election_ticks..max_election_ticks`) after every election; 0 = `2 * election_ticks`.
    /// raft-rs draws it from its own unseeded RNG, so a deterministic simulation sets
    /// `election_ticks + 1` and varies `election_ticks` per node from its seed instead.
    pub max_election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// How long a proposal may take to commit before it fails.
    pub propose_timeout: Duration,
    /// Applied entries between snapshots (then the log is compacted).
    pub snapshot_every: u64,
}

impl DriverConfig {
    /// Defaults for node `id`: 100 ms ticks, election after 1–2 s of silence, heartbeats every
    /// 200 ms.
    pub fn new(id: u64) -> Self {
        DriverConfig {
            id,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            max_election_ticks: 0,
            heartbeat_ticks: 2,
            propose_timeout: Duration::from_secs(5),
            snapshot_every: 1000,
        }
    }
}

/// Why a proposal failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known (an election is under way, or this node is cut off from the majority).
    #[error("no Raft leader is known yet; retry shortly")]
    NoLeader,
    /// The proposal did not commit in time.
    #[error("the proposal did not commit within {0:?}")]
    Timeout(Duration),
    /// Raft refused it (e.g. a configuration change while another is pending).
    #[error("raft refused the proposal: {0}")]
    Refused(String),
    /// The driver has stopped.
    #[error("the membership driver has stopped")]
    Stopped,
}

/// Messages into the driver.
pub enum Inbound {
    /// A Raft message from a peer (serialized `eraftpb::Message`).
    Raft(Vec<u8>),
    /// A proposal forwarded by follower `origin` with its sequence number.
    Forwarded {
        /// The follower that made the proposal.
        origin: u64,
        /// The follower's proposal sequence number (0: it expects no answer, as for a joining
        /// node's `Join`).
        seq: u64,
        /// The command.
        data: Vec<u8>,
    },
    /// Propose a command; the reply comes once it is committed and applied on this node.
    Propose {
        /// The command.
        data: Vec<u8>,
        /// Answered with the entry's index.
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    /// Propose a configuration change (leader only).
    ConfChange {
        /// The change.
        change: ConfChange,
        /// Answered once committed and applied.
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    /// The transport could not reach a peer (raft-rs then backs off probing it).
    Unreachable(u64),
    /// Start an election now, as a leadership transfer would (voters grant it even while their
    /// leader lease has not expired): the leader `gone` is known dead, so waiting out the
    /// election timeout would only delay the failover.
    Campaign {
        /// The leader that is gone (only acted on while it is still this node's leader).
        gone: u64,
    },
    /// Hand leadership to voter `to` (leader only; raft-rs sends it `MsgTimeoutNow` once its log
    /// has caught up). A leader that left the membership table does this, so that the next
    /// leader removes it: a raft-rs leader that removes itself keeps leading and drops every
    /// proposal, forever.
    TransferLeader(u64),
}

/// Messages out of the driver, for the transport.
#[derive(Debug)]
pub enum Outbound {
    /// A serialized Raft message for peer `to`.
    Raft {
        /// Destination node.
        to: u64,
        /// `eraftpb::Message` bytes.
        bytes: Vec<u8>,
    },
    /// A proposal to forward to the leader `to`.
    Forward {
        /// The leader.
        to: u64,
        /// The node that made the proposal (this node, or a follower whose forward is relayed
        /// after leadership moved): its context is what answers the proposer.
        origin: u64,
        /// The proposer's sequence number.
        seq: u64,
        /// The command.
        data: Vec<u8>,
    },
}

/// What the driver publishes after every step, for status APIs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// This node.
    pub id: u64,
    /// The known leader (0 = none).
    pub leader: u64,
    /// Current term.
    pub term: u64,
    /// Highest committed index.
    pub commit: u64,
    /// Highest applied index.
    pub applied: u64,
    /// Whether this node leads.
    pub is_leader: bool,
    /// Current voters.
    pub voters: Vec<u64>,
    /// Current learners.
    pub learners: Vec<u64>,
}

/// A pending local proposal.
struct Pending {
    reply: oneshot::Sender<Result<u64, ProposeError>>,
    deadline: Instant,
}

/// Encodes `(origin, seq)` as an entry context.
fn context(origin: u64, seq: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(16);
    c.extend_from_slice(&origin.to_be_bytes());
    c.extend_from_slice(&seq.to_be_bytes());
    c
}

/// Where this run of the driver starts numbering its proposals: at random, because a restarted
/// node's earlier proposals may still be committed, or applied here, after the restart; counting
/// from 1 again, their `(origin, seq)` contexts would answer the new run's proposals with the old
/// proposals' indexes. Never 0 (see [`Inbound::Forwarded`]).
fn first_seq() -> u64 {
    (rand::random::<u64>() >> 1) | 1
}

fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    let origin = u64::from_be_bytes(c.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(c.get(8..16)?.try_into().ok()?);
    Some((origin, seq))
}

/// The driver's state, owned by its task.
struct Driver<S: RaftLogStore + Clone, A: Apply> {
    node: RawNode<S>,
    app: A,
    config: DriverConfig,
    out: mpsc::UnboundedSender<Outbound>,
    status: watch::Sender<RaftStatus>,
    pending: HashMap<u64, Pending>,
    next_seq: u64,
    /// Index of the last snapshot taken (compaction point).
    snapshot_index: u64,
    /// A configuration change was applied: snapshot at once. raft-rs refuses a snapshot whose
    /// configuration does not include the receiving node, so a node added after the last
    /// snapshot could otherwise never catch up.
    snapshot_due: bool,
    /// Set when this node must stop: why (logged once, then the driver ends).
    fatal: Option<String>,
}

/// Starts the driver on the current tokio runtime. `bootstrap` makes this node the sole voter of a
/// brand-new cluster when its log is empty; otherwise it waits to be added by a leader.
pub fn spawn<S, A>(
    config: DriverConfig,
    storage: S,
    mut app: A,
    bootstrap: bool,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    out: mpsc::UnboundedSender<Outbound>,
) -> Result<(watch::Receiver<RaftStatus>, tokio::task::JoinHandle<()>), raft::Error>
where
    S: RaftLogStore + Clone + Send + 'static,
    A: Apply,
{
    let state = storage.initial_state()?;
    let fresh = state.hard_state.term == 0 && state.conf_state.voters.is_empty() && storage.last_index()? == 0;
    if fresh && bootstrap {
        let conf = ConfState {
            voters: vec![config.id],
            ..Default::default()
        };
        // A snapshot at index 1 carrying the configuration and the empty application state, so
        // every later member learns the initial configuration from the log/snapshot.
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().set_conf_state(conf);
        snap.data = app.snapshot().into();
        storage.apply_snapshot(snap).map_err(raft::Error::from)?;
    }
    let snapshot = storage.snapshot(0, config.id);
    let mut applied = 0;
    if let Ok(snap) = &snapshot {
        let index = snap.get_metadata().index;
        if index > 0 {
            app.restore(&snap.data)
                .map_err(|e| raft::Error::Store(raft::StorageError::Other(Box::new(e))))?;
            applied = index;
        }
    }
    let raft_config = raft::Config {
        id: config.id,
        election_tick: config.election_ticks,
        max_election_tick: config.max_election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    raft_config.validate()?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let node = RawNode::new(&raft_config, storage, &logger)?;
    let (status_tx, status_rx) = watch::channel(RaftStatus {
        id: config.id,
        ..Default::default()
    });
    let mut driver = Driver {
        node,
        app,
        config,
        out,
        status: status_tx,
        pending: HashMap::new(),
        next_seq: first_seq(),
        snapshot_index: applied,
        snapshot_due: false,
        fatal: None,
    };
    // A node that is the only voter need not wait an election timeout to lead.
    let conf = driver.node.raft.prs().conf().to_conf_state();
    if conf.voters == [driver.config.id] {
        let _ = driver.node.campaign();
    }
    let handle = tokio::spawn(async move { driver.run(inbound).await });
    Ok((status_rx, handle))
}

impl<S: RaftLogStore + Clone, A: Apply> Driver<S, A> {
    async fn run(&mut self, mut inbound: mpsc::UnboundedReceiver<Inbound>) {
        let mut ticker = tokio::time::interval(self.config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // A fixed order, not tokio's random one: with the same inputs, the same run.
                biased;
                _ = ticker.tick() => {
                    self.node.tick();
                    self.expire_pending();
                }
                msg = inbound.recv() => match msg {
                    Some(m) => {
                        self.handle(m);
                        // Take everything already queued before the next Ready (batching).
                        while let Ok(m) = inbound.try_recv() {
                            self.handle(m);
                        }
                    }
                    None => break,
                },
            }
            if let Some(why) = &self.fatal {
                tracing::error!("{why}; stopping the membership driver");
                break;
            }
            if let Err(e) = self.on_ready() {
                tracing::error!(error = %e, "raft storage failed; stopping the membership driver");
                break;
            }
            self.publish_status();
        }
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(ProposeError::Stopped));
        }
    }

    fn handle(&mut self, m: Inbound) {
        match m {
            Inbound::Raft(bytes) => match Message::parse_from_bytes(&bytes) {
                Ok(msg) if lost_log(&msg, self.node.raft.raft_log.last_index()) => {
                    // raft-rs would panic on this ("to_commit out of range"): a leader believes
                    // this node holds entries its log does not have.
                    self.fatal.get_or_insert_with(|| {
                        format!(
                            "node {id}'s Raft log is empty or behind what the leader (node {leader}) knows it \
                             acknowledged (commit index {commit}, last index here {last}): its data dir was lost \
                             or replaced. A voter must not forget its log: remove the old member \
                             (DELETE /v1/cluster/nodes/{id}) and start this node again, or restore its data dir",
                            id = self.config.id,
                            leader = msg.from,
                            commit = msg.commit,
                            last = self.node.raft.raft_log.last_index()
                        )
                    });
                }
                Ok(msg) => {
                    if let Err(e) = self.node.step(msg) {
                        tracing::debug!(error = %e, "raft step refused a message");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "undecodable raft message dropped"),
            },
            Inbound::Forwarded { origin, seq, data } => {
                if self.node.raft.state == StateRole::Leader {
                    if let Err(e) = self.node.propose(context(origin, seq), data) {
                        tracing::debug!(error = %e, origin, "forwarded proposal refused");
                    }
                } else if self.node.raft.leader_id != 0 && self.node.raft.leader_id != origin {
                    // Leadership moved: pass it on rather than let the origin time out.
                    let _ = self.out.send(Outbound::Forward {
                        to: self.node.raft.leader_id,
                        origin,
                        seq,
                        data,
                    });
                }
            }
            Inbound::Propose { data, reply } => self.propose(data, reply),
            Inbound::ConfChange { change, reply } => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(ProposeError::NoLeader));
                    return;
                }
                let seq = self.register(reply);
                if let Err(e) = self.node.propose_conf_change(context(self.config.id, seq), change) {
                    self.fail(seq, ProposeError::Refused(e.to_string()));
                }
            }
            Inbound::Unreachable(peer) => self.node.report_unreachable(peer),
            Inbound::TransferLeader(to) => {
                if self.node.raft.state == StateRole::Leader && to != self.config.id {
                    self.node.transfer_leader(to);
                }
            }
            Inbound::Campaign { gone } => {
                if self.node.raft.leader_id != gone || self.node.raft.state == StateRole::Leader {
                    return;
                }
                // A local MsgTimeoutNow (term 0) makes a follower campaign with the transfer
                // context, which voters honour without waiting for their lease to expire.
                let mut m = Message::default();
                m.set_msg_type(MessageType::MsgTimeoutNow);
                m.to = self.config.id;
                m.from = gone;
                if let Err(e) = self.node.step(m) {
                    tracing::debug!(error = %e, "could not start an early election");
                } else {
                    tracing::info!(leader = gone, "the leader's process is gone; starting an election now");
                }
            }
        }
    }

    fn register(&mut self, reply: oneshot::Sender<Result<u64, ProposeError>>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(
            seq,
            Pending {
                reply,
                deadline: Instant::now() + self.config.propose_timeout,
            },
        );
        seq
    }

    fn fail(&mut self, seq: u64, e: ProposeError) {
        if let Some(p) = self.pending.remove(&seq) {
            let _ = p.reply.send(Err(e));
        }
    }

    fn propose(&mut self, data: Vec<u8>, reply: oneshot::Sender<Result<u64, ProposeError>>) {
        let leader = self.node.raft.leader_id;
        if leader == 0 {
            let _ = reply.send(Err(ProposeError::NoLeader));
            return;
        }
        let seq = self.register(reply);
        if leader == self.config.id {
            if let Err(e) = self.node.propose(context(self.config.id, seq), data) {
                self.fail(seq, ProposeError::Refused(e.to_string()));
            }
        } else {
            let _ = self.out.send(Outbound::Forward {
                to: leader,
                origin: self.config.id,
                seq,
                data,
            });
        }
    }

    fn expire_pending(&mut self) {
        let now = Instant::now();
        let mut expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        // In proposal order (not the map's random order), so that runs replay.
        expired.sort_unstable();
        for seq in expired {
            self.fail(seq, ProposeError::Timeout(self.config.propose_timeout));
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            match m.write_to_bytes() {
                Ok(bytes) => {
                    let _ = self.out.send(Outbound::Raft { to: m.to, bytes });
                }
                Err(e) => tracing::error!(error = %e, "cannot encode a raft message"),
            }
            if m.get_msg_type() == MessageType::MsgSnapshot {
                // raft-rs sends a follower nothing more until the snapshot is reported, and the
                // transport gives no delivery report: were this message lost, the follower would
                // never catch up. Report it handed over; the leader then probes the follower and
                // sends a new snapshot if it still needs one.
                self.node.report_snapshot(m.to, SnapshotStatus::Finish);
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), raft::Error> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.app
                .restore(&snap.data)
                .map_err(|e| raft::Error::Store(raft::StorageError::Other(Box::new(e))))?;
            self.snapshot_index = snap.get_metadata().index;
            self.node.store().apply_snapshot(snap)?;
        }
        self.apply(ready.take_committed_entries())?;
        self.node.store().persist(ready.entries(), ready.hs())?;
        self.send(ready.take_persisted_messages());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.node.store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        self.maybe_snapshot()?;
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), raft::Error> {
        for entry in entries {
            if entry.data.is_empty() && entry.get_entry_type() == EntryType::EntryNormal {
                // The empty entry a new leader appends: nothing to apply.
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.app.apply(entry.index, &entry.data),
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|e| raft::Error::Store(raft::StorageError::Other(e.into())))?;
                    let conf = self.node.apply_conf_change(&cc)?;
                    self.node.store().set_conf_state(conf.clone())?;
                    self.app.conf_changed(&conf);
                    self.snapshot_due = true;
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = raft::prelude::ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|e| raft::Error::Store(raft::StorageError::Other(e.into())))?;
                    let conf = self.node.apply_conf_change(&cc)?;
                    self.node.store().set_conf_state(conf.clone())?;
                    self.app.conf_changed(&conf);
                    self.snapshot_due = true;
                }
            }
            if let Some((origin, seq)) = parse_context(&entry.context) {
                if origin == self.config.id {
                    if let Some(p) = self.pending.remove(&seq) {
                        let _ = p.reply.send(Ok(entry.index));
                    }
                }
            }
        }
        Ok(())
    }

    fn maybe_snapshot(&mut self) -> Result<(), raft::Error> {
        let applied = self.node.raft.raft_log.applied;
        if applied <= self.snapshot_index
            || (!self.snapshot_due && applied < self.snapshot_index + self.config.snapshot_every)
        {
            return Ok(());
        }
        self.snapshot_due = false;
        let conf = self.node.raft.prs().conf().to_conf_state();
        self.node.store().create_snapshot(applied, conf, self.app.snapshot())?;
        self.node.store().compact(applied)?;
        self.snapshot_index = applied;
        Ok(())
    }

    fn publish_status(&self) {
        let raft = &self.node.raft;
        let conf = raft.prs().conf().to_conf_state();
        let status = RaftStatus {
            id: self.config.id,
            leader: raft.leader_id,
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: raft.raft_log.applied,
            is_leader: raft.state == StateRole::Leader,
            voters: conf.voters.clone(),
            learners: conf.learners.clone(),
        };
        self.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }
}

/// A configuration change adding `id` as a voter or a learner, or removing it.
pub fn conf_change(id: u64, kind: ConfChangeType) -> ConfChange {
    let mut cc = ConfChange {
        node_id: id,
        ..Default::default()
    };
    cc.set_change_type(kind);
    cc
}

/// Whether `msg` shows that this node lost its log: a leader's heartbeat carries
/// `min(what this node acknowledged, committed)`, which can exceed our last index only if entries
/// we acknowledged are gone.
fn lost_log(msg: &Message, last_index: u64) -> bool {
    msg.get_msg_type() == MessageType::MsgHeartbeat && msg.commit > last_index
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::storage::MemStorage;
    use std::sync::{Arc, Mutex};

    /// A log of applied commands, shared with the test.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Apply for Log {
        fn apply(&mut self, _index: u64, data: &[u8]) {
            self.0.lock().unwrap().push(data.to_vec());
        }
        fn snapshot(&self) -> Vec<u8> {
            serde_json::to_vec(&*self.0.lock().unwrap()).unwrap()
        }
        type Error = serde_json::Error;
        fn restore(&mut self, data: &[u8]) -> Result<(), serde_json::Error> {
            *self.0.lock().unwrap() = serde_json::from_slice(data)?;
            Ok(())
        }
    }

    struct TestNode {
        tx: mpsc::UnboundedSender<Inbound>,
        status: watch::Receiver<RaftStatus>,
        log: Log,
        task: tokio::task::JoinHandle<()>,
    }

    /// Starts `n` drivers wired by an in-memory router that drops traffic to and from nodes in
    /// `down`.
    fn cluster(n: u64, down: Arc<Mutex<Vec<u64>>>) -> HashMap<u64, TestNode> {
        let mut nodes = HashMap::new();
        let mut outs = Vec::new();
        for id in 1..=n {
            let (tx, rx) = mpsc::unbounded_channel();
            let (out_tx, out_rx) = mpsc::unbounded_channel();
            let log = Log::default();
            let mut config = DriverConfig::new(id);
            config.tick = Duration::from_millis(10);
            config.snapshot_every = 10;
            let storage = MemStorage::new();
            let (status, task) = spawn(config, storage, log.clone(), id == 1, rx, out_tx).unwrap();
            nodes.insert(id, TestNode { tx, status, log, task });
            outs.push((id, out_rx));
        }
        let txs: HashMap<u64, mpsc::UnboundedSender<Inbound>> =
            nodes.iter().map(|(id, n)| (*id, n.tx.clone())).collect();
        for (from, mut out_rx) in outs {
            let txs = txs.clone();
            let down = down.clone();
            tokio::spawn(async move {
                while let Some(m) = out_rx.recv().await {
                    let d = down.lock().unwrap().clone();
                    let (to, msg) = match m {
                        Outbound::Raft { to, bytes } => (to, Inbound::Raft(bytes)),
                        Outbound::Forward { to, origin, seq, data } => {
                            assert_eq!(origin, from, "a direct forward carries its sender as origin");
                            (to, Inbound::Forwarded { origin, seq, data })
                        }
                    };
                    if d.contains(&from) || d.contains(&to) {
                        continue;
                    }
                    if let Some(tx) = txs.get(&to) {
                        let _ = tx.send(msg);
                    }
                }
            });
        }
        nodes
    }

    async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn propose(node: &TestNode, data: &[u8]) -> Result<u64, ProposeError> {
        let (reply, rx) = oneshot::channel();
        node.tx
            .send(Inbound::Propose {
                data: data.to_vec(),
                reply,
            })
            .unwrap();
        rx.await.unwrap()
    }

    async fn add(leader: &TestNode, id: u64, kind: ConfChangeType) {
        let (reply, rx) = oneshot::channel();
        leader
            .tx
            .send(Inbound::ConfChange {
                change: conf_change(id, kind),
                reply,
            })
            .unwrap();
        let r = rx.await.unwrap();
        assert!(
            r.is_ok(),
            "conf change {kind:?} of {id} failed: {r:?}; leader status {:?}",
            leader.status.borrow()
        );
    }

    #[tokio::test]
    async fn a_three_node_group_commits_forwards_and_survives_its_leader() {
        let down = Arc::new(Mutex::new(Vec::new()));
        let nodes = cluster(3, down.clone());
        until("node 1 leads", || nodes[&1].status.borrow().is_leader.then_some(())).await;
        add(&nodes[&1], 2, ConfChangeType::AddNode).await;
        add(&nodes[&1], 3, ConfChangeType::AddNode).await;
        propose(&nodes[&1], b"a").await.unwrap();
        // A follower's proposal is forwarded and answered once it is applied there.
        until("node 3 knows the leader", || {
            (nodes[&3].status.borrow().leader == 1).then_some(())
        })
        .await;
        propose(&nodes[&3], b"b").await.unwrap();
        for id in 1..=3 {
            until("every node applied a and b", || {
                (nodes[&id].log.0.lock().unwrap().as_slice() == [b"a".to_vec(), b"b".to_vec()]).then_some(())
            })
            .await;
        }
        // Cut the leader off: the other two elect a new one and keep committing.
        down.lock().unwrap().push(1);
        let new_leader = until("a new leader", || {
            [2u64, 3]
                .into_iter()
                .find(|id| nodes[id].status.borrow().is_leader && nodes[id].status.borrow().term > 1)
        })
        .await;
        propose(&nodes[&new_leader], b"c").await.unwrap();
        // The isolated old leader cannot commit anything.
        let isolated = propose(&nodes[&1], b"lost").await;
        assert!(isolated.is_err(), "a cut-off leader committed: {isolated:?}");
        // Heal: node 1 catches up and holds the same log as the others.
        down.lock().unwrap().clear();
        until("node 1 caught up", || {
            (nodes[&1].log.0.lock().unwrap().as_slice() == nodes[&new_leader].log.0.lock().unwrap().as_slice())
                .then_some(())
        })
        .await;
        assert!(!nodes[&1].log.0.lock().unwrap().contains(&b"lost".to_vec()));
        for n in nodes.values() {
            n.task.abort();
        }
    }

    /// A driver for node `id` that is in no group yet: its inbox, its task, and its outbox
    /// (kept so that sends to it succeed).
    fn lone_driver(
        id: u64,
    ) -> (
        mpsc::UnboundedSender<Inbound>,
        tokio::task::JoinHandle<()>,
        mpsc::UnboundedReceiver<Outbound>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (_status, task) = spawn(
            DriverConfig::new(id),
            MemStorage::new(),
            Log::default(),
            false,
            rx,
            out_tx,
        )
        .unwrap();
        (tx, task, out_rx)
    }

    #[tokio::test]
    async fn a_node_that_lost_its_log_stops_with_a_reason_rather_than_panicking() {
        let (tx, task, _out) = lone_driver(3);
        // What a leader sends a voter it believes acknowledged entries up to 7.
        let mut hb = Message::default();
        hb.set_msg_type(MessageType::MsgHeartbeat);
        hb.from = 1;
        hb.to = 3;
        hb.term = 2;
        hb.commit = 7;
        assert!(lost_log(&hb, 0) && !lost_log(&hb, 7));
        tx.send(Inbound::Raft(hb.write_to_bytes().unwrap())).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the driver stops")
            .expect("without a panic");
    }

    #[tokio::test]
    async fn proposals_without_a_leader_fail_fast() {
        let (tx, task, _out) = lone_driver(7);
        let (reply, answer) = oneshot::channel();
        tx.send(Inbound::Propose {
            data: b"x".to_vec(),
            reply,
        })
        .unwrap();
        assert_eq!(answer.await.unwrap(), Err(ProposeError::NoLeader));
        task.abort();
    }

    #[tokio::test]
    async fn snapshots_compact_the_log_and_new_members_catch_up_from_them() {
        let down = Arc::new(Mutex::new(Vec::new()));
        let nodes = cluster(2, down.clone());
        until("node 1 leads", || nodes[&1].status.borrow().is_leader.then_some(())).await;
        // Make node 1 snapshot often, then add node 2 as a learner after many entries.
        for i in 0..30u32 {
            propose(&nodes[&1], &i.to_be_bytes()).await.unwrap();
        }
        add(&nodes[&1], 2, ConfChangeType::AddLearnerNode).await;
        until("learner caught up", || {
            (nodes[&2].log.0.lock().unwrap().len() == 30).then_some(())
        })
        .await;
        assert_eq!(nodes[&2].status.borrow().learners, vec![2]);
        for n in nodes.values() {
            n.task.abort();
        }
    }
}
