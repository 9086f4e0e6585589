//! The history checker of the fault tests (`tests/common/history.rs`) on hand-built histories:
//! for each rule a history that keeps it and one that breaks it, whose counter-example is
//! asserted (so the checker can fail, and says why in words). No nodes, no network.

mod common;

use std::time::Duration;

use common::history::{check, Ack, Delivery, Entry, Event, Fault, Op, Outcome, Rule, Verdict};
use serde_json::json;

const SUB: &str = "orders/audit";

/// Builds a history one operation a millisecond.
struct Build {
    entries: Vec<Entry>,
    attempts: u64,
    clock: Duration,
}

impl Build {
    /// A history where the test subscribed `subs`.
    fn new(subs: &[&str]) -> Build {
        let mut b = Build {
            entries: Vec::new(),
            attempts: 0,
            clock: Duration::ZERO,
        };
        for s in subs {
            b.push(Op::Subscribed {
                subscription: s.to_string(),
            });
        }
        b
    }

    fn push(&mut self, op: Op) -> &mut Build {
        self.clock += Duration::from_millis(1);
        self.entries.push(Entry { at: self.clock, op });
        self
    }

    /// Nothing happens for `seconds`.
    fn quiet(&mut self, seconds: u64) -> &mut Build {
        self.clock += Duration::from_secs(seconds);
        self
    }

    /// A publish attempt of `events` (`(id, key, n)`, data `{"n": n}`) to node `n1`: its number.
    fn publish(&mut self, events: &[(&str, Option<&str>, u64)]) -> u64 {
        self.attempts += 1;
        let events = events
            .iter()
            .map(|(id, key, n)| Event::new(*id, *key, json!({ "n": n })))
            .collect();
        let attempt = self.attempts;
        self.push(Op::Invoke {
            attempt,
            node: "http://n1".to_string(),
            events,
        });
        attempt
    }

    fn answer(&mut self, attempt: u64, outcome: Outcome) -> &mut Build {
        self.push(Op::Complete { attempt, outcome })
    }

    fn accepted(&mut self, attempt: u64) -> &mut Build {
        self.answer(
            attempt,
            Outcome::Accepted {
                ack: Ack::Accepted,
                subscriptions: Some(1),
            },
        )
    }

    /// Published in one attempt and accepted.
    fn acked(&mut self, events: &[(&str, Option<&str>, u64)]) -> &mut Build {
        let a = self.publish(events);
        self.accepted(a)
    }

    fn deliver_to(&mut self, sub: &str, id: &str, key: Option<&str>, n: u64) -> &mut Build {
        self.push(Op::Deliver(Delivery {
            id: id.to_string(),
            subscription: sub.to_string(),
            key: key.map(str::to_string),
            data: json!({ "n": n }),
            attempt: Some(1),
            from: Some("127.0.0.1".to_string()),
        }))
    }

    fn deliver(&mut self, id: &str, key: Option<&str>, n: u64) -> &mut Build {
        self.deliver_to(SUB, id, key, n)
    }

    fn fault(&mut self, node: u64, fault: Fault) -> &mut Build {
        self.push(Op::Fault { node, fault })
    }

    fn placement(&mut self, epoch: u64, nodes: &[u64]) -> &mut Build {
        self.push(Op::Placement {
            subscription: SUB.to_string(),
            epoch,
            nodes: nodes.to_vec(),
        })
    }

    fn handled_elsewhere(&mut self) -> &mut Build {
        self.push(Op::HandledElsewhere {
            subscription: SUB.to_string(),
        })
    }

    fn check(&self) -> Verdict {
        check(&self.entries)
    }
}

