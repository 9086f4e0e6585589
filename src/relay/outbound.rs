//! The sending side: events this node accepted for instances on other nodes.
//!
//! Owns the *pending* table (deliveries kept until acked, with their completion trackers), the
//! at-most-once lanes, the per-peer outboxes and their batching tasks, and the re-routing loop
//! (parked deliveries, suspect nodes, moved placements, refusals, timeouts). It learns of acks
//! and credits through [`Outbound::on_acks`], called by the front with what peers sent.
//!
//! Must not: handle events for local instances beyond handing a re-routed one to its slot, or
//! know the receiving side's state (dedup, fencing) — it hears only what peers ack.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use super::lanes::{Credited, Lanes};
use super::pending::{self, may_answer, Answer, Destination, NodeState, Once, Pending};
use super::Net;
use super::{IdMap, Outgoing, Queues, RelayConfig};
use crate::event::{Event, TraceContext};
use crate::handler::supervisor::{Completion, Done, Job, Origin, Outcome};
use crate::monitor::Health;
use crate::proto::{encode_delivery, encode_delivery_on, peer_message_events, AckBatch, AckCode, EventsBuffer};
use crate::router::{NoRoom, Route, Router, Slot, Target};
use crate::telemetry::EventSpan;
use crate::transport::Envelope;
use crate::types::SubscriptionKey;

/// The `forward` span of one hop of a traced event to `node` (a child of the event's context,
/// the publish or replay span), with the context the frame carries instead of the event's: the
/// remote deliver span is its child. `None` (no span, the event's own context travels) when the
/// event is not traced.
fn hop(node: u64, key: &SubscriptionKey, e: &Event) -> Option<(EventSpan, Option<TraceContext>)> {
    use opentelemetry::KeyValue;
    if !crate::telemetry::traced(e.trace.as_ref()) {
        return None;
    }
    let span = EventSpan::start(
        "forward",
        opentelemetry::trace::SpanKind::Producer,
        e.trace.as_ref(),
        || {
            vec![
                // As the bridge records a `u64` that fits: an integer.
                KeyValue::new("herald.peer", i64::try_from(node).unwrap_or(i64::MAX)),
                KeyValue::new("herald.subscription", key.to_string()),
                KeyValue::new("herald.event_id", e.id.to_string()),
            ]
        },
        || {
            tracing::info_span!(
                target: "herald::trace",
                parent: None,
                "forward",
                otel.kind = "producer",
                herald.peer = node,
                herald.subscription = %key,
                herald.event_id = &*e.id,
            )
        },
    );
    let trace = span.context_or(e.trace.as_ref());
    Some((span, trace))
}

/// An envelope of forwarded events stops growing past this many bytes.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// At most this many deliveries are taken from an outbox per envelope.
const MAX_BATCH: usize = 1024;
/// How often pending deliveries are checked for re-routing when nothing else wakes the loop.
const SWEEP: Duration = Duration::from_millis(50);
/// The sweep's period while nothing is pending and no lane holds units (an idle node): a delivery
/// sent meanwhile is due no sooner than `redeliver_after` after it was sent, and kicks and health
/// changes still wake the sweep at once. Measured: the 50 ms sweep was a fifth of an idle relay
/// thread's wakeups (`herald-bench scale`).
const IDLE_SWEEP: Duration = Duration::from_secs(1);
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

/// The sending side of one node.
pub(super) struct Outbound {
    transport: Net,
    router: Arc<Router>,
    health: Arc<Health>,
    config: RelayConfig,
    /// Where the outboxes' batching tasks run (the relay's runtime: `herald-events` in a node).
    runtime: tokio::runtime::Handle,
    next_id: AtomicU64,
    pending: Mutex<IdMap<u64, Pending>>,
    lanes: Mutex<Lanes>,
    outboxes: Queues<Chunk>,
    /// Wakes the re-routing loop early.
    kick: Notify,
    pending_gauge: metrics::Gauge,
    redelivered: metrics::Counter,
    /// Counts and logs answers refused for deliveries not sent to their sender.
    refusals: crate::metrics::Refusals,
}

