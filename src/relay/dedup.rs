//! The handler side's dedup window: the `(subscription, event id)` pairs seen recently, so a
//! delivery that arrives again (re-sent by its origin after a lost ack, or sent by another origin
//! after a WAL replay) is not handled twice.
//!
//! Pure: plain values in, plain values out. It owns no I/O and sends no acks; it says who waits
//! for an outcome (`W`, a *waiter*: whatever the caller needs to answer one copy of a delivery),
//! and the caller answers them.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};

use super::IdMap;
use crate::proto::AckCode;
use crate::types::SubscriptionKey;

/// A dedup window key: a 128-bit keyed hash of `(topic, group, event id)`, so the window holds
/// no strings (the keys are random per process, so collisions cannot be provoked).
pub(super) type DedupKey = u128;

/// A finished delivery as the window remembers it: what its later copies are answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Finished {
    pub(super) code: AckCode,
    pub(super) attempts: u32,
    pub(super) error: String,
}

enum Seen<W> {
    /// Being handled; the waiter it came with, and those of copies that arrived meanwhile (rare:
    /// no allocation for the usual single one), wait for the outcome.
    Running(W, Vec<W>),
    Done(Finished),
}

/// What [`Dedup::check`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Check {
    /// Not seen: handle it (the waiter is remembered and answered by [`Dedup::finish`]).
    New,
    /// Another copy is being handled: the waiter is answered with its outcome.
    Running,
    /// Handled already: answer with this outcome now.
    Done(Finished),
}

/// The waiters of one delivery, the first one first (no allocation for a single one).
pub(super) type Waiters<W> = std::iter::Chain<std::option::IntoIter<W>, std::vec::IntoIter<W>>;

fn waiters<W>(first: Option<W>, more: Vec<W>) -> Waiters<W> {
    first.into_iter().chain(more)
}

/// The window of recent `(subscription, event id)`: every running entry, and the last
/// `capacity` finished ones.
pub(super) struct Dedup<W> {
    map: IdMap<DedupKey, Seen<W>>,
    /// Finished keys, oldest first: the eviction order.
    done: VecDeque<DedupKey>,
    capacity: usize,
    /// Two independently keyed SipHashes make the 128-bit key.
    hash: (std::hash::RandomState, std::hash::RandomState),
}

impl<W> Dedup<W> {
    pub(super) fn new(capacity: usize) -> Self {
        Dedup {
            map: IdMap::default(),
            done: VecDeque::new(),
            capacity,
            hash: (std::hash::RandomState::new(), std::hash::RandomState::new()),
        }
    }

