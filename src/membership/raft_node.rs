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
//! A node that refuses a forwarded proposal answers with [`Outbound::Refuse`], which fails the
//! origin's proposal at once with the reason (not a timeout).
//!
//! # Peer authorisation (ARCHITECTURE.md, "Peer authorisation")
//!
//! Everything from the network arrives with `from`, the peer id the transport authenticated.
//! Before anything reaches raft-rs, `check_raft` refuses a Raft message whose `from` is not
//! the authenticated peer, whose sender is neither a member of the application's table nor in
//! the Raft configuration (a node whose configuration is still empty — not joined yet — takes
//! messages from any authenticated peer, so that a leader can bring it in), that is not for this
//! node, or that raft-rs would panic on (see `check_raft`). A forwarded proposal is admitted
//! from a member; from anyone else only as the application allows ([`Apply::admit_non_member`]:
//! a `Join` for the sender's own id). A refusal of a proposal this node forwarded is taken only
//! from the peer it was forwarded to. Refused messages are counted in
//! `herald_peer_messages_refused_total{kind, reason}` and logged at WARN, rate-limited.
//! raft-rs is stepped under `catch_unwind` as a backstop (see `Driver::step_guarded`).

use std::collections::HashMap;
use std::time::Duration;

use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use raft_prost::Message as _;
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
    /// Whether node `id` is a member of the application's table. Members may send Raft messages
    /// and forward proposals even before the Raft configuration includes them (a new member is
    /// in the table before the leader adds it to the group). Default: nobody beyond the Raft
    /// configuration.
    fn is_member(&self, _id: u64) -> bool {
        false
    }
    /// Admits proposal `data` forwarded by `from`, which is neither a member nor in the Raft
    /// configuration: the bytes to propose (possibly rewritten, e.g. a join that must wait for an
    /// operator's approval), or the refusal's metric reason and message. Default: refused.
    fn admit_non_member(&self, from: u64, _data: Vec<u8>) -> Result<Vec<u8>, (&'static str, String)> {
        Err(("not_a_member", format!("node {from} is not a member of the cluster")))
    }
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
    /// Where this run numbers its proposals from; `None` (a node): at random (see `first_seq`).
    /// A deterministic simulation draws it from its seed.
    pub first_seq: Option<u64>,
}

impl DriverConfig {
    /// Defaults for node `id`: 100 ms ticks, election after 1–2 s of silence, heartbeats every
    /// 300 ms.
    pub fn new(id: u64) -> Self {
        DriverConfig {
            id,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            max_election_ticks: 0,
            heartbeat_ticks: 3,
            propose_timeout: Duration::from_secs(5),
            snapshot_every: 1000,
            first_seq: None,
        }
    }

