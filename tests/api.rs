//! The HTTP API against a real node started in this process, with Rust handler actors defined
//! here: delivery, fan-out, key ordering, supervision, dead letters, ack modes, backpressure, WAL
//! replay, input validation, auth and CloudEvents.
//!
//! Every wait is a poll with a deadline (`common::eventually`) or an `ack=processed` round trip;
//! nothing sleeps and hopes. Every test uses its own topic names because the metrics recorder is
//! shared by the whole test process.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::{Actor, Context, Handler, ResponseFuture};
use actix_web::web::Bytes;
use herald::config::{Role, TokenConfig};
use herald::event::Event;
use herald::handler::{Delivery, HandlerError, HandlerResult};
use herald::ingress::AckMode;
use herald::node::Node;
use herald::subscription::SubscriptionSpec;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use common::{
    cli, eventually, get, get_text, metric, post_json, request, start_node, start_node_in, wait_metric, Answer,
    TestNode,
};

// ---------------------------------------------------------------------------------------------
// What handlers saw
// ---------------------------------------------------------------------------------------------

/// One delivery as a test handler recorded it.
#[derive(Clone, Debug)]
struct Got {
    id: String,
    group: String,
    key: Option<String>,
    data: Value,
    /// Which actor (in creation order of its factory) handled it.
    instance: usize,
    attempt: u32,
    source: String,
    event_type: String,
    content_type: String,
    headers: BTreeMap<String, String>,
    /// The trace context the handler is given (`Delivery::trace`), as a `traceparent`.
    traceparent: Option<String>,
}

impl Got {
    fn new(d: &Delivery, instance: usize) -> Got {
        let e = &d.event;
        Got {
            id: e.id.to_string(),
            group: d.subscription.group.clone(),
            key: e.key.as_ref().map(ToString::to_string),
            data: e.json_data().unwrap_or(Value::Null),
            instance,
            attempt: d.attempt,
            source: e.source.to_string(),
            event_type: e.event_type.to_string(),
            content_type: e.content_type.to_string(),
            headers: e.headers.clone(),
            traceparent: d.trace().map(|t| t.traceparent()),
        }
    }
}

/// Deliveries shared between the handler actors (on worker threads) and the test.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Got>>>);

impl Seen {
    fn push(&self, g: Got) {
        self.0.lock().unwrap().push(g);
    }

    fn all(&self) -> Vec<Got> {
        self.0.lock().unwrap().clone()
    }

    fn ids(&self) -> Vec<String> {
        self.all().into_iter().map(|g| g.id).collect()
    }

    /// Waits until at least `n` deliveries were recorded; returns them all.
    async fn wait_len(&self, what: &str, n: usize) -> Vec<Got> {
        let seen = self.clone();
        eventually(what, || {
            let seen = seen.clone();
            async move {
                let all = seen.all();
                (all.len() >= n).then_some(all)
            }
        })
        .await
    }

    /// Waits until every id of `ids` was delivered; returns all deliveries.
    async fn wait_ids(&self, what: &str, ids: &BTreeSet<String>) -> Vec<Got> {
        let seen = self.clone();
        let ids = ids.clone();
        eventually(what, || {
            let seen = seen.clone();
            let ids = ids.clone();
            async move {
                let all = seen.all();
                let have: BTreeSet<&str> = all.iter().map(|g| g.id.as_str()).collect();
                ids.iter().all(|id| have.contains(id.as_str())).then_some(all)
            }
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Handler actors
// ---------------------------------------------------------------------------------------------

/// Records every delivery and acknowledges it.
struct Recorder {
    seen: Seen,
    instance: usize,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Recorder {
    type Result = HandlerResult;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        self.seen.push(Got::new(&d, self.instance));
        Ok(())
    }
}

/// A factory of recorders; each actor it builds gets the next instance number.
fn recorder(seen: &Seen) -> impl Fn() -> Recorder + Send + Sync + 'static {
    let seen = seen.clone();
    let next = AtomicUsize::new(0);
    move || Recorder {
        seen: seen.clone(),
        instance: next.fetch_add(1, Ordering::SeqCst),
    }
}

/// An async handler: awaits a timer, then records.
struct AsyncRecorder {
    seen: Seen,
}

impl Actor for AsyncRecorder {
    type Context = Context<Self>;
}

impl Handler<Delivery> for AsyncRecorder {
    type Result = ResponseFuture<HandlerResult>;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> Self::Result {
        let seen = self.seen.clone();
        Box::pin(async move {
            actix_rt::time::sleep(Duration::from_millis(1)).await;
            seen.push(Got::new(&d, 0));
            Ok(())
        })
    }
}

/// Waits until the test opens the gate (adds permits), then records.
struct Gated {
    seen: Seen,
    gate: Arc<Semaphore>,
}

impl Actor for Gated {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Gated {
    type Result = ResponseFuture<HandlerResult>;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> Self::Result {
        let seen = self.seen.clone();
        let gate = self.gate.clone();
        Box::pin(async move {
            // The permit goes back when dropped, so one opening lets every later event through.
            let _pass = gate.acquire().await?;
            seen.push(Got::new(&d, 0));
            Ok(())
        })
    }
}

fn gated(seen: &Seen, gate: &Arc<Semaphore>) -> impl Fn() -> Gated + Send + Sync + 'static {
    let (seen, gate) = (seen.clone(), gate.clone());
    move || Gated {
        seen: seen.clone(),
        gate: gate.clone(),
    }
}

fn open(gate: &Semaphore) {
    gate.add_permits(1000);
}

/// Never finishes an event; counts the events it started.
struct Stuck {
    started: Arc<AtomicUsize>,
}

impl Actor for Stuck {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Stuck {
    type Result = ResponseFuture<HandlerResult>;

    fn handle(&mut self, _: Delivery, _: &mut Context<Self>) -> Self::Result {
        self.started.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            std::future::pending::<()>().await;
            Ok(())
        })
    }
}

/// Panics while `panics_left` is above zero, then records.
struct Panicky {
    seen: Seen,
    panics_left: Arc<AtomicUsize>,
}

impl Actor for Panicky {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Panicky {
    type Result = HandlerResult;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        if self
            .panics_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("deliberate panic of a test handler (attempt {})", d.attempt);
        }
        self.seen.push(Got::new(&d, 0));
        Ok(())
    }
}

/// Fails every attempt until `succeed` is set; counts its failures.
struct Flaky {
    seen: Seen,
    succeed: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
}

impl Actor for Flaky {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Flaky {
    type Result = HandlerResult;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        if !self.succeed.load(Ordering::SeqCst) {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(HandlerError::msg("boom: the test handler refuses this event"));
        }
        self.seen.push(Got::new(&d, 0));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------------

const JSON_CT: (&str, &str) = ("content-type", "application/json");

/// POST to `/v1/topics/{topic}/events{query}`.
async fn publish(url: &str, topic: &str, query: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Answer {
    request("POST", &format!("{url}/v1/topics/{topic}/events{query}"), headers, body).await
}

/// Publishes JSON `data` (ack=accepted), expects 202 and returns the event id.
async fn publish_ok(url: &str, topic: &str, headers: &[(&str, &str)], data: &Value) -> String {
    let mut h = vec![JSON_CT];
    h.extend_from_slice(headers);
    let a = publish(url, topic, "", &h, data.to_string()).await;
    assert_eq!(a.status, 202, "publish to {topic}: {}", a.body);
    a.body["id"].as_str().expect("id in the answer").to_string()
}

/// Asserts an error answer: the status, exactly `{"error":{"code":..,"message":..}}`, the code.
fn assert_api_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "expected {status} {code}, got body {}", a.body);
    let top = a
        .body
        .as_object()
        .unwrap_or_else(|| panic!("error body is not a JSON object: {}", a.body));
    assert_eq!(top.len(), 1, "error body has extra keys: {}", a.body);
    let e = top["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object: {}", a.body));
    assert_eq!(e.len(), 2, "error object has extra keys: {}", a.body);
    assert_eq!(e["code"], code, "wrong code: {}", a.body);
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {}",
        a.body
    );
}

async fn metric_now(url: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric(&get_text(&format!("{url}/metrics")).await, name, labels)
}

fn delivered_ok(topic: &'static str, group: &'static str) -> [(&'static str, &'static str); 3] {
    [("topic", topic), ("group", group), ("outcome", "ok")]
}

