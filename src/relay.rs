//! The event plane between nodes (DESIGN §5, §7): forwarding events to the node that runs the
//! chosen instance, acks back, redelivery, deduplication and placement fencing.
//!
//! **Ingress side.** When the router picks a remote slot, the ingress hands the event to
//! [`Relay::forward`]: it gets a delivery id, goes into the *pending* table with its completion
//! (the ingress's per-event tracker), and into the peer's outbox. One task per peer drains the
//! outbox into [`EventBatch`]es (many events per transport frame; the transport writes many frames
//! per syscall). The handler node answers with [`AckBatch`]es; an ack removes the pending entry and
//! completes the tracker, which drops the event from the WAL once every subscription is done.
//!
//! A pending entry is routed again (by the same rules as a new event) when its node turns suspect
//! or degraded, when the placement moves its subscription elsewhere, when the handler node refuses
//! it (fencing), or when no ack came within `cluster.redeliver_after_ms`. Events whose every
//! instance is on an unhealthy node are *parked* here and routed as soon as one can take them; WAL
//! and dead-letter replays park events too and let this loop place them. The delivery id stays the
//! same across re-sends, and the completion fires once ([`Once`]), however many acks arrive.
//!
//! **Handler side.** Batches from one origin are handled in order by one task per origin (so a
//! key's order survives the hop). A delivery for a subscription this node runs no instance of is
//! refused with [`AckCode::NotPlaced`] (the node no longer holds that placement: fencing); the
//! origin routes it again at once. Otherwise the *dedup window* is checked: a `(subscription,
//! event id)` seen recently is not handled again — a finished one is answered with its outcome, a
//! running one gets the ack when it finishes. The window holds `cluster.dedup_window` finished
//! entries.
//!
//! Memory: the pending table holds at most what the in-flight byte budget admits; each origin has
//! at most `handlers.mailbox_capacity` events in flight per remote instance (the router's
//! window), which bounds what a handler node's inboxes hold.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tokio::sync::{mpsc, Notify};

use crate::event::Event;
use crate::handler::supervisor::{Completion, Job, Outcome, Retired};
use crate::handler::SubscriptionKey;
use crate::monitor::Health;
use crate::proto::{
    decode_peer_message, encode_delivery, peer_message, peer_message_events, AckBatch, AckCode, AckRecord, Deliveries,
    Forwarded, PeerBody, PeerMessage,
};
use crate::router::{NoRoom, Route, Router, RoutingTable, Slot, SubRuntime, Target};
use crate::transport::{Envelope, Transport};

/// An envelope of forwarded events stops growing past this many bytes.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// At most this many deliveries (or acks) are taken from a queue per envelope.
const MAX_BATCH: usize = 1024;
/// How often pending deliveries are checked for re-routing when nothing else wakes the loop.
const SWEEP: Duration = Duration::from_millis(50);

/// A hasher for keys that are already well spread or sequential (delivery ids, dedup hashes):
/// one multiplication instead of SipHash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn write_u128(&mut self, v: u128) {
        self.write_u64(v as u64 ^ (v >> 64) as u64);
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// A dedup window key: a 128-bit keyed hash of `(topic, group, event id)`, so the window holds
/// no strings (the keys are random per process, so collisions cannot be provoked).
type DedupKey = u128;

/// Encoded deliveries for one peer (a run of `EventBatch.deliveries` entries), forwarded as one
/// queue item: one per publish call and peer, not one per event.
struct Chunk {
    bytes: Vec<u8>,
    /// Deliveries in `bytes`.
    n: usize,
}

/// One event to forward to a peer (see [`Relay::forward`]).
pub(crate) struct Outgoing {
    pub(crate) key: Arc<SubscriptionKey>,
    pub(crate) epoch: u64,
    /// The window unit reserved towards the peer.
    pub(crate) load: Arc<AtomicUsize>,
    pub(crate) event: Arc<Event>,
    pub(crate) completion: Arc<dyn Completion>,
}

/// The relay's own thread and runtime, so event-plane work neither waits behind HTTP workers nor
/// delays the membership thread's heartbeats. Dropping it stops the runtime and joins the thread.
pub(crate) struct RelayRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RelayRuntime {
    pub(crate) fn start() -> std::io::Result<RelayRuntime> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("herald-relay".into()).spawn(move || {
            runtime.block_on(async move {
                let _ = stopped.await;
            });
        })?;
        Ok(RelayRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }
}

