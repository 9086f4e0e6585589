//! The receiving side: deliveries other nodes forwarded to this node's instances.
//!
//! Owns the per-origin inboxes and their tasks (batches from one origin are handled in order, so
//! a key's order survives the hop; an inbox holds [`INBOX`] batches, and a full one makes the
//! relay wait, which stops the events channel reading: backpressure, not drops), placement fencing (a delivery for a subscription this node
//! runs no instance of is refused with [`AckCode::NotPlaced`]), the dedup window, the handler
//! side of the at-most-once lanes, and the per-origin ack queues and their tasks.
//!
//! Completions tell it nothing through a pointer to it: a forwarded job's completion
//! ([`Handled`]) and an at-most-once lane's ([`LaneDone`]) hold the sender of their origin's ack
//! queue, and the ack task records the outcome in the dedup window (one lock per batch) and
//! answers every copy that waited for it.
//!
//! **One dedup rule, whatever the path.** The node that hosts an instance de-duplicates by
//! `(subscription, event id)`: the same window serves deliveries forwarded by other nodes and
//! events published on this node for its own instances ([`Inbound::seen_here`], called by the
//! ingress once per publish call, one lock for all of its local copies). A local copy that is new
//! runs with a [`SeenHere`] completion, which tells the publisher's tracker at once and hands the
//! outcome to the *local outcomes* task, which records it in the window (one lock per batch, like
//! the ack tasks) and answers the copies that waited. At-most-once (`ack=none`) events skip the
//! window on both paths.
//!
//! Must not: keep or re-send deliveries (the origin does), or route events anywhere but to this
//! node's instances.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;

use super::dedup::{Check, Dedup, DedupKey, Finished};
use super::Net;
use super::{IdMap, Queues};
use crate::event::Event;
use crate::handler::supervisor::{Completion, Done, Job, Origin, Outcome};
use crate::proto::{peer_message, AckBatch, AckCode, AckRecord, Incoming, Incomings, LaneCredit, PeerMessage};
use crate::router::{Router, RoutingTable, SubRuntime};
use crate::transport::Envelope;
use crate::types::SubscriptionKey;

/// At most this many acks are taken from an ack queue per batch (times eight).
const MAX_BATCH: usize = 1024;

/// Batches an origin's inbox holds before [`Inbound::on_events`] waits for room.
const INBOX: usize = 64;

/// New lanes between two prunings of [`LanesIn`], at least (or as many as it holds).
const LANES_PRUNE_EVERY: usize = 1024;

/// Why a delivery is refused (answered with [`AckCode::NotPlaced`], so its origin routes it again
/// by the current placement). The text goes back in the ack, for the origin's logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Refusal {
    #[error("a delivery without an event")]
    NoEvent,
    #[error("node holds no instance of {key} (placement epoch {placement}, delivery epoch {delivery})")]
    NotPlaced {
        key: SubscriptionKey,
        /// The epoch of the subscription's placement here; 0 when it has none.
        placement: u64,
        delivery: u64,
    },
    #[error("subscription {0} stopped on this node")]
    Stopped(SubscriptionKey),
    #[error("placement of {0} moved away from this node before it ran the event")]
    Moved(SubscriptionKey),
}

impl Refusal {
    /// The ack that refuses delivery `id`.
    pub(super) fn ack(&self, id: u64) -> AckRecord {
        AckRecord {
            id,
            code: AckCode::NotPlaced as i32,
            attempts: 0,
            error: self.to_string(),
        }
    }
}

/// What a delivery's subscription lookup decided (fencing): run it on `sub`, or refuse it.
pub(super) fn fence<S>(
    sub: Option<S>,
    topic: &str,
    group: &str,
    delivery_epoch: u64,
    placement_epoch: impl FnOnce(&SubscriptionKey) -> Option<u64>,
) -> Result<S, Refusal> {
    sub.ok_or_else(|| {
        let key = SubscriptionKey {
            topic: topic.to_string(),
            group: group.to_string(),
        };
        Refusal::NotPlaced {
            placement: placement_epoch(&key).unwrap_or(0),
            key,
            delivery: delivery_epoch,
        }
    })
}

/// The ack answering a delivery with what its subscription did.
fn finished(outcome: Outcome) -> Finished {
    match outcome {
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
    }
}

fn answer(id: u64, f: &Finished) -> AckRecord {
    AckRecord {
        id,
        code: f.code as i32,
        attempts: f.attempts,
        error: f.error.clone(),
    }
}

/// The sender of one origin's ack queue.
type AckSender = mpsc::UnboundedSender<AckItem>;

/// What the receiving side owes an origin.
pub(super) enum AckItem {
    /// An ack, ready to send.
    Ack(AckRecord),
    /// A forwarded delivery finished: record it in the dedup window and ack every copy.
    Handled { dedup: DedupKey, outcome: Outcome },
    /// A lane has deliveries done and not yet credited (the counter is taken when sending).
    Credit { lane: u64, done: Arc<AtomicU64> },
}