/// `fault` of node 2, which held the subscription (epoch 1), moved to node 3 (epoch 2), which
/// handles events; then `a4` and `a5` of key `a` accepted and delivered in the wrong order.
fn a5_before_a4_after(fault: Fault) -> Build {
    let mut b = Build::new(&[SUB]);
    b.placement(1, &[2]);
    b.fault(2, fault);
    b.placement(2, &[3]);
    b.handled_elsewhere();
    b.acked(&[("a4", Some("a"), 4)]);
    b.acked(&[("a5", Some("a"), 5)]);
    b.deliver("a5", Some("a"), 5).deliver("a4", Some("a"), 4);
    b
}

/// Fails unless the history keeps every rule.
fn holds(b: &Build) -> Verdict {
    let v = b.check();
    assert!(v.holds(), "{}", v.counter_example());
    v
}

/// Fails unless the history breaks exactly `rules` (in the order found); the counter-example,
/// which must contain each of `lines`.
fn breaks(b: &Build, rules: &[Rule], lines: &[&str]) -> String {
    let v = b.check();
    let found: Vec<Rule> = v.violations.iter().map(|v| v.rule).collect();
    let text = v.counter_example();
    assert_eq!(found, rules, "{text}");
    for l in lines {
        assert!(text.contains(l), "the counter-example lacks {l:?}:\n{text}");
    }
    text
}

// ---------------------------------------------------------------------------------------------
// 1. At least once

#[test]
fn an_acknowledged_event_delivered_to_every_subscription_holds() {
    let mut b = Build::new(&[SUB, "orders/mail"]);
    b.acked(&[("e1", None, 1)]).deliver("e1", None, 1);
    b.deliver_to("orders/mail", "e1", None, 1);
    let v = holds(&b);
    assert_eq!((v.acknowledged, v.deliveries, v.duplicates), (1, 2, 0));
}

#[test]
fn an_acknowledged_event_missing_at_one_subscription_is_lost() {
    let mut b = Build::new(&[SUB, "orders/mail"]);
    b.acked(&[("e1", None, 1), ("e2", None, 2)]).deliver("e1", None, 1);
    b.deliver("e2", None, 2).deliver_to("orders/mail", "e2", None, 2);
    b.fault(2, Fault::Kill);
    let text = breaks(
        &b,
        &[Rule::Lost],
        &[
            "1 violation(s) {Lost: 1}",
            "Lost (orders/mail): e1 was acknowledged but never delivered to orders/mail",
            "    0.003s  publish attempt 1 to http://n1: 2 event(s), among them e1 (#0, key -, data {\"n\":1})",
            "    0.004s  publish attempt 1 accepted (ack Accepted, subscriptions Some(1))",
            "    0.005s  delivered e1 to orders/audit (key -, data {\"n\":1}, handler attempt 1, from 127.0.0.1)",
            // A lost event's slice runs to the end of the history: the faults after it count.
            "    0.008s  FAULT Kill node 2",
        ],
    );
    assert!(
        !text.contains("delivered e2"),
        "only the offending event's deliveries:\n{text}"
    );
}

#[test]
fn events_not_acknowledged_or_at_most_once_or_unrouted_are_not_required() {
    let mut b = Build::new(&[SUB]);
    let refused = b.publish(&[("r1", None, 1)]);
    b.answer(
        refused,
        Outcome::Refused {
            status: 429,
            code: "overloaded".into(),
        },
    );
    let unknown = b.publish(&[("u1", None, 2)]);
    b.answer(unknown, Outcome::Unknown("timeout".into()));
    let none = b.publish(&[("n1", None, 3)]);
    b.answer(
        none,
        Outcome::Accepted {
            ack: Ack::None,
            subscriptions: Some(1),
        },
    );
    let unrouted = b.publish(&[("z1", None, 4)]);
    b.answer(
        unrouted,
        Outcome::Accepted {
            ack: Ack::Accepted,
            subscriptions: Some(0),
        },
    );
    assert_eq!(holds(&b).acknowledged, 0);
}

// ---------------------------------------------------------------------------------------------
// 2. Nothing unexpected

