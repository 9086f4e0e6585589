//! The event bus: topic → subscriptions → one instance each, wherever it is placed.
//!
//! The router owns the routing table (an immutable snapshot swapped atomically on every
//! subscription, placement or local change, so publishing never takes a lock) and the worker
//! threads that run this node's handler instances. A subscription's [`Route`] lists one [`Slot`]
//! per placed instance, in placement order: local slots lead to this node's instances, remote ones
//! to the node that runs them (the relay forwards there). For each subscription of an event's
//! topic the router picks one slot among the *healthy* ones (local, or on a peer the monitor says
//! is `up`; suspect and degraded nodes are skipped at once, before Raft downs them):
//!
//! * with a partition key, by rendezvous hashing over the healthy slots, so a key lands on the
//!   same instance cluster-wide while membership is stable and keeps its order (on the chosen node
//!   the same hash picks the local instance);
//! * without a key, the less loaded of two random healthy slots ("power of two choices"; a remote
//!   slot's load is what this node has in flight to it), falling back to any slot with room.
//!
//! Picking reserves room first: a slot in a local instance's bounded mailbox ([`Reservation`]), or
//! one of `window` in-flight events towards a remote instance. The ingress sends only when every
//! subscription has room, so a full mailbox or window refuses the publish (429) rather than
//! accepting an event it cannot queue. When every slot is on an unhealthy node the event is
//! *parked* (accepted, held by the relay until a node can take it). The router does not decide
//! placement: the Raft placement table gives it the slots.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix::ArbiterHandle;
use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::handler::supervisor::{self, DeadLetterSink, Job, Policy, SubShared};
use crate::handler::{HandlerRegistry, Spawner};
use crate::membership::state::MembershipState;
use crate::metrics::SubMetrics;
use crate::monitor::{Health, PeerHealth, Progress};
use crate::subscription::SubscriptionSpec;
use crate::types::{self, mix, SubscriptionKey, FNV_OFFSET};

/// One running handler instance, as the router sees it.
pub(crate) struct Instance {
    tx: mpsc::Sender<Job>,
    /// Events queued or being handled by this instance (for least-loaded choice, and the node's
    /// backlog). The instance takes finished events off it a pipeline run at a time (see
    /// `supervisor::Runner::settle`), so it may count up to [`supervisor::PIPELINE`] finished
    /// ones until the instance next waits for its mailbox.
    load: Arc<AtomicUsize>,
}

/// A subscription with its running instances.
pub(crate) struct SubRuntime {
    pub(crate) spec: SubscriptionSpec,
    pub(crate) shared: Arc<SubShared>,
    instances: Vec<Instance>,
}

/// A slot reserved in one instance's mailbox; sending cannot fail or block.
pub(crate) struct Reservation<'a> {
    permit: mpsc::Permit<'a, Job>,
    load: &'a AtomicUsize,
}

impl Reservation<'_> {
    pub(crate) fn send(self, job: Job) {
        self.load.fetch_add(1, Ordering::Relaxed);
        self.permit.send(job);
    }
}