// ---------------------------------------------------------------------------------------------
// 1–3: delivery, async handlers, fan-out and load sharing
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn publish_runs_the_handler_and_counts_deliveries() {
    let seen = Seen::default();
    let n = start_node(
        Node::builder()
            .handler("rec", recorder(&seen))
            .subscribe("api.basic", "g1", "rec"),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let a = post_json(&format!("{}/v1/topics/api.basic/events", n.url), &json!({ "n": i })).await;
        assert_eq!(a.status, 202, "{}", a.body);
        assert_eq!(a.body["topic"], "api.basic");
        assert_eq!(a.body["subscriptions"], 1);
        assert!(
            a.body.get("outcomes").is_none(),
            "ack=accepted has no outcomes: {}",
            a.body
        );
        ids.push(a.body["id"].as_str().unwrap().to_string());
    }
    let got = seen.wait_len("3 deliveries", 3).await;
    // One instance: in publish order, each exactly once, with its data.
    assert_eq!(got.iter().map(|g| g.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(
        got.iter().map(|g| g.data["n"].as_i64().unwrap()).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(got
        .iter()
        .all(|g| g.group == "g1" && g.attempt == 1 && g.content_type == "application/json"));
    let ok = wait_metric(
        &n.url,
        "herald_events_delivered_total",
        &delivered_ok("api.basic", "g1"),
        3.0,
    )
    .await;
    assert_eq!(ok, 3.0);
    let published = metric_now(&n.url, "herald_events_published_total", &[("topic", "api.basic")]).await;
    assert_eq!(published, Some(3.0));
    assert_eq!(seen.all().len(), 3, "no duplicate deliveries");
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn async_handlers_work() {
    let seen = Seen::default();
    let s = seen.clone();
    let n = start_node(
        Node::builder()
            .handler("async-rec", move || AsyncRecorder { seen: s.clone() })
            .subscribe("api.async", "g", "async-rec"),
    )
    .await;
    // ack=processed answers only after the async handler's future completed.
    let a = publish(
        &n.url,
        "api.async",
        "?ack=processed",
        &[JSON_CT, ("idempotency-key", "async-0")],
        r#"{"a":0}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["outcomes"][0]["outcome"], "ok");
    assert_eq!(seen.ids(), ["async-0"], "recorded after the await, before the answer");
    let mut ids = BTreeSet::from(["async-0".to_string()]);
    for i in 1..=5 {
        ids.insert(publish_ok(&n.url, "api.async", &[], &json!({ "a": i })).await);
    }
    let got = seen.wait_ids("async deliveries", &ids).await;
    assert_eq!(got.len(), 6);
    assert_eq!(
        got.iter().map(|g| g.data["a"].as_i64().unwrap()).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5]
    );
    let ok = wait_metric(
        &n.url,
        "herald_events_delivered_total",
        &delivered_ok("api.async", "g"),
        6.0,
    )
    .await;
    assert_eq!(ok, 6.0);
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn every_group_gets_every_event() {
    let seen = Seen::default();
    let n = start_node(
        Node::builder()
            .handler("rec", recorder(&seen))
            .subscribe("api.fanout", "audit", "rec")
            .subscribe("api.fanout", "billing", "rec"),
    )
    .await;
    let mut ids = BTreeSet::new();
    for i in 0..10 {
        let a = post_json(&format!("{}/v1/topics/api.fanout/events", n.url), &json!({ "i": i })).await;
        assert_eq!(a.status, 202, "{}", a.body);
        assert_eq!(a.body["subscriptions"], 2);
        ids.insert(a.body["id"].as_str().unwrap().to_string());
    }
    seen.wait_len("10 events × 2 groups", 20).await;
    for group in ["audit", "billing"] {
        ok_exactly(&n.url, "api.fanout", group, 10.0).await;
        let got: Vec<String> = seen
            .all()
            .into_iter()
            .filter(|g| g.group == group)
            .map(|g| g.id)
            .collect();
        assert_eq!(got.len(), 10, "group {group} got {got:?}");
        assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), ids, "group {group}");
    }
    assert_eq!(seen.all().len(), 20);
    n.node.shutdown().await;
}

/// Waits for the ok-delivery counter of a subscription to reach `want` and checks it is exact.
async fn ok_exactly(url: &str, topic: &str, group: &str, want: f64) {
    let labels = [("topic", topic), ("group", group), ("outcome", "ok")];
    let v = wait_metric(url, "herald_events_delivered_total", &labels, want).await;
    assert_eq!(v, want, "{topic}/{group} ok deliveries");
}

#[actix_rt::test]
async fn instances_of_one_subscription_share_the_events() {
    let seen = Seen::default();
    let n = start_node(
        Node::builder()
            .handler("rec", recorder(&seen))
            .subscription(SubscriptionSpec::rust("api.pool", "pool", "rec").instances(3)),
    )
    .await;
    let mut ids = BTreeSet::new();
    for i in 0..30 {
        ids.insert(publish_ok(&n.url, "api.pool", &[], &json!({ "i": i })).await);
    }
    seen.wait_ids("30 pooled events", &ids).await;
    ok_exactly(&n.url, "api.pool", "pool", 30.0).await;
    let got = seen.all();
    assert_eq!(
        got.len(),
        30,
        "each event exactly once: {:?}",
        got.iter().map(|g| &g.id).collect::<Vec<_>>()
    );
    assert_eq!(got.iter().map(|g| g.id.clone()).collect::<BTreeSet<_>>(), ids);
    let instances: BTreeSet<usize> = got.iter().map(|g| g.instance).collect();
    assert!(
        instances.len() >= 2,
        "30 unkeyed events all went to one of 3 instances: {instances:?}"
    );
    assert!(
        instances.iter().all(|&i| i < 3),
        "no instance was restarted: {instances:?}"
    );
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 4: key ordering
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn events_of_one_key_are_handled_in_order_by_one_instance() {
    const KEYS: usize = 5;
    const EVENTS: usize = 300;
    let seen = Seen::default();
    let n = start_node(
        Node::builder()
            .handler("rec", recorder(&seen))
            .subscription(SubscriptionSpec::rust("api.keyed", "g", "rec").instances(3)),
    )
    .await;
    for i in 0..EVENTS {
        let key = format!("customer-{}", i % KEYS);
        let seq = i / KEYS;
        publish_ok(
            &n.url,
            "api.keyed",
            &[("x-herald-key", &key)],
            &json!({ "key": key, "seq": seq }),
        )
        .await;
    }
    let got = seen.wait_len("300 keyed events", EVENTS).await;
    let mut by_key: HashMap<String, Vec<(u64, usize)>> = HashMap::new();
    for g in &got {
        let key = g.key.clone().expect("the partition key reaches the handler");
        assert_eq!(g.data["key"], key.as_str(), "X-Herald-Key is the event's key");
        by_key
            .entry(key)
            .or_default()
            .push((g.data["seq"].as_u64().unwrap(), g.instance));
    }
    assert_eq!(by_key.len(), KEYS);
    let mut owners = BTreeSet::new();
    for (key, list) in &by_key {
        let seqs: Vec<u64> = list.iter().map(|(s, _)| *s).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "key {key} out of order: {seqs:?}");
        assert_eq!(
            seqs,
            (0..(EVENTS / KEYS) as u64).collect::<Vec<_>>(),
            "key {key} lost or repeated events"
        );
        let instances: BTreeSet<usize> = list.iter().map(|(_, i)| *i).collect();
        assert_eq!(
            instances.len(),
            1,
            "key {key} handled by several instances: {instances:?}"
        );
        owners.extend(instances);
    }
    // Otherwise the test would not show that ordering survives several instances.
    assert!(owners.len() >= 2, "all keys landed on one instance: {owners:?}");
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 5: supervision
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn a_panicking_handler_is_restarted_and_the_node_keeps_serving() {
    let poisoned = Seen::default();
    let steady = Seen::default();
    let panics_left = Arc::new(AtomicUsize::new(2));
    let (p, left) = (poisoned.clone(), panics_left.clone());
    let mut b = Node::builder()
        .handler("panicky", move || Panicky {
            seen: p.clone(),
            panics_left: left.clone(),
        })
        .handler("rec", recorder(&steady))
        .subscribe("api.panic", "p", "panicky")
        // Two instances on two workers: whichever thread the panics hit keeps running handlers.
        .subscription(SubscriptionSpec::rust("api.steady", "s", "rec").instances(2));
    b.config_mut().handlers.workers = 2;
    b.config_mut().handlers.backoff_initial_ms = 50;
    let n = start_node(b).await;

    let id = publish_ok(
        &n.url,
        "api.panic",
        &[("idempotency-key", "poison-1")],
        &json!({ "x": 1 }),
    )
    .await;
    assert_eq!(id, "poison-1");
    // Meanwhile the node serves HTTP and other subscriptions.
    let (status, body) = get(&format!("{}/healthz", n.url)).await;
    assert_eq!(status, 200, "{body}");
    let mut ids = BTreeSet::new();
    for i in 0..10 {
        ids.insert(publish_ok(&n.url, "api.steady", &[], &json!({ "i": i })).await);
    }
    let got = steady.wait_ids("the steady subscription's events", &ids).await;
    assert_eq!(got.len(), 10);

    let got = poisoned.wait_len("the poison event after two restarts", 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, "poison-1");
    assert_eq!(got[0].attempt, 3, "delivered on the attempt after the two panics");
    assert_eq!(panics_left.load(Ordering::SeqCst), 0);
    let labels = [("topic", "api.panic"), ("group", "p")];
    let restarts = wait_metric(&n.url, "herald_handler_restarts_total", &labels, 2.0).await;
    assert_eq!(restarts, 2.0);
    ok_exactly(&n.url, "api.panic", "p", 1.0).await;
    let errors = metric_now(
        &n.url,
        "herald_events_delivered_total",
        &[("topic", "api.panic"), ("group", "p"), ("outcome", "error")],
    )
    .await;
    assert_eq!(errors, Some(2.0));
    let (status, _) = get(&format!("{}/healthz", n.url)).await;
    assert_eq!(status, 200);
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 6: dead letters
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn failing_events_become_dead_letters_and_can_be_replayed() {
    let seen = Seen::default();
    let succeed = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let (s, ok, f) = (seen.clone(), succeed.clone(), failures.clone());
    let mut b = Node::builder()
        .handler("flaky", move || Flaky {
            seen: s.clone(),
            succeed: ok.clone(),
            failures: f.clone(),
        })
        .subscription(SubscriptionSpec::rust("api.dlq", "g", "flaky").max_attempts(3));
    b.config_mut().handlers.backoff_initial_ms = 5;
    let n = start_node(b).await;

    let id = publish_ok(&n.url, "api.dlq", &[("x-herald-key", "k1")], &json!({ "order": 42 })).await;
    let list_url = format!("{}/v1/dead-letters?topic=api.dlq", n.url);
    let list = eventually("the dead letter", || {
        let u = list_url.clone();
        async move {
            let (status, body) = get(&u).await;
            assert_eq!(status, 200, "{body}");
            body.as_array().filter(|l| !l.is_empty()).cloned()
        }
    })
    .await;
    assert_eq!(list.len(), 1, "{list:?}");
    let dl = &list[0];
    assert_eq!(dl["topic"], "api.dlq");
    assert_eq!(dl["group"], "g");
    assert_eq!(dl["event_id"], id.as_str());
    assert_eq!(dl["key"], "k1");
    assert_eq!(dl["attempts"], 3);
    assert!(dl["error"].as_str().unwrap().contains("boom"), "{dl}");
    assert_eq!(dl["data"], json!({ "order": 42 }));
    assert_eq!(failures.load(Ordering::SeqCst), 3, "exactly max_attempts attempts");
    assert!(seen.all().is_empty());
    let labels = [("topic", "api.dlq"), ("group", "g")];
    assert_eq!(
        wait_metric(&n.url, "herald_dead_letters_total", &labels, 1.0).await,
        1.0
    );

    succeed.store(true, Ordering::SeqCst);
    let dl_id = dl["id"].as_str().unwrap();
    let a = request("POST", &format!("{}/v1/dead-letters/{dl_id}/replay", n.url), &[], "").await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["event_id"], id.as_str());
    let got = seen.wait_len("the replayed event", 1).await;
    assert_eq!(got[0].id, id);
    assert_eq!(got[0].key.as_deref(), Some("k1"));
    assert_eq!(got[0].data, json!({ "order": 42 }));
    let (status, body) = get(&list_url).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!([]), "the replayed dead letter is gone");
    assert_eq!(failures.load(Ordering::SeqCst), 3, "the replay succeeded at once");

    // A dead letter replays once; unknown ids are 404.
    let again = request("POST", &format!("{}/v1/dead-letters/{dl_id}/replay", n.url), &[], "").await;
    assert_api_error(&again, 404, "not_found");
    let unknown = request(
        "POST",
        &format!("{}/v1/dead-letters/01NOSUCHDEADLETTER/replay", n.url),
        &[],
        "",
    )
    .await;
    assert_api_error(&unknown, 404, "not_found");
    n.node.shutdown().await;
}

/// Fails by payload: `{"i": n}` panics on the first attempt of `panic_at`, answers an error on
/// the first attempt of `fail_at`, always fails `poison`; records every success.
struct Picky {
    seen: Seen,
    panic_at: i64,
    fail_at: i64,
    poison: i64,
}

impl Actor for Picky {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Picky {
    type Result = HandlerResult;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        let i = d
            .event
            .json_data()
            .ok()
            .and_then(|v: Value| v["i"].as_i64())
            .unwrap_or(-1);
        if i == self.panic_at && d.attempt == 1 {
            panic!("deliberate panic of a test handler (event {i})");
        }
        if (i == self.fail_at && d.attempt == 1) || i == self.poison {
            return Err(HandlerError::msg(format!("boom: event {i}")));
        }
        self.seen.push(Got::new(&d, 0));
        Ok(())
    }
}

/// A sync handler gets unkeyed events pipelined (many handed to it before the first answer): a
/// panic or an error in the middle of a run costs the failed event one attempt, the events
/// queued behind a panic none, every other event is handled exactly once, and the poison event is
/// dead-lettered after exactly max_attempts.
#[actix_rt::test]
async fn failures_inside_a_pipelined_run_retry_only_the_failed_events() {
    let seen = Seen::default();
    let s = seen.clone();
    let mut b = Node::builder()
        .handler("picky", move || Picky {
            seen: s.clone(),
            panic_at: 50,
            fail_at: 100,
            poison: 200,
        })
        .subscription(SubscriptionSpec::rust("api.pipeline", "g", "picky").max_attempts(3));
    b.config_mut().handlers.backoff_initial_ms = 5;
    let n = start_node(b).await;

    let events: Vec<Event> = (0..300)
        .map(|i| Event::json("api.pipeline", &json!({ "i": i })).unwrap())
        .collect();
    let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
    let answers = n
        .node
        .ingress()
        .publish_batch(events, AckMode::Processed, Duration::from_secs(30))
        .await
        .expect("published and processed");
    for (i, a) in answers.iter().enumerate() {
        let outcomes = a.outcomes.as_ref().expect("ack=processed outcomes");
        assert_eq!(outcomes.len(), 1, "event {i}: {outcomes:?}");
        let (outcome, attempts) = match i {
            50 | 100 => ("ok", 2),
            200 => ("dead_lettered", 3),
            _ => ("ok", 1),
        };
        assert_eq!(
            (outcomes[0].outcome.as_str(), outcomes[0].attempts),
            (outcome, attempts),
            "event {i}: {outcomes:?}"
        );
    }
    let mut handled: Vec<String> = seen.ids();
    handled.sort();
    let mut want: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 200)
        .map(|(_, id)| id.clone())
        .collect();
    want.sort();
    assert_eq!(handled, want, "every event but the poison one handled exactly once");
    let labels = [("topic", "api.pipeline"), ("group", "g")];
    assert_eq!(
        wait_metric(&n.url, "herald_dead_letters_total", &labels, 1.0).await,
        1.0
    );
    let errors = metric_now(
        &n.url,
        "herald_events_delivered_total",
        &[("topic", "api.pipeline"), ("group", "g"), ("outcome", "error")],
    )
    .await;
    assert_eq!(errors, Some(5.0), "one panic, one error, three poison attempts");
    ok_exactly(&n.url, "api.pipeline", "g", 299.0).await;
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 7: ack modes
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn ack_processed_answers_with_the_outcomes() {
    let seen = Seen::default();
    let n = start_node(
        Node::builder()
            .handler("rec", recorder(&seen))
            .subscribe("api.processed", "g", "rec"),
    )
    .await;
    let a = publish(
        &n.url,
        "api.processed",
        "?ack=processed",
        &[JSON_CT, ("idempotency-key", "p-1")],
        r#"{"v":1}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["id"], "p-1");
    assert_eq!(
        a.body["outcomes"],
        json!([{ "topic": "api.processed", "group": "g", "outcome": "ok", "attempts": 1 }])
    );
    // Processed means the handler already ran: no waiting needed.
    assert_eq!(seen.ids(), ["p-1"]);
    // ack=none is accepted too (and still delivered).
    let a = publish(
        &n.url,
        "api.processed",
        "?ack=none",
        &[JSON_CT, ("idempotency-key", "p-2")],
        r#"{"v":2}"#,
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    seen.wait_ids("the ack=none event", &BTreeSet::from(["p-2".to_string()]))
        .await;
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn ack_processed_times_out_with_504_and_the_event_is_still_delivered() {
    let seen = Seen::default();
    let gate = Arc::new(Semaphore::new(0));
    let n = start_node(
        Node::builder()
            .handler("gated", gated(&seen, &gate))
            .subscribe("api.slow", "g", "gated"),
    )
    .await;
    let a = publish(
        &n.url,
        "api.slow",
        "?ack=processed&timeout_ms=50",
        &[JSON_CT, ("idempotency-key", "slow-1")],
        r#"{"slow":true}"#,
    )
    .await;
    assert_eq!(a.status, 504, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "timeout", "{}", a.body);
    // The answer names the accepted event (see tests/first_hour.rs for the batch).
    assert_eq!(a.body["error"]["ids"], json!(["slow-1"]), "{}", a.body);
    assert!(seen.all().is_empty(), "the handler is still blocked");
    open(&gate);
    let got = seen.wait_len("the slow event", 1).await;
    assert_eq!(got[0].id, "slow-1");
    assert_eq!(got[0].data, json!({ "slow": true }));
    ok_exactly(&n.url, "api.slow", "g", 1.0).await;
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 8: backpressure
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn full_mailboxes_refuse_with_429_and_lose_nothing_accepted() {
    let seen = Seen::default();
    let gate = Arc::new(Semaphore::new(0));
    let mut b = Node::builder()
        .handler("gated", gated(&seen, &gate))
        .subscribe("api.bp", "g", "gated");
    b.config_mut().handlers.mailbox_capacity = 4;
    b.config_mut().http.max_batch_events = 4;
    let n = start_node(b).await;

    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for i in 0..20 {
        let id = format!("bp-{i}");
        let a = publish(
            &n.url,
            "api.bp",
            "",
            &[JSON_CT, ("idempotency-key", &id)],
            json!({ "i": i }).to_string(),
        )
        .await;
        match a.status {
            202 => {
                assert!(
                    refused.is_empty(),
                    "{id} accepted after a refusal although nothing drained"
                );
                accepted.push(id);
            }
            429 => {
                assert_api_error(&a, 429, "overloaded");
                let retry = a.headers.get("retry-after").expect("Retry-After on 429");
                let secs: u64 = retry.to_str().unwrap().parse().expect("Retry-After is seconds");
                assert!(secs >= 1);
                refused.push(id);
            }
            s => panic!("unexpected status {s}: {}", a.body),
        }
    }
    // 4 in the mailbox, plus the one the blocked handler holds once the instance took it.
    assert!((4..=5).contains(&accepted.len()), "accepted {accepted:?}");
    assert_eq!(accepted.len() + refused.len(), 20);
    // The mailbox is full (4), less the one the instance may have taken since.
    let depth = || metric_now(&n.url, "herald_mailbox_depth", &[("topic", "api.bp"), ("group", "g")]);
    let queued = depth().await.expect("herald_mailbox_depth of the subscription");
    assert!((3.0..=4.0).contains(&queued), "mailbox depth {queued} with 4 queued");

    open(&gate);
    let want: BTreeSet<String> = accepted.iter().cloned().collect();
    seen.wait_ids("every accepted event", &want).await;
    // A last event through the same (FIFO) instance: anything queued before it has been handled.
    let marker = publish_ok(
        &n.url,
        "api.bp",
        &[("idempotency-key", "bp-marker")],
        &json!({ "marker": true }),
    )
    .await;
    let got = seen.wait_ids("the marker", &BTreeSet::from([marker.clone()])).await;
    let mut expected = accepted.clone();
    expected.push(marker);
    assert_eq!(
        got.into_iter().map(|g| g.id).collect::<Vec<_>>(),
        expected,
        "refused events must never arrive"
    );
    // The marker was handled after everything queued before it: nothing waits.
    assert_eq!(depth().await, Some(0.0), "mailbox depth once everything is handled");
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 9: WAL replay
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn unfinished_events_are_replayed_from_the_wal_after_a_restart() {
    let started = Arc::new(AtomicUsize::new(0));
    let st = started.clone();
    let mut b = Node::builder()
        .handler("h", move || Stuck { started: st.clone() })
        .subscribe("api.wal", "g", "h");
    b.config_mut().handlers.call_timeout_ms = 600_000;
    b.config_mut().shutdown_timeout_ms = 200;
    let n = start_node(b).await;
    let mut ids = BTreeSet::new();
    for i in 0..20 {
        ids.insert(publish_ok(&n.url, "api.wal", &[("x-herald-key", "k")], &json!({ "i": i })).await);
    }
    assert_eq!(ids.len(), 20);
    eventually("the handler is stuck on the first event", || {
        let s = started.clone();
        async move { (s.load(Ordering::SeqCst) >= 1).then_some(()) }
    })
    .await;
    let TestNode { node, dir, .. } = n;
    node.shutdown().await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "nothing finished, so nothing else started"
    );

    let seen = Seen::default();
    let b = Node::builder()
        .handler("h", recorder(&seen))
        .subscribe("api.wal", "g", "h");
    let n = start_node_in(b, dir).await;
    let got = seen.wait_ids("all 20 events replayed", &ids).await;
    let delivered: BTreeSet<String> = got.iter().map(|g| g.id.clone()).collect();
    assert_eq!(delivered, ids);
    // The key and data survive the WAL, and one key's order too.
    assert!(got.iter().all(|g| g.key.as_deref() == Some("k")));
    let order: Vec<i64> = got.iter().map(|g| g.data["i"].as_i64().unwrap()).collect();
    assert_eq!(order, (0..20).collect::<Vec<_>>());
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 10: bad input and auth
// ---------------------------------------------------------------------------------------------

const PUBLISH_TOKEN: &str = "publish-token-123";
const ADMIN_TOKEN: &str = "admin-token-1234";

/// A request and what it must get.
struct Req {
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

impl Req {
    /// A request carrying the admin token, so that only the deliberate fault is wrong with it.
    fn new(method: &'static str, path: impl Into<String>, content_type: &str, body: impl Into<Vec<u8>>) -> Req {
        Req {
            method,
            path: path.into(),
            headers: vec![
                ("authorization", format!("Bearer {ADMIN_TOKEN}")),
                ("content-type", content_type.to_string()),
            ],
            body: body.into(),
            status: 400,
            code: "",
        }
    }

    fn expect(mut self, status: u16, code: &'static str) -> Req {
        self.status = status;
        self.code = code;
        self
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Req {
        self.headers.retain(|(k, _)| *k != name);
        self.headers.push((name, value.into()));
        self
    }

    fn without(mut self, name: &str) -> Req {
        self.headers.retain(|(k, _)| *k != name);
        self
    }

    async fn send(&self, url: &str) -> Answer {
        let h: Vec<(&str, &str)> = self.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request(self.method, &format!("{url}{}", self.path), &h, self.body.clone()).await
    }
}

const BAD_TOPIC: &str = "api.bad";

fn events_path(topic: &str) -> String {
    format!("/v1/topics/{topic}/events")
}

fn subscription_body(handler: Value, instances: u32) -> String {
    json!({ "topic": BAD_TOPIC, "group": "other", "handler": handler, "instances": instances }).to_string()
}

fn malformed_json() -> Req {
    Req::new("POST", events_path(BAD_TOPIC), "application/json", "{\"not\": json").expect(400, "invalid_json")
}

fn bad_topic_chars() -> Req {
    Req::new("POST", events_path("bad%20topic%21"), "application/json", "{}").expect(400, "invalid_topic")
}

fn bad_topic_too_long() -> Req {
    Req::new("POST", events_path(&"x".repeat(201)), "application/json", "{}").expect(400, "invalid_topic")
}

fn unknown_handler_kind() -> Req {
    Req::new(
        "POST",
        "/v1/subscriptions",
        "application/json",
        subscription_body(json!({ "kind": "nope" }), 1),
    )
    .expect(400, "invalid_json")
}

fn unknown_rust_handler() -> Req {
    let body = subscription_body(json!({ "kind": "rust", "name": "no-such-handler" }), 1);
    Req::new("POST", "/v1/subscriptions", "application/json", body).expect(400, "unknown_handler")
}

fn webhook_not_http() -> Req {
    let body = subscription_body(json!({ "kind": "webhook", "url": "ftp://example.com/hook" }), 1);
    Req::new("POST", "/v1/subscriptions", "application/json", body).expect(400, "invalid_webhook_url")
}

fn instances(n: u32) -> Req {
    let body = subscription_body(json!({ "kind": "rust", "name": "rec" }), n);
    Req::new("POST", "/v1/subscriptions", "application/json", body).expect(400, "invalid_instances")
}

/// 2000 bytes of valid JSON against a 1024-byte limit.
fn body_too_large() -> Req {
    let body = format!("\"{}\"", "x".repeat(1998));
    assert_eq!(body.len(), 2000);
    Req::new("POST", events_path(BAD_TOPIC), "application/json", body).expect(413, "payload_too_large")
}

fn wrong_content_type() -> Req {
    Req::new("POST", events_path(BAD_TOPIC), "text/plain", "hello").expect(415, "unsupported_media_type")
}

fn cloudevent_missing_attributes() -> Req {
    let body = json!({ "specversion": "1.0", "id": "ce-no-source", "data": { "x": 1 } }).to_string();
    Req::new("POST", events_path(BAD_TOPIC), "application/cloudevents+json", body).expect(400, "invalid_cloudevent")
}

fn binary_cloudevent_missing_id() -> Req {
    Req::new("POST", events_path(BAD_TOPIC), "application/json", r#"{"x":1}"#)
        .header("ce-specversion", "1.0")
        .header("ce-source", "/tests")
        .header("ce-type", "com.example.test")
        .expect(400, "invalid_cloudevent")
}

fn bogus_ack() -> Req {
    Req::new(
        "POST",
        format!("{}?ack=bogus", events_path(BAD_TOPIC)),
        "application/json",
        "{}",
    )
    .expect(400, "invalid_query")
}

fn empty_batch() -> Req {
    Req::new(
        "POST",
        format!("{}/batch", events_path(BAD_TOPIC)),
        "application/json",
        "[]",
    )
    .expect(400, "empty_batch")
}

/// Five events against `http.max_batch_events = 4`.
fn batch_too_large() -> Req {
    Req::new(
        "POST",
        format!("{}/batch", events_path(BAD_TOPIC)),
        "application/json",
        "[1,2,3,4,5]",
    )
    .expect(400, "batch_too_large")
}

fn missing_token() -> Req {
    Req::new("POST", events_path(BAD_TOPIC), "application/json", "{}")
        .without("authorization")
        .expect(401, "unauthorized")
}

fn wrong_token() -> Req {
    Req::new("POST", events_path(BAD_TOPIC), "application/json", "{}")
        .header("authorization", "Bearer not-a-real-token")
        .expect(401, "unauthorized")
}

fn publish_token_on_admin_route() -> Req {
    Req::new("GET", "/v1/subscriptions", "application/json", "")
        .header("authorization", format!("Bearer {PUBLISH_TOKEN}"))
        .expect(403, "forbidden")
}

fn every_bad_request() -> Vec<Req> {
    vec![
        malformed_json(),
        bad_topic_chars(),
        bad_topic_too_long(),
        unknown_handler_kind(),
        unknown_rust_handler(),
        webhook_not_http(),
        instances(0),
        instances(1_000_000),
        body_too_large(),
        wrong_content_type(),
        cloudevent_missing_attributes(),
        binary_cloudevent_missing_id(),
        bogus_ack(),
        empty_batch(),
        batch_too_large(),
        missing_token(),
        wrong_token(),
        publish_token_on_admin_route(),
    ]
}

/// A node with both tokens, small body and batch limits, and a recorder subscribed to `topics`.
async fn guarded_node(seen: &Seen, topics: &[&str]) -> TestNode {
    let mut b = Node::builder().handler("rec", recorder(seen));
    for topic in topics {
        b = b.subscribe(topic, "g", "rec");
    }
    let c = b.config_mut();
    c.auth.tokens = vec![
        TokenConfig::new(PUBLISH_TOKEN, Role::Publish),
        TokenConfig::new(ADMIN_TOKEN, Role::Admin),
    ];
    c.http.max_body_bytes = 1024;
    c.http.max_batch_events = 4;
    start_node(b).await
}

/// Sends each bad request and checks its answer, then checks that none of them created a
/// subscription or queued an event: an `ack=processed` marker through the one FIFO instance must
/// be the only thing the handler ever saw.
async fn refused(cases: Vec<Req>) {
    let seen = Seen::default();
    let n = guarded_node(&seen, &[BAD_TOPIC]).await;
    for case in &cases {
        let a = case.send(&n.url).await;
        assert_api_error(&a, case.status, case.code);
    }
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let a = request(
        "GET",
        &format!("{}/v1/subscriptions", n.url),
        &[("authorization", &admin)],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body.as_array().map(Vec::len),
        Some(1),
        "only the declared subscription: {}",
        a.body
    );
    let a = publish(
        &n.url,
        BAD_TOPIC,
        "?ack=processed",
        &[JSON_CT, ("authorization", &admin), ("idempotency-key", "marker")],
        "{}",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(seen.ids(), ["marker"], "a refused request reached the handler");
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn malformed_json_is_400_invalid_json() {
    refused(vec![malformed_json()]).await;
}

/// JSON deeper than this answers 400 (`herald::event::MAX_JSON_DEPTH`).
const DEPTH: usize = herald::event::MAX_JSON_DEPTH;

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn batch_path(topic: &str) -> String {
    format!("/v1/topics/{topic}/events/batch")
}

/// Before: 202, the bytes stored as they came (serde_json skips a value without checking its
/// strings' UTF-8 or its depth).
#[actix_rt::test]
async fn invalid_utf8_and_json_nested_deeper_than_the_limit_are_400() {
    let utf8 = b"{\"name\":\"caf\xe9\"}".to_vec();
    let ce = |data: &[u8]| {
        let mut b = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":"#.to_vec();
        b.extend_from_slice(data);
        b.push(b'}');
        b
    };
    refused(vec![
        Req::new("POST", events_path(BAD_TOPIC), "application/json", utf8.clone()).expect(400, "invalid_json"),
        Req::new("POST", events_path(BAD_TOPIC), "application/json", nested(DEPTH + 1)).expect(400, "invalid_json"),
        Req::new(
            "POST",
            batch_path(BAD_TOPIC),
            "application/json",
            [b"[".as_slice(), &utf8, b"]"].concat(),
        )
        .expect(400, "invalid_json"),
        Req::new("POST", batch_path(BAD_TOPIC), "application/json", nested(DEPTH + 1)).expect(400, "invalid_json"),
        Req::new(
            "POST",
            events_path(BAD_TOPIC),
            "application/cloudevents+json",
            ce(b"\"caf\xe9\""),
        )
        .expect(400, "invalid_cloudevent"),
        Req::new(
            "POST",
            events_path(BAD_TOPIC),
            "application/cloudevents+json",
            ce(nested(DEPTH).as_bytes()),
        )
        .expect(400, "invalid_cloudevent"),
        // Binary mode with JSON data.
        Req::new("POST", events_path(BAD_TOPIC), "application/json", nested(DEPTH + 1))
            .header("ce-specversion", "1.0")
            .header("ce-id", "1")
            .header("ce-source", "s")
            .header("ce-type", "t")
            .expect(400, "invalid_json"),
        Req::new("POST", "/v1/subscriptions", "application/json", nested(DEPTH + 1)).expect(400, "invalid_json"),
    ])
    .await;
}

/// The limit itself is accepted: exactly `MAX_JSON_DEPTH` levels.
#[actix_rt::test]
async fn json_nested_exactly_to_the_limit_is_accepted() {
    let seen = Seen::default();
    let n = guarded_node(&seen, &["api.deep"]).await;
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let a = publish(
        &n.url,
        "api.deep",
        "?ack=processed",
        &[JSON_CT, ("authorization", &admin), ("idempotency-key", "deep")],
        nested(DEPTH),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(seen.ids(), ["deep"]);
    n.node.shutdown().await;
}

/// Before: 202, the header silently ignored (the event got a generated id).
#[actix_rt::test]
async fn a_non_ascii_idempotency_or_partition_key_is_400() {
    refused(vec![
        Req::new("POST", events_path(BAD_TOPIC), "application/json", "{}")
            .header("idempotency-key", "clé")
            .expect(400, "invalid_header"),
        Req::new("POST", batch_path(BAD_TOPIC), "application/json", "[{}]")
            .header("idempotency-key", "clé")
            .expect(400, "invalid_header"),
        Req::new("POST", events_path(BAD_TOPIC), "application/json", "{}")
            .header("x-herald-key", "ключ")
            .expect(400, "invalid_header"),
    ])
    .await;
}

#[actix_rt::test]
async fn bad_topic_names_are_400_invalid_topic() {
    refused(vec![bad_topic_chars(), bad_topic_too_long()]).await;
}

#[actix_rt::test]
async fn unknown_handler_kind_is_400() {
    refused(vec![unknown_handler_kind()]).await;
}

#[actix_rt::test]
async fn unknown_rust_handler_is_400_unknown_handler() {
    refused(vec![unknown_rust_handler()]).await;
}

#[actix_rt::test]
async fn non_http_webhook_is_400_invalid_webhook_url() {
    refused(vec![webhook_not_http()]).await;
}

#[actix_rt::test]
async fn instances_out_of_range_are_400_invalid_instances() {
    refused(vec![instances(0), instances(1_000_000)]).await;
}

#[actix_rt::test]
async fn body_over_the_limit_is_413() {
    refused(vec![body_too_large()]).await;
}

#[actix_rt::test]
async fn wrong_content_type_is_415() {
    refused(vec![wrong_content_type()]).await;
}

#[actix_rt::test]
async fn structured_cloudevent_without_source_and_type_is_400() {
    refused(vec![cloudevent_missing_attributes()]).await;
}

#[actix_rt::test]
async fn binary_cloudevent_without_id_is_400() {
    refused(vec![binary_cloudevent_missing_id()]).await;
}

#[actix_rt::test]
async fn unknown_ack_mode_is_400_invalid_query() {
    refused(vec![bogus_ack()]).await;
}

#[actix_rt::test]
async fn empty_batch_is_400() {
    refused(vec![empty_batch()]).await;
}

#[actix_rt::test]
async fn batch_over_the_limit_is_400() {
    refused(vec![batch_too_large()]).await;
}

#[actix_rt::test]
async fn missing_token_is_401() {
    refused(vec![missing_token()]).await;
}

#[actix_rt::test]
async fn wrong_token_is_401() {
    refused(vec![wrong_token()]).await;
}

#[actix_rt::test]
async fn publish_token_on_an_admin_route_is_403() {
    refused(vec![publish_token_on_admin_route()]).await;
}

#[actix_rt::test]
async fn the_right_tokens_are_accepted() {
    let seen = Seen::default();
    let n = guarded_node(&seen, &["api.tokens"]).await;
    let publish_auth = format!("Bearer {PUBLISH_TOKEN}");
    let admin_auth = format!("Bearer {ADMIN_TOKEN}");
    let a = publish(
        &n.url,
        "api.tokens",
        "",
        &[JSON_CT, ("authorization", &publish_auth), ("idempotency-key", "t-1")],
        "{}",
    )
    .await;
    assert_eq!(a.status, 202, "publish token publishes: {}", a.body);
    // Admin includes publish.
    let a = publish(
        &n.url,
        "api.tokens",
        "",
        &[JSON_CT, ("authorization", &admin_auth), ("idempotency-key", "t-2")],
        "{}",
    )
    .await;
    assert_eq!(a.status, 202, "admin token publishes: {}", a.body);
    let a = request(
        "GET",
        &format!("{}/v1/subscriptions", n.url),
        &[("authorization", &admin_auth)],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body[0]["topic"], "api.tokens");
    let a = request(
        "GET",
        &format!("{}/v1/dead-letters", n.url),
        &[("authorization", &admin_auth)],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let got = seen.wait_len("both events", 2).await;
    assert_eq!(got.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(), ["t-1", "t-2"]);
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn bad_requests_never_lose_accepted_events() {
    let seen = Seen::default();
    let n = guarded_node(&seen, &["api.mixed", BAD_TOPIC]).await;
    let auth = format!("Bearer {PUBLISH_TOKEN}");
    let mut good = BTreeSet::new();
    for round in 0..6 {
        let mut reqs = Vec::new();
        for (i, bad) in every_bad_request().into_iter().enumerate() {
            if i % 6 == 0 {
                let id = format!("mixed-{round}-{i}");
                good.insert(id.clone());
                reqs.push(
                    Req::new(
                        "POST",
                        events_path("api.mixed"),
                        "application/json",
                        json!({ "round": round, "i": i }).to_string(),
                    )
                    .header("authorization", auth.clone())
                    .header("idempotency-key", id)
                    .expect(202, ""),
                );
            }
            reqs.push(bad);
        }
        let answers = futures_util::future::join_all(reqs.iter().map(|r| r.send(&n.url))).await;
        for (r, a) in reqs.iter().zip(&answers) {
            assert!(
                a.status < 500,
                "{} {} answered {}: {}",
                r.method,
                r.path,
                a.status,
                a.body
            );
            if r.status == 202 {
                assert_eq!(a.status, 202, "{}", a.body);
            } else {
                assert_api_error(a, r.status, r.code);
            }
        }
    }
    assert_eq!(good.len(), 18);
    seen.wait_ids("every accepted event", &good).await;
    // The bad publishes aimed at api.bad, which the recorder subscribes too: a marker through its
    // one FIFO instance shows that none of them was queued.
    let a = publish(
        &n.url,
        BAD_TOPIC,
        "?ack=processed",
        &[JSON_CT, ("authorization", &auth), ("idempotency-key", "marker")],
        "{}",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let delivered: Vec<String> = seen.ids().into_iter().filter(|id| id != "marker").collect();
    assert_eq!(delivered.len(), good.len(), "{delivered:?}");
    assert_eq!(delivered.into_iter().collect::<BTreeSet<_>>(), good);
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 11: CloudEvents, batches, idempotency keys
// ---------------------------------------------------------------------------------------------

async fn recording_node(seen: &Seen, topic: &str) -> TestNode {
    start_node(
        Node::builder()
            .handler("rec", recorder(seen))
            .subscribe(topic, "g", "rec"),
    )
    .await
}

#[actix_rt::test]
async fn structured_cloudevents_keep_their_attributes() {
    let seen = Seen::default();
    let n = recording_node(&seen, "api.ce.structured").await;
    let ce = json!({
        "specversion": "1.0",
        "id": "ce-structured-1",
        "source": "/orders/service",
        "type": "com.example.order.created",
        "subject": "order-7",
        "partitionkey": "customer-7",
        "datacontenttype": "application/json",
        "data": { "order": 7 }
    });
    let a = publish(
        &n.url,
        "api.ce.structured",
        "",
        &[("content-type", "application/cloudevents+json")],
        ce.to_string(),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["id"], "ce-structured-1");
    let got = seen.wait_len("the structured CloudEvent", 1).await;
    let g = &got[0];
    assert_eq!(g.id, "ce-structured-1");
    assert_eq!(g.source, "/orders/service");
    assert_eq!(g.event_type, "com.example.order.created");
    assert_eq!(g.key.as_deref(), Some("customer-7"));
    assert_eq!(g.headers.get("subject").map(String::as_str), Some("order-7"));
    assert_eq!(g.data, json!({ "order": 7 }));
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn binary_cloudevents_take_attributes_from_headers() {
    let seen = Seen::default();
    let n = recording_node(&seen, "api.ce.binary").await;
    let headers = [
        JSON_CT,
        ("ce-specversion", "1.0"),
        ("ce-id", "ce-binary-1"),
        ("ce-source", "/billing"),
        ("ce-type", "com.example.invoice.paid"),
        (
            "ce-traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ];
    let a = publish(&n.url, "api.ce.binary", "", &headers, r#"{"invoice":9}"#).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["id"], "ce-binary-1");
    let got = seen.wait_len("the binary CloudEvent", 1).await;
    let g = &got[0];
    assert_eq!(g.id, "ce-binary-1");
    assert_eq!(g.source, "/billing");
    assert_eq!(g.event_type, "com.example.invoice.paid");
    assert_eq!(g.content_type, "application/json");
    assert_eq!(g.data, json!({ "invoice": 9 }));
    // The distributed-tracing extension is the trace context, not a header. Without a trace
    // exporter no span is made: the handler is given the publisher's context unchanged.
    assert_eq!(g.headers.get("traceparent"), None);
    assert_eq!(
        g.traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn plain_json_events_get_default_attributes() {
    let seen = Seen::default();
    let n = recording_node(&seen, "api.plain").await;
    let id = publish_ok(&n.url, "api.plain", &[], &json!({ "p": 1 })).await;
    assert_eq!(id.len(), 26, "a generated ULID: {id}");
    let got = seen.wait_len("the plain event", 1).await;
    assert_eq!(got[0].id, id);
    assert_eq!(got[0].source, "herald");
    assert_eq!(got[0].event_type, "api.plain", "the type defaults to the topic");
    assert_eq!(got[0].key, None);
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn batch_publish_of_a_json_array() {
    let seen = Seen::default();
    let n = recording_node(&seen, "api.batch").await;
    let a = request(
        "POST",
        &format!("{}/v1/topics/api.batch/events/batch", n.url),
        &[JSON_CT],
        r#"[{"n":0},{"n":1},{"n":2}]"#,
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["topic"], "api.batch");
    assert_eq!(a.body["subscriptions"], 1);
    let ids: Vec<String> = a.body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let got = seen.wait_len("the batch", 3).await;
    assert_eq!(got.iter().map(|g| g.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(
        got.iter().map(|g| g.data["n"].as_i64().unwrap()).collect::<Vec<_>>(),
        [0, 1, 2]
    );

    // With an Idempotency-Key the ids are K-0, K-1 …
    let a = request(
        "POST",
        &format!("{}/v1/topics/api.batch/events/batch", n.url),
        &[JSON_CT, ("idempotency-key", "load-9")],
        r#"["a","b"]"#,
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["ids"], json!(["load-9-0", "load-9-1"]));
    seen.wait_ids(
        "the keyed batch",
        &BTreeSet::from(["load-9-0".to_string(), "load-9-1".to_string()]),
    )
    .await;
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn batch_publish_of_cloudevents() {
    let seen = Seen::default();
    let n = recording_node(&seen, "api.ce.batch").await;
    let batch = json!([
        { "specversion": "1.0", "id": "cb-1", "source": "/batcher", "type": "com.example.one", "data": { "k": 1 } },
        { "specversion": "1.0", "id": "cb-2", "source": "/batcher", "type": "com.example.two", "data": { "k": 2 } }
    ]);
    let a = request(
        "POST",
        &format!("{}/v1/topics/api.ce.batch/events/batch", n.url),
        &[("content-type", "application/cloudevents-batch+json")],
        batch.to_string(),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["ids"], json!(["cb-1", "cb-2"]));
    let got = seen.wait_len("the CloudEvents batch", 2).await;
    assert_eq!(got.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(), ["cb-1", "cb-2"]);
    assert_eq!(
        got.iter().map(|g| g.event_type.as_str()).collect::<Vec<_>>(),
        ["com.example.one", "com.example.two"]
    );
    assert!(got.iter().all(|g| g.source == "/batcher"));
    assert_eq!(got[1].data, json!({ "k": 2 }));
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn idempotency_key_sets_the_event_id() {
    let seen = Seen::default();
    let n = recording_node(&seen, "api.idem").await;
    let id = publish_ok(
        &n.url,
        "api.idem",
        &[("idempotency-key", "order-42-created")],
        &json!({ "o": 42 }),
    )
    .await;
    assert_eq!(id, "order-42-created");
    // The header wins over a structured CloudEvent's own id.
    let ce = json!({ "specversion": "1.0", "id": "body-id", "source": "/s", "type": "t", "data": {} });
    let a = publish(
        &n.url,
        "api.idem",
        "",
        &[
            ("content-type", "application/cloudevents+json"),
            ("idempotency-key", "header-id"),
        ],
        ce.to_string(),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["id"], "header-id");
    let got = seen.wait_len("both events", 2).await;
    assert_eq!(
        got.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
        ["order-42-created", "header-id"]
    );
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 12: subscriptions over HTTP, OpenAPI, cluster
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn subscriptions_crud_over_http() {
    let seen = Seen::default();
    let n = start_node(Node::builder().handler("rec", recorder(&seen))).await;
    let subs = format!("{}/v1/subscriptions", n.url);
    let spec =
        json!({ "topic": "api.crud", "group": "g", "handler": { "kind": "rust", "name": "rec" }, "instances": 2 });

    let a = post_json(&subs, &spec).await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.body["topic"], "api.crud");
    let a = post_json(&subs, &spec).await;
    assert_eq!(a.status, 200, "the same spec again changes nothing: {}", a.body);
    let (status, list) = get(&subs).await;
    assert_eq!(status, 200);
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["topic"], "api.crud");
    assert_eq!(list[0]["group"], "g");
    assert_eq!(list[0]["instances"], 2);
    assert_eq!(list[0]["handler"], json!({ "kind": "rust", "name": "rec" }));
    assert_eq!(list[0]["max_attempts"], 5, "the node's default is filled in");

    // It runs.
    let id = publish_ok(&n.url, "api.crud", &[], &json!({ "c": 1 })).await;
    let got = seen.wait_len("the event via the HTTP-created subscription", 1).await;
    assert_eq!(got[0].id, id);

    let del = format!("{subs}/api.crud/g");
    let a = request("DELETE", &del, &[], "").await;
    assert_eq!(a.status, 204, "{}", a.body);
    let a = request("DELETE", &del, &[], "").await;
    assert_api_error(&a, 404, "not_found");
    let (status, list) = get(&subs).await;
    assert_eq!(status, 200);
    assert_eq!(list, json!([]));
    let a = post_json(&format!("{}/v1/topics/api.crud/events", n.url), &json!({ "c": 2 })).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["subscriptions"], 0, "nobody subscribes any more");
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn openapi_and_cluster_views() {
    let seen = Seen::default();
    let n = recording_node(&seen, "api.views").await;
    let (status, doc) = get(&format!("{}/openapi.json", n.url)).await;
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/v1/topics/{topic}/events",
        "/v1/topics/{topic}/events/batch",
        "/v1/subscriptions",
        "/v1/dead-letters",
    ] {
        assert!(
            paths.contains_key(p),
            "OpenAPI lacks {p}: {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    let (status, cluster) = get(&format!("{}/v1/cluster", n.url)).await;
    assert_eq!(status, 200);
    let members = cluster["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{cluster}");
    assert_eq!(members[0]["status"], "up");
    assert_eq!(members[0]["http"], n.node.http_addr().to_string());
    assert!(
        members[0]["handlers"].as_array().unwrap().contains(&json!("rust:rec")),
        "{cluster}"
    );
    assert_eq!(cluster["ready"], true);
    n.node.shutdown().await;
}

/// An https webhook really speaks TLS: against a plain-HTTP receiver the handshake fails, the
/// attempt is an error and the event is dead-lettered with that error (nothing reaches the receiver).
#[actix_rt::test]
async fn https_webhooks_speak_tls() {
    let receiver = common::Receiver::start(0).await;
    let https = receiver.url.replacen("http://", "https://", 1);
    let mut builder = herald::node::Node::builder();
    builder.config_mut().handlers.webhook_timeout_ms = 2_000;
    let n = common::start_node(builder).await;
    let spec =
        serde_json::json!({"topic":"tls.hooks","group":"g","handler":{"kind":"webhook","url":https},"max_attempts":1});
    let a = common::post_json(&format!("{}/v1/subscriptions", n.url), &spec).await;
    assert_eq!(a.status, 201, "{}", a.body);
    let a = common::post_json(
        &format!("{}/v1/topics/tls.hooks/events?ack=processed", n.url),
        &serde_json::json!({"x":1}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let outcome = &a.body["outcomes"][0];
    assert_eq!(outcome["outcome"], "dead_lettered", "{}", a.body);
    let error = outcome["error"].as_str().unwrap_or_default().to_ascii_lowercase();
    // rustls answering a plain-HTTP reply: "received corrupt message of type InvalidContentType".
    assert!(
        error.contains("corrupt message") || error.contains("tls") || error.contains("handshake"),
        "not a TLS error: {error}"
    );
    assert!(
        receiver.events().is_empty(),
        "a plain-HTTP receiver must not get a TLS request as an event"
    );
    n.node.shutdown().await;
}

/// The ERROR events logged on the test's thread (where the node's own tasks run).
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Errors {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::ERROR {
            self.0.lock().unwrap().push(format!("{event:?}"));
        }
    }
}

#[actix_rt::test]
async fn a_normal_shutdown_logs_no_error() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let errors = Errors::default();
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(errors.clone()));
    let n = start_node(Node::builder()).await;
    // `shutdown` returns once every task of the node ended, the one that follows the membership
    // table included: it saw the membership service stop, which is no fault here.
    n.node.shutdown().await;
    let logged = errors.0.lock().unwrap().clone();
    assert!(logged.is_empty(), "a normal shutdown logged errors: {logged:#?}");
}

// ---------------------------------------------------------------------------------------------
// webhook egress policy
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn webhooks_to_metadata_addresses_are_refused_and_loopback_is_accepted() {
    let receiver = common::Receiver::start(0).await;
    let n = start_node(Node::builder()).await;
    let url = format!("{}/v1/subscriptions", n.url);
    for refused in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://[fe80::1]:8080/",
    ] {
        let body = json!({"topic": "api.egress", "group": "g", "handler": {"kind": "webhook", "url": refused}});
        let a = post_json(&url, &body).await;
        assert_eq!(a.status, 400, "{refused}: {}", a.body);
        assert_eq!(a.body["error"]["code"], "webhook_refused", "{refused}: {}", a.body);
        assert!(
            a.body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("built-in rule"),
            "the message names the rule: {}",
            a.body
        );
    }
    let (_, subs) = get(&url).await;
    assert_eq!(subs.as_array().map(Vec::len), Some(0), "nothing was created: {subs}");

    let body = json!({"topic": "api.egress", "group": "g", "handler": {"kind": "webhook", "url": receiver.url}});
    let a = post_json(&url, &body).await;
    assert_eq!(a.status, 201, "{}", a.body);
    let a = request(
        "POST",
        &format!("{}/v1/topics/api.egress/events?ack=processed", n.url),
        &[JSON_CT],
        "{}",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["outcomes"][0]["outcome"], "ok", "{}", a.body);
    assert_eq!(receiver.events().len(), 1);
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn a_webhook_name_that_resolves_to_a_denied_address_fails_its_delivery() {
    let receiver = common::Receiver::start(0).await;
    let port = receiver
        .url
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut b = Node::builder();
    b.config_mut().handlers.webhook_deny = vec!["127.0.0.0/8".into(), "::1".into()];
    let n = start_node(b).await;
    // The name passes creation (only its addresses are denied)…
    let hook = format!("http://localhost:{port}/hook");
    let body = json!({"topic": "api.egress.dns", "group": "g", "max_attempts": 1,
                      "handler": {"kind": "webhook", "url": hook}});
    let a = post_json(&format!("{}/v1/subscriptions", n.url), &body).await;
    assert_eq!(a.status, 201, "{}", a.body);
    // …a literal denied address does not.
    let body = json!({"topic": "api.egress.dns", "group": "h",
                      "handler": {"kind": "webhook", "url": receiver.url}});
    let a = post_json(&format!("{}/v1/subscriptions", n.url), &body).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "webhook_refused");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("webhook_deny rule 127.0.0.0/8"),
        "{}",
        a.body
    );

    // When called, `localhost` resolves to a denied address: the delivery fails and is
    // dead-lettered with the policy's reason; the receiver is never called.
    let a = request(
        "POST",
        &format!("{}/v1/topics/api.egress.dns/events?ack=processed", n.url),
        &[JSON_CT],
        "{}",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["outcomes"][0]["outcome"], "dead_lettered", "{}", a.body);
    let (_, dls) = get(&format!("{}/v1/dead-letters?topic=api.egress.dns", n.url)).await;
    let error = dls[0]["error"].as_str().unwrap_or("").to_string();
    assert!(error.contains("egress policy"), "the dead letter says why: {dls}");
    assert!(error.contains("webhook_deny rule"), "and names the rule: {dls}");
    assert!(receiver.events().is_empty(), "the denied address was not called");
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Security: HTTP TLS, mutual TLS clients, hashed tokens, scopes, metrics auth, audit lines
// ---------------------------------------------------------------------------------------------

/// Test certificates: a CA with a server certificate (localhost, 127.0.0.1) and a client
/// certificate, and a second, untrusted CA with its own client certificate.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let ca = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.distinguished_name.push(DnType::CommonName, cn);
            CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
        };
        let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>, client: bool| {
            let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            p.subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
            p.extended_key_usages = vec![if client {
                ExtendedKeyUsagePurpose::ClientAuth
            } else {
                ExtendedKeyUsagePurpose::ServerAuth
            }];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let trusted = ca("herald test CA");
        let other = ca("another CA");
        write("ca.pem", trusted.pem());
        write("other-ca.pem", other.pem());
        let (c, k) = leaf(&trusted, false);
        write("server.pem", c);
        write("server.key", k);
        let (c, k) = leaf(&trusted, true);
        write("client.pem", c);
        write("client.key", k);
        let (c, k) = leaf(&other, true);
        write("other-client.pem", c);
        write("other-client.key", k);
        Pki { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// An HTTP client trusting `ca`, presenting the client certificate `client` (file stem).
    fn client(&self, ca: &str, client: Option<&str>) -> awc::Client {
        let (cert, key) = client.map_or((None, None), |c| {
            (
                Some(self.path(&format!("{c}.pem"))),
                Some(self.path(&format!("{c}.key"))),
            )
        });
        herald::cli::ClientTls {
            ca_file: Some(self.path(ca)),
            client_cert: cert,
            client_key: key,
        }
        .client(Duration::from_secs(10))
        .unwrap()
    }
}

/// Starts `builder` serving https with the PKI's server certificate (and requiring client
/// certificates of its CA with `mtls`); waits until `/readyz` answers over https.
async fn start_tls_node(mut builder: herald::node::NodeBuilder, pki: &Pki, mtls: bool) -> common::TestNode {
    let dir = tempfile::tempdir().unwrap();
    let c = builder.config_mut();
    c.http.addr = "127.0.0.1:0".into();
    c.data_dir = dir.path().to_path_buf();
    // One node: its peers do not matter here.
    c.peer_tls.insecure = true;
    c.http.tls_cert = Some(pki.path("server.pem"));
    c.http.tls_key = Some(pki.path("server.key"));
    if mtls {
        c.http.tls_client_ca = Some(pki.path("ca.pem"));
    }
    let node = builder
        .metrics(herald::metrics::install_prometheus())
        .start()
        .await
        .expect("node starts");
    let url = format!("https://{}", node.http_addr());
    let client = pki.client("ca.pem", mtls.then_some("client"));
    let ready = format!("{url}/readyz");
    eventually("TLS node ready", || {
        let client = client.clone();
        let ready = ready.clone();
        async move {
            let r = client.get(&ready).send().await.ok()?;
            (r.status() == 200).then_some(())
        }
    })
    .await;
    common::TestNode { node, url, dir }
}

#[actix_rt::test]
async fn https_is_served_and_refused_without_the_ca() {
    let pki = Pki::new();
    let n = start_tls_node(Node::builder(), &pki, false).await;
    let r = pki
        .client("ca.pem", None)
        .get(format!("{}/healthz", n.url))
        .send()
        .await;
    assert_eq!(r.expect("https with the CA").status(), 200);
    // A client trusting another CA refuses the node's certificate.
    let e = pki
        .client("other-ca.pem", None)
        .get(format!("{}/healthz", n.url))
        .send()
        .await
        .expect_err("the certificate must not be trusted");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // The CLI's default client (web roots) refuses it too, and says what to do.
    let tls = herald::cli::ClientTls::default();
    let e = tls
        .client(Duration::from_secs(10))
        .unwrap()
        .get(format!("{}/healthz", n.url))
        .send()
        .await
        .expect_err("a private CA is not a web root");
    let message = tls.explain(&n.url, e);
    assert!(message.contains("pass --ca-file"), "{message}");
    // Plain HTTP to the TLS port gets no answer.
    let plain = n.url.replacen("https://", "http://", 1);
    let r = awc::Client::default().get(format!("{plain}/healthz")).send().await;
    assert!(r.is_err(), "plain HTTP was answered: {:?}", r.map(|r| r.status()));
    n.node.shutdown().await;
}

/// The HTTPS API speaks HTTP/1.1 only (h2 0.3 has a known denial of service, RUSTSEC-2026-0258):
/// a client offering h2 and http/1.1 by ALPN gets http/1.1 and is served; one offering only h2 is
/// refused in the handshake; and the HTTP/2 preface without ALPN is not answered as HTTP/2.
#[actix_rt::test]
async fn https_speaks_http1_only_and_never_h2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let n = start_tls_node(Node::builder(), &pki, false).await;
    let addr = n.url.trim_start_matches("https://").to_string();
    let connect = |alpn: &[&[u8]]| {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp).await
        }
    };
    async fn answer(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, request: &[u8]) -> Vec<u8> {
        tls.write_all(request).await.expect("write");
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut got)).await;
        got
    }

    let mut tls = connect(&[b"h2", b"http/1.1"])
        .await
        .expect("h2 and http/1.1 offered: a handshake");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "http/1.1 chosen"
    );
    let got = answer(
        &mut tls,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    let refused = connect(&[b"h2"]).await;
    assert!(refused.is_err(), "a client offering only h2 was accepted");

    let mut tls = connect(&[]).await.expect("no ALPN: a handshake");
    let got = answer(&mut tls, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    // An HTTP/2 server would answer with a SETTINGS frame (type 4 at byte 3); an HTTP/1 one
    // answers 400 or closes.
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 4"),
        "the HTTP/2 preface got an answer that is not HTTP/1: {got:?}"
    );
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn mtls_clients_need_a_certificate_of_the_client_ca() {
    let pki = Pki::new();
    let n = start_tls_node(Node::builder(), &pki, true).await;
    let url = format!("{}/readyz", n.url);
    let r = pki.client("ca.pem", Some("client")).get(&url).send().await;
    assert_eq!(r.expect("a client certificate of the CA").status(), 200);
    let r = pki.client("ca.pem", None).get(&url).send().await;
    assert!(
        r.is_err(),
        "no client certificate was answered: {:?}",
        r.map(|r| r.status())
    );
    let r = pki.client("ca.pem", Some("other-client")).get(&url).send().await;
    assert!(
        r.is_err(),
        "a client certificate of another CA was answered: {:?}",
        r.map(|r| r.status())
    );
    n.node.shutdown().await;
}

#[test]
fn unreadable_or_invalid_tls_files_are_config_errors_naming_the_key_and_file() {
    let pki = Pki::new();
    let start = |cert: std::path::PathBuf, key: std::path::PathBuf| {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Node::builder();
        let c = b.config_mut();
        c.http.addr = "127.0.0.1:0".into();
        c.data_dir = dir.path().to_path_buf();
        c.peer_tls.insecure = true;
        c.http.tls_cert = Some(cert);
        c.http.tls_key = Some(key);
        actix_rt::System::new().block_on(async move {
            match b.start().await {
                Ok(n) => {
                    n.shutdown().await;
                    "started".to_string()
                }
                Err(e) => e.to_string(),
            }
        })
    };
    let e = start(pki.path("missing.pem"), pki.path("server.key"));
    assert!(e.contains("http.tls_cert") && e.contains("missing.pem"), "{e}");
    let e = start(pki.path("server.key"), pki.path("server.key"));
    assert!(
        e.contains("http.tls_cert") && e.contains("server.key") && e.contains("no PEM certificate"),
        "{e}"
    );
    let e = start(pki.path("server.pem"), pki.path("server.pem"));
    assert!(e.contains("http.tls_key") && e.contains("server.pem"), "{e}");
    let e = start(pki.path("server.pem"), pki.path("client.key"));
    assert!(e.contains("http.tls_key") && e.contains("does not fit"), "{e}");
}

/// Runs the `herald` binary with `args`; returns (success, stdout, stderr).
async fn herald_cli(args: Vec<String>) -> (bool, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = cli(&args).await;
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[actix_rt::test]
async fn herald_status_and_health_speak_https_with_a_ca_file() {
    let pki = Pki::new();
    let seen = Seen::default();
    let b = Node::builder()
        .handler("rec", recorder(&seen))
        .subscribe("cli.tls", "g", "rec");
    let n = start_tls_node(b, &pki, false).await;
    let ca = pki.path("ca.pem").display().to_string();
    let (ok, out, err) = herald_cli(vec![
        "status".into(),
        "--url".into(),
        n.url.clone(),
        "--ca-file".into(),
        ca.clone(),
    ])
    .await;
    assert!(ok, "herald status over https failed: {err}");
    assert!(out.contains("cluster herald") && out.contains("cli.tls"), "{out}");
    let (ok, out, err) = herald_cli(vec![
        "health".into(),
        "--url".into(),
        n.url.clone(),
        "--ca-file".into(),
        ca,
    ])
    .await;
    assert!(ok && out.contains("200"), "herald health over https: {out} {err}");
    let (ok, _, err) = herald_cli(vec!["status".into(), "--url".into(), n.url.clone()]).await;
    assert!(!ok, "status without the CA must fail");
    assert!(err.contains("--ca-file"), "the error must say to pass --ca-file: {err}");
    n.node.shutdown().await;
}

#[test]
fn herald_token_hash_prints_the_sha256_form() {
    use std::io::Write as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["token", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret-admin\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(out, herald::config::hash_token("s3cret-admin"));
    assert!(out.starts_with("sha256:") && out.len() == 7 + 64, "{out}");
}

const READ_TOKEN: &str = "read-token-12345";
const ORDERS_TOKEN: &str = "orders-token-123";

/// A node with hashed admin, publish, read and `publish:orders.*` tokens (the admin token named
/// `ops`), a recorder on `topics`, and `http.metrics_auth` as given.
async fn scoped_node(seen: &Seen, topics: &[&str], metrics_auth: bool) -> TestNode {
    let mut b = Node::builder().handler("rec", recorder(seen));
    for topic in topics {
        b = b.subscribe(topic, "g", "rec");
    }
    let c = b.config_mut();
    let hashed = |t: &str| herald::config::hash_token(t);
    c.auth.tokens = herald::config::parse_tokens(&format!(
        "admin {} ops\npublish {}\nread {} dashboard\npublish:orders.* {} orders-svc\n",
        hashed(ADMIN_TOKEN),
        hashed(PUBLISH_TOKEN),
        hashed(READ_TOKEN),
        ORDERS_TOKEN
    ))
    .unwrap();
    c.http.metrics_auth = metrics_auth;
    start_node(b).await
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[actix_rt::test]
async fn hashed_tokens_are_accepted_and_the_hash_is_no_token() {
    let seen = Seen::default();
    let n = scoped_node(&seen, &["sec.hashed"], false).await;
    let a = publish(
        &n.url,
        "sec.hashed",
        "",
        &[JSON_CT, ("authorization", &bearer(PUBLISH_TOKEN))],
        "{}",
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let a = request(
        "GET",
        &format!("{}/v1/cluster", n.url),
        &[("authorization", &bearer(ADMIN_TOKEN))],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Whoever reads the tokens file cannot use what it holds.
    let hash = herald::config::hash_token(ADMIN_TOKEN);
    let a = request(
        "GET",
        &format!("{}/v1/cluster", n.url),
        &[("authorization", &bearer(&hash))],
        "",
    )
    .await;
    assert_api_error(&a, 401, "unauthorized");
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn the_scheme_name_is_case_insensitive() {
    let seen = Seen::default();
    let n = scoped_node(&seen, &[], false).await;
    for scheme in ["bearer", "BEARER", "Bearer", "bEaReR"] {
        let auth = format!("{scheme} {READ_TOKEN}");
        let a = request("GET", &format!("{}/v1/cluster", n.url), &[("authorization", &auth)], "").await;
        assert_eq!(a.status, 200, "{scheme}: {}", a.body);
    }
    let a = request(
        "GET",
        &format!("{}/v1/cluster", n.url),
        &[("authorization", &format!("Basic {READ_TOKEN}"))],
        "",
    )
    .await;
    assert_api_error(&a, 401, "unauthorized");
    n.node.shutdown().await;
}

/// Every route that changes the cluster, subscriptions or dead letters.
fn mutating_admin_routes() -> Vec<(&'static str, &'static str, String)> {
    let spec = json!({"topic":"sec.admin","group":"g","handler":{"kind":"log"}}).to_string();
    vec![
        ("POST", "/v1/subscriptions", spec),
        ("DELETE", "/v1/subscriptions/sec.admin/g", String::new()),
        ("POST", "/v1/cluster/nodes/1/drain", String::new()),
        ("DELETE", "/v1/cluster/nodes/1", String::new()),
        (
            "POST",
            "/v1/dead-letters/01ARZ3NDEKTSV4RRFFQ69G5FAV/replay",
            String::new(),
        ),
    ]
}

#[actix_rt::test]
async fn scopes_allow_and_refuse_routes() {
    let seen = Seen::default();
    let n = scoped_node(&seen, &["sec.scopes", "orders.created"], false).await;
    let reads = ["/v1/cluster", "/v1/cluster/placements", "/v1/subscriptions"];
    for path in reads {
        for (who, t) in [("read", READ_TOKEN), ("admin", ADMIN_TOKEN)] {
            let a = request("GET", &format!("{}{path}", n.url), &[("authorization", &bearer(t))], "").await;
            assert_eq!(a.status, 200, "{who} reads {path}: {}", a.body);
        }
        for (who, t) in [("publish", PUBLISH_TOKEN), ("orders", ORDERS_TOKEN)] {
            let a = request("GET", &format!("{}{path}", n.url), &[("authorization", &bearer(t))], "").await;
            assert_eq!(a.status, 403, "{who} must not read {path}: {}", a.body);
        }
    }
    // Dead letters hold event data: admin only.
    for t in [READ_TOKEN, PUBLISH_TOKEN] {
        let a = request(
            "GET",
            &format!("{}/v1/dead-letters", n.url),
            &[("authorization", &bearer(t))],
            "",
        )
        .await;
        assert_api_error(&a, 403, "forbidden");
    }
    for (method, path, body) in mutating_admin_routes() {
        for (who, t) in [
            ("publish", PUBLISH_TOKEN),
            ("read", READ_TOKEN),
            ("orders", ORDERS_TOKEN),
        ] {
            let a = request(
                method,
                &format!("{}{path}", n.url),
                &[JSON_CT, ("authorization", &bearer(t))],
                body.clone(),
            )
            .await;
            assert_eq!(a.status, 403, "{who} token on {method} {path}: {}", a.body);
        }
    }
    // A read token does not publish; publish and admin tokens do.
    let a = publish(
        &n.url,
        "sec.scopes",
        "",
        &[JSON_CT, ("authorization", &bearer(READ_TOKEN))],
        "{}",
    )
    .await;
    assert_api_error(&a, 403, "forbidden");
    for (i, t) in [PUBLISH_TOKEN, ADMIN_TOKEN].into_iter().enumerate() {
        let id = format!("s-{i}");
        let a = publish(
            &n.url,
            "sec.scopes",
            "",
            &[JSON_CT, ("authorization", &bearer(t)), ("idempotency-key", &id)],
            "{}",
        )
        .await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
    // The admin token did create nothing above: the refused POST /v1/subscriptions left no trace.
    let a = request(
        "GET",
        &format!("{}/v1/subscriptions", n.url),
        &[("authorization", &bearer(ADMIN_TOKEN))],
        "",
    )
    .await;
    assert_eq!(a.body.as_array().map(Vec::len), Some(2), "{}", a.body);
    seen.wait_len("the two accepted events", 2).await;
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn a_topic_limited_publish_token_publishes_only_to_its_topics() {
    let seen = Seen::default();
    let n = scoped_node(&seen, &["orders.created", "users.x"], false).await;
    let auth = bearer(ORDERS_TOKEN);
    let a = publish(
        &n.url,
        "orders.created",
        "?ack=processed",
        &[JSON_CT, ("authorization", &auth), ("idempotency-key", "o-1")],
        "{}",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = publish(&n.url, "users.x", "", &[JSON_CT, ("authorization", &auth)], "{}").await;
    assert_api_error(&a, 403, "forbidden");
    assert!(
        a.body["error"]["message"].as_str().unwrap_or("").contains("users.x"),
        "{}",
        a.body
    );
    // Batches: every event is checked; a refused one refuses the batch.
    let batch = |topic: &str, ct: &str, body: String| {
        let url = format!("{}/v1/topics/{topic}/events/batch?ack=processed", n.url);
        let auth = auth.clone();
        let ct = ct.to_string();
        async move { request("POST", &url, &[("content-type", &ct), ("authorization", &auth)], body).await }
    };
    let a = batch("orders.created", "application/json", "[{},{}]".into()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = batch("users.x", "application/json", "[{},{}]".into()).await;
    assert_api_error(&a, 403, "forbidden");
    assert!(
        a.body["error"]["message"].as_str().unwrap_or("").contains("users.x"),
        "{}",
        a.body
    );
    let ce = json!([{"specversion":"1.0","id":"ce-1","source":"/t","type":"t"}]).to_string();
    let a = batch("users.x", "application/cloudevents-batch+json", ce).await;
    assert_api_error(&a, 403, "forbidden");
    // A marker through the admin token: users.x saw only it.
    let a = publish(
        &n.url,
        "users.x",
        "?ack=processed",
        &[
            JSON_CT,
            ("authorization", &bearer(ADMIN_TOKEN)),
            ("idempotency-key", "marker"),
        ],
        "{}",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let all = seen.wait_len("orders and the marker", 4).await;
    // Everything accepted was processed before its answer (ack=processed; users.x has one FIFO
    // instance), so what the handlers saw is final: nothing of the refused requests.
    assert_eq!(all.len(), 4, "1 single + a batch of 2 + the marker: {all:?}");
    assert!(
        all.iter().any(|g| g.id == "marker") && all.iter().any(|g| g.id == "o-1"),
        "{all:?}"
    );
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn metrics_need_a_read_token_only_with_metrics_auth() {
    let seen = Seen::default();
    let open = scoped_node(&seen, &[], false).await;
    let a = request("GET", &format!("{}/metrics", open.url), &[], "").await;
    assert_eq!(a.status, 200, "metrics are public by default");
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        let a = request("GET", &format!("{}{path}", open.url), &[], "").await;
        assert_eq!(a.status, 200, "{path} is public");
    }
    open.node.shutdown().await;
    let guarded = scoped_node(&seen, &[], true).await;
    let url = format!("{}/metrics", guarded.url);
    let a = request("GET", &url, &[], "").await;
    assert_api_error(&a, 401, "unauthorized");
    let a = request("GET", &url, &[("authorization", &bearer(PUBLISH_TOKEN))], "").await;
    assert_api_error(&a, 403, "forbidden");
    for t in [READ_TOKEN, ADMIN_TOKEN] {
        let a = request("GET", &url, &[("authorization", &bearer(t))], "").await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        let a = request("GET", &format!("{}{path}", guarded.url), &[], "").await;
        assert_eq!(a.status, 200, "{path} stays public");
    }
    guarded.node.shutdown().await;
}

/// The `herald::audit` lines of the whole test process, captured by a global subscriber
/// (admin routes run on the HTTP server's worker threads).
fn audit_lines() -> Arc<Mutex<Vec<u8>>> {
    static LINES: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LINES
        .get_or_init(|| {
            use tracing_subscriber::layer::SubscriberExt as _;
            use tracing_subscriber::Layer as _;
            let buf = Arc::new(Mutex::new(Vec::new()));
            let writer = buf.clone();
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || AuditWriter(writer.clone()))
                .with_filter(
                    tracing_subscriber::filter::Targets::new().with_target("herald::audit", tracing::Level::INFO),
                );
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("no other global subscriber in this test binary");
            buf
        })
        .clone()
}

struct AuditWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for AuditWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[actix_rt::test]
async fn admin_actions_are_audited_with_the_token_name_not_the_token() {
    let lines = audit_lines();
    let seen = Seen::default();
    let n = scoped_node(&seen, &[], false).await;
    let spec = json!({"topic":"sec.audit","group":"g","handler":{"kind":"log"}}).to_string();
    let url = |p: &str| format!("{}{p}", n.url);
    let a = request(
        "POST",
        &url("/v1/subscriptions"),
        &[JSON_CT, ("authorization", &bearer(ADMIN_TOKEN))],
        spec,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let a = request(
        "DELETE",
        &url("/v1/subscriptions/sec.audit/g"),
        &[("authorization", &bearer(PUBLISH_TOKEN))],
        "",
    )
    .await;
    assert_eq!(a.status, 403);
    let a = request(
        "POST",
        &url("/v1/cluster/nodes/4242/drain"),
        &[("authorization", &bearer(ADMIN_TOKEN))],
        "",
    )
    .await;
    assert_eq!(a.status, 404);
    let publish_name = format!("sha256:{}", &herald::config::hash_token(PUBLISH_TOKEN)[7..15]);
    let find = |needles: Vec<String>| {
        let lines = lines.clone();
        move || {
            let text = String::from_utf8_lossy(&lines.lock().unwrap()).into_owned();
            let found = text
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n.as_str())))
                .map(str::to_string);
            async move { found }
        }
    };
    let created = eventually(
        "the create_subscription audit line",
        find(vec![
            "action=\"create_subscription\"".into(),
            "object=\"sec.audit/g\"".into(),
        ]),
    )
    .await;
    assert!(
        created.contains("token=\"ops\"") && created.contains("outcome=\"ok\""),
        "{created}"
    );
    assert!(created.contains("remote=127.0.0.1:"), "{created}");
    assert!(
        created.contains("INFO") && created.contains("herald::audit"),
        "{created}"
    );
    let refused = eventually(
        "the refused delete's audit line",
        find(vec![
            "action=\"delete_subscription\"".into(),
            "object=\"sec.audit/g\"".into(),
        ]),
    )
    .await;
    assert!(
        refused.contains(&format!("token=\"{publish_name}\"")) && refused.contains("outcome=\"forbidden\""),
        "{refused}"
    );
    let drained = eventually(
        "the drain's audit line",
        find(vec!["action=\"drain_node\"".into(), "object=\"4242\"".into()]),
    )
    .await;
    assert!(
        drained.contains("outcome=\"not_found\"") && drained.contains("token=\"ops\""),
        "{drained}"
    );
    let all = String::from_utf8_lossy(&lines.lock().unwrap()).into_owned();
    for secret in [ADMIN_TOKEN, PUBLISH_TOKEN, READ_TOKEN, ORDERS_TOKEN] {
        assert!(!all.contains(secret), "a token was logged: {all}");
    }
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn a_method_a_path_does_not_have_answers_405_in_the_error_shape_with_allow() {
    let seen = Seen::default();
    let n = recording_node(&seen, "api.methods").await;
    for (method, path, allow) in [
        ("GET", "/v1/topics/api.methods/events", "POST"),
        ("PUT", "/v1/topics/api.methods/events/batch", "POST"),
        ("DELETE", "/v1/subscriptions", "GET, POST"),
        ("POST", "/v1/cluster", "GET"),
        ("GET", "/v1/cluster/nodes/1", "DELETE"),
        ("POST", "/healthz", "GET"),
    ] {
        let a = request(method, &format!("{}{path}", n.url), &[], "").await;
        assert_eq!(a.status, 405, "{method} {path}: {}", a.body);
        assert_eq!(
            a.body["error"]["code"], "method_not_allowed",
            "{method} {path}: {}",
            a.body
        );
        assert!(a.body["error"]["message"].is_string(), "{}", a.body);
        assert_eq!(
            a.headers.get("allow").and_then(|v| v.to_str().ok()),
            Some(allow),
            "{method} {path}"
        );
    }
    let a = request("GET", &format!("{}/v1/no-such-route", n.url), &[], "").await;
    assert_eq!(a.status, 404);
    assert_eq!(a.body["error"]["code"], "not_found", "{}", a.body);
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn the_openapi_document_lists_cloudevents_media_types_and_auth_errors() {
    let seen = Seen::default();
    let n = recording_node(&seen, "api.doc").await;
    let (status, doc) = get(&format!("{}/openapi.json", n.url)).await;
    assert_eq!(status, 200);
    let op = |path: &str, method: &str| doc["paths"][path][method].clone();
    let media = |op: &Value| -> BTreeSet<String> {
        op["requestBody"]["content"]
            .as_object()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    };
    let one = op("/v1/topics/{topic}/events", "post");
    assert_eq!(
        media(&one),
        BTreeSet::from(
            [
                "application/json",
                "application/cloudevents+json",
                "application/octet-stream"
            ]
            .map(String::from)
        ),
        "{one}"
    );
    let headers: Vec<&str> = one["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter(|p| p["in"] == "header")
        .filter_map(|p| p["name"].as_str())
        .collect();
    for h in ["ce-specversion", "ce-id", "ce-source", "ce-type", "Idempotency-Key"] {
        assert!(headers.contains(&h), "binary mode header {h} missing: {headers:?}");
    }
    let batch = op("/v1/topics/{topic}/events/batch", "post");
    assert!(media(&batch).contains("application/cloudevents-batch+json"), "{batch}");
    let error_body = json!({ "$ref": "#/components/schemas/ErrorBody" });
    for (path, method) in [
        ("/v1/topics/{topic}/events", "post"),
        ("/v1/subscriptions", "post"),
        ("/v1/cluster/nodes/{id}", "delete"),
        ("/v1/dead-letters", "get"),
    ] {
        let o = op(path, method);
        for status in ["401", "403"] {
            assert_eq!(
                o["responses"][status]["content"]["application/json"]["schema"], error_body,
                "{method} {path} {status}: {o}"
            );
        }
        assert_eq!(o["security"], json!([{ "bearer": [] }]), "{method} {path}");
    }
    for status in ["413", "415"] {
        assert_eq!(
            op("/v1/subscriptions", "post")["responses"][status]["content"]["application/json"]["schema"],
            error_body,
            "POST /v1/subscriptions {status}"
        );
    }
    let health = op("/healthz", "get");
    assert!(health["security"].is_null(), "{health}");
    assert!(health["responses"]["401"].is_null(), "{health}");
    assert!(doc["components"]["schemas"]["CloudEvent"]["properties"]["specversion"].is_object());
    n.node.shutdown().await;
}

#[actix_rt::test]
async fn dead_letters_refuse_an_unknown_scope() {
    let seen = Seen::default();
    let n = recording_node(&seen, "api.scope").await;
    for (method, path) in [
        ("GET", "/v1/dead-letters?scope=everywhere"),
        ("POST", "/v1/dead-letters/x/replay?scope=everywhere"),
    ] {
        let a = request(method, &format!("{}{path}", n.url), &[], "").await;
        assert_eq!(a.status, 400, "{method} {path}: {}", a.body);
        assert_eq!(a.body["error"]["code"], "invalid_query", "{}", a.body);
    }
    let a = request("GET", &format!("{}/v1/dead-letters?scope=local", n.url), &[], "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    n.node.shutdown().await;
}
