//! The node: builder, start-up and graceful shutdown wiring.
//!
//! [`NodeBuilder`] collects the configuration, the Rust handlers compiled into the binary and the
//! subscriptions declared at start-up. [`NodeBuilder::start`] opens the store, starts the worker
//! threads, the router and the HTTP server, and replays the WAL; [`RunningNode::shutdown`] undoes
//! it in reverse order. The control operations the HTTP API calls (subscriptions, cluster view)
//! live in [`NodeCore`]; they hold no logic that belongs to the router or the ingress.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Arbiter;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use utoipa::ToSchema;

use tokio::sync::watch;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::handler::supervisor::Policy;
use crate::handler::{HandlerActor, HandlerRegistry, SubscriptionKey};
use crate::ingress::store::Store;
use crate::ingress::{Ingress, StoreDeadLetters};
use crate::membership::raft_node::RaftStatus;
use crate::membership::service::{Membership, MembershipConfig};
use crate::membership::state::{Command, MembershipState};
use crate::monitor::{Health, MonitorConfig, PeerState, Progress};
use crate::placement::NodeStatus;
use crate::relay::{Relay, RelayConfig, RelayRuntime, Returns};
use crate::router::{Placement, Router, RouterParts};
use crate::subscription::{SpecError, SubscriptionSpec};

/// Entry point of the Rust API: `Node::builder()`.
pub struct Node;

impl Node {
    /// A builder with default configuration and no handlers.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }
}

/// Configures and starts a node.
#[derive(Default)]
pub struct NodeBuilder {
    pub(crate) config: Config,
    pub(crate) registry: HandlerRegistry,
    /// Subscriptions declared in code, applied after those of the config file.
    subscriptions: Vec<SubscriptionSpec>,
    metrics: Option<PrometheusHandle>,
}

impl NodeBuilder {
    /// Replaces the configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The configuration, to adjust single settings.
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// Registers a Rust handler: `factory` builds a fresh actor for every instance and restart.
    pub fn handler<A, F>(mut self, name: impl Into<String>, factory: F) -> Self
    where
        A: HandlerActor,
        F: Fn() -> A + Send + Sync + 'static,
    {
        self.registry.register(name, factory);
        self
    }

    /// Declares a one-instance subscription of `topic`/`group` to the Rust handler `handler`.
    pub fn subscribe(self, topic: &str, group: &str, handler: &str) -> Self {
        self.subscription(SubscriptionSpec::rust(topic, group, handler))
    }

    /// Declares a subscription.
    pub fn subscription(mut self, spec: SubscriptionSpec) -> Self {
        self.subscriptions.push(spec);
        self
    }

    /// The Prometheus handle that renders `/metrics` (see [`crate::metrics::install_prometheus`]).
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Reads `herald node` flags, `HERALD_*` variables and the `--config` file into the
    /// configuration (flags beat environment beats file beats defaults).
    pub fn from_env_and_args(mut self) -> Result<Self> {
        use clap::Parser;
        let args = crate::cli::NodeArgs::parse();
        self.config = args.load()?;
        Ok(self)
    }

    /// Runs the whole `herald` command line (`node`, `publish`, `subscribe`, `status`, `bench`)
    /// with this builder's handlers: the one call a user's binary needs in `main`.
    pub fn main(self) -> std::process::ExitCode {
        crate::cli::main_with(self)
    }

    /// Runs the node until SIGINT or SIGTERM, then shuts down gracefully. It owns the process: it
    /// installs the tracing subscriber (`log_format`, `RUST_LOG`) and, unless a handle was given
    /// with [`NodeBuilder::metrics`], the Prometheus recorder. To embed a node in a process that
    /// already has its own, use [`NodeBuilder::start`].
    pub fn run(mut self) -> Result<()> {
        crate::cli::init_logging(self.config.log_format);
        if self.metrics.is_none() {
            self.metrics = Some(crate::metrics::install_prometheus());
        }
        actix_rt::System::new().block_on(async move {
            let node = self.start().await?;
            // Catch SIGTERM/SIGINT before announcing the address: a signal sent as soon as the
            // line appears must drain the node, not kill it with the default action.
            let signal = shutdown_signal();
            // One machine-readable line on stdout, for scripts and tests that start nodes on port 0.
            println!(
                "herald node {} listening on http://{}",
                node.core.config.node_id, node.http_addr
            );
            signal.await;
            tracing::info!("shutdown signal received; draining");
            node.shutdown().await;
            Ok(())
        })
    }

