//! The replicated membership state machine (ARCHITECTURE.md, "Membership rules"): who is in the cluster, which subscriptions
//! exist and where their instances run.
//!
//! [`MembershipState`] is what every node holds after applying the committed Raft log:
//! `cluster_id`, the members (id, addresses, handler kinds, status, when they joined), the
//! subscriptions and the placement table with its `epoch`. It changes only through
//! [`MembershipState::apply`]`(index, `[`Command`]`)`, which returns [`Effect`]s describing what
//! changed or a [`CommandError`] saying why the command was refused. Like raft-rs's own state
//! machines it is pure: plain values in, plain values out — no I/O, no clock, no randomness, no
//! `HashMap` iteration — so applying the same log on every node yields the same state, and a
//! refused command is refused identically everywhere (it changes nothing but the applied index).
//!
//! This module owns the state, the command and snapshot encodings, and the rules that derive from
//! the state alone: whether a new placement is needed ([`MembershipState::proposed_placement`],
//! which calls [`crate::placement::place`]) and which members should be Raft voters
//! ([`MembershipState::voter_set`]). It must not do I/O, talk to raft-rs, read the node's
//! configuration or registry, or know about actors and HTTP; the Raft driver calls it and acts on
//! the effects.
//!
//! # Rules
//!
//! * `Join` adds a member with status `up`. Joining again with the same addresses is a rejoin: it
//!   updates the handler kinds and brings a `down` or `draining` member back `up` (a node proposes
//!   it when its process starts, so a node drained by its SIGTERM takes work again once restarted). The same id with different addresses, or a new id at a peer address another member
//!   uses, is refused: two processes must never share an id.
//! * `RequestJoin` records a node that asked to join a cluster whose joins need an operator's
//!   approval (`cluster.join_approval = "manual"`) as *pending*: not a member, no vote, no work.
//!   `ApproveJoin` applies its `Join` then (with the same checks); a `Join` of a pending node, or
//!   `Leave` of it (a rejection), ends its pending entry. A `RequestJoin` of a member changes
//!   nothing.
//! * `Leave` removes the member (graceful leave or `DELETE /v1/cluster/nodes/{id}`). Joining later
//!   with the same id is a new membership and queues behind the current members for a vote.
//! * `MarkDown` / `MarkUp` move a member between `up` and `down` (the leader's failure detector
//!   proposes them); both are no-ops on a `draining` member, since a drain is a decision that only
//!   the node's restart (its rejoin), an operator's undrain (`POST /v1/cluster/nodes/{id}/undrain`
//!   proposes the member's rejoin with its own record) or `Leave` ends.
//! * `Drain` marks a member `draining`: it stays a member (and a voter) but gets no instances.
//! * `Subscribe` creates or replaces a subscription; `Unsubscribe` removes one. Only what every
//!   node can check the same way is validated here (names, `instances`, `max_attempts`); whether
//!   a handler exists is checked by the proposing node, whose registry is not replicated.
//! * `SetPlacement` replaces the table and is fenced by its epoch: an epoch not greater than the
//!   current one is refused as stale, so a deposed leader's late proposal cannot undo a newer
//!   placement. Every node it names must be a member and every entry a subscription.
//! * `PatchPlacement` is the same change written as a difference: the entries that are new or
//!   moved and the subscriptions that left the table. It applies only onto the table of its
//!   `base_epoch` (the epoch in force when the leader computed it), so the result is exactly the
//!   table a `SetPlacement` would have carried, and is checked the same way. With 100 nodes and
//!   10,000 subscriptions a node loss is a patch of a few KB instead of a 330 KB table
//!   (`tests/scale.rs`). The leader writes patches only when every member's `Join` announced
//!   [`FEATURE_PLACEMENT_PATCH`] (older builds refuse the variant and would drift apart).
//!   Membership and subscription commands never edit the table; the leader follows them with a
//!   `SetPlacement` (see [`MembershipState::proposed_placement`]). Until it commits, the table may
//!   name a node that left or a subscription that was removed; readers skip those.
//!
//! # Encodings
//!
//! Commands and snapshots are prost messages declared with the derive (no `protoc`), like
//! [`crate::proto`] and [`crate::transport::wire`]. Field tags are the schema: never reuse or
//! renumber one; add fields and `oneof` variants with fresh tags. A command whose variant this
//! build does not know decodes with no kind and is refused as [`CommandError::Empty`] on this node
//! — so roll new variants out only after every node understands them. Snapshots are prost rather
//! than JSON so they share the command records (one schema to keep compatible) and encode
//! deterministically (members, subscriptions and entries in key order), which lets tests compare
//! snapshot bytes across nodes.
//!
//! ```text
//! message Command {
//!   oneof kind {
//!     NodeRecord join = 1;  NodeRef leave = 2;  NodeRef mark_down = 3;  NodeRef mark_up = 4;
//!     NodeRef drain = 5;    SubscriptionRecord subscribe = 6;  SubscriptionRef unsubscribe = 7;
//!     PlacementRecord set_placement = 8;  NodeRecord request_join = 9;  NodeRef approve_join = 10;
//!     PlacementPatch patch_placement = 11;
//!   }                                            // 12.. free
//! }
//! message NodeRecord         { uint64 id = 1; string http = 2; string peer = 3; repeated string handlers = 4;
//!                              uint32 features = 5; }  // FEATURE_* bits the node's build understands
//! message NodeRef            { uint64 id = 1; }
//! message SubscriptionRecord { string topic = 1; string group = 2; string handler_kind = 3;  // rust|webhook|log
//!                              string handler_target = 4;  // the rust handler name or the webhook url
//!                              uint32 instances = 5; optional uint32 max_attempts = 6; }
//! message SubscriptionRef    { string topic = 1; string group = 2; }
//! message PlacementRecord    { uint64 epoch = 1; repeated PlacementEntry entries = 2; }
//! message PlacementEntry     { string topic = 1; string group = 2; repeated uint64 nodes = 3; }
//! message PlacementPatch     { uint64 epoch = 1; uint64 base_epoch = 2; repeated PlacementEntry set = 3;
//!                              repeated SubscriptionRef removed = 4; }
//! message MemberRecord       { NodeRecord node = 1; string status = 2; uint64 joined_at_index = 3; }
//! message SnapshotRecord     { uint32 format = 1; string cluster_id = 2; uint64 applied_index = 3;
//!                              repeated MemberRecord members = 4; repeated SubscriptionRecord subscriptions = 5;
//!                              PlacementRecord placement = 6; repeated NodeRecord pending_joins = 7; }
//! ```

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;

use crate::event::validate_name;
use crate::placement::{self, Demand, NodeInfo, PlacementTable};
use crate::subscription::{HandlerSpec, SubscriptionSpec, MAX_ATTEMPTS};
use crate::types::SubscriptionKey;
pub use crate::types::{NodeId, NodeStatus};

/// How many members are Raft voters when `raft.voters` is not configured.
pub const DEFAULT_VOTERS: usize = 3;

/// The most instances a replicated subscription may ask for: a sanity ceiling far above any
/// sensible `handlers.max_instances`, so a bad log entry cannot make every node allocate without
/// bound. The proposing node enforces its own, lower `handlers.max_instances` first.
pub const MAX_INSTANCES: u32 = 10_000;

/// The snapshot format this build writes and reads.
pub const SNAPSHOT_FORMAT: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Records (the prost schema in the module docs)
// ---------------------------------------------------------------------------------------------

/// One replicated membership command: the payload of a Raft log entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    /// What to do; `None` when the proposer used a variant this build does not know.
    #[prost(oneof = "command::Kind", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11")]
    pub kind: Option<command::Kind>,
}

/// The `oneof kind` of [`Command`].
pub mod command {
    /// One command. Tags are listed in the module docs of [`super`].
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// A node joins (or rejoins with the same addresses).
        #[prost(message, tag = "1")]
        Join(super::NodeRecord),
        /// A member leaves the cluster and is removed.
        #[prost(message, tag = "2")]
        Leave(super::NodeRef),
        /// The leader's failure detector declares a member down.
        #[prost(message, tag = "3")]
        MarkDown(super::NodeRef),
        /// A down member answers again.
        #[prost(message, tag = "4")]
        MarkUp(super::NodeRef),
        /// An operator moves all work off a member.
        #[prost(message, tag = "5")]
        Drain(super::NodeRef),
        /// Create or replace a subscription.
        #[prost(message, tag = "6")]
        Subscribe(super::SubscriptionRecord),
        /// Remove a subscription.
        #[prost(message, tag = "7")]
        Unsubscribe(super::SubscriptionRef),
        /// Replace the placement table (fenced by its epoch).
        #[prost(message, tag = "8")]
        SetPlacement(super::PlacementRecord),
        /// A node asks to join; it waits for an operator's approval (pending).
        #[prost(message, tag = "9")]
        RequestJoin(super::NodeRecord),
        /// An operator approves a pending join.
        #[prost(message, tag = "10")]
        ApproveJoin(super::NodeRef),
        /// Change the placement table by a difference (fenced by its epoch and its base epoch).
        #[prost(message, tag = "11")]
        PatchPlacement(super::PlacementPatch),
    }
}

/// A node as it introduces itself in `Join`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct NodeRecord {
    /// The node's id (its Raft id); never 0.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Its HTTP API address, so any node can point clients and `herald status` at it.
    #[prost(string, tag = "2")]
    pub http: String,
    /// Its peer (transport) address, where Raft messages and events are sent.
    #[prost(string, tag = "3")]
    pub peer: String,
    /// The handler kinds it can run (`rust:<name>`, `webhook`, `log`), for placement.
    #[prost(string, repeated, tag = "4")]
    pub handlers: Vec<String>,
    /// The `FEATURE_*` bits its build understands ([`FEATURES`] for this build; 0 from a build
    /// older than the field).
    #[prost(uint32, tag = "5")]
    pub features: u32,
}

/// A [`NodeRecord::features`] bit: the node applies `PatchPlacement`.
pub const FEATURE_PLACEMENT_PATCH: u32 = 1;

/// The features of this build, announced in its `Join`.
pub const FEATURES: u32 = FEATURE_PLACEMENT_PATCH;

/// Names a member in `Leave`, `MarkDown`, `MarkUp` and `Drain`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct NodeRef {
    /// The member's id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
}

