//! One supervisor task per handler instance: it owns the instance's bounded mailbox and its actor,
//! feeds the actor events, restarts it after failures and dead-letters poison events.
//!
//! **Failures.** A handler that returns `Err` for an event is not broken: the event is retried on
//! the same actor. A panic or a timeout breaks the actor: it is replaced by a fresh one from the
//! factory before the retry (counted in `herald_handler_restarts_total`). Either way retry `n` of
//! an event (attempt `n + 1`) waits [`Policy::backoff`]`(n)`: the delay grows with the attempts of
//! *that* event and starts over with the next one, so one poison event never slows down the
//! events after it. A first attempt never waits (also not on a replacement actor). An event whose
//! last attempt fails is dead-lettered, with one `dead-lettered` WARN line naming it.
//!
//! Events run one at a time (send, await the answer, send the next), except unkeyed first
//! attempts to an actor that answers inside `handle` (a sync handler, `Spawner::pipelined`):
//! those are *pipelined*, up to [`PIPELINE`] handed to the actor before the first answer is
//! awaited. A sync actor handles its mailbox in order, one message at a time, so this changes
//! neither what runs concurrently nor the order, only how often the two tasks hand over: once
//! per run of events instead of twice per event. Keyed events and retries run one at a time, as
//! before, so per-key order holds with retries included. What pipelining does change: when an
//! event fails, the events already handed to the same actor behind it are still handled by that
//! actor (a panic or a hang runs none of them: they go back, unattempted), and the replacement
//! actor takes over after them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::MailboxError;
use futures_util::future::{BoxFuture, FutureExt, LocalBoxFuture};
use tokio::sync::mpsc;
// Tokio's clock (the same as std's unless paused): the tests run the supervisor in virtual time.
use tokio::time::Instant;

use super::{Delivery, HandlerResult, Invoke, Spawner};
use crate::event::Event;
use crate::metrics::SubMetrics;
use crate::types::SubscriptionKey;

/// How a subscription finished with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The handler acknowledged it on attempt `attempts`.
    Ok { attempts: u32 },
    /// Every attempt failed; it is stored as a dead letter.
    DeadLettered { attempts: u32, error: String },
    /// Every attempt failed and the dead letter could not be stored: the event stays in the WAL.
    Failed { attempts: u32, error: String },
}

/// Told when a subscription is done with an event (the ingress's per-event tracker).
pub(crate) trait Completion: Send + Sync {
    fn complete(&self, sub: &SubscriptionKey, outcome: Outcome);
}

/// Stores events that exhausted their attempts.
pub(crate) trait DeadLetterSink: Send + Sync {
    /// Stores the dead letter; an error keeps the event where it is (in the WAL) and is logged.
    fn store(
        &self,
        sub: &SubscriptionKey,
        event: &Event,
        attempts: u32,
        error: &str,
    ) -> BoxFuture<'static, Result<(), DeadLetterError>>;
}

/// Why a dead letter could not be stored (the sink's own error: the handler layer knows no store).
pub(crate) type DeadLetterError = Box<dyn std::error::Error + Send + Sync>;

/// Where a job came from: what is owed for it if it cannot run here (see [`Retired`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Accepted on this node (published here, replayed, or routed again here).
    Local,
    /// Published here with `ack=none` (at-most-once): if its instance leaves before running it,
    /// it is routed once more at most, never kept for a re-send.
    LocalAtMostOnce,
    /// Forwarded by node `from` as delivery `delivery`, which `from` keeps until acked.
    Forwarded { from: u64, delivery: u64 },
    /// Forwarded by node `from` at most once (`ack=none`) on its lane `lane`: neither acked nor
    /// re-sent, only credited.
    AtMostOnce { from: u64, lane: u64 },
}

/// An event waiting in an instance's mailbox.
pub(crate) struct Job {
    pub(crate) event: Arc<Event>,
    /// What is owed once the subscription is done with it.
    pub(crate) done: Done,
    pub(crate) origin: Origin,
}

/// What a [`Job`] owes when its subscription is done with the event.
pub(crate) enum Done {
    /// Tell this completion the outcome (the publisher's tracker, the origin's ack, …).
    Tell(Arc<dyn Completion>),
    /// Nothing to tell (an `ack=none` event published here to one local instance, its only
    /// tracked copy): the event holds `bytes` of its node's in-flight budget, which its instance
    /// gives back through the subscription's [`Untracked`] sink. The event costs no tracker, and
    /// no reference count that the publisher and the handler threads would both touch.
    Untracked { bytes: usize },
}

/// Where instances give back what their untracked jobs ([`Done::Untracked`]) held: the node's
/// in-flight budget and gauge. An instance adds up its finished jobs and gives them back
/// together (at the latest before it waits for its mailbox), not one contended update per event.
pub(crate) trait Untracked: Send + Sync {
    /// `events` untracked events, which held `bytes` of the budget, are done.
    fn done(&self, events: usize, bytes: usize);
}

