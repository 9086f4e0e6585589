//! Publishing under faults and watching them, shared by the process fault tests
//! (`tests/failover.rs`) and the container fault suite (`tests/containers.rs`): batch publishers
//! that retry until a 202 and record every attempt and its answer in a [`History`], a watch of a
//! fault that records the placement moves and hand-overs it sees, and the figures of what an
//! [`EventRecorder`] received (waiting for every acknowledged id, counts, stalls). Whether the
//! history keeps the delivery guarantees is [`super::history::check`]'s verdict.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::cluster::{call, http, view};
use super::history::{Ack, Event, Outcome};
use super::views::{placement_of, statuses};
use super::{Arrival, EventRecorder, History};

/// Subscribes `topic`/`group` to the webhook `hook` with `instances` instances, recorded in `h`.
pub async fn subscribe_webhook(h: &History, url: &str, topic: &str, group: &str, hook: &str, instances: u32) {
    let spec = json!({
        "topic": topic,
        "group": group,
        "handler": { "kind": "webhook", "url": hook },
        "instances": instances,
        "max_attempts": 100,
    });
    super::subscribe(url, &spec).await;
    h.subscribed(&format!("{topic}/{group}"));
}

/// Records the placement of `topic`/`group` as the nodes at `urls` show it now (the highest epoch
/// of those that answer), without waiting for them to agree: right before a fault, so that the
/// checker counts the changes from there.
pub async fn observe_placement(h: &History, urls: &[String], topic: &str, group: &str) {
    let client = http(Duration::from_secs(2));
    let mut seen: Option<(u64, Vec<u64>)> = None;
    for u in urls {
        let placed = view(&client, u, "/v1/cluster/placements")
            .await
            .and_then(|p| placement_of(&p, topic, group));
        if placed.as_ref().map(|p| p.0) > seen.as_ref().map(|p| p.0) {
            seen = placed;
        }
    }
    let (epoch, nodes) = seen.unwrap_or_else(|| panic!("no node of {urls:?} showed the placement of {topic}/{group}"));
    h.placement(&format!("{topic}/{group}"), epoch, nodes);
}

/// Waits until every node shows the same placement of `topic`/`group` on `instances` node(s)
/// ([`super::views::wait_placed`]) and records it in `h`.
pub async fn record_placed(
    h: &History,
    urls: &[String],
    topic: &str,
    group: &str,
    instances: usize,
) -> (u64, Vec<u64>) {
    let (epoch, nodes) = super::views::wait_placed(urls, topic, group, instances).await;
    h.placement(&format!("{topic}/{group}"), epoch, nodes.clone());
    (epoch, nodes)
}

// ---------------------------------------------------------------------------------------------
// Watching a fault

/// What the other nodes showed of a fault on one node, each with how long after the fault.
#[derive(Debug, Default)]
pub struct Observed {
    /// A survivor showed the failed node as anything but `up` (`suspect`, `degraded`, `down`).
    pub suspected: Option<Duration>,
    /// A survivor showed it `suspect`: its phi crossed `cluster.phi_threshold` or its connection
    /// broke (not `degraded`, which a stuck backlog causes only after `degraded_after_ms`).
    pub suspect: Option<Duration>,
    /// A survivor showed it `down` (the leader committed MarkDown).
    pub marked_down: Option<Duration>,
    /// Every node watched for placements placed the subscription off the failed node (recorded
    /// in the history as the placement the first of them showed).
    pub moved: Option<Duration>,
    /// After that, the survivors' count of the subscription's handled events
    /// (`herald_events_delivered_total{outcome="ok"}`) rose: events were handled elsewhere
    /// (recorded in the history).
    pub elsewhere: Option<Duration>,
}

impl Observed {
    /// Marked down, placement moved and events handled elsewhere.
    pub fn moved_on(&self) -> bool {
        self.marked_down.is_some() && self.moved.is_some() && self.elsewhere.is_some()
    }

    /// Shown `suspect`, then all of [`Observed::moved_on`]: the failover of a node that stopped
    /// answering (frozen, paused, cut off).
    pub fn failed_over(&self) -> bool {
        self.suspect.is_some() && self.moved_on()
    }
}

/// Watches a fault on node `failed` from the survivors' HTTP APIs (started at the fault), and
/// records in the history the move and the hand-over it sees.
pub struct FaultWatch<'a> {
    client: awc::Client,
    history: &'a History,
    survivors: &'a [String],
    placements_from: &'a [String],
    failed: u64,
    topic: &'a str,
    group: &'a str,
    pub at: Instant,
    /// The survivors' handled count when the move was first seen.
    handled_at_move: Cell<f64>,
}

