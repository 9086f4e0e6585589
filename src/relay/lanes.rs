//! The sending side's at-most-once lanes (`ack=none`): one per window counter (a remote instance
//! of a subscription) that such events were sent on. A lane holds the window units of its
//! deliveries until the handler node credits them back in bulk, and gives them back on its own
//! when the node turns unhealthy or no credit came for a while (credits lost with a connection):
//! those deliveries are presumed lost, which `ack=none` allows.
//!
//! Pure bookkeeping over plain values (the clock and peer health are arguments); it sends nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::IdMap;

/// How long a lane with nothing outstanding is kept before it is forgotten.
pub(super) const IDLE_LANE: Duration = Duration::from_secs(60);

/// The lanes of this node's at-most-once deliveries.
#[derive(Default)]
pub(super) struct Lanes {
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

/// What a credit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Credited {
    /// The units went back.
    Yes,
    /// No such lane (any more): ignored.
    Unknown,
    /// The lane's deliveries were sent to another node: refused.
    NotSentToPeer,
}

/// Units a lane gave back without a credit (see [`Lanes::sweep`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Lost {
    pub(super) node: u64,
    pub(super) units: usize,
}

impl Lanes {
    /// The lanes of deliveries to `node`, one per window unit in `loads` (each already reserved
    /// by the router), in order; each lane now holds its units. Runs of one counter (a publish
    /// call's events for one instance) cost one lookup.
    pub(super) fn assign<'a>(
        &mut self,
        node: u64,
        loads: impl Iterator<Item = &'a Arc<AtomicUsize>>,
        now: Instant,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        let mut last: Option<(usize, u64)> = None;
        for load in loads {
            let at = Arc::as_ptr(load) as usize;
            let lane = match last {
                Some((a, lane)) if a == at => lane,
                _ => {
                    let lanes = &mut self.lanes;
                    let lane = *self.by_load.entry(at).or_insert_with(|| {
                        // Random, like delivery ids: credits meant for this node's previous
                        // process cannot match. Odd, so never 0 (which means "no lane").
                        let lane = crate::types::random_u64() | 1;
                        lanes.insert(
                            lane,
                            Lane {
                                node,
                                load: load.clone(),
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
            if let Some(l) = self.lanes.get_mut(&lane) {
                if l.outstanding == 0 {
                    l.progress = now;
                }
                l.outstanding += 1;
            }
            out.push(lane);
        }
        out
    }

    /// `from` credited `n` deliveries of `lane`: their units go back to the window. A credit for
    /// a lane this node does not know (forgotten, or of this node's previous process) is ignored;
    /// one from another node than the lane's is refused (a peer may only credit what was sent to
    /// it).
    pub(super) fn credit(&mut self, from: u64, lane: u64, n: u64, now: Instant) -> Credited {
        match self.lanes.get_mut(&lane) {
            None => Credited::Unknown,
            Some(l) if l.node != from => Credited::NotSentToPeer,
            Some(l) => {
                l.release(usize::try_from(n).unwrap_or(usize::MAX));
                l.progress = now;
                Credited::Yes
            }
        }
    }

    /// Gives back the units of lanes whose node is not `routable` or that made no progress for
    /// `redeliver_after` (their deliveries are lost: at-most-once), and forgets idle lanes.
    pub(super) fn sweep(
        &mut self,
        now: Instant,
        redeliver_after: Duration,
        routable: impl Fn(u64) -> bool,
    ) -> Vec<Lost> {
        let mut lost = Vec::new();
        let mut forget = Vec::new();
        for (&id, lane) in self.lanes.iter_mut() {
            let idle = now.saturating_duration_since(lane.progress);
            if lane.outstanding > 0 && (idle >= redeliver_after || !routable(lane.node)) {
                lost.push(Lost {
                    node: lane.node,
                    units: lane.outstanding,
                });
                lane.release(lane.outstanding);
                lane.progress = now;
            } else if lane.outstanding == 0 && idle >= IDLE_LANE {
                forget.push(id);
            }
        }
        for id in forget {
            if let Some(lane) = self.lanes.remove(&id) {
                self.by_load.remove(&(Arc::as_ptr(&lane.load) as usize));
            }
        }
        lost
    }

    /// Whether any lane holds window units (deliveries not credited back yet).
    pub(super) fn outstanding(&self) -> bool {
        self.lanes.values().any(|l| l.outstanding > 0)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lanes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(5);

    /// A window counter with `n` units reserved, as the router leaves it.
    fn reserved(n: usize) -> Arc<AtomicUsize> {
        Arc::new(AtomicUsize::new(n))
    }

    fn units(load: &Arc<AtomicUsize>) -> usize {
        load.load(Ordering::Acquire)
    }

    #[test]
    fn one_counter_is_one_lane_and_credits_give_units_back_in_bulk() {
        let (a, b) = (reserved(3), reserved(1));
        let mut lanes = Lanes::default();
        let now = Instant::now();
        let got = lanes.assign(7, [&a, &a, &b, &a].into_iter(), now);
        assert_eq!(got[0], got[1]);
        assert_eq!(got[0], got[3]);
        assert_ne!(got[0], got[2]);
        assert!(got.iter().all(|&l| l != 0), "0 means no lane on the wire");
        lanes.credit(7, got[0], 2, now);
        assert_eq!(units(&a), 1);
        lanes.credit(7, got[2], 1, now);
        assert_eq!(units(&b), 0);
        // The same counter keeps its lane on later calls.
        assert_eq!(lanes.assign(7, [&a].into_iter(), now), vec![got[0]]);
        assert_eq!(lanes.len(), 2);
    }

    #[test]
    fn lanes_hold_units_until_every_credit_is_back() {
        let a = reserved(2);
        let mut lanes = Lanes::default();
        assert!(!lanes.outstanding());
        let now = Instant::now();
        let lane = lanes.assign(7, [&a, &a].into_iter(), now)[0];
        assert!(lanes.outstanding());
        lanes.credit(7, lane, 1, now);
        assert!(lanes.outstanding(), "one unit is still held");
        lanes.credit(7, lane, 1, now);
        assert!(!lanes.outstanding(), "the lane is kept, empty");
        assert_eq!(lanes.len(), 1);
    }

    #[test]
    fn credits_never_give_back_more_than_is_held_nor_for_another_node() {
        let a = reserved(2);
        let mut lanes = Lanes::default();
        let now = Instant::now();
        let lane = lanes.assign(7, [&a, &a].into_iter(), now)[0];
        assert_eq!(lanes.credit(8, lane, 2, now), Credited::NotSentToPeer);
        assert_eq!(units(&a), 2, "a credit from another node is refused");
        assert_eq!(lanes.credit(7, lane ^ 2, 2, now), Credited::Unknown);
        assert_eq!(units(&a), 2, "a credit for an unknown lane is ignored");
        assert_eq!(lanes.credit(7, lane, u64::MAX, now), Credited::Yes);
        assert_eq!(units(&a), 0, "at most the held units go back");
    }

    #[test]
    fn a_lane_to_an_unhealthy_node_gives_its_units_back_at_once() {
        let a = reserved(2);
        let mut lanes = Lanes::default();
        let now = Instant::now();
        let lane = lanes.assign(7, [&a, &a].into_iter(), now)[0];
        assert!(lanes.sweep(now, AFTER, |_| true).is_empty());
        assert_eq!(units(&a), 2);
        assert_eq!(lanes.sweep(now, AFTER, |n| n != 7), vec![Lost { node: 7, units: 2 }]);
        assert_eq!(units(&a), 0);
        // A credit that arrives after the units were given back is ignored.
        lanes.credit(7, lane, 2, now);
        assert_eq!(units(&a), 0);
    }

    #[test]
    fn a_lane_without_credit_for_redeliver_after_gives_its_units_back() {
        let a = reserved(1);
        let mut lanes = Lanes::default();
        let start = Instant::now();
        lanes.assign(7, [&a].into_iter(), start);
        assert!(lanes.sweep(start + AFTER / 2, AFTER, |_| true).is_empty());
        assert_eq!(
            lanes.sweep(start + AFTER, AFTER, |_| true),
            vec![Lost { node: 7, units: 1 }]
        );
        assert_eq!(units(&a), 0);
    }

    #[test]
    fn an_idle_lane_is_forgotten_and_a_busy_one_is_not() {
        let (a, b) = (reserved(1), reserved(1));
        let mut lanes = Lanes::default();
        let start = Instant::now();
        let la = lanes.assign(7, [&a].into_iter(), start)[0];
        lanes.assign(7, [&b].into_iter(), start);
        lanes.credit(7, la, 1, start);
        let later = start + IDLE_LANE;
        // a (credited, idle) is forgotten; b waits for its credit until `redeliver_after`.
        assert_eq!(lanes.sweep(later, IDLE_LANE * 2, |_| true), vec![]);
        assert_eq!(lanes.len(), 1);
        assert_eq!(
            lanes.sweep(later + IDLE_LANE, IDLE_LANE * 2, |_| true),
            vec![Lost { node: 7, units: 1 }]
        );
    }
}
