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

use crate::config::Config;
use crate::error::{Error, Result};
use crate::handler::supervisor::Policy;
use crate::handler::{HandlerActor, HandlerRegistry, SubscriptionKey};
use crate::ingress::store::Store;
use crate::ingress::{Ingress, StoreDeadLetters};
use crate::router::{Router, RouterParts};
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
        let store = Store::open(&config.data_dir, config.wal.fsync, config.wal.max_batch)?;
        let workers: Vec<Arbiter> = (0..h.worker_threads()).map(|_| Arbiter::new()).collect();
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
        }));
        let ingress = Arc::new(Ingress::new(router.clone(), store.clone(), h.max_inflight_bytes));
        let core = Arc::new(NodeCore {
            config: config.clone(),
            router,
            ingress,
            metrics,
            started: Instant::now(),
        });
        // Stored subscriptions first, then the declared ones (which win and are stored).
        let stored = store.subscriptions().map_err(|e| Error::Store {
            path: store.path().to_path_buf(),
            message: e.0,
        })?;
        for spec in stored {
            if let Err(e) = core.validate(&spec) {
                tracing::error!(topic = %spec.topic, group = %spec.group, error = %e, "stored subscription cannot run on this node; skipping it");
                continue;
            }
            core.router.apply(spec);
        }
        for spec in &config.subscriptions {
            core.create_subscription(spec.clone())
                .await
                .map_err(|e| Error::Subscription {
                    topic: spec.topic.clone(),
                    group: spec.group.clone(),
                    message: e.to_string(),
                })?;
        }
        let addr = http_bind_addr(&config)?;
        let (server, http_addr) = crate::http::server(core.clone(), addr)?;
        let server_handle = server.handle();
        actix_rt::spawn(server);
        tracing::info!(node_id = config.node_id, http = %http_addr, data_dir = %config.data_dir.display(), workers = workers.len(), "herald node started");
        let replayer = core.ingress.clone();
        actix_rt::spawn(async move {
            match replayer.replay_wal().await {
                Ok(n) => tracing::info!(events = n, "write-ahead log replayed; node ready"),
                Err(e) => tracing::error!(error = %e, "cannot replay the write-ahead log; the node stays unready"),
            }
        });
        metrics::gauge!(crate::metrics::CLUSTER_MEMBERS, "status" => "up").set(1.0);
        metrics::gauge!(crate::metrics::PLACEMENT_EPOCH).set(0.0);
        Ok(RunningNode {
            core,
            http_addr,
            server: server_handle,
            workers,
        })
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
}

impl RunningNode {
    /// The address the HTTP API listens on (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The ingress, to publish from Rust without HTTP.
    pub fn ingress(&self) -> &Arc<Ingress> {
        &self.core.ingress
    }

    /// The node's control operations.
    pub fn core(&self) -> &Arc<NodeCore> {
        &self.core
    }

    /// Stops accepting requests, lets queued events finish (up to `shutdown_timeout_ms`; the rest
    /// stays in the WAL for the next start), stops the handlers and flushes the store.
    pub async fn shutdown(self) {
        self.server.stop(true).await;
        let deadline = Instant::now() + Duration::from_millis(self.core.config.shutdown_timeout_ms);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            let queued = self.core.ingress.queued();
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
        drop(self);
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
    /// The store failed (503).
    #[error("{0}")]
    Store(String),
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
    /// The leader's node id (this node while it runs alone).
    pub leader: Option<u64>,
    /// Raft term (0 while the node runs alone).
    pub term: u64,
    /// Placement epoch.
    pub epoch: u64,
    /// Whether the WAL has been replayed.
    pub ready: bool,
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
    started: Instant,
}

impl NodeCore {
    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The ingress.
    pub fn ingress(&self) -> &Arc<Ingress> {
        &self.ingress
    }

    /// The Prometheus text exposition, if a recorder handle was given.
    pub fn render_metrics(&self) -> Option<String> {
        self.metrics.as_ref().map(PrometheusHandle::render)
    }

    fn validate(&self, spec: &SubscriptionSpec) -> Result<(), SpecError> {
        let registry = self.router.registry();
        spec.validate(
            self.config.handlers.max_instances,
            |n| registry.contains(n),
            || registry.names(),
        )
    }

    /// Creates or updates a subscription; returns whether it was new or changed.
    pub async fn create_subscription(&self, spec: SubscriptionSpec) -> Result<bool, ControlError> {
        self.validate(&spec)?;
        self.ingress
            .store()
            .put_subscription(spec.clone())
            .await
            .map_err(|e| ControlError::Store(e.0))?;
        Ok(self.router.apply(spec))
    }

    /// Deletes a subscription; returns whether it existed. Queued events finish first.
    pub async fn delete_subscription(&self, topic: &str, group: &str) -> Result<bool, ControlError> {
        let stored = self
            .ingress
            .store()
            .delete_subscription(topic, group)
            .await
            .map_err(|e| ControlError::Store(e.0))?;
        let running = self.router.remove(&SubscriptionKey {
            topic: topic.to_string(),
            group: group.to_string(),
        });
        Ok(stored || running)
    }

    /// The running subscriptions, with defaults filled in.
    pub fn subscriptions(&self) -> Vec<SubscriptionSpec> {
        self.router
            .table()
            .iter()
            .map(|s| {
                let mut spec = s.spec.clone();
                spec.max_attempts = Some(s.shared.max_attempts);
                spec
            })
            .collect()
    }

    /// The cluster as this node sees it (one member until Raft membership lands).
    pub fn cluster(&self, http_addr: SocketAddr) -> ClusterView {
        ClusterView {
            cluster_id: self.config.cluster_id.clone(),
            node_id: self.config.node_id,
            leader: Some(self.config.node_id),
            term: 0,
            epoch: 0,
            ready: self.ingress.is_ready(),
            uptime_seconds: self.started.elapsed().as_secs(),
            members: vec![MemberView {
                id: self.config.node_id,
                http: http_addr.to_string(),
                peer: String::new(),
                status: "up".to_string(),
                phi: 0.0,
                handlers: self.router.registry().kinds(),
            }],
        }
    }

    /// Every subscription's instances are on this node.
    pub fn placements(&self) -> Vec<PlacementView> {
        self.router
            .table()
            .iter()
            .map(|s| PlacementView {
                topic: s.spec.topic.clone(),
                group: s.spec.group.clone(),
                epoch: 0,
                nodes: vec![self.config.node_id; s.spec.instances as usize],
            })
            .collect()
    }
}
