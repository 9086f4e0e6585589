//! Issue 18, "a new user's first hour": the event-plane and API points, each against nodes started
//! in this process.
//!
//! * Idempotency: the node hosting an instance de-duplicates `(subscription, event id)` whatever
//!   the path (published to it, or forwarded by another node).
//! * Removing a running node needs `?force=true`; a removed node learns it and stops taking
//!   events (503 `removed`, `/readyz` unready).
//! * The 504 of `ack=processed` names the events; publishing to a topic without subscription is
//!   counted and can be refused; error codes for subscriptions; `undrain`; `Idempotency-Key`
//!   length.
//!
//! Every wait is a poll with a deadline (`common::eventually`) or an `ack=processed` round trip.
//! Every test uses its own topics: the metrics recorder is shared by the whole test process.

mod common;

use std::sync::{Arc, Mutex};

use actix::prelude::{Actor, Context, Handler, ResponseFuture};
use herald::handler::{Delivery, HandlerResult};
use herald::node::Node;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use common::{
    assert_error, cluster, eventually, get, metric_of, post_json, request, start_node, views, wait_metric, Answer,
    TestNode,
};

const JSON_CT: (&str, &str) = ("content-type", "application/json");

/// `(node id, event id)` of every delivery the test handlers saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(u64, String)>>>);

impl Seen {
    fn count(&self, id: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|(_, e)| e == id).count()
    }
}

/// Records each delivery; waits for the gate first when there is one.
struct Recorder {
    node: u64,
    seen: Seen,
    gate: Option<Arc<Semaphore>>,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Recorder {
    type Result = ResponseFuture<HandlerResult>;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> Self::Result {
        let (seen, gate, node) = (self.seen.clone(), self.gate.clone(), self.node);
        Box::pin(async move {
            if let Some(gate) = gate {
                let _pass = gate.acquire().await?;
            }
            seen.0.lock().unwrap().push((node, d.event.id.to_string()));
            Ok(())
        })
    }
}

fn recorder(node: u64, seen: &Seen, gate: Option<&Arc<Semaphore>>) -> impl Fn() -> Recorder + Send + Sync + 'static {
    let (seen, gate) = (seen.clone(), gate.cloned());
    move || Recorder {
        node,
        seen: seen.clone(),
        gate: gate.clone(),
    }
}

async fn publish(url: &str, topic: &str, query: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut h = vec![JSON_CT];
    h.extend_from_slice(headers);
    request(
        "POST",
        &format!("{url}/v1/topics/{topic}/events{query}"),
        &h,
        body.to_string(),
    )
    .await
}

async fn publish_batch(url: &str, topic: &str, query: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut h = vec![JSON_CT];
    h.extend_from_slice(headers);
    request(
        "POST",
        &format!("{url}/v1/topics/{topic}/events/batch{query}"),
        &h,
        body.to_string(),
    )
    .await
}

/// Creates `spec` through the first node and returns the nodes of its instances once every node
/// agrees on them.
async fn subscribe(nodes: &[TestNode], spec: Value) -> Vec<u64> {
    let a = post_json(&format!("{}/v1/subscriptions", nodes[0].url), &spec).await;
    assert!(a.status == 201 || a.status == 200, "subscribe: {}", a.body);
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let (topic, group) = (spec["topic"].as_str().unwrap(), spec["group"].as_str().unwrap());
    views::wait_placement(&urls, topic, group, "with instances", |n| !n.is_empty())
        .await
        .1
}

/// A member's status in `url`'s `/v1/cluster`.
async fn status_of(url: &str, id: u64) -> Option<String> {
    let (_, view) = get(&format!("{url}/v1/cluster")).await;
    views::statuses(&view)
        .into_iter()
        .find_map(|(m, status)| (m == id).then_some(status))
}

/// A subscription of `topic` to the built-in log handler.
fn log_sub(topic: &str) -> herald::subscription::SubscriptionSpec {
    serde_json::from_value(json!({"topic": topic, "group": "g", "handler": {"kind": "log"}})).unwrap()
}