/// One copy of a running delivery, waiting for its outcome.
enum Waiter {
    /// Forwarded by `origin` as `delivery`: acked through `acks`.
    Peer {
        origin: u64,
        delivery: u64,
        acks: AckSender,
    },
    /// Published on this node: its completion (the publisher's tracker) is told the outcome. The
    /// event is kept so that it can be routed anew if the copy that runs is handed back.
    Here(LocalCopy),
    /// The copy published here that runs: its own [`SeenHere`] completion tells its publisher.
    Running,
}

/// A copy of an event published on this node for one of this node's instances (see
/// [`Inbound::seen_here`]).
pub(crate) struct LocalCopy {
    pub(crate) key: Arc<SubscriptionKey>,
    pub(crate) event: Arc<Event>,
    pub(crate) completion: Arc<dyn Completion>,
}

/// An event to route anew (parked with the sending side), with its completion.
pub(super) type Repark = (Arc<SubscriptionKey>, Arc<Event>, Arc<dyn Completion>);

impl Waiter {
    /// Answers this copy with `f`: an ack for a peer's copy (pushed to `batch` when it is for
    /// `origin`), the completion for one published here.
    fn answer(self, f: &Finished, origin: Option<u64>, batch: &mut AckBatch) {
        match self {
            Waiter::Peer {
                origin: o, delivery, ..
            } if Some(o) == origin => batch.acks.push(answer(delivery, f)),
            Waiter::Peer { delivery, acks, .. } => {
                let _ = acks.send(AckItem::Ack(answer(delivery, f)));
            }
            Waiter::Here(copy) => copy.completion.complete(&copy.key, outcome(f)),
            Waiter::Running => {}
        }
    }

    /// A copy that will not be answered from this window (the one that ran was handed back):
    /// a peer's copy is re-sent by its origin after its timeout; one published here is routed
    /// anew through `repark`.
    fn release(self, repark: &mpsc::UnboundedSender<Repark>) {
        if let Waiter::Here(copy) = self {
            if let Err(mpsc::error::SendError((key, _, completion))) =
                repark.send((copy.key, copy.event, copy.completion))
            {
                // Only once the relay's runtime stopped: the event stays in the WAL.
                completion.complete(
                    &key,
                    Outcome::Failed {
                        attempts: 0,
                        error: "the node is stopping".into(),
                    },
                );
            }
        }
    }
}

/// The outcome a finished delivery's later copies are answered with.
fn outcome(f: &Finished) -> Outcome {
    match f.code {
        AckCode::DeadLettered => Outcome::DeadLettered {
            attempts: f.attempts,
            error: f.error.clone(),
        },
        AckCode::Failed | AckCode::NotPlaced => Outcome::Failed {
            attempts: f.attempts,
            error: f.error.clone(),
        },
        AckCode::Ok => Outcome::Ok { attempts: f.attempts },
    }
}

/// The completion of a copy published here that runs here: tells the publisher's tracker at once,
/// then hands the outcome to the local outcomes task to record in the window.
struct SeenHere {
    inner: Arc<dyn Completion>,
    dedup: DedupKey,
    done: mpsc::UnboundedSender<(DedupKey, Outcome)>,
}

impl Completion for SeenHere {
    fn complete(&self, sub: &SubscriptionKey, outcome: Outcome) {
        self.inner.complete(sub, outcome.clone());
        // Fails only once the relay's runtime stopped (nothing is recorded any more).
        let _ = self.done.send((self.dedup, outcome));
    }
}

/// The window as the receiving side keeps it: shared by the origins' receiving tasks (which
/// check it) and ack tasks (which record outcomes).
type Window = Arc<Mutex<Dedup<Waiter>>>;

/// The receiving side of one node.
pub(super) struct Inbound {
    transport: Net,
    router: Arc<Router>,
    /// Where the inbox and ack tasks run (the relay's runtime: `herald-events` in a node).
    runtime: tokio::runtime::Handle,
    /// The lanes of the origins, by (origin, lane).
    lanes: Mutex<LanesIn>,
    acks: Queues<AckItem>,
    /// Each origin's inbox (bounded, [`INBOX`] batches), drained by its own task.
    inboxes: Inboxes,
    dedup: Window,
    deduplicated: metrics::Counter,
    /// Outcomes of copies published here, for the local outcomes task.
    local_done: mpsc::UnboundedSender<(DedupKey, Outcome)>,
    /// Copies published here to route anew (the front parks them with the sending side).
    repark: mpsc::UnboundedSender<Repark>,
}

impl Inbound {
    pub(super) fn new(
        transport: Net,
        router: Arc<Router>,
        dedup_window: usize,
        runtime: tokio::runtime::Handle,
        repark: mpsc::UnboundedSender<Repark>,
    ) -> Inbound {
        let dedup: Window = Arc::new(Mutex::new(Dedup::new(dedup_window)));
        let (local_done, outcomes) = mpsc::unbounded_channel();
        runtime.spawn(record_local(outcomes, dedup.clone()));
        Inbound {
            transport,
            router,
            runtime,
            lanes: Mutex::new(LanesIn::default()),
            acks: Queues::new(),
            inboxes: Inboxes::default(),
            dedup,
            deduplicated: metrics::counter!(crate::metrics::EVENTS_DEDUPLICATED),
            local_done,
            repark,
        }
    }

