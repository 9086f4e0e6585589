//! A recorded history of a fault test and its checker (after Jepsen's queue checkers, which judge a
//! recorded history rather than counters).
//!
//! [`History`] is the one record of what happened, in the order it happened, each with its time
//! since the history began: every publish attempt (the events it carried and the node it went to),
//! how it ended (accepted with its ack mode, refused with a status, or unknown: no answer), every
//! delivery a receiver saw (the subscription and attempt from the webhook's headers, the address
//! it came from — Herald's webhook names no node), the faults the test injected (kill, freeze,
//! pause, partition, restart and their ends), the placements it saw and when the survivors handled
//! events after a move. The publishers of [`super::load`] and the [`super::EventRecorder`] write to
//! it; the counts they report are read from it.
//!
//! [`check`] is pure: a history's entries in, a [`Verdict`] out. It judges the history against the
//! README's "Delivery guarantees" as written (the rules are listed on [`check`]) and, when they do
//! not hold, [`Verdict::counter_example`] shows the offending events with their slice of the
//! history: their publishes and answers, their deliveries and the faults and placements between.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One event as published: its id, partition key and data.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: String,
    pub key: Option<String>,
    pub data: Value,
}

impl Event {
    pub fn new(id: impl Into<String>, key: Option<&str>, data: Value) -> Event {
        Event {
            id: id.into(),
            key: key.map(str::to_string),
            data,
        }
    }
}

/// The `ack` a publish asked for (README, "Delivery guarantees").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    /// At-most-once: not required to arrive.
    None,
    Accepted,
    Processed,
}

impl Ack {
    /// The ack of a publish path's query (`ack=accepted` when it names none).
    pub fn of_path(path: &str) -> Ack {
        if path.contains("ack=none") {
            Ack::None
        } else if path.contains("ack=processed") {
            Ack::Processed
        } else {
            Ack::Accepted
        }
    }
}

/// How a publish attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Acknowledged (`202`, or `200`/`504` for `ack=processed`); `subscriptions` from the answer
    /// (`0`: the ingress node knew no subscription of the topic, nothing is delivered).
    Accepted { ack: Ack, subscriptions: Option<u64> },
    /// Answered with an error (`429`, `503`, …): nothing of the request was accepted.
    Refused { status: u16, code: String },
    /// No answer (a timeout or a connection error): accepted or not, nobody knows.
    Unknown(String),
}

/// What a test did to a node. The first group begins a fault, the second ends one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Kill,
    Freeze,
    Pause,
    Disconnect,
    /// A graceful restart (SIGTERM: the node drains, then starts again).
    Restart,
    Resume,
    Unpause,
    Reconnect,
    Start,
}

impl Fault {
    /// Whether this begins a fault (the others end one).
    pub fn begins(self) -> bool {
        matches!(
            self,
            Fault::Kill | Fault::Freeze | Fault::Pause | Fault::Disconnect | Fault::Restart
        )
    }
}

/// One delivery a receiver saw.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub id: String,
    /// `topic/group`, from the webhook's `x-herald-subscription` header.
    pub subscription: String,
    pub key: Option<String>,
    pub data: Value,
    /// The handler's attempt number, from `x-herald-attempt`.
    pub attempt: Option<u32>,
    /// The address the request came from (a container's address names its node; on 127.0.0.1 it
    /// names none).
    pub from: Option<String>,
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// The test subscribes `topic/group`: every acknowledged event must reach it.
    Subscribed {
        subscription: String,
    },
    /// Publish attempt number `attempt` of `events` (one request: a batch carries several) to `node`.
    Invoke {
        attempt: u64,
        node: String,
        events: Vec<Event>,
    },
    /// How attempt `attempt` ended.
    Complete {
        attempt: u64,
        outcome: Outcome,
    },
    Deliver(Delivery),
    /// `fault` done to node `node` (its id).
    Fault {
        node: u64,
        fault: Fault,
    },
    /// The placement of `subscription` as a node showed it: the table's `epoch` (one new epoch per
    /// placement change) and the nodes of its instances.
    Placement {
        subscription: String,
        epoch: u64,
        nodes: Vec<u64>,
    },
    /// After a move, the new nodes of `subscription` handled events (their delivered count rose).
    HandledElsewhere {
        subscription: String,
    },
}