/// The completion of an untracked job that leaves its mailbox without running (retired, then
/// parked): told nothing, it gives the job's bytes back once the parked event is done (dropped).
struct Holding {
    to: Arc<dyn Untracked>,
    bytes: usize,
}

impl Completion for Holding {
    fn complete(&self, _: &SubscriptionKey, _: Outcome) {}
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.to.done(1, self.bytes);
    }
}

/// A job an instance gives back without running it, with the completion of what it owes.
pub(crate) struct RetiredJob {
    pub(crate) event: Arc<Event>,
    pub(crate) origin: Origin,
    pub(crate) completion: Arc<dyn Completion>,
}

/// Takes the jobs an instance will not run because its subscription's placement left this node
/// (they were queued before it moved; the new placement's nodes handle them).
pub(crate) trait Retired: Send + Sync {
    fn retired(&self, sub: &Arc<SubscriptionKey>, job: RetiredJob);
}

/// What every instance of one subscription shares.
pub(crate) struct SubShared {
    pub(crate) key: Arc<SubscriptionKey>,
    pub(crate) max_attempts: u32,
    pub(crate) metrics: SubMetrics,
    /// Set when the placement no longer gives this node the subscription: queued jobs are handed
    /// to `returns` instead of being run (fencing at dequeue), so a node that was frozen while its
    /// work moved does not run a mailbox of events that were already sent elsewhere.
    pub(crate) retired: std::sync::atomic::AtomicBool,
    pub(crate) returns: Arc<dyn Retired>,
    /// Where untracked jobs give back what they held ([`Done::Untracked`]).
    pub(crate) untracked: Arc<dyn Untracked>,
}

/// Restart and call policy, from `HandlerConfig`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) call_timeout: Duration,
}

impl Policy {
    /// Delay before retry number `retry` (1-based) of one event: initial × 2^(retry-1), capped.
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
        self.backoff_initial.saturating_mul(factor).min(self.backoff_max)
    }
}

/// How many watchdog ticks fit in one call timeout: a hung call fails within 1/8 of the timeout
/// after it expires.
const WATCHDOG_TICKS_PER_TIMEOUT: u32 = 8;

/// At most this many deliveries handed to a pipelined actor and not answered yet. Each costs one
/// message in the actor's mailbox, whose capacity the spawners set to [`ACTOR_MAILBOX`].
pub(crate) const PIPELINE: usize = 32;

/// The mailbox capacity of handler actors: above [`PIPELINE`], so the supervisor's sends never
/// find it full (a full actix mailbox holds a request back until it is polled, which would let a
/// later delivery overtake it), with room left for messages the actor sends itself.
pub(crate) const ACTOR_MAILBOX: usize = 2 * PIPELINE;

/// How many times an instance whose mailbox ran empty yields to its worker's other tasks, trying
/// the mailbox again after each, before it sleeps on the mailbox. A sleeping instance costs its
/// publisher a wake-up of the worker thread (an `eventfd` write) and the worker a sleep and a
/// context switch *per event* whenever the handler keeps up with a steady publisher; a few yields
/// (each a non-blocking poll of the worker's I/O driver) catch the next event instead. Only after
/// a job: an idle instance sleeps at once and costs nothing. 16 rather than 4: a publisher that
/// emits in a loop from another thread made its instance sleep every 15–40 events with 4 (runs
/// of 1M events, `herald-bench local`, 120k–360k context switches per 5M events) and half as
/// often with 16, and the runs that slept most were the slowest (1.0M against 2.0M events/s).
const YIELDS_BEFORE_SLEEP: u32 = 16;

/// Runs one instance until its mailbox is closed and drained. Must run on a worker arbiter.
pub(crate) async fn run_instance(
    shared: Arc<SubShared>,
    spawner: Arc<dyn Spawner>,
    policy: Policy,
    dead_letters: Arc<dyn DeadLetterSink>,
    mut mailbox: mpsc::Receiver<Job>,
    load: Arc<AtomicUsize>,
) {
    // One timer for the life of the instance instead of one per call: a per-call
    // `tokio::time::timeout` would register and cancel a timer-wheel entry for every event.
    // The watchdog ticks at a fraction of the timeout; a call is failed at the first tick past it.
    let mut watchdog = tokio::time::interval(policy.call_timeout / WATCHDOG_TICKS_PER_TIMEOUT);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let pipelined = spawner.pipelined();
    let mut runner = Runner {
        shared,
        spawner,
        policy,
        dead_letters,
        load,
        actor: None,
        watchdog,
        replacing: false,
        again: VecDeque::new(),
        owed: Owed::default(),
    };
    loop {
        let (job, attempt) = match runner.again.pop_front() {
            Some((job, 1)) => match runner.dequeued(job) {
                Some(job) => (job, 1),
                None => continue,
            },
            Some(retry) => retry,
            None => match runner.next_job(&mut mailbox).await {
                Some(job) => match runner.dequeued(job) {
                    Some(job) => (job, 1),
                    None => continue,
                },
                None => break,
            },
        };
        if pipelined && attempt == 1 && job.event.key.is_none() && runner.again.is_empty() {
            runner.pipeline(job, &mut mailbox).await;
        } else {
            let outcome = runner.one(&job, attempt).await;
            runner.finish(job, outcome);
            // One at a time: nothing to add up.
            runner.settle();
        }
    }
    runner.settle();
}