impl<'a> FaultWatch<'a> {
    /// Starts the clock: call right before the fault. `survivors` show statuses and handle
    /// events; `placements_from` must all show the subscription `topic`/`group` moved.
    pub fn new(
        history: &'a History,
        survivors: &'a [String],
        placements_from: &'a [String],
        failed: u64,
        topic: &'a str,
        group: &'a str,
    ) -> FaultWatch<'a> {
        FaultWatch {
            client: http(Duration::from_secs(2)),
            history,
            survivors,
            placements_from,
            failed,
            topic,
            group,
            at: Instant::now(),
            handled_at_move: Cell::new(0.0),
        }
    }

    /// Events of the subscription handled by the survivors so far.
    pub async fn handled_by_survivors(&self) -> f64 {
        let mut sum = 0.0;
        for u in self.survivors {
            let Ok((200, _, body)) = super::send(&self.client, "GET", &format!("{u}/metrics"), &[], "").await else {
                continue;
            };
            let text = String::from_utf8_lossy(&body);
            sum += super::metric_sum(
                &text,
                "herald_events_delivered_total",
                &[("topic", self.topic), ("group", self.group), ("outcome", "ok")],
            );
        }
        sum
    }

    /// One round of polls; fills in what is newly seen.
    pub async fn poll(&self, o: &mut Observed) {
        let since = self.at.elapsed();
        for u in self.survivors {
            if let Some(v) = view(&self.client, u, "/v1/cluster").await {
                let status = statuses(&v)
                    .into_iter()
                    .find(|(id, _)| *id == self.failed)
                    .map(|(_, s)| s);
                if status.as_deref().is_some_and(|s| s != "up") {
                    o.suspected.get_or_insert(since);
                }
                if status.as_deref() == Some("suspect") {
                    o.suspect.get_or_insert(since);
                }
                if status.as_deref() == Some("down") {
                    o.marked_down.get_or_insert(since);
                }
            }
        }
        let subscription = format!("{}/{}", self.topic, self.group);
        if o.moved.is_none() {
            let mut off = true;
            let mut first = None;
            for u in self.placements_from {
                let p = view(&self.client, u, "/v1/cluster/placements").await;
                let placed = p.as_ref().and_then(|p| placement_of(p, self.topic, self.group));
                off &= placed
                    .as_ref()
                    .is_some_and(|(_, n)| !n.is_empty() && !n.contains(&self.failed));
                first = first.or(placed);
            }
            if let (true, Some((epoch, nodes))) = (off, first) {
                o.moved = Some(since);
                self.history.placement(&subscription, epoch, nodes);
                self.handled_at_move.set(self.handled_by_survivors().await);
            }
        } else if o.elsewhere.is_none() && self.handled_by_survivors().await > self.handled_at_move.get() {
            o.elsewhere = Some(since);
            self.history.handled_elsewhere(&subscription);
        }
    }

    /// Polls until `done(observed)` holds, failing after `limit` (from the fault) with what was
    /// seen and `what` should have happened.
    pub async fn until(&self, what: &str, limit: Duration, done: impl Fn(&Observed) -> bool) -> Observed {
        let mut o = Observed::default();
        loop {
            self.poll(&mut o).await;
            if done(&o) {
                return o;
            }
            assert!(
                self.at.elapsed() < limit,
                "within {limit:?} of the fault on node {}: {what}; saw {o:?}",
                self.failed
            );
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Publishing

/// A set of publishers (single-threaded: they are local tasks): what they share to stop, and the
/// [`History`] they record every attempt in. The counts are read from the history, from the
/// moment the `Progress` was made (one set of publishers at a time per history).
pub struct Progress {
    pub history: History,
    /// Acknowledged ids and publish attempts in the history before these publishers began.
    base: usize,
    attempts_before: u64,
    /// An answer no retry can fix (a bad request): the publishers stop.
    pub fatal: RefCell<Option<String>>,
    /// Set to stop the publishers before their next attempt.
    pub stop: Cell<bool>,
    /// Next batch to publish.
    pub next_batch: Cell<usize>,
}

impl Progress {
    pub fn new(history: History) -> Progress {
        Progress {
            base: history.acknowledged_count(),
            attempts_before: history.attempts(),
            history,
            fatal: RefCell::default(),
            stop: Cell::default(),
            next_batch: Cell::default(),
        }
    }

    /// How many events got a 202.
    pub fn accepted(&self) -> usize {
        self.history.acknowledged_count() - self.base
    }

    /// The ids that got a 202, in the order they did.
    pub fn acknowledged(&self) -> Vec<String> {
        self.history.acknowledged().split_off(self.base)
    }

    /// Refusals that were retried, by `status code` (`no answer` for timeouts and connection
    /// errors).
    pub fn rejected(&self) -> BTreeMap<String, usize> {
        self.history.refusals(self.attempts_before).0
    }

    pub fn summary(&self) -> String {
        let (rejected, last) = self.history.refusals(self.attempts_before);
        format!(
            "{} accepted ({} in the history with no subscription), retried refusals {rejected:?}, last refusal: {last}",
            self.accepted(),
            self.history.unrouted(),
        )
    }

    pub fn assert_no_fatal(&self) {
        if let Some(f) = self.fatal.borrow().as_ref() {
            panic!("a publish was refused for good: {f}\n{}", self.summary());
        }
    }
}

/// Publishes `body` (carrying `events`) to `path` (with `?ack=accepted`) on `urls[first]` until it
/// gets a 202, retrying 429, 503 and connection errors with a backoff from 10 ms to 500 ms (on the
/// next URL if `rotate`), until `until` passes or the publishers are stopped; each attempt and its
/// answer go to the history. Returns the 202 body.
#[allow(clippy::too_many_arguments)]
pub async fn publish_until_accepted(
    client: &awc::Client,
    urls: &[String],
    first: usize,
    rotate: bool,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    events: &[Event],
    p: &Progress,
    until: Instant,
) -> Option<Value> {
    let mut at = first % urls.len();
    let mut backoff = Duration::from_millis(10);
    loop {
        if p.stop.get() || p.fatal.borrow().is_some() || Instant::now() > until {
            return None;
        }
        let url = format!("{}{path}", urls[at]);
        let attempt = p.history.invoke(&urls[at], events.to_vec());
        match call(client, "POST", &url, headers, body.to_string()).await {
            Ok((202, answer)) => {
                let subscriptions = answer["subscriptions"].as_u64();
                let ack = Ack::of_path(path);
                p.history.complete(attempt, Outcome::Accepted { ack, subscriptions });
                return Some(answer);
            }
            Ok((status, answer)) => {
                let code = answer["error"]["code"].as_str().unwrap_or("?").to_string();
                p.history.complete(attempt, Outcome::Refused { status, code });
                if !matches!(status, 429 | 503) {
                    *p.fatal.borrow_mut() = Some(format!("{status} from {url}: {answer}"));
                    return None;
                }
            }
            Err(e) => p.history.complete(attempt, Outcome::Unknown(e)),
        }
        if rotate {
            at = (at + 1) % urls.len();
        }
        actix_rt::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// A batch load: `total` events with ids `{prefix}-{batch}-{i}` (batch publishes of JSON arrays
/// with `Idempotency-Key: {prefix}-{batch}`), data `{"n": event number}`, recorded in `history`.
pub struct LoadSpec {
    pub history: History,
    pub prefix: String,
    pub topic: String,
    /// Batch `b` goes to `urls[b % len]` first.
    pub urls: Vec<String>,
    pub total: usize,
    pub batch: usize,
    pub publishers: usize,
    /// Each publisher waits this long after each accepted batch (a rate, not synchronisation).
    pub pace: Option<Duration>,
    /// After a failure, try the next URL.
    pub rotate: bool,
    /// Publisher `p` sends all its batches with `X-Herald-Key: {prefix}-p{p}`: each key's events
    /// are published strictly one batch after the other, so the order they were accepted in is
    /// their publish order (the checker's order rule). Otherwise the events have no key.
    pub keyed: bool,
    /// Publishing stops after this long, accepted or not.
    pub time_limit: Duration,
    /// A publish not answered within this long is retried (on the next URL if `rotate`).
    pub answer_within: Duration,
}

/// Publishers running on the test's runtime.
pub struct Load {
    pub progress: Rc<Progress>,
    pub tasks: Vec<actix_rt::task::JoinHandle<()>>,
    pub total: usize,
}

impl Load {
    pub fn start(spec: LoadSpec) -> Load {
        let progress = Rc::new(Progress::new(spec.history.clone()));
        let total = spec.total;
        let spec = Rc::new(spec);
        let until = Instant::now() + spec.time_limit;
        let tasks = (0..spec.publishers)
            .map(|i| actix_rt::spawn(publisher(spec.clone(), i, progress.clone(), until)))
            .collect();
        Load { progress, tasks, total }
    }

    pub fn accepted(&self) -> usize {
        self.progress.accepted()
    }

    /// Stops the publishers (an unanswered batch is not retried any more) and waits for them.
    pub async fn stop(self) -> Rc<Progress> {
        self.progress.stop.set(true);
        self.finish().await
    }

    /// Waits until the publishers are done (all batches accepted, the time limit passed, or a
    /// fatal refusal).
    pub async fn finish(self) -> Rc<Progress> {
        for t in self.tasks {
            t.await.expect("publisher task");
        }
        self.progress
    }

    /// Waits until at least `n` events were accepted, failing after `deadline`.
    pub async fn wait_accepted(&self, n: usize, deadline: Duration) {
        let start = Instant::now();
        while self.accepted() < n {
            self.progress.assert_no_fatal();
            assert!(
                start.elapsed() < deadline,
                "only {} of the first {n} (of {}) events were accepted within {deadline:?}: {}",
                self.accepted(),
                self.total,
                self.progress.summary()
            );
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Publisher number `index` of a [`Load`]: takes the next batch until none is left.
pub async fn publisher(spec: Rc<LoadSpec>, index: usize, p: Rc<Progress>, until: Instant) {
    let client = http(spec.answer_within);
    let partition = spec.keyed.then(|| format!("{}-p{index}", spec.prefix));
    let batches = spec.total.div_ceil(spec.batch);
    let path = format!("/v1/topics/{}/events/batch?ack=accepted", spec.topic);
    loop {
        let b = p.next_batch.get();
        if b >= batches || p.stop.get() || p.fatal.borrow().is_some() || Instant::now() > until {
            return;
        }
        p.next_batch.set(b + 1);
        let key = format!("{}-{b}", spec.prefix);
        let events: Vec<Event> = (b * spec.batch..((b + 1) * spec.batch).min(spec.total))
            .enumerate()
            .map(|(i, n)| Event::new(format!("{key}-{i}"), partition.as_deref(), json!({ "n": n })))
            .collect();
        let body = Value::Array(events.iter().map(|e| e.data.clone()).collect()).to_string();
        let mut headers = vec![("content-type", "application/json"), ("idempotency-key", key.as_str())];
        if let Some(k) = &partition {
            headers.push(("x-herald-key", k.as_str()));
        }
        let Some(answer) = publish_until_accepted(
            &client,
            &spec.urls,
            b,
            spec.rotate,
            &path,
            &headers,
            &body,
            &events,
            &p,
            until,
        )
        .await
        else {
            return;
        };
        let ids: Vec<String> = answer["ids"]
            .as_array()
            .map(|ids| ids.iter().filter_map(|i| i.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let want: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        if ids != want {
            *p.fatal.borrow_mut() = Some(format!(
                "batch {key} was accepted with other ids than asked for: {answer}"
            ));
            return;
        }
        if let Some(pace) = spec.pace {
            actix_rt::time::sleep(pace).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What arrived

/// Waits until every id in `acked` has arrived at `rec` at least once, failing after `deadline`
/// with how many are missing and the checker's counter-example of `rec`'s history (the lost
/// events with their publishes and the faults after them). Returns how long it waited.
pub async fn wait_received(rec: &EventRecorder, acked: &[String], deadline: Duration) -> Duration {
    let mut missing: HashSet<&str> = acked.iter().map(String::as_str).collect();
    let mut seen = 0;
    let start = Instant::now();
    loop {
        let new = rec.since(seen);
        seen += new.len();
        for a in &new {
            missing.remove(a.id.as_str());
        }
        if missing.is_empty() {
            return start.elapsed();
        }
        if start.elapsed() > deadline {
            panic!(
                "{} of {} acknowledged events never arrived within {deadline:?} ({} arrivals in all); {}",
                missing.len(),
                acked.len(),
                rec.len(),
                rec.history.check().counter_example()
            );
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(arrivals, distinct ids, duplicates)`.
pub fn counts(arrivals: &[Arrival]) -> (usize, usize, usize) {
    let distinct = arrivals.iter().map(|a| a.id.as_str()).collect::<HashSet<_>>().len();
    (arrivals.len(), distinct, arrivals.len() - distinct)
}

/// After a fault at `at`: when the first event arrived, and when delivery resumed after the
/// longest stall that began after the fault (events already on the wire to the receiver may
/// still arrive just after a fault; the stall is the failover). `None` if nothing arrived after.
pub fn after_fault(arrivals: &[Arrival], at: Instant) -> Option<(Duration, Duration, Duration)> {
    let times: Vec<Instant> = arrivals.iter().map(|a| a.at).filter(|t| *t >= at).collect();
    let first = *times.first()?;
    let (mut stall, mut resumed) = (first - at, first - at);
    let mut prev = at;
    for &t in &times {
        if t - prev > stall {
            stall = t - prev;
            resumed = t - at;
        }
        prev = t;
    }
    Some((first - at, stall, resumed))
}