impl Outbound {
    pub(super) fn new(
        transport: Net,
        router: Arc<Router>,
        health: Arc<Health>,
        config: RelayConfig,
        runtime: tokio::runtime::Handle,
    ) -> Outbound {
        Outbound {
            transport,
            router,
            health,
            config,
            runtime,
            // Random, so that acks a peer still owes to this node's previous process (same node
            // id, before a restart) cannot complete this process's deliveries.
            next_id: AtomicU64::new(crate::types::random_u64() >> 1),
            pending: Mutex::new(IdMap::default()),
            lanes: Mutex::new(Lanes::default()),
            outboxes: Queues::new(),
            kick: Notify::new(),
            pending_gauge: metrics::gauge!(crate::metrics::FORWARD_PENDING),
            redelivered: metrics::counter!(crate::metrics::EVENTS_REDELIVERED),
            refusals: crate::metrics::Refusals::default(),
        }
    }

    /// Deliveries sent to a node and not acked yet (parked ones excluded).
    pub(super) fn in_flight(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| p.node().is_some())
            .count()
    }

    /// See [`super::Relay::forward`].
    pub(super) fn forward(&self, node: u64, items: Vec<Outgoing>) {
        if items.is_empty() {
            return;
        }
        let acked = items.iter().filter(|o| o.completion.is_some()).count();
        let next_id = self.next_id.fetch_add(acked as u64, Ordering::Relaxed);
        // At-most-once items: their lanes, in order.
        let lanes = if acked < items.len() {
            let loads = items.iter().filter(|o| o.completion.is_none()).map(|o| &o.load);
            self.lanes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .assign(node, loads, crate::monitor::now())
        } else {
            Vec::new()
        };
        let chunks = encode_chunks(node, &items, next_id, lanes);
        if acked > 0 {
            let now = crate::monitor::now();
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.reserve(acked);
            let acked_items = items
                .into_iter()
                .filter_map(|o| o.completion.map(|c| (o.key, o.event, o.load, c)));
            // `encode_chunks` gave the acked items the ids `next_id..`, in order.
            for (id, (key, event, load, completion)) in (next_id..).zip(acked_items) {
                pending.insert(
                    id,
                    Pending {
                        key,
                        event,
                        done: Once::new(completion),
                        to: Destination::Sent {
                            node,
                            load,
                            at: now,
                            refused: false,
                        },
                        earlier: Vec::new(),
                        at_most_once: false,
                    },
                );
            }
            self.pending_gauge.set(pending.len() as f64);
        }
        for chunk in chunks {
            self.send_to(node, chunk);
        }
    }

    /// See [`super::Relay::park`].
    pub(super) fn park(
        &self,
        key: Arc<SubscriptionKey>,
        event: Arc<Event>,
        completion: Arc<dyn Completion>,
        at_most_once: bool,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.insert(
                id,
                Pending {
                    key,
                    event,
                    done: Once::new(completion),
                    to: Destination::Parked,
                    earlier: Vec::new(),
                    at_most_once,
                },
            );
            self.pending_gauge.set(pending.len() as f64);
        }
        self.kick.notify_one();
    }

    fn send_to(&self, node: u64, chunk: Chunk) {
        let transport = self.transport.clone();
        let runtime = &self.runtime;
        self.outboxes.push(node, chunk, |rx| {
            runtime.spawn(send_events(transport, node, rx));
        });
    }

    /// Acks and lane credits from `from` (the authenticated peer): an ack completes its
    /// delivery, a refusal has it routed again, a credit gives window units back — each only for
    /// deliveries sent to `from` ([`may_answer`], [`Lanes::credit`](super::lanes::Lanes::credit);
    /// an outcome from a node the delivery was routed away from still completes it).
    /// Others are refused: counted in `herald_peer_messages_refused_total{kind="ack"|"not_placed"|"credit",
    /// reason="not_sent_to_peer"}` and logged, rate-limited.
    pub(super) fn on_acks(&self, from: u64, batch: AckBatch) {
        let mut refused_credits = 0;
        if !batch.credits.is_empty() {
            let now = crate::monitor::now();
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            for c in &batch.credits {
                if lanes.credit(from, c.lane, c.n, now) == Credited::NotSentToPeer {
                    refused_credits += 1;
                }
            }
        }
        let mut finished = Vec::new();
        let mut refused = false;
        let (mut refused_acks, mut refused_not_placed) = (0, 0);
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for ack in batch.acks {
                let code = ack_code(ack.code);
                match ack_action(may_answer(pending.get(&ack.id), from), code) {
                    AckAction::Ignore => {}
                    AckAction::Forged => {
                        if code == AckCode::NotPlaced {
                            refused_not_placed += 1;
                        } else {
                            refused_acks += 1;
                        }
                    }
                    AckAction::Refuse => {
                        if let Some(p) = pending.get_mut(&ack.id) {
                            tracing::debug!(peer = from, subscription = %p.key, reason = %ack.error, "delivery refused; routing it again");
                            refused |= p.refuse(from);
                        }
                    }
                    AckAction::Finish => {
                        if let Some(mut p) = pending.remove(&ack.id) {
                            p.release();
                            finished.push((p, ack_outcome(code, ack.attempts, ack.error)));
                        }
                    }
                }
            }
            self.pending_gauge.set(pending.len() as f64);
        }
        for (kind, n) in [
            ("ack", refused_acks),
            ("not_placed", refused_not_placed),
            ("credit", refused_credits),
        ] {
            if n > 0 {
                self.refusals.refuse(kind, "not_sent_to_peer", from, n, || {
                    format!("{n} answer(s) for deliveries this node did not send to peer {from}")
                });
            }
        }
        // Completions run outside the lock (they may drop WAL records and answer publishers).
        for (p, outcome) in finished {
            p.done.complete(&p.key, outcome);
        }
        if refused {
            self.kick.notify_one();
        }
    }

    /// Gives back the window units of lanes whose deliveries are presumed lost; returns whether
    /// lanes still hold units.
    fn sweep_lanes(&self) -> bool {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let lost = lanes.sweep(crate::monitor::now(), self.config.redeliver_after, |node| {
            self.health.peer(node).routable()
        });
        let outstanding = lanes.outstanding();
        drop(lanes);
        for l in lost {
            tracing::debug!(
                peer = l.node,
                lost = l.units,
                "at-most-once deliveries not credited; their window units are given back"
            );
        }
        outstanding
    }

    /// Routes again every pending delivery that needs it.
    /// Returns whether anything is still in flight (pending deliveries, lanes holding units),
    /// which sets the next sweep's period ([`sweep_period`]).
    fn reroute(&self) -> bool {
        let outstanding = self.sweep_lanes();
        let table = self.router.table();
        if !table.is_live() {
            // Starting (no placement yet) or stopping (the table was cleared): nothing can be
            // routed, and a missing route does not mean a deleted subscription. Swept as busy.
            return true;
        }
        let now = crate::monitor::now();
        let mut local = Vec::new();
        let mut resend: Vec<(u64, Chunk)> = Vec::new();
        let mut resent = 0;
        let mut gone = Vec::new();
        // At-most-once events routed to a node: sent on a lane once the lock is released.
        let mut once: Vec<(u64, Outgoing)> = Vec::new();
        let mut sent_once = Vec::new();
        let in_flight;
        // One route lookup (and one health check per node) per subscription per sweep, not one
        // per pending delivery: pending entries of one subscription share its key's `Arc`.
        let mut routes: HashMap<*const SubscriptionKey, Option<&Arc<Route>>> = HashMap::new();
        let mut states: HashMap<(*const SubscriptionKey, u64), NodeState> = HashMap::new();
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
                let state = |node| {
                    *states
                        .entry((ptr, node))
                        .or_insert_with(|| node_state(self.health.peer(node).routable(), &route.slots, node))
                };
                if let Some(why) = pending::reroute(&p.to, now, self.config.redeliver_after, state) {
                    // Late, not lost: back to the node it went to if it can take it (its dedup
                    // window knows the copy: `Route::reserve_again`).
                    let late_from = match (why, &p.to) {
                        (pending::Reroute::Timeout, Destination::Sent { node, .. }) => Some(*node),
                        _ => None,
                    };
                    due.push((id, route, late_from));
                }
            }
            due.sort_unstable_by_key(|&(id, _, _)| id);
            gone.sort_unstable();
            for (id, route, late_from) in due {
                let Some(p) = pending.get_mut(&id) else { continue };
                // Its own unit of the window first: a window full of lost deliveries must not
                // keep every one of them from being sent again.
                p.release();
                match route.reserve_again(late_from, p.event.key.as_deref()) {
                    Ok(Target::Local(slot)) => {
                        slot.send(Job {
                            event: p.event.clone(),
                            done: Done::Tell(p.done.clone()),
                            origin: if p.at_most_once {
                                Origin::LocalAtMostOnce
                            } else {
                                Origin::Local
                            },
                        });
                        local.push(id);
                    }
                    Ok(Target::Remote(slot)) if p.at_most_once => {
                        let (node, load) = slot.take();
                        once.push((
                            node,
                            Outgoing {
                                key: p.key.clone(),
                                epoch: route.epoch,
                                load,
                                event: p.event.clone(),
                                completion: None,
                            },
                        ));
                        sent_once.push(id);
                    }
                    Ok(Target::Remote(slot)) => {
                        let (node, load) = slot.take();
                        p.to = Destination::Sent {
                            node,
                            load,
                            at: now,
                            refused: false,
                        };
                        let i = match resend.iter().position(|(n, c)| *n == node && c.len() < MAX_BATCH_BYTES) {
                            Some(i) => i,
                            None => {
                                resend.push((node, Chunk::with_capacity(0)));
                                resend.len() - 1
                            }
                        };
                        let chunk = &mut resend[i].1;
                        let hop = hop(node, &p.key, &p.event);
                        let trace = hop.as_ref().map_or(p.event.trace.as_ref(), |(_, t)| t.as_ref());
                        encode_delivery(
                            id,
                            &p.key.group,
                            route.epoch,
                            &p.event,
                            trace,
                            chunk.bytes.deliveries_mut(),
                        );
                        chunk.n += 1;
                        resent += 1;
                    }
                    // Held here (parked, its unit given back); the next sweep tries again.
                    Ok(Target::Parked) | Err(NoRoom::Unplaced | NoRoom::Full) => {}
                }
            }
            for id in &local {
                if let Some(mut p) = pending.remove(id) {
                    p.release();
                }
            }
            for id in &sent_once {
                if let Some(p) = pending.remove(id) {
                    // Handed to a lane: nothing tracks it any more (its budget share is freed).
                    p.done.complete(&p.key, Outcome::Ok { attempts: 0 });
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
            in_flight = outstanding || !pending.is_empty();
        }
        self.redelivered.increment((local.len() + resent + once.len()) as u64);
        for (node, chunk) in resend {
            self.send_to(node, chunk);
        }
        let mut by_node: Vec<(u64, Vec<Outgoing>)> = Vec::new();
        for (node, o) in once {
            match by_node.iter_mut().find(|(n, _)| *n == node) {
                Some((_, items)) => items.push(o),
                None => by_node.push((node, vec![o])),
            }
        }
        for (node, items) in by_node {
            self.forward(node, items);
        }
        in_flight
    }
}

