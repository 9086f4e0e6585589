//! The local event bus: topic → subscriptions → one instance each.
//!
//! The router owns the routing table (an immutable snapshot swapped atomically on every
//! subscription change, so publishing never takes a lock) and the worker threads that run handler
//! instances. For each subscription of an event's topic it picks one instance:
//!
//! * with a partition key, by rendezvous hashing over the instances, so a key always lands on the
//!   same instance and keeps its order;
//! * without a key, the less loaded of two random instances ("power of two choices"), falling back
//!   to any instance with room.
//!
//! Picking reserves a slot in the instance's bounded mailbox first ([`Reservation`]); the ingress
//! sends only when every subscription has room, so a full mailbox refuses the publish (429) rather
//! than accepting an event it cannot queue. The router does not decide placement: which instances
//! exist is given to it (by subscriptions today, by the Raft placement table later).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix::ArbiterHandle;
use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::handler::supervisor::{self, DeadLetterSink, Job, Policy, SubShared};
use crate::handler::{HandlerRegistry, Spawner, SubscriptionKey};
use crate::metrics::SubMetrics;
use crate::subscription::SubscriptionSpec;

/// One running handler instance, as the router sees it.
pub(crate) struct Instance {
    tx: mpsc::Sender<Job>,
    /// Events queued or being handled by this instance (for least-loaded choice).
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
    sub: &'a SubRuntime,
    load: &'a AtomicUsize,
}

impl Reservation<'_> {
    pub(crate) fn send(self, job: Job) {
        self.load.fetch_add(1, Ordering::Relaxed);
        self.sub.shared.metrics.mailbox_depth.increment(1.0);
        self.permit.send(job);
    }

    pub(crate) fn key(&self) -> &SubscriptionKey {
        &self.sub.shared.key
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
                sub: self,
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
        let a = rand::random_range(0..n);
        let b = (a + 1 + rand::random_range(0..n - 1)) % n;
        let (first, second) =
            if self.instances[a].load.load(Ordering::Relaxed) <= self.instances[b].load.load(Ordering::Relaxed) {
                (a, b)
            } else {
                (b, a)
            };
        slot(first).or_else(|| slot(second)).or_else(|| (0..n).find_map(slot))
    }

    /// Waits for room (used by WAL replay and dead-letter replay, which must not be refused).
    pub(crate) async fn send_waiting(&self, key: Option<&str>, job: Job) -> Result<(), Job> {
        let n = self.instances.len();
        let i = match key {
            Some(k) => rendezvous(k.as_bytes(), n),
            None => (0..n)
                .min_by_key(|&i| self.instances[i].load.load(Ordering::Relaxed))
                .unwrap_or(0),
        };
        let inst = &self.instances[i];
        match inst.tx.reserve().await {
            Ok(permit) => {
                Reservation {
                    permit,
                    sub: self,
                    load: &inst.load,
                }
                .send(job);
                Ok(())
            }
            Err(_) => Err(job),
        }
    }

    /// Events queued or in progress across all instances.
    pub(crate) fn load(&self) -> usize {
        self.instances.iter().map(|i| i.load.load(Ordering::Relaxed)).sum()
    }
}

/// Rendezvous (highest random weight) hashing: the instance with the highest hash of (key, index).
/// Stable across processes and versions, which cross-node routing will rely on.
pub(crate) fn rendezvous(key: &[u8], n: usize) -> usize {
    (0..n).max_by_key(|&i| mix(fnv1a(key) ^ mix(i as u64 + 1))).unwrap_or(0)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64 finaliser: spreads FNV's weak low bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An immutable snapshot of every subscription.
#[derive(Default)]
pub(crate) struct RoutingTable {
    by_topic: HashMap<String, Vec<Arc<SubRuntime>>>,
    all: BTreeMap<SubscriptionKey, Arc<SubRuntime>>,
    /// Subscriptions of the cluster that run no instance on this node, by topic, with the HTTP
    /// addresses of the nodes that do run them.
    elsewhere: Arc<HashMap<String, Vec<Elsewhere>>>,
}

/// A subscription placed only on other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Elsewhere {
    pub(crate) group: String,
    /// HTTP addresses of the nodes running it (empty: no node can run it).
    pub(crate) http: Vec<String>,
}

impl RoutingTable {
    /// The subscriptions of `topic` (empty if none).
    pub(crate) fn topic(&self, topic: &str) -> &[Arc<SubRuntime>] {
        self.by_topic.get(topic).map_or(&[], Vec::as_slice)
    }

    /// The subscriptions of `topic` that run only on other nodes.
    pub(crate) fn elsewhere(&self, topic: &str) -> &[Elsewhere] {
        self.elsewhere.get(topic).map_or(&[], Vec::as_slice)
    }