impl SubRuntime {
    /// Reserves a mailbox slot in the instance that should handle an event with `key`.
    pub(crate) fn reserve(&self, key: Option<&str>) -> Option<Reservation<'_>> {
        let n = self.instances.len();
        let slot = |i: usize| {
            let inst = &self.instances[i];
            inst.tx.try_reserve().ok().map(|permit| Reservation {
                permit,
                load: &inst.load,
            })
        };
        if let Some(key) = key {
            // Order per key matters more than balance: never fall back to another instance.
            return slot(rendezvous(key.as_bytes(), n));
        }
        if n == 1 {
            return slot(0);
        }
        let (a, b) = two_distinct(n);
        let (first, second) =
            if self.instances[a].load.load(Ordering::Relaxed) <= self.instances[b].load.load(Ordering::Relaxed) {
                (a, b)
            } else {
                (b, a)
            };
        slot(first).or_else(|| slot(second)).or_else(|| (0..n).find_map(slot))
    }

    /// The instance [`SubRuntime::send_waiting`] and [`SubRuntime::try_send`] choose.
    fn waiting_choice(&self, key: Option<&str>) -> usize {
        let n = self.instances.len();
        match key {
            Some(k) => rendezvous(k.as_bytes(), n),
            None => (0..n)
                .min_by_key(|&i| self.instances[i].load.load(Ordering::Relaxed))
                .unwrap_or(0),
        }
    }

    /// Sends `job` to the instance [`SubRuntime::send_waiting`] would choose if its mailbox has
    /// room now; gives the job back otherwise (full or stopped), without waiting.
    pub(crate) fn try_send(&self, job: Job) -> Result<(), Job> {
        let Some(inst) = self.instances.get(self.waiting_choice(job.event.key.as_deref())) else {
            return Err(job);
        };
        let permit = inst.tx.try_reserve().ok();
        self.send_on(inst, permit, job)
    }

    /// Waits for room (used by WAL replay and dead-letter replay, which must not be refused).
    pub(crate) async fn send_waiting(&self, key: Option<&str>, job: Job) -> Result<(), Job> {
        let inst = &self.instances[self.waiting_choice(key)];
        let permit = inst.tx.reserve().await.ok();
        self.send_on(inst, permit, job)
    }

    /// Sends `job` to `inst` with the mailbox `permit` got for it; no permit gives the job back.
    fn send_on<'a>(
        &'a self,
        inst: &'a Instance,
        permit: Option<tokio::sync::mpsc::Permit<'a, Job>>,
        job: Job,
    ) -> Result<(), Job> {
        let Some(permit) = permit else {
            return Err(job);
        };
        Reservation {
            permit,
            load: &inst.load,
        }
        .send(job);
        Ok(())
    }

    /// Events queued or in progress across all instances.
    pub(crate) fn load(&self) -> usize {
        self.instances.iter().map(|i| i.load.load(Ordering::Relaxed)).sum()
    }

    /// Events waiting in the instances' mailboxes (and slots reserved for events being sent to
    /// them): what each channel's capacity lacks. Not the jobs an instance already took.
    fn queued(&self) -> usize {
        self.instances
            .iter()
            .map(|i| i.tx.max_capacity() - i.tx.capacity())
            .sum()
    }
}

impl Drop for SubRuntime {
    /// A subscription that no longer runs here has nothing waiting here.
    fn drop(&mut self) {
        self.shared.metrics.mailbox_depth.set(0.0);
    }
}

/// Two distinct random indices below `n` (at least 2), for the power-of-two choice.
///
/// From the per-thread xorshift generator (`types::random_u64`): the choice needs spread, not
/// unpredictability, and `rand`'s thread RNG (a ChaCha block cipher) cost more than the rest of
/// the choice, twice per event.
fn two_distinct(n: usize) -> (usize, usize) {
    let r = types::random_u64();
    // Two 32-bit halves mapped onto [0, n) and [0, n - 1) by multiply-shift (no division).
    let pick = |bits: u64, m: usize| (((bits & 0xffff_ffff) * m as u64) >> 32) as usize;
    let a = pick(r >> 32, n);
    let b = (a + 1 + pick(r, n - 1)) % n;
    (a, b)
}

/// Rendezvous (highest random weight) hashing: the instance with the highest hash of (key, index).
/// Stable across processes and versions, which cross-node routing will rely on.
pub(crate) fn rendezvous(key: &[u8], n: usize) -> usize {
    rendezvous_among(key, 0..n).unwrap_or(0)
}

/// Rendezvous over a subset of indices: removing an index moves only the keys it had.
fn rendezvous_among(key: &[u8], indices: impl Iterator<Item = usize>) -> Option<usize> {
    let h = fnv1a(key);
    indices.max_by_key(|&i| mix(h ^ mix(i as u64 + 1)))
}

