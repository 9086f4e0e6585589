//! The control operations the HTTP API calls, and the node's shared state they act on.
//!
//! [`NodeCore`] holds what a running node shares between its parts (configuration, router,
//! ingress, membership, health, relay) and offers the control operations on it: creating and
//! deleting subscriptions through Raft, removing and draining nodes, and the cluster, member and
//! placement views of `/v1/cluster`. The operations hold no logic that belongs to the router, the
//! ingress or the membership state; they propose, then wait until the change runs here.
//!
//! This module sits between `http`, which calls these operations, and `node`, which builds the
//! core and starts the HTTP server: it must not depend on either (nor on `cli`), so that the two
//! need not depend on each other. Its public items are re-exported from `node`, their public path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::config::Config;
use crate::ingress::Ingress;
use crate::membership::service::{membership_problems, Membership};
use crate::membership::state::{Command, MembershipState};
use crate::monitor::{Health, PeerState};
use crate::relay::Relay;
use crate::router::{Placement, Router};
use crate::subscription::{SpecError, SubscriptionSpec};
use crate::types::{NodeStatus, SubscriptionKey};

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
#[non_exhaustive]
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
#[non_exhaustive]
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
    /// Nodes waiting for an admin to approve their join (`cluster.join_approval = "manual"`):
    /// `POST /v1/cluster/nodes/{id}/approve`.
    pub pending_joins: Vec<PendingJoinView>,
}

/// A node waiting for its join to be approved, as `/v1/cluster` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct PendingJoinView {
    /// Node id.
    pub id: u64,
    /// HTTP address it gave.
    pub http: String,
    /// Peer address it gave.
    pub peer: String,
    /// Handler kinds it can run.
    pub handlers: Vec<String>,
}

/// A subscription's placement as `/v1/cluster/placements` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
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
    pub(crate) reconciled: watch::Receiver<u64>,
    pub(crate) started: Instant,
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
    pub(crate) async fn drain_self(&self, deadline: Instant) {
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
    pub(crate) async fn propose_subscription(&self, spec: &SubscriptionSpec) -> Result<u64, ControlError> {
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

    /// Approves node `id`'s pending join (`ApproveJoin`): it becomes a member and the leader
    /// brings it into the Raft group. Returns whether a join of `id` was pending.
    pub async fn approve_join(&self, id: u64) -> Result<bool, ControlError> {
        if !self.membership.state().borrow().pending_joins().contains_key(&id) {
            return Ok(false);
        }
        let index = self
            .membership
            .propose(&Command::approve_join(id))
            .await
            .map_err(|e| ControlError::Unavailable(e.to_string()))?;
        self.settle(index, |s| s.member(id).is_some()).await;
        Ok(true)
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
        let problems = membership_problems(&state, &raft);
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
            pending_joins: state
                .pending_joins()
                .values()
                .map(|p| PendingJoinView {
                    id: p.id,
                    http: p.http.clone(),
                    peer: p.peer.clone(),
                    handlers: p.handlers.clone(),
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