    /// Forgets what the window remembers of `event_id` for `key` (a dead letter replayed by an
    /// operator must run again, not be answered with its old outcome).
    pub(crate) fn forget(&self, key: &SubscriptionKey, event_id: &str) {
        let k = self.dedup.lock().unwrap_or_else(|p| p.into_inner()).key(key, event_id);
        self.release(k);
    }

    /// Forgets `key` in the window and releases the copies that waited for it (see
    /// [`Waiter::release`]), outside the lock.
    fn release(&self, key: DedupKey) {
        let waiting: Vec<Waiter> = self
            .dedup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(key)
            .collect();
        for w in waiting {
            w.release(&self.repark);
        }
    }

    /// Copies of events published on this node for its own instances, checked against the dedup
    /// window under one lock for all of them. Returns, per copy in order, the completion to run
    /// it with, or `None` when it must not run: a copy of it finished (its completion was told
    /// that outcome) or is running (its completion is told when that one finishes).
    pub(crate) fn seen_here(&self, copies: Vec<LocalCopy>) -> Vec<Option<Arc<dyn Completion>>> {
        let mut run = Vec::with_capacity(copies.len());
        let mut answered = Vec::new();
        {
            let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
            for copy in copies {
                let key = dedup.key(&copy.key, &copy.event.id);
                let mut waiting = Some(copy);
                let check = dedup.check_by(key, |first| match first {
                    true => Waiter::Running,
                    false => Waiter::Here(waiting.take().expect("made once")),
                });
                match (check, waiting) {
                    (Check::New, Some(copy)) => run.push(Some(Arc::new(SeenHere {
                        inner: copy.completion,
                        dedup: key,
                        done: self.local_done.clone(),
                    }) as Arc<dyn Completion>)),
                    (Check::Done(f), Some(copy)) => {
                        answered.push((copy, f));
                        run.push(None);
                    }
                    // Running: the copy waits in the window for the outcome.
                    _ => run.push(None),
                }
            }
        }
        let dropped = run.iter().filter(|r| r.is_none()).count();
        if dropped > 0 {
            self.deduplicated.increment(dropped as u64);
        }
        // Told outside the lock: a tracker's last completion writes to the store's queue.
        for (copy, f) in answered {
            copy.completion.complete(&copy.key, outcome(&f));
        }
        run
    }

    /// A batch of deliveries from `from`: queued for the origin's task, which handles its
    /// batches in order. Waits while the origin's inbox is full (its handlers are slow): the
    /// caller, the relay's dispatch loop, then stops taking payloads from the bus, whose events
    /// connections stop reading, down to the senders (backpressure; nothing is dropped). Acks
    /// and dead-letter requests arriving meanwhile wait behind it too (one sink per node): the
    /// price of bounding what a peer can make this node hold.
    pub(super) async fn on_events(self: &Arc<Self>, from: u64, batch: Bytes) {
        let start = |rx| {
            self.runtime.spawn(receive_events(self.clone(), from, rx));
        };
        self.inboxes.push(from, batch, start).await;
    }

    /// The sender of `origin`'s ack queue (its task started on first use).
    fn ack_sender(&self, origin: u64) -> AckSender {
        let (transport, dedup, runtime) = (&self.transport, &self.dedup, &self.runtime);
        self.acks.sender(origin, |rx| {
            runtime.spawn(send_acks(transport.clone(), origin, rx, dedup.clone()));
        })
    }

    fn ack(&self, origin: u64, record: AckRecord) {
        let _ = self.ack_sender(origin).send(AckItem::Ack(record));
    }

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

    /// The receiving side of `origin`'s `lane` (kept in `cache` while batches use one lane).
    fn lane(&self, origin: u64, lane: u64, cache: &mut Option<Arc<LaneDone>>) -> Arc<LaneDone> {
        if let Some(l) = cache.as_ref().filter(|l| l.lane == lane) {
            return l.clone();
        }
        let l = self
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(origin, lane, || {
                Arc::new(LaneDone {
                    acks: self.ack_sender(origin),
                    lane,
                    done: Arc::new(AtomicU64::new(0)),
                })
            });
        *cache = Some(l.clone());
        l
    }

    /// An at-most-once delivery: no dedup window (the origin never re-sends it) and no ack; its
    /// lane is credited once it is handled, or at once when it cannot be (it is then dropped).
    async fn accept_once(&self, from: u64, mut d: Incoming, cache: &mut Lookup, lane: &mut Option<Arc<LaneDone>>) {
        let done = self.lane(from, d.lane, lane);
        let Some(event) = d.event.take() else {
            return done.credit_one();
        };
        let Some(sub) = self.lookup(cache, &event.topic, d.group()) else {
            tracing::debug!(peer = from, topic = %event.topic, group = %d.group(), epoch = d.epoch, "at-most-once delivery for a subscription this node does not run; dropped");
            return done.credit_one();
        };
        let job = Job {
            event,
            done: Done::Tell(done),
            origin: Origin::AtMostOnce { from, lane: d.lane },
        };
        let job = match sub.try_send(job) {
            Ok(()) => return,
            Err(job) => job,
        };
        if let Err(Job {
            done: Done::Tell(done), ..
        }) = sub.send_waiting(job.event.key.clone().as_deref(), job).await
        {
            // The instance stopped: dropped (at-most-once), its lane credited.
            done.complete(&sub.shared.key, Outcome::Ok { attempts: 0 });
        }
    }