    /// Starts the node inside the current actix system and returns once it serves HTTP (the WAL
    /// replay continues in the background; `/readyz` turns 200 when it is done).
    pub async fn start(self) -> Result<RunningNode> {
        let NodeBuilder {
            mut config,
            registry,
            subscriptions,
            metrics,
        } = self;
        config.subscriptions.extend(subscriptions);
        config.validate()?;
        let h = &config.handlers;
        claim_data_dir(&config)?;
        let store = Store::open(&config.data_dir, config.wal.fsync, config.wal.max_batch)?;
        let workers: Vec<Arbiter> = (0..h.worker_threads()).map(|_| Arbiter::new()).collect();
        let health = Arc::new(Health::default());
        let progress = Arc::new(Progress::new(workers.len()));
        for (i, w) in workers.iter().enumerate() {
            let tick = progress.tick_worker(i);
            w.spawn(tick);
        }
        let returns = Arc::new(Returns::default());
        let router = Arc::new(Router::new(RouterParts {
            registry,
            workers: workers.iter().map(Arbiter::handle).collect(),
            policy: Policy {
                backoff_initial: Duration::from_millis(h.backoff_initial_ms),
                backoff_max: Duration::from_millis(h.backoff_max_ms),
                call_timeout: Duration::from_millis(h.call_timeout_ms),
            },
            dead_letters: Arc::new(StoreDeadLetters(store.clone())),
            mailbox_capacity: h.mailbox_capacity,
            default_max_attempts: h.max_attempts,
            webhook_timeout: Duration::from_millis(h.webhook_timeout_ms),
            me: config.node_id,
            health: health.clone(),
            progress: progress.clone(),
            window: h.mailbox_capacity,
            returns: returns.clone(),
        }));
        // Declared subscriptions must be valid for this binary before anything starts.
        for spec in &config.subscriptions {
            spec.validate(
                config.handlers.max_instances,
                |n| router.registry().contains(n),
                || router.registry().names(),
            )
            .map_err(|e| Error::Subscription {
                topic: spec.topic.clone(),
                group: spec.group.clone(),
                message: e.to_string(),
            })?;
        }
        let addr = http_bind_addr(&config)?;
        let peer_addr = config.peer_addr()?;
        let peer_listener = std::net::TcpListener::bind(peer_addr)
            .map_err(|e| Error::io(format!("cannot bind the peer address {peer_addr} (cluster.peer)"), e))?;
        let secret = match &config.cluster.secret_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| Error::io(format!("cannot read cluster.secret_file {}", path.display()), e))?
                    .trim()
                    .as_bytes()
                    .to_vec(),
            ),
            None => None,
        };
        let (reconciled_tx, reconciled) = watch::channel(0u64);
        let (http_listener, http_addr) = crate::http::bind(addr)?;
        let (app_tx, app_rx) = tokio::sync::mpsc::unbounded_channel();
        let c = &config.cluster;
        let membership = Arc::new(Membership::start(MembershipConfig {
            node_id: config.node_id,
            cluster_id: config.cluster_id.clone(),
            data_dir: config.data_dir.clone(),
            http: config.http_advertise(http_addr),
            peer_listener,
            advertise: config.cluster.advertise.clone(),
            join: config.cluster.join.clone(),
            secret,
            handlers: router.registry().kinds(),
            raft: config.raft.clone(),
            monitor: MonitorConfig {
                ping_interval: Duration::from_millis(c.ping_interval_ms),
                phi_threshold: c.phi_threshold,
                min_std_deviation: Duration::from_millis(c.min_std_deviation_ms),
                degraded_after: Duration::from_millis(c.degraded_after_ms),
            },
            down_after: Duration::from_millis(c.down_after_ms),
            health: health.clone(),
            progress,
            app: app_tx,
        })?);
        let relay_runtime = RelayRuntime::start().map_err(|e| Error::io("cannot start the event relay thread", e))?;
        let relay = Relay::start(
            membership.bus().events().clone(),
            router.clone(),
            health.clone(),
            RelayConfig {
                redeliver_after: Duration::from_millis(c.redeliver_after_ms),
                dedup_window: c.dedup_window,
            },
            relay_runtime.handle(),
            app_rx,
        );
        returns.set(&relay);
        let ingress = Arc::new(Ingress::new(
            router.clone(),
            relay.clone(),
            store.clone(),
            h.max_inflight_bytes,
        ));
        let core = Arc::new(NodeCore {
            config: config.clone(),
            router,
            ingress,
            metrics,
            membership,
            health,
            relay,
            reconciled,
            started: Instant::now(),
        });
        let server = crate::http::server(core.clone(), http_listener, http_addr)?;
        let server_handle = server.handle();
        actix_rt::spawn(server);
        tracing::info!(
            node_id = config.node_id,
            http = %http_addr,
            peer = %core.membership.peer_addr(),
            data_dir = %config.data_dir.display(),
            workers = workers.len(),
            "herald node started"
        );
        actix_rt::spawn(cluster_sync(core.clone(), reconciled_tx));
        Ok(RunningNode {
            core,
            http_addr,
            server: server_handle,
            workers,
            relay_runtime,
        })
    }
}

