//! The sending side's pending deliveries: where each one is, and the pure rule that says when
//! one must be routed again. The table itself and the routing live in `outbound`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::Event;
use crate::handler::supervisor::{Completion, Outcome};
use crate::types::SubscriptionKey;

/// Fires the wrapped completion once, however many copies of a delivery finish.
pub(super) struct Once {
    fired: AtomicBool,
    inner: Arc<dyn Completion>,
}

impl Once {
    pub(super) fn new(inner: Arc<dyn Completion>) -> Arc<Once> {
        Arc::new(Once {
            fired: AtomicBool::new(false),
            inner,
        })
    }
}

impl Completion for Once {
    fn complete(&self, sub: &SubscriptionKey, outcome: Outcome) {
        if !self.fired.swap(true, Ordering::AcqRel) {
            self.inner.complete(sub, outcome);
        }
    }
}

/// Where a pending delivery is.
pub(super) enum Destination {
    /// Held here until a node can take it (every instance is on an unhealthy node, or a replay
    /// or a retired job handed it over to be routed).
    Parked,
    /// Sent to `node`, holding one unit of the window towards it.
    Sent {
        node: u64,
        load: Arc<AtomicUsize>,
        at: Instant,
        /// The node refused it (fencing): route it again now.
        refused: bool,
    },
}

/// A delivery waiting for its ack (or for a node to take it).
pub(super) struct Pending {
    pub(super) key: Arc<SubscriptionKey>,
    pub(super) event: Arc<Event>,
    pub(super) done: Arc<Once>,
    pub(super) to: Destination,
    /// Nodes it was sent to before (it was routed away from them): their late answers are not
    /// forged, and an ack from one of them still completes it (the event was handled there).
    pub(super) earlier: Vec<u64>,
    /// An `ack=none` event held here (parked, or handed back by an instance that left): routed
    /// once and forgotten, on a lane or to a local instance, never re-sent (at-most-once).
    pub(super) at_most_once: bool,
}

impl Pending {
    /// Gives the window unit back (if one is held) and parks the delivery.
    pub(super) fn release(&mut self) {
        if let Destination::Sent { load, node, .. } = std::mem::replace(&mut self.to, Destination::Parked) {
            load.fetch_sub(1, Ordering::AcqRel);
            if !self.earlier.contains(&node) {
                self.earlier.push(node);
            }
        }
    }

    /// `from` refused it (fencing). Only the node it was sent to may: a late refusal from a node
    /// it was routed away from says nothing about where it is now. Whether it counted.
    pub(super) fn refuse(&mut self, from: u64) -> bool {
        match &mut self.to {
            Destination::Sent { node, refused, .. } if *node == from => {
                *refused = true;
                true
            }
            _ => false,
        }
    }

    /// The node it was sent to, if any.
    pub(super) fn node(&self) -> Option<u64> {
        match self.to {
            Destination::Parked => None,
            Destination::Sent { node, .. } => Some(node),
        }
    }
}

/// Whether peer `from` may answer (ack or refuse) delivery `p`, if it is pending: only a node it
/// was sent to. An answer for a delivery that is no longer pending (already done, or of this
/// node's previous process) is ignored; one from a node it was never sent to is refused — a
/// forged ack must not complete (and drop from the WAL) an event another node has not handled.
pub(super) fn may_answer(p: Option<&Pending>, from: u64) -> Answer {
    match p {
        None => Answer::Unknown,
        Some(p) if p.node() == Some(from) => Answer::Yes,
        Some(p) if p.earlier.contains(&from) => Answer::Earlier,
        Some(_) => Answer::NotSentToPeer,
    }
}

/// See [`may_answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// It was sent to that peer: the answer counts.
    Yes,
    /// Not pending: ignored.
    Unknown,
    /// Sent there before it was routed elsewhere: a late answer. An outcome counts (the event
    /// was handled there); a refusal is ignored (it says nothing about where it is now).
    Earlier,
    /// Pending, but not at that peer: refused.
    NotSentToPeer,
}

/// Where a node stands for one subscription, as the current routing table and health say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NodeState {
    /// Healthy and runs an instance of the subscription.
    Placed,
    /// Suspect, degraded or down.
    Unhealthy,
    /// Healthy, but the placement moved the subscription away from it.
    Moved,
}

/// Why a pending delivery is routed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reroute {
    Parked,
    Refused,
    Unhealthy,
    Moved,
    /// No ack within `redeliver_after`.
    Timeout,
}

