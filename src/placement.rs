//! The placement function (ARCHITECTURE.md, "Placement"): which nodes run the instances of each subscription.
//!
//! [`place`] is a pure function: members (id, status, handler kinds), subscription demands
//! (key, handler kind, instances) and the previous table in; a new [`PlacementTable`] out. It does
//! no I/O, reads no clock and draws no random numbers, so every node that runs it on the same input
//! gets the same table. The Raft leader runs it (through `MembershipState::proposed_placement`;
//! not linked, since membership is a layer above) and commits the result with a new epoch; nobody
//! else needs to.
//!
//! This module owns the algorithm and its inputs and outputs ([`NodeInfo`], [`Demand`],
//! [`Placement`]); the ids, statuses and subscription keys it reads ([`NodeStatus`]) are the shared
//! vocabulary of `types`, re-exported here. It must not depend on membership, routing or handlers,
//! and must not do I/O, read clocks, use randomly keyed hashers
//! (`std::collections::hash_map::DefaultHasher`, `HashMap` iteration order) or floating point in
//! anything that decides a placement: the load factor is turned into an integer (per mille) first.
//!
//! # Algorithm
//!
//! *Eligible* nodes of a subscription are the [`NodeStatus::Up`] nodes whose handler kinds contain
//! the subscription's kind ([`HandlerSpec::label`](crate::subscription::HandlerSpec::label), e.g.
//! `rust:audit-logins`, `webhook`, `log`). With `T` instances to place over the `N` nodes eligible
//! for at least one subscription, a node's load bound is `ceil(c × T / N)` (`c` = load factor,
//! at least 1) and its fair share `ceil(T / N)`. Instances of one subscription are spread over
//! distinct nodes; a node holds at most `ceil(k / m)` of a subscription's `k` instances when only
//! `m` nodes are eligible.
//!
//! 1. **Keep.** An instance stays on its previous node, at the same index of the subscription's
//!    list, while that node is eligible and within the per-subscription spread.
//! 2. **Fill.** Vacant instances are placed, the most constrained subscriptions first (fewest
//!    eligible nodes, then most instances). Each goes to the eligible node with, in order: the
//!    fewest instances of that subscription; a load below the average, below the fair share, below
//!    the bound; the highest rendezvous (highest-random-weight) weight
//!    `mix(fnv1a(topic ␟ group) ^ mix(node))`. When every eligible node is at the bound (possible
//!    only when handler kinds are unevenly spread) the least loaded one is used, so a subscription
//!    with an eligible node is always fully placed.
//! 3. **Steal.** A node that kept nothing (it just joined or came back up) takes instances from
//!    the most loaded nodes above the average — on each, the one it has the highest weight for —
//!    until it reaches the average. This is the only step that moves an instance off a node that
//!    is still eligible and within the bound, and every such move goes to the empty node. It runs
//!    before the bound is enforced, so a join lowers the other nodes by giving to the new node
//!    rather than by shuffling instances among the old ones.
//! 4. **Bound.** A node above the bound hands the instances it has the lowest weight for to
//!    eligible nodes below it, repeated until nothing moves; an instance with nowhere better to go
//!    stays.
//!
//! Consequences, each checked by the unit tests over seeded random inputs (raise `STRESS` in the
//! tests to run thousands): the same input gives the same table regardless of input order;
//! running [`place`] on its own output changes nothing, so the leader does not churn epochs (also
//! with uneven handler kinds). Starting from a table `place` produced, with uniform handler kinds:
//! when a node stops being eligible only the instances it held move; when a node joins or comes
//! back only instances moving to it move (plus, when the extra node allows it, the surplus of a
//! subscription that was doubled up on one node); adding a subscription moves nothing else; no
//! node exceeds the bound. Removing a subscription or lowering `instances` can lower the bound and
//! so move a few instances off the most loaded nodes.
//!
//! Why stickiness plus a steal step instead of recomputing pure rendezvous each time: pure bounded
//! rendezvous processes subscriptions in order and lets one node's bound push instances onto the
//! next node, so a single change can cascade into moves between unrelated nodes. Keeping what is
//! still valid makes "what moves" exactly "what had to move", and the steal step gives a new node
//! its share instead of waiting for the next failure to get work.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::subscription::SubscriptionSpec;
use crate::types::{fnv1a, mix, SubscriptionKey, FNV_OFFSET};
// The vocabulary of placement lives in `types` (membership, routing and the configuration use it
// too); these are its public paths.
pub use crate::types::{NodeId, NodeStatus, UnknownStatus, DEFAULT_LOAD_FACTOR};

/// Where each subscription's instances run: one node id per instance. A node appears several
/// times when it runs several instances of one subscription.
pub type PlacementTable = BTreeMap<SubscriptionKey, Vec<NodeId>>;