impl Drop for RelayRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The relay's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayConfig {
    /// Re-send a delivery not acked within this long.
    pub(crate) redeliver_after: Duration,
    /// Finished `(subscription, event id)` pairs remembered for deduplication.
    pub(crate) dedup_window: usize,
}

/// Fires the wrapped completion once, however many copies of a delivery finish.
struct Once {
    fired: AtomicBool,
    inner: Arc<dyn Completion>,
}

impl Completion for Once {
    fn complete(&self, sub: &SubscriptionKey, outcome: Outcome) {
        if !self.fired.swap(true, Ordering::AcqRel) {
            self.inner.complete(sub, outcome);
        }
    }
}

/// A delivery waiting for its ack (or for a node to take it).
struct Pending {
    key: Arc<SubscriptionKey>,
    event: Arc<Event>,
    done: Arc<Once>,
    /// The node it was sent to; 0 while parked.
    node: u64,
    /// The window unit held towards `node`.
    load: Option<Arc<AtomicUsize>>,
    sent: Instant,
    /// The node refused it (fencing): route again now.
    refused: bool,
}

impl Pending {
    fn release(&mut self) {
        if let Some(load) = self.load.take() {
            load.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A finished delivery as the dedup window remembers it.
#[derive(Clone)]
struct Finished {
    code: AckCode,
    attempts: u32,
    error: String,
}

enum Seen {
    /// Being handled; these `(origin, delivery id)` wait for the outcome.
    Running(Vec<(u64, u64)>),
    Done(Finished),
}

/// The handler side's window of recent `(subscription, event id)`.
struct Dedup {
    map: IdMap<DedupKey, Seen>,
    done: VecDeque<DedupKey>,
    capacity: usize,
    /// Two independently keyed SipHashes make the 128-bit key.
    hash: (std::hash::RandomState, std::hash::RandomState),
}

impl Dedup {
    fn key(&self, sub: &SubscriptionKey, event_id: &str) -> DedupKey {
        let one = |state: &std::hash::RandomState| {
            let mut h = state.build_hasher();
            h.write(sub.topic.as_bytes());
            h.write_u8(0xff);
            h.write(sub.group.as_bytes());
            h.write_u8(0xff);
            h.write(event_id.as_bytes());
            h.finish()
        };
        u128::from(one(&self.hash.0)) << 64 | u128::from(one(&self.hash.1))
    }
}

/// One-way queues to one peer, each drained by its own task. Pushing to a peer whose queue
/// exists takes only a read lock (handler threads ack concurrently).
struct Queues<T> {
    senders: RwLock<IdMap<u64, mpsc::UnboundedSender<T>>>,
}

impl<T: Send + 'static> Queues<T> {
    fn new() -> Self {
        Queues {
            senders: RwLock::new(IdMap::default()),
        }
    }

    /// Queues `item` for `peer`, starting the peer's task with `start` on first use.
    fn push(&self, peer: u64, item: T, start: impl FnOnce(mpsc::UnboundedReceiver<T>)) {
        let item = match self.senders.read().unwrap_or_else(|p| p.into_inner()).get(&peer) {
            Some(tx) => match tx.send(item) {
                Ok(()) => return,
                Err(mpsc::error::SendError(item)) => item,
            },
            None => item,
        };
        let mut senders = self.senders.write().unwrap_or_else(|p| p.into_inner());
        // Another thread may have started the queue meanwhile.
        let item = match senders.get(&peer) {
            Some(tx) => match tx.send(item) {
                Ok(()) => return,
                Err(mpsc::error::SendError(item)) => item,
            },
            None => item,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(item);
        senders.insert(peer, tx);
        start(rx);
    }
}

/// The event plane of one node.
pub(crate) struct Relay {
    me: Weak<Relay>,
    transport: Transport,
    router: Arc<Router>,
    health: Arc<Health>,
    config: RelayConfig,
    runtime: tokio::runtime::Handle,
    next_id: AtomicU64,
    pending: Mutex<IdMap<u64, Pending>>,
    outboxes: Queues<Chunk>,
    ackboxes: Queues<AckRecord>,
    inboxes: Queues<Bytes>,
    dedup: Mutex<Dedup>,
    /// Wakes the re-routing loop early.
    kick: Notify,
    pending_gauge: metrics::Gauge,
    redelivered: metrics::Counter,
    deduplicated: metrics::Counter,
}

impl Relay {
    /// Starts the relay's tasks on `runtime`; `inbound` carries the `app` payloads peers send.
    pub(crate) fn start(
        transport: Transport,
        router: Arc<Router>,
        health: Arc<Health>,
        config: RelayConfig,
        runtime: tokio::runtime::Handle,
        mut inbound: mpsc::UnboundedReceiver<(u64, Bytes)>,
    ) -> Arc<Relay> {
        let relay = Arc::new_cyclic(|me| Relay {
            me: me.clone(),
            transport,
            router,
            health,
            config,
            runtime: runtime.clone(),
            // Random, so that acks a peer still owes to this node's previous process (same node
            // id, before a restart) cannot complete this process's deliveries.
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
            pending: Mutex::new(IdMap::default()),
            outboxes: Queues::new(),
            ackboxes: Queues::new(),
            inboxes: Queues::new(),
            dedup: Mutex::new(Dedup {
                map: IdMap::default(),
                done: VecDeque::new(),
                capacity: config.dedup_window,
                hash: (std::hash::RandomState::new(), std::hash::RandomState::new()),
            }),
            kick: Notify::new(),
            pending_gauge: metrics::gauge!(crate::metrics::FORWARD_PENDING),
            redelivered: metrics::counter!(crate::metrics::EVENTS_REDELIVERED),
            deduplicated: metrics::counter!(crate::metrics::EVENTS_DEDUPLICATED),
        });
        let weak = Arc::downgrade(&relay);
        runtime.spawn(async move {
            while let Some((from, bytes)) = inbound.recv().await {
                let Some(relay) = weak.upgrade() else { return };
                relay.on_message(from, bytes);
            }
        });
        runtime.spawn(reroute_loop(Arc::downgrade(&relay), relay.health.subscribe()));
        relay
    }

    /// Deliveries sent to a node and not acked yet (parked ones excluded).
    pub(crate) fn in_flight(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| p.node != 0)
            .count()
    }

    /// Sends `items` (events for subscriptions with an instance on `node`, each with its window
    /// unit towards it reserved) to `node`, in order; each completion is told once the handler
    /// node acks its event. One call per publish and peer: the events are encoded once, straight
    /// into the peer's outgoing buffer, and enter the pending table under one lock.
    pub(crate) fn forward(&self, node: u64, items: Vec<Outgoing>) {
        if items.is_empty() {
            return;
        }
        let first = self.next_id.fetch_add(items.len() as u64, Ordering::Relaxed);
        let mut chunks = Vec::new();
        let mut chunk = Chunk {
            bytes: Vec::new(),
            n: 0,
        };
        for (i, o) in items.iter().enumerate() {
            if chunk.n > 0 && chunk.bytes.len() >= MAX_BATCH_BYTES {
                chunks.push(std::mem::replace(
                    &mut chunk,
                    Chunk {
                        bytes: Vec::new(),
                        n: 0,
                    },
                ));
            }
            encode_delivery(first + i as u64, &o.key.group, o.epoch, &o.event, &mut chunk.bytes);
            chunk.n += 1;
        }
        chunks.push(chunk);
        let now = Instant::now();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.reserve(items.len());
            for (i, o) in items.into_iter().enumerate() {
                pending.insert(
                    first + i as u64,
                    Pending {
                        key: o.key,
                        event: o.event,
                        done: Arc::new(Once {
                            fired: AtomicBool::new(false),
                            inner: o.completion,
                        }),
                        node,
                        load: Some(o.load),
                        sent: now,
                        refused: false,
                    },
                );
            }
            self.pending_gauge.set(pending.len() as f64);
        }
        for chunk in chunks {
            self.send_to(node, chunk);
        }
    }

    /// Holds `event` for `key`'s subscription until a node can take it (every instance is on an
    /// unhealthy node, or a replay hands it over to be routed).
    pub(crate) fn park(&self, key: Arc<SubscriptionKey>, event: Arc<Event>, completion: Arc<dyn Completion>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.insert(
            id,
            Pending {
                key,
                event,
                done: Arc::new(Once {
                    fired: AtomicBool::new(false),
                    inner: completion,
                }),
                node: 0,
                load: None,
                sent: Instant::now(),
                refused: false,
            },
        );
        self.kick.notify_one();
    }

    fn insert(&self, id: u64, p: Pending) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.insert(id, p);
        self.pending_gauge.set(pending.len() as f64);
    }

