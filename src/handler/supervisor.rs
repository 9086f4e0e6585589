//! One supervisor task per handler instance: it owns the instance's bounded mailbox and its actor,
//! feeds the actor one event at a time, restarts it after failures and dead-letters poison events.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::MailboxError;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{Delivery, Invoke, Spawner, SubscriptionKey};
use crate::event::Event;
use crate::metrics::SubMetrics;

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
    fn store(
        &self,
        sub: &SubscriptionKey,
        event: &Event,
        attempts: u32,
        error: &str,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// An event waiting in an instance's mailbox.
pub(crate) struct Job {
    pub(crate) event: Arc<Event>,
    pub(crate) completion: Arc<dyn Completion>,
    /// `(origin node, delivery id)` when another node forwarded it here.
    pub(crate) origin: Option<(u64, u64)>,
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

/// Runs one instance until its mailbox is closed and drained. Must run on a worker arbiter.
pub(crate) async fn run_instance(
    shared: Arc<SubShared>,
    spawner: Arc<dyn Spawner>,
    policy: Policy,
    dead_letters: Arc<dyn DeadLetterSink>,
    mut mailbox: mpsc::Receiver<Job>,
    load: Arc<AtomicUsize>,
) {
    let mut actor: Option<Box<dyn Invoke>> = None;
    // One timer for the life of the instance instead of one per call: a per-call
    // `tokio::time::timeout` would register and cancel a timer-wheel entry for every event.
    // The watchdog ticks at a fraction of the timeout; a call is failed at the first tick past it.
    let mut watchdog = tokio::time::interval(policy.call_timeout / WATCHDOG_TICKS_PER_TIMEOUT);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Consecutive failures of this instance; drives the restart backoff, reset by a success.
    let mut failures: u32 = 0;
    while let Some(job) = mailbox.recv().await {
        shared.metrics.mailbox_depth.decrement(1.0);
        if shared.retired.load(Ordering::Acquire) {
            load.fetch_sub(1, Ordering::Relaxed);
            shared.progress.backlog.fetch_sub(1, Ordering::Relaxed);
            shared.returns.retired(&shared.key, job);
            continue;
        }
        let mut attempt = 1;
        let outcome = loop {
            if actor.is_none() {
                if failures > 0 {
                    tokio::time::sleep(policy.backoff(failures)).await;
                    shared.metrics.restarts.increment(1);
                }
                actor = Some(spawner.start());
            }
            let Some(current) = actor.as_ref() else { continue };
            let delivery = Delivery {
                event: job.event.clone(),
                subscription: shared.key.clone(),
                attempt,
            };
            let started = Instant::now();
            let call = current.call(delivery);
            tokio::pin!(call);
            let result = loop {
                tokio::select! {
                    biased;
                    r = &mut call => break Some(r),
                    _ = watchdog.tick() => {
                        if started.elapsed() >= policy.call_timeout {
                            break None;
                        }
                    }
                }
            };
            shared.metrics.duration.record(started.elapsed().as_secs_f64());
            let error = match result {
                Some(Ok(Ok(()))) => None,
                Some(Ok(Err(e))) => Some(e.to_string()),
                Some(Err(MailboxError::Closed)) => Some("handler panicked or stopped".to_string()),
                Some(Err(MailboxError::Timeout)) | None => {
                    Some(format!("handler did not answer within {:?}", policy.call_timeout))
                }
            };
            let Some(error) = error else {
                failures = 0;
                shared.metrics.delivered_ok.increment(1);
                break Outcome::Ok { attempts: attempt };
            };
            shared.metrics.delivered_error.increment(1);
            failures = failures.saturating_add(1);
            // A failed instance is replaced by a fresh one from the factory (after backoff).
            actor = None;
            tracing::warn!(subscription = %shared.key, id = %job.event.id, attempt, max_attempts = shared.max_attempts, %error, "handler failed");
            if attempt >= shared.max_attempts {
                break match dead_letters.store(&shared.key, &job.event, attempt, &error).await {
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
                };
            }
            attempt += 1;
            shared.metrics.redelivered.increment(1);
        };
        job.completion.complete(&shared.key, outcome);
        load.fetch_sub(1, Ordering::Relaxed);
        shared.progress.backlog.fetch_sub(1, Ordering::Relaxed);
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