/// FNV-1a from the offset basis: the same hash placement's weights start from.
fn fnv1a(bytes: &[u8]) -> u64 {
    types::fnv1a(FNV_OFFSET, bytes)
}

/// Where one placed instance of a subscription runs.
pub(crate) enum Slot {
    /// On this node (the route's `local` runtime).
    Local,
    /// On another node.
    Remote {
        node: u64,
        health: Arc<PeerHealth>,
        /// Events this node has in flight to that node for this subscription.
        load: Arc<AtomicUsize>,
    },
}

/// A subscription as routing sees it, cluster-wide.
pub(crate) struct Route {
    pub(crate) key: Arc<SubscriptionKey>,
    /// The placement epoch the slots come from (sent with forwarded events, for fencing).
    pub(crate) epoch: u64,
    /// This node's instances, if the placement gives it any.
    pub(crate) local: Option<Arc<SubRuntime>>,
    /// One per placed instance, in placement order.
    pub(crate) slots: Vec<Slot>,
    /// At most this many events in flight to one remote slot.
    window: usize,
    /// Every slot is local (a single node, or a placement that put every instance here): the
    /// choice among instances is then the local runtime's alone, made once per event.
    all_local: bool,
}

/// The slot picked for one event, with its room reserved.
pub(crate) enum Target<'a> {
    /// A local mailbox slot.
    Local(Reservation<'a>),
    /// One unit of the window towards a remote instance.
    Remote(RemoteSlot),
    /// Every instance is on an unhealthy node: the relay holds the event until one can take it.
    Parked,
}

/// One unit of the window towards a remote instance; given back when dropped unless taken (the
/// relay then gives it back when the node acks).
pub(crate) struct RemoteSlot {
    node: u64,
    load: Option<Arc<AtomicUsize>>,
}

impl RemoteSlot {
    /// The node and the window counter, now owned by the caller.
    pub(crate) fn take(mut self) -> (u64, Arc<AtomicUsize>) {
        let load = self.load.take().unwrap_or_default();
        (self.node, load)
    }
}

impl Drop for RemoteSlot {
    fn drop(&mut self) {
        if let Some(load) = self.load.take() {
            load.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Why no slot could be reserved.
pub(crate) enum NoRoom {
    /// The chosen instance's mailbox or window is full.
    Full,
    /// The subscription is placed nowhere (no member can run its handler).
    Unplaced,
}

impl Route {
    fn healthy(&self, i: usize) -> bool {
        match &self.slots[i] {
            Slot::Local => self.local.is_some(),
            Slot::Remote { health, .. } => health.routable(),
        }
    }

    fn load(&self, i: usize) -> usize {
        match &self.slots[i] {
            Slot::Local => self
                .local
                .as_ref()
                .map_or(usize::MAX, |l| l.load() / l.instances.len().max(1)),
            Slot::Remote { load, .. } => load.load(Ordering::Relaxed),
        }
    }

    fn try_slot(&self, i: usize, key: Option<&str>) -> Option<Target<'_>> {
        match &self.slots[i] {
            Slot::Local => self.local.as_ref()?.reserve(key).map(Target::Local),
            Slot::Remote { node, load, .. } => {
                let mut current = load.load(Ordering::Relaxed);
                loop {
                    if current >= self.window {
                        return None;
                    }
                    match load.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Relaxed) {
                        Ok(_) => {
                            return Some(Target::Remote(RemoteSlot {
                                node: *node,
                                load: Some(load.clone()),
                            }))
                        }
                        Err(now) => current = now,
                    }
                }
            }
        }
    }

    /// Reserves a slot for a delivery sent again. One sent again because its answer is late
    /// (`late_from`: the node it was sent to) goes back to that node while the subscription is
    /// still placed there, the node is healthy and its window has room: that node's dedup window
    /// knows the copy (running or done), so a slow handler does not run the event a second time on
    /// another instance's node, however idle that one is. Otherwise, as [`Route::reserve`].
    pub(crate) fn reserve_again(&self, late_from: Option<u64>, key: Option<&str>) -> Result<Target<'_>, NoRoom> {
        match late_from.and_then(|node| self.reserve_at_node(node, key)) {
            Some(target) => Ok(target),
            None => self.reserve(key),
        }
    }