/// What an instance's finished jobs owe and it has not given back yet (see [`Runner::settle`]).
#[derive(Default)]
struct Owed {
    /// Jobs finished: to take off the instance's load.
    jobs: usize,
    /// Untracked jobs finished, and the bytes they held (see [`Done::Untracked`]).
    untracked: usize,
    bytes: usize,
}

/// A delivery handed to a pipelined actor, waiting for its answer.
struct Sent {
    job: Job,
    answer: LocalBoxFuture<'static, Result<HandlerResult, MailboxError>>,
    /// Its `deliver` span (disabled when the event is not traced).
    span: tracing::Span,
}

/// A failed attempt.
struct Failure {
    error: String,
    /// The actor panicked or hung (it is replaced); `false` for an `Err` answer.
    broken: bool,
    /// The outcome of the attempt's `deliver` span: `error`, `panic` or `timeout`.
    kind: &'static str,
}

/// Ends an attempt's `deliver` span with its outcome (`ok`, `error`, `panic`, `timeout`, or
/// `dead-lettered` for the last failed attempt) and the error, if any.
fn traced_outcome(span: &tracing::Span, failure: Option<&Failure>, last: Option<&Outcome>) {
    if span.is_disabled() {
        return;
    }
    let outcome = match (failure, last) {
        (None, _) => "ok",
        (Some(_), Some(Outcome::DeadLettered { .. })) => "dead-lettered",
        (Some(f), _) => f.kind,
    };
    span.record("herald.outcome", outcome);
    if let Some(f) = failure {
        span.record("herald.error", f.error.as_str());
        span.record("otel.status_code", "ERROR");
    }
}

/// One instance's state (see [`run_instance`]).
struct Runner {
    shared: Arc<SubShared>,
    spawner: Arc<dyn Spawner>,
    policy: Policy,
    dead_letters: Arc<dyn DeadLetterSink>,
    /// Events queued or in progress at this instance (the router's least-loaded choice).
    load: Arc<AtomicUsize>,
    /// The running actor; `None` after a panic or a timeout, until the restart.
    actor: Option<Box<dyn Invoke>>,
    watchdog: tokio::time::Interval,
    /// The next start replaces an actor that broke (counted as a restart).
    replacing: bool,
    /// Jobs taken back from a pipeline, in mailbox order, with their next attempt: ones that
    /// failed an attempt, and ones the actor never ran because an earlier one failed (attempt 1).
    /// They run one at a time, before the mailbox.
    again: VecDeque<(Job, u32)>,
    /// What finished jobs owe, given back together.
    owed: Owed,
}