    pub(crate) fn get(&self, key: &SubscriptionKey) -> Option<&Arc<SubRuntime>> {
        self.all.get(key)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<SubRuntime>> {
        self.all.values()
    }

    fn rebuilt(
        all: BTreeMap<SubscriptionKey, Arc<SubRuntime>>,
        elsewhere: Arc<HashMap<String, Vec<Elsewhere>>>,
    ) -> Self {
        let mut by_topic: HashMap<String, Vec<Arc<SubRuntime>>> = HashMap::new();
        for sub in all.values() {
            by_topic.entry(sub.spec.topic.clone()).or_default().push(sub.clone());
        }
        RoutingTable {
            by_topic,
            all,
            elsewhere,
        }
    }
}

/// What the router needs to start instances.
pub(crate) struct RouterParts {
    pub(crate) registry: HandlerRegistry,
    pub(crate) workers: Vec<ArbiterHandle>,
    pub(crate) policy: Policy,
    pub(crate) dead_letters: Arc<dyn DeadLetterSink>,
    pub(crate) mailbox_capacity: usize,
    pub(crate) default_max_attempts: u32,
    pub(crate) webhook_timeout: std::time::Duration,
}

/// Owns the routing table and starts/stops instances as subscriptions change.
pub(crate) struct Router {
    table: ArcSwap<RoutingTable>,
    /// Serialises changes; readers use `table` without locking.
    write: Mutex<()>,
    parts: RouterParts,
}

impl Router {
    pub(crate) fn new(parts: RouterParts) -> Self {
        Router {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            write: Mutex::new(()),
            parts,
        }
    }

    /// The current snapshot.
    pub(crate) fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    pub(crate) fn registry(&self) -> &HandlerRegistry {
        &self.parts.registry
    }

    /// Creates or replaces a subscription (already validated). Returns false if it was unchanged.
    /// A replaced subscription's old instances finish what is queued, then stop.
    pub(crate) fn apply(&self, spec: SubscriptionSpec) -> bool {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.table.load_full();
        let key = SubscriptionKey {
            topic: spec.topic.clone(),
            group: spec.group.clone(),
        };
        if current.all.get(&key).is_some_and(|s| s.spec == spec) {
            return false;
        }
        let Some(spawner) = self.parts.registry.spawner(&spec.handler, self.parts.webhook_timeout) else {
            // Validation checks the registry first; reaching here is a bug worth a loud log.
            tracing::error!(subscription = %key, "no spawner for handler {:?}", spec.handler);
            return false;
        };
        let runtime = Arc::new(self.start(key.clone(), spec, spawner));
        let mut all = current.all.clone();
        all.insert(key, runtime);
        self.table
            .store(Arc::new(RoutingTable::rebuilt(all, current.elsewhere.clone())));
        true
    }

    /// Removes a subscription; its instances drain their mailboxes and stop.
    pub(crate) fn remove(&self, key: &SubscriptionKey) -> bool {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.table.load_full();
        if !current.all.contains_key(key) {
            return false;
        }
        let mut all = current.all.clone();
        all.remove(key);
        self.table
            .store(Arc::new(RoutingTable::rebuilt(all, current.elsewhere.clone())));
        true
    }

    /// Records which subscriptions of the cluster run only on other nodes.
    pub(crate) fn set_elsewhere(&self, elsewhere: HashMap<String, Vec<Elsewhere>>) {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.table.load_full();
        if *current.elsewhere == elsewhere {
            return;
        }
        self.table.store(Arc::new(RoutingTable::rebuilt(
            current.all.clone(),
            Arc::new(elsewhere),
        )));
    }

    /// Drops every subscription so the instances drain and stop (shutdown).
    pub(crate) fn clear(&self) {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        self.table.store(Arc::new(RoutingTable::default()));
    }

    fn start(&self, key: SubscriptionKey, spec: SubscriptionSpec, spawner: Arc<dyn Spawner>) -> SubRuntime {
        let shared = Arc::new(SubShared {
            metrics: SubMetrics::new(&key),
            key: Arc::new(key),
            max_attempts: spec.max_attempts.unwrap_or(self.parts.default_max_attempts),
        });
        let workers = &self.parts.workers;
        // Spread instances over the worker threads, starting at a per-subscription offset so that
        // many one-instance subscriptions do not all land on the first worker.
        let offset = fnv1a(shared.key.to_string().as_bytes()) as usize;
        let instances = (0..spec.instances as usize)
            .map(|i| {
                let (tx, rx) = mpsc::channel(self.parts.mailbox_capacity);
                let load = Arc::new(AtomicUsize::new(0));
                let task = (
                    shared.clone(),
                    spawner.clone(),
                    self.parts.policy,
                    self.parts.dead_letters.clone(),
                    rx,
                    load.clone(),
                );
                let worker = &workers[(offset + i) % workers.len()];
                worker.spawn_fn(move || {
                    let (shared, spawner, policy, dead_letters, rx, load) = task;
                    actix_rt::spawn(supervisor::run_instance(
                        shared,
                        spawner,
                        policy,
                        dead_letters,
                        rx,
                        load,
                    ));
                });
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
