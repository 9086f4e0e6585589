//! The event plane between nodes (DESIGN §5, §7): forwarding events to the node that runs the
//! chosen instance, acks back, redelivery, deduplication and placement fencing.
//!
//! The relay has two parts and a front. [`Relay`] (this file) is what the rest of the crate uses:
//! it starts both parts on the relay's runtime, dispatches what peers send (batches to the
//! receiving side, acks to the sending side) and takes back the jobs of subscriptions that left
//! this node ([`Returns`], a channel). `outbound` is the sending side (pending table, lanes,
//! parking, re-routing, batching to peers); `inbound` is the receiving side (fencing, dedup,
//! handing jobs to local instances, acks back). Neither part points at the other or at the
//! front: what one must tell another goes through the front or a channel. The pure pieces have
//! their own files: `pending` (where a delivery is, when it is routed again), `lanes` (the
//! at-most-once window bookkeeping), `dedup` (the window of recent deliveries).
//!
//! **Which thread.** A node runs the relay's tasks on the bus's `herald-events` thread (the
//! runtime given to [`Relay::start`]), next to the events connections they feed and drain: a
//! batch goes from the outbox task to its connection's writer, and from a connection's reader to
//! its origin's inbox, without waking another thread. Event-plane work still never waits behind
//! HTTP workers or handlers, and never delays the control channel (Raft, pings), which has its
//! own thread. The relay had a thread of its own before; that was one more wake-up and core
//! change per event on each node, and measured no faster at any size on 2 cores (BENCHMARKS.md,
//! `nats`, "The relay on the events thread").
//!
//! **Ingress side** (`outbound`). When the router picks a remote slot, the ingress hands the event to
//! [`Relay::forward`]: it gets a delivery id, goes into the *pending* table with its completion
//! (the ingress's per-event tracker), and into the peer's outbox. One task per peer drains the
//! outbox into `EventBatch`es (many events per transport frame; the transport writes many frames
//! per syscall). The handler node answers with `AckBatch`es; an ack removes the pending entry and
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
//! it (fencing), or when no ack came within `cluster.redeliver_after_ms` (then back to the node it
//! went to while that node can take it: its dedup window knows the copy). Events whose every
//! instance is on an unhealthy node are *parked* here and routed as soon as one can take them; WAL
//! and dead-letter replays park events too and let this loop place them. The delivery id stays the
//! same across re-sends, and the completion fires once (`pending::Once`), however many acks arrive.
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
//! per-event allocations off the fastest mode's path. An `ack=none` event that waits here
//! (parked: every instance is on an unhealthy node; or handed back by a local instance that left
//! before running it, `Origin::LocalAtMostOnce`) is routed once when a node can take it — on a
//! lane, or to a local instance — and forgotten: never kept for a re-send (the event-plane
//! simulation, `event_sim`, found it being tracked and run twice).
//!
//! **Handler side** (`inbound`). Batches from one origin are handled in order by one task per origin (so a
//! key's order survives the hop). A delivery for a subscription this node runs no instance of is
//! refused with `AckCode::NotPlaced` (the node no longer holds that placement: fencing); the
//! origin routes it again at once. Otherwise the *dedup window* is checked: a `(subscription,
//! event id)` seen recently is not handled again — a finished one is answered with its outcome, a
//! running one gets the ack when it finishes. The window holds `cluster.dedup_window` finished
//! entries.
//!
//! **Dead letters across nodes** (`asks`). Nodes list and replay each other's dead letters with
//! request/answer messages on the same events channel (`proto::DeadLetterRequest`,
//! `proto::DeadLetterResponse`), never over HTTP: [`Relay::ask_dead_letters`] waits (bounded, with a
//! timeout) for the answer of the peer asked, and requests from peers go to the node layer on the
//! channel given to [`Relay::start`] (the relay neither reads the store nor knows the members).
//!
//! Memory: the pending table holds at most what the in-flight byte budget admits; each origin has
//! at most `handlers.mailbox_capacity` events in flight per remote instance (the router's
//! window), which bounds what a handler node's inboxes hold. Whatever an origin sends (window
//! or not), what the receiving side holds is bounded: the bus's sink holds
//! [`APP_QUEUE`](crate::transport::APP_QUEUE) payloads and each origin's inbox a few batches;
//! when a handler is slow the dispatch loop waits for room, and the events channel stops reading
//! (backpressure down to the origin, nothing dropped; the control channel is not affected).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::event::Event;
use crate::handler::supervisor::{Completion, Origin, Outcome, Retired, RetiredJob};
use crate::monitor::Health;
use crate::proto::{dead_letter_request, decode_peer_message, DeadLetterResponse, PeerBody};
use crate::router::Router;
use crate::transport::EventNet;
use crate::types::SubscriptionKey;

mod asks;
mod dedup;
mod inbound;
mod lanes;
mod outbound;
mod pending;

use asks::Asks;
pub(crate) use asks::{AskError, PeerAsk, ASK_QUEUE};
use inbound::Inbound;
pub(crate) use inbound::LocalCopy;
use outbound::Outbound;

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

