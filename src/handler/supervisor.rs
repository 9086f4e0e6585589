//! One supervisor task per handler instance: it owns the instance's bounded mailbox and its actor,
//! feeds the actor events, restarts it after failures and dead-letters poison events.
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
use std::time::{Duration, Instant};

use actix::MailboxError;
use futures_util::future::{BoxFuture, LocalBoxFuture};
use tokio::sync::mpsc;

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
    /// Forwarded by node `from` as delivery `delivery`, which `from` keeps until acked.
    Forwarded { from: u64, delivery: u64 },
    /// Forwarded by node `from` at most once (`ack=none`) on its lane `lane`: neither acked nor
    /// re-sent, only credited.
    AtMostOnce { from: u64, lane: u64 },
}

/// An event waiting in an instance's mailbox.
pub(crate) struct Job {
    pub(crate) event: Arc<Event>,
    pub(crate) completion: Arc<dyn Completion>,
    pub(crate) origin: Origin,
}

/// Takes the jobs an instance will not run because its subscription's placement left this node
/// (they were queued before it moved; the new placement's nodes handle them).
pub(crate) trait Retired: Send + Sync {
    fn retired(&self, sub: &Arc<SubscriptionKey>, job: Job);
}

/// What every instance of one subscription shares.
pub(crate) struct SubShared {
    pub(crate) key: Arc<SubscriptionKey>,
    pub(crate) max_attempts: u32,
    pub(crate) metrics: SubMetrics,
    /// The node's handler backlog, for gray-failure detection.
    pub(crate) progress: Arc<crate::monitor::Progress>,
    /// Set when the placement no longer gives this node the subscription: queued jobs are handed
    /// to `returns` instead of being run (fencing at dequeue), so a node that was frozen while its
    /// work moved does not run a mailbox of events that were already sent elsewhere.
    pub(crate) retired: std::sync::atomic::AtomicBool,
    pub(crate) returns: Arc<dyn Retired>,
}

/// Restart and call policy, from `HandlerConfig`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) call_timeout: Duration,
}

impl Policy {
    /// Delay before restart number `failures` (1-based): initial × 2^(failures-1), capped.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
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
        failures: 0,
        again: VecDeque::new(),
    };
    loop {
        let (job, attempt) = match runner.again.pop_front() {
            Some((job, 1)) => match runner.dequeued(job) {
                Some(job) => (job, 1),
                None => continue,
            },
            Some(retry) => retry,
            None => match mailbox.recv().await {
                Some(job) => {
                    runner.shared.metrics.mailbox_depth.decrement(1.0);
                    match runner.dequeued(job) {
                        Some(job) => (job, 1),
                        None => continue,
                    }
                }
                None => break,
            },
        };
        if pipelined && attempt == 1 && job.event.key.is_none() && runner.again.is_empty() {
            runner.pipeline(job, &mut mailbox).await;
        } else {
            let outcome = runner.one(&job, attempt).await;
            runner.finish(job, outcome);
        }
    }
}

/// A delivery handed to a pipelined actor, waiting for its answer.
struct Sent {
    job: Job,
    answer: LocalBoxFuture<'static, Result<HandlerResult, MailboxError>>,
}

/// One instance's state (see [`run_instance`]).
struct Runner {
    shared: Arc<SubShared>,
    spawner: Arc<dyn Spawner>,
    policy: Policy,
    dead_letters: Arc<dyn DeadLetterSink>,
    /// Events queued or in progress at this instance (the router's least-loaded choice).
    load: Arc<AtomicUsize>,
    /// The running actor; `None` after a failure, until the restart.
    actor: Option<Box<dyn Invoke>>,
    watchdog: tokio::time::Interval,
    /// Consecutive failures of this instance; drives the restart backoff, reset by a success.
    failures: u32,
    /// Jobs taken back from a pipeline, in mailbox order, with their next attempt: ones that
    /// failed an attempt, and ones the actor never ran because an earlier one failed (attempt 1).
    /// They run one at a time, before the mailbox.
    again: VecDeque<(Job, u32)>,
}

impl Runner {
    /// Fencing at dequeue: a job of a subscription that left this node goes to `returns`.
    fn dequeued(&self, job: Job) -> Option<Job> {
        if self.shared.retired.load(Ordering::Acquire) {
            self.load.fetch_sub(1, Ordering::Relaxed);
            self.shared.progress.backlog.fetch_sub(1, Ordering::Relaxed);
            self.shared.returns.retired(&self.shared.key, job);
            return None;
        }
        Some(job)
    }

    fn finish(&self, job: Job, outcome: Outcome) {
        job.completion.complete(&self.shared.key, outcome);
        self.load.fetch_sub(1, Ordering::Relaxed);
        self.shared.progress.backlog.fetch_sub(1, Ordering::Relaxed);
    }

