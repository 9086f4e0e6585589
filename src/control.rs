//! The control operations the HTTP API calls, and the node's shared state they act on.
//!
//! [`NodeCore`] holds what a running node shares between its parts (configuration, router,
//! ingress, membership, health, relay) and offers the control operations on it: creating and
//! deleting subscriptions through Raft, removing and draining nodes, and the cluster, member and
//! placement views of `/v1/cluster`, and the cluster-wide dead-letter operations: listing and
//! replaying other members' dead letters through the relay, and answering their requests
//! ([`serve_peer_asks`]: members only). The operations hold no logic that belongs to the router, the
//! ingress or the membership state; they propose, then wait until the change runs here.
//!
//! This module sits between `http`, which calls these operations, and `node`, which builds the
//! core and starts the HTTP server: it must not depend on either (nor on `cli`), so that the two
//! need not depend on each other. Its public items are re-exported from `node`, their public path.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use utoipa::ToSchema;

use crate::config::Config;
use crate::ingress::store::StoreError;
use crate::ingress::{DeadLetter, Ingress, ReplayError};
use crate::membership::service::{membership_problems, Membership};
use crate::membership::state::{Command, MembershipState};
use crate::monitor::{Health, PeerState};
use crate::proto::{dead_letter_request, DeadLetterResponse, DeadLetterStatus, ListDeadLetters, ReplayDeadLetter};
use crate::relay::{AskError, PeerAsk, Relay};
use crate::router::Router;
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
    /// The change would leave the cluster unusable, e.g. removing its only member (409).
    #[error("{0}")]
    Conflict(String),
    /// The change does not fit the member's state (409), with a stable code: `member_up`
    /// (removing a running member without `force`), `not_draining` (undraining a member that
    /// is not draining).
    #[error("{message}")]
    Refused {
        /// The stable code of the answer.
        code: &'static str,
        /// For people: why, and what to do.
        message: String,
    },
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
    /// Whether the node is ready: its WAL replayed, its store taking writes, and it is a member
    /// of both the membership table and its Raft configuration (as `/readyz`).
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

    /// The Prometheus text exposition, if a recorder handle was given. Gauges sampled rather
    /// than counted (`herald_mailbox_depth`) are set first, also without a handle (an embedding
    /// application that installs its own recorder sees them as of the last call of this).
    pub fn render_metrics(&self) -> Option<String> {
        self.router.sample_mailbox_depths();
        self.metrics.as_ref().map(|handle| {
            let mut text = handle.render();
            crate::metrics::render_durations(&mut text);
            text
        })
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

    /// Runs locally exactly the instances the placement gives this node (`Router::follow_state`).
    pub(crate) fn reconcile(&self, state: &MembershipState) {
        let me = self.config.node_id;
        if self.ingress.follow_membership(state.member(me).is_some()) {
            // Its removal committed while it runs: it takes no more events (503 removed) and is
            // not ready. What it holds stays in its WAL: the other members no longer take its
            // deliveries, and its own instances finish what is queued here.
            tracing::warn!(
                node_id = me,
                forwarded_unacked = self.relay.in_flight(),
                "this node was removed from the cluster (DELETE /v1/cluster/nodes/{me}): it refuses new events \
                 (503 removed) and reports not ready; events it accepted and has not delivered stay in its \
                 write-ahead log and are delivered if it joins again (restart it with --join <member>); stop it"
            );
        }
        self.router.follow_state(state);
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
        spec.check_egress(&self.config.webhook_policy().unwrap_or_default())?;
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

    /// Removes node `id` from the cluster (`Leave`); returns whether it was a member. Removing the
    /// only member is refused ([`ControlError::Conflict`]); so is removing a member that is up
    /// and answering (committed `up`, and this node's detector finds it healthy, or it is this
    /// node) unless `force` ([`ControlError::Refused`] `member_up`): a running node that is
    /// removed stops taking events (it answers 503 `removed`), so the safe order is stop (or
    /// drain) first, then remove.
    pub async fn remove_node(&self, id: u64, force: bool) -> Result<bool, ControlError> {
        let (only_member, live) = {
            let state = self.membership.state();
            let state = state.borrow();
            let member = state.member(id);
            let live = member.is_some_and(|m| {
                m.status == NodeStatus::Up && (id == self.config.node_id || self.health.peer(id).routable())
            });
            (member.is_some() && state.members().keys().all(|&m| m == id), live)
        };
        if only_member {
            return Err(ControlError::Conflict(format!(
                "node {id} is the cluster's only member: removing it would leave no node to run the cluster \
                 (add another node first, or stop this one)"
            )));
        }
        if live && !force {
            return Err(ControlError::Refused {
                code: "member_up",
                message: format!(
                    "node {id} is up and running: stop it (or drain it: POST /v1/cluster/nodes/{id}/drain) before \
                     removing it, or remove it anyway with ?force=true (it then refuses new events with 503 removed \
                     and hands over those it holds)"
                ),
            });
        }
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

    /// Ends the drain of node `id`: it is `up` again and the leader gives it instances again.
    /// Proposed as the member's rejoin with its own record (a rejoin brings a draining member
    /// back up; no new command, so nodes of an older version apply it too). Returns whether it
    /// was a member; an `up` member is left as it is; any other status (down, leaving) is
    /// refused ([`ControlError::Refused`] `not_draining`).
    pub async fn undrain_node(&self, id: u64) -> Result<bool, ControlError> {
        let Some(m) = self.membership.state().borrow().member(id).cloned() else {
            return Ok(false);
        };
        match m.status {
            NodeStatus::Draining => {}
            NodeStatus::Up => return Ok(true),
            other => {
                return Err(ControlError::Refused {
                    code: "not_draining",
                    message: format!("node {id} is {}, not draining: nothing to undo", other.as_str()),
                })
            }
        }
        let rejoin = Command::join(m.id, m.http.clone(), m.peer.clone(), m.handlers.iter().cloned());
        self.node_command(id, rejoin, |s| {
            s.member(id).is_none_or(|m| m.status != NodeStatus::Draining)
        })
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
        let problems = membership_problems(&state, &raft);
        let member = !problems.iter().any(|p| p.is_about(self.config.node_id));
        ClusterView {
            cluster_id: self.config.cluster_id.clone(),
            node_id: self.config.node_id,
            leader: (raft.leader != 0).then_some(raft.leader),
            term: raft.term,
            epoch: state.epoch(),
            ready: self.ingress.is_ready()
                && member
                && !self.ingress.is_removed()
                && self.ingress.storage_problem().is_none(),
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

    /// The ids of every other member.
    fn other_members(&self) -> Vec<u64> {
        self.membership
            .state()
            .borrow()
            .members()
            .keys()
            .copied()
            .filter(|id| *id != self.config.node_id)
            .collect()
    }

    /// The cluster's dead letters in id order: this node's and every other member's (asked over
    /// the peer transport, never over HTTP), after `after`, at most `limit` (1..=1000), optionally
    /// of one topic/group. Members that gave no answer in time are listed in `unreachable`.
    ///
    /// Each member answers its own first `limit`; the merged list keeps the first `limit` of all.
    /// A member whose page was cut to fit a frame bounds the merged list at its last entry (what
    /// comes after it there is unknown), so paging with `after` never skips a dead letter.
    pub async fn cluster_dead_letters(
        &self,
        after: Option<&str>,
        limit: usize,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<ClusterDeadLetters, DeadLettersError> {
        let limit = limit.clamp(1, MAX_DEAD_LETTER_PAGE);
        let local = self.ingress.dead_letters(after, limit, topic, group)?;
        let request = ListDeadLetters {
            after: after.map(str::to_string),
            limit: limit as u32,
            topic: topic.map(str::to_string),
            group: group.map(str::to_string),
        };
        let asks = self.other_members().into_iter().map(|peer| {
            let kind = dead_letter_request::Kind::List(request.clone());
            async move { (peer, self.relay.ask_dead_letters(peer, kind, PEER_TIMEOUT).await) }
        });
        let mut answers = Vec::new();
        for (peer, answer) in futures_util::future::join_all(asks).await {
            match answer {
                Err(AskError::Busy) => return Err(DeadLettersError::Busy),
                Err(e) => {
                    tracing::warn!(peer, error = %e, "cannot list a member's dead letters");
                    answers.push((peer, None));
                }
                Ok(a) => answers.push((peer, Some(a))),
            }
        }
        let filter = PageFilter { after, topic, group };
        Ok(merge_pages(local, answers, &filter, limit))
    }

    /// Replays the dead letter `id` where it is stored: here, or on the first member that has it
    /// (asked over the peer transport). Returns the event id.
    pub async fn replay_dead_letter_anywhere(&self, id: &str) -> Result<String, ReplayError> {
        match self.ingress.replay_dead_letter(id).await {
            Err(ReplayError::NotFound(_)) => {}
            other => return other,
        }
        for peer in self.other_members() {
            let kind = dead_letter_request::Kind::Replay(ReplayDeadLetter { id: id.to_string() });
            match self.relay.ask_dead_letters(peer, kind, PEER_TIMEOUT).await {
                Ok(a) => match DeadLetterStatus::try_from(a.status) {
                    Ok(DeadLetterStatus::Ok) => return Ok(a.event_id),
                    Ok(DeadLetterStatus::NotFound) => {}
                    Ok(DeadLetterStatus::SubscriptionGone) => return Err(ReplayError::SubscriptionGone(a.message)),
                    _ => {
                        tracing::warn!(peer, status = a.status, message = %a.message, "a member could not replay a dead letter")
                    }
                },
                Err(e) => tracing::warn!(peer, error = %e, "cannot ask a member to replay a dead letter"),
            }
        }
        Err(ReplayError::NotFound(id.to_string()))
    }

    /// Answers one dead-letter request from a peer: only a current member may ask.
    async fn answer_peer(&self, ask: PeerAsk) {
        let PeerAsk { from, kind, reply } = ask;
        if from == self.config.node_id || !self.membership.state().borrow().members().contains_key(&from) {
            tracing::warn!(
                peer = from,
                "dead-letter request from a peer that is not a member refused"
            );
            metrics::counter!(PEER_REQUESTS_REFUSED).increment(1);
            return;
        }
        match kind {
            dead_letter_request::Kind::List(l) => {
                let ingress = self.ingress.clone();
                let limit = (l.limit as usize).clamp(1, MAX_DEAD_LETTER_PAGE);
                let page = tokio::task::spawn_blocking(move || {
                    ingress.dead_letter_records(l.after.as_deref(), limit, l.topic.as_deref(), l.group.as_deref())
                })
                .await;
                match page {
                    Ok(Ok(entries)) => reply.page(entries),
                    Ok(Err(e)) => reply.status(DeadLetterStatus::Failed, e.to_string()),
                    Err(e) => reply.status(DeadLetterStatus::Failed, e.to_string()),
                }
            }
            dead_letter_request::Kind::Replay(r) => match self.ingress.replay_dead_letter(&r.id).await {
                Ok(event_id) => reply.replayed(event_id),
                Err(ReplayError::NotFound(_)) => reply.status(DeadLetterStatus::NotFound, ""),
                Err(ReplayError::SubscriptionGone(key)) => reply.status(DeadLetterStatus::SubscriptionGone, key),
                Err(e @ ReplayError::Store(_)) => reply.status(DeadLetterStatus::Failed, e.to_string()),
            },
        }
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

/// What a page of dead letters was asked for.
struct PageFilter<'a> {
    after: Option<&'a str>,
    topic: Option<&'a str>,
    group: Option<&'a str>,
}

/// Merges this node's page with the members' answers (`None`: no answer): the first `limit` in id
/// order. A member whose page was cut to fit a frame bounds the merged page at its last entry
/// (what follows it there is unknown), so paging on with `after` skips nothing. Members that did
/// not answer, or could not, are listed as unreachable. An answer is checked, not trusted: only
/// entries matching the query are kept.
fn merge_pages(
    mut all: Vec<DeadLetter>,
    answers: Vec<(u64, Option<DeadLetterResponse>)>,
    q: &PageFilter<'_>,
    limit: usize,
) -> ClusterDeadLetters {
    let mut unreachable = Vec::new();
    let mut bound: Option<String> = None;
    for (peer, answer) in answers {
        let answer = match answer {
            Some(a) if a.status == DeadLetterStatus::Ok as i32 => a,
            Some(a) => {
                tracing::warn!(peer, status = a.status, message = %a.message, "a member could not list its dead letters");
                unreachable.push(peer);
                continue;
            }
            None => {
                unreachable.push(peer);
                continue;
            }
        };
        if answer.truncated {
            match answer.entries.last() {
                Some(last) => {
                    if bound.as_ref().is_none_or(|b| last.id < *b) {
                        bound = Some(last.id.clone());
                    }
                }
                None => {
                    tracing::warn!(peer, "a member's next dead letter does not fit a transport frame");
                    unreachable.push(peer);
                    continue;
                }
            }
        }
        all.extend(
            answer
                .entries
                .into_iter()
                .filter(|e| q.after.is_none_or(|a| e.id.as_str() > a))
                .filter_map(|e| DeadLetter::from_record(e.id, e.record?))
                .filter(|d| q.topic.is_none_or(|t| t == d.topic) && q.group.is_none_or(|g| g == d.group)),
        );
    }
    all.sort_by(|a, b| a.id.cmp(&b.id));
    all.dedup_by(|a, b| a.id == b.id);
    if let Some(bound) = bound {
        all.retain(|d| d.id <= bound);
    }
    all.truncate(limit);
    ClusterDeadLetters {
        dead_letters: all,
        unreachable,
    }
}

/// Serves the dead-letter requests other members send over the peer transport (the relay hands
/// them over on `asks`), one at a time, until the relay stops. It holds the core weakly, so a
/// node being shut down is not kept alive by it.
pub(crate) async fn serve_peer_asks(core: Weak<NodeCore>, mut asks: mpsc::Receiver<PeerAsk>) {
    metrics::describe_counter!(
        PEER_REQUESTS_REFUSED,
        "Dead-letter requests from peers refused because the peer is not a member of the cluster."
    );
    while let Some(ask) = asks.recv().await {
        let Some(core) = core.upgrade() else { return };
        core.answer_peer(ask).await;
    }
}

/// Dead-letter requests from peers that are not members, refused (a public metric name).
pub const PEER_REQUESTS_REFUSED: &str = "herald_peer_requests_refused_total";

/// How long a member may take to answer a dead-letter request.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest page of dead letters asked or answered.
pub const MAX_DEAD_LETTER_PAGE: usize = 1000;

/// The cluster's dead letters, as [`NodeCore::cluster_dead_letters`] found them.
#[derive(Debug)]
#[non_exhaustive]
pub struct ClusterDeadLetters {
    /// The page, in id order.
    pub dead_letters: Vec<DeadLetter>,
    /// Members that did not answer.
    pub unreachable: Vec<u64>,
}

/// Why the cluster's dead letters could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLettersError {
    /// This node's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Too many requests to other members are waiting for answers.
    #[error("too many cluster-wide requests in progress; try again")]
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DeadLetterRecord, EventRecord, StoredDeadLetter};

    fn record(id: &str, group: &str) -> (String, DeadLetterRecord) {
        let r = DeadLetterRecord {
            event: Some(EventRecord {
                id: format!("e-{id}"),
                topic: "t".into(),
                content_type: "application/json".into(),
                data: bytes::Bytes::from_static(b"{}"),
                ..Default::default()
            }),
            group: group.into(),
            attempts: 1,
            error: "boom".into(),
            failed_at_unix_ms: 1,
        };
        (id.to_string(), r)
    }

    fn local(ids: &[&str]) -> Vec<DeadLetter> {
        ids.iter()
            .map(|i| {
                let (id, r) = record(i, "g");
                DeadLetter::from_record(id, r).unwrap()
            })
            .collect()
    }

    fn answer(ids: &[&str], truncated: bool) -> Option<DeadLetterResponse> {
        Some(DeadLetterResponse {
            entries: ids
                .iter()
                .map(|i| {
                    let (id, r) = record(i, "g");
                    StoredDeadLetter { id, record: Some(r) }
                })
                .collect(),
            truncated,
            ..Default::default()
        })
    }

    const ALL: PageFilter<'static> = PageFilter {
        after: None,
        topic: None,
        group: None,
    };

    fn ids(page: &ClusterDeadLetters) -> Vec<&str> {
        page.dead_letters.iter().map(|d| d.id.as_str()).collect()
    }

    #[test]
    fn pages_merge_in_id_order_up_to_the_limit() {
        let page = merge_pages(
            local(&["01", "05"]),
            vec![
                (2, answer(&["02", "06"], false)),
                (3, answer(&["03", "04", "05"], false)),
            ],
            &ALL,
            5,
        );
        assert_eq!(
            ids(&page),
            ["01", "02", "03", "04", "05"],
            "sorted, deduplicated, cut at 5"
        );
        assert!(page.unreachable.is_empty());
    }

    #[test]
    fn a_cut_page_bounds_the_merged_page_so_paging_skips_nothing() {
        // Member 2's page was cut after 03: its 04..06 are unknown, so 07 of member 3 must wait.
        let page = merge_pages(
            local(&["01"]),
            vec![(2, answer(&["02", "03"], true)), (3, answer(&["07"], false))],
            &ALL,
            1000,
        );
        assert_eq!(ids(&page), ["01", "02", "03"]);
        // A cut page with nothing in it (the next one does not fit a frame): unreachable.
        let page = merge_pages(local(&["01"]), vec![(2, answer(&[], true))], &ALL, 1000);
        assert_eq!(ids(&page), ["01"]);
        assert_eq!(page.unreachable, [2]);
    }

    #[test]
    fn silent_or_failing_members_are_unreachable_and_answers_are_checked() {
        let failed = Some(DeadLetterResponse {
            status: DeadLetterStatus::Busy as i32,
            ..Default::default()
        });
        let q = PageFilter {
            after: Some("02"),
            topic: None,
            group: Some("g"),
        };
        let mut other_group = answer(&["05"], false).unwrap();
        other_group.entries[0].record.as_mut().unwrap().group = "other".into();
        let page = merge_pages(
            local(&["03"]),
            vec![
                (2, None),
                (3, failed),
                // Entries a member should not have sent (before `after`, another group) are dropped.
                (4, answer(&["01", "04"], false)),
                (5, Some(other_group)),
            ],
            &q,
            1000,
        );
        assert_eq!(ids(&page), ["03", "04"]);
        assert_eq!(page.unreachable, [2, 3]);
    }
}