impl Runner {
    /// The next job of `mailbox` (`None` once it is closed and drained). When the mailbox is
    /// empty it first gives back what finished jobs owe ([`Runner::settle`]), then yields up to
    /// [`YIELDS_BEFORE_SLEEP`] times before sleeping on it.
    async fn next_job(&mut self, mailbox: &mut mpsc::Receiver<Job>) -> Option<Job> {
        for round in 0..YIELDS_BEFORE_SLEEP {
            match mailbox.try_recv() {
                Ok(job) => return Some(job),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if round == 0 {
                        // Nothing queued: what finished jobs owe is given back before waiting.
                        self.settle();
                    }
                    tokio::task::yield_now().await
                }
            }
        }
        mailbox.recv().await
    }

    /// Fencing at dequeue: a job of a subscription that left this node goes to `returns`.
    fn dequeued(&self, job: Job) -> Option<Job> {
        if self.shared.retired.load(Ordering::Acquire) {
            self.load.fetch_sub(1, Ordering::Relaxed);
            let completion = match job.done {
                Done::Tell(completion) => completion,
                Done::Untracked { bytes } => Arc::new(Holding {
                    to: self.shared.untracked.clone(),
                    bytes,
                }),
            };
            let retired = RetiredJob {
                event: job.event,
                origin: job.origin,
                completion,
            };
            self.shared.returns.retired(&self.shared.key, retired);
            return None;
        }
        Some(job)
    }

    /// A job is done: its completion is told at once; what it held of the instance's load and
    /// of the node's budget is added up, and given back with [`PIPELINE`] jobs' worth at most
    /// (a pipeline run), or before the instance waits for its mailbox.
    fn finish(&mut self, job: Job, outcome: Outcome) {
        match job.done {
            Done::Tell(completion) => completion.complete(&self.shared.key, outcome),
            Done::Untracked { bytes } => {
                self.owed.untracked += 1;
                self.owed.bytes += bytes;
            }
        }
        self.owed.jobs += 1;
        if self.owed.jobs >= PIPELINE {
            self.settle();
        }
    }

    /// Gives back what finished jobs owe: one update of the instance's load and one of the
    /// node's in-flight budget for all of them, instead of two cache lines the publisher also
    /// writes passed back and forth for every event.
    fn settle(&mut self) {
        let owed = std::mem::take(&mut self.owed);
        if owed.jobs > 0 {
            self.load.fetch_sub(owed.jobs, Ordering::Relaxed);
        }
        if owed.untracked > 0 {
            self.shared.untracked.done(owed.untracked, owed.bytes);
        }
    }

    /// The running actor, started if needed (a restart, when it replaces a broken one).
    fn actor(&mut self) -> &dyn Invoke {
        if self.actor.is_none() {
            if std::mem::take(&mut self.replacing) {
                self.shared.metrics.restarts.increment(1);
            }
            self.actor = Some(self.spawner.start());
        }
        self.actor.as_deref().expect("started above")
    }

    /// Drops a broken actor (it panicked or hung): the next attempt runs on a fresh one.
    fn broke(&mut self) {
        self.actor = None;
        self.replacing = true;
    }

    /// The delivery of `job`'s attempt `attempt`, with its `deliver` span when the event is
    /// traced (a child of the event's context: the publish, forward or replay span).
    fn delivery(&self, job: &Job, attempt: u32) -> Delivery {
        let (span, trace) = match &job.event.trace {
            Some(parent) if crate::telemetry::traced(Some(parent)) => {
                let span = tracing::info_span!(
                    target: "herald::trace",
                    parent: None,
                    "deliver",
                    otel.kind = "consumer",
                    herald.subscription = %self.shared.key,
                    herald.event_id = &*job.event.id,
                    herald.attempt = attempt,
                    herald.outcome = tracing::field::Empty,
                    herald.error = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                );
                crate::telemetry::continue_trace(&span, parent);
                let trace = crate::telemetry::context_or(&span, Some(parent));
                (span, trace)
            }
            other => (tracing::Span::none(), other.clone()),
        };
        Delivery {
            event: job.event.clone(),
            subscription: self.shared.key.clone(),
            attempt,
            trace,
            span,
        }
    }

    /// Waits for `answer`, failing it when it has taken the call timeout since `since`.
    async fn answer(
        watchdog: &mut tokio::time::Interval,
        timeout: Duration,
        since: Instant,
        answer: &mut LocalBoxFuture<'static, Result<HandlerResult, MailboxError>>,
    ) -> Option<Result<HandlerResult, MailboxError>> {
        loop {
            tokio::select! {
                biased;
                r = &mut *answer => return Some(r),
                _ = watchdog.tick() => {
                    if since.elapsed() >= timeout {
                        return None;
                    }
                }
            }
        }
    }

    /// What went wrong with an attempt, if anything.
    fn failure(&self, result: Option<Result<HandlerResult, MailboxError>>) -> Option<Failure> {
        match result {
            Some(Ok(Ok(()))) => None,
            // The handler judged this event: the actor itself is fine.
            Some(Ok(Err(e))) => Some(Failure {
                error: e.to_string(),
                broken: false,
                kind: "error",
            }),
            Some(Err(MailboxError::Closed)) => Some(Failure {
                error: "handler panicked or stopped".to_string(),
                broken: true,
                kind: "panic",
            }),
            Some(Err(MailboxError::Timeout)) | None => Some(Failure {
                error: format!("handler did not answer within {:?}", self.policy.call_timeout),
                broken: true,
                kind: "timeout",
            }),
        }
    }

    /// Counts a failed attempt; returns the outcome when it was the last one (then the event is
    /// dead-lettered, or kept in the WAL when the dead letter cannot be stored).
    async fn failed(&mut self, job: &Job, attempt: u32, error: String) -> Option<Outcome> {
        let shared = &self.shared;
        shared.metrics.delivered_error.increment(1);
        tracing::warn!(subscription = %shared.key, id = %job.event.id, attempt, max_attempts = shared.max_attempts, %error, "handler failed");
        if attempt < shared.max_attempts {
            shared.metrics.redelivered.increment(1);
            return None;
        }
        Some(
            match self.dead_letters.store(&shared.key, &job.event, attempt, &error).await {
                Ok(()) => {
                    shared.metrics.dead_lettered.increment(1);
                    shared.metrics.dead_letters.increment(1);
                    tracing::warn!(subscription = %shared.key, id = %job.event.id, attempts = attempt, last_error = %error, "event dead-lettered: every attempt failed (GET /v1/dead-letters lists it, with the id to replay it by)");
                    Outcome::DeadLettered {
                        attempts: attempt,
                        error,
                    }
                }
                Err(store_error) => {
                    tracing::error!(subscription = %shared.key, id = %job.event.id, %store_error, "cannot store dead letter; the event stays in the WAL");
                    Outcome::Failed {
                        attempts: attempt,
                        error,
                    }
                }
            },
        )
    }

    /// Runs one job alone from `attempt` on: retried after each failure (after the event's
    /// backoff; on a fresh actor when the failure broke the actor) until it succeeds or runs out
    /// of attempts.
    async fn one(&mut self, job: &Job, mut attempt: u32) -> Outcome {
        loop {
            if attempt > 1 {
                // What earlier jobs owe (a pipeline run that this failure ended) is not kept
                // through the backoff.
                self.settle();
                tokio::time::sleep(self.policy.backoff(attempt - 1)).await;
            }
            let delivery = self.delivery(job, attempt);
            let span = delivery.span.clone();
            let actor = self.actor();
            let started = Instant::now();
            let mut answer = actor.call(delivery);
            let result = Self::answer(&mut self.watchdog, self.policy.call_timeout, started, &mut answer).await;
            self.shared.metrics.duration.record(started.elapsed());
            let Some(failure) = self.failure(result) else {
                self.shared.metrics.delivered_ok.increment(1);
                traced_outcome(&span, None, None);
                return Outcome::Ok { attempts: attempt };
            };
            if failure.broken {
                self.broke();
            }
            let last = self.failed(job, attempt, failure.error.clone()).await;
            traced_outcome(&span, Some(&failure), last.as_ref());
            if let Some(outcome) = last {
                return outcome;
            }
            attempt += 1;
        }
    }

    /// Runs unkeyed first attempts pipelined, starting with `first`: up to [`PIPELINE`]
    /// deliveries are handed to the actor before the first answer is awaited, topped up from the
    /// mailbox as answers arrive, so the actor handles a run of them per wake-up instead of one
    /// request/response round trip each. Only for actors that answer inside `handle` (in order,
    /// one at a time; see `Spawner::pipelined`).
    ///
    /// The first failure (error, panic or timeout) ends the pipeline: nothing more is sent and
    /// the answers still due are collected; after a panic or a timeout the actor is then
    /// replaced. Failed jobs go to `again` for their next attempt; ones a dead or hung actor
    /// never ran go there unattempted. A keyed job also ends it, and runs alone afterwards
    /// (per-key order includes retries).
    async fn pipeline(&mut self, first: Job, mailbox: &mut mpsc::Receiver<Job>) {
        let mut sent: VecDeque<Sent> = VecDeque::with_capacity(PIPELINE);
        let mut next = Some(first);
        // Set by the first failure: send nothing more.
        let mut stopped = false;
        // Set by a panic or a timeout: count later `Closed` answers as never run (the actor died
        // at the failure), and replace the actor.
        let mut dead = false;
        // A keyed job met while topping up: it runs after this pipeline.
        let mut held: Option<Job> = None;
        // When the oldest unanswered delivery could start: its send, or the previous answer.
        let mut since = Instant::now();
        loop {
            while !stopped && held.is_none() && sent.len() < PIPELINE {
                let job = match next.take() {
                    Some(job) => job,
                    None => match mailbox.try_recv() {
                        Ok(job) => match self.dequeued(job) {
                            Some(job) => job,
                            None => continue,
                        },
                        Err(_) => break,
                    },
                };
                if job.event.key.is_some() {
                    held = Some(job);
                    break;
                }
                if sent.is_empty() {
                    since = Instant::now();
                }
                let delivery = self.delivery(&job, 1);
                let span = delivery.span.clone();
                let answer = self.actor().call(delivery);
                sent.push_back(Sent { job, answer, span });
            }
            let Some(head) = sent.front_mut() else { break };
            // An answer already there when asked for came in the same run of answers as the one
            // before (the actor, on this thread, handles what it was sent in one go): it is taken
            // at that one's time, so one clock read serves a run instead of one per answer (a
            // clock read was 2-4 % of a handler thread's time). Its duration is then 0, as the
            // reads a few nanoseconds apart gave; the run's handling time is the first answer's.
            let (result, answered) = match (&mut head.answer).now_or_never() {
                Some(answer) => (Some(answer), since),
                None => {
                    let result =
                        Self::answer(&mut self.watchdog, self.policy.call_timeout, since, &mut head.answer).await;
                    (result, Instant::now())
                }
            };
            let Some(Sent { job, span, .. }) = sent.pop_front() else {
                break;
            };
            self.shared
                .metrics
                .duration
                .record(answered.saturating_duration_since(since));
            since = answered;
            let timed_out = result.is_none();
            if dead && matches!(result, Some(Err(MailboxError::Closed))) {
                // The actor died at an earlier failure: this one never ran.
                span.record("herald.outcome", "not-run");
                self.again.push_back((job, 1));
                continue;
            }
            match self.failure(result) {
                None => {
                    self.shared.metrics.delivered_ok.increment(1);
                    traced_outcome(&span, None, None);
                    self.finish(job, Outcome::Ok { attempts: 1 });
                }
                Some(failure) => {
                    stopped = true;
                    dead |= failure.broken;
                    let last = self.failed(&job, 1, failure.error.clone()).await;
                    traced_outcome(&span, Some(&failure), last.as_ref());
                    match last {
                        Some(outcome) => self.finish(job, outcome),
                        None => self.again.push_back((job, 2)),
                    }
                }
            }
            if timed_out {
                // A hung actor runs nothing after the hung call.
                self.again.extend(sent.drain(..).map(|s| (s.job, 1)));
            }
        }
        if dead {
            self.broke();
        }
        if let Some(job) = held {
            self.again.push_back((job, 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;
    use crate::handler::HandlerError;

    /// One call of the fake handler: the event's data, the attempt, which actor (1 = the first
    /// started) and when (virtual time since the test began).
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Call {
        data: String,
        attempt: u32,
        actor: usize,
        at: Duration,
    }

    /// What the fake handlers of one test did, and how each event ended.
    struct Script {
        begun: Instant,
        starts: AtomicUsize,
        calls: Mutex<Vec<Call>>,
        outcomes: Mutex<Vec<(String, Outcome, Duration)>>,
        pipelined: bool,
    }

    impl Script {
        fn calls_of(&self, data: &str) -> Vec<Call> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.data == data)
                .cloned()
                .collect()
        }
    }

    /// Starts fake actors that answer by the event's data: `ok…` acknowledges, `err…` answers
    /// `Err`, `panic…` dies (this call and every later one answer `Closed`, as actix does),
    /// `slow…` acknowledges [`SLOW`] after the call.
    const SLOW: Duration = Duration::from_millis(50);

    /// The fake handlers (see [`SLOW`]).
    struct Fake(Arc<Script>);

    impl Spawner for Fake {
        fn start(&self) -> Box<dyn Invoke> {
            let actor = self.0.starts.fetch_add(1, Ordering::SeqCst) + 1;
            Box::new(FakeActor {
                script: self.0.clone(),
                actor,
                dead: Rc::new(Cell::new(false)),
            })
        }

        fn pipelined(&self) -> bool {
            self.0.pipelined
        }
    }

    struct FakeActor {
        script: Arc<Script>,
        actor: usize,
        dead: Rc<Cell<bool>>,
    }

    impl Invoke for FakeActor {
        fn call(&self, d: Delivery) -> LocalBoxFuture<'static, Result<HandlerResult, MailboxError>> {
            if self.dead.get() {
                return Box::pin(async { Err(MailboxError::Closed) });
            }
            let data = String::from_utf8_lossy(&d.event.data).into_owned();
            self.script.calls.lock().unwrap().push(Call {
                data: data.clone(),
                attempt: d.attempt,
                actor: self.actor,
                at: self.script.begun.elapsed(),
            });
            if data.starts_with("slow") {
                // Handled from the call on, as an actor runs on its own: the answers of slow
                // deliveries handed over together are all there 50 ms later.
                let handled = tokio::time::sleep(SLOW);
                return Box::pin(async {
                    handled.await;
                    Ok(Ok(()))
                });
            }
            let answer = if data.starts_with("ok") {
                Ok(Ok(()))
            } else if data.starts_with("err") {
                Ok(Err(HandlerError::msg(format!("cannot handle {data}"))))
            } else {
                self.dead.set(true);
                Err(MailboxError::Closed)
            };
            Box::pin(async move { answer })
        }
    }

    /// Records each event's outcome with its data (one completion per job).
    struct Told {
        script: Arc<Script>,
        data: String,
    }

    impl Completion for Told {
        fn complete(&self, _: &SubscriptionKey, outcome: Outcome) {
            let at = self.script.begun.elapsed();
            self.script
                .outcomes
                .lock()
                .unwrap()
                .push((self.data.clone(), outcome, at));
        }
    }

    struct Sink;

    impl DeadLetterSink for Sink {
        fn store(
            &self,
            _: &SubscriptionKey,
            _: &Event,
            _: u32,
            _: &str,
        ) -> BoxFuture<'static, Result<(), DeadLetterError>> {
            Box::pin(async { Ok(()) })
        }
    }

    struct NoReturns;

    impl Retired for NoReturns {
        fn retired(&self, _: &Arc<SubscriptionKey>, _: RetiredJob) {
            panic!("no job is retired in these tests");
        }
    }

    /// Records what instances give back for untracked jobs, call by call: events, bytes, and
    /// when (the test's virtual time).
    #[derive(Default)]
    struct Given(Mutex<Vec<(usize, usize, Instant)>>);

    impl Given {
        /// Events and bytes of each call.
        fn calls(&self) -> Vec<(usize, usize)> {
            self.0.lock().unwrap().iter().map(|&(e, b, _)| (e, b)).collect()
        }
    }

    impl Untracked for Given {
        fn done(&self, events: usize, bytes: usize) {
            self.0.lock().unwrap().push((events, bytes, Instant::now()));
        }
    }

    const INITIAL: Duration = Duration::from_millis(100);

    /// Runs one instance over `events` (all queued before it starts, then the mailbox closes)
    /// with 3 attempts and a 100 ms initial backoff capped at 5 s; returns what happened.
    async fn run(events: &[&str], pipelined: bool) -> Arc<Script> {
        let (script, load) = run_jobs("g", events, pipelined, None, Arc::new(Given::default())).await;
        assert_eq!(
            load.load(Ordering::SeqCst),
            0,
            "every finished job left the instance's load"
        );
        script
    }

    /// [`run`] for subscription `t/<group>`, the jobs untracked (holding `untracked` bytes each)
    /// when given, giving back to `given`; returns what happened and the instance's load counter.
    async fn run_jobs(
        group: &str,
        events: &[&str],
        pipelined: bool,
        untracked: Option<usize>,
        given: Arc<Given>,
    ) -> (Arc<Script>, Arc<AtomicUsize>) {
        let script = Arc::new(Script {
            begun: Instant::now(),
            starts: AtomicUsize::new(0),
            calls: Mutex::default(),
            outcomes: Mutex::default(),
            pipelined,
        });
        let key = SubscriptionKey {
            topic: "t".into(),
            group: group.into(),
        };
        let shared = Arc::new(SubShared {
            metrics: SubMetrics::new(&key),
            key: Arc::new(key),
            max_attempts: 3,
            retired: std::sync::atomic::AtomicBool::new(false),
            returns: Arc::new(NoReturns),
            untracked: given,
        });
        let policy = Policy {
            backoff_initial: INITIAL,
            backoff_max: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
        };
        let (tx, rx) = mpsc::channel(events.len());
        for data in events {
            let job = Job {
                event: Arc::new(Event::new("t", data.to_string(), "text/plain").with_id(format!("id-{data}"))),
                done: match untracked {
                    Some(bytes) => Done::Untracked { bytes },
                    None => Done::Tell(Arc::new(Told {
                        script: script.clone(),
                        data: data.to_string(),
                    })),
                },
                origin: Origin::Local,
            };
            tx.try_send(job).unwrap_or_else(|_| panic!("room for {data}"));
        }
        drop(tx);
        let load = Arc::new(AtomicUsize::new(events.len()));
        run_instance(
            shared,
            Arc::new(Fake(script.clone())),
            policy,
            Arc::new(Sink),
            rx,
            load.clone(),
        )
        .await;
        (script, load)
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_of_answers_is_timed_once_and_every_delivery_counts_in_the_histogram() {
        // Three slow deliveries handed over together: the first answer is waited for (50 ms);
        // the two already there with it take its time (0 each). The clock is read once.
        let events = ["slow1", "slow2", "slow3"];
        let (script, _) = run_jobs("timed", &events, true, None, Arc::new(Given::default())).await;
        assert_eq!(script.outcomes.lock().unwrap().len(), 3);
        let histogram = crate::metrics::DurationHistogram::of(&SubscriptionKey {
            topic: "t".into(),
            group: "timed".into(),
        });
        assert_eq!(
            histogram.totals(),
            (3, SLOW),
            "three samples, and the run's 50 ms once: answers that came with the first one took no time of their own"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn untracked_jobs_give_back_their_load_and_bytes_together_once_handled() {
        let events: Vec<String> = (0..70).map(|i| format!("ok{i}")).collect();
        let events: Vec<&str> = events.iter().map(String::as_str).collect();
        for pipelined in [true, false] {
            let given = Arc::new(Given::default());
            let (script, load) = run_jobs("g", &events, pipelined, Some(10), given.clone()).await;
            assert_eq!(script.calls.lock().unwrap().len(), 70, "every job ran once");
            assert_eq!(load.load(Ordering::SeqCst), 0, "every job left the instance's load");
            let given = given.calls();
            let total = given.iter().fold((0, 0), |(e, b), (de, db)| (e + de, b + db));
            assert_eq!(total, (70, 700), "every job's bytes given back once: {given:?}");
            if pipelined {
                // A run of queued events is given back in a few updates, not one per event.
                assert!(
                    given.len() <= 3,
                    "given back in pipeline runs, not per event: {given:?}"
                );
                assert!(given.iter().all(|(e, _)| *e <= PIPELINE), "{given:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_in_a_pipeline_run_gives_back_what_the_run_finished_before_the_retry_waits() {
        // `err5` fails every attempt (backoffs 100 ms and 200 ms); the 31 others of its pipeline
        // run finish around it.
        let events: Vec<String> = (0..32)
            .map(|i| if i == 5 { "err5".into() } else { format!("ok{i}") })
            .collect();
        let events: Vec<&str> = events.iter().map(String::as_str).collect();
        let given = Arc::new(Given::default());
        let begun = Instant::now();
        let (_, load) = run_jobs("g", &events, true, Some(10), given.clone()).await;
        assert_eq!(load.load(Ordering::SeqCst), 0);
        let calls = given.calls();
        let first_at = given.0.lock().unwrap().first().map(|&(_, _, at)| at);
        assert_eq!(
            calls.first(),
            Some(&(31, 310)),
            "the run's 31 finished jobs first: {calls:?}"
        );
        assert_eq!(
            first_at.map(|at| at.duration_since(begun)),
            Some(Duration::ZERO),
            "given back before the retry's backoff, not after it"
        );
        assert_eq!(calls.iter().map(|(e, _)| e).sum::<usize>(), 32, "{calls:?}");
    }

    fn outcome(script: &Script, data: &str) -> (Outcome, Duration) {
        let outcomes = script.outcomes.lock().unwrap();
        let found: Vec<_> = outcomes.iter().filter(|(d, ..)| d == data).collect();
        assert_eq!(found.len(), 1, "one outcome for {data}: {outcomes:?}");
        (found[0].1.clone(), found[0].2)
    }

    fn dead_lettered(script: &Script, data: &str) -> Duration {
        let (o, at) = outcome(script, data);
        assert!(matches!(o, Outcome::DeadLettered { attempts: 3, .. }), "{data}: {o:?}");
        at
    }

    /// The gaps between the attempts of `data`, and the actors that ran them.
    fn attempts(script: &Script, data: &str) -> (Vec<Duration>, Vec<usize>) {
        let calls = script.calls_of(data);
        assert_eq!(
            calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
            (1..=calls.len() as u32).collect::<Vec<_>>(),
            "{calls:?}"
        );
        let gaps = calls.windows(2).map(|w| w[1].at - w[0].at).collect();
        (gaps, calls.iter().map(|c| c.actor).collect())
    }

    /// Bug 5 of issue 18: an `Err` for one event's data does not restart the actor, and each
    /// event's retries start from the initial backoff: the second bad event's retries wait as
    /// long as the first's, and the good event after it runs as soon as it is dead-lettered.
    #[tokio::test(start_paused = true)]
    async fn an_err_retries_on_the_same_actor_and_every_event_starts_its_backoff_over() {
        let script = run(&["err-1", "err-2", "ok-3"], false).await;
        assert_eq!(
            script.starts.load(Ordering::SeqCst),
            1,
            "an Err restarted the actor: {:?}",
            script.calls.lock().unwrap()
        );
        for bad in ["err-1", "err-2"] {
            assert_eq!(
                attempts(&script, bad),
                (vec![INITIAL, INITIAL * 2], vec![1, 1, 1]),
                "{bad}"
            );
        }
        let done = dead_lettered(&script, "err-2");
        assert_eq!(outcome(&script, "ok-3").0, Outcome::Ok { attempts: 1 });
        assert_eq!(
            script.calls_of("ok-3")[0].at,
            done,
            "the good event waited after the dead letter"
        );
        assert!(dead_lettered(&script, "err-1") <= script.calls_of("err-2")[0].at);
    }

    /// The same for a sync handler, whose unkeyed events are pipelined: the failures come back
    /// as retries (alone, on the same actor), the good events between them are not held up.
    #[tokio::test(start_paused = true)]
    async fn an_err_in_a_pipeline_keeps_the_actor_and_the_backoff_per_event() {
        let script = run(&["err-1", "ok-2", "err-3", "ok-4"], true).await;
        assert_eq!(
            script.starts.load(Ordering::SeqCst),
            1,
            "an Err restarted the actor: {:?}",
            script.calls.lock().unwrap()
        );
        for good in ["ok-2", "ok-4"] {
            assert_eq!(
                outcome(&script, good),
                (Outcome::Ok { attempts: 1 }, Duration::ZERO),
                "{good}"
            );
        }
        assert_eq!(attempts(&script, "err-1"), (vec![INITIAL, INITIAL * 2], vec![1, 1, 1]));
        let first_done = dead_lettered(&script, "err-1");
        // err-3's retries queue behind err-1's (one at a time), then wait from the initial delay.
        let (gaps, actors) = attempts(&script, "err-3");
        assert_eq!((gaps[1], actors), (INITIAL * 2, vec![1, 1, 1]));
        assert_eq!(script.calls_of("err-3")[1].at, first_done + INITIAL);
        dead_lettered(&script, "err-3");
    }

    /// A panic does replace the actor, after the event's backoff, which grows with that event's
    /// attempts only: the event after its dead letter starts at once, on a fresh actor.
    #[tokio::test(start_paused = true)]
    async fn a_panic_restarts_the_actor_with_backoff_that_starts_over_after_the_event() {
        let script = run(&["panic-1", "ok-2"], false).await;
        assert_eq!(
            attempts(&script, "panic-1"),
            (vec![INITIAL, INITIAL * 2], vec![1, 2, 3])
        );
        let done = dead_lettered(&script, "panic-1");
        let good = script.calls_of("ok-2");
        assert_eq!((good[0].actor, good[0].at), (4, done), "{good:?}");
        assert_eq!(outcome(&script, "ok-2").0, Outcome::Ok { attempts: 1 });
    }

    // The dead-letter log line is checked on a real node's log: tests/first_hour.rs,
    // `a_dead_letter_is_one_log_line_naming_the_event_and_the_last_error`.

    #[test]
    fn backoff_doubles_and_caps() {
        let p = Policy {
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(1000),
            call_timeout: Duration::from_secs(1),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(50));
        assert_eq!(p.backoff(2), Duration::from_millis(100));
        assert_eq!(p.backoff(5), Duration::from_millis(800));
        assert_eq!(p.backoff(6), Duration::from_millis(1000));
        assert_eq!(p.backoff(400), Duration::from_millis(1000));
    }
}