/// An operation and when it happened, since the history began.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub at: Duration,
    pub op: Op,
}

/// A delivery with the test's clock (as the reports and [`super::load::after_fault`] use it).
#[derive(Clone, Debug)]
pub struct Arrival {
    pub id: String,
    pub key: Option<String>,
    pub data: Value,
    pub at: Instant,
}

#[derive(Default)]
struct Log {
    entries: Vec<Entry>,
    /// Where the deliveries are in `entries`, in order.
    deliveries: Vec<usize>,
    /// Where each attempt's `Invoke` is in `entries`.
    attempts: HashMap<u64, usize>,
    /// Ids acknowledged so far, in the order they were (an index of `entries`).
    acknowledged: Vec<String>,
}

/// The record of one test, shared by its publishers (on the test's runtime) and its receivers (on
/// their server threads). Cloning shares it.
#[derive(Clone)]
pub struct History {
    start: Instant,
    log: Arc<Mutex<Log>>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    pub fn new() -> History {
        History {
            start: Instant::now(),
            log: Arc::default(),
        }
    }

    fn push(&self, op: Op) -> usize {
        let at = self.start.elapsed();
        let mut log = self.log.lock().unwrap();
        let i = log.entries.len();
        log.entries.push(Entry { at, op });
        i
    }

    pub fn subscribed(&self, subscription: &str) {
        self.push(Op::Subscribed {
            subscription: subscription.to_string(),
        });
    }

    /// Records a publish attempt of `events` to `node` (before it is sent); its attempt number.
    pub fn invoke(&self, node: &str, events: Vec<Event>) -> u64 {
        let at = self.start.elapsed();
        let mut log = self.log.lock().unwrap();
        let attempt = log.attempts.len() as u64 + 1;
        let i = log.entries.len();
        log.attempts.insert(attempt, i);
        log.entries.push(Entry {
            at,
            op: Op::Invoke {
                attempt,
                node: node.to_string(),
                events,
            },
        });
        attempt
    }

    /// Records how attempt `attempt` ended.
    pub fn complete(&self, attempt: u64, outcome: Outcome) {
        let at = self.start.elapsed();
        let mut log = self.log.lock().unwrap();
        if matches!(outcome, Outcome::Accepted { .. }) {
            let ids: Vec<String> = match log.attempts.get(&attempt).map(|&i| &log.entries[i].op) {
                Some(Op::Invoke { events, .. }) => events.iter().map(|e| e.id.clone()).collect(),
                _ => Vec::new(),
            };
            log.acknowledged.extend(ids);
        }
        log.entries.push(Entry {
            at,
            op: Op::Complete { attempt, outcome },
        });
    }

    pub fn deliver(&self, d: Delivery) {
        let i = self.push(Op::Deliver(d));
        self.log.lock().unwrap().deliveries.push(i);
    }

    pub fn fault(&self, node: u64, fault: Fault) {
        self.push(Op::Fault { node, fault });
    }

    pub fn placement(&self, subscription: &str, epoch: u64, nodes: Vec<u64>) {
        self.push(Op::Placement {
            subscription: subscription.to_string(),
            epoch,
            nodes,
        });
    }

    pub fn handled_elsewhere(&self, subscription: &str) {
        self.push(Op::HandledElsewhere {
            subscription: subscription.to_string(),
        });
    }

    /// When the history began (the test's clock of entry time zero).
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Every entry so far.
    pub fn entries(&self) -> Vec<Entry> {
        self.log.lock().unwrap().entries.clone()
    }

    /// The ids acknowledged so far, in the order they were.
    pub fn acknowledged(&self) -> Vec<String> {
        self.log.lock().unwrap().acknowledged.clone()
    }

    pub fn acknowledged_count(&self) -> usize {
        self.log.lock().unwrap().acknowledged.len()
    }

    /// How many deliveries were seen so far (duplicates included).
    pub fn delivered_count(&self) -> usize {
        self.log.lock().unwrap().deliveries.len()
    }

    /// The deliveries from number `from` on, in the order they were seen.
    pub fn arrivals_since(&self, from: usize) -> Vec<Arrival> {
        let log = self.log.lock().unwrap();
        log.deliveries
            .get(from..)
            .unwrap_or_default()
            .iter()
            .filter_map(|&i| match &log.entries[i] {
                Entry { at, op: Op::Deliver(d) } => Some(Arrival {
                    id: d.id.clone(),
                    key: d.key.clone(),
                    data: d.data.clone(),
                    at: self.start + *at,
                }),
                _ => None,
            })
            .collect()
    }

