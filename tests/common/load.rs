//! Publishing under faults and checking what arrived, shared by the process fault tests
//! (`tests/failover.rs`) and the container fault suite (`tests/containers.rs`): cluster views
//! (members, placements), batch publishers that retry until a 202 and record every acknowledged
//! id, and the checks on what an [`EventRecorder`] received (missing ids, duplicates, stalls).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::cluster::{call, converge, http};
use super::{post_json, Arrival, EventRecorder};

/// `(id, status)` of every member of a `/v1/cluster` view, by id.
pub fn statuses(view: &Value) -> Vec<(u64, String)> {
    let mut m: Vec<(u64, String)> = view["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    (
                        m["id"].as_u64().unwrap_or(0),
                        m["status"].as_str().unwrap_or("?").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    m.sort();
    m
}

/// Waits until every node in `urls` shows exactly `ids` as members, all `up`, and one leader.
pub async fn wait_formed(urls: &[String], ids: &[u64]) {
    let want: Vec<(u64, String)> = ids.iter().map(|&id| (id, "up".to_string())).collect();
    converge(
        "every node shows the same members, all up, and one leader",
        urls,
        "/v1/cluster",
        |views| {
            let leader = views[0]["leader"].as_u64()?;
            views
                .iter()
                .all(|v| v["leader"].as_u64() == Some(leader) && statuses(v) == want)
                .then_some(())
        },
    )
    .await
}

/// `(epoch, nodes)` of the placement of `topic`/`group` in a `/v1/cluster/placements` answer.
pub fn placement_of(placements: &Value, topic: &str, group: &str) -> Option<(u64, Vec<u64>)> {
    let p = placements
        .as_array()?
        .iter()
        .find(|p| p["topic"] == topic && p["group"] == group)?;
    let nodes = p["nodes"]
        .as_array()?
        .iter()
        .map(Value::as_u64)
        .collect::<Option<_>>()?;
    Some((p["epoch"].as_u64()?, nodes))
}

/// Waits until every node shows the same placement of `topic`/`group` with `instances` nodes.
pub async fn wait_placed(urls: &[String], topic: &str, group: &str, instances: usize) -> (u64, Vec<u64>) {
    converge(
        &format!("every node shows the same placement of {topic}/{group} on {instances} node(s)"),
        urls,
        "/v1/cluster/placements",
        |ps| {
            let first = placement_of(&ps[0], topic, group)?;
            (first.1.len() == instances
                && ps
                    .iter()
                    .all(|p| placement_of(p, topic, group).as_ref() == Some(&first)))
            .then_some(first)
        },
    )
    .await
}

/// Subscribes `topic`/`group` to the webhook `hook` with `instances` instances.
pub async fn subscribe_webhook(url: &str, topic: &str, group: &str, hook: &str, instances: u32) {
    let spec = json!({
        "topic": topic,
        "group": group,
        "handler": { "kind": "webhook", "url": hook },
        "instances": instances,
        "max_attempts": 100,
    });
    let a = post_json(&format!("{url}/v1/subscriptions"), &spec).await;
    assert_eq!(a.status, 201, "POST {url}/v1/subscriptions {spec}: {}", a.body);
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
            .map(|_| actix_rt::spawn(publisher(spec.clone(), progress.clone(), until)))
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

pub async fn publisher(spec: Rc<LoadSpec>, p: Rc<Progress>, until: Instant) {
    let client = http(spec.answer_within);
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
        let headers = [("content-type", "application/json"), ("idempotency-key", key.as_str())];
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