/// A subscription spec as fields (not JSON), so old and new nodes decode each other's entries
/// with prost's usual rules for unknown fields.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SubscriptionRecord {
    /// The topic.
    #[prost(string, tag = "1")]
    pub topic: String,
    /// The group.
    #[prost(string, tag = "2")]
    pub group: String,
    /// `rust`, `webhook` or `log` (the `kind` of [`HandlerSpec`] in JSON).
    #[prost(string, tag = "3")]
    pub handler_kind: String,
    /// The Rust handler's registered name, or the webhook URL; empty for `log`.
    #[prost(string, tag = "4")]
    pub handler_target: String,
    /// Instances cluster-wide.
    #[prost(uint32, tag = "5")]
    pub instances: u32,
    /// Attempts before dead-lettering; absent means each node's default.
    #[prost(uint32, optional, tag = "6")]
    pub max_attempts: Option<u32>,
}

/// Names a subscription in `Unsubscribe`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SubscriptionRef {
    /// The topic.
    #[prost(string, tag = "1")]
    pub topic: String,
    /// The group.
    #[prost(string, tag = "2")]
    pub group: String,
}

/// A placement table with its epoch (`SetPlacement`, and in snapshots).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PlacementRecord {
    /// The epoch; must be greater than the current one to be accepted.
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// One entry per subscription, in key order.
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<PlacementEntry>,
}

/// One subscription's placement.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PlacementEntry {
    /// The subscription's topic.
    #[prost(string, tag = "1")]
    pub topic: String,
    /// The subscription's group.
    #[prost(string, tag = "2")]
    pub group: String,
    /// The node of each instance (a node may appear several times).
    #[prost(uint64, repeated, tag = "3")]
    pub nodes: Vec<u64>,
}

/// A placement change as a difference (`PatchPlacement`), written by the leader when every member
/// applies it; see the module docs.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PlacementPatch {
    /// The new epoch; must be greater than the current one.
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// The epoch of the table the difference was computed from; must be the current one.
    #[prost(uint64, tag = "2")]
    pub base_epoch: u64,
    /// Entries that are new or whose nodes changed, in key order.
    #[prost(message, repeated, tag = "3")]
    pub set: Vec<PlacementEntry>,
    /// Subscriptions that leave the table, in key order.
    #[prost(message, repeated, tag = "4")]
    pub removed: Vec<SubscriptionRef>,
}

impl PlacementPatch {
    /// The difference from `base` (at `base_epoch`) to `next` (at `epoch`).
    pub fn between(base_epoch: u64, base: &PlacementTable, epoch: u64, next: &PlacementTable) -> Self {
        PlacementPatch {
            epoch,
            base_epoch,
            set: next
                .iter()
                .filter(|(k, nodes)| base.get(*k) != Some(*nodes))
                .map(|(k, nodes)| PlacementEntry {
                    topic: k.topic.clone(),
                    group: k.group.clone(),
                    nodes: nodes.clone(),
                })
                .collect(),
            removed: base
                .keys()
                .filter(|k| !next.contains_key(*k))
                .map(|k| SubscriptionRef {
                    topic: k.topic.clone(),
                    group: k.group.clone(),
                })
                .collect(),
        }
    }

    /// `base` with the difference applied, or the key the patch names twice.
    pub fn apply_to(&self, base: &PlacementTable) -> Result<PlacementTable, RecordError> {
        let mut table = base.clone();
        let mut named = BTreeSet::new();
        let twice = |topic: &str, group: &str| RecordError::DuplicatePlacement {
            epoch: self.epoch,
            topic: topic.to_string(),
            group: group.to_string(),
        };
        for r in &self.removed {
            let key = SubscriptionKey {
                topic: r.topic.clone(),
                group: r.group.clone(),
            };
            table.remove(&key);
            if !named.insert(key) {
                return Err(twice(&r.topic, &r.group));
            }
        }
        for e in &self.set {
            let key = SubscriptionKey {
                topic: e.topic.clone(),
                group: e.group.clone(),
            };
            if !named.insert(key.clone()) {
                return Err(twice(&e.topic, &e.group));
            }
            table.insert(key, e.nodes.clone());
        }
        Ok(table)
    }
}

/// A member in a snapshot.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct MemberRecord {
    /// Id, addresses and handler kinds.
    #[prost(message, optional, tag = "1")]
    pub node: Option<NodeRecord>,
    /// [`NodeStatus::as_str`]; a string so a new status does not need a new tag.
    #[prost(string, tag = "2")]
    pub status: String,
    /// [`Member::joined_at_index`].
    #[prost(uint64, tag = "3")]
    pub joined_at_index: u64,
}

/// The whole state, as written by [`MembershipState::to_snapshot`].
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SnapshotRecord {
    /// [`SNAPSHOT_FORMAT`] of the writer; a reader refuses formats it does not know.
    #[prost(uint32, tag = "1")]
    pub format: u32,
    /// The cluster's name.
    #[prost(string, tag = "2")]
    pub cluster_id: String,
    /// The last applied log index the snapshot includes.
    #[prost(uint64, tag = "3")]
    pub applied_index: u64,
    /// Members in id order.
    #[prost(message, repeated, tag = "4")]
    pub members: Vec<MemberRecord>,
    /// Subscriptions in key order.
    #[prost(message, repeated, tag = "5")]
    pub subscriptions: Vec<SubscriptionRecord>,
    /// The placement table and epoch.
    #[prost(message, optional, tag = "6")]
    pub placement: Option<PlacementRecord>,
    /// Joins waiting for approval, by id.
    #[prost(message, repeated, tag = "7")]
    pub pending_joins: Vec<NodeRecord>,
}

impl Command {
    /// `Join`: node `id` at `http` (API) and `peer` (transport), able to run `handlers`.
    pub fn join<S: Into<String>>(
        id: NodeId,
        http: impl Into<String>,
        peer: impl Into<String>,
        handlers: impl IntoIterator<Item = S>,
    ) -> Self {
        Self::of(command::Kind::Join(NodeRecord {
            id,
            http: http.into(),
            peer: peer.into(),
            handlers: handlers.into_iter().map(Into::into).collect(),
            features: FEATURES,
        }))
    }

    /// `RequestJoin`: `join` (a `Join` command) waits for an operator's approval; `None` if
    /// `join` is not a `Join`.
    pub fn request_join(join: Command) -> Option<Self> {
        match join.kind {
            Some(command::Kind::Join(node)) => Some(Self::of(command::Kind::RequestJoin(node))),
            _ => None,
        }
    }

    /// `ApproveJoin`: admit pending node `id`.
    pub fn approve_join(id: NodeId) -> Self {
        Self::of(command::Kind::ApproveJoin(NodeRef { id }))
    }

    /// `Leave`: remove member `id`.
    pub fn leave(id: NodeId) -> Self {
        Self::of(command::Kind::Leave(NodeRef { id }))
    }

    /// `MarkDown`: member `id` is down.
    pub fn mark_down(id: NodeId) -> Self {
        Self::of(command::Kind::MarkDown(NodeRef { id }))
    }

    /// `MarkUp`: member `id` is up again.
    pub fn mark_up(id: NodeId) -> Self {
        Self::of(command::Kind::MarkUp(NodeRef { id }))
    }

    /// `Drain`: move all work off member `id`.
    pub fn drain(id: NodeId) -> Self {
        Self::of(command::Kind::Drain(NodeRef { id }))
    }

    /// `Subscribe`: create or replace `spec`.
    pub fn subscribe(spec: &SubscriptionSpec) -> Self {
        Self::of(command::Kind::Subscribe(SubscriptionRecord::from(spec)))
    }

    /// `Unsubscribe`: remove `topic`/`group`.
    pub fn unsubscribe(topic: impl Into<String>, group: impl Into<String>) -> Self {
        Self::of(command::Kind::Unsubscribe(SubscriptionRef {
            topic: topic.into(),
            group: group.into(),
        }))
    }

    /// `SetPlacement`: `table` with `epoch`.
    pub fn set_placement(epoch: u64, table: &PlacementTable) -> Self {
        Self::of(command::Kind::SetPlacement(PlacementRecord::new(epoch, table)))
    }

    /// `PatchPlacement`: `patch` (see [`PlacementPatch::between`]).
    pub fn patch_placement(patch: PlacementPatch) -> Self {
        Self::of(command::Kind::PatchPlacement(patch))
    }

    fn of(kind: command::Kind) -> Self {
        Command { kind: Some(kind) }
    }

    /// The command's name for logs (`join`, `leave`, …; `empty` without a kind).
    pub fn name(&self) -> &'static str {
        match &self.kind {
            None => "empty",
            Some(command::Kind::Join(_)) => "join",
            Some(command::Kind::Leave(_)) => "leave",
            Some(command::Kind::MarkDown(_)) => "mark_down",
            Some(command::Kind::MarkUp(_)) => "mark_up",
            Some(command::Kind::Drain(_)) => "drain",
            Some(command::Kind::Subscribe(_)) => "subscribe",
            Some(command::Kind::Unsubscribe(_)) => "unsubscribe",
            Some(command::Kind::SetPlacement(_)) => "set_placement",
            Some(command::Kind::PatchPlacement(_)) => "patch_placement",
            Some(command::Kind::RequestJoin(_)) => "request_join",
            Some(command::Kind::ApproveJoin(_)) => "approve_join",
        }
    }

    /// The bytes to propose as a Raft entry.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decodes a Raft entry's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Command::decode(bytes)
    }
}

impl From<&SubscriptionSpec> for SubscriptionRecord {
    fn from(spec: &SubscriptionSpec) -> Self {
        let (kind, target) = match &spec.handler {
            HandlerSpec::Rust { name } => ("rust", name.clone()),
            HandlerSpec::Webhook { url } => ("webhook", url.clone()),
            HandlerSpec::Log => ("log", String::new()),
        };
        SubscriptionRecord {
            topic: spec.topic.clone(),
            group: spec.group.clone(),
            handler_kind: kind.to_string(),
            handler_target: target,
            instances: spec.instances,
            max_attempts: spec.max_attempts,
        }
    }
}

impl SubscriptionRecord {
    /// The spec, or why the record is malformed (an unknown handler kind, a missing target).
    pub fn to_spec(&self) -> Result<SubscriptionSpec, RecordError> {
        let handler = match self.handler_kind.as_str() {
            "rust" if !self.handler_target.is_empty() => HandlerSpec::Rust {
                name: self.handler_target.clone(),
            },
            "webhook" if !self.handler_target.is_empty() => HandlerSpec::Webhook {
                url: self.handler_target.clone(),
            },
            "rust" | "webhook" => {
                return Err(RecordError::MissingTarget {
                    topic: self.topic.clone(),
                    group: self.group.clone(),
                    kind: self.handler_kind.clone(),
                })
            }
            "log" => HandlerSpec::Log,
            other => {
                return Err(RecordError::UnknownHandlerKind {
                    topic: self.topic.clone(),
                    group: self.group.clone(),
                    kind: other.to_string(),
                })
            }
        };
        Ok(SubscriptionSpec {
            topic: self.topic.clone(),
            group: self.group.clone(),
            handler,
            instances: self.instances,
            max_attempts: self.max_attempts,
        })
    }
}