    /// Reserves the slot on `node`, if it is placed, healthy and has room.
    fn reserve_at_node(&self, node: u64, key: Option<&str>) -> Option<Target<'_>> {
        let i = self
            .slots
            .iter()
            .position(|s| matches!(s, Slot::Remote { node: n, .. } if *n == node))?;
        if !self.healthy(i) {
            return None;
        }
        self.try_slot(i, key)
    }

    /// Picks and reserves a healthy slot for an event with `key` (see the module docs).
    pub(crate) fn reserve(&self, key: Option<&str>) -> Result<Target<'_>, NoRoom> {
        if self.slots.is_empty() {
            return Err(NoRoom::Unplaced);
        }
        if self.all_local {
            // Every slot leads to the same runtime, which picks the instance (by key, or the less
            // loaded of two) and falls back to any instance with room itself.
            return match &self.local {
                Some(local) => local.reserve(key).map(Target::Local).ok_or(NoRoom::Full),
                // Placed here, instances not started yet: held until they run.
                None => Ok(Target::Parked),
            };
        }
        // Usually every slot is healthy: then no list of healthy slots is built.
        let all = (0..self.slots.len()).all(|i| self.healthy(i));
        let healthy: Vec<usize> = if all {
            Vec::new()
        } else {
            (0..self.slots.len()).filter(|&i| self.healthy(i)).collect()
        };
        if !all && healthy.is_empty() {
            return Ok(Target::Parked);
        }
        let n = if all { self.slots.len() } else { healthy.len() };
        let at = |j: usize| if all { j } else { healthy[j] };
        if let Some(k) = key {
            // Order per key matters more than balance: never fall back to another instance.
            let i = rendezvous_among(k.as_bytes(), (0..n).map(at)).unwrap_or(at(0));
            return self.try_slot(i, key).ok_or(NoRoom::Full);
        }
        if n == 1 {
            return self.try_slot(at(0), None).ok_or(NoRoom::Full);
        }
        let (a, b) = two_distinct(n);
        let (first, second) = if self.load(at(a)) <= self.load(at(b)) {
            (at(a), at(b))
        } else {
            (at(b), at(a))
        };
        self.try_slot(first, None)
            .or_else(|| self.try_slot(second, None))
            .or_else(|| (0..n).find_map(|j| self.try_slot(at(j), None)))
            .ok_or(NoRoom::Full)
    }
}

/// The subscriptions of one topic, and its `events_published_total{topic}` handle (resolved once
/// per table build instead of once per publish).
pub(crate) struct TopicRoutes {
    pub(crate) routes: Vec<Arc<Route>>,
    pub(crate) published: metrics::Counter,
}

/// FNV-1a for the topic map: every publish looks its topic up, and topics are short strings for
/// which SipHash's setup costs more than the hashing (the keys are this node's own subscriptions,
/// so flooding resistance buys nothing).
#[derive(Default, Clone, Copy)]
pub(crate) struct TopicHasher;

impl std::hash::BuildHasher for TopicHasher {
    type Hasher = Fnv;
    fn build_hasher(&self) -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

/// The FNV-1a hasher state (see [`TopicHasher`]).
pub(crate) struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        mix(self.0)
    }
}

/// An immutable snapshot of every subscription.
#[derive(Default)]
pub(crate) struct RoutingTable {
    /// The routes of each topic.
    by_topic: HashMap<String, TopicRoutes, TopicHasher>,
    routes: HashMap<SubscriptionKey, Arc<Route>>,
    /// This node's running subscriptions.
    all: BTreeMap<SubscriptionKey, Arc<SubRuntime>>,
    /// Built from a committed placement (false before the first one and after shutdown's
    /// `clear`): only then does a missing route mean the subscription was deleted.
    live: bool,
}

