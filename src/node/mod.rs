//! The node: builder, start-up and graceful shutdown wiring.
//!
//! [`NodeBuilder`] collects the configuration, the Rust handlers compiled into the binary and the
//! subscriptions declared at start-up. [`NodeBuilder::start`] opens the store, starts the worker
//! threads, the router and the HTTP server, and replays the WAL; [`RunningNode::shutdown`] undoes
//! it in reverse order. The control operations the HTTP API calls (subscriptions, cluster view)
//! live in [`NodeCore`] (in `control`, re-exported here); they hold no logic that belongs to the
//! router or the ingress.
//!
//! This module must not depend on `cli`: the entry points that own the process
//! ([`NodeBuilder::main`], [`NodeBuilder::run`], [`NodeBuilder::from_env_and_args`]) are defined
//! there, so the layering is `cli` → `node` → `http` → `control`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Arbiter;
use metrics_exporter_prometheus::PrometheusHandle;

use tokio::sync::watch;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::handler::supervisor::Policy;
use crate::handler::{HandlerActor, HandlerRegistry};
use crate::ingress::store::Store;
use crate::ingress::{AckMode, Ingress, PublishError, Published, StoreDeadLetters};
use crate::membership::raft_node::DriverConfig;
use crate::membership::raft_node::RaftStatus;
use crate::membership::service::{CoreConfig, Membership, MembershipConfig};
use crate::membership::state::MembershipState;
use crate::monitor::{Health, MonitorConfig, Progress};
use crate::relay::{Relay, RelayConfig};
use crate::router::{Router, RouterParts, Workers};
use crate::subscription::SubscriptionSpec;
// The control operations and their views live in `control`, below both `http` (which calls them)
// and this module (which starts the HTTP server); this is their public path.
pub use crate::control::{
    ClusterDeadLetters, ClusterView, ControlError, DeadLettersError, MemberView, NodeCore, PlacementView,
    MAX_DEAD_LETTER_PAGE, PEER_REQUESTS_REFUSED,
};

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
    pub(crate) metrics: Option<PrometheusHandle>,
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

    /// Starts the node inside the current actix system and returns once it serves HTTP (the WAL
    /// replay continues in the background; `/readyz` turns 200 when it is done).
    pub async fn start(self) -> Result<RunningNode> {
        let NodeBuilder {
            mut config,
            registry,
            subscriptions,
            metrics,
        } = self;
        for (file, code) in config.declare(subscriptions) {
            tracing::warn!(
                subscription = %format!("{}/{}", code.topic, code.group),
                config_file = %serde_json::to_string(&file).unwrap_or_default(),
                code = %serde_json::to_string(&code).unwrap_or_default(),
                "a [[subscriptions]] entry of the config file is overridden by the one declared in code (NodeBuilder::subscribe/subscription), which wins"
            );
        }
        config.validate()?;
        // Into whatever recorder is installed (none: no-ops).
        zero_counters();
        let h = &config.handlers;
        claim_data_dir(&config)?;
        let store = Store::open(
            &config.data_dir,
            &config.wal,
            crate::ingress::store::Retention::of(&config.handlers),
        )?;
        let workers: Vec<Arbiter> = (0..h.worker_threads()).map(|_| Arbiter::new()).collect();
        let health = Arc::new(Health::default());
        let progress = Arc::new(Progress::new(workers.len()));
        for (i, w) in workers.iter().enumerate() {
            let tick = progress.tick_worker(i);
            w.spawn(tick);
        }
        let (returns, returned) = crate::relay::returns();
        let in_flight = crate::ingress::InFlight::new(h.max_inflight_bytes);
        let router = Arc::new(Router::new(RouterParts {
            registry,
            workers: Workers::Arbiters(workers.iter().map(Arbiter::handle).collect()),
            policy: Policy {
                backoff_initial: Duration::from_millis(h.backoff_initial_ms),
                backoff_max: Duration::from_millis(h.backoff_max_ms),
                call_timeout: Duration::from_millis(h.call_timeout_ms),
            },
            dead_letters: Arc::new(StoreDeadLetters(store.clone())),
            mailbox_capacity: h.mailbox_capacity,
            default_max_attempts: h.max_attempts,
            webhook_timeout: Duration::from_millis(h.webhook_timeout_ms),
            webhook_policy: Arc::new(config.webhook_policy()?),
            me: config.node_id,
            health: health.clone(),
            progress: progress.clone(),
            window: h.mailbox_capacity,
            returns: Arc::new(returns),
            untracked: in_flight.clone(),
        }));
        // Declared subscriptions must be valid for this binary before anything starts.
        let egress = config.webhook_policy()?;
        for spec in &config.subscriptions {
            spec.check_egress(&egress).map_err(|e| Error::Subscription {
                topic: spec.topic.clone(),
                group: spec.group.clone(),
                message: e.to_string(),
            })?;
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
        let tls = peer_tls(&config)?;
        let addr = http_bind_addr(&config)?;
        let peer_addr = config.peer_addr()?;
        let peer_listener = std::net::TcpListener::bind(peer_addr)
            .map_err(|e| Error::io(format!("cannot bind the peer address {peer_addr} (cluster.peer)"), e))?;
        let (reconciled_tx, reconciled) = watch::channel(0u64);
        let (http_listener, http_addr) = crate::http::bind(addr)?;
        let (app_tx, app_rx) = tokio::sync::mpsc::channel(crate::transport::APP_QUEUE);
        let c = &config.cluster;
        let membership = Arc::new(Membership::start(MembershipConfig {
            core: CoreConfig {
                node_id: config.node_id,
                cluster_id: config.cluster_id.clone(),
                http: config.http_advertise(http_addr),
                advertise: config.cluster.advertise.clone(),
                join: config.cluster.join.clone(),
                handlers: router.registry().kinds(),
                driver: DriverConfig::from_raft(config.node_id, &config.raft),
                voters: config.raft.voters,
                load_factor: config.raft.load_factor,
                monitor: MonitorConfig::from_cluster(c),
                down_after: Duration::from_millis(c.down_after_ms),
                health: health.clone(),
                progress,
                join_approval: c.join_approval,
            },
            data_dir: config.data_dir.clone(),
            peer_listener,
            tls,
            tls_reload: Duration::from_millis(config.peer_tls.reload_interval_ms),
            app: app_tx,
            max_pending_handshakes: c.max_pending_handshakes,
        })?);
        // Dead-letter requests from other members: the relay receives them, the control layer
        // answers them from the ingress's store (`serve_peer_asks`, started once the core exists).
        let (asks_tx, asks_rx) = tokio::sync::mpsc::channel(crate::relay::ASK_QUEUE);
        // The relay runs on the bus's `herald-events` thread, next to the events connections it
        // feeds and drains: an event changes threads once per node on its way, not twice
        // (ARCHITECTURE.md, "Threads and runtimes").
        let relay = Relay::start(
            Arc::new(membership.bus().events().clone()),
            router.clone(),
            health.clone(),
            RelayConfig {
                redeliver_after: Duration::from_millis(c.redeliver_after_ms),
                dedup_window: c.dedup_window,
            },
            membership.bus().events().runtime().clone(),
            app_rx,
            returned,
            asks_tx,
        );
        let ingress = Arc::new(Ingress::new(
            router.clone(),
            relay.clone(),
            store.clone(),
            in_flight,
            crate::telemetry::Sampler::new(config.telemetry.sample_ratio),
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
        actix_rt::spawn(crate::control::serve_peer_asks(Arc::downgrade(&core), asks_rx));
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
        let sync = actix_rt::spawn(cluster_sync(core.clone(), reconciled_tx));
        Ok(RunningNode {
            core,
            http_addr,
            server: server_handle,
            workers,
            sync,
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
        if !replayed && Ingress::may_replay(&current) {
            replayed = true;
            let ingress = core.ingress.clone();
            let state_for_replay = current.clone();
            actix_rt::spawn(async move {
                match ingress.replay_for(&state_for_replay).await {
                    Ok(n) => tracing::info!(events = n, "write-ahead log replayed; node ready"),
                    Err(e) => tracing::error!(error = %e, "cannot replay the write-ahead log; the node stays unready"),
                }
            });
        }
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            r = status.changed() => if r.is_err() {
                if core.membership.is_stopping() {
                    // The node is shutting down: the driver ended because it was asked to.
                    return;
                }
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
    /// The task that follows the membership table (`cluster_sync`); it ends when the membership
    /// service stops, and shutdown waits for it, so nothing of the node runs after `shutdown`.
    sync: actix_rt::task::JoinHandle<()>,
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

    /// A cloneable handle that publishes into this node from Rust, for example from the routes
    /// of the actix-web application the node is embedded in (keep it in `web::Data`).
    pub fn publisher(&self) -> Publisher {
        Publisher {
            ingress: Arc::downgrade(&self.core.ingress),
            timeout: Publisher::DEFAULT_TIMEOUT,
        }
    }

    /// Publishes one event into this node (as `POST /v1/topics/{topic}/events` does).
    pub async fn publish(&self, event: Event, ack: AckMode) -> std::result::Result<Published, PublishError> {
        self.publisher().publish(event, ack).await
    }

    /// Publishes one event with `ack=none` without waiting or an answer ([`Publisher::emit`]).
    pub fn emit(&self, event: Event) -> std::result::Result<(), PublishError> {
        self.core.ingress.emit(event)
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
        // When the whole cluster stops (`herald up`'s Ctrl-C), every other member drains itself
        // too, or is gone: there is nobody to hand over to, so the hand-over stops waiting.
        tokio::select! {
            biased;
            _ = self.core.drain_self(deadline) => {}
            _ = nobody_stays(&self.core) => tracing::info!("every other member is stopping or unreachable too: nothing to hand over to"),
        }
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
        // Stopping it stops the bus and joins `herald-events`, which ends the relay's tasks: its
        // pending deliveries hold WAL trackers (and so the store), so this comes before waiting
        // for the store to close.
        let membership = self.core.membership.clone();
        let _ = actix_rt::task::spawn_blocking(move || membership.stop()).await;
        let RunningNode {
            core, workers, sync, ..
        } = self;
        // It sees the membership service's status close and ends (as a normal stop, not a fault).
        let _ = sync.await;
        drop(core);
        drop(workers);
        if tokio::time::timeout(STORE_CLOSE_TIMEOUT, closed).await.is_err() {
            tracing::warn!("the store is still open: a handler may be blocking its worker thread");
        }
        tracing::info!("herald node stopped");
    }
}

/// Resolves when no other member is left to take this node's work: each is draining, leaving,
/// down, or unreachable from here (its connection broke), or the membership service stopped.
/// Pending while one is up and reachable.
async fn nobody_stays(core: &NodeCore) {
    let me = core.config.node_id;
    let mut state = core.membership.state();
    // Every change of a peer's state or reachability is announced here.
    let mut health = core.health.subscribe();
    loop {
        health.mark_unchanged();
        let stays = state.borrow_and_update().members().values().any(|m| {
            let peer = core.health.peer(m.id);
            m.id != me && m.status == crate::types::NodeStatus::Up && peer.routable() && !peer.unreachable()
        });
        if !stays {
            return;
        }
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            r = health.changed() => if r.is_err() { return },
        }
    }
}

/// Publishes into a running node from Rust, without HTTP: the same checks, ack modes and
/// answers as the HTTP publish routes. Cheap to clone, and it keeps nothing of the node alive: a
/// handle held after [`RunningNode::shutdown`] (in an application's state, or by a handler that
/// publishes what follows from its events) neither delays the shutdown nor holds the node's WAL
/// open; its publishes are then refused with [`PublishError::Unavailable`].
#[derive(Clone)]
pub struct Publisher {
    ingress: std::sync::Weak<Ingress>,
    /// How long `ack=processed` waits before answering [`PublishError::Timeout`].
    timeout: Duration,
}

impl Publisher {
    /// The `ack=processed` wait of a new handle: the HTTP API's default `timeout_ms`.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// The same handle with another `ack=processed` wait.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The node's ingress while the node runs.
    fn ingress(&self) -> std::result::Result<Arc<Ingress>, PublishError> {
        self.ingress
            .upgrade()
            .ok_or(PublishError::Unavailable(crate::ingress::StoreError::Stopped))
    }

    /// Publishes one event: its answer, or why it was refused.
    pub async fn publish(&self, event: Event, ack: AckMode) -> std::result::Result<Published, PublishError> {
        self.ingress()?.publish(event, ack, self.timeout).await
    }

    /// Publishes one event with `ack=none`, answering only whether it was accepted, without
    /// waiting (callable from a synchronous actor handler): see [`Ingress::emit`].
    pub fn emit(&self, event: Event) -> std::result::Result<(), PublishError> {
        self.ingress()?.emit(event)
    }

    /// Publishes events all or none, answering each in order.
    pub async fn publish_batch(
        &self,
        events: Vec<Event>,
        ack: AckMode,
    ) -> std::result::Result<Vec<Published>, PublishError> {
        self.ingress()?.publish_batch(events, ack, self.timeout).await
    }
}

/// How long `RunningNode::shutdown` waits for the store to close after the handlers were stopped.
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The node's peer TLS material, loaded and checked, or `None` for insecure peers (warned about).
fn peer_tls(config: &Config) -> Result<Option<Arc<crate::transport::PeerTls>>> {
    use crate::config::PeerSecurity;
    match config.peer_security()? {
        PeerSecurity::Tls { ca, cert, key } => {
            let files = crate::transport::TlsFiles { ca, cert, key };
            let tls = crate::transport::PeerTls::from_files(files, &config.cluster_id, config.node_id)
                .map_err(|e| Error::config("peer_tls", e.to_string()))?;
            Ok(Some(Arc::new(tls)))
        }
        PeerSecurity::Insecure => {
            tracing::warn!(
                "insecure peers: the peer transport is plaintext and unauthenticated (loopback only), so any \
                 local process can act as a node; for development only — give nodes certificates with `herald cert`"
            );
            Ok(None)
        }
    }
}

/// Serves at 0, from the start, the counters of rare events whose series are known in advance
/// (no labels, or labels from a closed set). A counter that appears only at its first increment
/// loses that increment in `rate()` and `increase()` (the first sample is their baseline), so an
/// alert on a first quarantined WAL record or a first refused connection would never fire.
/// Here, not in `metrics`, which every layer uses: the names belong to the layers above it.
fn zero_counters() {
    use crate::metrics::{DEAD_LETTERS_EXPIRED, STORE_COMPACTIONS, WAL_QUARANTINED};
    use crate::transport::{CONNECTIONS_REFUSED_TOTAL, TLS_RELOADS_TOTAL, WRONG_CHANNEL_TOTAL};
    for name in [
        STORE_COMPACTIONS,
        WAL_QUARANTINED,
        crate::control::PEER_REQUESTS_REFUSED,
    ] {
        metrics::counter!(name).increment(0);
    }
    for (name, label, values) in [
        (DEAD_LETTERS_EXPIRED, "reason", ["age", "count"]),
        (TLS_RELOADS_TOTAL, "outcome", ["ok", "refused"]),
        (CONNECTIONS_REFUSED_TOTAL, "reason", ["too_many_pending", "handshake"]),
        (WRONG_CHANNEL_TOTAL, "channel", ["control", "events"]),
    ] {
        for value in values {
            metrics::counter!(name, label => value).increment(0);
        }
    }
}
