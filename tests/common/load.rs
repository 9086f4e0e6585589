//! Publishing under faults and checking what arrived, shared by the process fault tests
//! (`tests/failover.rs`) and the container fault suite (`tests/containers.rs`): cluster views
//! (members, placements), batch publishers that retry until a 202 and record every acknowledged
//! id with what was published under it, and the checks on what an [`EventRecorder`] received
//! (missing ids, payloads, per-key order, duplicates, stalls).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::cluster::{call, http, view};
use super::views::{placement_of, statuses};
use super::{Arrival, EventRecorder};

/// Subscribes `topic`/`group` to the webhook `hook` with `instances` instances.
pub async fn subscribe_webhook(url: &str, topic: &str, group: &str, hook: &str, instances: u32) {
    let spec = json!({
        "topic": topic,
        "group": group,
        "handler": { "kind": "webhook", "url": hook },
        "instances": instances,
        "max_attempts": 100,
    });
    super::subscribe(url, &spec).await;
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
    /// Every node watched for placements placed the subscription off the failed node; with how
    /// many events had been accepted by then.
    pub moved: Option<(Duration, usize)>,
    /// After that, the survivors' count of the subscription's handled events
    /// (`herald_events_delivered_total{outcome="ok"}`) rose: events were handled elsewhere; with
    /// how many events had been accepted by then.
    pub elsewhere: Option<(Duration, usize)>,
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

    /// How many events had been accepted once the placement had moved and the survivors handled
    /// events: those accepted from then on go to a running instance on a survivor.
    pub fn handled_elsewhere_from(&self) -> usize {
        let (_, moved) = self.moved.expect("the placement moved");
        let (_, handled) = self.elsewhere.expect("events were handled elsewhere");
        moved.max(handled)
    }
}