    /// How many publish attempts were recorded so far.
    pub fn attempts(&self) -> u64 {
        self.log.lock().unwrap().attempts.len() as u64
    }

    /// The outcomes of the attempts after the first `after` that were not accepted, by `status
    /// code` (`no answer` for the unknown ones), and the last of them in full.
    pub fn refusals(&self, after: u64) -> (BTreeMap<String, usize>, String) {
        let log = self.log.lock().unwrap();
        let mut by = BTreeMap::new();
        let mut last = String::new();
        for e in &log.entries {
            let Op::Complete { attempt, outcome } = &e.op else {
                continue;
            };
            if *attempt <= after {
                continue;
            }
            let what = match outcome {
                Outcome::Accepted { .. } => continue,
                Outcome::Refused { status, code } => format!("{status} {code}"),
                Outcome::Unknown(_) => "no answer".to_string(),
            };
            *by.entry(what).or_default() += 1;
            let node = match log.attempts.get(attempt).map(|&i| &log.entries[i].op) {
                Some(Op::Invoke { node, .. }) => node.as_str(),
                _ => "?",
            };
            last = format!("{outcome:?} from {node}");
        }
        (by, last)
    }

    /// Events acknowledged while the ingress node knew no subscription of their topic.
    pub fn unrouted(&self) -> usize {
        let log = self.log.lock().unwrap();
        log.entries
            .iter()
            .filter_map(|e| match &e.op {
                Op::Complete {
                    attempt,
                    outcome:
                        Outcome::Accepted {
                            subscriptions: Some(0), ..
                        },
                } => log.attempts.get(attempt),
                _ => None,
            })
            .map(|&i| match &log.entries[i].op {
                Op::Invoke { events, .. } => events.len(),
                _ => 0,
            })
            .sum()
    }

    /// Judges the history so far ([`check`]).
    pub fn check(&self) -> Verdict {
        check(&self.entries())
    }

    /// Fails with the counter-example unless the history keeps the guarantees; the verdict.
    pub fn assert_guarantees(&self) -> Verdict {
        let v = self.check();
        if !v.holds() {
            panic!("{}", v.counter_example());
        }
        v
    }
}

// ---------------------------------------------------------------------------------------------
// The checker

/// Which rule an event broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// Acknowledged, never delivered to the subscription.
    Lost,
    /// Delivered, but never published, or every attempt before the delivery was refused, or to a
    /// subscription the test never made.
    Unexpected,
    /// Delivered with another key or data than was published under its id.
    Payload,
    /// Delivered more often than the placement changes it was exposed to allow.
    Duplicated,
    /// A key's events handled out of their publish order where the order is promised.
    Order,
}

/// One broken rule: what, about which events (the first is the offender), in words.
#[derive(Clone, Debug)]
pub struct Violation {
    pub rule: Rule,
    pub subscription: String,
    pub ids: Vec<String>,
    pub what: String,
}

/// What the checker found, with the figures of a history that passed.
#[derive(Debug)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    /// Events acknowledged with `ack=accepted`/`processed` to a routed topic.
    pub acknowledged: usize,
    pub deliveries: usize,
    /// Deliveries beyond the first, over all subscriptions.
    pub duplicates: usize,
    /// The most duplicates the rule allowed, summed over the events that were exposed.
    pub duplicates_allowed: usize,
    /// By segment, how many keyed events had a predecessor whose order before them was checked.
    pub ordered: BTreeMap<String, usize>,
    /// The history, to cut the counter-example's slices from.
    entries: Vec<Entry>,
}

impl Verdict {
    pub fn holds(&self) -> bool {
        self.violations.is_empty()
    }

    /// One line of figures.
    pub fn summary(&self) -> String {
        format!(
            "{} acknowledged, {} deliveries, {} duplicates (the rule allowed up to {}), per-key order checked on {:?} pairs",
            self.acknowledged, self.deliveries, self.duplicates, self.duplicates_allowed, self.ordered
        )
    }