/// A data dir holds one node's Raft log and WAL: refuse to start another node id on it.
fn claim_data_dir(config: &Config) -> Result<()> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create data dir {}", dir.display()), e))?;
    let file = dir.join("node_id");
    match std::fs::read_to_string(&file) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(id) if id == config.node_id => Ok(()),
            Ok(id) => Err(Error::config(
                "node_id",
                format!(
                    "data dir {} belongs to node {id}; start node {} with its own --data-dir",
                    dir.display(),
                    config.node_id
                ),
            )),
            Err(_) => Err(Error::config(
                "data_dir",
                format!("{} is not a node id file", file.display()),
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::write(&file, format!("{}\n", config.node_id))
            .map_err(|e| Error::io(format!("cannot write {}", file.display()), e)),
        Err(e) => Err(Error::io(format!("cannot read {}", file.display()), e)),
    }
}

/// Follows the membership table: joins, proposes the declared subscriptions, runs the local
/// instances the placement gives this node, replays the WAL once the first placement is in force,
/// and keeps the cluster metrics current.
async fn cluster_sync(core: Arc<NodeCore>, reconciled: watch::Sender<u64>) {
    let membership = core.membership.clone();
    let mut waited = tokio::time::interval(Duration::from_secs(5));
    waited.tick().await;
    tokio::select! {
        _ = membership.wait_joined() => {}
        _ = async { loop { waited.tick().await; tracing::info!("waiting to join the cluster (is a seed in --join reachable?)"); } } => {}
    }
    for spec in core.config.subscriptions.clone() {
        loop {
            match core.propose_subscription(&spec).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(topic = %spec.topic, group = %spec.group, error = %e, "declared subscription not committed yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    let mut state = membership.state();
    let mut status = membership.status();
    let mut replayed = false;
    loop {
        let current = state.borrow_and_update().clone();
        core.reconcile(&current);
        reconciled.send_replace(current.applied_index());
        let raft = status.borrow_and_update().clone();
        update_cluster_metrics(&current, &raft);
        // Replay once every subscription has a placement, so WAL events find their instances.
        if !replayed
            && current
                .subscriptions()
                .keys()
                .all(|k| current.placement().contains_key(k))
        {
            replayed = true;
            let ingress = core.ingress.clone();
            let state_for_replay = current.clone();
            actix_rt::spawn(async move {
                let exists = |topic: &str, group: &str| {
                    state_for_replay.subscriptions().contains_key(&SubscriptionKey {
                        topic: topic.to_string(),
                        group: group.to_string(),
                    })
                };
                match ingress.replay_wal(exists).await {
                    Ok(n) => tracing::info!(events = n, "write-ahead log replayed; node ready"),
                    Err(e) => tracing::error!(error = %e, "cannot replay the write-ahead log; the node stays unready"),
                }
            });
        }
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            r = status.changed() => if r.is_err() {
                tracing::error!("the membership driver stopped: this node no longer follows the cluster and reports unready; restart it");
                return;
            },
        }
    }
}

fn update_cluster_metrics(state: &MembershipState, raft: &RaftStatus) {
    use crate::metrics as m;
    metrics::gauge!(m::RAFT_TERM).set(raft.term as f64);
    metrics::gauge!(m::RAFT_IS_LEADER).set(if raft.is_leader { 1.0 } else { 0.0 });
    metrics::gauge!(m::RAFT_COMMIT_INDEX).set(raft.commit as f64);
    metrics::gauge!(m::PLACEMENT_EPOCH).set(state.epoch() as f64);
    for status in ["up", "suspect", "degraded", "down", "leaving", "draining"] {
        let n = state
            .members()
            .values()
            .filter(|mb| mb.status.as_str() == status)
            .count();
        metrics::gauge!(m::CLUSTER_MEMBERS, "status" => status).set(n as f64);
    }
}

/// Where to bind HTTP: loopback only when no tokens are configured (unless allowed explicitly).
fn http_bind_addr(config: &Config) -> Result<SocketAddr> {
    let addr = config.http_addr()?;
    if config.auth.tokens.is_empty() {
        if addr.ip().is_loopback() {
            tracing::warn!("no auth tokens configured: the API is unauthenticated and served to loopback clients only");
        } else if config.http.allow_unauthenticated_remote {
            tracing::warn!(%addr, "no auth tokens configured and http.allow_unauthenticated_remote is set: the API is open to the network");
        } else {
            let loopback = match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            tracing::warn!(requested = %addr, "no auth tokens configured: binding loopback only; configure [[auth.tokens]] (or http.allow_unauthenticated_remote) to serve other hosts");
            return Ok(SocketAddr::new(loopback, addr.port()));
        }
    }
    Ok(addr)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so a signal arriving in between is caught rather than killing
/// the process. Call it inside a Tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            let mut term = match term {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the node");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
            match int {
                Ok(mut int) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGINT; only SIGTERM stops the node");
                    term.recv().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A started node.
pub struct RunningNode {
    core: Arc<NodeCore>,
    http_addr: SocketAddr,
    server: actix_web::dev::ServerHandle,
    workers: Vec<Arbiter>,
    relay_runtime: RelayRuntime,
}

impl RunningNode {
    /// The address the HTTP API listens on (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Waits until the node is ready: joined, its subscriptions placed, its WAL replayed.
    pub async fn ready(&self) {
        self.core.ingress.wait_ready().await;
    }

    /// The ingress, to publish from Rust without HTTP.
    pub fn ingress(&self) -> &Arc<Ingress> {
        &self.core.ingress
    }

    /// The node's control operations.
    pub fn core(&self) -> &Arc<NodeCore> {
        &self.core
    }

    /// Stops accepting requests, hands this node's subscriptions to other nodes (a `Drain` of
    /// itself, when another member is up to take them), lets queued and forwarded events finish
    /// (up to `shutdown_timeout_ms`; the rest stays in the WAL for the next start), stops the
    /// handlers and flushes the store. The node stays a member: when it starts again it rejoins
    /// and takes work again (`DELETE /v1/cluster/nodes/{id}` removes a node for good).
    pub async fn shutdown(self) {
        self.server.stop(true).await;
        let deadline = Instant::now() + Duration::from_millis(self.core.config.shutdown_timeout_ms);
        self.core.drain_self(deadline).await;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            let queued = self.core.ingress.local_queued() + self.core.relay.in_flight();
            if queued == 0 {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    queued,
                    "shutdown timeout: unfinished events stay in the WAL for the next start"
                );
                break;
            }
            tick.tick().await;
        }
        self.core.router.clear();
        if let Err(e) = self.core.ingress.store().flush().await {
            tracing::error!(error = %e, "final WAL flush failed");
        }
        for w in &self.workers {
            w.stop();
        }
        // The worker threads drop their instances (and the store handles those hold) only as they
        // wind down. Wait until the database is closed, so the data dir can be opened again as soon
        // as this returns (a restart in the same process); give up after a bound, since a handler
        // blocking its thread never lets go.
        let closed = self.core.ingress.store().closed();
        // The node stays a member (a restart resumes it); `DELETE /v1/cluster/nodes/{id}` removes
        // a node for good.
        let membership = self.core.membership.clone();
        let _ = actix_rt::task::spawn_blocking(move || membership.stop()).await;
        let RunningNode {
            core,
            relay_runtime,
            workers,
            ..
        } = self;
        // The relay's pending deliveries hold WAL trackers (and so the store): stop its runtime
        // before waiting for the store to close.
        drop(core);
        drop(workers);
        let _ = actix_rt::task::spawn_blocking(move || drop(relay_runtime)).await;
        if tokio::time::timeout(STORE_CLOSE_TIMEOUT, closed).await.is_err() {
            tracing::warn!("the store is still open: a handler may be blocking its worker thread");
        }
        tracing::info!("herald node stopped");
    }
}

/// How long `RunningNode::shutdown` waits for the store to close after the handlers were stopped.
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request is invalid (4xx).
    #[error(transparent)]
    Invalid(#[from] SpecError),
    /// The change could not be committed (no leader, timeout) (503).
    #[error("{0}")]
    Unavailable(String),
}

/// One member as `/v1/cluster` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MemberView {
    /// Node id.
    pub id: u64,
    /// HTTP address.
    pub http: String,
    /// Peer address (empty until clustering is configured).
    pub peer: String,
    /// `up`, `suspect`, `degraded`, `down` or `leaving`.
    pub status: String,
    /// Phi of the failure detector (0 for this node).
    pub phi: f64,
    /// Whether it votes in the Raft group (otherwise it is a learner).
    pub voter: bool,
    /// Handler kinds this node can run.
    pub handlers: Vec<String>,
}

/// The `/v1/cluster` view.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClusterView {
    /// Cluster name.
    pub cluster_id: String,
    /// The answering node.
    pub node_id: u64,
    /// The Raft leader's node id (absent during an election).
    pub leader: Option<u64>,
    /// Raft term.
    pub term: u64,
    /// Placement epoch.
    pub epoch: u64,
    /// Whether the node is ready: its WAL replayed, and it is a member of both the membership
    /// table and its Raft configuration (as `/readyz`).
    pub ready: bool,
    /// Where the membership table and the Raft configuration disagree as this node sees them:
    /// normal for a moment while a node joins or leaves, a fault if it lasts. Empty when they
    /// agree.
    pub problems: Vec<String>,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// The members.
    pub members: Vec<MemberView>,
}