    /// The driver settings of a node's `[raft]` section (the rest are the defaults).
    pub fn from_raft(id: u64, raft: &crate::config::RaftConfig) -> Self {
        DriverConfig {
            tick: Duration::from_millis(raft.tick_ms),
            election_ticks: raft.election_ticks,
            heartbeat_ticks: raft.heartbeat_ticks,
            ..DriverConfig::new(id)
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
    /// A Raft message from a peer.
    Raft {
        /// The peer the transport authenticated (the message's `from` must be it).
        from: u64,
        /// A serialized `eraftpb::Message`.
        bytes: Vec<u8>,
    },
    /// A proposal forwarded by follower `origin` with its sequence number.
    Forwarded {
        /// The peer the transport authenticated (who sent it: `origin`, or a member relaying it).
        from: u64,
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
    /// Peer `from` refused the proposal `seq` this node forwarded to it (a `ProposalResult` with
    /// an error): it fails at once with `error`.
    Refused {
        /// The peer the transport authenticated.
        from: u64,
        /// The proposal's sequence number.
        seq: u64,
        /// Why it was refused.
        error: String,
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
    /// Tell peer `to` that its forwarded proposal `seq` was refused, and why.
    Refuse {
        /// The peer that forwarded it.
        to: u64,
        /// Its sequence number.
        seq: u64,
        /// Why.
        error: String,
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
    /// The leader it was forwarded to: the only peer whose refusal fails it.
    sent_to: Option<u64>,
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
    /// raft-rs's settings, kept to rebuild `node` from storage after a panic in raft-rs.
    raft_config: raft::Config,
    /// Counts and logs refused peer messages.
    refusals: crate::metrics::Refusals,
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
    /// How often raft-rs panicked on a message and the node was rebuilt from storage.
    recovered: u64,
    /// Leader heartbeat rounds sent (see [`LEARNER_HEARTBEAT_EVERY`]).
    heartbeat_rounds: u64,
}

/// Starts the driver on the current tokio runtime. `bootstrap` makes this node the sole voter of a
/// brand-new cluster when its log is empty; otherwise it waits to be added by a leader.
pub fn spawn<S, A>(
    config: DriverConfig,
    storage: S,
    app: A,
    bootstrap: bool,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    out: mpsc::UnboundedSender<Outbound>,
) -> Result<(watch::Receiver<RaftStatus>, tokio::task::JoinHandle<()>), raft::Error>
where
    S: RaftLogStore + Clone + Send + 'static,
    A: Apply,
{
    let (mut driver, status_rx) = build(config, storage, app, bootstrap, out)?;
    let handle = tokio::spawn(async move { driver.run(inbound).await });
    Ok((status_rx, handle))
}

/// The driver of [`spawn`], not started yet.
fn build<S, A>(
    config: DriverConfig,
    storage: S,
    mut app: A,
    bootstrap: bool,
    out: mpsc::UnboundedSender<Outbound>,
) -> Result<(Driver<S, A>, watch::Receiver<RaftStatus>), raft::Error>
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
        snap.data = app.snapshot();
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
    let next_seq = config.first_seq.map_or_else(first_seq, |s| (s >> 1) | 1);
    let mut driver = Driver {
        node,
        raft_config,
        refusals: crate::metrics::Refusals::default(),
        app,
        config,
        out,
        status: status_tx,
        pending: HashMap::new(),
        next_seq,
        snapshot_index: applied,
        snapshot_due: false,
        fatal: None,
        recovered: 0,
        heartbeat_rounds: 0,
    };
    // A node that is the only voter need not wait an election timeout to lead.
    let conf = driver.node.raft.prs().conf().to_conf_state();
    if conf.voters == [driver.config.id] {
        let _ = driver.node.campaign();
    }
    Ok((driver, status_rx))
}

/// Raft ticks a learner takes at once (see `Driver::run`).
const LEARNER_TICKS: u32 = 5;

/// A learner gets one leader heartbeat round in this many (about one a second): it never
/// campaigns, so it needs no heartbeat to keep it from an election; it learns commits from the
/// appends that carry them (raft-rs broadcasts a commit at once), and a lagging one is probed
/// after its next heartbeat answer. Voters get every round. At 20 nodes (3 voters) this takes
/// two thirds of an idle leader's heartbeats away.
const LEARNER_HEARTBEAT_EVERY: u64 = 3;

impl<S: RaftLogStore + Clone, A: Apply> Driver<S, A> {
    async fn run(&mut self, mut inbound: mpsc::UnboundedReceiver<Inbound>) {
        // Ticks due at the next wake-up: one for a voter; a learner never campaigns, so its
        // election clock times nothing and it takes `LEARNER_TICKS` at a time, waking that much
        // less often (most members of a large cluster are learners). Chosen after each wake-up, so
        // a promoted learner is back to single ticks within one such period.
        let mut due = 1;
        let mut next_tick = tokio::time::Instant::now() + self.config.tick;
        loop {
            tokio::select! {
                // A fixed order, not tokio's random one: with the same inputs, the same run.
                biased;
                _ = tokio::time::sleep_until(next_tick) => {
                    for _ in 0..due {
                        self.node.tick();
                    }
                    self.expire_pending();
                    due = if self.node.raft.promotable() { 1 } else { LEARNER_TICKS };
                    next_tick = tokio::time::Instant::now() + self.config.tick * due;
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
            Inbound::Raft { from, bytes } => match Message::decode(&bytes[..]) {
                Ok(msg) => match self.check(from, &msg) {
                    Ok(()) => self.step_guarded(from, msg),
                    Err(refusal) => {
                        self.refusals
                            .refuse("raft", refusal.reason(), from, 1, || refusal.to_string());
                    }
                },
                Err(e) => self.refusals.refuse("raft", "undecodable", from, 1, || {
                    format!("undecodable raft message: {e}")
                }),
            },
            Inbound::Forwarded {
                from,
                origin,
                seq,
                data,
            } => {
                let data = match self.admit_proposal(from, origin, data) {
                    Ok(data) => data,
                    Err((reason, error)) => {
                        self.refusals.refuse("proposal", reason, from, 1, || error.clone());
                        let _ = self.out.send(Outbound::Refuse { to: from, seq, error });
                        return;
                    }
                };
                if self.node.raft.state == StateRole::Leader {
                    if let Err(e) = self.node.propose(context(origin, seq), data) {
                        tracing::debug!(error = %e, origin, "forwarded proposal refused");
                        // Answered when the sender made it (a relaying node would not know it).
                        if from != origin {
                            return;
                        }
                        let _ = self.out.send(Outbound::Refuse {
                            to: from,
                            seq,
                            error: format!("raft refused the proposal: {e}"),
                        });
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
            Inbound::Refused { from, seq, error } => {
                if self.pending.get(&seq).is_some_and(|p| p.sent_to == Some(from)) {
                    self.fail(seq, ProposeError::Refused(error));
                } else {
                    self.refusals
                        .refuse("proposal_result", "not_sent_to_peer", from, 1, || {
                            format!("a refusal of proposal {seq}, which this node did not forward to it: {error}")
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
                // Only while the gone leader is still the one known, or none is (a losing
                // candidate's term cleared it).
                let leader = self.node.raft.leader_id;
                if (leader != gone && leader != raft::INVALID_ID) || self.node.raft.state == StateRole::Leader {
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
                } else if matches!(self.node.raft.state, StateRole::Candidate | StateRole::Leader) {
                    tracing::info!(leader = gone, "the leader's process is gone; starting an election now");
                } else {
                    // raft-rs declines while committed configuration changes are not applied
                    // yet; the election timeout, or the next voter's turn, starts one instead.
                    tracing::info!(
                        leader = gone,
                        state = ?self.node.raft.state,
                        applied = self.node.raft.raft_log.applied,
                        committed = self.node.raft.raft_log.committed,
                        "the leader's process is gone, but Raft declined an early election"
                    );
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
                sent_to: None,
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
            if let Some(p) = self.pending.get_mut(&seq) {
                p.sent_to = Some(leader);
            }
            let _ = self.out.send(Outbound::Forward {
                to: leader,
                origin: self.config.id,
                seq,
                data,
            });
        }
    }

    /// Whether `id` is in the Raft configuration (a voter or a learner, incoming or outgoing).
    fn in_conf(&self, id: u64) -> bool {
        self.node.raft.prs().get(id).is_some()
    }

    /// The authorisation and sanity checks of a Raft message from authenticated peer `from`
    /// (see [`check_raft`]).
    fn check(&self, from: u64, msg: &Message) -> Result<(), RaftRefusal> {
        let log = &self.node.raft.raft_log;
        let view = LogView {
            id: self.config.id,
            joined: self.node.raft.prs().iter().len() > 0,
            sender_known: self.in_conf(from) || self.app.is_member(from),
            term: self.node.raft.term,
            last_index: log.last_index(),
            committed: log.committed,
            // The committed entry is in the log or is the snapshot's last entry, so its term is
            // known; 0 (no check) if it is not.
            committed_term: log.term(log.committed).unwrap_or(0),
        };
        check_raft(from, msg, &view)
    }

    /// Whether the proposal `data` forwarded by authenticated peer `from` (made by `origin`) may
    /// be proposed: from a member (of the table or the Raft configuration) as it is; from anyone
    /// else only if it is its own (`origin` is the sender) and the application admits it.
    fn admit_proposal(&self, from: u64, origin: u64, data: Vec<u8>) -> Result<Vec<u8>, (&'static str, String)> {
        if self.in_conf(from) || self.app.is_member(from) {
            return Ok(data);
        }
        if origin != from {
            return Err((
                "relayed_by_non_member",
                format!("node {from} is not a member and may not relay node {origin}'s proposal"),
            ));
        }
        self.app.admit_non_member(from, data)
    }

    /// Steps `msg` (from authenticated peer `from`) into raft-rs, catching a panic.
    ///
    /// [`check_raft`] refuses what raft-rs is known to panic on, so a panic here means a message
    /// we did not foresee. Is the `RawNode` still usable after raft-rs panicked in the middle of
    /// `step`? Not knowably: `step` mutates in place as it goes (a higher term first makes this
    /// node a follower of the sender — new term, vote cleared — and only then does the handler
    /// assert), so after a panic its term, vote, log, progress and queued messages may be half
    /// updated. It is therefore not trusted, and it need not be: raft-rs's `step` never writes to
    /// the [`RaftLogStore`] (only [`Driver::on_ready`] does, after a step returned), so the
    /// storage holds exactly what the last completed `Ready` persisted — the state a restarted
    /// process would find. The node is rebuilt from it, as a restart would (with this driver's
    /// applied index: the application state is changed only by `on_ready`, never by `step`).
    /// What is lost is what a crash would lose: entries received and not yet persisted (never
    /// acknowledged: acknowledgements are sent only after persisting) and in-memory progress,
    /// which Raft recovers from. A leader comes back as a follower, and an election follows.
    /// If the rebuild fails, the driver stops with the reason, as on a storage failure.
    fn step_guarded(&mut self, from: u64, msg: Message) {
        let applied = self.node.raft.raft_log.applied;
        let kind = msg.get_msg_type();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.node.step(msg)));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "raft step refused a message"),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                tracing::error!(
                    peer = from,
                    message = ?kind,
                    panic = what,
                    "raft-rs panicked on a message from peer {from}; the message is dropped and the Raft node is rebuilt from its storage"
                );
                metrics::counter!(crate::metrics::PEER_MESSAGES_REFUSED, "kind" => "raft", "reason" => "raft_panicked")
                    .increment(1);
                self.rebuild(applied);
            }
        }
    }

    /// Replaces the `RawNode` with one read from storage (see [`Driver::step_guarded`]).
    fn rebuild(&mut self, applied: u64) {
        let storage = self.node.store().clone();
        let mut config = self.raft_config.clone();
        config.applied = applied;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        match RawNode::new(&config, storage, &logger) {
            Ok(node) => {
                self.node = node;
                self.recovered += 1;
            }
            Err(e) => {
                self.fatal.get_or_insert_with(|| {
                    format!("the Raft node could not be rebuilt from storage after raft-rs panicked: {e}")
                });
            }
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
        let heartbeat = |m: &Message| m.get_msg_type() == MessageType::MsgHeartbeat && m.context.is_empty();
        let learners = if msgs.iter().any(heartbeat) {
            self.heartbeat_rounds += 1;
            if self.heartbeat_rounds % LEARNER_HEARTBEAT_EVERY == 0 {
                Vec::new()
            } else {
                self.node.raft.prs().conf().to_conf_state().learners
            }
        } else {
            Vec::new()
        };
        for m in msgs {
            if heartbeat(&m) && learners.contains(&m.to) {
                continue;
            }
            let _ = self.out.send(Outbound::Raft {
                to: m.to,
                bytes: m.encode_to_vec(),
            });
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
                    let cc = ConfChange::decode(&entry.data[..])
                        .map_err(|e| raft::Error::Store(raft::StorageError::Other(e.into())))?;
                    let conf = self.node.apply_conf_change(&cc)?;
                    self.node.store().set_conf_state(conf.clone())?;
                    self.app.conf_changed(&conf);
                    self.snapshot_due = true;
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = raft::prelude::ConfChangeV2::decode(&entry.data[..])
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

/// What [`check_raft`] needs to know about this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogView {
    /// This node's id.
    id: u64,
    /// Whether its Raft configuration names anyone (an empty one: not joined yet).
    joined: bool,
    /// Whether the sender is in the Raft configuration or a member of the table.
    sender_known: bool,
    /// Its current term.
    term: u64,
    /// The last index of its log.
    last_index: u64,
    /// Its commit index.
    committed: u64,
    /// The term of the entry at `committed` (0 = unknown: not checked).
    committed_term: u64,
}

/// Why a Raft message was refused before raft-rs saw it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum RaftRefusal {
    #[error("a raft message claiming to come from node {claimed} arrived on node {from}'s authenticated connection")]
    ForgedFrom { from: u64, claimed: u64 },
    #[error("node {from} is neither a member nor in the Raft configuration")]
    NotAMember { from: u64 },
    #[error("a raft message for node {to} arrived at node {me}")]
    WrongRecipient { to: u64, me: u64 },
    #[error(
        "node {from}'s heartbeat (term {term}) says entries up to {commit} are committed, but this node's log ends at {last}. \
         raft-rs would stop on it, so it is dropped. A real leader only does this when this node lost entries it \
         acknowledged (its data dir was wiped or replaced: remove the old member with DELETE /v1/cluster/nodes/<id> \
         and start it again, or restore its data dir); otherwise node {from} is faulty or hostile"
    )]
    CommitBeyondLog {
        from: u64,
        term: u64,
        commit: u64,
        last: u64,
    },
    #[error(
        "node {from}'s append after index {index} carries entries that do not follow it (entry {at} has index {found})"
    )]
    AppendNotContiguous {
        from: u64,
        index: u64,
        at: usize,
        found: u64,
    },
    #[error("node {from}'s append after index {index} claims its term there is {log_term}, below the term {committed_term} of this node's commit index {committed}: no leader's log looks like that")]
    AppendBelowCommitted {
        from: u64,
        index: u64,
        log_term: u64,
        committed: u64,
        committed_term: u64,
    },
    #[error("node {from}'s snapshot has an invalid configuration: {why}")]
    BadSnapshotConf { from: u64, why: String },
}

impl RaftRefusal {
    /// The `reason` label of the refusal metric.
    fn reason(&self) -> &'static str {
        match self {
            RaftRefusal::ForgedFrom { .. } => "forged_from",
            RaftRefusal::NotAMember { .. } => "not_a_member",
            RaftRefusal::WrongRecipient { .. } => "wrong_recipient",
            RaftRefusal::CommitBeyondLog { .. } => "commit_beyond_log",
            RaftRefusal::AppendNotContiguous { .. } => "append_not_contiguous",
            RaftRefusal::AppendBelowCommitted { .. } => "append_below_committed",
            RaftRefusal::BadSnapshotConf { .. } => "bad_snapshot",
        }
    }
}

/// Whether Raft message `msg`, from the peer the transport authenticated as `from`, may be
/// stepped into raft-rs on the node `view` describes.
///
/// Authorisation: `msg.from` must be `from`; the sender must be a member of the table or in the
/// Raft configuration, unless this node's configuration is empty (it has not joined: the leader
/// that brings it in is not known to it yet); and the message must be for this node.
///
/// Sanity: what raft-rs 0.7 asserts on (it panics, which would stop the membership driver) is
/// refused (when the message's term is not older than this node's: raft-rs answers older ones
/// without handling them), judged by what a real leader sends:
/// * `MsgHeartbeat`: raft-rs commits `commit` at once (`RaftLog::commit_to` panics beyond the last
///   index). A leader sends `min(its commit, what this node acknowledged)`, never more than this
///   node's last index — unless this node lost acknowledged entries (a wiped data dir), which is
///   logged as such and not fatal.
/// * `MsgAppend`: raft-rs slices the entries from `conflict - (index + 1)` and panics when an
///   entry conflicts with a committed one, so the entries must follow `index` one by one. When it
///   rejects an append it looks for the last entry of term ≤ `log_term` below `index` and
///   panics if that search walks into the compacted log: a leader's term at `index ≥ committed`
///   is at least our committed entry's term (committed entries agree with every later leader), so
///   `log_term` below that is refused. (`index < committed` is answered by raft-rs without looking.)
/// * `MsgSnapshot`: raft-rs panics restoring a configuration in which a node both votes and learns.
///
/// `catch_unwind` around the step is the backstop for anything else ([`Driver::step_guarded`]).
fn check_raft(from: u64, msg: &Message, view: &LogView) -> Result<(), RaftRefusal> {
    if msg.from != from {
        return Err(RaftRefusal::ForgedFrom {
            from,
            claimed: msg.from,
        });
    }
    if view.joined && !view.sender_known {
        return Err(RaftRefusal::NotAMember { from });
    }
    if msg.to != view.id {
        return Err(RaftRefusal::WrongRecipient {
            to: msg.to,
            me: view.id,
        });
    }
    if msg.term < view.term {
        // raft-rs answers a message of an older term without handling it (the answer tells a
        // deposed leader about the newer term), so it cannot make it panic.
        return Ok(());
    }
    match msg.get_msg_type() {
        MessageType::MsgHeartbeat if msg.commit > view.last_index => Err(RaftRefusal::CommitBeyondLog {
            from,
            term: msg.term,
            commit: msg.commit,
            last: view.last_index,
        }),
        MessageType::MsgAppend => {
            for (at, e) in msg.entries.iter().enumerate() {
                let want = msg.index.checked_add(at as u64 + 1);
                if want != Some(e.index) {
                    return Err(RaftRefusal::AppendNotContiguous {
                        from,
                        index: msg.index,
                        at,
                        found: e.index,
                    });
                }
            }
            if msg.index >= view.committed && msg.log_term < view.committed_term {
                return Err(RaftRefusal::AppendBelowCommitted {
                    from,
                    index: msg.index,
                    log_term: msg.log_term,
                    committed: view.committed,
                    committed_term: view.committed_term,
                });
            }
            Ok(())
        }
        MessageType::MsgSnapshot => {
            let conf = msg.get_snapshot().get_metadata().get_conf_state();
            // (`learners_next` are outgoing voters that will learn: only the incoming voters
            // exclude them.)
            let both = conf
                .learners
                .iter()
                .find(|l| conf.voters.contains(l) || conf.voters_outgoing.contains(l))
                .or_else(|| conf.learners_next.iter().find(|l| conf.voters.contains(l)));
            match both {
                Some(id) => Err(RaftRefusal::BadSnapshotConf {
                    from,
                    why: format!("node {id} is both a voter and a learner"),
                }),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
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
        cluster_counting(n, down, Arc::default())
    }

    /// Leader heartbeats routed, by receiver.
    type Heartbeats = Arc<Mutex<HashMap<u64, u64>>>;

    /// [`cluster`], counting the heartbeats routed to each node in `heartbeats`.
    fn cluster_counting(n: u64, down: Arc<Mutex<Vec<u64>>>, heartbeats: Heartbeats) -> HashMap<u64, TestNode> {
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
            let heartbeats = heartbeats.clone();
            tokio::spawn(async move {
                while let Some(m) = out_rx.recv().await {
                    let d = down.lock().unwrap().clone();
                    let (to, msg) = match m {
                        Outbound::Raft { to, bytes } => {
                            let kind = Message::decode(&bytes[..]).unwrap().get_msg_type();
                            if kind == MessageType::MsgHeartbeat {
                                *heartbeats.lock().unwrap().entry(to).or_default() += 1;
                            }
                            (to, Inbound::Raft { from, bytes })
                        }
                        Outbound::Forward { to, origin, seq, data } => {
                            assert_eq!(origin, from, "a direct forward carries its sender as origin");
                            (
                                to,
                                Inbound::Forwarded {
                                    from,
                                    origin,
                                    seq,
                                    data,
                                },
                            )
                        }
                        Outbound::Refuse { to, seq, error } => (to, Inbound::Refused { from, seq, error }),
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

    /// A learner gets one heartbeat round in [`LEARNER_HEARTBEAT_EVERY`], a voter every one; the
    /// learner still learns every commit at once (from the appends).
    #[tokio::test]
    async fn learners_get_a_third_of_the_heartbeats_and_still_apply_every_commit() {
        let heartbeats = Heartbeats::default();
        let nodes = cluster_counting(3, Arc::default(), heartbeats.clone());
        until("node 1 leads", || nodes[&1].status.borrow().is_leader.then_some(())).await;
        add(&nodes[&1], 2, ConfChangeType::AddNode).await;
        add(&nodes[&1], 3, ConfChangeType::AddLearnerNode).await;
        until("node 3 knows the leader", || {
            (nodes[&3].status.borrow().leader == 1).then_some(())
        })
        .await;
        heartbeats.lock().unwrap().clear();
        let count = |id: u64| heartbeats.lock().unwrap().get(&id).copied().unwrap_or(0);
        until("60 heartbeats to the voter", || (count(2) >= 60).then_some(())).await;
        let (voter, learner) = (count(2), count(3));
        assert!(
            learner * 2 <= voter && learner * 5 >= voter,
            "about a third: {learner} to the learner, {voter} to the voter"
        );
        // Commits still reach it (raft-rs broadcasts them in appends).
        propose(&nodes[&1], b"x").await.unwrap();
        until("the learner applied it", || {
            (nodes[&3].log.0.lock().unwrap().as_slice() == [b"x".to_vec()]).then_some(())
        })
        .await;
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

    /// What a leader sends a voter it believes acknowledged entries up to `commit`.
    fn heartbeat(from: u64, to: u64, term: u64, commit: u64) -> Message {
        let mut hb = Message::default();
        hb.set_msg_type(MessageType::MsgHeartbeat);
        hb.from = from;
        hb.to = to;
        hb.term = term;
        hb.commit = commit;
        hb
    }

    #[tokio::test]
    async fn a_heartbeat_beyond_the_log_is_dropped_and_the_driver_keeps_running() {
        let (tx, task, _out) = lone_driver(3);
        // raft-rs panics on this ("to_commit 7 is out of range"); the driver used to stop for good.
        let hb = heartbeat(1, 3, 2, 7);
        tx.send(Inbound::Raft {
            from: 1,
            bytes: hb.encode_to_vec(),
        })
        .unwrap();
        // Still running: it answers a proposal (no leader: the heartbeat was not taken).
        let (reply, answer) = oneshot::channel();
        tx.send(Inbound::Propose {
            data: b"x".to_vec(),
            reply,
        })
        .unwrap();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), answer).await.unwrap(),
            Ok(Err(ProposeError::NoLeader))
        );
        assert!(!task.is_finished(), "the driver stopped");
        task.abort();
    }

    fn view(joined: bool, sender_known: bool) -> LogView {
        LogView {
            id: 3,
            joined,
            sender_known,
            term: 2,
            last_index: 10,
            committed: 8,
            committed_term: 2,
        }
    }

    fn append(from: u64, term: u64, index: u64, log_term: u64, entries: &[(u64, u64)]) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = from;
        m.to = 3;
        m.term = term;
        m.index = index;
        m.log_term = log_term;
        m.entries = entries
            .iter()
            .map(|&(index, term)| Entry {
                index,
                term,
                ..Default::default()
            })
            .collect();
        m
    }

    #[test]
    fn raft_messages_are_accepted_only_from_their_authenticated_sender_if_it_is_a_member() {
        let hb = heartbeat(1, 3, 2, 8);
        assert_eq!(check_raft(1, &hb, &view(true, true)), Ok(()));
        // Peer 2's connection carrying a message that claims to be node 1's.
        assert_eq!(
            check_raft(2, &hb, &view(true, true)),
            Err(RaftRefusal::ForgedFrom { from: 2, claimed: 1 })
        );
        // A non-member, once this node is in a group.
        assert_eq!(
            check_raft(1, &hb, &view(true, false)),
            Err(RaftRefusal::NotAMember { from: 1 })
        );
        // A node that has not joined takes messages from any authenticated peer (its leader-to-be),
        // but still only ones that are really from that peer.
        assert_eq!(check_raft(1, &hb, &view(false, false)), Ok(()));
        assert!(check_raft(5, &hb, &view(false, false)).is_err());
        assert_eq!(
            check_raft(1, &heartbeat(1, 4, 2, 8), &view(true, true)),
            Err(RaftRefusal::WrongRecipient { to: 4, me: 3 })
        );
    }

    #[test]
    fn messages_raft_rs_would_panic_on_are_refused_and_real_ones_pass() {
        let v = view(true, true);
        assert_eq!(check_raft(1, &heartbeat(1, 3, 2, 10), &v), Ok(()));
        assert_eq!(check_raft(1, &heartbeat(1, 3, 9, 10), &v), Ok(()));
        assert_eq!(
            check_raft(1, &heartbeat(1, 3, 2, 11), &v).unwrap_err().reason(),
            "commit_beyond_log"
        );
        // An older term is answered by raft-rs without being handled.
        let stale = view(true, true);
        let mut old = heartbeat(1, 3, 1, 99);
        assert_eq!(check_raft(1, &old, &LogView { term: 2, ..stale }), Ok(()));
        old.term = 2;
        assert!(check_raft(1, &old, &stale).is_err());
        // Appends: entries must follow the index; the log term must not be below the committed one.
        assert_eq!(check_raft(1, &append(1, 2, 10, 2, &[(11, 2), (12, 2)]), &v), Ok(()));
        assert_eq!(
            check_raft(1, &append(1, 2, 5, 1, &[(6, 1)]), &v),
            Ok(()),
            "below the commit index: answered without a look"
        );
        assert_eq!(
            check_raft(1, &append(1, 2, 10, 2, &[(11, 2), (9, 2)]), &v)
                .unwrap_err()
                .reason(),
            "append_not_contiguous"
        );
        assert_eq!(
            check_raft(1, &append(1, 2, 10, 2, &[(3, 2)]), &v).unwrap_err().reason(),
            "append_not_contiguous"
        );
        assert_eq!(
            check_raft(1, &append(1, 2, 9, 1, &[]), &v).unwrap_err().reason(),
            "append_below_committed"
        );
        // A snapshot whose configuration has a node both vote and learn.
        let mut snap = Message::default();
        snap.set_msg_type(MessageType::MsgSnapshot);
        snap.from = 1;
        snap.to = 3;
        snap.term = 2;
        snap.mut_snapshot().mut_metadata().mut_conf_state().voters = vec![1, 3];
        assert_eq!(check_raft(1, &snap, &v), Ok(()));
        snap.mut_snapshot().mut_metadata().mut_conf_state().learners = vec![3];
        assert_eq!(check_raft(1, &snap, &v).unwrap_err().reason(), "bad_snapshot");
    }

    /// A driver built but not started, for stepping by hand.
    fn built(id: u64, bootstrap: bool) -> (Driver<MemStorage, Log>, mpsc::UnboundedReceiver<Outbound>) {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (driver, _status) = build(
            DriverConfig::new(id),
            MemStorage::new(),
            Log::default(),
            bootstrap,
            out_tx,
        )
        .unwrap();
        (driver, out_rx)
    }

    #[test]
    fn a_panic_in_raft_rs_drops_the_message_and_rebuilds_the_node_from_storage() {
        let (mut d, _out) = built(3, false);
        // Past the checks (stepped directly): raft-rs first becomes a follower in term 5, then
        // panics in commit_to.
        d.step_guarded(1, heartbeat(1, 3, 5, 7));
        assert_eq!(d.recovered, 1, "the panic was caught and the node rebuilt");
        assert_eq!(d.fatal, None);
        assert_eq!(
            d.node.raft.term, 0,
            "the half-updated node (term 5) was replaced by the state in storage"
        );
        // It works: a real heartbeat is taken.
        d.step_guarded(1, heartbeat(1, 3, 5, 0));
        assert_eq!((d.node.raft.term, d.node.raft.leader_id), (5, 1));
        assert!(d.on_ready().is_ok());
    }

    #[tokio::test]
    async fn proposals_from_non_members_are_refused_with_an_answer() {
        let (mut d, mut out) = built(1, true);
        assert_eq!(d.node.raft.state, StateRole::Leader);
        d.handle(Inbound::Forwarded {
            from: 9,
            origin: 9,
            seq: 5,
            data: b"x".to_vec(),
        });
        match out.try_recv() {
            Ok(Outbound::Refuse { to: 9, seq: 5, error }) => assert!(error.contains("not a member"), "{error}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Relaying another node's proposal as a non-member.
        d.handle(Inbound::Forwarded {
            from: 9,
            origin: 1,
            seq: 6,
            data: b"x".to_vec(),
        });
        assert!(matches!(out.try_recv(), Ok(Outbound::Refuse { to: 9, seq: 6, .. })));
        let before = d.node.raft.raft_log.last_index();
        // The Raft configuration's own member (itself here) is admitted.
        d.handle(Inbound::Forwarded {
            from: 1,
            origin: 1,
            seq: 7,
            data: b"y".to_vec(),
        });
        assert!(out.try_recv().is_err());
        assert_eq!(d.node.raft.raft_log.last_index(), before + 1, "proposed");
    }

    #[tokio::test]
    async fn a_refusal_fails_a_proposal_only_when_it_comes_from_where_it_was_sent() {
        let (mut d, _out) = built(3, false);
        let (reply, mut answer) = oneshot::channel();
        let seq = d.register(reply);
        d.pending.get_mut(&seq).unwrap().sent_to = Some(1);
        d.handle(Inbound::Refused {
            from: 2,
            seq,
            error: "forged".into(),
        });
        assert!(answer.try_recv().is_err(), "a refusal from another peer is ignored");
        d.handle(Inbound::Refused {
            from: 1,
            seq,
            error: "not a member".into(),
        });
        assert_eq!(
            answer.try_recv().unwrap(),
            Err(ProposeError::Refused("not a member".into()))
        );
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
