//! Accepting events: ack modes, the write-ahead log, completion tracking, replay, dead letters.
//!
//! A publish goes through four steps, in this order so that nothing is acknowledged that cannot be
//! delivered and nothing is queued that is not durable:
//!
//! 1. **Reserve**: take the event's bytes from the in-flight byte budget and reserve room for one
//!    instance per subscription of its topic, wherever the router picks it: a local mailbox slot,
//!    or a unit of the window towards a remote instance. Any refusal → 429.
//! 2. **Log** (`ack=accepted` and `ack=processed`): append to the WAL; the store group-commits.
//! 3. **Send**: local jobs through the reserved slots, remote ones through the relay (which keeps
//!    them pending until the handler node acks); each carries a shared `Tracker`. With `ack=none`
//!    remote ones are sent at-most-once (see the relay's lanes): not kept, not acked, not
//!    tracked, so an event with only remote subscriptions gets no tracker.
//! 4. **Answer**: at once (`none`, `accepted`), or when every subscription finished (`processed`).
//!
//! When the last subscription finishes an event, its tracker removes it from the WAL. On start-up
//! every record still in the WAL is delivered again (at-least-once; handlers may see duplicates).
//! This module does not parse HTTP and does not choose instances.

pub(crate) mod store;

pub use store::{RecordError, StoreError};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{join_all, BoxFuture};
use metrics::{Counter, Gauge};
use serde::Serialize;
use smallvec::SmallVec;
use tokio::sync::{oneshot, Notify};
use utoipa::ToSchema;

use crate::event::{Event, EventError};
use crate::handler::supervisor::{Completion, DeadLetterError, DeadLetterSink, Done, Job, Origin, Outcome, Untracked};
use crate::membership::state::MembershipState;
use crate::proto::{DeadLetterRecord, EventRecord};
use crate::relay::{LocalCopy, Outgoing, Relay};
use crate::router::{NoRoom, Reservation, Route, Router, RoutingTable, Target, TopicRoutes};
use crate::telemetry;
use crate::types::SubscriptionKey;
use store::Store;

/// What the publisher's response waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Queued in memory: at-most-once, fastest.
    None,
    /// Written to the WAL: at-least-once while the node's disk survives.
    #[default]
    Accepted,
    /// Every subscription's handler finished (acknowledged or dead-lettered).
    Processed,
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The event is invalid (400).
    #[error(transparent)]
    Invalid(#[from] EventError),
    /// The node has not joined its cluster, placed its subscriptions or replayed its WAL yet
    /// (503): it does not yet know where events go, so it accepts none.
    #[error("the node is starting (joining its cluster, replaying its WAL); retry shortly")]
    NotReady,
    /// A subscription of the topic is placed on no node (no member runs its handler) (503):
    /// nothing was accepted.
    #[error("{0}")]
    NotHere(String),
    /// Mailboxes or the in-flight byte budget are full (429); retry after the given seconds.
    #[error("{0}; retry later")]
    Overloaded(String),
    /// The WAL could not be written (503); the event was not accepted.
    #[error("the write-ahead log is unavailable: {0}")]
    Unavailable(#[from] StoreError),
    /// This node was removed from its cluster (`DELETE /v1/cluster/nodes/{id}`) while it ran
    /// (503 `removed`): it accepts no events any more.
    #[error("this node was removed from the cluster; publish to another member")]
    Removed,
    /// `ack=processed` did not finish in time (504). The events were accepted and will still be
    /// delivered; `ids` are theirs, in publish order (so a client that let Herald choose the ids
    /// can tell which events these were).
    #[error(
        "not every subscription finished within {after:?}; the events are accepted and still being delivered (ids: {})",
        ids.join(", ")
    )]
    Timeout {
        /// How long the publish waited.
        after: Duration,
        /// The accepted events' ids, in publish order.
        ids: Vec<String>,
    },
}

/// How one subscription finished with an event (`ack=processed`).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct SubscriptionOutcome {
    /// Subscription topic.
    pub topic: String,
    /// Subscription group.
    pub group: String,
    /// `ok`, `dead_lettered`, or `failed` (dead letter could not be stored; kept in the WAL).
    pub outcome: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One accepted event as [`Ingress::publish_answers`] gives it: [`Published`] without copies.
pub(crate) struct Answer {
    /// The event, as delivered.
    pub(crate) event: Arc<Event>,
    /// How many subscriptions will receive it.
    pub(crate) subscriptions: usize,
    /// Each subscription's outcome (`ack=processed` only).
    pub(crate) outcomes: Option<Vec<SubscriptionOutcome>>,
}

impl Answer {
    pub(crate) fn into_published(self) -> Published {
        Published {
            id: self.event.id.to_string(),
            topic: self.event.topic.to_string(),
            subscriptions: self.subscriptions,
            outcomes: self.outcomes,
        }
    }
}

/// The answer for one accepted event.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct Published {
    /// Event id.
    pub id: String,
    /// Topic.
    pub topic: String,
    /// How many subscriptions will receive it.
    pub subscriptions: usize,
    /// Each subscription's outcome (`ack=processed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcomes: Option<Vec<SubscriptionOutcome>>,
}

impl Published {
    /// The answer for an event accepted for `subscriptions` subscriptions, as `ack=none` and
    /// `ack=accepted` give it (for code that stands in for a node, such as a test double of a
    /// publisher).
    pub fn accepted(id: impl Into<String>, topic: impl Into<String>, subscriptions: usize) -> Self {
        Published {
            id: id.into(),
            topic: topic.into(),
            subscriptions,
            outcomes: None,
        }
    }
}

/// A dead letter as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Dead-letter id (use it to replay).
    pub id: String,
    /// The event's topic.
    pub topic: String,
    /// The subscription's group.
    pub group: String,
    /// The event id.
    pub event_id: String,
    /// Partition key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// When it was dead-lettered (RFC 3339).
    pub failed_at: String,
    /// The payload's content type.
    pub content_type: String,
    /// The payload: JSON as is, other content as a UTF-8 string (lossy).
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

impl DeadLetter {
    /// The API's view of the stored dead letter `id` (`None` when the record has no event).
    pub(crate) fn from_record(id: String, r: DeadLetterRecord) -> Option<DeadLetter> {
        let e = r.event?;
        let data = if crate::event::is_json(&e.content_type) {
            serde_json::from_slice(&e.data).unwrap_or(serde_json::Value::Null)
        } else {
            serde_json::Value::String(String::from_utf8_lossy(&e.data).into_owned())
        };
        Some(DeadLetter {
            id,
            topic: e.topic,
            group: r.group,
            event_id: e.id,
            key: e.key,
            attempts: r.attempts,
            error: r.error,
            failed_at: chrono::DateTime::<chrono::Utc>::from_timestamp_millis(r.failed_at_unix_ms)
                .unwrap_or_default()
                .to_rfc3339(),
            content_type: e.content_type,
            data,
        })
    }
}