    /// A delivery the origin keeps until acked: fenced, deduplicated, then handed to the
    /// instance.
    async fn accept(&self, from: u64, mut d: Incoming, cache: &mut Lookup) {
        let Some(event) = d.event.take() else {
            return self.ack(from, Refusal::NoEvent.ack(d.id));
        };
        let sub = self.lookup(cache, &event.topic, d.group());
        let sub = match fence(sub, &event.topic, d.group(), d.epoch, |key| {
            self.router.table().route(key).map(|r| r.epoch)
        }) {
            Ok(sub) => sub,
            Err(refusal) => return self.ack(from, refusal.ack(d.id)),
        };
        let key = &sub.shared.key;
        let acks = self.ack_sender(from);
        let dedup_key;
        {
            let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
            dedup_key = dedup.key(key, &event.id);
            let waiter = Waiter::Peer {
                origin: from,
                delivery: d.id,
                acks: acks.clone(),
            };
            match dedup.check(dedup_key, waiter) {
                Check::New => {}
                Check::Running => {
                    drop(dedup);
                    self.deduplicated.increment(1);
                    return;
                }
                Check::Done(f) => {
                    drop(dedup);
                    self.deduplicated.increment(1);
                    let _ = acks.send(AckItem::Ack(answer(d.id, &f)));
                    return;
                }
            }
        }
        let job = Job {
            event,
            done: Done::Tell(Arc::new(Handled { acks, dedup: dedup_key })),
            origin: Origin::Forwarded { from, delivery: d.id },
        };
        // Straight into the mailbox when it has room; wait (in order) only when it is full.
        let job = match sub.try_send(job) {
            Ok(()) => return,
            Err(job) => job,
        };
        if sub.send_waiting(job.event.key.clone().as_deref(), job).await.is_err() {
            // Copies that arrived meanwhile are re-sent by their origins after the timeout (or,
            // published here, routed anew).
            self.release(dedup_key);
            self.ack(from, Refusal::Stopped((**key).clone()).ack(d.id));
        }
    }

    /// Delivery `delivery` of event `event_id` from `from`, queued for `key` here, will not run
    /// here because the placement moved (see [`crate::handler::supervisor::Retired`]): it is
    /// refused back to every origin that waits for it, which routes it by the new placement.
    pub(super) fn retired(&self, key: &SubscriptionKey, event_id: &str, from: u64, delivery: u64) {
        let refusal = Refusal::Moved(key.clone());
        let waiting: Vec<Waiter> = {
            let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
            let k = dedup.key(key, event_id);
            dedup.forget(k).collect()
        };
        if !waiting.iter().any(|w| matches!(w, Waiter::Peer { .. })) {
            self.ack(from, refusal.ack(delivery));
        }
        refuse_waiting(waiting, &refusal, &self.repark);
    }
}

/// Answers the copies that waited for a delivery handed back ([`Inbound::retired`]): each peer's
/// copy is refused with `refusal` through its origin's ack queue (the origin routes it again),
/// and a copy published here is routed anew (see [`Waiter::release`]).
fn refuse_waiting(waiting: Vec<Waiter>, refusal: &Refusal, repark: &mpsc::UnboundedSender<Repark>) {
    for w in waiting {
        match w {
            Waiter::Peer { delivery, acks, .. } => {
                let _ = acks.send(AckItem::Ack(refusal.ack(delivery)));
            }
            other => other.release(repark),
        }
    }
}

/// The completion of a forwarded delivery on this node: its outcome goes to the origin's ack
/// task, which records it and acks every copy.
struct Handled {
    acks: AckSender,
    dedup: DedupKey,
}

impl Completion for Handled {
    fn complete(&self, _: &SubscriptionKey, outcome: Outcome) {
        // Fails only once the relay's runtime stopped: the origin re-sends after its timeout.
        let _ = self.acks.send(AckItem::Handled {
            dedup: self.dedup,
            outcome,
        });
    }
}

/// The receiving side of one origin's lane: at-most-once deliveries finished (or dropped) and not
/// yet credited back. Shared by all of the lane's jobs as their completion, so an at-most-once
/// delivery costs no allocation and no ack of its own: the first completion after a credit
/// queues the lane once, and the ack task sends however many finished by then.
pub(super) struct LaneDone {
    acks: AckSender,
    lane: u64,
    done: Arc<AtomicU64>,
}

impl LaneDone {
    /// One more delivery of the lane is done (handled, failed, or dropped).
    fn credit_one(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) == 0 {
            let _ = self.acks.send(AckItem::Credit {
                lane: self.lane,
                done: self.done.clone(),
            });
        }
    }
}

impl Completion for LaneDone {
    fn complete(&self, _: &SubscriptionKey, _: Outcome) {
        self.credit_one();
    }
}