impl PlacementRecord {
    /// The record of `table` at `epoch`, entries in key order.
    pub fn new(epoch: u64, table: &PlacementTable) -> Self {
        PlacementRecord {
            epoch,
            entries: table
                .iter()
                .map(|(k, nodes)| PlacementEntry {
                    topic: k.topic.clone(),
                    group: k.group.clone(),
                    nodes: nodes.clone(),
                })
                .collect(),
        }
    }

    /// The table, or the key that appears twice.
    pub fn to_table(&self) -> Result<PlacementTable, RecordError> {
        let mut table = PlacementTable::new();
        for e in &self.entries {
            let key = SubscriptionKey {
                topic: e.topic.clone(),
                group: e.group.clone(),
            };
            if table.insert(key, e.nodes.clone()).is_some() {
                return Err(RecordError::DuplicatePlacement {
                    epoch: self.epoch,
                    topic: e.topic.clone(),
                    group: e.group.clone(),
                });
            }
        }
        Ok(table)
    }
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node's id (its Raft id).
    pub id: NodeId,
    /// Its HTTP API address, for `GET /v1/cluster` and clients.
    pub http: String,
    /// Its peer address: where the transport connects to it.
    pub peer: String,
    /// The handler kinds it can run; placement only puts a subscription where its kind is.
    pub handlers: BTreeSet<String>,
    /// The `FEATURE_*` bits its last `Join` announced.
    pub features: u32,
    /// `up`, `down` or `draining` (the replicated part of the status; suspicion is local).
    pub status: NodeStatus,
    /// The log index of the `Join` that added it: orders members for the voter rule.
    pub joined_at_index: u64,
}

/// A node waiting for an operator to approve its join (`cluster.join_approval = "manual"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingJoin {
    /// The node's id.
    pub id: NodeId,
    /// Its HTTP API address.
    pub http: String,
    /// Its peer address.
    pub peer: String,
    /// The handler kinds it can run.
    pub handlers: Vec<String>,
    /// The `FEATURE_*` bits it announced.
    pub features: u32,
}

impl PendingJoin {
    fn record(&self) -> NodeRecord {
        NodeRecord {
            id: self.id,
            http: self.http.clone(),
            peer: self.peer.clone(),
            handlers: self.handlers.clone(),
            features: self.features,
        }
    }
}

/// The replicated membership state. Build it with [`MembershipState::new`] or
/// [`MembershipState::from_snapshot`]; change it only with [`MembershipState::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipState {
    /// The cluster's name; the transport handshake refuses peers of another cluster.
    cluster_id: String,
    /// The last log index given to `apply` (refused commands included), so the driver knows
    /// where to resume and snapshots say what they contain.
    applied_index: u64,
    /// The members by id.
    members: BTreeMap<NodeId, Member>,
    /// The subscriptions by key.
    subscriptions: BTreeMap<SubscriptionKey, SubscriptionSpec>,
    /// The committed placement: the node of every instance of every subscription.
    placement: PlacementTable,
    /// The placement's epoch: grows with every accepted `SetPlacement`; deliveries carry it so a
    /// node refuses work for a placement it no longer holds.
    epoch: u64,
    /// Joins waiting for an operator's approval, by id.
    pending_joins: BTreeMap<NodeId, PendingJoin>,
}

/// What an applied command changed. The driver reacts: membership changes may need a new
/// placement and Raft configuration change; subscription and placement changes reconfigure the
/// local router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A new member (status `up`).
    MemberJoined {
        /// Its id.
        id: NodeId,
    },
    /// A member rejoined with different handler kinds.
    MemberUpdated {
        /// Its id.
        id: NodeId,
    },
    /// A member's status changed.
    MemberStatusChanged {
        /// Its id.
        id: NodeId,
        /// The status before.
        from: NodeStatus,
        /// The status now.
        to: NodeStatus,
    },
    /// A member was removed.
    MemberLeft {
        /// Its id.
        id: NodeId,
    },
    /// A node's join waits for approval (or its pending entry was updated).
    JoinPending {
        /// Its id.
        id: NodeId,
    },
    /// A subscription was created or replaced (`Some`) or removed (`None`).
    SubscriptionChanged {
        /// The subscription.
        key: SubscriptionKey,
        /// Its spec now.
        spec: Option<SubscriptionSpec>,
    },
    /// A new placement table is in force.
    PlacementChanged {
        /// Its epoch.
        epoch: u64,
        /// The subscriptions whose node list changed (added, removed or different).
        changed: Vec<SubscriptionKey>,
    },
}

impl Effect {
    /// Whether the input of placement changed, so the leader should check
    /// [`MembershipState::proposed_placement`].
    pub fn affects_placement(&self) -> bool {
        !matches!(self, Effect::PlacementChanged { .. } | Effect::JoinPending { .. })
    }

    /// Whether the member list changed, so the leader should compare
    /// [`MembershipState::voter_set`] with Raft's configuration.
    pub fn affects_voters(&self) -> bool {
        matches!(self, Effect::MemberJoined { .. } | Effect::MemberLeft { .. })
    }
}

/// Why a command was refused. A refused command changes nothing but the applied index, on every
/// node alike; the proposer gets the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The driver applied an index at or below the last one.
    #[error("log index {index} is not after the last applied index {applied}; apply each committed entry once, in log order")]
    IndexNotAfterApplied {
        /// The index given.
        index: u64,
        /// The last applied index.
        applied: u64,
    },
    /// The entry is not a command this build can decode.
    #[error("undecodable membership command: {reason}; was it proposed by an incompatible herald version?")]
    Undecodable {
        /// The decoder's message.
        reason: String,
    },
    /// The command has no kind: a variant this build does not know, or an empty entry.
    #[error("membership command without a known kind; a newer herald version may have proposed it: upgrade this node")]
    Empty,
    /// Node id 0 is reserved by Raft.
    #[error("node id 0 is reserved; give every node an id of at least 1 (--node-id)")]
    ZeroNodeId,
    /// A joining node gave no peer address.
    #[error("node {id} joined without a peer address; set --peer (or --advertise) so other nodes can reach it")]
    MissingPeerAddress {
        /// The joining node.
        id: NodeId,
    },
    /// The id belongs to a member at other addresses: two processes would share one id.
    #[error("node id {id} is already a member at peer {existing_peer} (http {existing_http}); refusing a join from peer {peer} (http {http}): give the new node another --node-id, or remove node {id} first (DELETE /v1/cluster/nodes/{id})")]
    DuplicateNodeId {
        /// The contested id.
        id: NodeId,
        /// The member's peer address.
        existing_peer: String,
        /// The member's HTTP address.
        existing_http: String,
        /// The joiner's peer address.
        peer: String,
        /// The joiner's HTTP address.
        http: String,
    },
    /// Another member already uses the joiner's peer address.
    #[error("peer address {peer} of joining node {id} is already used by node {holder}; if node {holder} was replaced, remove it first (DELETE /v1/cluster/nodes/{holder}), or reuse its --node-id")]
    PeerAddressInUse {
        /// The address.
        peer: String,
        /// The joining node.
        id: NodeId,
        /// The member using it.
        holder: NodeId,
    },
    /// No member has this id.
    #[error("unknown node {id}; members are [{members}]")]
    UnknownNode {
        /// The id asked for.
        id: NodeId,
        /// The member ids, comma separated.
        members: String,
    },
    /// The subscription breaks a rule every node checks.
    #[error("invalid subscription {key}: {reason}")]
    InvalidSubscription {
        /// The subscription.
        key: SubscriptionKey,
        /// What is wrong.
        reason: String,
    },
    /// `Unsubscribe` of a subscription that does not exist.
    #[error("no subscription {key}")]
    UnknownSubscription {
        /// The subscription asked for.
        key: SubscriptionKey,
    },
    /// A `SetPlacement` whose epoch is not newer than the current one (fencing).
    #[error("stale placement: epoch {proposed} is not greater than the current epoch {current}; recompute from the current state and propose epoch {}", current + 1)]
    StalePlacement {
        /// The refused epoch.
        proposed: u64,
        /// The epoch in force.
        current: u64,
    },
    /// A `PatchPlacement` computed from another table than the one in force.
    #[error(
        "placement epoch {epoch} is a change of epoch {base}, but epoch {current} is in force; recompute the placement"
    )]
    PlacementBaseMismatch {
        /// The refused epoch.
        epoch: u64,
        /// The epoch the patch was computed from.
        base: u64,
        /// The epoch in force.
        current: u64,
    },
    /// A `SetPlacement` names a node that is not a member (it left since the leader computed it).
    #[error("placement epoch {epoch} puts {key} on node {node}, which is not a member; recompute the placement")]
    PlacementUnknownNode {
        /// The refused epoch.
        epoch: u64,
        /// The entry.
        key: SubscriptionKey,
        /// The unknown node.
        node: NodeId,
    },
    /// A `SetPlacement` has an entry for a subscription that does not exist.
    #[error("placement epoch {epoch} has an entry for {key}, which is not a subscription; recompute the placement")]
    PlacementUnknownSubscription {
        /// The refused epoch.
        epoch: u64,
        /// The entry.
        key: SubscriptionKey,
    },
    /// `ApproveJoin` of a node whose join is not pending.
    #[error("node {id} has no pending join; pending: [{pending}]")]
    UnknownPendingJoin {
        /// The id asked for.
        id: NodeId,
        /// The pending ids, comma separated.
        pending: String,
    },
    /// A record is structurally wrong (unknown handler kind, duplicated entry).
    #[error("malformed membership command: {0}")]
    Malformed(#[from] RecordError),
}

/// A replicated record that does not describe a valid value (written by a newer build, or
/// damaged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A `rust` or `webhook` subscription without its handler name or URL.
    #[error("subscription {topic}/{group}: handler kind {kind:?} needs a handler_target (name or url)")]
    MissingTarget {
        /// The subscription's topic.
        topic: String,
        /// The subscription's group.
        group: String,
        /// The handler kind.
        kind: String,
    },
    /// A handler kind this build does not know.
    #[error("subscription {topic}/{group}: unknown handler kind {kind:?} (this build knows rust, webhook, log)")]
    UnknownHandlerKind {
        /// The subscription's topic.
        topic: String,
        /// The subscription's group.
        group: String,
        /// The unknown kind.
        kind: String,
    },
    /// A placement that lists one subscription twice.
    #[error("placement epoch {epoch} lists {topic}/{group} twice")]
    DuplicatePlacement {
        /// The placement's epoch.
        epoch: u64,
        /// The subscription's topic.
        topic: String,
        /// The subscription's group.
        group: String,
    },
}