/// One member as the placement function sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeInfo {
    /// The node's id; placement tables name nodes by it.
    pub id: NodeId,
    /// Only `Up` nodes get instances.
    pub status: NodeStatus,
    /// The handler kinds compiled into the node (`rust:<name>`, `webhook`, `log`); a subscription
    /// is only placed on nodes that can run its kind.
    pub kinds: BTreeSet<String>,
}

impl NodeInfo {
    /// A node with the given id, status and handler kinds.
    pub fn new<S: Into<String>>(id: NodeId, status: NodeStatus, kinds: impl IntoIterator<Item = S>) -> Self {
        NodeInfo {
            id,
            status,
            kinds: kinds.into_iter().map(Into::into).collect(),
        }
    }
}

/// What one subscription needs from placement.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Demand {
    /// The subscription; the table is keyed by it.
    pub key: SubscriptionKey,
    /// The handler kind it runs ([`HandlerSpec::label`](crate::subscription::HandlerSpec::label)),
    /// matched against [`NodeInfo::kinds`].
    pub kind: String,
    /// How many instances to place cluster-wide.
    pub instances: u32,
}

impl Demand {
    /// A demand for `instances` instances of handler kind `kind` for `topic`/`group`.
    pub fn new(topic: impl Into<String>, group: impl Into<String>, kind: impl Into<String>, instances: u32) -> Self {
        Demand {
            key: SubscriptionKey {
                topic: topic.into(),
                group: group.into(),
            },
            kind: kind.into(),
            instances,
        }
    }
}

impl From<&SubscriptionSpec> for Demand {
    fn from(spec: &SubscriptionSpec) -> Self {
        Demand::new(
            spec.topic.clone(),
            spec.group.clone(),
            spec.handler.label(),
            spec.instances,
        )
    }
}

/// The result of [`place`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// The new table: every demanded subscription, one node per instance; an empty list when no
    /// node can run it. Instances that stayed keep their index, so index-based routing is stable.
    pub table: PlacementTable,
    /// Subscriptions that need instances but have no eligible node (nobody up runs their kind);
    /// the leader reports them so an operator can start a node with that handler.
    pub unplaced: Vec<SubscriptionKey>,
    /// Instances whose node differs from the previous table at the same index (for logs/metrics).
    pub moved: u32,
    /// Instances per node, for every node eligible for at least one subscription (0 included).
    pub loads: BTreeMap<NodeId, u32>,
    /// The load bound `ceil(c × average)` used; with uniform handler kinds no load exceeds it.
    pub bound: u32,
}

/// The rendezvous weight of `node` for subscription `key`: higher means more preferred. Stable
/// across processes, platforms and versions (FNV-1a plus the SplitMix64 finaliser).
pub fn weight(key: &SubscriptionKey, node: NodeId) -> u64 {
    weight_of(key_hash(key), node)
}

fn key_hash(key: &SubscriptionKey) -> u64 {
    // 0xff never occurs in UTF-8, so (topic, group) pairs cannot collide by concatenation.
    let h = fnv1a(FNV_OFFSET, key.topic.as_bytes());
    let h = fnv1a(h, &[0xff]);
    fnv1a(h, key.group.as_bytes())
}