/// A subscription's placement as `/v1/cluster/placements` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PlacementView {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Placement epoch.
    pub epoch: u64,
    /// Node id per instance.
    pub nodes: Vec<u64>,
}

/// The node's shared state and the control operations on it.
pub struct NodeCore {
    pub(crate) config: Config,
    pub(crate) router: Arc<Router>,
    pub(crate) ingress: Arc<Ingress>,
    pub(crate) metrics: Option<PrometheusHandle>,
    /// The Raft-replicated membership table: members, subscriptions, placement.
    pub(crate) membership: Arc<Membership>,
    /// Peer health from the failure detector.
    pub(crate) health: Arc<Health>,
    /// The event plane to other nodes.
    pub(crate) relay: Arc<Relay>,
    /// The applied index the local router reflects; control calls wait on it so that a
    /// subscription's instances run before the call returns.
    reconciled: watch::Receiver<u64>,
    started: Instant,
}

/// How long a control call waits for its change to be committed and running locally.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

impl NodeCore {
    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The ingress.
    pub fn ingress(&self) -> &Arc<Ingress> {
        &self.ingress
    }

    /// The membership service.
    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    /// The Prometheus text exposition, if a recorder handle was given.
    pub fn render_metrics(&self) -> Option<String> {
        self.metrics.as_ref().map(PrometheusHandle::render)
    }