/// Why a dead letter could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No dead letter with that id.
    #[error("no dead letter {0}")]
    NotFound(String),
    /// The subscription it belonged to no longer exists.
    #[error("subscription {0} no longer exists; create it again to replay")]
    SubscriptionGone(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The outcomes gathered so far and the publisher waiting for all of them (`ack=processed`).
type Waiter = (
    Vec<SubscriptionOutcome>,
    Option<oneshot::Sender<Vec<SubscriptionOutcome>>>,
);

/// Tracks one accepted event until every subscription finished it.
struct Tracker {
    remaining: AtomicUsize,
    /// The WAL record to drop when done, and its store (none for `ack=none`: no store handle is
    /// cloned for an event that has no record).
    record: Option<(u64, Store)>,
    /// Set when a subscription could not finish (dead letter not stored): keep the WAL record.
    keep: AtomicBool,
    /// `ack=processed`: the outcomes so far and who waits for them.
    waiter: Option<Mutex<Waiter>>,
    inflight: Gauge,
    /// Returns the event's bytes to the in-flight budget when the tracker is dropped.
    _bytes: BudgetShare,
}

/// The in-flight byte budget: a lock-free counter (a semaphore would take a lock on every release,
/// which is every event).
struct Budget {
    used: AtomicUsize,
    max: usize,
    /// Waiters of `take` (replays); releases notify only when someone waits.
    waiting: AtomicUsize,
    freed: Notify,
}

/// Bytes taken from the budget; given back on drop, unless handed to a job
/// ([`BudgetShare::untracked`]).
struct BudgetShare {
    budget: Arc<Budget>,
    bytes: usize,
}

impl BudgetShare {
    /// The bytes, for a job that owes them as [`Done::Untracked`]: given back through the
    /// node's [`InFlight`] instead of by this share.
    fn untracked(mut self) -> usize {
        std::mem::take(&mut self.bytes)
    }

    /// How many bytes it holds.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.release(self.bytes);
        }
    }
}

/// What the events in flight on this node hold: the byte budget (`handlers.max_inflight_bytes`)
/// and the in-flight gauge. Built before the router, whose instances give back what untracked
/// jobs held here ([`Done::Untracked`]: an `ack=none` event published here to one local instance,
/// which no tracker follows).
pub(crate) struct InFlight {
    bytes: Arc<Budget>,
    events: Gauge,
}

impl InFlight {
    pub(crate) fn new(max_bytes: usize) -> Arc<InFlight> {
        Arc::new(InFlight {
            bytes: Budget::new(max_bytes),
            events: metrics::gauge!(crate::metrics::INFLIGHT_EVENTS),
        })
    }
}

impl Untracked for InFlight {
    fn done(&self, events: usize, bytes: usize) {
        self.bytes.release(bytes);
        self.events.decrement(events as f64);
    }
}

impl Budget {
    /// Gives `bytes` back, waking the waiters of [`Budget::take`] if there are any.
    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// A budget of `max` bytes, none taken.
    fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            max,
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    fn try_take(self: &Arc<Self>, bytes: usize) -> Option<BudgetShare> {
        // An event larger than the whole budget is still admitted when nothing else is in flight.
        let bytes = bytes.min(self.max);
        let before = self.used.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.max {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return None;
        }
        Some(BudgetShare {
            budget: self.clone(),
            bytes,
        })
    }

    /// Waits until `bytes` fit (replays, which must not be refused).
    async fn take(self: &Arc<Self>, bytes: usize) -> BudgetShare {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            self.waiting.fetch_add(1, Ordering::AcqRel);
            freed.as_mut().enable();
            let share = self.try_take(bytes);
            if share.is_none() {
                freed.await;
            }
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            if let Some(share) = share {
                return share;
            }
        }
    }
}

impl Completion for Tracker {
    fn complete(&self, sub: &SubscriptionKey, outcome: Outcome) {
        if matches!(outcome, Outcome::Failed { .. }) {
            self.keep.store(true, Ordering::Relaxed);
        }
        if let Some(waiter) = &self.waiter {
            let (label, attempts, error) = match outcome {
                Outcome::Ok { attempts } => ("ok", attempts, None),
                Outcome::DeadLettered { attempts, error } => ("dead_lettered", attempts, Some(error)),
                Outcome::Failed { attempts, error } => ("failed", attempts, Some(error)),
            };
            let mut w = waiter.lock().unwrap_or_else(|p| p.into_inner());
            w.0.push(SubscriptionOutcome {
                topic: sub.topic.clone(),
                group: sub.group.clone(),
                outcome: label.to_string(),
                attempts,
                error,
            });
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }
}

impl Tracker {
    /// The tracker of an event owed to `n` subscriptions, at WAL sequence `seq` (none for
    /// `ack=none`), holding its `bytes` of the budget; with `wait` (`ack=processed`), the receiver
    /// of its outcomes once all `n` are in. Counts it in the in-flight gauge until it finishes.
    fn new(
        n: usize,
        seq: Option<u64>,
        store: &Store,
        bytes: BudgetShare,
        inflight: Gauge,
        wait: bool,
    ) -> (Arc<Tracker>, Option<oneshot::Receiver<Vec<SubscriptionOutcome>>>) {
        let (waiter, rx) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(Mutex::new((Vec::with_capacity(n), Some(tx)))), Some(rx))
        } else {
            (None, None)
        };
        inflight.increment(1.0);
        let t = Tracker {
            remaining: AtomicUsize::new(n),
            record: seq.map(|seq| (seq, store.clone())),
            keep: AtomicBool::new(false),
            waiter,
            inflight,
            _bytes: bytes,
        };
        (Arc::new(t), rx)
    }

    fn finish(&self) {
        if let (Some((seq, store)), false) = (&self.record, self.keep.load(Ordering::Relaxed)) {
            store.ack(*seq);
        }
        self.inflight.decrement(1.0);
        if let Some(waiter) = &self.waiter {
            let mut w = waiter.lock().unwrap_or_else(|p| p.into_inner());
            let outcomes = std::mem::take(&mut w.0);
            if let Some(tx) = w.1.take() {
                let _ = tx.send(outcomes);
            }
        }
    }
}

/// The dead-letter sink handed to handler supervisors.
pub(crate) struct StoreDeadLetters(pub(crate) Store);

impl DeadLetterSink for StoreDeadLetters {
    fn store(
        &self,
        sub: &SubscriptionKey,
        event: &Event,
        attempts: u32,
        error: &str,
    ) -> BoxFuture<'static, Result<(), DeadLetterError>> {
        let record = DeadLetterRecord {
            event: Some(EventRecord::from(event)),
            group: sub.group.clone(),
            attempts,
            error: error.to_string(),
            failed_at_unix_ms: chrono::Utc::now().timestamp_millis(),
        };
        let store = self.0.clone();
        Box::pin(async move {
            store
                .put_dead_letter(crate::event::new_ordered_id(), record)
                .await
                .map_err(DeadLetterError::from)
        })
    }
}

/// Accepts events and sees them through to every subscription.
pub struct Ingress {
    router: Arc<Router>,
    relay: Arc<Relay>,
    store: Store,
    /// The in-flight byte budget (`handlers.max_inflight_bytes`) and gauge, shared with the
    /// instances that give back what untracked jobs held.
    in_flight: Arc<InFlight>,
    rejected: Counter,
    /// `events_published_total{topic="(other)"}`: events of topics without subscriptions share
    /// one series, so publishing to ever new topics cannot add series without bound.
    published_other: Counter,
    /// `events_unrouted_total{topic}`: events accepted for a topic without subscriptions.
    unrouted: crate::metrics::TopicCounters,
    /// Set once the WAL has been replayed (for [`Ingress::wait_ready`]).
    ready: tokio::sync::watch::Sender<bool>,
    /// The same, read by every publish: a plain load, where the watch's value sits behind a lock.
    is_ready: AtomicBool,
    /// This node's place in the committed membership table, as [`Ingress::follow_membership`]
    /// learns it.
    membership: Membership,
    /// Which publishes without a trace context start a trace (`telemetry.sample_ratio`).
    sampler: crate::telemetry::Sampler,
}

