//! The membership service: the Raft driver, the peer bus and the state machine wired together on
//! one dedicated thread, plus the leader's duties.
//!
//! It runs on its own thread (`herald-cluster`) with its own Tokio runtime, so that heartbeats and
//! elections are not delayed by handler load or by the HTTP workers. It starts the node's peer
//! [`Bus`]: the bus's control channel (its connections, queues and tasks) runs on this thread and
//! carries Raft messages, forwarded proposals, pings and pongs; the events channel runs on the
//! bus's own `herald-events` thread and hands the event plane's payloads to the relay through
//! [`MembershipConfig::app`], so event batches neither share a queue or a connection with
//! heartbeats nor use this thread. What arrives on the control channel goes to its room here:
//! Raft messages and proposals to the driver, pongs to the monitor, pings answered at once; an
//! event-plane payload arriving on it is dropped and counted (a peer may not bypass the
//! separation). The node talks to it only through channels:
//! [`Membership::propose`] (a command, answered once committed and applied on this node) and
//! the [`Membership::state`] / [`Membership::status`] watches.
//!
//! * **Joining**: a node with an empty Raft log and no `--join` starts a new cluster as its only
//!   voter. A node with `--join` learns the seed's node id with a probe handshake, then sends its
//!   `Join` proposal to the seed, which forwards it to the leader; it retries until it sees
//!   itself in the applied membership table (which reaches it as a Raft snapshot once the leader
//!   has added it to the group).
//! * **Leader duties**: after every change the leader compares the Raft configuration with the
//!   voter rule (the first `raft.voters` members vote, the rest learn) and proposes one
//!   configuration change at a time; then, if the placement inputs changed, it proposes a new
//!   `SetPlacement`.
//! * **Peers**: every applied change of the member list adds or removes bus peers, so each
//!   node dials every other member, on both channels.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::prelude::{ConfChangeType, ConfState};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use super::raft_node::{self, Apply, DriverConfig, Inbound, Outbound, ProposeError, RaftStatus};
use super::state::{Command, ConfStep, MembershipState};
use super::storage::RedbStorage;
use crate::error::{Error, Result};
use crate::monitor::{Health, PeerState, Progress, Ring, Suspicion, Suspicions, Verdict};
use crate::transport::{self, Body, Bus, Envelope, PeerNet, PeerTls, Transport, TransportConfig};
use crate::types::NodeStatus;

/// What the service needs to start: its [`CoreConfig`], and the peer listener, TLS and storage
/// of a node.
#[derive(Debug)]
pub struct MembershipConfig {
    /// The service itself, whatever its network and storage.
    pub core: CoreConfig,
    /// Where the Raft log lives (`raft.redb` inside).
    pub data_dir: std::path::PathBuf,
    /// The peer listener, already bound.
    pub peer_listener: std::net::TcpListener,
    /// The node's peer TLS material (`None`: insecure peers, loopback only).
    pub tls: Option<Arc<PeerTls>>,
    /// How often the TLS files are re-read for a renewed certificate.
    pub tls_reload: Duration,
    /// Where the event plane's `app` payloads from peers go: the bus's events channel delivers
    /// them from its own thread (they never pass through the membership thread).
    /// Bounded ([`crate::transport::APP_QUEUE`]): when it is full, the events channel stops
    /// reading (backpressure); the control channel is not affected.
    pub app: mpsc::Sender<(u64, bytes::Bytes)>,
    /// Most inbound peer connections handshaking at once (`cluster.max_pending_handshakes`).
    pub max_pending_handshakes: usize,
}

/// The membership service's settings that do not depend on its network or storage: what
/// [`Core::start`] needs.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This node's id.
    pub node_id: u64,
    /// The cluster's name.
    pub cluster_id: String,
    /// This node's HTTP address, recorded in the membership table.
    pub http: String,
    /// The peer address others dial (recorded in the table). [`Membership::start`] puts the
    /// listener's address here when it is empty.
    pub advertise: String,
    /// Seeds to join.
    pub join: Vec<String>,
    /// The handler kinds this node can run.
    pub handlers: Vec<String>,
    /// The Raft driver's settings ([`DriverConfig::from_raft`] for a node's `[raft]`).
    pub driver: DriverConfig,
    /// `raft.voters`: how many members vote (the rest learn).
    pub voters: usize,
    /// `raft.load_factor`: the placement's bound on instances per node.
    pub load_factor: f64,
    /// Node monitoring settings.
    pub monitor: crate::monitor::MonitorConfig,
    /// The leader marks a member down after it was suspect or degraded this long (and up again
    /// after it was healthy this long).
    pub down_after: Duration,
    /// Peer health, written by the monitor.
    pub health: Arc<Health>,
    /// This node's handler progress, reported in pongs.
    pub progress: Arc<Progress>,
    /// Whether a new node's `Join` is applied at once or waits for an admin's approval.
    pub join_approval: crate::config::JoinApproval,
}

/// A handle to the running service.
pub struct Membership {
    handle: Handle,
    peer_addr: SocketAddr,
    advertise: String,
    bus: Bus,
    /// Stops the service's runtime (dropping it stops every task).
    stop: Mutex<Option<oneshot::Sender<()>>>,
    /// Set by [`Membership::stop`] before the runtime stops: the driver ending then is a normal
    /// stop, not a failure.
    stopping: std::sync::atomic::AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What talks to a running service core: proposals and the watches of its table and Raft status.
/// [`Membership`] holds one; so does a [`Core`] in the simulation.
#[derive(Clone)]
pub struct Handle {
    node_id: u64,
    driver: mpsc::UnboundedSender<Inbound>,
    state: watch::Receiver<Arc<MembershipState>>,
    status: watch::Receiver<RaftStatus>,
    /// Set once this process's `Join` committed and the table shows it (see `join_cluster`).
    joined: watch::Receiver<bool>,
}

impl Handle {
    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The applied membership table (updated after every applied command).
    pub fn state(&self) -> watch::Receiver<Arc<MembershipState>> {
        self.state.clone()
    }

    /// Raft's view: leader, term, commit index, configuration.
    pub fn status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// Whether this node's `Join` committed and its table shows it (see [`Handle::wait_joined`]).
    pub fn is_joined(&self) -> bool {
        *self.joined.borrow()
    }

    /// Proposes `command`; resolves once it is committed and applied on this node.
    pub async fn propose(&self, command: &Command) -> std::result::Result<u64, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.driver
            .send(Inbound::Propose {
                data: command.to_bytes(),
                reply,
            })
            .map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Waits until this node's `Join` (a rejoin after a restart) committed — so its table has
    /// caught up with the cluster's, not just the one on its disk — and a leader is known.
    pub async fn wait_joined(&self) {
        let mut joined = self.joined.clone();
        let mut status = self.status.clone();
        loop {
            if *joined.borrow_and_update() && status.borrow().leader != 0 {
                return;
            }
            tokio::select! {
                // A fixed order (not tokio's random one), so the simulation replays a seed.
                biased;
                r = joined.changed() => if r.is_err() { return },
                r = status.changed() => if r.is_err() { return },
            }
        }
    }