    /// The broken rules, counted, and the first few violations each with its slice of the
    /// history: the offending events' publishes, answers and deliveries and the faults and
    /// placements between them.
    pub fn counter_example(&self) -> String {
        const SHOWN: usize = 3;
        let mut by: BTreeMap<&Rule, usize> = BTreeMap::new();
        for v in &self.violations {
            *by.entry(&v.rule).or_default() += 1;
        }
        let mut out = format!(
            "the history breaks the delivery guarantees: {} violation(s) {by:?}; {}\n",
            self.violations.len(),
            self.summary()
        );
        // The first of each rule, then the next ones, up to SHOWN.
        let mut shown: Vec<&Violation> = Vec::new();
        for rule in by.keys() {
            shown.extend(self.violations.iter().find(|v| &v.rule == *rule));
        }
        for v in &self.violations {
            if shown.len() >= SHOWN {
                break;
            }
            if !shown.iter().any(|s| std::ptr::eq(*s, v)) {
                shown.push(v);
            }
        }
        shown.truncate(SHOWN.max(by.len()));
        for v in &shown {
            let _ = writeln!(out, "\n{:?} ({}): {}", v.rule, v.subscription, v.what);
            out.push_str(&slice(&self.entries, &v.ids, v.rule == Rule::Lost));
        }
        // The others by rule and id, the first twenty.
        let rest: Vec<String> = self
            .violations
            .iter()
            .filter(|v| !shown.iter().any(|s| std::ptr::eq(*s, *v)))
            .map(|v| format!("{:?} {}", v.rule, v.ids[0]))
            .collect();
        if !rest.is_empty() {
            let more = if rest.len() > 20 { ", …" } else { "" };
            let _ = writeln!(
                out,
                "\n… and {} more: {}{more}",
                rest.len(),
                rest[..rest.len().min(20)].join(", ")
            );
        }
        out
    }
}

/// The entries about `ids`: their publishes, the answers to them and their deliveries, and every
/// fault, placement and hand-over from the last fault before the first of those to the last (to
/// the end of the history if `to_end`: for a lost event, the faults after its publish count).
pub fn slice(entries: &[Entry], ids: &[String], to_end: bool) -> String {
    let ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let attempts: HashSet<u64> = entries
        .iter()
        .filter_map(|e| match &e.op {
            Op::Invoke { attempt, events, .. } if events.iter().any(|ev| ids.contains(ev.id.as_str())) => {
                Some(*attempt)
            }
            _ => None,
        })
        .collect();
    let about = |op: &Op| match op {
        Op::Invoke { attempt, .. } | Op::Complete { attempt, .. } => attempts.contains(attempt),
        Op::Deliver(d) => ids.contains(d.id.as_str()),
        _ => false,
    };
    let first = entries.iter().position(|e| about(&e.op));
    let last = entries.iter().rposition(|e| about(&e.op));
    let mut out = String::new();
    let (Some(first), Some(last)) = (first, last) else {
        return "  (nothing in the history about these ids)\n".to_string();
    };
    let first = entries[..first]
        .iter()
        .rposition(|e| matches!(e.op, Op::Fault { .. }))
        .unwrap_or(first);
    let until = if to_end { entries.len() - 1 } else { last };
    for e in &entries[first..=until] {
        let context = matches!(
            e.op,
            Op::Fault { .. } | Op::Placement { .. } | Op::HandledElsewhere { .. }
        );
        if about(&e.op) || context {
            let _ = writeln!(out, "  {}", describe(e, &ids));
        }
    }
    out
}