/// The deliveries of one `forward` call to `node`, encoded into chunks (a new chunk is started
/// once one holds [`MAX_BATCH_BYTES`]): the ones kept until acked (with a completion) get
/// delivery ids from `next_id` on, in order; the at-most-once ones take `lanes` in order (one
/// each, from [`Lanes::assign`]) and no id.
fn encode_chunks(node: u64, items: &[Outgoing], mut next_id: u64, lanes: Vec<u64>) -> Vec<Chunk> {
    let mut lanes = lanes.into_iter();
    let mut chunks = Vec::new();
    let mut chunk = Chunk::with_capacity(0);
    for (i, o) in items.iter().enumerate() {
        if chunk.n > 0 && chunk.len() >= MAX_BATCH_BYTES {
            chunks.push(std::mem::replace(&mut chunk, Chunk::with_capacity(0)));
        }
        let out = chunk.bytes.deliveries_mut();
        let hop = hop(node, &o.key, &o.event);
        let trace = hop.as_ref().map_or(o.event.trace.as_ref(), |(_, t)| t.as_ref());
        if o.completion.is_some() {
            encode_delivery(next_id, &o.key.group, o.epoch, &o.event, trace, out);
            next_id += 1;
        } else {
            // `assign` gave one lane per at-most-once item.
            let lane = lanes.next().unwrap_or_default();
            encode_delivery_on(0, &o.key.group, o.epoch, lane, &o.event, trace, out);
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
    chunks
}

/// What an ack does to its pending delivery ([`Outbound::on_acks`]), from who may answer for it
/// ([`may_answer`]) and its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckAction {
    /// Completes the delivery with the ack's outcome (an outcome from the node the delivery was
    /// routed away from still counts).
    Finish,
    /// The node refuses it (fencing): route it again.
    Refuse,
    /// Nothing to do: the delivery is done already, or a refusal from a node it was routed away
    /// from.
    Ignore,
    /// An answer for a delivery not sent to the peer: refused, counted.
    Forged,
}

fn ack_action(answer: Answer, code: AckCode) -> AckAction {
    match answer {
        Answer::NotSentToPeer => AckAction::Forged,
        Answer::Unknown => AckAction::Ignore,
        Answer::Earlier if code == AckCode::NotPlaced => AckAction::Ignore,
        Answer::Yes if code == AckCode::NotPlaced => AckAction::Refuse,
        Answer::Yes | Answer::Earlier => AckAction::Finish,
    }
}

/// An ack's code; an unknown one (a newer peer) counts as a failure: the event stays in the WAL.
fn ack_code(code: i32) -> AckCode {
    AckCode::try_from(code).unwrap_or(AckCode::Failed)
}

/// The outcome a finishing ack reports to the delivery's completion.
fn ack_outcome(code: AckCode, attempts: u32, error: String) -> Outcome {
    match code {
        AckCode::Ok => Outcome::Ok { attempts },
        AckCode::DeadLettered => Outcome::DeadLettered { attempts, error },
        _ => Outcome::Failed { attempts, error },
    }
}

/// Where a pending delivery's `node` stands for re-routing: unhealthy, or still one of the
/// subscription's placed remote `slots`, or moved away from.
fn node_state(routable: bool, slots: &[Slot], node: u64) -> NodeState {
    if !routable {
        NodeState::Unhealthy
    } else if slots
        .iter()
        .any(|s| matches!(s, Slot::Remote { node: n, .. } if *n == node))
    {
        NodeState::Placed
    } else {
        NodeState::Moved
    }
}

/// How long the sweep waits after one that left deliveries `in_flight` (pending, or lanes holding
/// units): [`SWEEP`], else [`IDLE_SWEEP`] (never longer than half of `redeliver_after`, nor shorter
/// than [`SWEEP`]).
fn sweep_period(in_flight: bool, redeliver_after: Duration) -> Duration {
    if in_flight {
        SWEEP
    } else {
        IDLE_SWEEP.min(redeliver_after / 2).max(SWEEP)
    }
}

/// Re-routes pending deliveries every sweep, and at once when a peer's health changes or a
/// delivery was refused or parked. Runs until the relay's runtime stops (the node's shutdown).
pub(super) async fn reroute_loop(out: Arc<Outbound>, mut health: tokio::sync::watch::Receiver<u64>) {
    loop {
        let kicked = out.kick.notified();
        tokio::pin!(kicked);
        kicked.as_mut().enable();
        let period = sweep_period(out.reroute(), out.config.redeliver_after);
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = kicked => {}
            c = health.changed() => if c.is_err() { return },
        }
    }
}