#[test]
fn an_event_may_arrive_after_an_unknown_or_accepted_attempt_even_if_a_later_one_was_refused() {
    let mut b = Build::new(&[SUB]);
    let first = b.publish(&[("e1", None, 1)]);
    b.answer(first, Outcome::Unknown("connection reset".into()));
    let second = b.publish(&[("e1", None, 1)]);
    b.answer(
        second,
        Outcome::Refused {
            status: 503,
            code: "unavailable".into(),
        },
    );
    b.deliver("e1", None, 1);
    holds(&b);
}

#[test]
fn an_event_whose_every_attempt_was_refused_must_not_arrive() {
    let mut b = Build::new(&[SUB]);
    let a = b.publish(&[("e1", None, 1)]);
    b.answer(
        a,
        Outcome::Refused {
            status: 429,
            code: "overloaded".into(),
        },
    );
    b.deliver("e1", None, 1);
    b.deliver("ghost", None, 9);
    breaks(
        &b,
        &[Rule::Unexpected, Rule::Unexpected],
        &[
            "Unexpected (orders/audit): e1 was delivered, but every attempt to publish it (before it arrived) was refused",
            "    0.003s  publish attempt 1 refused 429 overloaded",
            "Unexpected (orders/audit): ghost was delivered but never published",
        ],
    );
}