    /// Where the applied table and the Raft configuration disagree, as this node sees them now
    /// (see [`membership_problems`]).
    pub fn problems(&self) -> Vec<MembershipProblem> {
        membership_problems(&self.state.borrow(), &self.status.borrow())
    }

    /// Why this node must not call itself ready although it runs: it is not in the membership
    /// table, or not in its own Raft configuration (then it cannot vote, and as a leader it
    /// cannot commit anything). `None` when it is a member of both.
    pub fn unready_reason(&self) -> Option<MembershipProblem> {
        self.problems().into_iter().find(|p| p.is_about(self.node_id))
    }

    /// Whether the Raft driver still runs (it stops on a storage failure or a raft-rs panic).
    pub fn is_running(&self) -> bool {
        !self.driver.is_closed()
    }
}

/// The service's tasks — the Raft driver, the control dispatch, the monitor, the leader's duties,
/// the join — running on the current tokio runtime over any [`PeerNet`] and Raft storage. A node
/// runs one inside [`Membership`] over its bus and `raft.redb`; the deterministic simulation
/// (`tests/simulation.rs`) runs several over an in-process network and memory storage in virtual
/// time. Dropping it stops every task (a crash: the storage keeps what was written).
pub struct Core {
    handle: Handle,
    driver: tokio::task::JoinHandle<()>,
    tasks: tokio::task::JoinSet<()>,
    /// Whether the join task ended (it does once this node is a member).
    joined: bool,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Core {
    /// Starts the service's tasks on the current runtime: the node bootstraps a new cluster when
    /// its storage is empty and it has no seeds or is the first of them, and otherwise joins
    /// through the seeds (or rejoins, when its storage has a log). What the network receives on
    /// the control channel from peer `id` must be sent to `inbound` as `(id, envelope)`.
    pub fn start<S: super::storage::RaftLogStore + Clone + Send + 'static>(
        config: CoreConfig,
        net: Arc<dyn PeerNet>,
        inbound: mpsc::Receiver<(u64, Envelope)>,
        storage: S,
    ) -> std::result::Result<Core, raft::Error> {
        let id = config.node_id;
        let fresh = raft::Storage::last_index(&storage).unwrap_or(0) == 0;
        let (first_seed, seeds) = seeds(&config.join, &config.advertise);
        // A fresh node starts a new cluster when it has no seeds, or when it is the first seed of
        // the list: then every node of a StatefulSet or compose file can share one `--join` list.
        let bootstrap = fresh && (config.join.is_empty() || first_seed);
        if bootstrap && first_seed {
            tracing::info!(advertise = %config.advertise, "this node is the first seed in --join and its data dir is empty: starting a new cluster");
        }
        let (state_tx, state_rx) = watch::channel(Arc::new(MembershipState::new(config.cluster_id.clone())));
        let changed = Arc::new(Notify::new());
        let applier = Applier {
            node_id: id,
            state: MembershipState::new(config.cluster_id.clone()),
            publish: state_tx,
            net: net.clone(),
            changed: changed.clone(),
            join_approval: config.join_approval,
        };
        let (driver_tx, driver_rx) = mpsc::unbounded_channel();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let mut driver_config = config.driver.clone();
        driver_config.id = id;
        let (status_rx, driver) = raft_node::spawn(driver_config, storage, applier, bootstrap, driver_rx, out_tx)?;

        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(send_to_peers(out_rx, net.clone(), driver_tx.clone()));
        let (pong_tx, pong_rx) = mpsc::unbounded_channel();
        let suspicions = Arc::new(Mutex::new(Suspicions::default()));
        tasks.spawn(dispatch_control(
            inbound,
            net.clone(),
            driver_tx.clone(),
            pong_tx,
            config.progress.clone(),
            Reports {
                state: state_rx.clone(),
                suspicions: suspicions.clone(),
                changed: changed.clone(),
            },
        ));
        let (news_tx, news_rx) = mpsc::unbounded_channel();
        let (voters_tx, voters_rx) = watch::channel(Vec::new());
        tasks.spawn(other_voters(id, status_rx.clone(), voters_tx));
        tasks.spawn(crate::monitor::run(
            id,
            config.monitor,
            config.health.clone(),
            net.clone(),
            state_rx.clone(),
            pong_rx,
            changed.clone(),
            news_tx,
            voters_rx,
        ));
        let ctx = Arc::new(Ctx {
            id,
            driver: driver_tx.clone(),
            state: state_rx.clone(),
            status: status_rx.clone(),
            net,
            voters: config.voters,
            load_factor: config.load_factor,
            changed,
            health: config.health.clone(),
            down_after: config.down_after,
            suspicions,
            monitors: config.monitor.monitors,
            stale_after: config.monitor.stale_after(),
        });
        tasks.spawn(ctx.clone().leader_duties());
        tasks.spawn(ctx.clone().send_news(news_rx));
        tasks.spawn(ctx.clone().expedite_elections());
        let join = Command::join(
            id,
            config.http.clone(),
            config.advertise.clone(),
            config.handlers.clone(),
        );
        let (joined_tx, joined_rx) = watch::channel(false);
        tasks.spawn(ctx.join_cluster(join, seeds, joined_tx));
        Ok(Core {
            handle: Handle {
                node_id: id,
                driver: driver_tx,
                state: state_rx,
                status: status_rx,
                joined: joined_rx,
            },
            driver,
            tasks,
            joined: false,
        })
    }

    /// Talks to this core.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Why the core stopped working, if it did: its driver ended, or one of its tasks did (every
    /// task but the join runs as long as the core; the join ends once this node is a member).
    pub fn failure(&mut self) -> Option<String> {
        if self.driver.is_finished() {
            return Some("the Raft driver stopped".into());
        }
        while let Some(ended) = self.tasks.try_join_next() {
            match ended {
                Err(e) => return Some(format!("a task of the membership service failed: {e}")),
                Ok(()) if self.handle.is_joined() && !self.joined => self.joined = true,
                Ok(()) => return Some("a task of the membership service ended".into()),
            }
        }
        None
    }
}

/// The state machine as the driver sees it: applies commands, publishes the new state and keeps
/// the bus's peers in line with the member list.
struct Applier {
    node_id: u64,
    state: MembershipState,
    publish: watch::Sender<Arc<MembershipState>>,
    net: Arc<dyn PeerNet>,
    changed: Arc<Notify>,
    join_approval: crate::config::JoinApproval,
}

impl Applier {
    fn sync_peers(&self) {
        for m in self.state.members().values() {
            if m.id != self.node_id {
                self.net.add_peer(m.id, &m.peer);
            }
        }
    }

    fn publish(&self) {
        self.publish.send_replace(Arc::new(self.state.clone()));
        self.changed.notify_one();
    }