/// Drains one peer's outbox into event batches: a large chunk (one publish call's events) is
/// sent as its own envelope, straight from the buffer it was encoded into; runs of small ones are
/// copied together into one envelope of up to [`MAX_BATCH_BYTES`].
async fn send_events(transport: Net, node: u64, mut rx: mpsc::UnboundedReceiver<Chunk>) {
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
            let next = next_chunk(!small.is_empty(), small_bytes, len);
            if next.flush_small {
                let (payload, n) = small_message(&mut small);
                small_bytes = 0;
                send(payload, n).await;
            }
            if !next.own {
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

/// Where the next chunk of an outbox goes in [`send_events`] (`len` bytes; `small_bytes` bytes of
/// small chunks gathered so far, `has_small` when there are any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NextChunk {
    /// Send the small chunks gathered so far first: this one goes alone, or would take their
    /// envelope past [`MAX_BATCH_BYTES`].
    flush_small: bool,
    /// This chunk is large ([`OWN_ENVELOPE_BYTES`]): it goes as its own envelope, from its own
    /// buffer; otherwise it joins the small ones.
    own: bool,
}

fn next_chunk(has_small: bool, small_bytes: usize, len: usize) -> NextChunk {
    let own = len >= OWN_ENVELOPE_BYTES;
    NextChunk {
        flush_small: has_small && (own || small_bytes + len > MAX_BATCH_BYTES),
        own,
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::monitor::Health;
    use crate::proto::{decode_peer_message, Deliveries, Forwarded, PeerBody};

    #[test]
    fn the_sweep_slows_down_only_while_nothing_is_in_flight() {
        let after = Duration::from_secs(5);
        assert_eq!(sweep_period(true, after), SWEEP);
        assert_eq!(sweep_period(false, after), IDLE_SWEEP);
        // A short redelivery deadline keeps an idle sweep well within it, never below SWEEP.
        assert_eq!(
            sweep_period(false, Duration::from_millis(600)),
            Duration::from_millis(300)
        );
        assert_eq!(sweep_period(false, Duration::from_millis(20)), SWEEP);
    }

    /// A completion that is never told anything in these tests.
    struct Untold;

    impl Completion for Untold {
        fn complete(&self, _: &SubscriptionKey, _: Outcome) {
            panic!("nothing completes a delivery while it is encoded");
        }
    }

    fn item(group: &str, epoch: u64, data: impl Into<Bytes>, acked: bool) -> Outgoing {
        Outgoing {
            key: Arc::new(SubscriptionKey {
                topic: "orders".into(),
                group: group.into(),
            }),
            epoch,
            load: Arc::new(AtomicUsize::new(1)),
            event: Arc::new(Event::new("orders", data, "application/json")),
            completion: acked.then(|| Arc::new(Untold) as Arc<dyn Completion>),
        }
    }

    fn decode(body: &[u8]) -> Vec<Forwarded> {
        Deliveries(Bytes::copy_from_slice(body))
            .collect::<Result<_, _>>()
            .expect("the chunk decodes")
    }

    #[test]
    fn acked_deliveries_get_ids_in_order_and_at_most_once_ones_their_lanes() {
        let items = vec![
            item("billing", 3, "{}", true),
            item("audit", 3, "{}", false),
            item("billing", 4, "{}", true),
            item("audit", 4, "{}", false),
        ];
        let chunks = encode_chunks(2, &items, 100, vec![7, 9]);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].n, 4);
        let got: Vec<_> = decode(chunks[0].bytes.body())
            .into_iter()
            .map(|d| (d.id, d.lane, d.group, d.epoch, d.event.map(|e| e.id.to_string())))
            .collect();
        let want: Vec<_> = items
            .iter()
            .zip([(100, 0), (0, 7), (101, 0), (0, 9)])
            .map(|(o, (id, lane))| (id, lane, o.key.group.clone(), o.epoch, Some(o.event.id.to_string())))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_call_past_max_batch_bytes_is_cut_into_chunks_in_order() {
        let mb = vec![b'x'; 1024 * 1024];
        let items: Vec<_> = (0..9).map(|_| item("billing", 1, mb.clone(), true)).collect();
        let chunks = encode_chunks(2, &items, 1, Vec::new());
        // A chunk is closed once it holds MAX_BATCH_BYTES: four events of 1 MiB and their heads.
        assert_eq!(chunks.iter().map(|c| c.n).collect::<Vec<_>>(), vec![4, 4, 1]);
        let mut seen = Vec::new();
        for c in &chunks {
            let d = decode(c.bytes.body());
            assert_eq!(d.len(), c.n, "a chunk's count is what it holds");
            assert!(c.len() < MAX_BATCH_BYTES + mb.len() + 1024, "{} bytes", c.len());
            seen.extend(d.into_iter().map(|d| d.id));
        }
        assert_eq!(
            seen,
            (1..=9).collect::<Vec<u64>>(),
            "ids in publish order, across the chunks"
        );
    }

    #[test]
    fn small_chunks_share_an_envelope_and_large_ones_go_alone() {
        let small = OWN_ENVELOPE_BYTES - 1;
        // The first small chunk: nothing to flush, it waits for company.
        assert_eq!(
            next_chunk(false, 0, small),
            NextChunk {
                flush_small: false,
                own: false
            }
        );
        assert_eq!(
            next_chunk(true, small, small),
            NextChunk {
                flush_small: false,
                own: false
            }
        );
        // A large one sends the small ones gathered so far first, then goes as its own envelope.
        assert_eq!(
            next_chunk(true, small, OWN_ENVELOPE_BYTES),
            NextChunk {
                flush_small: true,
                own: true
            }
        );
        assert_eq!(
            next_chunk(false, 0, OWN_ENVELOPE_BYTES),
            NextChunk {
                flush_small: false,
                own: true
            }
        );
    }

    #[test]
    fn small_chunks_never_make_an_envelope_larger_than_max_batch_bytes() {
        let len = OWN_ENVELOPE_BYTES - 1;
        let fits = MAX_BATCH_BYTES - len;
        assert!(!next_chunk(true, fits, len).flush_small, "exactly MAX_BATCH_BYTES fits");
        assert!(next_chunk(true, fits + 1, len).flush_small);
        // Gathering small chunks by the rule never passes the bound.
        let (mut gathered, mut largest) = (0, 0);
        for _ in 0..1000 {
            let next = next_chunk(gathered > 0, gathered, len);
            if next.flush_small {
                largest = largest.max(gathered);
                gathered = 0;
            }
            gathered += len;
        }
        assert!(largest > 0 && largest <= MAX_BATCH_BYTES, "{largest}");
    }

    #[test]
    fn small_chunks_are_copied_into_one_peer_message_in_order() {
        let items = [item("billing", 1, "{}", true), item("billing", 1, "{}", true)];
        let mut chunks: Vec<Chunk> = items
            .iter()
            .zip([5, 6])
            .map(|(o, id)| encode_chunks(2, std::slice::from_ref(o), id, Vec::new()).remove(0))
            .collect();
        chunks.push(encode_chunks(2, &items, 7, Vec::new()).remove(0));
        let (payload, n) = small_message(&mut chunks);
        assert!(chunks.is_empty(), "the chunks are taken");
        assert_eq!(n, 4);
        let Ok(Some(PeerBody::Events(body))) = decode_peer_message(payload) else {
            panic!("an event batch");
        };
        let ids: Vec<u64> = decode(&body).into_iter().map(|d| d.id).collect();
        assert_eq!(ids, vec![5, 6, 7, 8]);
        // One chunk goes as it was encoded.
        let mut one = vec![encode_chunks(2, &items[..1], 9, Vec::new()).remove(0)];
        let (payload, n) = small_message(&mut one);
        let Ok(Some(PeerBody::Events(body))) = decode_peer_message(payload) else {
            panic!("an event batch");
        };
        assert_eq!((n, decode(&body)[0].id), (1, 9));
    }

    #[test]
    fn acks_finish_refuse_or_are_refused_by_who_may_answer() {
        use AckAction::*;
        use AckCode::*;
        let cases = [
            (Answer::Yes, Ok, Finish),
            (Answer::Yes, DeadLettered, Finish),
            (Answer::Yes, Failed, Finish),
            (Answer::Yes, NotPlaced, Refuse),
            // A late outcome from a node the delivery was routed away from still counts; its
            // refusal says nothing about where the delivery is now.
            (Answer::Earlier, Ok, Finish),
            (Answer::Earlier, Failed, Finish),
            (Answer::Earlier, NotPlaced, Ignore),
            (Answer::Unknown, Ok, Ignore),
            (Answer::Unknown, NotPlaced, Ignore),
            (Answer::NotSentToPeer, Ok, Forged),
            (Answer::NotSentToPeer, NotPlaced, Forged),
        ];
        for (answer, code, action) in cases {
            assert_eq!(ack_action(answer, code), action, "{answer:?} {code:?}");
        }
    }

    #[test]
    fn an_ack_reports_its_outcome_and_an_unknown_code_is_a_failure() {
        assert_eq!(ack_code(AckCode::Ok as i32), AckCode::Ok);
        assert_eq!(ack_code(AckCode::NotPlaced as i32), AckCode::NotPlaced);
        // A code from a newer peer: the event stays in the WAL.
        assert_eq!(ack_code(99), AckCode::Failed);
        assert_eq!(ack_outcome(AckCode::Ok, 2, String::new()), Outcome::Ok { attempts: 2 });
        assert_eq!(
            ack_outcome(AckCode::DeadLettered, 5, "boom".into()),
            Outcome::DeadLettered {
                attempts: 5,
                error: "boom".into()
            }
        );
        assert_eq!(
            ack_outcome(AckCode::Failed, 1, "disk".into()),
            Outcome::Failed {
                attempts: 1,
                error: "disk".into()
            }
        );
    }

    #[test]
    fn a_pending_delivery_s_node_is_placed_moved_or_unhealthy() {
        let health = Health::default();
        let remote = |node| Slot::Remote {
            node,
            health: health.peer(node),
            load: Arc::new(AtomicUsize::new(0)),
        };
        let slots = [Slot::Local, remote(2), remote(3)];
        assert_eq!(node_state(true, &slots, 2), NodeState::Placed);
        assert_eq!(node_state(true, &slots, 3), NodeState::Placed);
        assert_eq!(node_state(true, &slots, 4), NodeState::Moved);
        // This node's own slot is not the remote node the delivery went to.
        assert_eq!(node_state(true, &[Slot::Local], 1), NodeState::Moved);
        assert_eq!(node_state(false, &slots, 2), NodeState::Unhealthy);
    }
}