    fn send_to(&self, node: u64, chunk: Chunk) {
        let transport = self.transport.clone();
        let runtime = &self.runtime;
        self.outboxes.push(node, chunk, |rx| {
            runtime.spawn(send_events(transport, node, rx));
        });
    }

    fn ack(&self, origin: u64, record: AckRecord) {
        let transport = self.transport.clone();
        let runtime = &self.runtime;
        self.ackboxes.push(origin, record, |rx| {
            runtime.spawn(send_acks(transport, origin, rx));
        });
    }

    fn on_message(&self, from: u64, bytes: Bytes) {
        match decode_peer_message(bytes) {
            Ok(Some(PeerBody::Events(batch))) => {
                let me = self.me.clone();
                let runtime = &self.runtime;
                self.inboxes.push(from, batch, |rx| {
                    runtime.spawn(receive_events(me, from, rx));
                });
            }
            Ok(Some(PeerBody::Acks(acks))) => self.on_acks(from, acks),
            Ok(None) => {}
            Err(e) => tracing::warn!(peer = from, error = %e, "undecodable event-plane message dropped"),
        }
    }

    // ---- ingress side -------------------------------------------------------------------------

    fn on_acks(&self, from: u64, batch: AckBatch) {
        let mut finished = Vec::new();
        let mut refused = false;
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for ack in batch.acks {
                let code = AckCode::try_from(ack.code).unwrap_or(AckCode::Failed);
                if code == AckCode::NotPlaced {
                    if let Some(p) = pending.get_mut(&ack.id) {
                        if p.node == from {
                            tracing::debug!(peer = from, subscription = %p.key, reason = %ack.error, "delivery refused; routing it again");
                            p.refused = true;
                            refused = true;
                        }
                    }
                    continue;
                }
                if let Some(mut p) = pending.remove(&ack.id) {
                    p.release();
                    let outcome = match code {
                        AckCode::Ok => Outcome::Ok { attempts: ack.attempts },
                        AckCode::DeadLettered => Outcome::DeadLettered {
                            attempts: ack.attempts,
                            error: ack.error,
                        },
                        _ => Outcome::Failed {
                            attempts: ack.attempts,
                            error: ack.error,
                        },
                    };
                    finished.push((p, outcome));
                }
            }
            self.pending_gauge.set(pending.len() as f64);
        }
        // Completions run outside the lock (they may drop WAL records and answer publishers).
        for (p, outcome) in finished {
            p.done.complete(&p.key, outcome);
        }
        if refused {
            self.kick.notify_one();
        }
    }

    /// Routes again every pending delivery that needs it.
    fn reroute(&self) {
        let table = self.router.table();
        if !table.is_live() {
            // Starting (no placement yet) or stopping (the table was cleared): nothing can be
            // routed, and a missing route does not mean a deleted subscription.
            return;
        }
        let now = Instant::now();
        let mut local = Vec::new();
        let mut resend: Vec<(u64, Chunk)> = Vec::new();
        let mut resent = 0;
        let mut gone = Vec::new();
        // One route lookup (and one health check per node) per subscription per sweep, not one
        // per pending delivery: pending entries of one subscription share its key's `Arc`.
        let mut routes: HashMap<*const SubscriptionKey, Option<&Arc<Route>>> = HashMap::new();
        let mut placed: HashMap<(*const SubscriptionKey, u64), bool> = HashMap::new();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            // First find what is due (the table iterates in no order), then route it in delivery
            // id order, which is publish order: one key's events keep their order across re-sends
            // and WAL replays.
            let mut due = Vec::new();
            for (&id, p) in pending.iter() {
                let ptr = Arc::as_ptr(&p.key);
                let Some(route) = *routes.entry(ptr).or_insert_with(|| table.route(&p.key)) else {
                    gone.push(id);
                    continue;
                };
                if p.node == 0
                    || p.refused
                    || !*placed.entry((ptr, p.node)).or_insert_with(|| {
                        self.health.peer(p.node).routable()
                            && route
                                .slots
                                .iter()
                                .any(|s| matches!(s, Slot::Remote { node, .. } if *node == p.node))
                    })
                    || now.saturating_duration_since(p.sent) >= self.config.redeliver_after
                {
                    due.push((id, route));
                }
            }
            due.sort_unstable_by_key(|&(id, _)| id);
            gone.sort_unstable();
            for (id, route) in due {
                let Some(p) = pending.get_mut(&id) else { continue };
                match route.reserve(p.event.key.as_deref()) {
                    Ok(Target::Local(slot)) => {
                        slot.send(Job {
                            event: p.event.clone(),
                            completion: p.done.clone(),
                            origin: None,
                        });
                        local.push(id);
                    }
                    Ok(Target::Remote(slot)) => {
                        let (node, load) = slot.take();
                        p.release();
                        p.node = node;
                        p.load = Some(load);
                        p.sent = now;
                        p.refused = false;
                        let i = match resend
                            .iter()
                            .position(|(n, c)| *n == node && c.bytes.len() < MAX_BATCH_BYTES)
                        {
                            Some(i) => i,
                            None => {
                                resend.push((
                                    node,
                                    Chunk {
                                        bytes: Vec::new(),
                                        n: 0,
                                    },
                                ));
                                resend.len() - 1
                            }
                        };
                        let chunk = &mut resend[i].1;
                        encode_delivery(id, &p.key.group, route.epoch, &p.event, &mut chunk.bytes);
                        chunk.n += 1;
                        resent += 1;
                    }
                    Ok(Target::Parked) | Err(NoRoom::Unplaced) => {
                        p.release();
                        p.node = 0;
                    }
                    // No room now: the next sweep tries again.
                    Err(NoRoom::Full) => {}
                }
            }
            for id in &local {
                if let Some(mut p) = pending.remove(id) {
                    p.release();
                }
            }
            for id in &gone {
                if let Some(mut p) = pending.remove(id) {
                    p.release();
                    // The subscription was deleted: nothing is owed to it any more.
                    tracing::debug!(subscription = %p.key, id = %p.event.id, "subscription deleted; delivery dropped");
                    p.done.complete(&p.key, Outcome::Ok { attempts: 0 });
                }
            }
            self.pending_gauge.set(pending.len() as f64);
        }
        self.redelivered.increment((local.len() + resent) as u64);
        for (node, chunk) in resend {
            self.send_to(node, chunk);
        }
    }

    // ---- handler side -------------------------------------------------------------------------

    /// The subscription a delivery is for, as this node runs it (or none: refuse it). Batches
    /// carry runs of one subscription, so the last answer is kept while the table is unchanged.
    fn lookup(&self, cache: &mut Lookup, topic: &str, group: &str) -> Option<Arc<SubRuntime>> {
        let table = self.router.table();
        let fresh = cache
            .as_ref()
            .is_some_and(|(t, key, _)| Arc::ptr_eq(t, &table) && key.topic == topic && key.group == group);
        if !fresh {
            let key = SubscriptionKey {
                topic: topic.to_string(),
                group: group.to_string(),
            };
            let sub = table.get(&key).cloned();
            *cache = Some((table, key, sub));
        }
        cache.as_ref().and_then(|(_, _, sub)| sub.clone())
    }

    async fn accept(&self, from: u64, d: Forwarded, cache: &mut Lookup) {
        let refuse = |why: String| AckRecord {
            id: d.id,
            code: AckCode::NotPlaced as i32,
            attempts: 0,
            error: why,
        };
        let Some(record) = d.event else {
            return self.ack(from, refuse("a delivery without an event".into()));
        };
        let Some(sub) = self.lookup(cache, &record.topic, &d.group) else {
            let key = SubscriptionKey {
                topic: record.topic.clone(),
                group: d.group.clone(),
            };
            return self.ack(
                from,
                refuse(format!(
                    "node holds no instance of {key} (placement epoch {}, delivery epoch {})",
                    self.router.table().route(&key).map_or(0, |r| r.epoch),
                    d.epoch
                )),
            );
        };
        let key = &sub.shared.key;
        let dedup_key;
        {
            let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
            dedup_key = dedup.key(key, &record.id);
            match dedup.map.get_mut(&dedup_key) {
                Some(Seen::Running(waiting)) => {
                    waiting.push((from, d.id));
                    self.deduplicated.increment(1);
                    return;
                }
                Some(Seen::Done(f)) => {
                    let f = f.clone();
                    drop(dedup);
                    self.deduplicated.increment(1);
                    return self.ack(
                        from,
                        AckRecord {
                            id: d.id,
                            code: f.code as i32,
                            attempts: f.attempts,
                            error: f.error,
                        },
                    );
                }
                None => {
                    dedup.map.insert(dedup_key, Seen::Running(vec![(from, d.id)]));
                }
            }
        }
        let event = Arc::new(Event::from(record));
        let job = Job {
            event,
            completion: Arc::new(Handled {
                relay: self.me.clone(),
                dedup: dedup_key,
            }),
            origin: Some((from, d.id)),
        };
        // Straight into the mailbox when it has room; wait (in order) only when it is full.
        let job = match sub.try_send(job) {
            Ok(()) => return,
            Err(job) => job,
        };
        if sub.send_waiting(job.event.key.clone().as_deref(), job).await.is_err() {
            self.dedup
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map
                .remove(&dedup_key);
            self.ack(from, refuse(format!("subscription {key} stopped on this node")));
        }
    }

    fn retired(&self, key: &Arc<SubscriptionKey>, job: Job) {
        if job.origin.is_none() {
            tracing::debug!(subscription = %key, id = %job.event.id, "placement moved: routing a queued event anew");
            return self.park(key.clone(), job.event, job.completion);
        }
        let waiting = {
            let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
            let k = dedup.key(key, &job.event.id);
            dedup.map.remove(&k)
        };
        let waiting = match waiting {
            Some(Seen::Running(w)) => w,
            _ => job.origin.into_iter().collect(),
        };
        for (origin, id) in waiting {
            self.ack(
                origin,
                AckRecord {
                    id,
                    code: AckCode::NotPlaced as i32,
                    attempts: 0,
                    error: format!("placement of {key} moved away from this node before it ran the event"),
                },
            );
        }
    }

    fn handled(&self, entry: DedupKey, outcome: Outcome) {
        let finished = match outcome {
            Outcome::Ok { attempts } => Finished {
                code: AckCode::Ok,
                attempts,
                error: String::new(),
            },
            Outcome::DeadLettered { attempts, error } => Finished {
                code: AckCode::DeadLettered,
                attempts,
                error,
            },
            Outcome::Failed { attempts, error } => Finished {
                code: AckCode::Failed,
                attempts,
                error,
            },
        };
        let waiting = {
            let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
            let Some(seen) = dedup.map.get_mut(&entry) else {
                return;
            };
            let waiting = match std::mem::replace(seen, Seen::Done(finished.clone())) {
                Seen::Running(w) => w,
                _ => Vec::new(),
            };
            dedup.done.push_back(entry);
            while dedup.done.len() > dedup.capacity {
                if let Some(old) = dedup.done.pop_front() {
                    if matches!(dedup.map.get(&old), Some(Seen::Done(_))) {
                        dedup.map.remove(&old);
                    }
                }
            }
            waiting
        };
        for (origin, id) in waiting {
            self.ack(
                origin,
                AckRecord {
                    id,
                    code: finished.code as i32,
                    attempts: finished.attempts,
                    error: finished.error.clone(),
                },
            );
        }
    }
}