    pub(super) fn key(&self, sub: &SubscriptionKey, event_id: &str) -> DedupKey {
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

    /// A copy of `key` arrived, answered through `waiter`.
    pub(super) fn check(&mut self, key: DedupKey, waiter: W) -> Check {
        self.check_by(key, |_| waiter)
    }

    /// [`Dedup::check`] with the waiter made only when one is remembered: `waiter(true)` for the
    /// copy that runs (new), `waiter(false)` for one that waits (running); not called when the
    /// key is done.
    pub(super) fn check_by(&mut self, key: DedupKey, waiter: impl FnOnce(bool) -> W) -> Check {
        match self.map.get_mut(&key) {
            Some(Seen::Running(_, more)) => {
                more.push(waiter(false));
                Check::Running
            }
            Some(Seen::Done(f)) => Check::Done(f.clone()),
            None => {
                self.map.insert(key, Seen::Running(waiter(true), Vec::new()));
                Check::New
            }
        }
    }

    /// `key` finished: remembers its outcome (evicting the oldest finished entries beyond the
    /// capacity) and returns the waiters to answer. None when `key` was forgotten meanwhile.
    pub(super) fn finish(&mut self, key: DedupKey, finished: Finished) -> Waiters<W> {
        let Some(seen) = self.map.get_mut(&key) else {
            return waiters(None, Vec::new());
        };
        let waiting = match std::mem::replace(seen, Seen::Done(finished)) {
            Seen::Running(first, more) => waiters(Some(first), more),
            Seen::Done(_) => waiters(None, Vec::new()),
        };
        self.done.push_back(key);
        while self.done.len() > self.capacity {
            if let Some(old) = self.done.pop_front() {
                // A key finished twice is queued twice; only a finished entry is evicted.
                if matches!(self.map.get(&old), Some(Seen::Done(_))) {
                    self.map.remove(&old);
                }
            }
        }
        waiting
    }

    /// Forgets `key` (it will not run here) and returns the waiters of a running entry.
    pub(super) fn forget(&mut self, key: DedupKey) -> Waiters<W> {
        match self.map.remove(&key) {
            Some(Seen::Running(first, more)) => waiters(Some(first), more),
            _ => waiters(None, Vec::new()),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(group: &str) -> SubscriptionKey {
        SubscriptionKey {
            topic: "orders".into(),
            group: group.into(),
        }
    }

    fn ok(attempts: u32) -> Finished {
        Finished {
            code: AckCode::Ok,
            attempts,
            error: String::new(),
        }
    }

    #[test]
    fn keys_tell_subscriptions_and_events_apart() {
        let d = Dedup::<u64>::new(4);
        assert_eq!(d.key(&sub("a"), "e1"), d.key(&sub("a"), "e1"));
        assert_ne!(d.key(&sub("a"), "e1"), d.key(&sub("b"), "e1"));
        assert_ne!(d.key(&sub("a"), "e1"), d.key(&sub("a"), "e2"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(d.key(&sub("ab"), "c"), d.key(&sub("a"), "bc"));
    }

    #[test]
    fn a_new_delivery_runs_and_copies_wait_for_its_outcome() {
        let mut d = Dedup::new(4);
        let k = d.key(&sub("a"), "e1");
        assert_eq!(d.check(k, 1), Check::New);
        assert_eq!(d.check(k, 2), Check::Running);
        assert_eq!(d.check(k, 3), Check::Running);
        assert_eq!(d.finish(k, ok(1)).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn a_finished_delivery_is_answered_with_its_outcome() {
        let mut d = Dedup::new(4);
        let k = d.key(&sub("a"), "e1");
        assert_eq!(d.check(k, 1), Check::New);
        let failed = Finished {
            code: AckCode::DeadLettered,
            attempts: 3,
            error: "boom".into(),
        };
        assert_eq!(d.finish(k, failed.clone()).collect::<Vec<_>>(), vec![1]);
        assert_eq!(d.check(k, 2), Check::Done(failed));
    }

    #[test]
    fn the_oldest_finished_entries_are_evicted_beyond_the_capacity() {
        let mut d = Dedup::new(2);
        let keys: Vec<_> = (0..3).map(|i| d.key(&sub("a"), &format!("e{i}"))).collect();
        let running = d.key(&sub("a"), "running");
        assert_eq!(d.check(running, 9), Check::New);
        for &k in &keys {
            assert_eq!(d.check(k, 0), Check::New);
            d.finish(k, ok(1)).for_each(drop);
        }
        // e0 was evicted and runs again; e1 and e2 are remembered; the running entry stays.
        assert_eq!(d.len(), 3);
        assert_eq!(d.check(keys[0], 0), Check::New);
        assert_eq!(d.check(keys[2], 0), Check::Done(ok(1)));
        assert_eq!(d.check(running, 10), Check::Running);
    }

    #[test]
    fn a_forgotten_delivery_returns_its_waiters_and_runs_again() {
        let mut d = Dedup::new(4);
        let k = d.key(&sub("a"), "e1");
        assert_eq!(d.check(k, 1), Check::New);
        assert_eq!(d.check(k, 2), Check::Running);
        assert_eq!(d.forget(k).collect::<Vec<_>>(), vec![1, 2]);
        // Finishing a forgotten key answers no one and remembers nothing.
        assert_eq!(d.finish(k, ok(1)).count(), 0);
        assert_eq!(d.check(k, 3), Check::New);
        // Forgetting a finished entry returns no waiter.
        d.finish(k, ok(1)).for_each(drop);
        assert_eq!(d.forget(k).count(), 0);
        assert_eq!(d.check(k, 4), Check::New);
    }
}