/// One entry in words, with the time since the history began.
pub fn describe(e: &Entry, ids: &HashSet<&str>) -> String {
    let t = format!("{:>9.3}s", e.at.as_secs_f64());
    match &e.op {
        Op::Subscribed { subscription } => format!("{t}  subscribed {subscription}"),
        Op::Invoke { attempt, node, events } => {
            let mine: Vec<String> = events
                .iter()
                .enumerate()
                .filter(|(_, ev)| ids.contains(ev.id.as_str()))
                .map(|(i, ev)| {
                    format!(
                        "{} (#{i}, key {}, data {})",
                        ev.id,
                        ev.key.as_deref().unwrap_or("-"),
                        ev.data
                    )
                })
                .collect();
            format!(
                "{t}  publish attempt {attempt} to {node}: {} event(s), among them {}",
                events.len(),
                mine.join(", ")
            )
        }
        Op::Complete { attempt, outcome } => {
            let what = match outcome {
                Outcome::Accepted { ack, subscriptions } => {
                    format!("accepted (ack {ack:?}, subscriptions {subscriptions:?})")
                }
                Outcome::Refused { status, code } => format!("refused {status} {code}"),
                Outcome::Unknown(why) => format!("no answer: {why}"),
            };
            format!("{t}  publish attempt {attempt} {what}")
        }
        Op::Deliver(d) => format!(
            "{t}  delivered {} to {} (key {}, data {}, handler attempt {}, from {})",
            d.id,
            d.subscription,
            d.key.as_deref().unwrap_or("-"),
            d.data,
            d.attempt.map_or("?".to_string(), |a| a.to_string()),
            d.from.as_deref().unwrap_or("?")
        ),
        Op::Fault { node, fault } => format!("{t}  FAULT {fault:?} node {node}"),
        Op::Placement {
            subscription,
            epoch,
            nodes,
        } => format!("{t}  placement of {subscription}: nodes {nodes:?}, epoch {epoch}"),
        Op::HandledElsewhere { subscription } => {
            format!("{t}  the new nodes of {subscription} handle events")
        }
    }
}

/// How long before a fault a delivery may have been seen and its event still count as in flight
/// at the fault. The README's "handled" is finished: an accepted event stays in the WAL of the
/// node that accepted it until the hosting node acks it back, and is re-sent at a placement change
/// until then. A receiver sees the delivery before that ack is sent (it answers the webhook
/// afterwards) and the test cannot see the ack, so a delivery shortly before a kill or freeze does
/// not show a finished event: a kill test run saw one delivered 1 ms before the SIGKILL arrive again
/// after the move. A margin, not a speed claim: the ack is sent at once, in milliseconds.
pub const ACK_MARGIN: Duration = Duration::from_secs(1);

/// One fault: from its beginning to the next fault's beginning (or the end of the history).
struct Episode {
    node: u64,
    begins: Duration,
    /// The end of detection: the first placement seen after the fault with a new epoch (or the
    /// episode's end).
    moved: Duration,
    /// The placement epochs this episode's changes can have: after the first, up to the second
    /// (after the one last seen at its beginning, up to the one last seen before its end; tests
    /// record the placement right before each fault and at the end).
    changes: (u64, u64),
    /// After a kill: from when the new nodes handled events until the node came back (or the
    /// episode's end).
    handled_elsewhere: Option<(Duration, Duration)>,
}

/// Which events of a key must keep their publish order.
enum Segment {
    /// First delivered before this (the first fault).
    DeliveredBefore(Duration),
    /// Accepted by an attempt begun in this window (after a kill, once handled elsewhere).
    AcceptedWithin(Duration, Duration),
}

/// What one publish attempt carried and how it ended.
struct Attempt<'a> {
    invoked: Duration,
    completed: Option<(Duration, &'a Outcome)>,
}

impl Attempt<'_> {
    /// Answered with a refusal: nothing of it was accepted.
    fn refused(&self) -> bool {
        matches!(self.completed, Some((_, Outcome::Refused { .. })))
    }
}