/// [`Membership`]: not a member yet (starting, joining).
const NOT_YET: u8 = 0;
/// [`Membership`]: a member of the committed table.
const MEMBER: u8 = 1;
/// [`Membership`]: was a member, and the committed table no longer lists it.
const REMOVED: u8 = 2;

/// This node's place in the committed membership table: [`NOT_YET`], [`MEMBER`], or [`REMOVED`]
/// (for good: it accepts nothing more).
struct Membership(std::sync::atomic::AtomicU8);

impl Membership {
    fn new() -> Membership {
        Membership(std::sync::atomic::AtomicU8::new(NOT_YET))
    }

    /// See [`Ingress::follow_membership`].
    fn follow(&self, listed: bool) -> bool {
        if listed {
            // A removed node stays removed (a new membership needs a restart and a new Join).
            let _ = self
                .0
                .compare_exchange(NOT_YET, MEMBER, Ordering::AcqRel, Ordering::Acquire);
            return false;
        }
        self.0
            .compare_exchange(MEMBER, REMOVED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn is_removed(&self) -> bool {
        self.0.load(Ordering::Acquire) == REMOVED
    }
}

/// One event after [`Ingress::reserve`]: its share of the byte budget and, per subscription of
/// its topic, the route and the room reserved on it (inline for the usual one or two: no
/// allocation per event).
type ReservedEvent<'t> = (BudgetShare, SmallVec<[(&'t Route, Target<'t>); 2]>);

/// An `ack=processed` answer still to fill in: its index among the answers, and the receiver of
/// its subscriptions' outcomes.
type OutcomeWait = (usize, oneshot::Receiver<Vec<SubscriptionOutcome>>);

/// What [`Ingress::reserve`] holds for a call: the reserved events, and how many events of each
/// run of one topic to count as published once the call is accepted.
struct Reserved<'t> {
    /// Inline for one event (`emit`, a single publish): no allocation per call.
    events: SmallVec<[ReservedEvent<'t>; 1]>,
    /// Finished runs of one topic, with their counts.
    runs: Vec<(PublishedCount<'t>, u64)>,
    /// The run under way: its first event's index, its counter and its count.
    run: Option<(usize, PublishedCount<'t>, u64)>,
}

impl<'t> Reserved<'t> {
    /// Counts event `i` in its topic's run (`events_published_total{topic}` is counted per run of
    /// one topic, a batch being one run): the topic's handle from the table, or the shared
    /// `(other)` series for a topic without subscriptions.
    fn count(&mut self, i: usize, events: &[Event], entry: Option<&'t TopicRoutes>) {
        match &mut self.run {
            Some((first, _, n)) if events[*first].topic == events[i].topic => *n += 1,
            _ => {
                let counter = match entry {
                    Some(t) => PublishedCount::Handle(&t.published),
                    None => PublishedCount::Other(events[i].topic.to_string()),
                };
                if let Some((_, counter, n)) = self.run.replace((i, counter, 1)) {
                    self.runs.push((counter, n));
                }
            }
        }
    }

    /// Adds the runs to `events_published_total` (once everything is accepted).
    fn count_published(&mut self, ingress: &Ingress) {
        let last = self.run.take().map(|(_, counter, n)| (counter, n));
        for (counter, n) in self.runs.drain(..).chain(last) {
            match counter {
                PublishedCount::Handle(c) => c.increment(n),
                PublishedCount::Other(topic) => {
                    ingress.published_other.increment(n);
                    ingress.unrouted.increment(&topic, n);
                }
            }
        }
    }
}

/// Where one run of a topic's events is counted in `events_published_total{topic}`.
enum PublishedCount<'a> {
    /// The handle the routing table resolved for a topic with subscriptions.
    Handle(&'a Counter),
    /// A topic without subscriptions: counted in the shared `(other)` series, and in
    /// `events_unrouted_total{topic}` (the event goes nowhere).
    Other(String),
}

/// The `ack` attribute of a publish span.
fn ack_name(ack: AckMode) -> &'static str {
    match ack {
        AckMode::None => "none",
        AckMode::Accepted => "accepted",
        AckMode::Processed => "processed",
    }
}

/// A replayed event (`from`: `wal` or `dead_letter`) whose original trace was sampled gets a
/// `replay` span, the root of a new trace linked to the original one; its deliveries are the
/// span's children. Others keep their context.
fn replay_traced(mut event: Event, from: &'static str) -> Event {
    let Some(original) = event.trace.as_ref().filter(|_| telemetry::traced(event.trace.as_ref())) else {
        return event;
    };
    let span = tracing::info_span!(
        target: "herald::trace",
        parent: None,
        "replay",
        herald.replay = from,
        herald.event_id = &*event.id,
        herald.topic = &*event.topic,
    );
    telemetry::link(&span, original);
    event.trace = telemetry::context_or(&span, event.trace.as_ref());
    event
}

/// [`Ingress::admit`]: every event is valid (checked first: a bad request is the caller's to fix
/// whatever the node's state), then the node was not removed (for good), then it is ready.
fn admission(
    events: &[Event],
    removed: impl FnOnce() -> bool,
    ready: impl FnOnce() -> bool,
) -> Result<(), PublishError> {
    let mut previous = None;
    for e in events {
        e.validate_after(previous)?;
        previous = Some(e);
    }
    if removed() {
        return Err(PublishError::Removed);
    }
    if !ready() {
        return Err(PublishError::NotReady);
    }
    Ok(())
}

/// [`Ingress::dead_letter_records`]: the stored dead letters in id order after `after`, at most
/// `limit`, of `topic` and `group` when given; records without an event are skipped.
fn dead_letter_records(
    store: &Store,
    after: Option<&str>,
    limit: usize,
    topic: Option<&str>,
    group: Option<&str>,
) -> Result<Vec<(String, DeadLetterRecord)>, StoreError> {
    let mut out = Vec::new();
    let mut cursor = after.map(str::to_string);
    // Filtering happens after reading, so read pages until `limit` matches or the end.
    loop {
        let page = store.dead_letters(cursor.as_deref(), DEAD_LETTER_PAGE)?;
        let done = page.len() < DEAD_LETTER_PAGE;
        for (id, r) in page {
            cursor = Some(id.clone());
            let Some(e) = &r.event else { continue };
            if topic.is_some_and(|t| t != e.topic) || group.is_some_and(|g| g != r.group) {
                continue;
            }
            out.push((id, r));
            if out.len() >= limit {
                return Ok(out);
            }
        }
        if done {
            return Ok(out);
        }
    }
}

/// Dead letters read from the store per page while listing them.
const DEAD_LETTER_PAGE: usize = 512;

/// WAL records read per chunk during start-up replay.
const REPLAY_CHUNK: usize = 1024;

/// Bytes charged against the budget for one event: its payload plus a fixed overhead, so that
/// many empty events are bounded too.
fn charge(e: &Event) -> usize {
    e.data.len() + 256
}

impl Ingress {
    pub(crate) fn new(
        router: Arc<Router>,
        relay: Arc<Relay>,
        store: Store,
        in_flight: Arc<InFlight>,
        sampler: crate::telemetry::Sampler,
    ) -> Self {
        Ingress {
            router,
            relay,
            store,
            in_flight,
            rejected: metrics::counter!(crate::metrics::EVENTS_REJECTED),
            published_other: metrics::counter!(crate::metrics::EVENTS_PUBLISHED, "topic" => crate::metrics::OTHER_TOPIC),
            unrouted: crate::metrics::TopicCounters::new(
                crate::metrics::EVENTS_UNROUTED,
                crate::metrics::UNROUTED_TOPICS,
            ),
            ready: tokio::sync::watch::Sender::new(false),
            is_ready: AtomicBool::new(false),
            membership: Membership::new(),
            sampler,
        }
    }

    /// The `publish` span of each traced event (sampled, or starting a trace by the sampler),
    /// and the event's context set to it: the WAL keeps it, local deliveries and forward spans
    /// are its children. Events that are not traced keep their context as given (passed on). No
    /// span, no id drawn, when nothing records the spans.
    fn trace_publish(&self, events: &mut [Event], ack: AckMode) -> Vec<telemetry::EventSpan> {
        use opentelemetry::KeyValue;
        let mut spans = Vec::new();
        for e in events.iter_mut() {
            let start = match &e.trace {
                Some(t) => t.sampled() && telemetry::enabled(),
                None => self.sampler.start(),
            };
            if !start || !telemetry::admit() {
                continue;
            }
            let span = telemetry::EventSpan::start(
                "publish",
                opentelemetry::trace::SpanKind::Server,
                e.trace.as_ref(),
                || {
                    vec![
                        KeyValue::new("herald.event_id", e.id.to_string()),
                        KeyValue::new("herald.topic", e.topic.to_string()),
                        KeyValue::new("herald.ack", ack_name(ack)),
                    ]
                },
                || {
                    tracing::info_span!(
                        target: "herald::trace",
                        parent: None,
                        "publish",
                        otel.kind = "server",
                        herald.event_id = &*e.id,
                        herald.topic = &*e.topic,
                        herald.ack = ack_name(ack),
                        herald.error = tracing::field::Empty,
                        otel.status_code = tracing::field::Empty,
                    )
                },
            );
            e.trace = span.context_or(e.trace.as_ref());
            spans.push(span);
        }
        spans
    }

    /// Follows whether the committed membership table lists this node. A node that was a member
    /// and is no longer listed was removed (`DELETE /v1/cluster/nodes/{id}`): from then on it
    /// refuses every publish ([`PublishError::Removed`]) and is not ready. Returns true on the
    /// change that removes it (once), for the caller to say so.
    pub(crate) fn follow_membership(&self, listed: bool) -> bool {
        self.membership.follow(listed)
    }

    /// Whether this node was removed from its cluster while it ran (see
    /// `Ingress::follow_membership`).
    pub fn is_removed(&self) -> bool {
        self.membership.is_removed()
    }

    /// The first topic of `events` that has no subscription anywhere in the cluster (its events
    /// would be accepted and delivered nowhere), for publishers that ask to be refused instead
    /// (`require_subscription`).
    pub fn unsubscribed_topic<'e>(&self, events: &'e [Event]) -> Option<&'e str> {
        let table = self.router.table();
        events.iter().map(|e| &*e.topic).find(|t| table.topic(t).is_none())
    }

    /// Whether the WAL has been replayed.
    pub fn is_ready(&self) -> bool {
        self.is_ready.load(Ordering::Acquire)
    }

    /// The WAL has been replayed: the node is ready.
    fn mark_ready(&self) {
        self.is_ready.store(true, Ordering::Release);
        self.ready.send_replace(true);
    }

    /// Waits until the WAL has been replayed (the node is ready).
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }

    fn overloaded(&self, why: &str) -> PublishError {
        self.rejected.increment(1);
        PublishError::Overloaded(why.to_string())
    }

    fn tracker(
        &self,
        n: usize,
        seq: Option<u64>,
        bytes: BudgetShare,
        wait: bool,
    ) -> (Arc<Tracker>, Option<oneshot::Receiver<Vec<SubscriptionOutcome>>>) {
        Tracker::new(n, seq, &self.store, bytes, self.in_flight.events.clone(), wait)
    }

    /// Publishes one event. `timeout` bounds `ack=processed` (the 504 case: the event is still
    /// accepted and delivered).
    pub async fn publish(&self, event: Event, ack: AckMode, timeout: Duration) -> Result<Published, PublishError> {
        let mut answers = self.publish_batch(vec![event], ack, timeout).await?;
        // One event in, one answer out: `publish_batch` answers every accepted event.
        Ok(answers.pop().expect("publish_batch answers every event it accepts"))
    }

    /// Publishes events (all or none are accepted), answering each in order. `timeout` bounds
    /// `ack=processed`. The stages, in the order the module docs give: `admit`, `reserve`, `log`,
    /// `send`, then waiting for the handlers.
    pub async fn publish_batch(
        &self,
        events: Vec<Event>,
        ack: AckMode,
        timeout: Duration,
    ) -> Result<Vec<Published>, PublishError> {
        let answers = self.publish_answers(events, ack, timeout).await?;
        Ok(answers.into_iter().map(Answer::into_published).collect())
    }

    /// [`Ingress::publish_batch`], answering with the accepted events themselves (shared with
    /// the deliveries) instead of a copy of each one's id and topic: the HTTP batch route
    /// writes its answer's ids straight from them.
    pub(crate) async fn publish_answers(
        &self,
        events: Vec<Event>,
        ack: AckMode,
        timeout: Duration,
    ) -> Result<Vec<Answer>, PublishError> {
        let mut events = events;
        self.admit(&events)?;
        let mut spans = self.trace_publish(&mut events, ack);
        let result = self.publish_traced(events, ack, timeout).await;
        if let Err(e) = &result {
            Self::record_error(&mut spans, e);
        }
        result
    }

    /// [`Ingress::publish_batch`] once the events are admitted and their publish spans made.
    async fn publish_traced(
        &self,
        events: Vec<Event>,
        ack: AckMode,
        timeout: Duration,
    ) -> Result<Vec<Answer>, PublishError> {
        let table = self.router.table();
        let mut reserved = self.reserve(&table, &events)?;
        let seqs = self.log(&events, &reserved.events, ack).await?;
        reserved.count_published(self);
        let mut answers = Vec::with_capacity(events.len());
        let waits = self.send(
            events.into_iter().map(Arc::new),
            reserved.events,
            seqs,
            ack,
            Some(&mut answers),
        );
        Self::wait_outcomes(answers, waits, timeout).await
    }

    /// Publishes one event with `ack=none` and answers only whether it was accepted: Herald's
    /// `do_send`. The same checks, routing, limits and refusals as [`Ingress::publish`] with
    /// [`AckMode::None`] (at most once, never written to the WAL), without waiting and without
    /// building a [`Published`] answer (the caller has the event's id already), so it can be
    /// called from inside a synchronous actor handler.
    pub fn emit(&self, mut event: Event) -> Result<(), PublishError> {
        self.admit(std::slice::from_ref(&event))?;
        let mut spans = self.trace_publish(std::slice::from_mut(&mut event), AckMode::None);
        // Into its `Arc` once, here: the event (some 300 bytes) is not moved again on its way.
        let result = self.emit_traced(Arc::new(event));
        if let Err(e) = &result {
            Self::record_error(&mut spans, e);
        }
        result
    }