/// Whether a delivery at `to` must be routed again now; `state` says where its node stands (it
/// is asked only for a sent delivery, at most once).
pub(super) fn reroute(
    to: &Destination,
    now: Instant,
    redeliver_after: Duration,
    state: impl FnOnce(u64) -> NodeState,
) -> Option<Reroute> {
    let &Destination::Sent { node, at, refused, .. } = to else {
        return Some(Reroute::Parked);
    };
    if refused {
        return Some(Reroute::Refused);
    }
    match state(node) {
        NodeState::Unhealthy => return Some(Reroute::Unhealthy),
        NodeState::Moved => return Some(Reroute::Moved),
        NodeState::Placed => {}
    }
    (now.saturating_duration_since(at) >= redeliver_after).then_some(Reroute::Timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(5);

    fn sent(at: Instant, refused: bool) -> Destination {
        Destination::Sent {
            node: 2,
            load: Arc::new(AtomicUsize::new(1)),
            at,
            refused,
        }
    }

    #[test]
    fn only_the_node_a_delivery_was_sent_to_may_answer_for_it() {
        let p = pending(sent(Instant::now(), false));
        assert_eq!(may_answer(Some(&p), 2), Answer::Yes);
        assert_eq!(may_answer(Some(&p), 3), Answer::NotSentToPeer, "a forged ack");
        assert_eq!(
            may_answer(Some(&pending(Destination::Parked)), 2),
            Answer::NotSentToPeer
        );
        assert_eq!(may_answer(None, 2), Answer::Unknown);
        // Routed away from node 2: its late answer is not forged; node 3 still may not answer.
        let mut p = p;
        p.release();
        assert_eq!(may_answer(Some(&p), 2), Answer::Earlier);
        assert_eq!(may_answer(Some(&p), 3), Answer::NotSentToPeer);
    }

    #[test]
    fn a_parked_delivery_is_always_routed() {
        let now = Instant::now();
        assert_eq!(
            reroute(&Destination::Parked, now, AFTER, |_| unreachable!(
                "a parked delivery has no node"
            )),
            Some(Reroute::Parked)
        );
    }

    #[test]
    fn a_delivery_on_a_healthy_placed_node_waits_for_its_ack_until_the_timeout() {
        let at = Instant::now();
        let to = sent(at, false);
        assert_eq!(reroute(&to, at, AFTER, |_| NodeState::Placed), None);
        assert_eq!(reroute(&to, at + AFTER / 2, AFTER, |_| NodeState::Placed), None);
        assert_eq!(
            reroute(&to, at + AFTER, AFTER, |_| NodeState::Placed),
            Some(Reroute::Timeout)
        );
    }

    #[test]
    fn a_delivery_is_routed_again_when_its_node_is_suspect_or_no_longer_placed() {
        let at = Instant::now();
        let to = sent(at, false);
        assert_eq!(
            reroute(&to, at, AFTER, |n| {
                assert_eq!(n, 2);
                NodeState::Unhealthy
            }),
            Some(Reroute::Unhealthy)
        );
        assert_eq!(reroute(&to, at, AFTER, |_| NodeState::Moved), Some(Reroute::Moved));
    }

    #[test]
    fn a_refused_delivery_is_routed_again_at_once() {
        let at = Instant::now();
        assert_eq!(
            reroute(&sent(at, true), at, AFTER, |_| NodeState::Placed),
            Some(Reroute::Refused)
        );
    }

    #[test]
    fn releasing_gives_the_window_unit_back_once_and_parks() {
        let load = Arc::new(AtomicUsize::new(1));
        let mut p = pending(Destination::Sent {
            node: 2,
            load: load.clone(),
            at: Instant::now(),
            refused: false,
        });
        assert_eq!(p.node(), Some(2));
        p.release();
        p.release();
        assert_eq!(load.load(Ordering::Acquire), 0);
        assert_eq!(p.node(), None);
    }

    #[test]
    fn only_the_node_a_delivery_was_sent_to_can_refuse_it() {
        let mut p = pending(Destination::Parked);
        assert!(!p.refuse(2), "a parked delivery was sent nowhere");
        let at = Instant::now();
        p.to = sent(at, false);
        assert!(!p.refuse(3));
        assert_eq!(reroute(&p.to, at, AFTER, |_| NodeState::Placed), None);
        assert!(p.refuse(2));
        assert_eq!(reroute(&p.to, at, AFTER, |_| NodeState::Placed), Some(Reroute::Refused));
    }

    fn pending(to: Destination) -> Pending {
        Pending {
            key: Arc::new(SubscriptionKey {
                topic: "t".into(),
                group: "g".into(),
            }),
            event: Arc::new(Event::new("t", "{}", "application/json")),
            done: Once::new(Arc::new(Nothing)),
            to,
            earlier: Vec::new(),
            at_most_once: false,
        }
    }

    struct Nothing;
    impl Completion for Nothing {
        fn complete(&self, _: &SubscriptionKey, _: Outcome) {}
    }

    #[test]
    fn once_fires_the_completion_once() {
        struct Count(AtomicUsize);
        impl Completion for Count {
            fn complete(&self, _: &SubscriptionKey, _: Outcome) {
                self.0.fetch_add(1, Ordering::AcqRel);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let once = Once::new(count.clone());
        let key = SubscriptionKey {
            topic: "t".into(),
            group: "g".into(),
        };
        once.complete(&key, Outcome::Ok { attempts: 1 });
        once.complete(&key, Outcome::Ok { attempts: 2 });
        assert_eq!(count.0.load(Ordering::Acquire), 1);
    }
}