/// The events channel to the other nodes (the bus's events transport in a node; an in-process
/// network in the simulation).
type Net = Arc<dyn EventNet>;

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

    /// The sender of `peer`'s queue, starting the peer's task with `start` on first use (or
    /// when the task is gone), for a completion that sends to it later.
    fn sender(&self, peer: u64, start: impl FnOnce(mpsc::UnboundedReceiver<T>)) -> mpsc::UnboundedSender<T> {
        if let Some(tx) = self
            .senders
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .filter(|tx| !tx.is_closed())
        {
            return tx.clone();
        }
        let mut senders = self.senders.write().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = senders.get(&peer).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        senders.insert(peer, tx.clone());
        start(rx);
        tx
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

/// The relay's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayConfig {
    /// Re-send a delivery not acked within this long.
    pub(crate) redeliver_after: Duration,
    /// Finished `(subscription, event id)` pairs remembered for deduplication.
    pub(crate) dedup_window: usize,
}

/// A job of a subscription that left this node, on its way back to the relay.
type Returned = (Arc<SubscriptionKey>, RetiredJob);

/// Hands the jobs of subscriptions that left this node (see [`Retired`]) to the relay over a
/// channel: the router needs it before the relay exists, and a channel needs no pointer filled in
/// later. A forwarded job is refused back to its origin (which routes it with the new
/// placement), one accepted here is parked and routed like a new event.
pub(crate) struct Returns(mpsc::UnboundedSender<Returned>);

/// The relay's end of [`Returns`], given to [`Relay::start`].
pub(crate) struct ReturnedJobs(mpsc::UnboundedReceiver<Returned>);

/// A [`Returns`] for the router, and its other end for the relay.
pub(crate) fn returns() -> (Returns, ReturnedJobs) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Returns(tx), ReturnedJobs(rx))
}

impl Retired for Returns {
    fn retired(&self, sub: &Arc<SubscriptionKey>, job: RetiredJob) {
        if let Err(mpsc::error::SendError((sub, job))) = self.0.send((sub.clone(), job)) {
            // Only once the relay's runtime stopped (the node is stopping): the event stays in its
            // origin's WAL.
            job.completion.complete(
                &sub,
                Outcome::Failed {
                    attempts: 0,
                    error: "the node is stopping".into(),
                },
            );
        }
    }
}

/// The event plane of one node: the front of its sending and receiving sides.
pub(crate) struct Relay {
    outbound: Arc<Outbound>,
    inbound: Arc<Inbound>,
    /// Dead-letter requests to and from other members (`asks`).
    asks: Arc<Asks>,
}