    /// Closes the connections to member `id`, which left the table. Not at once: a node removed
    /// while it runs (`DELETE /v1/cluster/nodes/{id}`) learns of its removal only from the
    /// commit of its `Leave`, which the leader sends it right after this apply; closing first
    /// would drop that message, and the removed node would go on as a member that nobody answers
    /// (taking events it cannot deliver). So the peer is dropped [`LEFT_PEER_GRACE`] later, unless
    /// it joined again meanwhile. Outside a runtime (tests), at once.
    fn forget_peer(&self, id: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.net.remove_peer(id);
        };
        let (net, state) = (self.net.clone(), self.publish.subscribe());
        runtime.spawn(async move {
            tokio::time::sleep(LEFT_PEER_GRACE).await;
            if state.borrow().member(id).is_none() {
                net.remove_peer(id);
            }
        });
    }
}

/// How long the connections to a member that left stay open (see [`Applier::forget_peer`]).
const LEFT_PEER_GRACE: Duration = Duration::from_secs(2);

impl Apply for Applier {
    fn apply(&mut self, index: u64, data: &[u8]) {
        match self.state.apply_bytes(index, data) {
            Ok(effects) => {
                for e in &effects {
                    if let super::state::Effect::MemberLeft { id } = e {
                        self.forget_peer(*id);
                    }
                    tracing::debug!(index, effect = ?e, "membership change applied");
                }
                self.sync_peers();
            }
            Err(e) => tracing::info!(index, error = %e, "membership command refused"),
        }
        self.publish();
    }

    fn snapshot(&self) -> Vec<u8> {
        self.state.to_snapshot()
    }

    type Error = super::state::SnapshotError;

    fn restore(&mut self, data: &[u8]) -> std::result::Result<(), Self::Error> {
        self.state = MembershipState::from_snapshot(data)?;
        self.sync_peers();
        self.publish();
        Ok(())
    }

    fn conf_changed(&mut self, conf: &ConfState) {
        tracing::info!(voters = ?conf.voters, learners = ?conf.learners, "raft configuration changed");
        self.changed.notify_one();
    }

    fn is_member(&self, id: u64) -> bool {
        self.state.member(id).is_some()
    }

    /// A node that is not a member may only ask to join, as itself: its `Join` is proposed as it
    /// is (`cluster.join_approval = "auto"`) or as a `RequestJoin` that waits for an admin's
    /// approval (`"manual"`; asking again while pending is answered with that). Anything else is
    /// refused.
    fn admit_non_member(&self, from: u64, data: Vec<u8>) -> std::result::Result<Vec<u8>, (&'static str, String)> {
        let cmd = Command::from_bytes(&data)
            .map_err(|e| ("undecodable", format!("node {from} sent an undecodable proposal: {e}")))?;
        let node = match &cmd.kind {
            Some(super::state::command::Kind::Join(node)) => node,
            _ => {
                return Err((
                    "not_a_member",
                    format!(
                        "node {from} is not a member of the cluster: it may only ask to join (it proposed {})",
                        cmd.name()
                    ),
                ))
            }
        };
        if node.id != from {
            return Err((
                "join_for_other_id",
                format!("node {from} may only join as itself, not as node {}", node.id),
            ));
        }
        match self.join_approval {
            crate::config::JoinApproval::Auto => Ok(data),
            crate::config::JoinApproval::Manual => {
                let waiting = self
                    .state
                    .pending_joins()
                    .get(&from)
                    .is_some_and(|p| p.http == node.http && p.peer == node.peer && p.handlers == node.handlers);
                if waiting {
                    return Err((
                        "join_pending",
                        format!(
                            "node {from}'s join waits for an admin's approval (cluster.join_approval = \"manual\"): \
                             POST /v1/cluster/nodes/{from}/approve"
                        ),
                    ));
                }
                Command::request_join(cmd)
                    .map(|c| c.to_bytes())
                    .ok_or(("not_a_member", format!("node {from} may only ask to join")))
            }
        }
    }
}