/// Routes anew the jobs of subscriptions that left this node (see [`Retired`]): a forwarded one is
/// refused back to its origin (which routes it with the new placement), one accepted here is
/// parked and routed like a new event. Set once the relay exists (the router is built first).
#[derive(Default)]
pub(crate) struct Returns(std::sync::OnceLock<Weak<Relay>>);

impl Returns {
    pub(crate) fn set(&self, relay: &Arc<Relay>) {
        let _ = self.0.set(Arc::downgrade(relay));
    }
}

impl Retired for Returns {
    fn retired(&self, sub: &Arc<SubscriptionKey>, job: Job) {
        match self.0.get().and_then(Weak::upgrade) {
            Some(relay) => relay.retired(sub, job),
            // Only while the node shuts down: the event stays in its origin's WAL.
            None => job.completion.complete(
                sub,
                Outcome::Failed {
                    attempts: 0,
                    error: "the node is stopping".into(),
                },
            ),
        }
    }
}

/// The completion of a forwarded delivery on the handler node: record it, ack the origin(s).
struct Handled {
    relay: Weak<Relay>,
    dedup: DedupKey,
}

impl Completion for Handled {
    fn complete(&self, _: &SubscriptionKey, outcome: Outcome) {
        if let Some(relay) = self.relay.upgrade() {
            relay.handled(self.dedup, outcome);
        }
    }
}

