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
//! **Which wire.** Batches, acks and lane credits travel as `App` payloads on the peer bus's
//! *events* channel (`transport::Bus::events`): its own connection and bounded queue per peer,
//! driven by the `herald-events` thread. They never share a queue or a connection with Raft
//! messages and pings (the control channel, on the membership thread), so a burst of batches
//! cannot delay a heartbeat; and the bus hands this relay only what arrives on the events channel.
//!
//! A pending entry is routed again (by the same rules as a new event) when its node turns suspect
//! or degraded, when the placement moves its subscription elsewhere, when the handler node refuses
//! it (fencing), or when no ack came within `cluster.redeliver_after_ms`. Events whose every
//! instance is on an unhealthy node are *parked* here and routed as soon as one can take them; WAL
//! and dead-letter replays park events too and let this loop place them. The delivery id stays the
//! same across re-sends, and the completion fires once ([`Once`]), however many acks arrive.
//!
//! **At-most-once lanes (`ack=none`).** An `ack=none` event for a remote instance is not kept:
//! it is encoded with a *lane* instead of a delivery id (one lane per window counter, i.e. per
//! remote instance of a subscription) and forgotten; it never enters the pending table, is never
//! re-sent, and needs no completion tracker. The handler node skips the dedup window for it (it
//! cannot arrive twice), acks nothing, and only counts it as done on its lane's shared
//! completion; the ack task sends `(lane, n)` credits, so the origin gives the window units back
//! in bulk. A lane whose node turns unhealthy, or that sees no credit for
//! `cluster.redeliver_after_ms` (credits lost with a connection), gives its units back at once:
//! its deliveries are presumed lost. A handler node that does not run the subscription (any
//! more) drops the event and credits it. This is what `ack=none` promises (DESIGN §7:
//! at-most-once), and it takes the per-event ack, pending entry, dedup entry and the two
//! per-event allocations off the fastest mode's path.
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
use crate::monitor::Health;
use crate::proto::{
    decode_peer_message, encode_delivery, encode_delivery_on, peer_message, peer_message_events, AckBatch, AckCode,
    AckRecord, Deliveries, EventsBuffer, Forwarded, LaneCredit, PeerBody, PeerMessage,
};
use crate::router::{NoRoom, Route, Router, RoutingTable, Slot, SubRuntime, Target};
use crate::transport::{Envelope, Transport};
use crate::types::SubscriptionKey;

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

/// A chunk of at least this many bytes of deliveries goes out as its own envelope, written to
/// the socket from the buffer it was encoded into; smaller ones are copied together into one.
const OWN_ENVELOPE_BYTES: usize = 16 * 1024;

/// Encoded deliveries for one peer (a run of `EventBatch.deliveries` entries, with room for the
/// message head in front), forwarded as one queue item: one per publish call and peer, not one
/// per event.
struct Chunk {
    bytes: EventsBuffer,
    /// Deliveries in `bytes`.
    n: usize,
}

impl Chunk {
    fn with_capacity(capacity: usize) -> Chunk {
        Chunk {
            bytes: EventsBuffer::with_capacity(capacity),
            n: 0,
        }
    }

    fn len(&self) -> usize {
        self.bytes.body().len()
    }
}

/// One event to forward to a peer (see [`Relay::forward`]).
pub(crate) struct Outgoing {
    pub(crate) key: Arc<SubscriptionKey>,
    pub(crate) epoch: u64,
    /// The window unit reserved towards the peer.
    pub(crate) load: Arc<AtomicUsize>,
    pub(crate) event: Arc<Event>,
    /// Told when the handler node acks the event; `None` for an at-most-once (`ack=none`)
    /// delivery, which is sent on a lane and neither kept nor acked.
    pub(crate) completion: Option<Arc<dyn Completion>>,
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

/// The ingress side's at-most-once lanes: one per window counter (remote instance of a
/// subscription) that `ack=none` events were sent on. A lane holds the window units of its
/// deliveries until the handler node credits them back.
#[derive(Default)]
struct Lanes {
    /// Lane of each window counter, by the counter's address (the lane holds the `Arc`, so the
    /// address is not reused while it is here).
    by_load: IdMap<usize, u64>,
    lanes: IdMap<u64, Lane>,
}

struct Lane {
    node: u64,
    /// The window counter towards `node`.
    load: Arc<AtomicUsize>,
    /// Window units held by deliveries not credited back yet.
    outstanding: usize,
    /// The last credit, or the send that made `outstanding` non-zero: a lane with no progress
    /// for `redeliver_after` (credits lost with a connection, a peer of an older version) gives
    /// its units back.
    progress: Instant,
}

impl Lane {
    /// Gives back up to `n` units (never more than are held: a credit that arrives after the
    /// units were given back on suspicion is ignored).
    fn release(&mut self, n: usize) {
        let n = n.min(self.outstanding);
        self.outstanding -= n;
        self.load.fetch_sub(n, Ordering::AcqRel);
    }
}

/// A lane as lanes are kept idle before they are forgotten.
const IDLE_LANE: Duration = Duration::from_secs(60);

/// The handler side of one origin's lane: at-most-once deliveries finished (or dropped) and not
/// yet credited back. Shared by all of the lane's jobs as their completion, so an at-most-once
/// delivery costs no allocation and no ack of its own: the first completion after a credit
/// queues the lane once, and the ack task sends however many finished by then.
struct LaneDone {
    me: Weak<LaneDone>,
    relay: Weak<Relay>,
    origin: u64,
    lane: u64,
    done: AtomicU64,
}

impl LaneDone {
    /// One more delivery of the lane is done (handled, failed, or dropped).
    fn credit_one(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) == 0 {
            if let (Some(relay), Some(me)) = (self.relay.upgrade(), self.me.upgrade()) {
                relay.queue_ack(self.origin, AckItem::Credit(me));
            }
        }
    }
}