fn weight_of(key_hash: u64, node: NodeId) -> u64 {
    mix(key_hash ^ mix(node.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// The load factor in per mille, clamped to `[1, 100]`; not a number means the default.
fn load_factor_milli(load_factor: f64) -> u64 {
    let c = if load_factor.is_finite() {
        load_factor.clamp(1.0, 100.0)
    } else {
        DEFAULT_LOAD_FACTOR
    };
    (c * 1000.0).round() as u64
}

/// Per-subscription working state.
struct Sub<'a> {
    /// The subscription, for the output table.
    key: &'a SubscriptionKey,
    /// `key_hash(key)`, computed once: every weight of this subscription starts from it.
    hash: u64,
    /// Indexes (into the sorted node list) of the eligible nodes, ascending.
    eligible: Vec<usize>,
    /// Most instances of this subscription one node may hold: `ceil(k / m)`.
    spread: u32,
    /// The node index per instance; `None` while vacant.
    slots: Vec<Option<usize>>,
    /// Instances of this subscription per node index.
    count: Vec<u32>,
}

/// The load thresholds of one run.
#[derive(Clone, Copy)]
struct Bounds {
    /// `floor(T / N)`: a node that kept nothing takes instances until it has this many.
    floor_avg: u64,
    /// `ceil(T / N)`: preferred most per node.
    fair: u64,
    /// `ceil(c × T / N)`: most per node unless handler kinds leave no choice.
    bound: u64,
}

impl Sub<'_> {
    fn weight(&self, node: &NodeInfo) -> u64 {
        weight_of(self.hash, node.id)
    }

    fn assign(&mut self, i: usize, n: usize, load: &mut [u64]) {
        self.slots[i] = Some(n);
        self.count[n] += 1;
        load[n] += 1;
    }

    fn unassign(&mut self, i: usize, load: &mut [u64]) {
        if let Some(n) = self.slots[i].take() {
            self.count[n] -= 1;
            load[n] -= 1;
        }
    }

    /// The node for one more instance: the fewest of this subscription, then below the average,
    /// below the fair share, below the bound, then the highest weight. With `moving_from`, the
    /// instance leaves that node and only nodes below the bound qualify; without it, when every
    /// eligible node is at the bound, the least loaded one is used.
    fn choose(&self, nodes: &[&NodeInfo], load: &[u64], b: Bounds, moving_from: Option<usize>) -> Option<usize> {
        let candidates = || {
            self.eligible
                .iter()
                .copied()
                .filter(move |&e| Some(e) != moving_from && self.count[e] < self.spread)
        };
        let fewest = candidates().map(|e| self.count[e]).min()?;
        candidates()
            .filter(|&e| moving_from.is_none() || load[e] < b.bound)
            .min_by_key(|&e| {
                let (c, l) = (self.count[e], load[e]);
                let band = if l < b.floor_avg {
                    0u8
                } else if l < b.fair {
                    1
                } else if l < b.bound {
                    2
                } else {
                    3
                };
                let tier = match (band, c == fewest) {
                    (3, _) => 6,
                    (band, true) => band,
                    (band, false) => 3 + band,
                };
                let overload = if tier == 6 { l } else { 0 };
                (tier, overload, c, Reverse(self.weight(nodes[e])))
            })
    }
}

/// A steal candidate: `x`'s weight for the subscription (best first), the subscription, the index.
type Candidate = (Reverse<u64>, usize, usize);

/// Node `x` (which kept nothing) takes instances until it reaches the average: each time from the
/// most loaded node that is above the average and at least two above `x`, the instance `x` has the
/// highest weight for, never worsening a subscription's spread.
fn steal(x: usize, subs: &mut [Sub<'_>], nodes: &[&NodeInfo], load: &mut [u64], b: Bounds) {
    if load[x] >= b.floor_avg {
        return;
    }
    // Candidates per holding node, best first for `x`.
    let mut by_holder: BTreeMap<usize, Vec<Candidate>> = BTreeMap::new();
    for (si, s) in subs.iter().enumerate() {
        if s.eligible.binary_search(&x).is_err() {
            continue;
        }
        let w = s.weight(nodes[x]);
        for (i, slot) in s.slots.iter().enumerate() {
            if let Some(h) = *slot {
                if h != x {
                    by_holder.entry(h).or_default().push((Reverse(w), si, i));
                }
            }
        }
    }
    let mut by_holder: Vec<(usize, std::vec::IntoIter<Candidate>)> = by_holder
        .into_iter()
        .map(|(h, mut c)| {
            c.sort_unstable();
            (h, c.into_iter())
        })
        .collect();
    while load[x] < b.floor_avg {
        // The most loaded holder first (ties: lowest id, i.e. lowest index).
        by_holder.sort_by_key(|(h, _)| (Reverse(load[*h]), *h));
        let mut took = false;
        for (h, cands) in by_holder.iter_mut() {
            let h = *h;
            if load[h] <= b.floor_avg || load[h] <= load[x] + 1 {
                break;
            }
            // A candidate that is invalid now stays invalid: x only gains and h only loses.
            for (_, si, i) in cands.by_ref() {
                let s = &mut subs[si];
                if s.slots[i] == Some(h) && s.count[x] < s.count[h] && s.count[x] < s.spread {
                    s.unassign(i, load);
                    s.assign(i, x, load);
                    took = true;
                    break;
                }
            }
            if took {
                break;
            }
        }
        if !took {
            return;
        }
    }
}

/// Computes a placement (see the module docs for the algorithm and its guarantees).
///
/// `nodes` and `demands` may come in any order; node ids and subscription keys are expected to be
/// unique (on duplicates the smallest entry wins, so the result still does not depend on order).
/// `previous` is the table currently in force (empty on the first run); entries for
/// subscriptions that are no longer demanded are dropped. `load_factor` is `c` (values below 1 are
/// treated as 1; [`DEFAULT_LOAD_FACTOR`] is 1.25).
pub fn place(nodes: &[NodeInfo], demands: &[Demand], previous: &PlacementTable, load_factor: f64) -> Placement {
    let mut nodes: Vec<&NodeInfo> = nodes.iter().collect();
    nodes.sort();
    nodes.dedup_by_key(|n| n.id);
    let mut demands: Vec<&Demand> = demands.iter().collect();
    demands.sort();
    demands.dedup_by(|a, b| a.key == b.key);
    let index: BTreeMap<NodeId, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();

    let mut subs: Vec<Sub<'_>> = demands
        .iter()
        .map(|d| {
            let eligible: Vec<usize> = (0..nodes.len())
                .filter(|&i| nodes[i].status.accepts_work() && nodes[i].kinds.contains(&d.kind))
                .collect();
            let k = d.instances as usize;
            let spread = if eligible.is_empty() {
                0
            } else {
                k.div_ceil(eligible.len()) as u32
            };
            Sub {
                key: &d.key,
                hash: key_hash(&d.key),
                eligible,
                spread,
                slots: vec![None; k],
                count: vec![0; nodes.len()],
            }
        })
        .collect();

    // The nodes that can take any work, and the bounds derived from them.
    let mut capacity = vec![false; nodes.len()];
    let mut total: u64 = 0;
    for s in subs.iter().filter(|s| !s.slots.is_empty() && !s.eligible.is_empty()) {
        total += s.slots.len() as u64;
        for &e in &s.eligible {
            capacity[e] = true;
        }
    }
    let n_capacity = capacity.iter().filter(|&&c| c).count() as u64;
    let (floor_avg, fair, bound) = if n_capacity == 0 {
        (0, 0, 0)
    } else {
        let fair = total.div_ceil(n_capacity);
        let loose = (load_factor_milli(load_factor) * total).div_ceil(1000 * n_capacity);
        (total / n_capacity, fair, loose.max(fair))
    };
    let mut load = vec![0u64; nodes.len()];

    let bounds = Bounds { floor_avg, fair, bound };

    // 1. Keep what is still valid, at the same index.
    for s in subs.iter_mut() {
        let Some(prev) = previous.get(s.key) else { continue };
        for (i, id) in prev.iter().take(s.slots.len()).enumerate() {
            let Some(&n) = index.get(id) else { continue };
            if s.eligible.binary_search(&n).is_ok() && s.count[n] < s.spread {
                s.assign(i, n, &mut load);
            }
        }
    }
    let kept_nothing: Vec<usize> = (0..nodes.len()).filter(|&n| capacity[n] && load[n] == 0).collect();

    // 2. Fill the vacant instances, most constrained subscriptions first (fewest eligible nodes,
    //    then most instances), so the flexible ones go around the nodes the others need.
    let mut order: Vec<usize> = (0..subs.len()).collect();
    order.sort_by_key(|&si| (subs[si].eligible.len(), Reverse(subs[si].slots.len()), si));
    for si in order {
        let s = &mut subs[si];
        for i in 0..s.slots.len() {
            if s.slots[i].is_some() {
                continue;
            }
            let Some(n) = s.choose(&nodes, &load, bounds, None) else {
                break;
            };
            s.assign(i, n, &mut load);
        }
    }

    // 3. Nodes that kept nothing take their share from the most loaded nodes. Done before the
    //    bound is enforced, so a join brings the others below the (lower) bound by giving to the
    //    new node rather than by shuffling instances between the old ones.
    for &x in &kept_nothing {
        steal(x, &mut subs, &nodes, &mut load, bounds);
    }

    // 4. A node above the bound hands the instances it is least preferred for to nodes below it;
    //    an instance with nowhere better to go stays. Repeated until nothing moves (each move
    //    lowers the total overload, so this ends), which makes the result a fixed point.
    let mut moved_any = true;
    while moved_any {
        moved_any = false;
        for n in 0..nodes.len() {
            if load[n] <= bound {
                continue;
            }
            let mut held: Vec<(u64, usize, usize)> = Vec::new();
            for (si, s) in subs.iter().enumerate() {
                for (i, slot) in s.slots.iter().enumerate() {
                    if *slot == Some(n) {
                        held.push((s.weight(nodes[n]), si, i));
                    }
                }
            }
            held.sort_unstable();
            for (_, si, i) in held {
                if load[n] <= bound {
                    break;
                }
                let s = &mut subs[si];
                if let Some(to) = s.choose(&nodes, &load, bounds, Some(n)) {
                    s.unassign(i, &mut load);
                    s.assign(i, to, &mut load);
                    moved_any = true;
                }
            }
        }
    }

    let mut out = Placement {
        bound: u32::try_from(bound).unwrap_or(u32::MAX),
        ..Placement::default()
    };
    for s in &subs {
        if !s.slots.is_empty() && s.eligible.is_empty() {
            out.unplaced.push(s.key.clone());
        }
        let placed: Vec<NodeId> = s.slots.iter().flatten().map(|&n| nodes[n].id).collect();
        if let Some(prev) = previous.get(s.key) {
            out.moved += prev
                .iter()
                .zip(&s.slots)
                .filter(|(p, now)| now.map(|n| nodes[n].id) != Some(**p))
                .count() as u32;
        }
        out.table.insert(s.key.clone(), placed);
    }
    out.loads = (0..nodes.len())
        .filter(|&n| capacity[n])
        .map(|n| (nodes[n].id, u32::try_from(load[n]).unwrap_or(u32::MAX)))
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: a tiny seeded PRNG so the property loops are reproducible.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i as u64 + 1) as usize);
            }
        }
    }

    const STRESS: u64 = 300;

    const KINDS: [&str; 3] = ["rust:audit", "webhook", "log"];

    fn up(id: NodeId) -> NodeInfo {
        NodeInfo::new(id, NodeStatus::Up, KINDS)
    }

    fn uniform_nodes(n: u64) -> Vec<NodeInfo> {
        (1..=n).map(up).collect()
    }

    /// `min + below(spread)` subscriptions with 1..=max_instances instances and a random kind.
    fn random_demands(rng: &mut Rng, min: u64, spread: u64, max_instances: u64) -> Vec<Demand> {
        let n = min + rng.below(spread);
        (0..n)
            .map(|i| {
                let kind = KINDS[rng.below(3) as usize];
                Demand::new(
                    format!("topic.{}", i % 7),
                    format!("g{i}"),
                    kind,
                    1 + rng.below(max_instances) as u32,
                )
            })
            .collect()
    }

    fn key(topic: &str, group: &str) -> SubscriptionKey {
        SubscriptionKey {
            topic: topic.into(),
            group: group.into(),
        }
    }

    /// Checks what must hold for every placement: instances on eligible nodes only, the count per
    /// subscription, the spread, and the reported loads.
    fn check_invariants(nodes: &[NodeInfo], demands: &[Demand], p: &Placement) {
        let mut loads: BTreeMap<NodeId, u32> = BTreeMap::new();
        for d in demands {
            let placed = &p.table[&d.key];
            let eligible: Vec<&NodeInfo> = nodes
                .iter()
                .filter(|n| n.status == NodeStatus::Up && n.kinds.contains(&d.kind))
                .collect();
            if eligible.is_empty() {
                assert!(placed.is_empty(), "{} placed without an eligible node", d.key);
                assert!(p.unplaced.contains(&d.key), "{} not reported unplaced", d.key);
                continue;
            }
            assert_eq!(placed.len(), d.instances as usize, "{} instance count", d.key);
            let spread = (d.instances as usize).div_ceil(eligible.len());
            for id in placed {
                assert!(
                    eligible.iter().any(|n| n.id == *id),
                    "{} on ineligible node {id}",
                    d.key
                );
                let here = placed.iter().filter(|x| *x == id).count();
                assert!(
                    here <= spread,
                    "{} has {here} instances on node {id}, spread {spread}",
                    d.key
                );
                *loads.entry(*id).or_default() += 1;
            }
        }
        for (id, l) in &loads {
            assert_eq!(p.loads.get(id), Some(l), "reported load of node {id}");
        }
        assert_eq!(p.table.len(), demands.len());
    }

    /// The entries that differ between two tables, for readable failures.
    fn diff(a: &PlacementTable, b: &PlacementTable) -> Vec<String> {
        let keys: BTreeSet<&SubscriptionKey> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| format!("{k}: {:?} -> {:?}", a.get(k), b.get(k)))
            .collect()
    }

    fn assert_within_bound(p: &Placement, c: f64) {
        let total: u32 = p.loads.values().sum();
        let bound = ((c * f64::from(total)) / p.loads.len() as f64).ceil() as u32;
        assert!(p.bound <= bound.max(1) + 1, "bound {} vs expected {bound}", p.bound);
        for (id, l) in &p.loads {
            assert!(
                *l <= p.bound,
                "node {id} has {l} > bound {} (loads {:?})",
                p.bound,
                p.loads
            );
        }
    }

    #[test]
    fn same_input_gives_the_same_table_in_any_order() {
        for seed in 0..STRESS {
            let mut rng = Rng::new(seed);
            let mut nodes: Vec<NodeInfo> = (1..=1 + rng.below(7))
                .map(|id| {
                    let kinds: Vec<&str> = KINDS.iter().copied().filter(|_| rng.below(4) > 0).collect();
                    NodeInfo::new(id * 3, NodeStatus::Up, kinds)
                })
                .collect();
            let mut demands = random_demands(&mut rng, 1, 40, 4);
            let a = place(&nodes, &demands, &PlacementTable::new(), 1.25);
            rng.shuffle(&mut nodes);
            rng.shuffle(&mut demands);
            let b = place(&nodes, &demands, &PlacementTable::new(), 1.25);
            assert_eq!(a, b, "seed {seed}");
            let again = place(&nodes, &demands, &a.table, 1.25);
            assert_eq!(place(&nodes, &demands, &a.table, 1.25), again, "seed {seed}");
            check_invariants(&nodes, &demands, &a);
        }
    }

    #[test]
    fn weights_are_fixed_across_builds() {
        // Changing the hash would re-place every subscription of a running cluster during a
        // rolling upgrade; this pins it.
        let k = key("user.login", "audit");
        assert_eq!(weight(&k, 1), weight(&k, 1));
        assert_ne!(weight(&k, 1), weight(&k, 2));
        assert_ne!(weight(&key("a", "bc"), 1), weight(&key("ab", "c"), 1));
        assert_eq!(fnv1a(0xcbf2_9ce4_8422_2325, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(mix(1), 6_238_072_747_940_578_789);
    }

    #[test]
    fn placement_is_balanced_within_the_bound() {
        for seed in 0..STRESS {
            let mut rng = Rng::new(seed);
            let nodes = uniform_nodes(2 + rng.below(8));
            let demands = random_demands(&mut rng, 20, 300, 4);
            let c = [1.0, 1.1, 1.25, 1.5][rng.below(4) as usize];
            let p = place(&nodes, &demands, &PlacementTable::new(), c);
            check_invariants(&nodes, &demands, &p);
            assert_within_bound(&p, c);
            assert!(p.unplaced.is_empty());
            // Not only bounded above: every node carries real work.
            let total: u32 = p.loads.values().sum();
            let avg = total / nodes.len() as u32;
            for (id, l) in &p.loads {
                assert!(
                    *l + 1 >= avg * 3 / 4,
                    "seed {seed}: node {id} underloaded: {:?}",
                    p.loads
                );
            }
        }
    }

    #[test]
    fn running_placement_on_its_own_output_changes_nothing() {
        for seed in 0..STRESS {
            let mut rng = Rng::new(seed);
            let nodes: Vec<NodeInfo> = (1..=1 + rng.below(7))
                .map(|id| {
                    let kinds: Vec<&str> = KINDS.iter().copied().filter(|_| rng.below(3) > 0).collect();
                    NodeInfo::new(id, NodeStatus::Up, kinds)
                })
                .collect();
            let demands = random_demands(&mut rng, 1, 120, 5);
            let first = place(&nodes, &demands, &PlacementTable::new(), 1.25);
            let second = place(&nodes, &demands, &first.table, 1.25);
            assert!(
                first.table == second.table,
                "seed {seed}: {:?} loads {:?} -> {:?} bound {}",
                diff(&first.table, &second.table),
                first.loads,
                second.loads,
                first.bound
            );
            assert_eq!(second.moved, 0);
            check_invariants(&nodes, &demands, &second);
        }
    }

    #[test]
    fn adding_a_node_moves_instances_only_to_it() {
        for seed in 0..STRESS {
            let mut rng = Rng::new(seed);
            let n = 2 + rng.below(7);
            let mut nodes = uniform_nodes(n);
            let demands = random_demands(&mut rng, 10, 300, 3);
            let before = place(&nodes, &demands, &PlacementTable::new(), 1.25);
            let new_id = 100 + rng.below(1000);
            nodes.push(up(new_id));
            let after = place(&nodes, &demands, &before.table, 1.25);
            check_invariants(&nodes, &demands, &after);
            assert_within_bound(&after, 1.25);
            for (k, old) in &before.table {
                for (i, (was, now)) in old.iter().zip(&after.table[k]).enumerate() {
                    assert!(was == now || *now == new_id, "seed {seed}: {k}[{i}] moved {was} -> {now}, not to {new_id}; loads {:?} -> {:?} bound {} -> {}; {:?}", before.loads, after.loads, before.bound, after.bound, diff(&before.table, &after.table));
                }
            }
            let total: u32 = after.loads.values().sum();
            let share = total / (n as u32 + 1);
            assert!(
                after.loads[&new_id] >= share * 3 / 4,
                "seed {seed}: new node got {} of share {share}",
                after.loads[&new_id]
            );
            assert_eq!(after.moved, after.loads[&new_id]);
        }
    }

    #[test]
    fn losing_a_node_moves_only_its_instances() {
        let lost = [
            NodeStatus::Down,
            NodeStatus::Suspect,
            NodeStatus::Degraded,
            NodeStatus::Leaving,
            NodeStatus::Draining,
        ];
        for seed in 0..STRESS {
            let mut rng = Rng::new(seed);
            let n = 2 + rng.below(7);
            let mut nodes = uniform_nodes(n);
            let demands = random_demands(&mut rng, 10, 300, 3);
            let before = place(&nodes, &demands, &PlacementTable::new(), 1.25);
            let victim = 1 + rng.below(n);
            if seed % 6 == 5 {
                nodes.retain(|x| x.id != victim); // removed from the member list altogether
            } else {
                nodes[victim as usize - 1].status = lost[seed as usize % 5];
            }
            let after = place(&nodes, &demands, &before.table, 1.25);
            check_invariants(&nodes, &demands, &after);
            assert_within_bound(&after, 1.25);
            let mut on_victim = 0;
            for (k, old) in &before.table {
                for (i, (was, now)) in old.iter().zip(&after.table[k]).enumerate() {
                    if *was == victim {
                        on_victim += 1;
                        assert_ne!(*now, victim);
                    } else {
                        assert_eq!(was, now, "seed {seed}: {k}[{i}] moved although node {was} is fine");
                    }
                }
            }
            assert_eq!(after.moved, on_victim);
            assert!(!after.loads.contains_key(&victim));
        }
    }

    #[test]
    fn handler_kinds_filter_nodes() {
        let nodes = vec![
            NodeInfo::new(1, NodeStatus::Up, ["rust:audit", "log"]),
            NodeInfo::new(2, NodeStatus::Up, ["webhook", "log"]),
            NodeInfo::new(3, NodeStatus::Up, ["rust:audit", "webhook", "log"]),
        ];
        let demands = vec![
            Demand::new("user.login", "audit", "rust:audit", 2),
            Demand::new("user.login", "hook", "webhook", 2),
            Demand::new("user.login", "log", "log", 3),
            Demand::new("user.login", "billing", "rust:billing", 2),
        ];
        let p = place(&nodes, &demands, &PlacementTable::new(), 1.25);
        check_invariants(&nodes, &demands, &p);
        let sorted = |k: SubscriptionKey| {
            let mut v = p.table[&k].clone();
            v.sort_unstable();
            v
        };
        assert_eq!(sorted(key("user.login", "audit")), vec![1, 3]);
        assert_eq!(sorted(key("user.login", "hook")), vec![2, 3]);
        assert_eq!(sorted(key("user.login", "log")), vec![1, 2, 3]);
        assert_eq!(p.table[&key("user.login", "billing")], Vec::<NodeId>::new());
        assert_eq!(p.unplaced, vec![key("user.login", "billing")]);
    }

    #[test]
    fn nodes_that_are_not_up_get_nothing() {
        let statuses = [
            NodeStatus::Suspect,
            NodeStatus::Degraded,
            NodeStatus::Down,
            NodeStatus::Leaving,
            NodeStatus::Draining,
        ];
        let mut nodes: Vec<NodeInfo> = statuses
            .iter()
            .enumerate()
            .map(|(i, s)| NodeInfo::new(i as u64 + 10, *s, KINDS))
            .collect();
        let demands = vec![Demand::new("t", "a", "log", 3), Demand::new("t", "b", "webhook", 1)];
        let none = place(&nodes, &demands, &PlacementTable::new(), 1.25);
        assert!(none.table.values().all(Vec::is_empty));
        assert_eq!(none.unplaced.len(), 2);
        assert!(none.loads.is_empty());
        nodes.push(up(1));
        let one = place(&nodes, &demands, &none.table, 1.25);
        assert_eq!(one.table[&key("t", "a")], vec![1, 1, 1]);
        assert_eq!(one.table[&key("t", "b")], vec![1]);
        assert!(one.unplaced.is_empty());
        assert_eq!(one.loads, BTreeMap::from([(1, 4)]));
    }

    #[test]
    fn more_instances_than_nodes_doubles_up_evenly() {
        let nodes = uniform_nodes(2);
        let demands = vec![Demand::new("t", "g", "log", 5)];
        let p = place(&nodes, &demands, &PlacementTable::new(), 1.25);
        let ones = p.table[&key("t", "g")].iter().filter(|&&n| n == 1).count();
        assert!(ones == 2 || ones == 3, "{:?}", p.table);
        // With enough nodes every instance gets its own node.
        let p = place(&uniform_nodes(5), &demands, &p.table, 1.25);
        let distinct: BTreeSet<_> = p.table[&key("t", "g")].iter().collect();
        assert_eq!(distinct.len(), 5);
    }

    #[test]
    fn instances_keep_their_index_when_the_count_changes() {
        let nodes = uniform_nodes(6);
        let p2 = place(&nodes, &[Demand::new("t", "g", "log", 2)], &PlacementTable::new(), 1.25);
        let p4 = place(&nodes, &[Demand::new("t", "g", "log", 4)], &p2.table, 1.25);
        assert_eq!(p4.table[&key("t", "g")][..2], p2.table[&key("t", "g")][..]);
        assert_eq!(p4.moved, 0);
        let p1 = place(&nodes, &[Demand::new("t", "g", "log", 1)], &p4.table, 1.25);
        assert_eq!(p1.table[&key("t", "g")][..], p2.table[&key("t", "g")][..1]);
        // A subscription that is no longer demanded disappears from the table.
        let gone = place(&nodes, &[], &p1.table, 1.25);
        assert!(gone.table.is_empty());
    }

    #[test]
    fn a_node_with_a_rare_kind_takes_all_of_it_and_nothing_is_shed_back_and_forth() {
        let mut nodes = uniform_nodes(4);
        nodes.push(NodeInfo::new(9, NodeStatus::Up, ["rust:rare", "log"]));
        let mut demands: Vec<Demand> = (0..8)
            .map(|i| Demand::new("r", format!("g{i}"), "rust:rare", 2))
            .collect();
        demands.extend((0..10).map(|i| Demand::new("l", format!("g{i}"), "log", 1)));
        let p = place(&nodes, &demands, &PlacementTable::new(), 1.25);
        check_invariants(&nodes, &demands, &p);
        assert_eq!(
            p.loads[&9], 16,
            "the rare node runs every rare instance and no log instance"
        );
        let again = place(&nodes, &demands, &p.table, 1.25);
        assert_eq!(again.table, p.table);
    }

    #[test]
    fn random_change_sequences_keep_every_invariant() {
        for seed in 0..STRESS {
            let mut rng = Rng::new(1000 + seed);
            let mut nodes = uniform_nodes(3);
            let mut demands = random_demands(&mut rng, 30, 1, 3);
            let mut table = PlacementTable::new();
            let mut next_id = 4;
            for step in 0..30 {
                match rng.below(6) {
                    0 => {
                        nodes.push(up(next_id));
                        next_id += 1;
                    }
                    1 if nodes.len() > 1 => {
                        let i = rng.below(nodes.len() as u64) as usize;
                        nodes[i].status = if nodes[i].status == NodeStatus::Up {
                            NodeStatus::Down
                        } else {
                            NodeStatus::Up
                        };
                    }
                    2 => demands.push(Demand::new(
                        "new",
                        format!("s{seed}-{step}"),
                        KINDS[rng.below(3) as usize],
                        1 + rng.below(4) as u32,
                    )),
                    3 if !demands.is_empty() => {
                        let i = rng.below(demands.len() as u64) as usize;
                        demands.remove(i);
                    }
                    4 if !demands.is_empty() => {
                        let i = rng.below(demands.len() as u64) as usize;
                        demands[i].instances = 1 + rng.below(5) as u32;
                    }
                    _ => {
                        let i = rng.below(nodes.len() as u64) as usize;
                        let kinds: Vec<&str> = KINDS.iter().copied().filter(|_| rng.below(3) > 0).collect();
                        nodes[i].kinds = kinds.into_iter().map(String::from).collect();
                    }
                }
                let p = place(&nodes, &demands, &table, 1.25);
                check_invariants(&nodes, &demands, &p);
                let again = place(&nodes, &demands, &p.table, 1.25);
                assert!(
                    again.table == p.table,
                    "seed {seed} step {step}: not a fixed point: {:?} loads {:?} -> {:?} bound {}",
                    diff(&p.table, &again.table),
                    p.loads,
                    again.loads,
                    p.bound
                );
                table = p.table;
            }
        }
    }

    #[test]
    fn homogeneous_change_sequences_move_only_what_they_must() {
        for seed in 0..STRESS {
            let mut rng = Rng::new(5000 + seed);
            let mut nodes = uniform_nodes(1 + rng.below(5));
            let mut demands = random_demands(&mut rng, 1, 60, 4);
            let mut table = place(&nodes, &demands, &PlacementTable::new(), 1.25).table;
            let mut next_id = 50;
            for step in 0..40 {
                let before = table.clone();
                // (what changed, the node that joined or came back, the node that was lost)
                let (what, joined, lost) = match rng.below(5) {
                    0 => {
                        // A new id anywhere in the order, not only at the end.
                        next_id += 1 + rng.below(3);
                        let id = if rng.below(2) == 0 {
                            next_id
                        } else {
                            next_id % 7 + 1000 * next_id
                        };
                        nodes.push(up(id));
                        ("join", Some(id), None)
                    }
                    1 if nodes.iter().filter(|n| n.status == NodeStatus::Up).count() > 1 => {
                        let i = rng.below(nodes.len() as u64) as usize;
                        if nodes[i].status == NodeStatus::Up {
                            nodes[i].status = NodeStatus::Down;
                            ("down", None, Some(nodes[i].id))
                        } else {
                            nodes[i].status = NodeStatus::Up;
                            ("up", Some(nodes[i].id), None)
                        }
                    }
                    2 => {
                        demands.push(Demand::new("new", format!("s{step}"), "log", 1 + rng.below(4) as u32));
                        ("subscribe", None, None)
                    }
                    _ => continue,
                };
                let p = place(&nodes, &demands, &table, 1.25);
                check_invariants(&nodes, &demands, &p);
                assert_within_bound(&p, 1.25);
                let up_now = nodes.iter().filter(|n| n.status == NodeStatus::Up).count();
                for (k, old) in &before {
                    // A node that holds more instances of a subscription than the new spread
                    // allows (more nodes are up now) must give the excess to nodes without one.
                    let spread = old.len().div_ceil(up_now);
                    for (i, (was, now)) in old.iter().zip(&p.table[k]).enumerate() {
                        let doubled = old.iter().filter(|x| *x == was).count() > spread;
                        let ok = was == now || Some(*now) == joined || Some(*was) == lost || doubled;
                        assert!(
                            ok,
                            "seed {seed} step {step} ({what}): {k}[{i}] moved {was} -> {now}; {:?}",
                            diff(&before, &p.table)
                        );
                    }
                }
                table = p.table;
            }
        }
    }

    #[test]
    fn status_names_round_trip() {
        for s in [
            NodeStatus::Up,
            NodeStatus::Suspect,
            NodeStatus::Degraded,
            NodeStatus::Down,
            NodeStatus::Leaving,
            NodeStatus::Draining,
        ] {
            assert_eq!(s.as_str().parse::<NodeStatus>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("sleeping".parse::<NodeStatus>().is_err());
    }
}