/// The receiving side's at-most-once lanes by (origin, lane). Lane ids come from the origins, so
/// the map is pruned: every [`LANES_PRUNE_EVERY`] new lanes (or as many as the last pruning kept,
/// so pruning costs O(1) per new lane), it forgets the lanes nothing refers to any more (no job of theirs
/// waits or runs, no receiving task caches them) and with nothing left to credit. That covers
/// idle lanes and the lanes of origins that left: the map holds at most about twice the lanes in
/// use plus [`LANES_PRUNE_EVERY`]. A forgotten lane that is used again starts afresh; its credits
/// are counts, so nothing is lost.
#[derive(Default)]
struct LanesIn {
    lanes: IdMap<(u64, u64), Arc<LaneDone>>,
    /// Lanes added since the last pruning.
    added: usize,
    /// Lanes the last pruning kept.
    kept: usize,
}

impl LanesIn {
    /// `origin`'s `lane`, made with `make` when it is new.
    fn get(&mut self, origin: u64, lane: u64, make: impl FnOnce() -> Arc<LaneDone>) -> Arc<LaneDone> {
        if let Some(l) = self.lanes.get(&(origin, lane)) {
            return l.clone();
        }
        self.added += 1;
        if self.added >= LANES_PRUNE_EVERY.max(self.kept) {
            self.prune();
        }
        let l = make();
        self.lanes.insert((origin, lane), l.clone());
        l
    }

    /// Forgets the lanes only this map refers to, with nothing left to credit.
    fn prune(&mut self) {
        self.added = 0;
        self.lanes
            .retain(|_, l| Arc::strong_count(l) > 1 || l.done.load(Ordering::Acquire) > 0);
        self.kept = self.lanes.len();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lanes.len()
    }
}

/// The receiving side's last subscription lookup: (table snapshot, key, this node's instances).
type Lookup = Option<(Arc<RoutingTable>, SubscriptionKey, Option<Arc<SubRuntime>>)>;