    /// [`Ingress::emit`] once the event is admitted and its publish span made (stages 1 and 3 of
    /// [`Ingress::publish_traced`]: `ack=none` logs nothing and waits for nothing).
    fn emit_traced(&self, event: Arc<Event>) -> Result<(), PublishError> {
        // A guard, not a clone of the table's `Arc`: two contended updates fewer per event.
        let table = self.router.table_guard();
        // The in-process case, a topic of one subscription: its reservation is made here and a
        // local instance's job sent at once (what `reserve` and `send` do for it, without their
        // per-call lists: a call of one event to one instance moved some 700 bytes of them).
        if let Some(topic) = table.topic(&event.topic) {
            if let [route] = topic.routes.as_slice() {
                let share = self.take_budget(&event)?;
                let target = self.reserve_on(route, &event)?;
                topic.published.increment(1);
                match target {
                    Target::Local(slot) => slot.send(self.untracked_job(event, share)),
                    target => {
                        let reserved = smallvec::smallvec![(share, smallvec::smallvec![(route.as_ref(), target)])];
                        self.send([event], reserved, Vec::new().into_iter(), AckMode::None, None);
                    }
                }
                return Ok(());
            }
        }
        let mut reserved = self.reserve(&table, std::slice::from_ref(&*event))?;
        reserved.count_published(self);
        self.send([event], reserved.events, Vec::new().into_iter(), AckMode::None, None);
        Ok(())
    }

    /// Marks the publish spans of a refused call with its error.
    fn record_error(spans: &mut [telemetry::EventSpan], e: &PublishError) {
        for span in spans {
            span.fail(e);
        }
    }

    /// Stage 4: waits up to `timeout` for the outcomes of the answers that wait for them
    /// (`ack=processed`).
    async fn wait_outcomes(
        mut answers: Vec<Answer>,
        waits: Vec<OutcomeWait>,
        timeout: Duration,
    ) -> Result<Vec<Answer>, PublishError> {
        if !waits.is_empty() {
            let (indexes, receivers): (Vec<usize>, Vec<_>) = waits.into_iter().unzip();
            let results = match tokio::time::timeout(timeout, join_all(receivers)).await {
                Ok(results) => results,
                Err(_) => {
                    return Err(PublishError::Timeout {
                        after: timeout,
                        ids: answers.iter().map(|a| a.event.id.to_string()).collect(),
                    })
                }
            };
            for (i, r) in indexes.into_iter().zip(results) {
                answers[i].outcomes = Some(r.unwrap_or_default());
            }
        }
        Ok(answers)
    }

    /// Stage 0: every event is valid and the node knows where events go.
    fn admit(&self, events: &[Event]) -> Result<(), PublishError> {
        admission(events, || self.is_removed(), || self.is_ready())
    }