/// The handler side's last subscription lookup: (table snapshot, key, this node's instances).
type Lookup = Option<(Arc<RoutingTable>, SubscriptionKey, Option<Arc<SubRuntime>>)>;

/// Drains one peer's outbox into event batches (many publish calls' chunks per envelope, up to
/// [`MAX_BATCH_BYTES`]).
async fn send_events(transport: Transport, node: u64, mut rx: mpsc::UnboundedReceiver<Chunk>) {
    let counter = metrics::counter!(crate::metrics::EVENTS_FORWARDED, "peer" => node.to_string());
    let mut buf = Vec::with_capacity(64);
    while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
        let mut rest = buf.as_slice();
        while !rest.is_empty() {
            let mut bytes = 0;
            let take = rest
                .iter()
                .position(|c| {
                    bytes += c.bytes.len();
                    bytes > MAX_BATCH_BYTES
                })
                .unwrap_or(rest.len())
                .max(1);
            let (frame, tail) = rest.split_at(take);
            rest = tail;
            let n: usize = frame.iter().map(|c| c.n).sum();
            let env = Envelope::app(peer_message_events(frame.iter().map(|c| c.bytes.as_slice())));
            match transport.send_async(node, env).await {
                Ok(()) => counter.increment(n as u64),
                // Still pending at the origin: redelivered after the timeout or when re-routed.
                Err(e) => tracing::debug!(peer = node, error = %e, "cannot forward events"),
            }
        }
        buf.clear();
    }
}