async fn shutdown(nodes: Vec<TestNode>) {
    for n in nodes.into_iter().rev() {
        n.node.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Bug 3: one de-duplication rule, whatever the path
// ---------------------------------------------------------------------------------------------

/// Before: the same `Idempotency-Key` published twice ran the handler twice when published to
/// the node hosting the instance, once when published to another node.
#[actix_rt::test]
async fn an_idempotency_key_runs_the_handler_once_whether_published_to_the_hosting_node_or_another() {
    let seen = Seen::default();
    let nodes = cluster(
        (1..=2u64)
            .map(|id| Node::builder().handler("rec", recorder(id, &seen, None)))
            .collect(),
    )
    .await;
    let placed = subscribe(
        &nodes,
        json!({"topic":"fh.idem","group":"g","handler":{"kind":"rust","name":"rec"}}),
    )
    .await;
    assert_eq!(placed.len(), 1, "{placed:?}");
    let host = &nodes[placed[0] as usize - 1];
    let other = nodes.iter().find(|n| n.url != host.url).unwrap();
    let dedup = "herald_events_deduplicated_total";
    let before = metric_of(&host.url, dedup, &[]).await;

    // The same key twice, and a third time through the other path, for each way in.
    for (n, (key, first, second)) in [
        ("fh-here", host, host),
        ("fh-there", other, other),
        ("fh-mixed", host, other),
        ("fh-mixed-2", other, host),
    ]
    .into_iter()
    .enumerate()
    {
        for (i, node) in [first, second].into_iter().enumerate() {
            let a = publish(
                &node.url,
                "fh.idem",
                "?ack=processed",
                &[("idempotency-key", key)],
                r#"{"n":1}"#,
            )
            .await;
            assert_eq!(a.status, 200, "{key} #{i}: {}", a.body);
            assert_eq!(a.body["id"], key);
            assert_eq!(a.body["outcomes"][0]["outcome"], "ok", "{key} #{i}: {}", a.body);
            // `ack=processed` answered: a second run would have finished by now.
            assert_eq!(seen.count(key), 1, "{key} ran once after publish #{i}");
        }
        let counted = wait_metric(&host.url, dedup, &[], before + n as f64 + 1.0).await;
        assert_eq!(counted, before + n as f64 + 1.0, "one more duplicate counted");
    }
    // Another key still runs.
    let a = publish(
        &host.url,
        "fh.idem",
        "?ack=processed",
        &[("idempotency-key", "fh-new")],
        "{}",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(seen.count("fh-new"), 1);
    shutdown(nodes).await;
}

// ---------------------------------------------------------------------------------------------
// Bug 4: removing a running node
// ---------------------------------------------------------------------------------------------

/// Before: `DELETE` of a running node answered 204, and the node went on answering `/readyz` 200
/// and accepting publishes whose events stayed in its WAL.
#[actix_rt::test]
async fn removing_a_running_node_needs_force_and_the_removed_node_stops_taking_events() {
    let nodes = cluster((0..3).map(|_| Node::builder()).collect()).await;
    let (_, view) = get(&format!("{}/v1/cluster", nodes[0].url)).await;
    let leader = view["leader"].as_u64().expect("a leader");
    // A follower is removed, through another node.
    let gone = (1..=3u64).find(|&id| id != leader).unwrap();
    let asker = &nodes[(1..=3u64).find(|&id| id != gone).unwrap() as usize - 1];
    let removed = &nodes[gone as usize - 1];
    let path = format!("{}/v1/cluster/nodes/{gone}", asker.url);

    let a = request("DELETE", &path, &[], "").await;
    assert_error(&a, 409, "member_up");
    assert!(
        a.body["error"]["message"].as_str().unwrap().contains("force=true"),
        "{}",
        a.body
    );
    assert_eq!(
        status_of(&asker.url, gone).await.as_deref(),
        Some("up"),
        "still a member"
    );
    let a = publish(&removed.url, "fh.removed", "", &[], "{}").await;
    assert_eq!(a.status, 202, "a member takes events: {}", a.body);

    let a = request("DELETE", &format!("{path}?force=true"), &[], "").await;
    assert_eq!(a.status, 204, "{}", a.body);
    eventually("the removed node reports itself removed", || async {
        let (status, body) = get(&format!("{}/readyz", removed.url)).await;
        (status == 503 && body["error"]["code"] == "removed").then_some(())
    })
    .await;
    let a = publish(&removed.url, "fh.removed", "", &[], "{}").await;
    assert_error(&a, 503, "removed");
    let a = publish_batch(&removed.url, "fh.removed", "", &[], "[{}]").await;
    assert_error(&a, 503, "removed");
    let (_, v) = get(&format!("{}/v1/cluster", removed.url)).await;
    assert_eq!(v["ready"], false, "{v}");
    // The others go on.
    for n in nodes.iter().filter(|n| n.url != removed.url) {
        eventually("the others no longer list it", || async {
            status_of(&n.url, gone).await.is_none().then_some(())
        })
        .await;
        let a = publish(&n.url, "fh.removed", "", &[], "{}").await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
    shutdown(nodes).await;
}

// ---------------------------------------------------------------------------------------------
// Rough edge 13: undrain
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn a_drained_node_is_undrained_and_takes_work_again() {
    let nodes = cluster((0..2).map(|_| Node::builder()).collect()).await;
    let url = &nodes[0].url;
    let a = request("POST", &format!("{url}/v1/cluster/nodes/2/drain"), &[], "").await;
    assert_eq!(a.status, 202, "{}", a.body);
    for n in &nodes {
        eventually("node 2 is draining everywhere", || async {
            (status_of(&n.url, 2).await.as_deref() == Some("draining")).then_some(())
        })
        .await;
    }
    let drained = subscribe(
        &nodes,
        json!({"topic":"fh.undrain","group":"a","handler":{"kind":"log"},"instances":2}),
    )
    .await;
    assert!(!drained.contains(&2), "a draining node gets no instances: {drained:?}");

    let a = request("POST", &format!("{url}/v1/cluster/nodes/2/undrain"), &[], "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body, json!({"id": 2, "status": "up"}));
    for n in &nodes {
        eventually("node 2 is up everywhere", || async {
            (status_of(&n.url, 2).await.as_deref() == Some("up")).then_some(())
        })
        .await;
    }
    // It takes work again: a subscription with an instance per node puts one there.
    let placed = subscribe(
        &nodes,
        json!({"topic":"fh.undrain","group":"b","handler":{"kind":"log"},"instances":2}),
    )
    .await;
    assert!(placed.contains(&2), "an undrained node gets instances: {placed:?}");
    // Undraining an up member changes nothing; an unknown one is 404.
    let a = request("POST", &format!("{url}/v1/cluster/nodes/2/undrain"), &[], "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = request("POST", &format!("{url}/v1/cluster/nodes/99/undrain"), &[], "").await;
    assert_error(&a, 404, "not_found");
    shutdown(nodes).await;
}

#[actix_rt::test]
async fn undrain_needs_the_admin_scope() {
    let mut b = Node::builder();
    b.config_mut().auth.tokens =
        herald::config::parse_tokens("admin fh-admin-token ops\nread fh-read-token dash\n").unwrap();
    let n = start_node(b).await;
    let id = n.node.core().config().node_id;
    let path = format!("{}/v1/cluster/nodes/{id}/undrain", n.url);
    let a = request("POST", &path, &[], "").await;
    assert_error(&a, 401, "unauthorized");
    let a = request("POST", &path, &[("authorization", "Bearer fh-read-token")], "").await;
    assert_error(&a, 403, "forbidden");
    let a = request("POST", &path, &[("authorization", "Bearer fh-admin-token")], "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    n.node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Rough edges 8, 9, 10 and the Idempotency-Key length
// ---------------------------------------------------------------------------------------------

/// Before: `{"error":{"code":"timeout","message":…}}` with no id.
#[actix_rt::test]
async fn the_504_of_ack_processed_names_the_events() {
    let seen = Seen::default();
    let gate = Arc::new(Semaphore::new(0));
    let n = start_node(
        Node::builder()
            .handler("gated", recorder(1, &seen, Some(&gate)))
            .subscribe("fh.slow", "g", "gated"),
    )
    .await;
    let q = "?ack=processed&timeout_ms=50";
    let a = publish(&n.url, "fh.slow", q, &[], "{}").await;
    assert_error(&a, 504, "timeout");
    let single: Vec<String> = serde_json::from_value(a.body["error"]["ids"].clone()).expect("ids");
    assert_eq!(single.len(), 1, "{}", a.body);
    let a = publish_batch(&n.url, "fh.slow", q, &[], "[{},{}]").await;
    assert_error(&a, 504, "timeout");
    let batch: Vec<String> = serde_json::from_value(a.body["error"]["ids"].clone()).expect("ids");
    assert_eq!(batch.len(), 2, "{}", a.body);
    let a = publish_batch(&n.url, "fh.slow", q, &[("idempotency-key", "fh-b")], "[{},{}]").await;
    assert_error(&a, 504, "timeout");
    assert_eq!(a.body["error"]["ids"], json!(["fh-b-0", "fh-b-1"]), "{}", a.body);
    // The ids named are the events still delivered.
    gate.add_permits(1000);
    for id in single
        .iter()
        .chain(&batch)
        .map(String::as_str)
        .chain(["fh-b-0", "fh-b-1"])
    {
        eventually("the timed-out events are delivered", || async {
            (seen.count(id) == 1).then_some(())
        })
        .await;
    }
    n.node.shutdown().await;
}

/// Before: 202 `"subscriptions":0`, counted nowhere but `published_total{topic="(other)"}`, and
/// no way to be refused.
#[actix_rt::test]
async fn a_topic_without_subscription_is_counted_and_refused_on_request() {
    let n = start_node(Node::builder().subscription(log_sub("fh.routed"))).await;
    let url = &n.url;
    let unrouted = "herald_events_unrouted_total";
    let a = publish(url, "fh.nosub", "", &[], "{}").await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["subscriptions"], 0);
    let a = publish_batch(url, "fh.nosub", "", &[], "[{},{}]").await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(wait_metric(url, unrouted, &[("topic", "fh.nosub")], 3.0).await, 3.0);

    let a = publish(url, "fh.nosub", "?require_subscription=true", &[], "{}").await;
    assert_error(&a, 404, "no_subscription");
    assert!(
        a.body["error"]["message"].as_str().unwrap().contains("fh.nosub"),
        "{}",
        a.body
    );
    let a = publish_batch(url, "fh.nosub", "?require_subscription=true", &[], "[{}]").await;
    assert_error(&a, 404, "no_subscription");
    let a = publish(url, "fh.routed", "?require_subscription=true", &[], "{}").await;
    assert_eq!(a.status, 202, "a subscribed topic is accepted: {}", a.body);
    assert_eq!(a.body["subscriptions"], 1);
    // Nothing refused was counted (nor accepted).
    assert_eq!(metric_of(url, unrouted, &[("topic", "fh.nosub")]).await, 3.0);
    assert_eq!(metric_of(url, unrouted, &[("topic", "fh.routed")]).await, 0.0);
    n.node.shutdown().await;

    // The node-wide default, which a publish may turn off.
    let mut b = Node::builder();
    b.config_mut().http.require_subscription = true;
    let n = start_node(b).await;
    let a = publish(&n.url, "fh.nosub2", "", &[], "{}").await;
    assert_error(&a, 404, "no_subscription");
    let a = publish(&n.url, "fh.nosub2", "?require_subscription=false", &[], "{}").await;
    assert_eq!(a.status, 202, "{}", a.body);
    n.node.shutdown().await;
}

/// Before: `invalid_name` for a bad topic in a subscription (publishing says `invalid_topic`),
/// and an `unknown_handler` message that did not name the built-in handlers.
#[actix_rt::test]
async fn subscriptions_answer_invalid_topic_and_name_the_built_in_handlers() {
    let n = start_node(Node::builder().handler("rec", recorder(1, &Seen::default(), None))).await;
    let subs = format!("{}/v1/subscriptions", n.url);
    let a = post_json(
        &subs,
        &json!({"topic":"bad topic!","group":"g","handler":{"kind":"log"}}),
    )
    .await;
    assert_error(&a, 400, "invalid_topic");
    let a = publish(&n.url, "bad%20topic%21", "", &[], "{}").await;
    assert_error(&a, 400, "invalid_topic");
    let a = post_json(
        &subs,
        &json!({"topic":"fh.t","group":"bad group!","handler":{"kind":"log"}}),
    )
    .await;
    assert_error(&a, 400, "invalid_name");
    let a = post_json(
        &subs,
        &json!({"topic":"fh.t","group":"g","handler":{"kind":"rust","name":"log"}}),
    )
    .await;
    assert_error(&a, 400, "unknown_handler");
    let message = a.body["error"]["message"].as_str().unwrap();
    for name in ["\"log\"", "rec", "webhook", r#"{"kind":"log"}"#] {
        assert!(message.contains(name), "{name} missing from: {message}");
    }
    n.node.shutdown().await;
}

/// Before: an empty or over-long `Idempotency-Key` answered 202 (an empty one as the id of every
/// event published with it; batch ids `K-i` derived from it).
#[actix_rt::test]
async fn an_empty_or_over_long_idempotency_key_is_400() {
    let n = start_node(Node::builder().subscription(log_sub("fh.keys"))).await;
    let url = &n.url;
    let longest = "k".repeat(256);
    let too_long = "k".repeat(257);
    for key in ["", too_long.as_str()] {
        let a = publish(url, "fh.keys", "", &[("idempotency-key", key)], "{}").await;
        assert_error(&a, 400, "invalid_idempotency_key");
        let a = publish_batch(url, "fh.keys", "", &[("idempotency-key", key)], "[{}]").await;
        assert_error(&a, 400, "invalid_idempotency_key");
    }
    let a = publish(url, "fh.keys", "", &[("idempotency-key", &longest)], "{}").await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["id"], longest.as_str());
    // A batch's ids `K-i` must fit too.
    let key = "k".repeat(254);
    let a = publish_batch(url, "fh.keys", "", &[("idempotency-key", &key)], "[{}]").await;
    assert_eq!(a.status, 202, "{key}-0 is 256 bytes: {}", a.body);
    let a = publish_batch(
        url,
        "fh.keys",
        "",
        &[("idempotency-key", &key)],
        &format!("[{}]", ["{}"; 11].join(",")),
    )
    .await;
    assert_error(&a, 400, "invalid_idempotency_key");
    n.node.shutdown().await;
}

/// Rough edge 15: a dead letter is logged once, as one line naming the event, its subscription,
/// the attempts and the last error (not only as the last attempt's WARN). Read from a real
/// node's log: the line is a promise to operators, and a process keeps the test free of the
/// test binary's shared tracing state.
#[actix_rt::test]
async fn a_dead_letter_is_one_log_line_naming_the_event_and_the_last_error() {
    let dir = tempfile::tempdir().unwrap();
    let (node, rx) = common::spawn_herald_stderr(&["--data-dir", common::p(dir.path())], &[]);
    common::wait_ready(&node.url);
    let closed = common::free_port();
    common::subscribe(
        &node.url,
        &json!({ "topic": "orders", "group": "hook", "max_attempts": 2,
                 "handler": { "kind": "webhook", "url": format!("http://127.0.0.1:{closed}/hook") } }),
    )
    .await;
    for id in ["dl-once", "dl-two"] {
        let a = request(
            "POST",
            &format!("{}/v1/topics/orders/events?ack=processed", node.url),
            &[("content-type", "application/json"), ("idempotency-key", id)],
            "{}",
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["outcomes"][0]["outcome"], "dead_lettered", "{}", a.body);
    }
    // Everything logged about dl-once was written before dl-two was published.
    let lines = common::lines_until(&rx, "id=dl-two");
    let dead: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("dead-lettered") && l.contains("dl-once"))
        .collect();
    assert_eq!(dead.len(), 1, "one dead-letter line for dl-once: {lines:#?}");
    for part in ["subscription=orders/hook", "attempts=2", "last_error="] {
        assert!(dead[0].contains(part), "{part:?} missing from {:?}", dead[0]);
    }
    drop(node);
}