impl Membership {
    /// Starts the service on its own thread and returns once the Raft group runs (not yet
    /// joined: see [`Membership::wait_joined`]).
    pub fn start(config: MembershipConfig) -> Result<Membership> {
        let peer_addr = config
            .peer_listener
            .local_addr()
            .map_err(|e| Error::io("cannot read the peer address", e))?;
        config
            .peer_listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("cannot configure the peer listener", e))?;
        let advertise = if config.core.advertise.is_empty() {
            peer_addr.to_string()
        } else {
            config.core.advertise.clone()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the membership runtime", e))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let mut config = config;
        config.core.advertise = advertise.clone();
        let thread = std::thread::Builder::new()
            .name("herald-cluster".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match run(config).await {
                        Ok((core, bus)) => {
                            let _ = ready_tx.send(Ok((core.handle().clone(), bus)));
                            let _ = stop_rx.await;
                            drop(core);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| Error::io("cannot start the membership thread", e))?;
        let (handle, bus) = ready_rx
            .recv()
            .map_err(|_| Error::io("membership thread", std::io::Error::other("it stopped during start-up")))??;
        Ok(Membership {
            handle,
            peer_addr,
            advertise,
            bus,
            stop: Mutex::new(Some(stop_tx)),
            stopping: std::sync::atomic::AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Talks to the service: proposals, the table, the Raft status, the join.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The applied membership table (updated after every applied command).
    pub fn state(&self) -> watch::Receiver<Arc<MembershipState>> {
        self.handle.state()
    }

    /// Raft's view: leader, term, commit index, configuration.
    pub fn status(&self) -> watch::Receiver<RaftStatus> {
        self.handle.status()
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.handle.node_id()
    }

    /// The bound peer address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The peer address recorded for this node.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// The control channel of the peer bus (Raft, proposals, pings). Fault injection on it
    /// ([`Transport::cut_off`]) cuts the events channel too.
    pub fn transport(&self) -> &Transport {
        self.bus.control()
    }

    /// The peer bus: the control channel and the events channel the relay sends over.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Proposes `command`; resolves once it is committed and applied on this node.
    pub async fn propose(&self, command: &Command) -> std::result::Result<u64, ProposeError> {
        self.handle.propose(command).await
    }

    /// Waits until this node's `Join` (a rejoin after a restart) committed (see
    /// [`Handle::wait_joined`]).
    pub async fn wait_joined(&self) {
        self.handle.wait_joined().await
    }

    /// Where the applied table and the Raft configuration disagree (see [`Handle::problems`]).
    pub fn problems(&self) -> Vec<MembershipProblem> {
        self.handle.problems()
    }

    /// Why this node must not call itself ready (see [`Handle::unready_reason`]).
    pub fn unready_reason(&self) -> Option<MembershipProblem> {
        self.handle.unready_reason()
    }

    /// Whether the Raft driver still runs (it stops on a storage failure or a raft-rs panic).
    pub fn is_running(&self) -> bool {
        self.handle.is_running()
    }

    /// Whether [`Membership::stop`] was called (the node is shutting down).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops the service (the Raft log stays on disk).
    pub fn stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Release);
        if let Some(tx) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        // The events channel runs on its own thread, which outlives the membership runtime.
        self.bus.shutdown();
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the bus and the service's core inside the service's runtime.
async fn run(config: MembershipConfig) -> Result<(Core, Bus)> {
    let core = config.core;
    let id = core.node_id;
    let mut tc = TransportConfig::new(core.cluster_id.clone(), id, core.advertise.clone()).with_tls(config.tls.clone());
    tc.max_pending_handshakes = config.max_pending_handshakes;
    tc.validate()?;
    let (inbound_tx, inbound_rx) = mpsc::channel::<(u64, Envelope)>(4096);
    let bus = Bus::start(tc, inbound_tx, config.app.clone())?;
    let listener = tokio::net::TcpListener::from_std(config.peer_listener)
        .map_err(|e| Error::io("cannot use the peer listener", e))?;
    bus.serve(listener);
    bus.watch_tls(config.tls_reload);

    let path = config.data_dir.join("raft.redb");
    let store_error = |message: String| Error::Store {
        path: path.clone(),
        message,
    };
    let storage = RedbStorage::open(&path).map_err(|e| store_error(e.to_string()))?;
    let core = Core::start(core, Arc::new(bus.clone()), inbound_rx, storage).map_err(|e| store_error(e.to_string()))?;
    Ok((core, bus))
}

/// The driver's outbound messages onto the control channel: Raft messages and forwarded
/// proposals. A peer that cannot be sent to is reported to the driver (raft-rs then probes it
/// less often).
async fn send_to_peers(
    mut out: mpsc::UnboundedReceiver<Outbound>,
    net: Arc<dyn PeerNet>,
    driver: mpsc::UnboundedSender<Inbound>,
) {
    while let Some(m) = out.recv().await {
        let (to, env) = match m {
            Outbound::Raft { to, bytes } => (to, Envelope::raft(bytes)),
            Outbound::Refuse { to, seq, error } => (
                to,
                Envelope::new(Body::ProposeResult(transport::wire::ProposalResult { id: seq, error })),
            ),
            Outbound::Forward { to, origin, seq, data } => (
                to,
                Envelope::new(Body::Propose(transport::wire::Proposal {
                    id: seq,
                    command: data.into(),
                    origin,
                })),
            ),
        };
        // A joining node knows no members until the leader's snapshot is applied, but it must
        // answer the leader to get that snapshot: dial back a node that dialed us, at the address
        // it advertised in the handshake. (The member table, once applied, sets the address again.)
        net.dial_back(to);
        if let Err(e) = net.send(to, env) {
            tracing::debug!(peer = to, error = %e, "cannot send to peer");
            let _ = driver.send(Inbound::Unreachable(to));
        }
    }
}

/// How long each voter waits for the ones before it to win an early election (see
/// `Ctx::expedite_elections`): a few election round trips on a LAN.
const EXPEDITE_STAGGER: Duration = Duration::from_millis(150);

/// The control channel's inbound messages to their rooms: Raft messages and forwarded proposals
/// to the driver, pings answered at once (with this node's handler progress), pongs to the
/// monitor. Event-plane payloads come in on the events channel, straight to the relay; the bus
/// refuses one arriving here.
async fn dispatch_control(
    mut inbound: mpsc::Receiver<(u64, Envelope)>,
    control: Arc<dyn PeerNet>,
    driver: mpsc::UnboundedSender<Inbound>,
    pongs: mpsc::UnboundedSender<(u64, transport::wire::Pong)>,
    progress: Arc<Progress>,
    reports: Reports,
) {
    // A refusal of this node's join request (sent with id 0 while it is not a member yet).
    let mut join_refused = crate::metrics::LogLimit::default();
    while let Some((from, env)) = inbound.recv().await {
        if control.is_cut_off(from) {
            continue;
        }
        // `from` is the peer the transport authenticated; the driver authorises against it.
        let m = match env.body {
            Some(Body::Raft(bytes)) => Inbound::Raft {
                from,
                bytes: bytes.to_vec(),
            },
            Some(Body::Propose(p)) => Inbound::Forwarded {
                from,
                origin: if p.origin == 0 { from } else { p.origin },
                seq: p.id,
                data: p.command.to_vec(),
            },
            Some(Body::ProposeResult(r)) if r.error.is_empty() => continue,
            Some(Body::ProposeResult(r)) if r.id == 0 => {
                if let Some(suppressed) = join_refused.hit(std::time::Instant::now()) {
                    tracing::warn!(
                        peer = from,
                        suppressed,
                        "the cluster did not take this node's join request: {}",
                        r.error
                    );
                }
                continue;
            }
            Some(Body::ProposeResult(r)) => Inbound::Refused {
                from,
                seq: r.id,
                error: r.error,
            },
            Some(Body::Ping(p)) => {
                let _ = control.send(from, crate::monitor::pong(p.seq, p.sent_unix_nanos, &progress));
                continue;
            }
            Some(Body::Pong(p)) => {
                let _ = pongs.send((from, p));
                continue;
            }
            Some(Body::Suspicions(wire)) => {
                reports.hear(from, &crate::monitor::read_suspicions(&wire));
                continue;
            }
            _ => continue,
        };
        if driver.send(m).is_err() {
            break;
        }
    }
}

/// Keeps `out` set to the other voters while this node is a voter (empty otherwise): the monitor
/// watches them beyond its share of the ring, so that when the leader's process dies the voters
/// see it at once and one of them starts the election (`Ctx::expedite_elections`), whatever the
/// cluster's size.
async fn other_voters(id: u64, mut status: watch::Receiver<RaftStatus>, out: watch::Sender<Vec<u64>>) {
    loop {
        let raft = status.borrow_and_update().clone();
        let voters: Vec<u64> = if raft.voters.contains(&id) {
            raft.voters.iter().copied().filter(|&v| v != id).collect()
        } else {
            Vec::new()
        };
        out.send_if_modified(|v| {
            let changed = *v != voters;
            *v = voters;
            changed
        });
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Where the watchers' reports go on the node that receives them (the leader; a node that is
/// not the leader any more keeps them too, harmlessly: they go stale).
struct Reports {
    state: watch::Receiver<Arc<MembershipState>>,
    suspicions: Arc<Mutex<Suspicions>>,
    changed: Arc<Notify>,
}

impl Reports {
    /// Records the views `from` (the peer the transport authenticated) sent: only a member may
    /// report, and only about other members; anything else is dropped.
    fn hear(&self, from: u64, views: &[Suspicion]) {
        let state = self.state.borrow().clone();
        if state.member(from).is_none() {
            tracing::debug!(peer = from, "dropped suspicions from a node that is not a member");
            return;
        }
        let now = crate::monitor::now();
        let mut suspicions = self.suspicions.lock().unwrap_or_else(|p| p.into_inner());
        for v in views
            .iter()
            .filter(|v| v.node != from && state.member(v.node).is_some())
        {
            suspicions.record(from, v, now);
        }
        drop(suspicions);
        self.changed.notify_one();
    }
}

/// Splits `--join` into whether this node (advertising `advertise`) is its first entry, and the
/// other seeds (this node's own address is never dialled).
fn seeds(join: &[String], advertise: &str) -> (bool, Vec<String>) {
    let first = join.first().is_some_and(|s| s == advertise);
    (first, join.iter().filter(|s| *s != advertise).cloned().collect())
}

/// What the background duties share.
struct Ctx {
    id: u64,
    driver: mpsc::UnboundedSender<Inbound>,
    state: watch::Receiver<Arc<MembershipState>>,
    status: watch::Receiver<RaftStatus>,
    net: Arc<dyn PeerNet>,
    voters: usize,
    load_factor: f64,
    changed: Arc<Notify>,
    health: Arc<Health>,
    down_after: Duration,
    /// The watchers' reports, and this node's own, as the leader combines them.
    suspicions: Arc<Mutex<Suspicions>>,
    /// `cluster.monitors`: how many up members watch each member.
    monitors: usize,
    /// How long an unrepeated report counts.
    stale_after: Duration,
}

impl Ctx {
    async fn propose(&self, data: Vec<u8>) -> std::result::Result<u64, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.driver
            .send(Inbound::Propose { data, reply })
            .map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)?
    }

    async fn conf_change(&self, id: u64, kind: ConfChangeType) -> std::result::Result<u64, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.driver
            .send(Inbound::ConfChange {
                change: raft_node::conf_change(id, kind),
                reply,
            })
            .map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Makes this node a member: proposes `Join` (through a seed when joining) until one of its
    /// proposals committed and the applied table lists this node with its current addresses. A
    /// restarted member proposes it too (a rejoin): it brings the node back `up` if it was marked
    /// down or drained while it was away, and records its current handler kinds.
    async fn join_cluster(self: Arc<Self>, join: Command, seeds: Vec<String>, joined: watch::Sender<bool>) {
        let mut attempt: u32 = 0;
        let mut state = self.state.clone();
        let mut refused = false;
        let mut committed = false;
        // Each seed is probed once: a second probe would be refused as a duplicate of this node's
        // open connection to it, so a lost Join could never be sent again.
        let mut seed_ids: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        loop {
            let me = state.borrow_and_update().member(self.id).cloned();
            if let (Some(me), Some(super::state::command::Kind::Join(want))) = (me, join.kind.as_ref()) {
                if me.http == want.http && me.peer == want.peer && committed {
                    tracing::info!(node_id = self.id, "member of the cluster");
                    joined.send_replace(true);
                    return;
                }
            }
            let leader = self.status.borrow().leader;
            if leader != 0 {
                match self.propose(join.to_bytes()).await {
                    Ok(_) if refused => {
                        tracing::error!(node_id = self.id, "the cluster refused this node's Join (is node id {} already used by a node with other addresses?); remove the old member with DELETE /v1/cluster/nodes/{}", self.id, self.id);
                        return;
                    }
                    Ok(_) => {
                        // Committed: the next turn sees the result (or learns it was refused).
                        refused = true;
                        committed = true;
                        continue;
                    }
                    // The driver is gone (a storage failure, a raft-rs panic): nothing to join
                    // with. Going on would spin: every later proposal and wait fails at once.
                    Err(ProposeError::Stopped) => return,
                    Err(e) => tracing::debug!(error = %e, "join proposal did not commit yet"),
                }
            } else if !seeds.is_empty() {
                // Not in the group yet: ask a seed to forward the Join to its leader.
                for seed in &seeds {
                    // A seed this node already knows (a restarted member's table names it, or
                    // it dialed this node first) is not probed: the probe's control connection
                    // would be refused as a duplicate of the one the bus opened to it, with a
                    // warning about another process using this node id.
                    let known = state
                        .borrow()
                        .members()
                        .values()
                        .find(|m| m.peer == *seed && m.id != self.id)
                        .map(|m| m.id)
                        .or_else(|| self.net.peer_at(seed));
                    let seed_id = match seed_ids.get(seed.as_str()).copied().or(known) {
                        Some(id) => Ok(id),
                        None => match self.net.probe(seed).await {
                            // The bus connected to the seed while the probe was under way.
                            Err(e) if e.is_duplicate() => self.net.peer_at(seed).ok_or(e),
                            probed => probed,
                        },
                    };
                    match seed_id {
                        Ok(seed_id) => {
                            seed_ids.insert(seed, seed_id);
                            self.net.add_peer(seed_id, seed);
                            let env = Envelope::new(Body::Propose(transport::wire::Proposal {
                                id: 0,
                                command: join.to_bytes().into(),
                                origin: 0,
                            }));
                            if let Err(e) = self.net.send(seed_id, env) {
                                tracing::warn!(seed = %seed, error = %e, "cannot send the join request");
                            }
                            break;
                        }
                        Err(e) => {
                            if attempt % 10 == 0 {
                                tracing::warn!(seed = %seed, error = %e, "cannot reach seed; retrying");
                            }
                        }
                    }
                }
            }
            attempt += 1;
            let wait = Duration::from_millis(200u64.saturating_mul(u64::from(attempt.min(10))));
            if let Ok(Err(_)) = tokio::time::timeout(wait, state.changed()).await {
                // The driver (the table's publisher) is gone.
                return;
            }
        }
    }

    /// When the leader's process is gone (its connection broke and it refuses new ones), the
    /// lowest-id voter that is still up starts an election at once instead of waiting out the
    /// election timeout (1–2 s): the rest of a failover (MarkDown, placement) needs a leader. The
    /// next voters follow, one [`EXPEDITE_STAGGER`] apart, while the gone leader is still the one
    /// they know: the first may lose (its log behind theirs, just restarted), and then the others
    /// would otherwise wait the whole election timeout.
    ///
    /// Each voter starts at most one early election per lost leadership (leader and term). An
    /// early election skips pre-vote and raises the term, and every term change wakes the other
    /// voters: when each change started another early election, an election slower than the
    /// stagger (a lost vote) was cut short by the next voter's, whose new term woke the first
    /// again — the deterministic simulation (`tests/simulation.rs`) found a 3-node majority that
    /// elected nobody for two minutes, 765 terms (about 1 % of seeds fail with the old rule). After
    /// its one early try a voter leaves the rest to Raft's randomized election timeout.
    async fn expedite_elections(self: Arc<Self>) {
        let mut health = self.health.subscribe();
        let mut status = self.status.clone();
        // The last leadership this node knew, `(leader, term)`: a candidate's vote request clears
        // the leader that the others know (a new term), and that may happen before this node saw
        // the leader's process gone (the candidate detected it a few milliseconds sooner, then
        // lost).
        let mut last_leader = (0, 0);
        // The leadership this node already started an early election for.
        let mut tried = (0, 0);
        loop {
            tokio::select! {
                // A fixed order (not tokio's random one), so the simulation replays a seed.
                biased;
                r = health.changed() => if r.is_err() { return },
                r = status.changed() => if r.is_err() { return },
            }
            let raft = status.borrow_and_update().clone();
            if raft.leader != 0 {
                last_leader = (raft.leader, raft.term);
            }
            if tried == last_leader {
                continue;
            }
            let Some((leader, rank)) = self.campaign_rank(&raft, last_leader.0) else {
                continue;
            };
            if rank > 0 {
                // Give the voters before this one their turn; a new leader ends the wait (other
                // changes, the gone leader still known or none, do not).
                let _ = tokio::time::timeout(EXPEDITE_STAGGER * rank, async {
                    while status.changed().await.is_ok() {
                        let now = status.borrow_and_update().leader;
                        if now != 0 && now != leader {
                            return;
                        }
                    }
                })
                .await;
                let now = self.campaign_rank(&status.borrow(), leader);
                if now.is_none_or(|(l, _)| l != leader) {
                    continue;
                }
            }
            tried = last_leader;
            let _ = self.driver.send(Inbound::Campaign { gone: leader });
        }
    }

    /// When this voter should start an early election: `(gone leader, rank)`, rank 0 for the
    /// lowest-id voter still routable, 1 for the next… `None` while no leader is gone (suspect
    /// and unreachable: the one this node knows, or `last_leader`, the last one it knew, while it
    /// knows none), or this node leads or does not vote.
    fn campaign_rank(&self, raft: &RaftStatus, last_leader: u64) -> Option<(u64, u32)> {
        let leader = if raft.leader == 0 { last_leader } else { raft.leader };
        if raft.is_leader || leader == 0 || !raft.voters.contains(&self.id) {
            return None;
        }
        let peer = self.health.peer(leader);
        if peer.state() != PeerState::Suspect || !peer.unreachable() {
            return None;
        }
        let rank = raft
            .voters
            .iter()
            .filter(|&&v| v != leader && v < self.id && self.health.peer(v).routable())
            .count();
        Some((leader, rank as u32))
    }

    /// On the leader: keep the Raft configuration and the placement in line with the table.
    ///
    /// One change at a time, each answered before the next is chosen. A change that fails (no
    /// quorum, a timeout, raft-rs refusing it) is tried again after a growing pause, and its
    /// failures are logged once, then once per [`LogLimit::EVERY`](crate::metrics::LogLimit::EVERY) with a count, so a change
    /// that can never commit neither spins nor floods the log.
    async fn leader_duties(self: Arc<Self>) {
        let mut retry = Retry::default();
        // The last state whose placement was found current: the placement is a function of the
        // state alone, so it is computed again only once a command applied (a new state), not on
        // every 100 ms wake-up (at idle, with many subscriptions, that was most of a leader's CPU).
        let mut placed: Option<Arc<MembershipState>> = None;
        let mut raft = self.status.clone();
        // Just became the leader: its duties are looked at once, without waiting.
        let mut new_leader = true;
        loop {
            if !raft.borrow_and_update().is_leader {
                // A follower has no duties: it sleeps until it becomes the leader, rather than
                // waking every 100 ms to find that out (an idle follower's most frequent wake-up).
                retry = Retry::default();
                if raft.changed().await.is_err() {
                    return;
                }
                new_leader = true;
                continue;
            }
            if !std::mem::take(&mut new_leader) {
                let fresh = self
                    .suspicions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .any_fresh(crate::monitor::now(), self.stale_after);
                if fresh {
                    // Short enough to mark a member down soon after `down_after` elapsed.
                    let _ = tokio::time::timeout(Duration::from_millis(100), self.changed.notified()).await;
                } else {
                    // No fresh report: no verdict can fall due with time, so only a change (a
                    // command applied, a report heard, leadership) is worth waking for.
                    tokio::select! {
                        // A fixed order (not tokio's random one), so the simulation replays a seed.
                        biased;
                        () = self.changed.notified() => {}
                        _ = raft.changed() => {}
                    }
                }
            }
            let status = self.status.borrow().clone();
            if !status.is_leader {
                continue;
            }
            let state = self.state.borrow().clone();
            let (what, outcome) = if let Some(action) = next_conf_action(&state, &status, self.voters) {
                match action {
                    ConfAction::Change(id, kind) => {
                        let r = self.conf_change(id, kind).await;
                        if r.is_ok() {
                            tracing::info!(node = id, change = ?kind, "raft configuration change committed");
                        }
                        (format!("raft configuration change {kind:?} of node {id}"), r)
                    }
                    ConfAction::TransferLeader(to) => {
                        tracing::info!(
                            to,
                            "this node left the membership table: handing leadership to node {to}, which removes it"
                        );
                        let _ = self.driver.send(Inbound::TransferLeader(to));
                        // Give the transfer an election's time before asking again.
                        let wait = retry.failed(Instant::now()).0;
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            } else if state.member(self.id).is_none() {
                // Not a member yet (a new cluster's first node before its own `Join` applied) or
                // any more: status and placement are a member's duties.
                continue;
            } else if let Some(command) = self.next_status_change(&state) {
                let r = self.propose(command.to_bytes()).await;
                if r.is_ok() {
                    tracing::warn!(change = command.name(), "member status change committed");
                }
                (format!("member status change {}", command.name()), r)
            } else if placed.as_ref().is_some_and(|p| Arc::ptr_eq(p, &state)) {
                continue;
            } else if let Some(p) = state.proposed_placement(self.load_factor) {
                if !p.unplaced.is_empty() {
                    tracing::warn!(unplaced = ?p.unplaced, "subscriptions no up member can run: start a node with their handler");
                }
                let r = self.propose(p.command().to_bytes()).await;
                if r.is_ok() {
                    tracing::info!(epoch = p.epoch, moved = p.moved, "placement committed");
                }
                (format!("placement epoch {}", p.epoch), r)
            } else {
                placed = Some(state);
                continue;
            };
            match outcome {
                Ok(_) => {
                    retry.succeeded();
                    self.changed.notify_one();
                }
                Err(e) => {
                    let (wait, log) = retry.failed(Instant::now());
                    if let Some(suppressed) = log {
                        tracing::warn!(error = %e, retry_in = ?wait, suppressed, "{what} failed");
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Paces the retries of a leader duty that keeps failing, and says when to log its failure (with
/// the one rate limit of repeated log lines, [`crate::metrics::LogLimit`]).
#[derive(Debug, Default)]
struct Retry {
    /// Failures since the last success.
    failures: u32,
    /// When to log a failure.
    log: crate::metrics::LogLimit,
}

impl Retry {
    /// The first pause after a failure; it doubles with each further failure.
    const FIRST: Duration = Duration::from_millis(100);
    /// The longest pause: a retry still comes soon after the cause (an election) is gone.
    const MAX: Duration = Duration::from_secs(2);
    /// At most one log line per this long for failures in a row.
    #[cfg(test)]
    const LOG_EVERY: Duration = crate::metrics::LogLimit::EVERY;

    fn succeeded(&mut self) {
        *self = Retry::default();
    }

    /// Records a failure at `now`: how long to pause, and `Some(failures not logged before it)`
    /// when this one should be logged.
    fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let wait = Self::FIRST.saturating_mul(1 << self.failures.min(16)).min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        (wait, self.log.hit(now.into_std()))
    }
}

impl Ctx {
    /// `MarkDown` for a member a majority of its watchers saw suspect or degraded for
    /// `down_after` (or gone), `MarkUp` for a down member a majority saw up for `down_after`: the
    /// rule of [`Suspicions`](crate::monitor::Suspicions).
    fn next_status_change(&self, state: &MembershipState) -> Option<Command> {
        // The leader is alive by definition: if others marked it down while it was frozen, it
        // marks itself up again.
        if state.member(self.id).is_some_and(|m| m.status == NodeStatus::Down) {
            return Some(Command::mark_up(self.id));
        }
        let ring = Ring::new(state.members().values().map(|m| (m.id, m.status != NodeStatus::Down)));
        let now = crate::monitor::now();
        let mut suspicions = self.suspicions.lock().unwrap_or_else(|p| p.into_inner());
        suspicions.retain(|id| state.member(id).is_some());
        state.members().values().filter(|m| m.id != self.id).find_map(|m| {
            let committed_up = match m.status {
                NodeStatus::Up => true,
                NodeStatus::Down => false,
                _ => return None,
            };
            let watchers = ring.watchers_of(m.id, self.monitors);
            match suspicions.verdict(m.id, committed_up, &watchers, now, self.down_after, self.stale_after)? {
                Verdict::Down => Some(Command::mark_down(m.id)),
                Verdict::Up => Some(Command::mark_up(m.id)),
            }
        })
    }

    /// This node's monitor's news: recorded here when this node leads, sent to the leader
    /// otherwise (dropped when there is none: news is repeated every ping interval).
    async fn send_news(self: Arc<Self>, mut news: mpsc::UnboundedReceiver<Vec<Suspicion>>) {
        while let Some(views) = news.recv().await {
            let status = self.status.borrow().clone();
            if status.is_leader {
                let now = crate::monitor::now();
                let mut suspicions = self.suspicions.lock().unwrap_or_else(|p| p.into_inner());
                for v in &views {
                    suspicions.record(self.id, v, now);
                }
                drop(suspicions);
                self.changed.notify_one();
            } else if status.leader != 0 && status.leader != self.id {
                let _ = self
                    .net
                    .send(status.leader, crate::monitor::suspicions_envelope(&views));
            }
        }
    }
}

/// What the leader does next about the Raft configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfAction {
    /// Propose this configuration change (raft-rs refuses overlapping ones: one at a time).
    Change(u64, ConfChangeType),
    /// Hand leadership to this voter: the leader has left the membership table, and only another
    /// leader can remove it from the Raft group.
    TransferLeader(u64),
}

/// The one step the leader (`raft.id`) should take next to bring the Raft configuration in line
/// with the voter rule (the first `voters` members by join order vote, the rest learn), or `None`
/// when it follows the rule or must wait.
///
/// The leader never removes itself: a raft-rs leader that commits its own removal keeps leading
/// a group it is not in and drops every proposal. And a leader that is not in the table changes
/// nothing while it is the group's only member: that is a new cluster's first node, whose own
/// `Join` has not been applied yet while another node's already has (nodes started together with
/// one `--join` list); following that table would make the other node a voter and then remove
/// the leader.
pub fn next_conf_action(state: &MembershipState, raft: &RaftStatus, voters: usize) -> Option<ConfAction> {
    let me = raft.id;
    let want = state.voter_set(voters);
    if state.member(me).is_none() {
        let others = raft.voters.iter().chain(&raft.learners).any(|&id| id != me);
        if !others {
            return None;
        }
        // It left the table (`Leave`): hand over to a voter the table keeps, once there is one.
        if let Some(&to) = want.voters.iter().find(|id| **id != me && raft.voters.contains(id)) {
            return Some(ConfAction::TransferLeader(to));
        }
    }
    let steps = want.changes_from(&raft.voters, &raft.learners);
    let step = steps.into_iter().find(|s| match s {
        // Demoting a voter needs joint consensus; the voter rule only demotes when a member
        // leaves, which removes it instead.
        ConfStep::AddLearner(id) => !raft.voters.contains(id),
        ConfStep::Remove(id) => *id != me,
        ConfStep::AddVoter(_) => true,
    })?;
    let (id, kind) = match step {
        ConfStep::AddVoter(id) => (id, ConfChangeType::AddNode),
        ConfStep::AddLearner(id) => (id, ConfChangeType::AddLearnerNode),
        ConfStep::Remove(id) => (id, ConfChangeType::RemoveNode),
    };
    Some(ConfAction::Change(id, kind))
}

/// Something wrong with the membership as one node sees it (see [`membership_problems`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipProblem {
    /// This node is not in the applied membership table (not joined yet, or removed).
    #[error("node {0} is not in the membership table (joining, or removed from the cluster)")]
    NotInTable(u64),
    /// This node is in neither the voters nor the learners of its Raft configuration.
    #[error("node {0} is not in the Raft configuration (voters {1:?}, learners {2:?})")]
    NotInRaftGroup(u64, Vec<u64>, Vec<u64>),
    /// A member of the table is not (yet) in the Raft group.
    #[error("member {0} is not in the Raft group yet")]
    MemberOutsideGroup(u64),
    /// A voter or learner of the Raft group is not (or no longer) in the table.
    #[error("node {0} is in the Raft group but not in the membership table")]
    GroupNodeNotMember(u64),
}

impl MembershipProblem {
    /// Whether this problem is about `node` itself (which makes it unready), rather than about
    /// another member (which the leader is on its way to mend).
    pub fn is_about(&self, node: u64) -> bool {
        match self {
            MembershipProblem::NotInTable(id) | MembershipProblem::NotInRaftGroup(id, ..) => *id == node,
            _ => false,
        }
    }
}

/// Where the applied table and the Raft configuration disagree, as node `raft.id` sees them.
/// Empty when every member is a voter or learner and every voter or learner a member. A short
/// disagreement is normal while a node joins or leaves; one that lasts is a fault, and one about
/// this node itself makes it unready.
pub fn membership_problems(state: &MembershipState, raft: &RaftStatus) -> Vec<MembershipProblem> {
    let me = raft.id;
    let in_group = |id: &u64| raft.voters.contains(id) || raft.learners.contains(id);
    let mut problems = Vec::new();
    if state.member(me).is_none() {
        problems.push(MembershipProblem::NotInTable(me));
    }
    if !in_group(&me) {
        problems.push(MembershipProblem::NotInRaftGroup(
            me,
            raft.voters.clone(),
            raft.learners.clone(),
        ));
    }
    for &id in state.members().keys() {
        if id != me && !in_group(&id) {
            problems.push(MembershipProblem::MemberOutsideGroup(id));
        }
    }
    let mut group: Vec<u64> = raft.voters.iter().chain(&raft.learners).copied().collect();
    group.sort_unstable();
    for id in group {
        if id != me && state.member(id).is_none() {
            problems.push(MembershipProblem::GroupNodeNotMember(id));
        }
    }
    problems
}

/// The monitor watches the committed members; it sits below membership, so it reads them through
/// this trait instead of naming the state.
impl crate::monitor::Members for MembershipState {
    fn member_statuses(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        self.members().values().map(|m| (m.id, m.status != NodeStatus::Down))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(ids: &[u64]) -> MembershipState {
        let mut s = MembershipState::new("c");
        for (i, &id) in ids.iter().enumerate() {
            let cmd = Command::join(id, format!("h{id}:1"), format!("h{id}:2"), ["log"]);
            s.apply(i as u64 + 2, cmd).unwrap();
        }
        s
    }

    #[test]
    fn suspicions_are_taken_only_from_members_about_other_members() {
        let (_tx, state) = watch::channel(Arc::new(joined(&[1, 2, 3])));
        let reports = Reports {
            state,
            suspicions: Arc::new(Mutex::new(Suspicions::default())),
            changed: Arc::new(Notify::new()),
        };
        let gone = |node| Suspicion {
            node,
            state: PeerState::Suspect,
            unreachable: true,
            age: Duration::from_secs(5),
        };
        // The authenticated sender 9 is not a member; 2 reports about itself and a non-member.
        reports.hear(9, &[gone(3)]);
        reports.hear(2, &[gone(2), gone(7)]);
        let verdict = |target, watchers: &[u64]| {
            let s = reports.suspicions.lock().unwrap();
            s.verdict(
                target,
                true,
                watchers,
                std::time::Instant::now(),
                Duration::from_secs(1),
                Duration::from_secs(1),
            )
        };
        assert_eq!(verdict(3, &[9]), None, "a non-member's report is dropped");
        assert_eq!(verdict(2, &[2]), None, "a report about the sender itself is dropped");
        assert_eq!(verdict(7, &[2]), None, "a report about a non-member is dropped");
        // A member about another member counts.
        reports.hear(2, &[gone(3)]);
        assert_eq!(verdict(3, &[2]), Some(Verdict::Down));
        assert_eq!(verdict(3, &[1, 2]), None, "one of two watchers is no majority");
        // Over the wire and back.
        let env = crate::monitor::suspicions_envelope(&[gone(3)]);
        let Some(Body::Suspicions(wire)) = env.body else {
            panic!("not a Suspicions envelope")
        };
        assert_eq!(crate::monitor::read_suspicions(&wire), vec![gone(3)]);
    }

    fn raft(id: u64, voters: &[u64], learners: &[u64]) -> RaftStatus {
        RaftStatus {
            id,
            leader: id,
            is_leader: true,
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            ..Default::default()
        }
    }

    /// Issue 18's formation race: node 1 bootstrapped and leads, node 3's `Join` (sent to the
    /// seed while node 1 started) applied before node 1's own.
    #[test]
    fn a_leader_whose_own_join_is_not_applied_changes_nothing() {
        let state = joined(&[3]);
        assert_eq!(next_conf_action(&state, &raft(1, &[1], &[]), 3), None);
        // Once its Join applied, it adds the other node and never removes itself.
        let state = joined(&[3, 1]);
        assert_eq!(
            next_conf_action(&state, &raft(1, &[1], &[]), 3),
            Some(ConfAction::Change(3, ConfChangeType::AddNode))
        );
        assert_eq!(next_conf_action(&state, &raft(1, &[1, 3], &[]), 3), None);
        // With one voter the rule wants node 3 (it joined first) to vote and node 1 to learn:
        // node 3 is added, node 1 is not demoted (that needs joint consensus), nobody removed.
        assert_eq!(
            next_conf_action(&state, &raft(1, &[1], &[]), 1),
            Some(ConfAction::Change(3, ConfChangeType::AddNode))
        );
        assert_eq!(next_conf_action(&state, &raft(1, &[1, 3], &[]), 1), None);
    }

    #[test]
    fn a_leader_that_left_the_table_hands_over_instead_of_removing_itself() {
        let state = joined(&[2, 3]);
        assert_eq!(
            next_conf_action(&state, &raft(1, &[1, 2, 3], &[]), 3),
            Some(ConfAction::TransferLeader(2))
        );
        // The new leader removes it.
        assert_eq!(
            next_conf_action(&state, &raft(2, &[1, 2, 3], &[]), 3),
            Some(ConfAction::Change(1, ConfChangeType::RemoveNode))
        );
        // With only learners left, one is promoted first; then leadership moves to it.
        assert_eq!(
            next_conf_action(&state, &raft(1, &[1], &[2, 3]), 1),
            Some(ConfAction::Change(2, ConfChangeType::AddNode))
        );
        assert_eq!(
            next_conf_action(&state, &raft(1, &[1, 2], &[3]), 1),
            Some(ConfAction::TransferLeader(2))
        );
    }

    #[test]
    fn problems_name_what_disagrees_and_which_are_about_this_node() {
        let state = joined(&[1, 2, 3]);
        assert_eq!(membership_problems(&state, &raft(1, &[1, 2, 3], &[])), vec![]);
        assert_eq!(membership_problems(&state, &raft(2, &[1, 2], &[3])), vec![]);
        // The formation race's end state, as node 1 saw it: it led a group of one other voter.
        let p = membership_problems(&state, &raft(1, &[3], &[]));
        assert_eq!(
            p,
            vec![
                MembershipProblem::NotInRaftGroup(1, vec![3], vec![]),
                MembershipProblem::MemberOutsideGroup(2),
            ]
        );
        assert!(p[0].is_about(1) && !p[1].is_about(1) && !p[0].is_about(2));
        let p = membership_problems(&joined(&[2]), &raft(1, &[1, 2], &[]));
        assert_eq!(p, vec![MembershipProblem::NotInTable(1)]);
        let p = membership_problems(&joined(&[1]), &raft(1, &[1, 4], &[]));
        assert_eq!(p, vec![MembershipProblem::GroupNodeNotMember(4)]);
    }

    #[test]
    fn retries_back_off_and_log_once_per_period_with_a_count() {
        let mut r = Retry::default();
        let t0 = Instant::now();
        let waits: Vec<(Duration, Option<u64>)> = (0..8).map(|i| r.failed(t0 + Duration::from_secs(i))).collect();
        assert_eq!(waits[0], (Retry::FIRST, Some(0)), "the first failure is logged");
        assert_eq!(waits[1], (Retry::FIRST * 2, None));
        assert_eq!(waits[2], (Retry::FIRST * 4, None));
        assert!(waits.iter().all(|w| w.0 <= Retry::MAX) && waits[7].0 == Retry::MAX);
        assert!(waits[1..].iter().all(|w| w.1.is_none()), "one line per period");
        assert_eq!(
            r.failed(t0 + Retry::LOG_EVERY).1,
            Some(7),
            "then one line with the seven not logged"
        );
        r.succeeded();
        assert_eq!(r.failed(t0 + Retry::LOG_EVERY), (Retry::FIRST, Some(0)));
    }

    #[test]
    fn the_first_seed_bootstraps_and_no_node_dials_itself() {
        let join: Vec<String> = ["h-0:7170", "h-1:7170", "h-2:7170"].map(String::from).to_vec();
        assert_eq!(
            seeds(&join, "h-0:7170"),
            (true, vec!["h-1:7170".into(), "h-2:7170".into()])
        );
        assert_eq!(
            seeds(&join, "h-2:7170"),
            (false, vec!["h-0:7170".into(), "h-1:7170".into()])
        );
        assert_eq!(seeds(&join, "other:7170"), (false, join.clone()));
        assert_eq!(seeds(&[], "h-0:7170"), (false, vec![]));
    }
}