/// Watches a fault on node `failed` from the survivors' HTTP APIs (started at the fault).
pub struct FaultWatch<'a> {
    client: awc::Client,
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
        survivors: &'a [String],
        placements_from: &'a [String],
        failed: u64,
        topic: &'a str,
        group: &'a str,
    ) -> FaultWatch<'a> {
        FaultWatch {
            client: http(Duration::from_secs(2)),
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

    /// One round of polls; fills in what is newly seen (`accepted`: events accepted so far).
    pub async fn poll(&self, accepted: usize, o: &mut Observed) {
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
        if o.moved.is_none() {
            let mut off = true;
            for u in self.placements_from {
                let p = view(&self.client, u, "/v1/cluster/placements").await;
                let placed = p.as_ref().and_then(|p| placement_of(p, self.topic, self.group));
                off &= placed.is_some_and(|(_, n)| !n.is_empty() && !n.contains(&self.failed));
            }
            if off {
                o.moved = Some((since, accepted));
                self.handled_at_move.set(self.handled_by_survivors().await);
            }
        } else if o.elsewhere.is_none() && self.handled_by_survivors().await > self.handled_at_move.get() {
            o.elsewhere = Some((since, accepted));
        }
    }

    /// Polls until `done(observed)` holds, failing after `limit` (from the fault) with what was
    /// seen and `what` should have happened.
    pub async fn until(
        &self,
        what: &str,
        limit: Duration,
        accepted: impl Fn() -> usize,
        done: impl Fn(&Observed) -> bool,
    ) -> Observed {
        let mut o = Observed::default();
        loop {
            self.poll(accepted(), &mut o).await;
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

/// What a set of publishers achieved (single-threaded: the publishers are local tasks).
#[derive(Default)]
pub struct Progress {
    /// Ids that got a 202, in the order they did.
    pub accepted: RefCell<Vec<String>>,
    /// Events accepted while the ingress node knew no subscription of the topic (`subscriptions: 0`).
    pub unrouted: Cell<usize>,
    /// Refusals that were retried, by `status code`.
    pub rejected: RefCell<BTreeMap<String, usize>>,
    /// The last refusal, in full.
    pub last_rejection: RefCell<String>,
    /// An answer no retry can fix (a bad request): the publishers stop.
    pub fatal: RefCell<Option<String>>,
    /// Set to stop the publishers before their next attempt.
    pub stop: Cell<bool>,
    /// Next batch to publish.
    pub next_batch: Cell<usize>,
    /// What was published under each id (recorded before the first attempt): partition key, data.
    pub published: RefCell<HashMap<String, (Option<String>, Value)>>,
}

impl Progress {
    pub fn accepted(&self) -> usize {
        self.accepted.borrow().len()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} accepted ({} with no subscription), retried refusals {:?}, last refusal: {}",
            self.accepted(),
            self.unrouted.get(),
            self.rejected.borrow(),
            self.last_rejection.borrow()
        )
    }

    pub fn reject(&self, what: String, detail: String) {
        *self.rejected.borrow_mut().entry(what).or_default() += 1;
        *self.last_rejection.borrow_mut() = detail;
    }

    /// Records what is published under `id` (before it is sent, so any arrival can be checked).
    pub fn publishing(&self, id: String, key: Option<&str>, data: Value) {
        self.published.borrow_mut().insert(id, (key.map(str::to_string), data));
    }

    pub fn assert_no_fatal(&self) {
        if let Some(f) = self.fatal.borrow().as_ref() {
            panic!("a publish was refused for good: {f}\n{}", self.summary());
        }
    }
}

/// Publishes `body` to `path` (with `?ack=accepted`) on `urls[first]` until it gets a 202,
/// retrying 429, 503 and connection errors with a backoff from 10 ms to 500 ms (on the next URL if
/// `rotate`), until `until` passes or the publishers are stopped. Returns the 202 body.
#[allow(clippy::too_many_arguments)]
pub async fn publish_until_accepted(
    client: &awc::Client,
    urls: &[String],
    first: usize,
    rotate: bool,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
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
        match call(client, "POST", &url, headers, body.to_string()).await {
            Ok((202, answer)) => return Some(answer),
            Ok((status @ (429 | 503), answer)) => {
                let code = answer["error"]["code"].as_str().unwrap_or("?").to_string();
                p.reject(format!("{status} {code}"), format!("{status} from {url}: {answer}"));
            }
            Ok((status, answer)) => {
                *p.fatal.borrow_mut() = Some(format!("{status} from {url}: {answer}"));
                return None;
            }
            Err(e) => p.reject("no answer".to_string(), e),
        }
        if rotate {
            at = (at + 1) % urls.len();
        }
        actix_rt::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// A batch load: `total` events with ids `{prefix}-{batch}-{i}` (batch publishes of JSON arrays
/// with `Idempotency-Key: {prefix}-{batch}`), data `{"n": event number}`.
pub struct LoadSpec {
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
    /// their publish order ([`assert_key_order`]). Otherwise the events have no key.
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
        let progress = Rc::new(Progress::default());
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
        let events = (b * spec.batch..((b + 1) * spec.batch).min(spec.total))
            .map(|n| json!({ "n": n }))
            .collect::<Vec<_>>();
        let body = Value::Array(events.clone()).to_string();
        let key = format!("{}-{b}", spec.prefix);
        for (i, data) in events.iter().enumerate() {
            p.publishing(format!("{key}-{i}"), partition.as_deref(), data.clone());
        }
        let mut headers = vec![("content-type", "application/json"), ("idempotency-key", key.as_str())];
        if let Some(k) = &partition {
            headers.push(("x-herald-key", k.as_str()));
        }
        let Some(answer) =
            publish_until_accepted(&client, &spec.urls, b, spec.rotate, &path, &headers, &body, &p, until).await
        else {
            return;
        };
        let ids: Vec<String> = answer["ids"]
            .as_array()
            .map(|ids| ids.iter().filter_map(|i| i.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let want: Vec<String> = (0..events.len()).map(|i| format!("{key}-{i}")).collect();
        if ids != want {
            *p.fatal.borrow_mut() = Some(format!(
                "batch {key} was accepted with other ids than asked for: {answer}"
            ));
            return;
        }
        if answer["subscriptions"].as_u64() == Some(0) {
            p.unrouted.set(p.unrouted.get() + ids.len());
        }
        p.accepted.borrow_mut().extend(ids);
        if let Some(pace) = spec.pace {
            actix_rt::time::sleep(pace).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What arrived

/// Waits until every id in `acked` has arrived at `rec` at least once, failing after `deadline`
/// with how many (and which) are missing. Returns how long it waited.
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
            let mut sample: Vec<&&str> = missing.iter().collect();
            sample.sort();
            sample.truncate(10);
            panic!(
                "{} of {} acknowledged events never arrived within {deadline:?} ({} arrivals in all); e.g. {sample:?}",
                missing.len(),
                acked.len(),
                rec.len()
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

/// Fails unless every arrival carries exactly what was published under its id (the data and the
/// partition key), and no arrival has an id that was never published.
pub fn assert_payloads(arrivals: &[Arrival], p: &Progress) {
    let published = p.published.borrow();
    for a in arrivals {
        let Some((key, data)) = published.get(&a.id) else {
            panic!("an event arrived that was never published: {a:?}");
        };
        assert!(
            a.data == *data && a.key == *key,
            "event {} arrived with key {:?} and data {}, but was published with key {key:?} and data {data}",
            a.id,
            a.key,
            a.data
        );
    }
}

/// Per-key order. Each of `segments` lists ids in the order they were accepted (e.g. the events
/// delivered before a fault, or those accepted once the placement had moved); within each, the
/// first arrivals of one key's events must come in that order, which for a keyed [`Load`] is their
/// publish order. Events left out of the segments (in flight at a fault, accepted while it was
/// being detected) are the documented exception (README, "Delivery guarantees"): a re-sent event
/// may arrive after later events of its key. Every id of a segment must have arrived. Returns how
/// many events each segment held.
pub fn assert_key_order(arrivals: &[Arrival], p: &Progress, segments: &[(&str, Vec<String>)]) -> Vec<usize> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, a) in arrivals.iter().enumerate() {
        first.entry(a.id.as_str()).or_insert(i);
    }
    let published = p.published.borrow();
    let mut checked = Vec::new();
    for (name, ids) in segments {
        let mut last: HashMap<&str, (&str, usize)> = HashMap::new();
        for id in ids {
            let at = *first
                .get(id.as_str())
                .unwrap_or_else(|| panic!("{id} ({name}) never arrived"));
            let Some(key) = published.get(id).and_then(|(k, _)| k.as_deref()) else {
                continue;
            };
            if let Some((before, was)) = last.insert(key, (id.as_str(), at)) {
                assert!(
                    was < at,
                    "key {key}, {name}: {before} was accepted before {id} but first arrived after it (arrival {was} > {at})"
                );
            }
        }
        checked.push(ids.len());
    }
    checked
}