    /// The running actor, started (after the restart backoff, following failures) if needed.
    async fn actor(&mut self) -> &dyn Invoke {
        if self.actor.is_none() {
            if self.failures > 0 {
                tokio::time::sleep(self.policy.backoff(self.failures)).await;
                self.shared.metrics.restarts.increment(1);
            }
            self.actor = Some(self.spawner.start());
        }
        self.actor.as_deref().expect("started above")
    }

    fn delivery(&self, job: &Job, attempt: u32) -> Delivery {
        Delivery {
            event: job.event.clone(),
            subscription: self.shared.key.clone(),
            attempt,
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

    fn error(&self, result: Option<Result<HandlerResult, MailboxError>>) -> Option<String> {
        match result {
            Some(Ok(Ok(()))) => None,
            Some(Ok(Err(e))) => Some(e.to_string()),
            Some(Err(MailboxError::Closed)) => Some("handler panicked or stopped".to_string()),
            Some(Err(MailboxError::Timeout)) | None => {
                Some(format!("handler did not answer within {:?}", self.policy.call_timeout))
            }
        }
    }

    /// Counts a failed attempt; returns the outcome when it was the last one (then the event is
    /// dead-lettered, or kept in the WAL when the dead letter cannot be stored).
    async fn failed(&mut self, job: &Job, attempt: u32, error: String) -> Option<Outcome> {
        let shared = &self.shared;
        shared.metrics.delivered_error.increment(1);
        self.failures = self.failures.saturating_add(1);
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

    /// Runs one job alone from `attempt` on: retried on a fresh actor after each failure (with
    /// backoff) until it succeeds or runs out of attempts.
    async fn one(&mut self, job: &Job, mut attempt: u32) -> Outcome {
        loop {
            let delivery = self.delivery(job, attempt);
            let actor = self.actor().await;
            let started = Instant::now();
            let mut answer = actor.call(delivery);
            let result = Self::answer(&mut self.watchdog, self.policy.call_timeout, started, &mut answer).await;
            self.shared.metrics.duration.record(started.elapsed().as_secs_f64());
            let Some(error) = self.error(result) else {
                self.failures = 0;
                self.shared.metrics.delivered_ok.increment(1);
                return Outcome::Ok { attempts: attempt };
            };
            // A failed instance is replaced by a fresh one from the factory (after backoff).
            self.actor = None;
            if let Some(outcome) = self.failed(job, attempt, error).await {
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
    /// The first failure (error, panic or timeout) ends the pipeline: nothing more is sent, the
    /// answers still due are collected, and the actor is then replaced. Failed jobs go to `again`
    /// for their next attempt; ones a dead or hung actor never ran go there unattempted. A keyed
    /// job also ends it, and runs alone afterwards (per-key order includes retries).
    async fn pipeline(&mut self, first: Job, mailbox: &mut mpsc::Receiver<Job>) {
        let mut sent: VecDeque<Sent> = VecDeque::with_capacity(PIPELINE);
        let mut next = Some(first);
        // Set by the first failure: send nothing more, and count later `Closed` answers as never
        // run (the actor died at the failure).
        let mut broken = false;
        // A keyed job met while topping up: it runs after this pipeline.
        let mut held: Option<Job> = None;
        // When the oldest unanswered delivery could start: its send, or the previous answer.
        let mut since = Instant::now();
        loop {
            while !broken && held.is_none() && sent.len() < PIPELINE {
                let job = match next.take() {
                    Some(job) => job,
                    None => match mailbox.try_recv() {
                        Ok(job) => {
                            self.shared.metrics.mailbox_depth.decrement(1.0);
                            match self.dequeued(job) {
                                Some(job) => job,
                                None => continue,
                            }
                        }
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
                let answer = self.actor().await.call(delivery);
                sent.push_back(Sent { job, answer });
            }
            let Some(head) = sent.front_mut() else { break };
            let result = Self::answer(&mut self.watchdog, self.policy.call_timeout, since, &mut head.answer).await;
            let Some(Sent { job, .. }) = sent.pop_front() else {
                break;
            };
            let answered = Instant::now();
            self.shared
                .metrics
                .duration
                .record(answered.saturating_duration_since(since).as_secs_f64());
            since = answered;
            let timed_out = result.is_none();
            if broken && matches!(result, Some(Err(MailboxError::Closed))) {
                // The actor died at an earlier failure: this one never ran.
                self.again.push_back((job, 1));
                continue;
            }
            match self.error(result) {
                None => {
                    if !broken {
                        self.failures = 0;
                    }
                    self.shared.metrics.delivered_ok.increment(1);
                    self.finish(job, Outcome::Ok { attempts: 1 });
                }
                Some(error) => {
                    broken = true;
                    match self.failed(&job, 1, error).await {
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
        if broken {
            self.actor = None;
        }
        if let Some(job) = held {
            self.again.push_back((job, 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