impl RoutingTable {
    /// Whether the table follows a committed placement (see `live`).
    pub(crate) fn is_live(&self) -> bool {
        self.live
    }

    /// The routes of `topic`'s subscriptions, if it has any.
    pub(crate) fn topic(&self, topic: &str) -> Option<&TopicRoutes> {
        self.by_topic.get(topic)
    }

    /// The route of one subscription.
    pub(crate) fn route(&self, key: &SubscriptionKey) -> Option<&Arc<Route>> {
        self.routes.get(key)
    }

    /// This node's instances of a subscription.
    pub(crate) fn get(&self, key: &SubscriptionKey) -> Option<&Arc<SubRuntime>> {
        self.all.get(key)
    }

    /// This node's running subscriptions.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<SubRuntime>> {
        self.all.values()
    }
}

/// The committed placement as the router needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) epoch: u64,
    /// Every subscription with the node of each of its instances.
    pub(crate) subscriptions: BTreeMap<SubscriptionKey, Vec<u64>>,
}

/// Where a node's handler instances run.
pub(crate) enum Workers {
    /// The node's actix worker threads; a subscription's instances are spread over them.
    Arbiters(Vec<ArbiterHandle>),
    /// The current thread's `LocalSet` (the event-plane simulation runs every node's instances
    /// on its one thread, in virtual time).
    #[cfg(test)]
    Here,
}

/// What the router needs to start instances.
pub(crate) struct RouterParts {
    pub(crate) registry: HandlerRegistry,
    pub(crate) workers: Workers,
    pub(crate) policy: Policy,
    pub(crate) dead_letters: Arc<dyn DeadLetterSink>,
    pub(crate) mailbox_capacity: usize,
    pub(crate) default_max_attempts: u32,
    pub(crate) webhook_timeout: std::time::Duration,
    /// Where webhooks may connect (checked again on every call, after DNS).
    pub(crate) webhook_policy: Arc<crate::subscription::egress::EgressPolicy>,
    /// This node's id (placement entries naming it are local).
    pub(crate) me: u64,
    /// Peer health, to skip unhealthy nodes.
    pub(crate) health: Arc<Health>,
    /// This node's handler progress (reported in pongs).
    pub(crate) progress: Arc<Progress>,
    /// At most this many events in flight from this node to one remote instance.
    pub(crate) window: usize,
    /// Takes the queued jobs of subscriptions that left this node.
    pub(crate) returns: Arc<dyn supervisor::Retired>,
    /// Where instances give back what untracked jobs held (the node's in-flight budget).
    pub(crate) untracked: Arc<dyn supervisor::Untracked>,
}

/// Owns the routing table and starts/stops instances as subscriptions change.
pub(crate) struct Router {
    table: ArcSwap<RoutingTable>,
    /// Serialises changes; readers use `table` without locking.
    write: Mutex<Inputs>,
    parts: RouterParts,
}

/// What the table is built from.
#[derive(Default)]
struct Inputs {
    placement: Placement,
    all: BTreeMap<SubscriptionKey, Arc<SubRuntime>>,
    /// The in-flight counter of each remote instance node (kept across rebuilds).
    remote_load: HashMap<(u64, SubscriptionKey), Arc<AtomicUsize>>,
    /// A placement was set.
    live: bool,
}

impl Router {
    pub(crate) fn new(parts: RouterParts) -> Self {
        Router {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            write: Mutex::new(Inputs::default()),
            parts,
        }
    }

    /// The current snapshot.
    pub(crate) fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// The current snapshot, borrowed for a moment (a publish call): no reference count
    /// updated. Hold it briefly: a held guard keeps that snapshot alive.
    pub(crate) fn table_guard(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.table.load()
    }