/// Drains the acks owed to one origin into ack batches.
async fn send_acks(transport: Transport, origin: u64, mut rx: mpsc::UnboundedReceiver<AckRecord>) {
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut buf, MAX_BATCH * 8).await > 0 {
        let env = Envelope::app(
            PeerMessage {
                body: Some(peer_message::Body::Acks(AckBatch {
                    acks: std::mem::take(&mut buf),
                })),
            }
            .encode_to_vec(),
        );
        if let Err(e) = transport.send_async(origin, env).await {
            // The origin re-sends after its timeout; the dedup window answers then.
            tracing::debug!(peer = origin, error = %e, "cannot send acks");
        }
    }
}

/// Handles one origin's batches in order.
/// Each batch is decoded one delivery at a time, as it is handed over.
async fn receive_events(relay: Weak<Relay>, from: u64, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    let mut cache = None;
    while let Some(batch) = rx.recv().await {
        let Some(relay) = relay.upgrade() else { return };
        for d in Deliveries(batch) {
            match d {
                Ok(d) => relay.accept(from, d, &mut cache).await,
                Err(e) => {
                    // The origin re-sends what it does not get acked.
                    tracing::warn!(peer = from, error = %e, "undecodable delivery; rest of the batch dropped");
                    break;
                }
            }
        }
        cache = None;
    }
}

/// Re-routes pending deliveries every sweep, and at once when a peer's health changes or a
/// delivery was refused or parked.
async fn reroute_loop(relay: Weak<Relay>, mut health: tokio::sync::watch::Receiver<u64>) {
    loop {
        let Some(r) = relay.upgrade() else { return };
        let kicked = r.kick.notified();
        tokio::pin!(kicked);
        kicked.as_mut().enable();
        r.reroute();
        tokio::select! {
            _ = tokio::time::sleep(SWEEP) => {}
            _ = kicked => {}
            c = health.changed() => if c.is_err() { return },
        }
    }
}