impl Relay {
    /// Starts the relay's tasks on `runtime` (in a node, the bus's `herald-events` thread);
    /// `inbound` carries the `app` payloads peers send,
    /// `returned` the jobs the router's instances give back; dead-letter requests from peers go to
    /// `asks` (bounded, see [`ASK_QUEUE`]), which the node layer serves.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        transport: Net,
        router: Arc<Router>,
        health: Arc<Health>,
        config: RelayConfig,
        runtime: tokio::runtime::Handle,
        mut inbound: mpsc::Receiver<(u64, Bytes)>,
        returned: ReturnedJobs,
        asks: mpsc::Sender<PeerAsk>,
    ) -> Arc<Relay> {
        // Copies published here that waited for a copy which was then handed back: routed anew.
        let (repark_tx, mut repark) = mpsc::unbounded_channel::<inbound::Repark>();
        let relay = Arc::new(Relay {
            asks: Arc::new(Asks::new(transport.clone(), asks)),
            outbound: Arc::new(Outbound::new(
                transport.clone(),
                router.clone(),
                health.clone(),
                config,
                runtime.clone(),
            )),
            inbound: Arc::new(Inbound::new(
                transport,
                router,
                config.dedup_window,
                runtime.clone(),
                repark_tx,
            )),
        });
        // The tasks hold the parts, not the front: they run until the relay's runtime stops (the
        // node's shutdown drops it), which drops them and what they hold.
        let (outbound, receiving, asks) = (relay.outbound.clone(), relay.inbound.clone(), relay.asks.clone());
        runtime.spawn(async move {
            while let Some((from, bytes)) = inbound.recv().await {
                match decode_peer_message(bytes) {
                    Ok(Some(PeerBody::Events(batch))) => receiving.on_events(from, batch).await,
                    Ok(Some(PeerBody::Acks(acks))) => outbound.on_acks(from, acks),
                    Ok(Some(PeerBody::DeadLetterRequest(request))) => asks.on_request(from, request),
                    Ok(Some(PeerBody::DeadLetterResponse(answer))) => asks.on_response(from, answer),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(peer = from, error = %e, "undecodable event-plane message dropped"),
                }
            }
        });
        let (outbound, receiving) = (relay.outbound.clone(), relay.inbound.clone());
        let ReturnedJobs(mut returned) = returned;
        runtime.spawn(async move {
            while let Some((key, job)) = returned.recv().await {
                match job.origin {
                    Origin::Local | Origin::LocalAtMostOnce => {
                        tracing::debug!(subscription = %key, id = %job.event.id, "placement moved: routing a queued event anew");
                        let once = job.origin == Origin::LocalAtMostOnce;
                        outbound.park(key, job.event, job.completion, once);
                    }
                    Origin::AtMostOnce { .. } => {
                        // Dropped (at-most-once); its lane is credited.
                        tracing::debug!(subscription = %key, id = %job.event.id, "placement moved: at-most-once event dropped");
                        job.completion.complete(&key, Outcome::Ok { attempts: 0 });
                    }
                    Origin::Forwarded { from, delivery } => receiving.retired(&key, &job.event.id, from, delivery),
                }
            }
        });
        let outbound = relay.outbound.clone();
        runtime.spawn(async move {
            while let Some((key, event, completion)) = repark.recv().await {
                outbound.park(key, event, completion, false);
            }
        });
        runtime.spawn(outbound::reroute_loop(relay.outbound.clone(), health.subscribe()));
        relay
    }

    /// Checks copies of events published on this node for its own instances against the dedup
    /// window (the rule is the same as for forwarded deliveries: the hosting node de-duplicates).
    /// Returns, per copy, the completion to run it with, or `None` when it must not run (a copy
    /// finished or runs; its completion is told that outcome).
    pub(crate) fn seen_here(&self, copies: Vec<LocalCopy>) -> Vec<Option<Arc<dyn Completion>>> {
        self.inbound.seen_here(copies)
    }

    /// Forgets the dedup window's memory of `event_id` for `key` (a replayed dead letter runs
    /// again).
    pub(crate) fn forget_seen(&self, key: &SubscriptionKey, event_id: &str) {
        self.inbound.forget(key, event_id);
    }

    /// Deliveries sent to a node and not acked yet (parked ones excluded).
    pub(crate) fn in_flight(&self) -> usize {
        self.outbound.in_flight()
    }

    /// Sends `items` (events for subscriptions with an instance on `node`, each with its window
    /// unit towards it reserved) to `node`, in order; each completion is told once the handler
    /// node acks its event. One call per publish and peer: the events are encoded once, straight
    /// into the peer's outgoing buffer, and enter the pending table under one lock.
    pub(crate) fn forward(&self, node: u64, items: Vec<Outgoing>) {
        self.outbound.forward(node, items);
    }

    /// Asks member `peer` about its dead letters over the events channel and waits up to
    /// `timeout` for the answer, which only `peer` can give.
    pub(crate) async fn ask_dead_letters(
        &self,
        peer: u64,
        kind: dead_letter_request::Kind,
        timeout: Duration,
    ) -> Result<DeadLetterResponse, AskError> {
        self.asks.ask(peer, kind, timeout).await
    }

    /// Holds `event` for `key`'s subscription until a node can take it (every instance is on an
    /// unhealthy node, or a replay hands it over to be routed). An `at_most_once` event (`ack=none`)
    /// is routed once and forgotten: on a lane to another node, or to a local instance.
    pub(crate) fn park(
        &self,
        key: Arc<SubscriptionKey>,
        event: Arc<Event>,
        completion: Arc<dyn Completion>,
        at_most_once: bool,
    ) {
        self.outbound.park(key, event, completion, at_most_once);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Remembers the outcomes it is told.
    #[derive(Default)]
    struct Told(Mutex<Vec<Outcome>>);

    impl Completion for Told {
        fn complete(&self, _: &SubscriptionKey, outcome: Outcome) {
            self.0.lock().unwrap().push(outcome);
        }
    }

    fn job(told: &Arc<Told>, origin: Origin) -> (Arc<SubscriptionKey>, RetiredJob) {
        let key = Arc::new(SubscriptionKey {
            topic: "orders".into(),
            group: "billing".into(),
        });
        let job = RetiredJob {
            event: Arc::new(Event::new("orders", "{}", "application/json")),
            origin,
            completion: told.clone(),
        };
        (key, job)
    }

    #[test]
    fn a_job_returned_before_the_relay_runs_waits_for_it() {
        let (returns, ReturnedJobs(mut rx)) = returns();
        let told = Arc::new(Told::default());
        let (key, job) = job(&told, Origin::Forwarded { from: 2, delivery: 7 });
        returns.retired(&key, job);
        let (got_key, got) = rx.try_recv().expect("the job is queued for the relay");
        assert_eq!(got_key, key);
        assert_eq!(got.origin, Origin::Forwarded { from: 2, delivery: 7 });
        assert!(told.0.lock().unwrap().is_empty(), "nothing is completed yet");
    }

    #[test]
    fn a_job_returned_once_the_relay_stopped_fails_and_stays_in_the_wal() {
        let (returns, returned) = returns();
        drop(returned);
        let told = Arc::new(Told::default());
        let (key, job) = job(&told, Origin::Local);
        returns.retired(&key, job);
        assert!(matches!(
            told.0.lock().unwrap().as_slice(),
            [Outcome::Failed { attempts: 0, .. }]
        ));
    }
}