    /// Sets `herald_mailbox_depth` of each subscription running here from its mailboxes
    /// ([`SubRuntime::queued`]). Sampled when the metrics are rendered, not counted per event: a
    /// gauge updated on each send and each receive was two compare-and-swap loops per event on a
    /// cache line that the publishing thread and the instance's worker took from each other.
    pub(crate) fn sample_mailbox_depths(&self) {
        for running in self.table().iter() {
            running.shared.metrics.mailbox_depth.set(running.queued() as f64);
        }
    }

    pub(crate) fn registry(&self) -> &HandlerRegistry {
        &self.parts.registry
    }

    /// Creates or replaces a subscription (already validated). Returns false if it was unchanged.
    /// A replaced subscription's old instances finish what is queued, then stop.
    pub(crate) fn apply(&self, spec: SubscriptionSpec) -> bool {
        let mut inputs = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let key = SubscriptionKey {
            topic: spec.topic.clone(),
            group: spec.group.clone(),
        };
        if inputs.all.get(&key).is_some_and(|s| s.spec == spec) {
            return false;
        }
        let Some(spawner) =
            self.parts
                .registry
                .spawner(&spec.handler, self.parts.webhook_timeout, &self.parts.webhook_policy)
        else {
            // Validation checks the registry first; reaching here is a bug worth a loud log.
            tracing::error!(subscription = %key, "no spawner for handler {:?}", spec.handler);
            return false;
        };
        let runtime = Arc::new(self.start(key.clone(), spec, spawner));
        inputs.all.insert(key, runtime);
        self.rebuild(&mut inputs);
        true
    }

    /// Removes a subscription (it was deleted, or its placement left this node): its instances
    /// hand what is queued to `returns` (to be routed anew) and stop.
    pub(crate) fn remove(&self, key: &SubscriptionKey) -> bool {
        let mut inputs = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let Some(gone) = inputs.all.remove(key) else {
            return false;
        };
        gone.shared.retired.store(true, Ordering::Release);
        self.rebuild(&mut inputs);
        true
    }

    /// Follows a new committed placement (which instances run where, and the epoch).
    pub(crate) fn set_placement(&self, placement: Placement) {
        let mut inputs = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if inputs.live && inputs.placement == placement {
            return;
        }
        inputs.placement = placement;
        inputs.live = true;
        self.rebuild(&mut inputs);
    }