/// Why a snapshot could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The bytes are not a prost `SnapshotRecord`.
    #[error("membership snapshot does not decode: {0}; the file or message is corrupt")]
    Decode(String),
    /// Written by a build with another snapshot format.
    #[error("membership snapshot format {found} is not readable by this build (it reads format {SNAPSHOT_FORMAT}); upgrade this node")]
    Format {
        /// The snapshot's format.
        found: u32,
    },
    /// Decodes but breaks an invariant (duplicate member, unknown status, …).
    #[error("membership snapshot is inconsistent: {0}")]
    Invalid(String),
    /// Holds a subscription or placement record that is malformed.
    #[error("membership snapshot is inconsistent: {0}")]
    Record(#[from] RecordError),
}

/// A placement the leader should propose: [`PlacementProposal::command`] commits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementProposal {
    /// The current epoch + 1.
    pub epoch: u64,
    /// The new table.
    pub table: PlacementTable,
    /// Subscriptions no up member can run (for a warning: start a node with that handler).
    pub unplaced: Vec<SubscriptionKey>,
    /// Instances that change node compared with the current table (for logs).
    pub moved: u32,
    /// The change as a difference from the current table, when every member applies one
    /// ([`FEATURE_PLACEMENT_PATCH`]).
    pub patch: Option<PlacementPatch>,
}

impl PlacementProposal {
    /// The command that commits this proposal: the difference when every member applies one,
    /// else the whole table.
    pub fn command(&self) -> Command {
        match &self.patch {
            Some(patch) => Command::patch_placement(patch.clone()),
            None => Command::set_placement(self.epoch, &self.table),
        }
    }
}

/// Which members should be Raft voters and which learners.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VoterSet {
    /// Voter ids, ascending.
    pub voters: Vec<NodeId>,
    /// Learner ids, ascending.
    pub learners: Vec<NodeId>,
}

/// One step from Raft's current configuration to a [`VoterSet`] (raft-rs `ConfChangeType`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConfStep {
    /// `AddNode`: add a voter, or promote a learner.
    AddVoter(NodeId),
    /// `AddLearnerNode`: add a learner, or demote a voter (needs joint consensus in raft-rs).
    AddLearner(NodeId),
    /// `RemoveNode`: the id is no longer a member.
    Remove(NodeId),
}

impl VoterSet {
    /// The steps from Raft's current `voters` and `learners` to this set: promotions and new
    /// voters first, then new learners and demotions, then removals; ids ascending within each.
    pub fn changes_from(&self, voters: &[NodeId], learners: &[NodeId]) -> Vec<ConfStep> {
        let (cur_v, cur_l): (BTreeSet<NodeId>, BTreeSet<NodeId>) =
            (voters.iter().copied().collect(), learners.iter().copied().collect());
        let (want_v, want_l): (BTreeSet<NodeId>, BTreeSet<NodeId>) = (
            self.voters.iter().copied().collect(),
            self.learners.iter().copied().collect(),
        );
        let mut steps: Vec<ConfStep> = want_v.difference(&cur_v).map(|&id| ConfStep::AddVoter(id)).collect();
        steps.extend(want_l.difference(&cur_l).map(|&id| ConfStep::AddLearner(id)));
        steps.extend(
            cur_v
                .union(&cur_l)
                .filter(|id| !want_v.contains(id) && !want_l.contains(id))
                .map(|&id| ConfStep::Remove(id)),
        );
        steps
    }
}

impl MembershipState {
    /// An empty state for cluster `cluster_id` (no members, epoch 0, nothing applied).
    pub fn new(cluster_id: impl Into<String>) -> Self {
        MembershipState {
            cluster_id: cluster_id.into(),
            applied_index: 0,
            members: BTreeMap::new(),
            subscriptions: BTreeMap::new(),
            placement: PlacementTable::new(),
            epoch: 0,
            pending_joins: BTreeMap::new(),
        }
    }

    /// The joins waiting for an operator's approval, by id.
    pub fn pending_joins(&self) -> &BTreeMap<NodeId, PendingJoin> {
        &self.pending_joins
    }