    /// Checks a subscription: names, counts, and that this binary or some member runs its handler.
    fn validate(&self, spec: &SubscriptionSpec) -> Result<(), SpecError> {
        let registry = self.router.registry();
        let state = self.membership.state().borrow().clone();
        let label = spec.handler.label();
        spec.validate(
            self.config.handlers.max_instances,
            |n| registry.contains(n) || state.members().values().any(|m| m.handlers.contains(&label)),
            || registry.names(),
        )
    }

    /// Runs locally exactly the instances the placement gives this node.
    pub(crate) fn reconcile(&self, state: &MembershipState) {
        let me = self.config.node_id;
        for (key, spec) in state.subscriptions() {
            let local = state.placement_of(key).iter().filter(|n| **n == me).count() as u32;
            if local == 0 {
                self.router.remove(key);
            } else {
                let mut spec = spec.clone();
                spec.instances = local;
                self.router.apply(spec);
            }
        }
        for running in self.router.table().iter() {
            if !state.subscriptions().contains_key(&running.shared.key) {
                self.router.remove(&running.shared.key);
            }
        }
        self.router.set_placement(Placement {
            epoch: state.epoch(),
            subscriptions: state
                .subscriptions()
                .keys()
                .map(|k| {
                    let nodes = state
                        .placement_of(k)
                        .iter()
                        .copied()
                        .filter(|n| state.member(*n).is_some())
                        .collect();
                    (k.clone(), nodes)
                })
                .collect(),
        });
    }