    /// Follows a committed placement: runs here exactly `here(key)` instances of each of
    /// `subscriptions` (none: it stops here), stops every running subscription not among them,
    /// then routes by `placement`. The node layer reaches it through [`Router::follow_state`]
    /// with each applied membership state (`Control::reconcile`); the event-plane simulation
    /// calls it with each placement it makes.
    pub(crate) fn follow<'a>(
        &self,
        subscriptions: impl IntoIterator<Item = &'a SubscriptionSpec>,
        here: impl Fn(&SubscriptionKey) -> u32,
        placement: Placement,
    ) {
        let mut listed = std::collections::HashSet::new();
        for spec in subscriptions {
            let key = SubscriptionKey {
                topic: spec.topic.clone(),
                group: spec.group.clone(),
            };
            let local = here(&key);
            if local == 0 {
                self.remove(&key);
            } else {
                let mut spec = spec.clone();
                spec.instances = local;
                self.apply(spec);
            }
            listed.insert(key);
        }
        for running in self.table().iter() {
            if !listed.contains(&running.shared.key) {
                self.remove(&running.shared.key);
            }
        }
        self.set_placement(placement);
    }

    /// [`Router::follow`] with an applied membership state: the instances its placement gives
    /// this node, routing by its placement among its members.
    pub(crate) fn follow_state(&self, state: &MembershipState) {
        let me = self.parts.me;
        let here = |key: &SubscriptionKey| state.placement_of(key).iter().filter(|n| **n == me).count() as u32;
        let placement = Placement {
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
        };
        self.follow(state.subscriptions().values(), here, placement);
    }

    /// Drops every subscription so the instances drain and stop (shutdown).
    pub(crate) fn clear(&self) {
        let mut inputs = self.write.lock().unwrap_or_else(|p| p.into_inner());
        *inputs = Inputs::default();
        self.table.store(Arc::new(RoutingTable::default()));
    }

    fn rebuild(&self, inputs: &mut Inputs) {
        let me = self.parts.me;
        let mut routes = HashMap::new();
        let mut by_topic: HashMap<String, TopicRoutes, TopicHasher> = HashMap::default();
        let mut used = std::collections::HashSet::new();
        for (key, nodes) in &inputs.placement.subscriptions {
            let local = inputs.all.get(key).cloned();
            let slots: Vec<Slot> = nodes
                .iter()
                .map(|&node| {
                    if node == me {
                        // Until the local instances run, the local slot is not routable: events
                        // go to the other slots, or are parked until the instances start (a
                        // placement that just moved here is not "placed nowhere").
                        return Slot::Local;
                    }
                    let id = (node, key.clone());
                    used.insert(id.clone());
                    let load = inputs.remote_load.entry(id).or_default().clone();
                    Slot::Remote {
                        node,
                        health: self.parts.health.peer(node),
                        load,
                    }
                })
                .collect();
            let all_local = slots.iter().all(|s| matches!(s, Slot::Local));
            let route = Arc::new(Route {
                key: Arc::new(key.clone()),
                epoch: inputs.placement.epoch,
                local,
                slots,
                window: self.parts.window,
                all_local,
            });
            by_topic
                .entry(key.topic.clone())
                .or_insert_with(|| TopicRoutes {
                    routes: Vec::new(),
                    published: metrics::counter!(crate::metrics::EVENTS_PUBLISHED, "topic" => key.topic.clone()),
                })
                .routes
                .push(route.clone());
            routes.insert(key.clone(), route);
        }
        // Counters of instances no longer placed are dropped once nothing is in flight to them.
        inputs
            .remote_load
            .retain(|id, load| used.contains(id) || load.load(Ordering::Relaxed) > 0);
        self.table.store(Arc::new(RoutingTable {
            by_topic,
            routes,
            all: inputs.all.clone(),
            live: inputs.live,
        }));
    }

    fn start(&self, key: SubscriptionKey, spec: SubscriptionSpec, spawner: Arc<dyn Spawner>) -> SubRuntime {
        let shared = Arc::new(SubShared {
            metrics: SubMetrics::new(&key),
            key: Arc::new(key),
            max_attempts: spec.max_attempts.unwrap_or(self.parts.default_max_attempts),
            retired: std::sync::atomic::AtomicBool::new(false),
            returns: self.parts.returns.clone(),
            untracked: self.parts.untracked.clone(),
        });
        // Spread instances over the worker threads, starting at a per-subscription offset so that
        // many one-instance subscriptions do not all land on the first worker.
        let offset = fnv1a(shared.key.to_string().as_bytes()) as usize;
        let instances = (0..spec.instances as usize)
            .map(|i| {
                let (tx, rx) = mpsc::channel(self.parts.mailbox_capacity);
                let load = Arc::new(AtomicUsize::new(0));
                self.parts.progress.track(&load);
                let task = (
                    shared.clone(),
                    spawner.clone(),
                    self.parts.policy,
                    self.parts.dead_letters.clone(),
                    rx,
                    load.clone(),
                );
                let run = move || {
                    let (shared, spawner, policy, dead_letters, rx, load) = task;
                    supervisor::run_instance(shared, spawner, policy, dead_letters, rx, load)
                };
                match &self.parts.workers {
                    Workers::Arbiters(workers) => {
                        workers[(offset + i) % workers.len()].spawn_fn(move || {
                            actix_rt::spawn(run());
                        });
                    }
                    #[cfg(test)]
                    Workers::Here => {
                        tokio::task::spawn_local(run());
                    }
                }
                Instance { tx, load }
            })
            .collect();
        tracing::info!(subscription = %shared.key, handler = %spec.handler.label(), instances = spec.instances, "subscription started");
        SubRuntime {
            spec,
            shared,
            instances,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_spreads() {
        assert_eq!(rendezvous(b"user-7", 4), rendezvous(b"user-7", 4));
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[rendezvous(format!("k{i}").as_bytes(), 4)] += 1;
        }
        for c in counts {
            assert!((700..1300).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn two_distinct_picks_two_different_indices_evenly() {
        for n in 2..6 {
            let mut counts = vec![0usize; n];
            for _ in 0..6000 {
                let (a, b) = two_distinct(n);
                assert!(a < n && b < n && a != b, "n={n}: {a}, {b}");
                counts[a] += 1;
                counts[b] += 1;
            }
            let even = 12000 / n;
            assert!(
                counts.iter().all(|&c| c > even * 8 / 10 && c < even * 12 / 10),
                "n={n}: {counts:?}"
            );
        }
    }

    #[test]
    fn a_late_delivery_goes_back_to_its_node_while_it_can_take_it_whatever_the_balance() {
        let health = crate::monitor::Health::default();
        let slot = |node, load| Slot::Remote {
            node,
            health: health.peer(node),
            load: Arc::new(AtomicUsize::new(load)),
        };
        // Node 2 is busy (6 of its 8 in flight), node 3 idle.
        let route = route_of(vec![slot(2, 6), slot(3, 0)]);
        let node = |target: Result<Target<'_>, NoRoom>| match target {
            Ok(Target::Remote(r)) => r.take().0,
            _ => panic!("a remote slot has room"),
        };
        assert_eq!(node(route.reserve(None)), 3, "balance picks the idle node");
        assert_eq!(node(route.reserve_again(None, None)), 3, "not late: as balance says");
        assert_eq!(
            node(route.reserve_again(Some(2), None)),
            2,
            "late: back to the node it was sent to"
        );
        assert_eq!(
            node(route.reserve_again(Some(4), None)),
            3,
            "that node no longer runs it: balance"
        );
        // `take` kept each reservation's unit: node 2 now has 7 in flight, one more fills it.
        assert_eq!(node(route.reserve_again(Some(2), None)), 2);
        assert_eq!(
            node(route.reserve_again(Some(2), None)),
            3,
            "its window is full: balance"
        );
    }

    /// A route of `t`/`g` over `slots` with no local runtime and a window of 8.
    fn route_of(slots: Vec<Slot>) -> Route {
        Route {
            key: Arc::new(SubscriptionKey {
                topic: "t".into(),
                group: "g".into(),
            }),
            epoch: 1,
            local: None,
            all_local: slots.iter().all(|s| matches!(s, Slot::Local)),
            slots,
            window: 8,
        }
    }

    #[test]
    fn a_placement_here_whose_instances_have_not_started_parks_events() {
        let route = route_of(vec![Slot::Local]);
        assert!(matches!(route.reserve(None), Ok(Target::Parked)));
        assert!(matches!(route.reserve(Some("k")), Ok(Target::Parked)));
        let nowhere = Route { slots: vec![], ..route };
        assert!(matches!(nowhere.reserve(None), Err(NoRoom::Unplaced)));
    }

    #[test]
    fn rendezvous_moves_few_keys_when_an_instance_is_added() {
        let moved = (0..4000)
            .filter(|i| {
                let k = format!("k{i}");
                rendezvous(k.as_bytes(), 4) != rendezvous(k.as_bytes(), 5)
            })
            .count();
        // Ideal is 1/5 of the keys; everything that moves must move to the new instance.
        assert!(moved < 4000 * 3 / 10, "moved {moved}");
    }
}