    /// Stage 1: takes each event's bytes from the budget and reserves room for one instance per
    /// subscription of its topic. Any refusal gives everything back (the reservations drop).
    fn reserve<'t>(&self, table: &'t RoutingTable, events: &[Event]) -> Result<Reserved<'t>, PublishError> {
        let mut reserved = Reserved {
            events: SmallVec::with_capacity(events.len()),
            runs: Vec::new(),
            run: None,
        };
        for (i, e) in events.iter().enumerate() {
            let permit = self.take_budget(e)?;
            let entry = table.topic(&e.topic);
            reserved.count(i, events, entry);
            let routes = entry.map_or(&[][..], |t| t.routes.as_slice());
            let mut slots = SmallVec::with_capacity(routes.len());
            for route in routes {
                slots.push((route.as_ref(), self.reserve_on(route, e)?));
            }
            reserved.events.push((permit, slots));
        }
        Ok(reserved)
    }

    /// The job of an `ack=none` event whose one tracked target is a local instance: it owes only
    /// its bytes (`Done::Untracked`), which the instance gives back to the node's `InFlight`, and
    /// counts in the in-flight gauge until then.
    fn untracked_job(&self, event: Arc<Event>, share: BudgetShare) -> Job {
        self.in_flight.events.increment(1.0);
        Job {
            event,
            done: Done::Untracked {
                bytes: share.untracked(),
            },
            origin: Origin::LocalAtMostOnce,
        }
    }

    /// Takes `e`'s bytes from the node's in-flight budget (stage 1).
    fn take_budget(&self, e: &Event) -> Result<BudgetShare, PublishError> {
        self.in_flight
            .bytes
            .try_take(charge(e))
            .ok_or_else(|| self.overloaded("the node holds its maximum of in-flight event bytes"))
    }

    /// Reserves room for `e` on one subscription's `route` (stage 1), or the publish's refusal.
    fn reserve_on<'t>(&self, route: &'t Route, e: &Event) -> Result<Target<'t>, PublishError> {
        route.reserve(e.key.as_deref()).map_err(|why| match why {
            NoRoom::Full => self.overloaded(&format!("the instances of subscription {} are full", route.key)),
            NoRoom::Unplaced => PublishError::NotHere(format!(
                "no node can run subscription {} (is its handler registered on any up node?); nothing was accepted",
                route.key
            )),
        })
    }

    /// Stage 2: appends the events that have somewhere to go to the WAL (not with `ack=none`);
    /// their WAL sequence numbers, in order.
    async fn log(
        &self,
        events: &[Event],
        reserved: &[ReservedEvent<'_>],
        ack: AckMode,
    ) -> Result<std::vec::IntoIter<u64>, PublishError> {
        if ack == AckMode::None {
            return Ok(Vec::new().into_iter());
        }
        // Encoded here, once, straight from the events (no `EventRecord` copies).
        let records: Vec<Vec<u8>> = events
            .iter()
            .zip(reserved)
            .filter(|(_, (_, slots))| !slots.is_empty())
            .map(|(e, (_, slots))| {
                store::wal_value(|buf| {
                    crate::proto::encode_wal_record(e, slots.iter().map(|(route, _)| route.key.group.as_str()), buf)
                })
            })
            .collect();
        if records.is_empty() {
            return Ok(Vec::new().into_iter());
        }
        let seqs = self.store.append(records).await?;
        Ok(seqs.into_iter())
    }

    /// Stage 3: sends each event through its reservations — local jobs to their mailboxes,
    /// remote ones to the relay (once per peer for the whole call), parked ones to the relay's
    /// parking — with one completion tracker per event. Pushes each event's answer to `answers`
    /// (when given: `ack=processed` needs them) and returns, for `ack=processed`, the receivers of
    /// the outcomes to wait for (with the answer's index).
    fn send(
        &self,
        events: impl IntoIterator<Item = Arc<Event>>,
        reserved: SmallVec<[ReservedEvent<'_>; 1]>,
        mut seqs: std::vec::IntoIter<u64>,
        ack: AckMode,
        mut answers: Option<&mut Vec<Answer>>,
    ) -> Vec<OutcomeWait> {
        let mut waits = Vec::new();
        let mut remote: Vec<(u64, Vec<Outgoing>)> = Vec::new();
        // Copies for this node's instances (not `ack=none`), checked against the dedup window
        // together once every event is through.
        let mut local: Vec<(Reservation<'_>, LocalCopy)> = Vec::new();
        // Budget shares of untracked (at-most-once) events, given back once they are encoded.
        let mut held = Vec::new();
        for (event, (permit, slots)) in events.into_iter().zip(reserved) {
            let n = slots.len();
            if let Some(answers) = answers.as_deref_mut() {
                answers.push(Answer {
                    event: event.clone(),
                    subscriptions: n,
                    outcomes: (ack == AckMode::Processed).then(Vec::new),
                });
            }
            if n == 0 {
                continue;
            }
            let seq = if ack == AckMode::None { None } else { seqs.next() };
            // `ack=none` events for remote instances are sent at-most-once: nothing tracks them
            // (the relay sends them on a lane and forgets them), so an event with only remote
            // subscriptions gets no tracker; its bytes stay charged until the relay encoded it.
            let at_most_once = |t: &Target| ack == AckMode::None && matches!(t, Target::Remote(_));
            let tracked = slots.iter().filter(|(_, t)| !at_most_once(t)).count();
            // `ack=none` with one local instance the only tracked target (the common in-process
            // case): the job owes only its bytes (`Done::Untracked`), which its instance gives
            // back to the node's `InFlight`, so the event makes no tracker (an allocation and its
            // cross-thread free per event) and touches no shared reference count.
            let mut untracked = None;
            let tracker = if tracked == 0 {
                held.push(permit);
                None
            } else if ack == AckMode::None && tracked == 1 && slots.iter().any(|(_, t)| matches!(t, Target::Local(_))) {
                untracked = Some(permit);
                None
            } else {
                let (tracker, rx) = self.tracker(tracked, seq, permit, ack == AckMode::Processed);
                if let (Some(rx), Some(answers)) = (rx, answers.as_deref()) {
                    waits.push((answers.len() - 1, rx));
                }
                Some(tracker)
            };
            let tracker = || -> Arc<Tracker> { tracker.clone().expect("a tracked target has a tracker") };
            // The event's `Arc` for each slot: a clone for all but the last, which takes it (two
            // reference-count updates fewer per event than a clone each and a drop).
            let (mut event, mut left) = (Some(event), n);
            let mut next_event = || {
                left -= 1;
                if left == 0 { event.take() } else { event.clone() }.expect("one per slot")
            };
            for (route, target) in slots {
                let once = at_most_once(&target);
                match target {
                    // At most once: not de-duplicated (as on a lane to another node).
                    Target::Local(slot) if ack == AckMode::None => slot.send(match untracked.take() {
                        Some(share) => self.untracked_job(next_event(), share),
                        None => Job {
                            event: next_event(),
                            done: Done::Tell(tracker()),
                            origin: Origin::LocalAtMostOnce,
                        },
                    }),
                    Target::Local(slot) => local.push((
                        slot,
                        LocalCopy {
                            key: route.key.clone(),
                            event: next_event(),
                            completion: tracker(),
                        },
                    )),
                    Target::Remote(slot) => {
                        let (node, load) = slot.take();
                        let outgoing = Outgoing {
                            key: route.key.clone(),
                            epoch: route.epoch,
                            load,
                            event: next_event(),
                            completion: if once {
                                None
                            } else {
                                Some(tracker() as Arc<dyn Completion>)
                            },
                        };
                        match remote.iter_mut().find(|(n, _)| *n == node) {
                            Some((_, items)) => items.push(outgoing),
                            None => remote.push((node, vec![outgoing])),
                        }
                    }
                    Target::Parked => {
                        // `ack=none` stays at-most-once while parked: routed once, never re-sent.
                        self.relay
                            .park(route.key.clone(), next_event(), tracker(), ack == AckMode::None)
                    }
                }
            }
        }
        if !local.is_empty() {
            // One rule whatever the path: the hosting node runs a `(subscription, event id)` once
            // within its dedup window, be it published here or forwarded (see `relay::inbound`).
            let (slots, copies): (Vec<_>, Vec<_>) = local.into_iter().unzip();
            let events: Vec<Arc<Event>> = copies.iter().map(|c| c.event.clone()).collect();
            for ((slot, event), run) in slots.into_iter().zip(events).zip(self.relay.seen_here(copies)) {
                if let Some(completion) = run {
                    slot.send(Job {
                        event,
                        done: Done::Tell(completion),
                        origin: Origin::Local,
                    });
                }
            }
        }
        for (node, items) in remote {
            self.relay.forward(node, items);
        }
        drop(held);
        waits
    }

    /// Whether a node following `state` replays its WAL now: every subscription the table has is
    /// placed, so WAL events find their instances (a router that follows no placement yet would
    /// find none). `node::cluster_sync` asks it of each applied table until it replays.
    pub(crate) fn may_replay(state: &MembershipState) -> bool {
        state.subscriptions().keys().all(|k| state.placement().contains_key(k))
    }

    /// [`Ingress::replay_wal`] for the subscriptions `state` has: an event owed only to others
    /// (deleted) is dropped.
    pub(crate) async fn replay_for(&self, state: &MembershipState) -> Result<usize, StoreError> {
        self.replay_wal(|topic, group| {
            state.subscriptions().contains_key(&SubscriptionKey {
                topic: topic.to_string(),
                group: group.to_string(),
            })
        })
        .await
    }

    /// Delivers every event left in the WAL (start-up), then marks the node ready. `exists` says
    /// whether a subscription exists in the cluster: an event owed only to deleted subscriptions is
    /// dropped. The relay routes the rest (locally or to the nodes that run them).
    ///
    /// The WAL is read [`REPLAY_CHUNK`] records at a time, and each event waits for room in the
    /// in-flight byte budget, so memory stays bounded by the budget whatever the WAL holds.
    /// Records that do not decode are moved to the quarantine table, counted
    /// (`herald_wal_quarantined_total`) and logged once with their sequence numbers.
    pub(crate) async fn replay_wal(&self, exists: impl Fn(&str, &str) -> bool) -> Result<usize, StoreError> {
        let Some(upto) = self.store.wal_last()? else {
            self.mark_ready();
            return Ok(0);
        };
        let mut after = None;
        let mut total = 0usize;
        let mut orphans = 0usize;
        let mut quarantined: Vec<u64> = Vec::new();
        loop {
            let chunk = self.store.wal_chunk(after, upto, REPLAY_CHUNK)?;
            let Some(&(last, _)) = chunk.last() else { break };
            after = Some(last);
            if total == 0 {
                tracing::info!(from = chunk[0].0, to = upto, "replaying the write-ahead log");
            }
            let mut dropped = Vec::new();
            let mut bad = Vec::new();
            for (seq, record) in chunk {
                total += 1;
                let record = match record {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(seq, error = %e, "damaged WAL record (checksum failed or undecodable)");
                        bad.push(seq);
                        continue;
                    }
                };
                let Some(event) = record.event.map(Event::from) else {
                    dropped.push(seq);
                    continue;
                };
                let owed: Vec<SubscriptionKey> = record
                    .groups
                    .iter()
                    .filter(|g| exists(&event.topic, g))
                    .map(|g| SubscriptionKey {
                        topic: event.topic.to_string(),
                        group: g.clone(),
                    })
                    .collect();
                if owed.is_empty() {
                    orphans += 1;
                    dropped.push(seq);
                    continue;
                }
                let permit = self.in_flight.bytes.take(charge(&event)).await;
                let (tracker, _) = self.tracker(owed.len(), Some(seq), permit, false);
                let event = Arc::new(replay_traced(event, "wal"));
                for key in owed {
                    self.relay.park(Arc::new(key), event.clone(), tracker.clone(), false);
                }
            }
            self.store.ack_all(dropped);
            if !bad.is_empty() {
                let moved = self.store.quarantine(bad.clone()).await?;
                metrics::counter!(crate::metrics::WAL_QUARANTINED).increment(moved as u64);
                quarantined.extend(bad);
            }
        }
        if orphans > 0 {
            tracing::warn!(
                events = orphans,
                "dropped WAL events: none of their subscriptions exists any more"
            );
        }
        if !quarantined.is_empty() {
            const SHOWN: usize = 100;
            tracing::error!(
                records = quarantined.len(),
                seqs = ?&quarantined[..quarantined.len().min(SHOWN)],
                "damaged WAL records (checksum failed or undecodable) moved to the wal_quarantine table (first {SHOWN} sequence numbers shown; \
                 `herald wal check` lists them all)"
            );
        }
        self.mark_ready();
        Ok(total)
    }

    /// Why the store refuses writes (disk full or failing), while it does (`/readyz`).
    pub fn storage_problem(&self) -> Option<StoreError> {
        self.store.problem()
    }

    /// Dead letters in id order, after `after`, at most `limit`, optionally of one topic/group.
    pub fn dead_letters(
        &self,
        after: Option<&str>,
        limit: usize,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self
            .dead_letter_records(after, limit, topic, group)?
            .into_iter()
            .filter_map(|(id, r)| DeadLetter::from_record(id, r))
            .collect())
    }

    /// [`Ingress::dead_letters`] as stored records with their ids (what members send each other).
    pub(crate) fn dead_letter_records(
        &self,
        after: Option<&str>,
        limit: usize,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<(String, DeadLetterRecord)>, StoreError> {
        dead_letter_records(&self.store, after, limit, topic, group)
    }

    /// Sends a dead letter back to its subscription (it is moved to the WAL first, so a crash
    /// during the replay loses nothing). Returns the event id.
    pub async fn replay_dead_letter(&self, id: &str) -> Result<String, ReplayError> {
        let record = self
            .store
            .dead_letter(id)?
            .ok_or_else(|| ReplayError::NotFound(id.to_string()))?;
        let topic = record.event.as_ref().map(|e| e.topic.clone()).unwrap_or_default();
        let key = SubscriptionKey {
            topic,
            group: record.group.clone(),
        };
        if self.router.table().route(&key).is_none() {
            return Err(ReplayError::SubscriptionGone(key.to_string()));
        }
        let (seq, record) = self
            .store
            .replay_dead_letter(id.to_string())
            .await?
            .ok_or_else(|| ReplayError::NotFound(id.to_string()))?;
        let event = Arc::new(replay_traced(
            Event::from(record.event.unwrap_or_default()),
            "dead_letter",
        ));
        // Replayed on purpose: it runs again, even within the dedup window of its first run.
        self.relay.forget_seen(&key, &event.id);
        let permit = self.in_flight.bytes.take(charge(&event)).await;
        let (tracker, _) = self.tracker(1, Some(seq), permit, false);
        self.relay.park(Arc::new(key), event.clone(), tracker, false);
        Ok(event.id.to_string())
    }

    /// Events queued or in progress at this node's instances.
    pub(crate) fn local_queued(&self) -> usize {
        self.router.table().iter().map(|s| s.load()).sum::<usize>()
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WalConfig;
    use store::Retention;

    fn open_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &WalConfig::default(), Retention::default()).unwrap();
        (dir, store)
    }

    /// The WAL's sequence numbers once everything sent to the store is committed.
    async fn wal(store: &Store) -> Vec<u64> {
        store.flush().await.unwrap();
        let chunk = store.wal_chunk(None, u64::MAX, 1000).unwrap();
        chunk.into_iter().map(|(seq, _)| seq).collect()
    }

    fn record(e: &Event, groups: &[&str]) -> Vec<u8> {
        store::wal_value(|buf| crate::proto::encode_wal_record(e, groups.iter().copied(), buf))
    }

    fn key(group: &str) -> SubscriptionKey {
        SubscriptionKey {
            topic: "orders".into(),
            group: group.into(),
        }
    }

    fn used(b: &Budget) -> usize {
        b.used.load(Ordering::Acquire)
    }

    #[test]
    fn an_event_costs_its_payload_and_a_fixed_overhead() {
        assert_eq!(charge(&Event::new("orders", "", "application/json")), 256);
        assert_eq!(charge(&Event::new("orders", vec![0u8; 1000], "text/plain")), 1256);
    }

    #[test]
    fn the_budget_refuses_what_does_not_fit_and_gets_bytes_back_when_they_are_dropped() {
        let budget = Budget::new(1000);
        let a = budget.try_take(600).expect("fits");
        assert!(budget.try_take(401).is_none(), "600 + 401 > 1000");
        assert_eq!(used(&budget), 600, "a refusal holds nothing");
        let b = budget.try_take(400).expect("exactly full fits");
        assert!(budget.try_take(1).is_none());
        drop(a);
        assert_eq!(used(&budget), 400);
        let c = budget.try_take(600).expect("freed bytes are taken again");
        drop((b, c));
        assert_eq!(used(&budget), 0);
    }

    #[test]
    fn an_event_larger_than_the_whole_budget_is_admitted_only_alone() {
        let budget = Budget::new(100);
        let big = budget.try_take(5000).expect("alone, it is admitted");
        assert_eq!(used(&budget), 100, "charged as the whole budget");
        assert!(budget.try_take(1).is_none());
        drop(big);
        assert_eq!(used(&budget), 0);
        let small = budget.try_take(1).unwrap();
        assert!(budget.try_take(5000).is_none(), "not next to another event");
        drop(small);
    }

    #[tokio::test]
    async fn a_replay_waits_for_room_and_takes_it_once_bytes_are_freed() {
        let budget = Budget::new(100);
        let held = budget.try_take(80).unwrap();
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.take(50).await })
        };
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "50 bytes do not fit next to 80"
        );
        assert_eq!(budget.waiting.load(Ordering::Acquire), 1);
        drop(held);
        let share = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("freeing bytes wakes the replay")
            .unwrap();
        assert_eq!((used(&budget), share.bytes()), (50, 50));
        assert_eq!(budget.waiting.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_removed_node_stays_removed() {
        let m = Membership::new();
        // Starting: not listed yet is not removed.
        assert!(!m.follow(false));
        assert!(!m.is_removed());
        assert!(!m.follow(true));
        assert!(!m.is_removed());
        // Unlisted once a member: removed, said once.
        assert!(m.follow(false), "the change that removes it");
        assert!(m.is_removed());
        assert!(!m.follow(false));
        // Listed again (a stale view, or a new Join): still removed.
        assert!(!m.follow(true));
        assert!(m.is_removed());
    }

    #[test]
    fn admission_checks_the_events_then_removal_then_readiness() {
        let good = [Event::new("orders", "{}", "application/json")];
        let bad = [
            Event::new("orders", "{}", "application/json"),
            Event::new("a b", "{}", "application/json"),
        ];
        let never = || -> bool { panic!("the events are checked first") };
        assert!(matches!(admission(&bad, never, never), Err(PublishError::Invalid(_))));
        assert!(matches!(
            admission(&good, || true, || false),
            Err(PublishError::Removed)
        ));
        assert!(matches!(admission(&good, || true, || true), Err(PublishError::Removed)));
        assert!(matches!(
            admission(&good, || false, || false),
            Err(PublishError::NotReady)
        ));
        assert!(admission(&good, || false, || true).is_ok());
        assert!(admission(&[], || false, || true).is_ok());
    }

    #[tokio::test]
    async fn the_last_subscription_done_takes_the_event_out_of_the_wal_and_frees_its_bytes() {
        let (_dir, store) = open_store();
        let e = Event::new("orders", "{}", "application/json");
        let seqs = store
            .append(vec![record(&e, &["billing", "audit"]), record(&e, &["billing"])])
            .await
            .unwrap();
        let budget = Budget::new(10_000);
        let share = budget.try_take(charge(&e)).unwrap();
        let (tracker, rx) = Tracker::new(2, Some(seqs[0]), &store, share, Gauge::noop(), false);
        assert!(rx.is_none(), "only ack=processed waits");
        tracker.complete(&key("billing"), Outcome::Ok { attempts: 1 });
        assert_eq!(wal(&store).await, seqs, "one subscription is still owed the event");
        tracker.complete(
            &key("audit"),
            Outcome::DeadLettered {
                attempts: 3,
                error: "boom".into(),
            },
        );
        assert_eq!(wal(&store).await, seqs[1..], "a dead-lettered subscription is done too");
        assert_eq!(used(&budget), charge(&e), "held while the tracker lives");
        drop(tracker);
        assert_eq!(used(&budget), 0);
    }

    #[tokio::test]
    async fn a_subscription_that_could_not_finish_keeps_the_event_in_the_wal() {
        let (_dir, store) = open_store();
        let e = Event::new("orders", "{}", "application/json");
        let seqs = store.append(vec![record(&e, &["a", "b"])]).await.unwrap();
        let share = Budget::new(10_000).try_take(charge(&e)).unwrap();
        let (tracker, _) = Tracker::new(2, Some(seqs[0]), &store, share, Gauge::noop(), false);
        tracker.complete(
            &key("a"),
            Outcome::Failed {
                attempts: 3,
                error: "the dead letter could not be stored".into(),
            },
        );
        tracker.complete(&key("b"), Outcome::Ok { attempts: 1 });
        assert_eq!(wal(&store).await, seqs, "delivered again on the next start");
    }

    #[tokio::test]
    async fn ack_processed_is_answered_with_every_subscription_s_outcome_once_all_are_in() {
        let (_dir, store) = open_store();
        let share = Budget::new(10_000).try_take(256).unwrap();
        let (tracker, rx) = Tracker::new(3, None, &store, share, Gauge::noop(), true);
        let mut rx = rx.expect("ack=processed waits");
        tracker.complete(&key("a"), Outcome::Ok { attempts: 1 });
        tracker.complete(
            &key("b"),
            Outcome::DeadLettered {
                attempts: 4,
                error: "boom".into(),
            },
        );
        assert!(rx.try_recv().is_err(), "one subscription is still running");
        tracker.complete(
            &key("c"),
            Outcome::Failed {
                attempts: 2,
                error: "disk".into(),
            },
        );
        let outcomes: Vec<_> = rx
            .await
            .unwrap()
            .into_iter()
            .map(|o| (o.topic, o.group, o.outcome, o.attempts, o.error))
            .collect();
        let s = |v: &str| v.to_string();
        assert_eq!(
            outcomes,
            vec![
                (s("orders"), s("a"), s("ok"), 1, None),
                (s("orders"), s("b"), s("dead_lettered"), 4, Some(s("boom"))),
                (s("orders"), s("c"), s("failed"), 2, Some(s("disk"))),
            ]
        );
    }

    #[test]
    fn ack_modes_are_named_in_lowercase_and_default_to_accepted() {
        assert_eq!(AckMode::default(), AckMode::Accepted);
        for (name, mode) in [
            ("none", AckMode::None),
            ("accepted", AckMode::Accepted),
            ("processed", AckMode::Processed),
        ] {
            let quoted = format!("\"{name}\"");
            assert_eq!(serde_json::from_str::<AckMode>(&quoted).unwrap(), mode);
            assert_eq!(serde_json::to_string(&mode).unwrap(), quoted);
            assert_eq!(ack_name(mode), name);
        }
        assert!(serde_json::from_str::<AckMode>("\"all\"").is_err());
    }

    #[test]
    fn a_dead_letter_shows_json_as_is_and_other_payloads_as_text() {
        let dead = |e: Event| DeadLetterRecord {
            event: Some(EventRecord::from(&e)),
            group: "billing".into(),
            attempts: 5,
            error: "boom".into(),
            failed_at_unix_ms: 1_700_000_000_000,
        };
        let json = DeadLetter::from_record(
            "d1".into(),
            dead(Event::new("orders", r#"{"n":1}"#, "application/json")),
        )
        .unwrap();
        assert_eq!(json.data, serde_json::json!({"n": 1}));
        assert_eq!(
            (json.id.as_str(), json.group.as_str(), json.attempts),
            ("d1", "billing", 5)
        );
        assert_eq!(json.failed_at, "2023-11-14T22:13:20+00:00");
        let text = DeadLetter::from_record("d2".into(), dead(Event::new("orders", "hi", "text/plain"))).unwrap();
        assert_eq!(text.data, serde_json::json!("hi"));
        let no_event = DeadLetterRecord {
            event: None,
            ..dead(Event::new("orders", "", "text/plain"))
        };
        assert!(DeadLetter::from_record("d3".into(), no_event).is_none());
    }

    #[tokio::test]
    async fn dead_letters_are_listed_in_id_order_filtered_and_paged_across_store_pages() {
        let (_dir, store) = open_store();
        let dead = |topic: &str, group: &str| DeadLetterRecord {
            event: Some(EventRecord::from(&Event::new(topic, "{}", "application/json"))),
            group: group.into(),
            attempts: 1,
            error: "boom".into(),
            failed_at_unix_ms: 0,
        };
        // More than a store page, with the matches spread across pages.
        let n = DEAD_LETTER_PAGE * 2 + 10;
        for i in 0..n {
            let (topic, group) = match i % 3 {
                0 => ("orders", "billing"),
                1 => ("orders", "audit"),
                _ => ("payments", "billing"),
            };
            store
                .put_dead_letter(format!("{i:05}"), dead(topic, group))
                .await
                .unwrap();
        }
        store
            .put_dead_letter(
                "99999".into(),
                DeadLetterRecord {
                    event: None,
                    ..dead("orders", "billing")
                },
            )
            .await
            .unwrap();
        let ids = |v: Vec<(String, DeadLetterRecord)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        let all = ids(dead_letter_records(&store, None, usize::MAX, None, None).unwrap());
        assert_eq!(all.len(), n, "every dead letter with an event");
        assert!(all.windows(2).all(|w| w[0] < w[1]), "in id order");
        let billing = ids(dead_letter_records(&store, None, usize::MAX, Some("orders"), Some("billing")).unwrap());
        let want: Vec<String> = (0..n).filter(|i| i % 3 == 0).map(|i| format!("{i:05}")).collect();
        assert_eq!(billing, want);
        let by_group = ids(dead_letter_records(&store, None, usize::MAX, None, Some("billing")).unwrap());
        assert_eq!(by_group.len(), (0..n).filter(|i| i % 3 != 1).count());
        // A limit, and the next page after the last id given.
        let first = ids(dead_letter_records(&store, None, 200, Some("orders"), Some("billing")).unwrap());
        assert_eq!(first, want[..200]);
        let rest = ids(dead_letter_records(
            &store,
            first.last().map(String::as_str),
            400,
            Some("orders"),
            Some("billing"),
        )
        .unwrap());
        assert_eq!(rest, want[200..]);
    }
}