    /// On shutdown: when another member is up to take over, drains this node (its subscriptions
    /// move) and waits until the placement no longer names it, or until `deadline`.
    async fn drain_self(&self, deadline: Instant) {
        let me = self.config.node_id;
        let state = self.membership.state().borrow().clone();
        let raft = self.membership.status().borrow().clone();
        // A node that was removed (DELETE) may not have applied its removal, but it is no longer
        // in its own Raft configuration, or no longer a member: nothing to hand over, and no
        // proposal of its would commit.
        let in_group = raft.voters.contains(&me) || raft.learners.contains(&me);
        if state.member(me).is_none() || !in_group {
            return;
        }
        let holds_work = state.placement().values().any(|nodes| nodes.contains(&me));
        let others = state
            .members()
            .values()
            .any(|m| m.id != me && m.status == NodeStatus::Up && self.health.peer(m.id).routable());
        if !holds_work || !others || !self.membership.is_running() {
            return;
        }
        tracing::info!("handing this node's subscriptions to other nodes before stopping");
        let left = deadline.saturating_duration_since(Instant::now());
        let drain = async {
            let index = self.membership.propose(&Command::drain(me)).await.ok()?;
            self.settle(index, |s| s.placement().values().all(|nodes| !nodes.contains(&me)))
                .await;
            Some(())
        };
        match tokio::time::timeout(left, drain).await {
            Ok(Some(())) => tracing::info!("subscriptions handed over"),
            _ => tracing::warn!("could not hand the subscriptions over in time; stopping anyway"),
        }
    }