/// Handles one origin's batches in order. Each batch is decoded one delivery at a time, as it is
/// handed over. Runs until the relay's runtime stops (the node's shutdown).
async fn receive_events(inbound: Arc<Inbound>, from: u64, mut rx: mpsc::Receiver<Bytes>) {
    let mut cache = None;
    let mut lane = None;
    while let Some(batch) = rx.recv().await {
        for d in Incomings::new(batch) {
            match d {
                Ok(d) if d.lane != 0 => inbound.accept_once(from, d, &mut cache, &mut lane).await,
                Ok(d) => inbound.accept(from, d, &mut cache).await,
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

/// Drains the acks, outcomes and lane credits owed to one origin into ack batches.
async fn send_acks(transport: Net, origin: u64, mut rx: mpsc::UnboundedReceiver<AckItem>, dedup: Window) {
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut buf, MAX_BATCH * 8).await > 0 {
        let batch = ack_batch(origin, buf.drain(..), &dedup);
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

/// The ack batch for `origin` from the items its queue held. Outcomes are recorded in the dedup
/// window under one lock for all of them; a copy that came from another origin is answered
/// through that origin's queue.
fn ack_batch(origin: u64, items: impl Iterator<Item = AckItem>, dedup: &Mutex<Dedup<Waiter>>) -> AckBatch {
    let mut batch = AckBatch::default();
    let mut handled = Vec::new();
    for item in items {
        match item {
            AckItem::Ack(record) => batch.acks.push(record),
            AckItem::Handled { dedup, outcome } => handled.push((dedup, outcome)),
            AckItem::Credit { lane, done } => {
                let n = done.swap(0, Ordering::AcqRel);
                if n > 0 {
                    batch.credits.push(LaneCredit { lane, n });
                }
            }
        }
    }
    if !handled.is_empty() {
        let mut window = dedup.lock().unwrap_or_else(|p| p.into_inner());
        for (key, outcome) in handled {
            let f = finished(outcome);
            for w in window.finish(key, f.clone()) {
                w.answer(&f, Some(origin), &mut batch);
            }
        }
    }
    batch
}

/// Records the outcomes of copies published here that ran here (the [`SeenHere`] completions)
/// in the dedup window, one lock per batch, and answers the copies that waited for them. Runs
/// until the relay's runtime stops.
async fn record_local(mut rx: mpsc::UnboundedReceiver<(DedupKey, Outcome)>, dedup: Window) {
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut buf, MAX_BATCH * 8).await > 0 {
        let mut batch = AckBatch::default();
        {
            let mut window = dedup.lock().unwrap_or_else(|p| p.into_inner());
            for (key, outcome) in buf.drain(..) {
                let f = finished(outcome);
                for w in window.finish(key, f.clone()) {
                    w.answer(&f, None, &mut batch);
                }
            }
        }
        debug_assert!(
            batch.acks.is_empty(),
            "no origin: peers' copies are sent to their queues"
        );
    }
}

/// Each origin's inbox of delivery batches: bounded ([`INBOX`] batches), drained in order by a
/// task that `start` is given the receiver for when the origin's first batch arrives (or the
/// first after its task ended).
#[derive(Default)]
struct Inboxes(std::sync::RwLock<IdMap<u64, mpsc::Sender<Bytes>>>);

impl Inboxes {
    /// Queues `batch` in `from`'s inbox, waiting while it is full: backpressure, never a drop
    /// (unless the draining task is gone, when the runtime stopped; the origin re-sends).
    async fn push(&self, from: u64, batch: Bytes, start: impl FnOnce(mpsc::Receiver<Bytes>)) {
        let tx = self.sender(from, start);
        let batch = match tx.try_send(batch) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(batch)) => batch,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        };
        let _ = tx.send(batch).await;
    }

    fn sender(&self, from: u64, start: impl FnOnce(mpsc::Receiver<Bytes>)) -> mpsc::Sender<Bytes> {
        let open = |map: &IdMap<u64, mpsc::Sender<Bytes>>| map.get(&from).filter(|tx| !tx.is_closed()).cloned();
        if let Some(tx) = open(&self.0.read().unwrap_or_else(|p| p.into_inner())) {
            return tx;
        }
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = open(&map) {
            return tx;
        }
        let (tx, rx) = mpsc::channel(INBOX);
        start(rx);
        map.insert(from, tx.clone());
        tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_origins_inbox_holds_inbox_batches_then_the_sender_waits_and_nothing_is_dropped() {
        use futures_util::FutureExt;
        let inboxes = Inboxes::default();
        let mut started = Vec::new();
        let batch = |i: usize| Bytes::from(i.to_be_bytes().to_vec());
        for i in 0..INBOX {
            let pushed = inboxes.push(7, batch(i), |rx| started.push(rx)).now_or_never();
            assert!(pushed.is_some(), "batch {i} of {INBOX} is queued at once");
        }
        assert_eq!(started.len(), 1, "one task per origin");
        let mut rx = started.pop().unwrap();
        // Full: the next one waits (its caller stops reading from the peer) …
        let mut waiting = Box::pin(inboxes.push(7, batch(INBOX), |_| panic!("no second task")));
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "a full inbox makes the sender wait"
        );
        // … another origin has an inbox of its own …
        let mut other = Vec::new();
        assert!(inboxes.push(8, batch(0), |rx| other.push(rx)).now_or_never().is_some());
        assert_eq!(other.len(), 1);
        // … and once the task takes one, the waiting batch gets in, after the others.
        assert_eq!(rx.recv().await, Some(batch(0)));
        waiting.await;
        let mut got = vec![0];
        while let Ok(b) = rx.try_recv() {
            got.push(usize::from_be_bytes(b[..].try_into().unwrap()));
        }
        assert_eq!(got, (0..=INBOX).collect::<Vec<_>>(), "every batch, in order");
        // A task that ended (its receiver dropped) is started again by the next batch.
        drop(rx);
        let mut again = Vec::new();
        assert!(inboxes.push(7, batch(0), |rx| again.push(rx)).now_or_never().is_some());
        assert_eq!(again.len(), 1, "a fresh inbox and task");
    }

    #[test]
    fn a_delivery_for_a_subscription_not_run_here_is_refused_as_not_placed() {
        let refusal = fence(None::<()>, "orders", "billing", 3, |key| {
            assert_eq!(key.group, "billing");
            Some(5)
        })
        .unwrap_err();
        assert_eq!(
            refusal,
            Refusal::NotPlaced {
                key: SubscriptionKey {
                    topic: "orders".into(),
                    group: "billing".into()
                },
                placement: 5,
                delivery: 3,
            }
        );
        let ack = refusal.ack(42);
        assert_eq!((ack.id, ack.code, ack.attempts), (42, AckCode::NotPlaced as i32, 0));
        assert!(
            ack.error.contains("placement epoch 5, delivery epoch 3"),
            "{}",
            ack.error
        );
    }

    #[test]
    fn a_subscription_with_no_placement_at_all_is_refused_with_epoch_zero() {
        let refusal = fence(None::<()>, "orders", "billing", 3, |_| None).unwrap_err();
        assert!(matches!(refusal, Refusal::NotPlaced { placement: 0, .. }));
    }

    #[test]
    fn a_delivery_for_a_subscription_run_here_passes_the_fence() {
        assert_eq!(fence(Some(7), "orders", "billing", 3, |_| unreachable!()), Ok(7));
    }

    fn waiter(origin: u64, delivery: u64, acks: &AckSender) -> Waiter {
        Waiter::Peer {
            origin,
            delivery,
            acks: acks.clone(),
        }
    }

    #[test]
    fn an_outcome_acks_every_copy_each_to_its_origin_and_later_copies_from_the_window() {
        let window = Mutex::new(Dedup::new(8));
        let (to_a, _a) = mpsc::unbounded_channel();
        let (to_b, mut b) = mpsc::unbounded_channel();
        let sub = SubscriptionKey {
            topic: "orders".into(),
            group: "billing".into(),
        };
        let key = window.lock().unwrap().key(&sub, "e1");
        // Node 1 sent it as delivery 10 (twice: a re-send), node 2 as delivery 20.
        assert_eq!(window.lock().unwrap().check(key, waiter(1, 10, &to_a)), Check::New);
        assert_eq!(window.lock().unwrap().check(key, waiter(1, 11, &to_a)), Check::Running);
        assert_eq!(window.lock().unwrap().check(key, waiter(2, 20, &to_b)), Check::Running);
        let outcome = Outcome::Ok { attempts: 1 };
        let batch = ack_batch(1, [AckItem::Handled { dedup: key, outcome }].into_iter(), &window);
        let ids: Vec<_> = batch.acks.iter().map(|a| (a.id, a.code)).collect();
        assert_eq!(ids, vec![(10, AckCode::Ok as i32), (11, AckCode::Ok as i32)]);
        match b.try_recv() {
            Ok(AckItem::Ack(a)) => assert_eq!((a.id, a.code), (20, AckCode::Ok as i32)),
            _ => panic!("node 2's copy is acked through its own queue"),
        }
        // A copy arriving later is answered from the window.
        assert_eq!(
            window.lock().unwrap().check(key, waiter(2, 21, &to_b)),
            Check::Done(finished(Outcome::Ok { attempts: 1 }))
        );
    }

    /// Remembers the outcomes it is told.
    #[derive(Default)]
    struct Told(Mutex<Vec<Outcome>>);

    impl Completion for Told {
        fn complete(&self, _: &SubscriptionKey, outcome: Outcome) {
            self.0.lock().unwrap().push(outcome);
        }
    }

    /// One window for both paths: a copy published here that waits for a forwarded copy is told
    /// its outcome, and one handed back (the forwarded copy was refused) is routed anew.
    #[test]
    fn a_copy_published_here_waits_for_a_forwarded_one_and_is_rerouted_if_it_is_handed_back() {
        let window = Mutex::new(Dedup::new(8));
        let (to_a, _a) = mpsc::unbounded_channel();
        let sub = Arc::new(SubscriptionKey {
            topic: "orders".into(),
            group: "billing".into(),
        });
        let copy = |told: &Arc<Told>| LocalCopy {
            key: sub.clone(),
            event: Arc::new(Event::new("orders", "{}", "application/json")),
            completion: told.clone(),
        };
        let (here, later) = (Arc::new(Told::default()), Arc::new(Told::default()));
        let key = window.lock().unwrap().key(&sub, "e1");
        assert_eq!(window.lock().unwrap().check(key, waiter(1, 10, &to_a)), Check::New);
        assert_eq!(
            window.lock().unwrap().check(key, Waiter::Here(copy(&here))),
            Check::Running
        );
        let outcome = Outcome::DeadLettered {
            attempts: 3,
            error: "boom".into(),
        };
        let batch = ack_batch(
            1,
            [AckItem::Handled {
                dedup: key,
                outcome: outcome.clone(),
            }]
            .into_iter(),
            &window,
        );
        assert_eq!(batch.acks.len(), 1, "the forwarded copy is acked");
        assert_eq!(
            here.0.lock().unwrap().as_slice(),
            std::slice::from_ref(&outcome),
            "the local copy is told"
        );
        // A later copy is answered from the window, with the same outcome.
        assert!(
            matches!(window.lock().unwrap().check(key, Waiter::Here(copy(&later))), Check::Done(f) if outcome_of(&f) == outcome)
        );

        // Handed back: the waiting local copy goes to be routed anew, untold.
        let key = window.lock().unwrap().key(&sub, "e2");
        let waiting = Arc::new(Told::default());
        assert_eq!(window.lock().unwrap().check(key, waiter(1, 11, &to_a)), Check::New);
        window.lock().unwrap().check(key, Waiter::Here(copy(&waiting)));
        let (repark, mut reparked) = mpsc::unbounded_channel();
        for w in window.lock().unwrap().forget(key) {
            w.release(&repark);
        }
        let (k, _, _) = reparked.try_recv().expect("the local copy is routed anew");
        assert_eq!(k, sub);
        assert!(waiting.0.lock().unwrap().is_empty());
    }

    fn outcome_of(f: &Finished) -> Outcome {
        outcome(f)
    }

    /// Lane ids are the origins' to choose: lanes nothing uses any more are forgotten, so a peer
    /// (or a long uptime) cannot grow the map without bound, while lanes in use are kept.
    #[test]
    fn lanes_nothing_refers_to_are_pruned_and_lanes_in_use_are_kept() {
        let (acks, _rx) = mpsc::unbounded_channel();
        let make = |lane| {
            let acks = acks.clone();
            move || {
                Arc::new(LaneDone {
                    acks,
                    lane,
                    done: Arc::new(AtomicU64::new(0)),
                })
            }
        };
        let mut lanes = LanesIn::default();
        // Held by a job, and one with a credit owed.
        let held = lanes.get(1, 1, make(1));
        lanes.get(1, 2, make(2)).done.store(3, Ordering::Release);
        for lane in 3..100_000u64 {
            // A new lane of an origin, used once and done with (or an origin that left).
            let _ = lanes.get(lane % 7, lane, make(lane));
        }
        assert!(
            lanes.len() <= 2 * LANES_PRUNE_EVERY + 2,
            "{} lanes kept for 2 in use",
            lanes.len()
        );
        assert!(
            Arc::ptr_eq(&lanes.get(1, 1, make(1)), &held),
            "a lane in use was forgotten"
        );
        assert_eq!(lanes.get(1, 2, make(2)).done.load(Ordering::Acquire), 3);
    }

    #[test]
    fn a_lane_is_credited_with_everything_done_since_its_last_credit() {
        let window = Mutex::new(Dedup::new(8));
        let done = Arc::new(AtomicU64::new(3));
        let items = [
            AckItem::Credit {
                lane: 5,
                done: done.clone(),
            },
            // Queued again meanwhile: its count was already taken.
            AckItem::Credit {
                lane: 5,
                done: done.clone(),
            },
        ];
        let batch = ack_batch(1, items.into_iter(), &window);
        assert_eq!(batch.credits, vec![LaneCredit { lane: 5, n: 3 }]);
        assert_eq!(done.load(Ordering::Acquire), 0);
        assert!(batch.acks.is_empty());
    }

    #[test]
    fn outcomes_become_the_acks_that_answer_every_copy() {
        let f = finished(Outcome::DeadLettered {
            attempts: 3,
            error: "boom".into(),
        });
        let ack = answer(9, &f);
        assert_eq!(
            (ack.id, ack.code, ack.attempts, ack.error.as_str()),
            (9, AckCode::DeadLettered as i32, 3, "boom")
        );
        assert_eq!(finished(Outcome::Ok { attempts: 1 }).code, AckCode::Ok);
        assert_eq!(
            finished(Outcome::Failed {
                attempts: 2,
                error: "x".into()
            })
            .code,
            AckCode::Failed
        );
    }

    #[test]
    fn a_handed_back_delivery_refuses_every_peer_copy_and_routes_local_ones_anew() {
        let (to_a, mut a) = mpsc::unbounded_channel();
        let (to_b, mut b) = mpsc::unbounded_channel();
        let (repark, mut reparked) = mpsc::unbounded_channel();
        let sub = Arc::new(SubscriptionKey {
            topic: "orders".into(),
            group: "billing".into(),
        });
        let told = Arc::new(Told::default());
        let here = Waiter::Here(LocalCopy {
            key: sub.clone(),
            event: Arc::new(Event::new("orders", "{}", "application/json")),
            completion: told.clone(),
        });
        let refusal = Refusal::Moved((*sub).clone());
        let waiting = vec![
            waiter(1, 10, &to_a),
            waiter(2, 20, &to_b),
            waiter(1, 11, &to_a),
            here,
            Waiter::Running,
        ];
        refuse_waiting(waiting, &refusal, &repark);
        let acks = |rx: &mut mpsc::UnboundedReceiver<AckItem>| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|item| match item {
                    AckItem::Ack(a) => (a.id, a.code),
                    _ => panic!("only acks"),
                })
                .collect::<Vec<_>>()
        };
        let not_placed = AckCode::NotPlaced as i32;
        assert_eq!(acks(&mut a), vec![(10, not_placed), (11, not_placed)]);
        assert_eq!(acks(&mut b), vec![(20, not_placed)]);
        let (k, _, _) = reparked.try_recv().expect("the local copy is routed anew");
        assert_eq!(k, sub);
        assert!(reparked.try_recv().is_err(), "the running copy is not");
        assert!(told.0.lock().unwrap().is_empty(), "nothing is told yet");
    }

    #[test]
    fn every_refusal_is_a_not_placed_ack_that_says_why() {
        let key = SubscriptionKey {
            topic: "orders".into(),
            group: "billing".into(),
        };
        for (refusal, why) in [
            (Refusal::NoEvent, "without an event"),
            (Refusal::Stopped(key.clone()), "stopped on this node"),
            (Refusal::Moved(key.clone()), "moved away from this node"),
        ] {
            let ack = refusal.ack(7);
            assert_eq!((ack.id, ack.code, ack.attempts), (7, AckCode::NotPlaced as i32, 0));
            assert!(ack.error.contains(why), "{}", ack.error);
        }
    }

    #[test]
    fn later_copies_are_answered_with_the_outcome_of_the_one_that_ran() {
        let outcomes = [
            Outcome::Ok { attempts: 1 },
            Outcome::DeadLettered {
                attempts: 5,
                error: "boom".into(),
            },
            Outcome::Failed {
                attempts: 2,
                error: "disk".into(),
            },
        ];
        for o in outcomes {
            assert_eq!(outcome(&finished(o.clone())), o);
        }
        // A refusal recorded as a finish would be a failure for a copy published here: it stays
        // in the WAL.
        let refused = Finished {
            code: AckCode::NotPlaced,
            attempts: 0,
            error: "moved".into(),
        };
        assert_eq!(
            outcome(&refused),
            Outcome::Failed {
                attempts: 0,
                error: "moved".into()
            }
        );
    }

    #[test]
    fn a_lane_is_queued_for_credit_once_until_its_count_is_taken() {
        let (acks, mut rx) = mpsc::unbounded_channel();
        let lane = LaneDone {
            acks,
            lane: 4,
            done: Arc::new(AtomicU64::new(0)),
        };
        let sub = SubscriptionKey {
            topic: "orders".into(),
            group: "billing".into(),
        };
        lane.complete(&sub, Outcome::Ok { attempts: 1 });
        lane.credit_one();
        lane.complete(
            &sub,
            Outcome::Failed {
                attempts: 1,
                error: "x".into(),
            },
        );
        let queued: Vec<AckItem> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(queued.len(), 1, "one queue item for three deliveries");
        let window = Mutex::new(Dedup::new(8));
        let batch = ack_batch(1, queued.into_iter(), &window);
        assert_eq!(batch.credits, vec![LaneCredit { lane: 4, n: 3 }]);
        // Counted from zero again: the next delivery queues the lane again.
        lane.credit_one();
        assert!(matches!(rx.try_recv(), Ok(AckItem::Credit { lane: 4, .. })));
    }
}