#[test]
fn a_delivery_to_a_subscription_never_made_is_unexpected() {
    let mut b = Build::new(&[SUB]);
    b.acked(&[("e1", None, 1)]).deliver("e1", None, 1);
    b.deliver_to("orders/other", "e1", None, 1);
    breaks(
        &b,
        &[Rule::Unexpected],
        &["e1 was delivered to orders/other, which the test never subscribed"],
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Payloads

#[test]
fn a_delivery_with_other_data_or_key_breaks_the_payload_rule() {
    let mut b = Build::new(&[SUB]);
    b.acked(&[("e1", Some("k"), 1), ("e2", Some("k"), 2)]);
    b.deliver("e1", Some("k"), 1).deliver("e2", Some("other"), 3);
    breaks(
        &b,
        &[Rule::Payload],
        &[
            "Payload (orders/audit): e2 was delivered with key Some(\"other\") and data {\"n\":3}, but published with key Some(\"k\") and data {\"n\":2}",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Duplicates

#[test]
fn without_a_fault_a_duplicate_is_a_violation() {
    let mut b = Build::new(&[SUB]);
    b.placement(1, &[1]);
    b.acked(&[("e1", None, 1)])
        .deliver("e1", None, 1)
        .deliver("e1", None, 1);
    breaks(
        &b,
        &[Rule::Duplicated],
        &[
            "Duplicated (orders/audit): e1 was delivered 2 times (1 duplicate(s)), but it was exposed to no placement change",
            "    0.005s  delivered e1",
            "    0.006s  delivered e1",
        ],
    );
}

#[test]
fn events_in_flight_at_a_kill_or_accepted_until_the_move_may_repeat_once_per_change() {
    let mut b = Build::new(&[SUB]);
    b.placement(1, &[2]);
    b.acked(&[("done", None, 0)]).deliver("done", None, 0);
    b.acked(&[("flying", None, 1)]);
    b.quiet(2);
    b.fault(2, Fault::Kill);
    b.acked(&[("detecting", None, 2)]);
    b.placement(2, &[3]);
    b.handled_elsewhere();
    b.deliver("flying", None, 1).deliver("detecting", None, 2);
    b.deliver("flying", None, 1).deliver("detecting", None, 2);
    let v = holds(&b);
    assert_eq!((v.duplicates, v.duplicates_allowed), (2, 2));
}

#[test]
fn a_third_copy_after_one_change_an_event_handled_before_the_fault_and_one_accepted_after_the_move_may_not_repeat() {
    let mut b = Build::new(&[SUB]);
    b.placement(1, &[2]);
    b.acked(&[("done", None, 0)]).deliver("done", None, 0);
    b.acked(&[("flying", None, 1)]);
    // Handled 2 s before the fault: finished (its ack had time to go back).
    b.quiet(2);
    b.fault(2, Fault::Kill);
    b.placement(2, &[3]);
    b.acked(&[("later", None, 2)]);
    b.deliver("flying", None, 1)
        .deliver("flying", None, 1)
        .deliver("flying", None, 1);
    b.deliver("done", None, 0);
    b.deliver("later", None, 2).deliver("later", None, 2);
    breaks(
        &b,
        &[Rule::Duplicated, Rule::Duplicated, Rule::Duplicated],
        &[
            "3 violation(s) {Duplicated: 3}",
            "Duplicated (orders/audit): done was delivered 2 times (1 duplicate(s)), but it was exposed to no placement change",
            "Duplicated (orders/audit): flying was delivered 3 times (2 duplicate(s)), but the placement changes it was exposed to (epochs {2}) allow 1",
            "Duplicated (orders/audit): later was delivered 2 times (1 duplicate(s)), but it was exposed to no placement change",
            // The faults and placements between the publish and the last delivery.
            "    2.008s  FAULT Kill node 2",
            "    2.009s  placement of orders/audit: nodes [3], epoch 2",
        ],
    );
}

#[test]
fn an_event_delivered_just_before_the_fault_may_not_be_finished_and_may_repeat() {
    let mut b = Build::new(&[SUB]);
    b.placement(1, &[2]);
    b.acked(&[("acking", None, 0)]).deliver("acking", None, 0);
    b.fault(2, Fault::Kill);
    b.placement(2, &[3]);
    b.deliver("acking", None, 0);
    holds(&b);
}

#[test]
fn a_frozen_node_that_resumes_is_two_changes() {
    let mut b = Build::new(&[SUB]);
    b.placement(1, &[2]);
    b.acked(&[("flying", None, 1)]);
    b.fault(2, Fault::Freeze);
    b.placement(2, &[3]);
    b.fault(2, Fault::Resume);
    b.placement(3, &[2]);
    for _ in 0..3 {
        b.deliver("flying", None, 1);
    }
    holds(&b);
    b.deliver("flying", None, 1);
    breaks(&b, &[Rule::Duplicated], &["(epochs {2, 3}) allow 2"]);
}

#[test]
fn a_retry_after_no_answer_may_repeat_only_across_a_placement_change() {
    let mut b = Build::new(&[SUB]);
    b.placement(1, &[2]);
    let first = b.publish(&[("e1", None, 1)]);
    b.answer(first, Outcome::Unknown("timeout".into()));
    let retry = b.publish(&[("e1", None, 1)]);
    b.accepted(retry);
    b.deliver("e1", None, 1).deliver("e1", None, 1);
    breaks(
        &b,
        &[Rule::Duplicated],
        &[
            "e1 was delivered 2 times (1 duplicate(s)), but it was exposed to no placement change",
            "    0.004s  publish attempt 1 no answer: timeout",
            "    0.005s  publish attempt 2 to http://n1",
        ],
    );

    let mut b = Build::new(&[SUB]);
    b.placement(1, &[2]);
    let first = b.publish(&[("e1", None, 1)]);
    b.answer(first, Outcome::Unknown("timeout".into()));
    b.placement(2, &[3]);
    let retry = b.publish(&[("e1", None, 1)]);
    b.accepted(retry);
    b.deliver("e1", None, 1).deliver("e1", None, 1);
    holds(&b);
}

// ---------------------------------------------------------------------------------------------
// 5. Per-key order

#[test]
fn a_keys_events_in_publish_order_hold_and_other_keys_do_not_matter() {
    let mut b = Build::new(&[SUB]);
    b.acked(&[("a1", Some("a"), 1), ("a2", Some("a"), 2)]);
    b.acked(&[("b1", Some("b"), 3)]);
    b.acked(&[("a3", Some("a"), 4)]);
    b.deliver("b1", Some("b"), 3);
    b.deliver("a1", Some("a"), 1)
        .deliver("a2", Some("a"), 2)
        .deliver("a3", Some("a"), 4);
    let v = holds(&b);
    assert_eq!(v.ordered["delivered with no fault"], 2);
}

#[test]
fn a_key_reordered_within_a_batch_or_across_publishes_breaks_the_order() {
    let mut b = Build::new(&[SUB]);
    b.acked(&[("a1", Some("a"), 1), ("a2", Some("a"), 2)]);
    b.acked(&[("a3", Some("a"), 3)]);
    b.deliver("a2", Some("a"), 2).deliver("a1", Some("a"), 1);
    // Unkeyed events have no order.
    b.acked(&[("u1", None, 4), ("u2", None, 5)]);
    b.deliver("u2", None, 5).deliver("u1", None, 4);
    b.deliver("a3", Some("a"), 3);
    let mut b2 = Build::new(&[SUB]);
    b2.acked(&[("a1", Some("a"), 1)]);
    b2.acked(&[("a2", Some("a"), 2)]);
    b2.deliver("a2", Some("a"), 2).deliver("a1", Some("a"), 1);
    breaks(
        &b,
        &[Rule::Order],
        &[
            "Order (orders/audit): key a, events delivered with no fault: a1 was published before a2, but a2 was first delivered at 0.006s and a1 only at 0.007s",
            "    0.002s  publish attempt 1 to http://n1: 2 event(s), among them a1 (#0, key a, data {\"n\":1}), a2 (#1, key a, data {\"n\":2})",
        ],
    );
    breaks(
        &b2,
        &[Rule::Order],
        &["a1 was published before a2, but a2 was first delivered at 0.006s and a1 only at 0.007s"],
    );
}

#[test]
fn after_a_kill_events_in_flight_may_come_late_but_those_accepted_once_handled_elsewhere_keep_order() {
    let mut b = Build::new(&[SUB]);
    b.placement(1, &[2]);
    b.acked(&[("a1", Some("a"), 1)]).deliver("a1", Some("a"), 1);
    b.acked(&[("a2", Some("a"), 2)]);
    b.fault(2, Fault::Kill);
    b.acked(&[("a3", Some("a"), 3)]);
    b.placement(2, &[3]);
    b.handled_elsewhere();
    b.acked(&[("a4", Some("a"), 4)]);
    b.acked(&[("a5", Some("a"), 5)]);
    // a2 (in flight) and a3 (accepted while detecting) come after a4: the documented exception.
    b.deliver("a4", Some("a"), 4)
        .deliver("a3", Some("a"), 3)
        .deliver("a2", Some("a"), 2);
    b.deliver("a5", Some("a"), 5);
    let v = holds(&b);
    assert_eq!(
        v.ordered
            .iter()
            .find(|(k, _)| k.starts_with("accepted once handled elsewhere after the kill of node 2"))
            .map(|(_, n)| *n),
        Some(1)
    );

    breaks(
        &a5_before_a4_after(Fault::Kill),
        &[Rule::Order],
        &[
            "key a, events accepted once handled elsewhere after the kill of node 2 at 0.003s: a4 was published before a5",
            "    0.003s  FAULT Kill node 2",
            "    0.005s  the new nodes of orders/audit handle events",
        ],
    );
}

#[test]
fn after_a_freeze_no_order_is_promised() {
    holds(&a5_before_a4_after(Fault::Freeze));
}

/// The counter-example stays short: a few offending events with their slices, and counts.
#[test]
fn a_counter_example_shows_a_few_events_not_thousands() {
    let mut b = Build::new(&[SUB]);
    for i in 0..1000 {
        b.acked(&[(&format!("e{i}"), None, i)]);
    }
    let text = breaks(
        &b,
        &[Rule::Lost; 1000],
        &[
            "1000 violation(s) {Lost: 1000}",
            "… and 997 more: Lost e100, Lost e101,",
        ],
    );
    assert!(text.lines().count() < 30, "{text}");
}