    /// Waits until the local router reflects applied index `index` and `done` holds.
    async fn settle(&self, index: u64, done: impl Fn(&MembershipState) -> bool) {
        let mut reconciled = self.reconciled.clone();
        let state = self.membership.state();
        let wait = async {
            loop {
                if *reconciled.borrow_and_update() >= index && done(&state.borrow()) {
                    return;
                }
                if reconciled.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(CONTROL_TIMEOUT, wait).await.is_err() {
            tracing::warn!(
                index,
                "change committed but not yet running here after {CONTROL_TIMEOUT:?}"
            );
        }
    }

    /// Proposes `spec` through Raft and waits until it is committed.
    async fn propose_subscription(&self, spec: &SubscriptionSpec) -> Result<u64, ControlError> {
        self.membership
            .propose(&Command::subscribe(spec))
            .await
            .map_err(|e| ControlError::Unavailable(e.to_string()))
    }

    /// Creates or updates a subscription (committed through Raft on any node); returns whether it
    /// was new or changed. Returns once its placement is in force here.
    pub async fn create_subscription(&self, spec: SubscriptionSpec) -> Result<bool, ControlError> {
        self.validate(&spec)?;
        let key = SubscriptionKey {
            topic: spec.topic.clone(),
            group: spec.group.clone(),
        };
        let before = self.membership.state().borrow().subscriptions().get(&key).cloned();
        if before.as_ref() == Some(&spec) {
            return Ok(false);
        }
        let index = self.propose_subscription(&spec).await?;
        self.settle(index, |s| {
            s.subscriptions().get(&key) != Some(&spec) || s.placement().contains_key(&key)
        })
        .await;
        let now = self.membership.state().borrow().subscriptions().get(&key).cloned();
        if now.as_ref() != Some(&spec) {
            return Err(ControlError::Unavailable(format!(
                "subscription {key} was refused or changed concurrently"
            )));
        }
        Ok(true)
    }

    /// Deletes a subscription; returns whether it existed. Queued events finish first.
    pub async fn delete_subscription(&self, topic: &str, group: &str) -> Result<bool, ControlError> {
        let key = SubscriptionKey {
            topic: topic.to_string(),
            group: group.to_string(),
        };
        if !self.membership.state().borrow().subscriptions().contains_key(&key) {
            return Ok(false);
        }
        let index = self
            .membership
            .propose(&Command::unsubscribe(topic, group))
            .await
            .map_err(|e| ControlError::Unavailable(e.to_string()))?;
        self.settle(index, |s| !s.subscriptions().contains_key(&key)).await;
        Ok(true)
    }

    /// Removes node `id` from the cluster (`Leave`); returns whether it was a member.
    pub async fn remove_node(&self, id: u64) -> Result<bool, ControlError> {
        self.node_command(id, Command::leave(id), |s| s.member(id).is_none())
            .await
    }

    /// Moves every instance off node `id` (`Drain`); returns whether it was a member.
    pub async fn drain_node(&self, id: u64) -> Result<bool, ControlError> {
        self.node_command(id, Command::drain(id), |s| {
            s.placement().values().all(|nodes| !nodes.contains(&id))
        })
        .await
    }

    async fn node_command(
        &self,
        id: u64,
        command: Command,
        done: impl Fn(&MembershipState) -> bool,
    ) -> Result<bool, ControlError> {
        if self.membership.state().borrow().member(id).is_none() {
            return Ok(false);
        }
        let index = self
            .membership
            .propose(&command)
            .await
            .map_err(|e| ControlError::Unavailable(e.to_string()))?;
        self.settle(index, done).await;
        Ok(true)
    }

    /// The subscriptions, with defaults filled in.
    pub fn subscriptions(&self) -> Vec<SubscriptionSpec> {
        self.membership
            .state()
            .borrow()
            .subscriptions()
            .values()
            .map(|s| {
                let mut spec = s.clone();
                spec.max_attempts = Some(spec.max_attempts.unwrap_or(self.config.handlers.max_attempts));
                spec
            })
            .collect()
    }

    /// The cluster as this node sees it: the committed table and Raft's status.
    pub fn cluster(&self, _http_addr: SocketAddr) -> ClusterView {
        let state = self.membership.state().borrow().clone();
        let raft = self.membership.status().borrow().clone();
        let problems = crate::membership::service::membership_problems(&state, &raft);
        let member = !problems.iter().any(|p| p.is_about(self.config.node_id));
        ClusterView {
            cluster_id: self.config.cluster_id.clone(),
            node_id: self.config.node_id,
            leader: (raft.leader != 0).then_some(raft.leader),
            term: raft.term,
            epoch: state.epoch(),
            ready: self.ingress.is_ready() && member,
            problems: problems.iter().map(ToString::to_string).collect(),
            uptime_seconds: self.started.elapsed().as_secs(),
            members: state
                .members()
                .values()
                .map(|m| MemberView {
                    id: m.id,
                    http: m.http.clone(),
                    peer: m.peer.clone(),
                    status: self.member_status(m.id, m.status).to_string(),
                    phi: if m.id == self.config.node_id {
                        0.0
                    } else {
                        self.health.peer(m.id).phi()
                    },
                    voter: raft.voters.contains(&m.id),
                    handlers: m.handlers.iter().cloned().collect(),
                })
                .collect(),
        }
    }

    /// A member's status as this node reports it: the committed one, except that an `up` member
    /// this node's detector suspects (or sees degraded) shows that, before the leader acts on it.
    fn member_status(&self, id: u64, committed: NodeStatus) -> &'static str {
        if committed == NodeStatus::Up && id != self.config.node_id {
            match self.health.peer(id).state() {
                PeerState::Up => {}
                other => return other.as_str(),
            }
        }
        committed.as_str()
    }

    /// `(id, HTTP address)` of every other member (for requests that span the cluster).
    pub fn other_members_http(&self) -> Vec<(u64, String)> {
        self.membership
            .state()
            .borrow()
            .members()
            .values()
            .filter(|m| m.id != self.config.node_id)
            .map(|m| (m.id, m.http.clone()))
            .collect()
    }

    /// Where every subscription's instances run (committed placement).
    pub fn placements(&self) -> Vec<PlacementView> {
        let state = self.membership.state().borrow().clone();
        state
            .subscriptions()
            .keys()
            .map(|k| PlacementView {
                topic: k.topic.clone(),
                group: k.group.clone(),
                epoch: state.epoch(),
                nodes: state.placement_of(k).to_vec(),
            })
            .collect()
    }
}