impl Completion for LaneDone {
    fn complete(&self, _: &SubscriptionKey, _: Outcome) {
        self.credit_one();
    }
}

/// What the handler side owes an origin: an ack, or the credits of a lane.
enum AckItem {
    Ack(AckRecord),
    Credit(Arc<LaneDone>),
}

/// A finished delivery as the dedup window remembers it.
#[derive(Clone)]
struct Finished {
    code: AckCode,
    attempts: u32,
    error: String,
}

enum Seen {
    /// Being handled; the `(origin, delivery id)` it came with and those of copies that arrived
    /// meanwhile (rare: no allocation for the usual single one) wait for the outcome.
    Running((u64, u64), Vec<(u64, u64)>),
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
    /// Ingress side: the at-most-once lanes.
    lanes: Mutex<Lanes>,
    /// Handler side: the lanes of the origins, by (origin, lane).
    lanes_in: Mutex<IdMap<(u64, u64), Arc<LaneDone>>>,
    outboxes: Queues<Chunk>,
    ackboxes: Queues<AckItem>,
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
            lanes: Mutex::new(Lanes::default()),
            lanes_in: Mutex::new(IdMap::default()),
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
        let acked = items.iter().filter(|o| o.completion.is_some()).count();
        let mut next_id = self.next_id.fetch_add(acked as u64, Ordering::Relaxed);
        // At-most-once items: their lanes, one lookup per run of one window counter.
        let mut lanes = Vec::new();
        if acked < items.len() {
            let now = Instant::now();
            let mut table = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            let mut last: Option<(usize, u64)> = None;
            for o in items.iter().filter(|o| o.completion.is_none()) {
                let at = Arc::as_ptr(&o.load) as usize;
                let lane = match last {
                    Some((a, lane)) if a == at => lane,
                    _ => {
                        let t = &mut *table;
                        let lane = *t.by_load.entry(at).or_insert_with(|| {
                            // Random, like delivery ids: credits meant for this node's previous
                            // process cannot match.
                            let lane = rand::random::<u64>() | 1;
                            t.lanes.insert(
                                lane,
                                Lane {
                                    node,
                                    load: o.load.clone(),
                                    outstanding: 0,
                                    progress: now,
                                },
                            );
                            lane
                        });
                        last = Some((at, lane));
                        lane
                    }
                };
                if let Some(l) = table.lanes.get_mut(&lane) {
                    if l.outstanding == 0 {
                        l.progress = now;
                    }
                    l.outstanding += 1;
                }
                lanes.push(lane);
            }
        }
        let mut lanes = lanes.into_iter();
        let mut chunks = Vec::new();
        let mut chunk = Chunk::with_capacity(0);
        let mut ids = Vec::with_capacity(acked);
        for (i, o) in items.iter().enumerate() {
            if chunk.n > 0 && chunk.len() >= MAX_BATCH_BYTES {
                chunks.push(std::mem::replace(&mut chunk, Chunk::with_capacity(0)));
            }
            let out = chunk.bytes.deliveries_mut();
            if o.completion.is_some() {
                encode_delivery(next_id, &o.key.group, o.epoch, &o.event, out);
                ids.push(next_id);
                next_id += 1;
            } else {
                let lane = lanes.next().unwrap_or_default();
                encode_delivery_on(0, &o.key.group, o.epoch, lane, &o.event, out);
            }
            chunk.n += 1;
            if chunk.n == 1 {
                // Events of one call are alike: size the buffer from the first, so it is not
                // regrown (and copied) a dozen times.
                let one = chunk.len();
                let rest = (items.len() - i - 1).min(MAX_BATCH_BYTES / one.max(1));
                chunk.bytes.deliveries_mut().reserve(rest * (one + one / 8));
            }
        }
        chunks.push(chunk);
        if acked > 0 {
            let now = Instant::now();
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.reserve(acked);
            let acked_items = items
                .into_iter()
                .filter_map(|o| o.completion.map(|c| (o.key, o.event, o.load, c)));
            for (id, (key, event, load, completion)) in ids.into_iter().zip(acked_items) {
                pending.insert(
                    id,
                    Pending {
                        key,
                        event,
                        done: Arc::new(Once {
                            fired: AtomicBool::new(false),
                            inner: completion,
                        }),
                        node,
                        load: Some(load),
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
        self.queue_ack(origin, AckItem::Ack(record));
    }

    fn queue_ack(&self, origin: u64, item: AckItem) {
        let transport = self.transport.clone();
        let runtime = &self.runtime;
        self.ackboxes.push(origin, item, |rx| {
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
        if !batch.credits.is_empty() {
            let now = Instant::now();
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            for c in &batch.credits {
                if let Some(lane) = lanes.lanes.get_mut(&c.lane).filter(|l| l.node == from) {
                    lane.release(usize::try_from(c.n).unwrap_or(usize::MAX));
                    lane.progress = now;
                }
            }
        }
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

    /// Gives back the window units of lanes whose node turned unhealthy or that made no progress
    /// for `redeliver_after` (their deliveries are lost: at-most-once), and forgets idle lanes.
    fn sweep_lanes(&self) {
        let now = Instant::now();
        let mut table = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let mut forget = Vec::new();
        for (&id, lane) in table.lanes.iter_mut() {
            let idle = now.saturating_duration_since(lane.progress);
            if lane.outstanding > 0 && (idle >= self.config.redeliver_after || !self.health.peer(lane.node).routable())
            {
                tracing::debug!(
                    peer = lane.node,
                    lost = lane.outstanding,
                    "at-most-once deliveries not credited; their window units are given back"
                );
                lane.release(lane.outstanding);
                lane.progress = now;
            } else if lane.outstanding == 0 && idle >= IDLE_LANE {
                forget.push(id);
            }
        }
        for id in forget {
            if let Some(lane) = table.lanes.remove(&id) {
                table.by_load.remove(&(Arc::as_ptr(&lane.load) as usize));
            }
        }
    }

    /// Routes again every pending delivery that needs it.
    fn reroute(&self) {
        self.sweep_lanes();
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
                        let i = match resend.iter().position(|(n, c)| *n == node && c.len() < MAX_BATCH_BYTES) {
                            Some(i) => i,
                            None => {
                                resend.push((node, Chunk::with_capacity(0)));
                                resend.len() - 1
                            }
                        };
                        let chunk = &mut resend[i].1;
                        encode_delivery(id, &p.key.group, route.epoch, &p.event, chunk.bytes.deliveries_mut());
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

    /// The handler side of `origin`'s `lane` (kept in `cache` while batches use one lane).
    fn lane_in(&self, origin: u64, lane: u64, cache: &mut Option<Arc<LaneDone>>) -> Arc<LaneDone> {
        if let Some(l) = cache.as_ref().filter(|l| l.lane == lane) {
            return l.clone();
        }
        let l = self
            .lanes_in
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((origin, lane))
            .or_insert_with(|| {
                Arc::new_cyclic(|me| LaneDone {
                    me: me.clone(),
                    relay: self.me.clone(),
                    origin,
                    lane,
                    done: AtomicU64::new(0),
                })
            })
            .clone();
        *cache = Some(l.clone());
        l
    }

    /// An at-most-once delivery: no dedup window (the origin never re-sends it) and no ack; its
    /// lane is credited once it is handled, or at once when it cannot be (it is then dropped).
    async fn accept_once(&self, from: u64, d: Forwarded, cache: &mut Lookup, lane: &mut Option<Arc<LaneDone>>) {
        let done = self.lane_in(from, d.lane, lane);
        let Some(record) = d.event else {
            return done.credit_one();
        };
        let Some(sub) = self.lookup(cache, &record.topic, &d.group) else {
            tracing::debug!(peer = from, topic = %record.topic, group = %d.group, epoch = d.epoch, "at-most-once delivery for a subscription this node does not run; dropped");
            return done.credit_one();
        };
        let job = Job {
            event: Arc::new(Event::from(record)),
            completion: done,
            origin: Some((from, 0)),
        };
        let job = match sub.try_send(job) {
            Ok(()) => return,
            Err(job) => job,
        };
        if let Err(job) = sub.send_waiting(job.event.key.clone().as_deref(), job).await {
            job.completion.complete(&sub.shared.key, Outcome::Ok { attempts: 0 });
        }
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
                Some(Seen::Running(_, more)) => {
                    more.push((from, d.id));
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
                    dedup.map.insert(dedup_key, Seen::Running((from, d.id), Vec::new()));
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
        if let Some((_, 0)) = job.origin {
            // At-most-once: dropped; its lane is credited.
            tracing::debug!(subscription = %key, id = %job.event.id, "placement moved: at-most-once event dropped");
            return job.completion.complete(key, Outcome::Ok { attempts: 0 });
        }
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
            Some(Seen::Running(first, more)) => std::iter::once(first).chain(more).collect(),
            _ => job.origin.into_iter().collect::<Vec<_>>(),
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
                Seen::Running(first, more) => (Some(first), more),
                _ => (None, Vec::new()),
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
        for (origin, id) in waiting.0.into_iter().chain(waiting.1) {
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

/// Drains one peer's outbox into event batches: a large chunk (one publish call's events) is
/// sent as its own envelope, straight from the buffer it was encoded into; runs of small ones are
/// copied together into one envelope of up to [`MAX_BATCH_BYTES`].
async fn send_events(transport: Transport, node: u64, mut rx: mpsc::UnboundedReceiver<Chunk>) {
    let counter = metrics::counter!(crate::metrics::EVENTS_FORWARDED, "peer" => node.to_string());
    let send = |payload: Bytes, n: usize| {
        let transport = &transport;
        let counter = &counter;
        async move {
            match transport.send_async(node, Envelope::app(payload)).await {
                Ok(()) => counter.increment(n as u64),
                // Still pending at the origin: redelivered after the timeout or when re-routed.
                Err(e) => tracing::debug!(peer = node, error = %e, "cannot forward events"),
            }
        }
    };
    let mut buf = Vec::with_capacity(64);
    let mut small: Vec<Chunk> = Vec::new();
    let mut small_bytes = 0;
    while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
        for chunk in buf.drain(..) {
            let len = chunk.len();
            if !small.is_empty() && (len >= OWN_ENVELOPE_BYTES || small_bytes + len > MAX_BATCH_BYTES) {
                let (payload, n) = small_message(&mut small);
                small_bytes = 0;
                send(payload, n).await;
            }
            if len < OWN_ENVELOPE_BYTES {
                small_bytes += len;
                small.push(chunk);
            } else {
                let n = chunk.n;
                send(chunk.bytes.finish(), n).await;
            }
        }
        if !small.is_empty() {
            let (payload, n) = small_message(&mut small);
            small_bytes = 0;
            send(payload, n).await;
        }
    }
}

/// One `PeerMessage` holding the deliveries of `chunks` (emptied), and how many there are.
fn small_message(chunks: &mut Vec<Chunk>) -> (Bytes, usize) {
    let n = chunks.iter().map(|c| c.n).sum();
    let payload = if chunks.len() == 1 {
        chunks.pop().map(|c| c.bytes.finish()).unwrap_or_default()
    } else {
        Bytes::from(peer_message_events(chunks.iter().map(|c| c.bytes.body())))
    };
    chunks.clear();
    (payload, n)
}

/// Drains the acks and lane credits owed to one origin into ack batches.
async fn send_acks(transport: Transport, origin: u64, mut rx: mpsc::UnboundedReceiver<AckItem>) {
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut buf, MAX_BATCH * 8).await > 0 {
        let mut batch = AckBatch::default();
        for item in buf.drain(..) {
            match item {
                AckItem::Ack(record) => batch.acks.push(record),
                AckItem::Credit(lane) => {
                    let n = lane.done.swap(0, Ordering::AcqRel);
                    if n > 0 {
                        batch.credits.push(LaneCredit { lane: lane.lane, n });
                    }
                }
            }
        }
        if batch.acks.is_empty() && batch.credits.is_empty() {
            continue;
        }
        let env = Envelope::app(
            PeerMessage {
                body: Some(peer_message::Body::Acks(batch)),
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
    let mut lane = None;
    while let Some(batch) = rx.recv().await {
        let Some(relay) = relay.upgrade() else { return };
        for d in Deliveries(batch) {
            match d {
                Ok(d) if d.lane != 0 => relay.accept_once(from, d, &mut cache, &mut lane).await,
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