/// Judges `entries` (in time order) against the README's "Delivery guarantees":
///
/// 1. **At least once.** Every event acknowledged with `ack=accepted` or `processed` (to an
///    ingress that knew a subscription: `subscriptions` not 0) is delivered to every subscription
///    the test made.
/// 2. **Nothing unexpected.** A delivered id was published, and some attempt of it begun before
///    the delivery was accepted or is unknown (no answer, or none yet); an event whose every
///    attempt was refused must not appear. Deliveries go to subscriptions the test made.
/// 3. **Payloads.** A delivery carries the key and data published under its id.
/// 4. **Duplicates bounded by what was in flight.** A fault (kill, freeze, pause, disconnect,
///    restart) runs until the next one begins. An event is exposed to it when it had not been
///    handled when the fault began — not delivered to the subscription before, or only within
///    [`ACK_MARGIN`] before — and its first attempt began before the placement was seen moved (in
///    flight at the fault, or accepted while it was being detected).
///    It may be delivered once more per placement change of each fault it is exposed to, and per
///    change between an attempt of it that got no answer (or was accepted) and a later attempt
///    (the publisher's retry, which the hosting node drops unless the subscription moved in
///    between). Placement changes are counted as new table epochs in the placements the test
///    recorded: those after the one last seen when the fault began, up to the one last seen before
///    the next fault began (or the end); for a retry, from the one last seen when the earlier
///    attempt began to the first seen after the later one began. Anything else delivered twice
///    is a violation.
/// 5. **Per-key order.** Event `a` of a key precedes `b` when `a`'s accepted attempt was answered
///    before any attempt of `b` began, or both are in one accepted batch with `a` first. Among
///    the events first delivered before the first fault, and after a kill among those accepted
///    (their accepted attempt begun) once the new nodes handled events and before the node came
///    back or the next fault, a predecessor's first delivery comes before its successor's. Not
///    checked: events in flight at the fault or accepted while it was detected (their re-sends
///    may come after later events of their key), and after a freeze, pause, partition or restart
///    (the README promises no order there).
pub fn check(entries: &[Entry]) -> Verdict {
    let mut violations = Vec::new();
    let mut subscriptions: BTreeSet<&str> = BTreeSet::new();
    let mut attempts: BTreeMap<u64, Attempt> = BTreeMap::new();
    // Each id's published event (the first attempt's) and its attempts, in order.
    let mut published: HashMap<&str, (&Event, Vec<u64>)> = HashMap::new();
    // An event's place in its attempt's batch, for the order rule.
    let mut index_in: HashMap<(&str, u64), usize> = HashMap::new();
    let mut deliveries: Vec<(Duration, &Delivery)> = Vec::new();
    let mut placements: Vec<(Duration, &str, u64)> = Vec::new();
    let mut faults: Vec<(Duration, u64, Fault)> = Vec::new();
    let mut elsewhere: Vec<(Duration, &str)> = Vec::new();
    let end = entries.last().map_or(Duration::ZERO, |e| e.at);

    for e in entries {
        match &e.op {
            Op::Subscribed { subscription } => {
                subscriptions.insert(subscription);
            }
            Op::Invoke { attempt, events, .. } => {
                attempts.insert(
                    *attempt,
                    Attempt {
                        invoked: e.at,
                        completed: None,
                    },
                );
                for (i, ev) in events.iter().enumerate() {
                    published.entry(&ev.id).or_insert((ev, Vec::new())).1.push(*attempt);
                    index_in.insert((&ev.id, *attempt), i);
                }
            }
            Op::Complete { attempt, outcome } => {
                if let Some(a) = attempts.get_mut(attempt) {
                    a.completed = Some((e.at, outcome));
                }
            }
            Op::Deliver(d) => deliveries.push((e.at, d)),
            Op::Fault { node, fault } => faults.push((e.at, *node, *fault)),
            Op::Placement {
                subscription, epoch, ..
            } => placements.push((e.at, subscription, *epoch)),
            Op::HandledElsewhere { subscription } => elsewhere.push((e.at, subscription)),
        }
    }

    // 2 and 3: each delivery. Deliveries by (subscription, id): their times, in order.
    let mut delivered: BTreeMap<(&str, &str), Vec<Duration>> = BTreeMap::new();
    for &(at, d) in &deliveries {
        delivered.entry((&d.subscription, &d.id)).or_default().push(at);
        let mut unexpected = |what: String| {
            violations.push(Violation {
                rule: Rule::Unexpected,
                subscription: d.subscription.clone(),
                ids: vec![d.id.clone()],
                what,
            })
        };
        if !subscriptions.contains(d.subscription.as_str()) {
            unexpected(format!(
                "{} was delivered to {}, which the test never subscribed",
                d.id, d.subscription
            ));
        }
        let Some((event, tries)) = published.get(d.id.as_str()) else {
            unexpected(format!("{} was delivered but never published", d.id));
            continue;
        };
        let before: Vec<&Attempt> = tries.iter().map(|t| &attempts[t]).filter(|a| a.invoked <= at).collect();
        if before.is_empty() {
            unexpected(format!("{} was delivered before it was published", d.id));
        } else if before.iter().all(|a| a.refused()) {
            unexpected(format!(
                "{} was delivered, but every attempt to publish it (before it arrived) was refused",
                d.id
            ));
        }
        if d.key != event.key || d.data != event.data {
            violations.push(Violation {
                rule: Rule::Payload,
                subscription: d.subscription.clone(),
                ids: vec![d.id.clone()],
                what: format!(
                    "{} was delivered with key {:?} and data {}, but published with key {:?} and data {}",
                    d.id, d.key, d.data, event.key, event.data
                ),
            });
        }
    }

    // The accepted attempt of each acknowledged, routed id (the first, if several).
    let mut acked: BTreeMap<&str, u64> = BTreeMap::new();
    for (id, (_, tries)) in &published {
        let accepted = tries.iter().find(|t| {
            matches!(
                attempts[t].completed,
                Some((
                    _,
                    Outcome::Accepted {
                        ack: Ack::Accepted | Ack::Processed,
                        subscriptions
                    }
                )) if *subscriptions != Some(0)
            )
        });
        if let Some(t) = accepted {
            acked.insert(id, *t);
        }
    }

    // 1. At least once.
    for sub in &subscriptions {
        for id in acked.keys() {
            if !delivered.contains_key(&(*sub, *id)) {
                violations.push(Violation {
                    rule: Rule::Lost,
                    subscription: sub.to_string(),
                    ids: vec![id.to_string()],
                    what: format!("{id} was acknowledged but never delivered to {sub}"),
                });
            }
        }
    }

    let mut verdict = Verdict {
        violations: Vec::new(),
        acknowledged: acked.len(),
        deliveries: deliveries.len(),
        duplicates: delivered.values().map(|d| d.len() - 1).sum(),
        duplicates_allowed: 0,
        ordered: BTreeMap::new(),
        entries: Vec::new(),
    };

    let begun: Vec<(Duration, u64, Fault)> = faults.iter().copied().filter(|f| f.2.begins()).collect();
    for sub in &subscriptions {
        let seen: Vec<(Duration, u64)> = placements
            .iter()
            .filter(|(_, s, _)| s == sub)
            .map(|&(at, _, epoch)| (at, epoch))
            .collect();
        let epoch_before = |t: Duration| seen.iter().rev().find(|(at, _)| *at <= t).map_or(0, |p| p.1);
        let epoch_after = |t: Duration| seen.iter().find(|(at, _)| *at >= t).or(seen.last()).map_or(0, |p| p.1);
        let episodes: Vec<Episode> = begun
            .iter()
            .enumerate()
            .map(|(i, &(begins, node, fault))| {
                let ends = begun.get(i + 1).map_or(end, |f| f.0);
                let from = epoch_before(begins);
                let moved = seen
                    .iter()
                    .find(|(at, epoch)| *at > begins && *at <= ends && *epoch > from)
                    .map_or(ends, |p| p.0);
                let back = faults
                    .iter()
                    .find(|f| f.0 > begins && f.0 <= ends && f.1 == node && !f.2.begins())
                    .map_or(ends, |f| f.0);
                let handled_elsewhere = elsewhere
                    .iter()
                    .find(|(at, s)| fault == Fault::Kill && s == sub && *at > begins && *at <= back)
                    .map(|(at, _)| (*at, back));
                Episode {
                    node,
                    begins,
                    moved,
                    changes: (from, epoch_before(ends).max(from)),
                    handled_elsewhere,
                }
            })
            .collect();

        // 4. Duplicates.
        for ((s, id), times) in delivered.range((*sub, "")..) {
            if s != sub {
                break;
            }
            let Some((_, tries)) = published.get(id) else {
                continue;
            };
            let first_try = attempts[&tries[0]].invoked;
            let mut epochs: BTreeSet<u64> = BTreeSet::new();
            for ep in &episodes {
                if times[0] + ACK_MARGIN >= ep.begins && first_try < ep.moved {
                    epochs.extend(ep.changes.0 + 1..=ep.changes.1);
                }
            }
            // The publisher's retry after an attempt that may have been accepted.
            if let Some(last) = tries.last() {
                for t in tries.iter().filter(|t| !attempts[t].refused()) {
                    let (a, b) = (attempts[t].invoked, attempts[last].invoked);
                    if a < b {
                        epochs.extend(epoch_before(a) + 1..=epoch_after(b));
                    }
                }
            }
            let extra = times.len() - 1;
            verdict.duplicates_allowed += epochs.len().min(extra);
            if extra > epochs.len() {
                let why = if epochs.is_empty() {
                    "it was exposed to no placement change (delivered before every fault began, or first published after the placement had moved, and not retried across a change)".to_string()
                } else {
                    format!(
                        "the placement changes it was exposed to (epochs {epochs:?}) allow {}",
                        epochs.len()
                    )
                };
                violations.push(Violation {
                    rule: Rule::Duplicated,
                    subscription: sub.to_string(),
                    ids: vec![id.to_string()],
                    what: format!(
                        "{id} was delivered {} times ({extra} duplicate(s)), but {why}",
                        times.len()
                    ),
                });
            }
        }

        // 5. Per-key order.
        let first_at = |id: &str| delivered.get(&(*sub, id)).map(|t| t[0]);
        let mut segments = vec![match episodes.first() {
            Some(e) => (
                "first delivered before the first fault".to_string(),
                Segment::DeliveredBefore(e.begins),
            ),
            None => (
                "delivered with no fault".to_string(),
                Segment::DeliveredBefore(Duration::MAX),
            ),
        }];
        for ep in &episodes {
            if let Some((from, until)) = ep.handled_elsewhere {
                segments.push((
                    format!(
                        "accepted once handled elsewhere after the kill of node {} at {:.3}s",
                        ep.node,
                        ep.begins.as_secs_f64()
                    ),
                    Segment::AcceptedWithin(from, until),
                ));
            }
        }
        for (name, segment) in &segments {
            // Per key: (answered, attempt, place in batch, id, first attempt begun, first delivered).
            type Row<'a> = (Duration, u64, usize, &'a str, Duration, Duration);
            let mut by_key: BTreeMap<&str, Vec<Row>> = BTreeMap::new();
            for (id, t) in &acked {
                let (event, tries) = &published[id];
                let (Some(key), Some(first)) = (event.key.as_deref(), first_at(id)) else {
                    continue;
                };
                let a = &attempts[t];
                let inside = match *segment {
                    Segment::DeliveredBefore(f) => first < f,
                    Segment::AcceptedWithin(from, until) => a.invoked >= from && a.invoked < until,
                };
                if !inside {
                    continue;
                }
                let answered = a.completed.map_or(Duration::MAX, |c| c.0);
                let began = tries.iter().map(|t| attempts[t].invoked).min().unwrap_or(a.invoked);
                by_key
                    .entry(key)
                    .or_default()
                    .push((answered, *t, index_in[&(*id, *t)], id, began, first));
            }
            let mut pairs = 0;
            for (key, mut rows) in by_key {
                rows.sort();
                // The predecessors of row i: the rows answered before its first attempt began (a
                // prefix), and the rows before it in its own batch. Their latest first delivery:
                let mut prefix_max: Vec<Option<(Duration, &str)>> = vec![None; rows.len() + 1];
                for (i, r) in rows.iter().enumerate() {
                    prefix_max[i + 1] = prefix_max[i].max(Some((r.5, r.3)));
                }
                let mut batch: Option<(u64, Duration, &str)> = None;
                for (i, &(_, attempt, _, id, began, first)) in rows.iter().enumerate() {
                    let p = rows.partition_point(|r| r.0 < began);
                    let mut latest = prefix_max[p.min(i)];
                    if let Some((_, at, before)) = batch.filter(|b| b.0 == attempt) {
                        latest = latest.max(Some((at, before)));
                    }
                    batch = Some(match batch.filter(|b| b.0 == attempt) {
                        Some((a, at, before)) if at > first => (a, at, before),
                        _ => (attempt, first, id),
                    });
                    let Some((was, before)) = latest else {
                        continue;
                    };
                    pairs += 1;
                    if was > first {
                        violations.push(Violation {
                            rule: Rule::Order,
                            subscription: sub.to_string(),
                            ids: vec![id.to_string(), before.to_string()],
                            what: format!(
                                "key {key}, events {name}: {before} was published before {id}, but {id} was first delivered at {:.3}s and {before} only at {:.3}s",
                                first.as_secs_f64(),
                                was.as_secs_f64()
                            ),
                        });
                    }
                }
            }
            verdict.ordered.insert(name.clone(), pairs);
        }
    }

    verdict.violations = violations;
    verdict.entries = entries.to_vec();
    verdict
}