    /// The cluster's name.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The last log index applied (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The members by id.
    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.members
    }

    /// One member.
    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.members.get(&id)
    }

    /// The subscriptions by key.
    pub fn subscriptions(&self) -> &BTreeMap<SubscriptionKey, SubscriptionSpec> {
        &self.subscriptions
    }

    /// The committed placement table (see the module docs: it may lag membership and
    /// subscription changes until the leader's next `SetPlacement` commits).
    pub fn placement(&self) -> &PlacementTable {
        &self.placement
    }

    /// The placement epoch (0 before the first `SetPlacement`).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The nodes of `key`'s instances; empty when it is not placed or no longer a subscription.
    pub fn placement_of(&self, key: &SubscriptionKey) -> &[NodeId] {
        match (self.subscriptions.contains_key(key), self.placement.get(key)) {
            (true, Some(nodes)) => nodes,
            _ => &[],
        }
    }

    /// What node `id` should run under the current placement: each subscription placed on it,
    /// with how many of its instances, in key order.
    pub fn instances_on(&self, id: NodeId) -> Vec<(&SubscriptionSpec, u32)> {
        self.placement
            .iter()
            .filter_map(|(key, nodes)| {
                let n = nodes.iter().filter(|&&x| x == id).count() as u32;
                let spec = self.subscriptions.get(key)?;
                (n > 0).then_some((spec, n))
            })
            .collect()
    }

    /// Applies the command committed at log `index` (which must be greater than the last applied
    /// one). On success returns what changed (possibly nothing, e.g. a repeated `Join`); on error
    /// nothing changed except the applied index.
    pub fn apply(&mut self, index: u64, cmd: Command) -> Result<Vec<Effect>, CommandError> {
        if index <= self.applied_index {
            return Err(CommandError::IndexNotAfterApplied {
                index,
                applied: self.applied_index,
            });
        }
        self.applied_index = index;
        match cmd.kind.ok_or(CommandError::Empty)? {
            command::Kind::Join(node) => self.join(index, node),
            command::Kind::Leave(r) if !self.members.contains_key(&r.id) && self.pending_joins.contains_key(&r.id) => {
                // Rejects a pending join.
                self.pending_joins.remove(&r.id);
                Ok(Vec::new())
            }
            command::Kind::Leave(r) => {
                self.known(r.id)?;
                self.members.remove(&r.id);
                Ok(vec![Effect::MemberLeft { id: r.id }])
            }
            command::Kind::MarkDown(r) => self.set_status(r.id, |s| match s {
                NodeStatus::Draining => None,
                _ => Some(NodeStatus::Down),
            }),
            command::Kind::MarkUp(r) => self.set_status(r.id, |s| match s {
                NodeStatus::Draining => None,
                _ => Some(NodeStatus::Up),
            }),
            command::Kind::Drain(r) => self.set_status(r.id, |_| Some(NodeStatus::Draining)),
            command::Kind::Subscribe(rec) => self.subscribe(rec),
            command::Kind::Unsubscribe(r) => {
                let key = SubscriptionKey {
                    topic: r.topic,
                    group: r.group,
                };
                if self.subscriptions.remove(&key).is_none() {
                    return Err(CommandError::UnknownSubscription { key });
                }
                Ok(vec![Effect::SubscriptionChanged { key, spec: None }])
            }
            command::Kind::SetPlacement(rec) => {
                let table = rec.to_table()?;
                self.install_placement(rec.epoch, table)
            }
            command::Kind::PatchPlacement(patch) => {
                if patch.epoch > self.epoch && patch.base_epoch != self.epoch {
                    return Err(CommandError::PlacementBaseMismatch {
                        epoch: patch.epoch,
                        base: patch.base_epoch,
                        current: self.epoch,
                    });
                }
                let table = patch.apply_to(&self.placement)?;
                self.install_placement(patch.epoch, table)
            }
            command::Kind::RequestJoin(node) => self.request_join(node),
            command::Kind::ApproveJoin(r) => {
                let pending = self.pending_joins.get(&r.id).map(PendingJoin::record).ok_or_else(|| {
                    CommandError::UnknownPendingJoin {
                        id: r.id,
                        pending: self
                            .pending_joins
                            .keys()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                })?;
                self.join(index, pending)
            }
        }
    }

    /// [`apply`](Self::apply) for a Raft entry's bytes; an undecodable entry is refused like any
    /// other bad command (the applied index still advances).
    pub fn apply_bytes(&mut self, index: u64, bytes: &[u8]) -> Result<Vec<Effect>, CommandError> {
        match Command::from_bytes(bytes) {
            Ok(cmd) => self.apply(index, cmd),
            Err(e) => {
                if index <= self.applied_index {
                    return Err(CommandError::IndexNotAfterApplied {
                        index,
                        applied: self.applied_index,
                    });
                }
                self.applied_index = index;
                Err(CommandError::Undecodable { reason: e.to_string() })
            }
        }
    }

    fn known(&self, id: NodeId) -> Result<&Member, CommandError> {
        self.members.get(&id).ok_or_else(|| CommandError::UnknownNode {
            id,
            members: self.members.keys().map(u64::to_string).collect::<Vec<_>>().join(", "),
        })
    }

    fn request_join(&mut self, node: NodeRecord) -> Result<Vec<Effect>, CommandError> {
        if node.id == 0 {
            return Err(CommandError::ZeroNodeId);
        }
        if node.peer.trim().is_empty() {
            return Err(CommandError::MissingPeerAddress { id: node.id });
        }
        if self.members.contains_key(&node.id) {
            return Ok(Vec::new());
        }
        let id = node.id;
        let pending = PendingJoin {
            id,
            http: node.http,
            peer: node.peer,
            handlers: node.handlers,
            features: node.features,
        };
        if self.pending_joins.get(&id) == Some(&pending) {
            return Ok(Vec::new());
        }
        self.pending_joins.insert(id, pending);
        Ok(vec![Effect::JoinPending { id }])
    }

    fn join(&mut self, index: u64, node: NodeRecord) -> Result<Vec<Effect>, CommandError> {
        if node.id == 0 {
            return Err(CommandError::ZeroNodeId);
        }
        if node.peer.trim().is_empty() {
            return Err(CommandError::MissingPeerAddress { id: node.id });
        }
        let handlers: BTreeSet<String> = node.handlers.into_iter().collect();
        if let Some(m) = self.members.get_mut(&node.id) {
            if m.http != node.http || m.peer != node.peer {
                return Err(CommandError::DuplicateNodeId {
                    id: node.id,
                    existing_peer: m.peer.clone(),
                    existing_http: m.http.clone(),
                    peer: node.peer,
                    http: node.http,
                });
            }
            let mut effects = Vec::new();
            if m.handlers != handlers || m.features != node.features {
                m.handlers = handlers;
                m.features = node.features;
                effects.push(Effect::MemberUpdated { id: node.id });
            }
            if matches!(m.status, NodeStatus::Down | NodeStatus::Draining) {
                effects.push(Effect::MemberStatusChanged {
                    id: node.id,
                    from: m.status,
                    to: NodeStatus::Up,
                });
                m.status = NodeStatus::Up;
            }
            return Ok(effects);
        }
        if let Some(holder) = self.members.values().find(|m| m.peer == node.peer) {
            return Err(CommandError::PeerAddressInUse {
                peer: node.peer,
                id: node.id,
                holder: holder.id,
            });
        }
        self.members.insert(
            node.id,
            Member {
                id: node.id,
                http: node.http,
                peer: node.peer,
                handlers,
                features: node.features,
                status: NodeStatus::Up,
                joined_at_index: index,
            },
        );
        self.pending_joins.remove(&node.id);
        Ok(vec![Effect::MemberJoined { id: node.id }])
    }

    /// Moves member `id` to `next(status)`; `None` or the same status changes nothing.
    fn set_status(
        &mut self,
        id: NodeId,
        next: impl FnOnce(NodeStatus) -> Option<NodeStatus>,
    ) -> Result<Vec<Effect>, CommandError> {
        let from = self.known(id)?.status;
        match next(from) {
            Some(to) if to != from => {
                if let Some(m) = self.members.get_mut(&id) {
                    m.status = to;
                }
                Ok(vec![Effect::MemberStatusChanged { id, from, to }])
            }
            _ => Ok(Vec::new()),
        }
    }

    fn subscribe(&mut self, rec: SubscriptionRecord) -> Result<Vec<Effect>, CommandError> {
        let spec = rec.to_spec()?;
        let key = SubscriptionKey {
            topic: spec.topic.clone(),
            group: spec.group.clone(),
        };
        let invalid = |reason: String| CommandError::InvalidSubscription {
            key: key.clone(),
            reason,
        };
        validate_name("topic", &spec.topic).map_err(|e| invalid(e.to_string()))?;
        validate_name("group", &spec.group).map_err(|e| invalid(e.to_string()))?;
        if spec.instances == 0 || spec.instances > MAX_INSTANCES {
            return Err(invalid(format!(
                "instances must be between 1 and {MAX_INSTANCES} (got {})",
                spec.instances
            )));
        }
        if let Some(n) = spec.max_attempts {
            if n == 0 || n > MAX_ATTEMPTS {
                return Err(invalid(format!(
                    "max_attempts must be between 1 and {MAX_ATTEMPTS} (got {n})"
                )));
            }
        }
        if self.subscriptions.get(&key) == Some(&spec) {
            return Ok(Vec::new());
        }
        self.subscriptions.insert(key.clone(), spec.clone());
        Ok(vec![Effect::SubscriptionChanged { key, spec: Some(spec) }])
    }

    /// `table` at `epoch` (of a `SetPlacement`, or a `PatchPlacement` applied to the current
    /// table): fenced by the epoch, and every entry checked against the members and subscriptions.
    fn install_placement(&mut self, epoch: u64, table: PlacementTable) -> Result<Vec<Effect>, CommandError> {
        if epoch <= self.epoch {
            return Err(CommandError::StalePlacement {
                proposed: epoch,
                current: self.epoch,
            });
        }
        for (key, nodes) in &table {
            if !self.subscriptions.contains_key(key) {
                return Err(CommandError::PlacementUnknownSubscription {
                    epoch,
                    key: key.clone(),
                });
            }
            if let Some(&node) = nodes.iter().find(|n| !self.members.contains_key(n)) {
                return Err(CommandError::PlacementUnknownNode {
                    epoch,
                    key: key.clone(),
                    node,
                });
            }
        }
        let changed: Vec<SubscriptionKey> = self
            .placement
            .keys()
            .chain(table.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|k| self.placement.get(*k) != table.get(*k))
            .cloned()
            .collect();
        self.placement = table;
        self.epoch = epoch;
        Ok(vec![Effect::PlacementChanged { epoch, changed }])
    }

    /// The members as the placement function sees them.
    pub fn placement_nodes(&self) -> Vec<NodeInfo> {
        self.members
            .values()
            .map(|m| NodeInfo {
                id: m.id,
                status: m.status,
                kinds: m.handlers.clone(),
            })
            .collect()
    }

    /// The subscriptions as the placement function sees them.
    pub fn demands(&self) -> Vec<Demand> {
        self.subscriptions.values().map(Demand::from).collect()
    }

    /// The placement the leader should propose, or `None` when the current table is already what
    /// [`placement::place`] computes from this state (so proposing would only bump the epoch).
    /// `load_factor` is `placement.load_factor` ([`placement::DEFAULT_LOAD_FACTOR`]); every
    /// leader must use the same value or leaders would undo each other's tables.
    pub fn proposed_placement(&self, load_factor: f64) -> Option<PlacementProposal> {
        let p = placement::place(&self.placement_nodes(), &self.demands(), &self.placement, load_factor);
        (p.table != self.placement).then(|| {
            let epoch = self.epoch + 1;
            let patch = self
                .members
                .values()
                .all(|m| m.features & FEATURE_PLACEMENT_PATCH != 0)
                .then(|| PlacementPatch::between(self.epoch, &self.placement, epoch, &p.table));
            PlacementProposal {
                epoch,
                table: p.table,
                unplaced: p.unplaced,
                moved: p.moved,
                patch,
            }
        })
    }

    /// Whether [`proposed_placement`](Self::proposed_placement) has something to propose.
    pub fn needs_placement(&self, load_factor: f64) -> bool {
        self.proposed_placement(load_factor).is_some()
    }

    /// Which members should vote: the first `voters` members by join order (the log index of their
    /// `Join`), whatever their status — a down voter stays a voter until it is removed, so a
    /// brief failure does not reconfigure Raft. The others are learners; when a voter leaves, the
    /// earliest learner takes its place. `voters` below 1 counts as 1.
    pub fn voter_set(&self, voters: usize) -> VoterSet {
        let mut by_join: Vec<&Member> = self.members.values().collect();
        by_join.sort_by_key(|m| (m.joined_at_index, m.id));
        let n = voters.max(1).min(by_join.len());
        let mut set = VoterSet {
            voters: by_join[..n].iter().map(|m| m.id).collect(),
            learners: by_join[n..].iter().map(|m| m.id).collect(),
        };
        set.voters.sort_unstable();
        set.learners.sort_unstable();
        set
    }

    /// The whole state as prost bytes ([`SnapshotRecord`], format [`SNAPSHOT_FORMAT`]); equal
    /// states give equal bytes.
    pub fn to_snapshot(&self) -> Vec<u8> {
        SnapshotRecord {
            format: SNAPSHOT_FORMAT,
            cluster_id: self.cluster_id.clone(),
            applied_index: self.applied_index,
            members: self
                .members
                .values()
                .map(|m| MemberRecord {
                    node: Some(NodeRecord {
                        id: m.id,
                        http: m.http.clone(),
                        peer: m.peer.clone(),
                        handlers: m.handlers.iter().cloned().collect(),
                        features: m.features,
                    }),
                    status: m.status.as_str().to_string(),
                    joined_at_index: m.joined_at_index,
                })
                .collect(),
            subscriptions: self.subscriptions.values().map(SubscriptionRecord::from).collect(),
            placement: Some(PlacementRecord::new(self.epoch, &self.placement)),
            pending_joins: self.pending_joins.values().map(PendingJoin::record).collect(),
        }
        .encode_to_vec()
    }

    /// Loads a state written by [`to_snapshot`](Self::to_snapshot). The caller checks
    /// [`cluster_id`](Self::cluster_id) against its own configuration.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let rec = SnapshotRecord::decode(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
        if rec.format != SNAPSHOT_FORMAT {
            return Err(SnapshotError::Format { found: rec.format });
        }
        let mut state = MembershipState::new(rec.cluster_id);
        state.applied_index = rec.applied_index;
        for m in rec.members {
            let node = m
                .node
                .ok_or_else(|| SnapshotError::Invalid("a member without its node record".into()))?;
            if node.id == 0 {
                return Err(SnapshotError::Invalid("a member with id 0".into()));
            }
            let status = m
                .status
                .parse::<NodeStatus>()
                .map_err(|e| SnapshotError::Invalid(format!("member {}: {e}", node.id)))?;
            let member = Member {
                id: node.id,
                http: node.http,
                peer: node.peer,
                handlers: node.handlers.into_iter().collect(),
                features: node.features,
                status,
                joined_at_index: m.joined_at_index,
            };
            if state.members.insert(node.id, member).is_some() {
                return Err(SnapshotError::Invalid(format!("member {} appears twice", node.id)));
            }
        }
        for s in rec.subscriptions {
            let spec = s.to_spec()?;
            let key = SubscriptionKey {
                topic: spec.topic.clone(),
                group: spec.group.clone(),
            };
            if state.subscriptions.insert(key.clone(), spec).is_some() {
                return Err(SnapshotError::Invalid(format!("subscription {key} appears twice")));
            }
        }
        if let Some(p) = rec.placement {
            state.placement = p.to_table()?;
            state.epoch = p.epoch;
        }
        for n in rec.pending_joins {
            if n.id == 0 || state.members.contains_key(&n.id) {
                return Err(SnapshotError::Invalid(format!(
                    "pending join of node {} (a member, or id 0)",
                    n.id
                )));
            }
            let pending = PendingJoin {
                id: n.id,
                http: n.http,
                peer: n.peer,
                handlers: n.handlers,
                features: n.features,
            };
            if state.pending_joins.insert(n.id, pending).is_some() {
                return Err(SnapshotError::Invalid(format!(
                    "pending join of node {} appears twice",
                    n.id
                )));
            }
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [&str; 3] = ["rust:audit", "webhook", "log"];

    fn key(topic: &str, group: &str) -> SubscriptionKey {
        SubscriptionKey {
            topic: topic.into(),
            group: group.into(),
        }
    }

    fn join(id: NodeId) -> Command {
        Command::join(id, format!("10.0.0.{id}:7070"), format!("10.0.0.{id}:7071"), KINDS)
    }

    /// Applies `cmds` at indexes 1, 2, … and panics on any refusal.
    fn state_with(cmds: impl IntoIterator<Item = Command>) -> MembershipState {
        let mut s = MembershipState::new("test");
        for cmd in cmds {
            let i = s.applied_index() + 1;
            let name = cmd.name();
            if let Err(e) = s.apply(i, cmd) {
                panic!("{name} at {i} refused: {e}");
            }
        }
        s
    }

    /// Applies at the next index.
    fn next(s: &mut MembershipState, cmd: Command) -> Result<Vec<Effect>, CommandError> {
        let i = s.applied_index() + 1;
        s.apply(i, cmd)
    }

    /// Refused commands must leave everything but the applied index as it was.
    fn refused(s: &mut MembershipState, cmd: Command) -> CommandError {
        let before = s.clone();
        let err = next(s, cmd).expect_err("command should be refused");
        let mut after = s.clone();
        assert_eq!(after.applied_index, before.applied_index + 1);
        after.applied_index = before.applied_index;
        assert_eq!(after, before, "a refused command changed the state");
        err
    }

    #[test]
    fn join_adds_an_up_member_and_repeating_it_changes_nothing() {
        let mut s = MembershipState::new("c1");
        assert_eq!(s.apply(5, join(1)), Ok(vec![Effect::MemberJoined { id: 1 }]));
        let m = s.member(1).unwrap();
        assert_eq!(m.status, NodeStatus::Up);
        assert_eq!(m.joined_at_index, 5);
        assert_eq!(m.peer, "10.0.0.1:7071");
        assert_eq!(m.handlers.len(), 3);
        assert_eq!(s.apply(6, join(1)), Ok(vec![]));
        assert_eq!(
            s.member(1).unwrap().joined_at_index,
            5,
            "a rejoin keeps its place in the voter queue"
        );
        assert_eq!(s.applied_index(), 6);
    }

    #[test]
    fn join_refuses_a_second_process_with_the_same_id_or_peer_address() {
        let mut s = state_with([join(1)]);
        let other = Command::join(1, "10.0.0.9:7070", "10.0.0.9:7071", ["log"]);
        let err = refused(&mut s, other);
        assert!(matches!(err, CommandError::DuplicateNodeId { id: 1, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("10.0.0.1:7071") && msg.contains("10.0.0.9:7071") && msg.contains("--node-id"),
            "{msg}"
        );
        let same_peer = Command::join(2, "10.0.0.2:7070", "10.0.0.1:7071", ["log"]);
        assert_eq!(
            refused(&mut s, same_peer),
            CommandError::PeerAddressInUse {
                peer: "10.0.0.1:7071".into(),
                id: 2,
                holder: 1
            }
        );
        assert_eq!(
            refused(&mut s, Command::join(0, "h", "p", ["log"])),
            CommandError::ZeroNodeId
        );
        assert_eq!(
            refused(&mut s, Command::join(3, "h", " ", ["log"])),
            CommandError::MissingPeerAddress { id: 3 }
        );
    }

    #[test]
    fn rejoin_updates_handlers_and_brings_a_down_member_back() {
        let mut s = state_with([join(1), join(2), Command::mark_down(2)]);
        let rejoin = Command::join(2, "10.0.0.2:7070", "10.0.0.2:7071", ["log", "rust:new"]);
        assert_eq!(
            next(&mut s, rejoin.clone()),
            Ok(vec![
                Effect::MemberUpdated { id: 2 },
                Effect::MemberStatusChanged {
                    id: 2,
                    from: NodeStatus::Down,
                    to: NodeStatus::Up
                }
            ])
        );
        assert!(s.member(2).unwrap().handlers.contains("rust:new"));
        // A draining member that restarts (its SIGTERM drained it) takes work again.
        next(&mut s, Command::drain(2)).unwrap();
        assert_eq!(
            next(&mut s, rejoin.clone()),
            Ok(vec![Effect::MemberStatusChanged {
                id: 2,
                from: NodeStatus::Draining,
                to: NodeStatus::Up
            }])
        );
        assert_eq!(s.member(2).unwrap().status, NodeStatus::Up);
        assert_eq!(next(&mut s, rejoin), Ok(vec![]));
    }

    #[test]
    fn leave_removes_the_member_and_unknown_ids_are_refused() {
        let mut s = state_with([join(1), join(2)]);
        assert_eq!(next(&mut s, Command::leave(2)), Ok(vec![Effect::MemberLeft { id: 2 }]));
        assert!(s.member(2).is_none());
        let err = refused(&mut s, Command::leave(2));
        assert_eq!(
            err,
            CommandError::UnknownNode {
                id: 2,
                members: "1".into()
            }
        );
        assert_eq!(err.to_string(), "unknown node 2; members are [1]");
        for cmd in [Command::mark_down(7), Command::mark_up(7), Command::drain(7)] {
            assert!(matches!(refused(&mut s, cmd), CommandError::UnknownNode { id: 7, .. }));
        }
        // The id can come back later, at the end of the join order.
        next(&mut s, join(2)).unwrap();
        assert_eq!(s.member(2).unwrap().joined_at_index, s.applied_index());
    }

    #[test]
    fn status_transitions() {
        use NodeStatus::{Down, Draining, Up};
        // (start, command, expected status, whether an effect is reported)
        type Case = (NodeStatus, fn(NodeId) -> Command, NodeStatus, bool);
        let cases: [Case; 9] = [
            (Up, Command::mark_down, Down, true),
            (Up, Command::mark_up, Up, false),
            (Up, Command::drain, Draining, true),
            (Down, Command::mark_down, Down, false),
            (Down, Command::mark_up, Up, true),
            (Down, Command::drain, Draining, true),
            (Draining, Command::mark_down, Draining, false),
            (Draining, Command::mark_up, Draining, false),
            (Draining, Command::drain, Draining, false),
        ];
        for (start, cmd, want, reported) in cases {
            let mut s = state_with([join(1)]);
            match start {
                Down => drop(next(&mut s, Command::mark_down(1)).unwrap()),
                Draining => drop(next(&mut s, Command::drain(1)).unwrap()),
                _ => {}
            }
            let cmd = cmd(1);
            let name = cmd.name();
            let effects = next(&mut s, cmd).unwrap();
            assert_eq!(s.member(1).unwrap().status, want, "{start} + {name}");
            let expected = if reported {
                vec![Effect::MemberStatusChanged {
                    id: 1,
                    from: start,
                    to: want,
                }]
            } else {
                vec![]
            };
            assert_eq!(effects, expected, "{start} + {name}");
        }
    }

    #[test]
    fn subscribe_creates_replaces_and_unsubscribe_removes() {
        let mut s = state_with([join(1)]);
        let spec = SubscriptionSpec::rust("user.login", "audit", "audit").instances(2);
        assert_eq!(
            next(&mut s, Command::subscribe(&spec)),
            Ok(vec![Effect::SubscriptionChanged {
                key: key("user.login", "audit"),
                spec: Some(spec.clone())
            }])
        );
        assert_eq!(
            next(&mut s, Command::subscribe(&spec)),
            Ok(vec![]),
            "same spec: nothing changes"
        );
        let mut hook = spec.clone().max_attempts(3);
        hook.handler = HandlerSpec::Webhook {
            url: "http://h:9/x".into(),
        };
        next(&mut s, Command::subscribe(&hook)).unwrap();
        assert_eq!(s.subscriptions()[&key("user.login", "audit")], hook);
        let log = SubscriptionSpec {
            handler: HandlerSpec::Log,
            ..SubscriptionSpec::rust("t", "log", "x")
        };
        next(&mut s, Command::subscribe(&log)).unwrap();
        assert_eq!(s.subscriptions()[&key("t", "log")], log);
        assert_eq!(
            next(&mut s, Command::unsubscribe("user.login", "audit")),
            Ok(vec![Effect::SubscriptionChanged {
                key: key("user.login", "audit"),
                spec: None
            }])
        );
        assert_eq!(
            refused(&mut s, Command::unsubscribe("user.login", "audit")),
            CommandError::UnknownSubscription {
                key: key("user.login", "audit")
            }
        );
    }

    #[test]
    fn subscribe_refuses_what_every_node_can_check() {
        let mut s = MembershipState::new("c");
        let bad = [
            SubscriptionSpec::rust("bad topic", "g", "h"),
            SubscriptionSpec::rust("t", "", "h"),
            SubscriptionSpec::rust("t", "g", "h").instances(0),
            SubscriptionSpec::rust("t", "g", "h").instances(MAX_INSTANCES + 1),
            SubscriptionSpec::rust("t", "g", "h").max_attempts(0),
        ];
        for spec in bad {
            let err = refused(&mut s, Command::subscribe(&spec));
            assert!(
                matches!(err, CommandError::InvalidSubscription { .. }),
                "{spec:?}: {err:?}"
            );
        }
        let mut rec = SubscriptionRecord::from(&SubscriptionSpec::rust("t", "g", "h"));
        rec.handler_kind = "wasm".into();
        let err = refused(&mut s, Command::of(command::Kind::Subscribe(rec.clone())));
        assert!(err.to_string().contains("unknown handler kind \"wasm\""), "{err}");
        rec.handler_kind = "rust".into();
        rec.handler_target.clear();
        assert!(matches!(
            refused(&mut s, Command::of(command::Kind::Subscribe(rec))),
            CommandError::Malformed(_)
        ));
        assert!(s.subscriptions().is_empty());
    }

    #[test]
    fn set_placement_is_fenced_by_epoch_and_checked_against_the_state() {
        let spec = SubscriptionSpec::rust("t", "g", "audit").instances(2);
        let mut s = state_with([join(1), join(2), Command::subscribe(&spec)]);
        let table = PlacementTable::from([(key("t", "g"), vec![1, 2])]);
        assert_eq!(
            next(&mut s, Command::set_placement(3, &table)),
            Ok(vec![Effect::PlacementChanged {
                epoch: 3,
                changed: vec![key("t", "g")]
            }])
        );
        assert_eq!((s.epoch(), s.placement()), (3, &table));
        let moved = PlacementTable::from([(key("t", "g"), vec![2, 2])]);
        for stale in [3, 2, 0] {
            let err = refused(&mut s, Command::set_placement(stale, &moved));
            assert_eq!(
                err,
                CommandError::StalePlacement {
                    proposed: stale,
                    current: 3
                }
            );
            assert!(err.to_string().contains("propose epoch 4"), "{err}");
        }
        let unknown_node = PlacementTable::from([(key("t", "g"), vec![1, 9])]);
        assert_eq!(
            refused(&mut s, Command::set_placement(4, &unknown_node)),
            CommandError::PlacementUnknownNode {
                epoch: 4,
                key: key("t", "g"),
                node: 9
            }
        );
        let unknown_sub = PlacementTable::from([(key("t", "nope"), vec![1])]);
        assert_eq!(
            refused(&mut s, Command::set_placement(4, &unknown_sub)),
            CommandError::PlacementUnknownSubscription {
                epoch: 4,
                key: key("t", "nope")
            }
        );
        let mut twice = PlacementRecord::new(4, &table);
        twice.entries.push(twice.entries[0].clone());
        assert!(matches!(
            refused(&mut s, Command::of(command::Kind::SetPlacement(twice))),
            CommandError::Malformed(_)
        ));
        // An unchanged table with a newer epoch is accepted and reports no changed entries.
        assert_eq!(
            next(&mut s, Command::set_placement(10, &table)),
            Ok(vec![Effect::PlacementChanged {
                epoch: 10,
                changed: vec![]
            }])
        );
        assert_eq!(next(&mut s, Command::set_placement(11, &moved)).unwrap().len(), 1);
        assert_eq!(s.instances_on(2), vec![(&spec, 2)]);
        assert_eq!(s.instances_on(1), vec![]);
    }

    /// A `Join` as a build older than `NodeRecord::features` wrote it.
    fn old_join(id: NodeId) -> Command {
        let mut cmd = join(id);
        if let Some(command::Kind::Join(node)) = &mut cmd.kind {
            node.features = 0;
        }
        cmd
    }

    #[test]
    fn a_placement_patch_gives_the_table_a_whole_set_placement_would_and_is_checked_the_same_way() {
        let specs: Vec<SubscriptionSpec> = (0..6)
            .map(|i| SubscriptionSpec::rust("t", format!("g{i}"), "audit").instances(2))
            .collect();
        let mut s = state_with(
            [join(1), join(2), join(3)]
                .into_iter()
                .chain(specs.iter().map(Command::subscribe)),
        );
        let first = s.proposed_placement(1.25).expect("a first placement");
        assert!(first.patch.is_some(), "every member applies patches");
        next(&mut s, first.command()).unwrap();
        // A node lost and a subscription removed: the patch carries only what changed.
        next(&mut s, Command::mark_down(2)).unwrap();
        next(&mut s, Command::unsubscribe("t", "g0")).unwrap();
        let p = s.proposed_placement(1.25).expect("the loss needs a new placement");
        let patch = p.patch.clone().unwrap();
        assert_eq!(patch.base_epoch, s.epoch());
        assert_eq!(
            patch.removed,
            vec![SubscriptionRef {
                topic: "t".into(),
                group: "g0".into()
            }]
        );
        let unchanged = s
            .placement()
            .iter()
            .filter(|(k, n)| p.table.get(*k) == Some(*n))
            .count();
        assert_eq!(patch.set.len(), p.table.len() - unchanged, "only new or moved entries");
        assert!(patch.set.iter().all(|e| !e.nodes.is_empty()));
        assert!(p.command().to_bytes().len() < Command::set_placement(p.epoch, &p.table).to_bytes().len());
        let mut whole = s.clone();
        // Through its encoding, as the log carries it.
        let i = s.applied_index() + 1;
        let patched_effects = s.apply_bytes(i, &p.command().to_bytes()).unwrap();
        let whole_effects = next(&mut whole, Command::set_placement(p.epoch, &p.table)).unwrap();
        assert_eq!(patched_effects, whole_effects);
        assert_eq!(s, whole, "patch and whole table give the same state");
        assert_eq!((s.epoch(), s.placement()), (p.epoch, &p.table));

        // Fencing: a stale epoch, or a patch of another table than the one in force.
        let epoch = s.epoch();
        let stale = PlacementPatch {
            epoch,
            base_epoch: epoch - 1,
            set: vec![],
            removed: vec![],
        };
        assert!(matches!(
            refused(&mut s, Command::patch_placement(stale)),
            CommandError::StalePlacement { .. }
        ));
        let moved_on = PlacementPatch {
            epoch: epoch + 2,
            base_epoch: epoch - 1,
            set: vec![],
            removed: vec![],
        };
        let err = refused(&mut s, Command::patch_placement(moved_on));
        assert_eq!(
            err,
            CommandError::PlacementBaseMismatch {
                epoch: epoch + 2,
                base: epoch - 1,
                current: epoch
            }
        );
        assert!(err.to_string().contains("recompute"), "{err}");
        // The same checks as a whole table: unknown nodes and subscriptions, and a key named twice.
        let entry = |group: &str, nodes: Vec<u64>| PlacementEntry {
            topic: "t".into(),
            group: group.into(),
            nodes,
        };
        let patch = |set, removed| PlacementPatch {
            epoch: epoch + 1,
            base_epoch: epoch,
            set,
            removed,
        };
        assert!(matches!(
            refused(
                &mut s,
                Command::patch_placement(patch(vec![entry("g1", vec![1, 9])], vec![]))
            ),
            CommandError::PlacementUnknownNode { node: 9, .. }
        ));
        assert!(matches!(
            refused(
                &mut s,
                Command::patch_placement(patch(vec![entry("nope", vec![1])], vec![]))
            ),
            CommandError::PlacementUnknownSubscription { .. }
        ));
        let g1 = SubscriptionRef {
            topic: "t".into(),
            group: "g1".into(),
        };
        assert!(matches!(
            refused(
                &mut s,
                Command::patch_placement(patch(vec![entry("g1", vec![1])], vec![g1]))
            ),
            CommandError::Malformed(_)
        ));
        assert!(matches!(
            refused(
                &mut s,
                Command::patch_placement(patch(vec![entry("g1", vec![1]), entry("g1", vec![3])], vec![]))
            ),
            CommandError::Malformed(_)
        ));
    }

    #[test]
    fn the_leader_writes_whole_tables_while_a_member_does_not_apply_patches() {
        let spec = SubscriptionSpec::rust("t", "g", "audit").instances(2);
        let mut s = state_with([join(1), old_join(2), Command::subscribe(&spec)]);
        assert_eq!(s.member(2).unwrap().features, 0);
        let p = s.proposed_placement(1.25).unwrap();
        assert!(p.patch.is_none(), "node 2's build would refuse a patch");
        assert_eq!(p.command().name(), "set_placement");
        // Node 2 restarts on a newer build: its rejoin announces the feature, and patches follow.
        assert_eq!(next(&mut s, join(2)), Ok(vec![Effect::MemberUpdated { id: 2 }]));
        assert_eq!(s.member(2).unwrap().features, FEATURES);
        let p = s.proposed_placement(1.25).unwrap();
        assert_eq!(p.command().name(), "patch_placement");
        // The features survive a snapshot, and a record from an older build decodes as none.
        let restored = MembershipState::from_snapshot(&s.to_snapshot()).unwrap();
        assert_eq!(restored, s);
        let old = NodeRecord {
            id: 1,
            http: "h".into(),
            peer: "p".into(),
            handlers: vec![],
            features: 0,
        };
        let mut bytes = old.encode_to_vec();
        assert_eq!(NodeRecord::decode(bytes.as_slice()).unwrap().features, 0);
        bytes.clear();
        NodeRecord {
            features: FEATURES,
            ..old
        }
        .encode(&mut bytes)
        .unwrap();
        assert_eq!(NodeRecord::decode(bytes.as_slice()).unwrap().features, FEATURES);
    }

    #[test]
    fn indexes_must_increase_and_empty_or_garbage_entries_are_refused() {
        let mut s = state_with([join(1)]);
        let before = s.clone();
        assert_eq!(
            s.apply(1, join(2)),
            Err(CommandError::IndexNotAfterApplied { index: 1, applied: 1 })
        );
        assert_eq!(
            s, before,
            "a replayed index changes nothing, not even the applied index"
        );
        assert_eq!(refused(&mut s, Command { kind: None }), CommandError::Empty);
        let err = s.apply_bytes(10, &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(err, CommandError::Undecodable { .. }), "{err:?}");
        assert_eq!(s.applied_index(), 10);
        assert_eq!(
            s.apply_bytes(11, &join(2).to_bytes()),
            Ok(vec![Effect::MemberJoined { id: 2 }])
        );
        assert!(matches!(
            s.apply_bytes(11, &[]),
            Err(CommandError::IndexNotAfterApplied { .. })
        ));
    }

    #[test]
    fn every_command_round_trips_through_bytes() {
        let spec = SubscriptionSpec::rust("t", "g", "audit").instances(3).max_attempts(7);
        let table = PlacementTable::from([(key("t", "g"), vec![1, 2, 1]), (key("u", "h"), vec![])]);
        let cmds = [
            join(4),
            Command::leave(4),
            Command::mark_down(4),
            Command::mark_up(4),
            Command::drain(4),
            Command::subscribe(&spec),
            Command::unsubscribe("t", "g"),
            Command::set_placement(9, &table),
            Command { kind: None },
        ];
        for cmd in cmds {
            let back = Command::from_bytes(&cmd.to_bytes()).unwrap();
            assert_eq!(back, cmd, "{}", cmd.name());
        }
        let Some(command::Kind::Subscribe(rec)) = Command::subscribe(&spec).kind else {
            unreachable!()
        };
        assert_eq!(rec.to_spec(), Ok(spec));
        assert_eq!(PlacementRecord::new(9, &table).to_table(), Ok(table));
    }

    fn populated() -> MembershipState {
        let hook = SubscriptionSpec {
            handler: HandlerSpec::Webhook {
                url: "http://127.0.0.1:9/hook".into(),
            },
            ..SubscriptionSpec::rust("user.login", "hook", "-")
        };
        let mut s = state_with([
            join(1),
            join(2),
            join(3),
            Command::subscribe(
                &SubscriptionSpec::rust("user.login", "audit", "audit")
                    .instances(2)
                    .max_attempts(4),
            ),
            Command::subscribe(&hook),
            Command::mark_down(3),
            Command::drain(2),
        ]);
        let p = s.proposed_placement(1.25).unwrap();
        next(&mut s, p.command()).unwrap();
        s
    }

    #[test]
    fn snapshots_round_trip_and_refuse_garbage() {
        let s = populated();
        let bytes = s.to_snapshot();
        let back = MembershipState::from_snapshot(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.to_snapshot(), bytes, "equal states encode to equal bytes");
        let empty = MembershipState::new("fresh");
        assert_eq!(MembershipState::from_snapshot(&empty.to_snapshot()), Ok(empty));

        assert!(matches!(
            MembershipState::from_snapshot(&[0xff, 0x01]),
            Err(SnapshotError::Decode(_))
        ));
        let mut rec = SnapshotRecord::decode(bytes.as_slice()).unwrap();
        rec.format = 2;
        assert_eq!(
            MembershipState::from_snapshot(&rec.encode_to_vec()),
            Err(SnapshotError::Format { found: 2 })
        );
        rec.format = SNAPSHOT_FORMAT;
        rec.members.push(rec.members[0].clone());
        assert!(matches!(
            MembershipState::from_snapshot(&rec.encode_to_vec()),
            Err(SnapshotError::Invalid(m)) if m.contains("appears twice")
        ));
        rec.members.pop();
        rec.members[0].status = "asleep".into();
        assert!(matches!(
            MembershipState::from_snapshot(&rec.encode_to_vec()),
            Err(SnapshotError::Invalid(_))
        ));
    }

    #[test]
    fn the_first_joined_members_vote_and_the_earliest_learner_replaces_a_leaver() {
        let mut s = state_with((1..=5).map(join));
        let set = |v: &[NodeId], l: &[NodeId]| VoterSet {
            voters: v.to_vec(),
            learners: l.to_vec(),
        };
        assert_eq!(s.voter_set(DEFAULT_VOTERS), set(&[1, 2, 3], &[4, 5]));
        assert_eq!(s.voter_set(1), set(&[1], &[2, 3, 4, 5]));
        assert_eq!(s.voter_set(0), set(&[1], &[2, 3, 4, 5]));
        assert_eq!(s.voter_set(9), set(&[1, 2, 3, 4, 5], &[]));
        // Down and draining voters keep their vote.
        next(&mut s, Command::mark_down(1)).unwrap();
        next(&mut s, Command::drain(3)).unwrap();
        assert_eq!(s.voter_set(3), set(&[1, 2, 3], &[4, 5]));
        // A voter leaves: the earliest learner (4) is promoted.
        next(&mut s, Command::leave(2)).unwrap();
        assert_eq!(s.voter_set(3), set(&[1, 3, 4], &[5]));
        // It comes back as the newest member, so as a learner.
        next(&mut s, join(2)).unwrap();
        assert_eq!(s.voter_set(3), set(&[1, 3, 4], &[2, 5]));
        // Join order, not id order, decides.
        let t = state_with([join(9), join(3), join(5), join(1)]);
        assert_eq!(t.voter_set(3), set(&[3, 5, 9], &[1]));
        assert_eq!(MembershipState::new("c").voter_set(3), VoterSet::default());
    }

    #[test]
    fn voter_set_lists_the_raft_configuration_changes() {
        let s = state_with([join(1), join(2), join(3), join(4), Command::leave(2)]);
        let want = s.voter_set(3); // voters 1, 3, 4
        assert_eq!(
            want.changes_from(&[1, 2, 3], &[4]),
            vec![ConfStep::AddVoter(4), ConfStep::Remove(2)]
        );
        assert_eq!(want.changes_from(&[1, 3, 4], &[]), vec![]);
        assert_eq!(
            VoterSet {
                voters: vec![1],
                learners: vec![2]
            }
            .changes_from(&[1, 2], &[]),
            vec![ConfStep::AddLearner(2)]
        );
    }

    #[test]
    fn leader_proposes_placement_until_the_table_matches_the_state() {
        let mut s = state_with([
            join(1),
            join(2),
            Command::join(3, "10.0.0.3:7070", "10.0.0.3:7071", ["log"]),
            Command::subscribe(&SubscriptionSpec::rust("user.login", "audit", "audit").instances(2)),
            Command::subscribe(&SubscriptionSpec::rust("user.login", "billing", "billing")),
        ]);
        assert!(s.needs_placement(1.25));
        let p = s.proposed_placement(1.25).unwrap();
        assert_eq!(p.epoch, 1);
        assert_eq!(p.unplaced, vec![key("user.login", "billing")]);
        let mut audit = p.table[&key("user.login", "audit")].clone();
        audit.sort_unstable();
        assert_eq!(audit, vec![1, 2], "node 3 has no rust:audit handler");
        next(&mut s, p.command()).unwrap();
        assert!(!s.needs_placement(1.25), "the committed table is a fixed point");
        assert_eq!(s.placement_of(&key("user.login", "billing")), &[] as &[NodeId]);

        // A node goes down: only its instance moves, to the only other node with the handler.
        next(&mut s, Command::mark_down(2)).unwrap();
        let p = s.proposed_placement(1.25).unwrap();
        assert_eq!(p.epoch, 2);
        assert_eq!(p.table[&key("user.login", "audit")], vec![1, 1]);
        assert_eq!(p.moved, 1);
        // A late proposal from an older leader with the same epoch loses to the first one.
        next(&mut s, p.command()).unwrap();
        assert!(matches!(
            refused(&mut s, p.command()),
            CommandError::StalePlacement { .. }
        ));

        // Unsubscribing leaves the entry until the next placement, but readers no longer see it.
        next(&mut s, Command::unsubscribe("user.login", "audit")).unwrap();
        assert_eq!(s.placement_of(&key("user.login", "audit")), &[] as &[NodeId]);
        assert!(s.instances_on(1).is_empty());
        let p = s.proposed_placement(1.25).unwrap();
        assert!(!p.table.contains_key(&key("user.login", "audit")));
    }

    #[test]
    fn effects_say_what_the_driver_must_recheck() {
        assert!(Effect::MemberJoined { id: 1 }.affects_voters());
        assert!(Effect::MemberLeft { id: 1 }.affects_voters());
        assert!(!Effect::MemberUpdated { id: 1 }.affects_voters());
        assert!(Effect::MemberUpdated { id: 1 }.affects_placement());
        assert!(!Effect::PlacementChanged {
            epoch: 1,
            changed: vec![]
        }
        .affects_placement());
    }

    /// xorshift64*: a tiny seeded PRNG for the determinism test.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    /// A random command, valid or not, against a small id and name space so conflicts happen.
    fn random_command(rng: &mut Rng, s: &MembershipState) -> Command {
        let id = 1 + rng.below(6);
        match rng.below(10) {
            0 | 1 => {
                let kinds: Vec<&str> = KINDS.iter().copied().filter(|_| rng.below(3) > 0).collect();
                // Sometimes a different address for a known id (refused).
                let host = if rng.below(5) == 0 { id + 10 } else { id };
                Command::join(id, format!("h{host}:1"), format!("h{host}:2"), kinds)
            }
            2 => Command::leave(id),
            3 => Command::mark_down(id),
            4 => Command::mark_up(id),
            5 => Command::drain(id),
            6 => {
                let spec = SubscriptionSpec {
                    handler: match rng.below(3) {
                        0 => HandlerSpec::Log,
                        1 => HandlerSpec::Webhook {
                            url: "http://x/y".into(),
                        },
                        _ => HandlerSpec::Rust { name: "audit".into() },
                    },
                    ..SubscriptionSpec::rust("t", format!("g{}", rng.below(4)), "-").instances(rng.below(4) as u32)
                };
                Command::subscribe(&spec)
            }
            7 => Command::unsubscribe("t", format!("g{}", rng.below(4))),
            _ => match s.proposed_placement(1.25) {
                // Sometimes stale on purpose.
                Some(p) => Command::set_placement(p.epoch - rng.below(2), &p.table),
                None => Command::set_placement(s.epoch() + rng.below(2), s.placement()),
            },
        }
    }

    #[test]
    fn the_same_log_gives_the_same_state_on_every_node() {
        for seed in 1..=30u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut leader = MembershipState::new("c");
            let mut log: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut outcomes = Vec::new();
            let mut index = 0;
            for _ in 0..200 {
                index += 1 + rng.below(3); // entries the state machine never sees leave gaps
                let cmd = random_command(&mut rng, &leader);
                let bytes = cmd.to_bytes();
                outcomes.push(leader.apply(index, cmd));
                log.push((index, bytes));
            }
            // A follower replays the log from the bytes; another restores a mid-way snapshot.
            let mut follower = MembershipState::new("c");
            let mut restored = MembershipState::new("c");
            for (n, (i, bytes)) in log.iter().enumerate() {
                assert_eq!(follower.apply_bytes(*i, bytes), outcomes[n], "seed {seed} entry {n}");
                if n == log.len() / 2 {
                    restored = MembershipState::from_snapshot(&follower.to_snapshot()).unwrap();
                } else if n > log.len() / 2 {
                    assert_eq!(restored.apply_bytes(*i, bytes), outcomes[n], "seed {seed} entry {n}");
                }
            }
            assert_eq!(follower, leader, "seed {seed}");
            assert_eq!(restored, leader, "seed {seed}");
            assert_eq!(follower.to_snapshot(), leader.to_snapshot(), "seed {seed}");
            assert!(outcomes.iter().any(Result::is_err) && outcomes.iter().any(Result::is_ok));
        }
    }

    #[test]
    fn a_requested_join_waits_for_approval_and_survives_a_snapshot() {
        let mut s = state_with([join(1)]);
        let request = Command::request_join(join(4)).unwrap();
        assert_eq!(s.apply(2, request.clone()), Ok(vec![Effect::JoinPending { id: 4 }]));
        assert!(s.member(4).is_none(), "a pending join is not a member");
        assert_eq!(s.pending_joins().keys().copied().collect::<Vec<_>>(), vec![4]);
        assert_eq!(s.apply(3, request), Ok(vec![]), "asking again changes nothing");
        let restored = MembershipState::from_snapshot(&s.to_snapshot()).unwrap();
        assert_eq!(restored, s);
        assert!(matches!(
            s.apply(4, Command::approve_join(5)),
            Err(CommandError::UnknownPendingJoin { id: 5, .. })
        ));
        assert_eq!(
            s.apply(5, Command::approve_join(4)),
            Ok(vec![Effect::MemberJoined { id: 4 }])
        );
        assert_eq!(s.member(4).unwrap().joined_at_index, 5);
        assert!(s.pending_joins().is_empty());
        // A member's request changes nothing; a pending join can be rejected with Leave.
        assert_eq!(s.apply(6, Command::request_join(join(4)).unwrap()), Ok(vec![]));
        s.apply(7, Command::request_join(join(6)).unwrap()).unwrap();
        assert_eq!(s.apply(8, Command::leave(6)), Ok(vec![]));
        assert!(s.pending_joins().is_empty() && s.member(6).is_none());
    }
}
