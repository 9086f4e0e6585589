//! Traces (issue 15): one event published to node A and handled on node B is one trace, exported
//! by both node processes over OTLP/HTTP to a collector inside the test, with the parent chain
//! publish → forward → deliver → webhook; the webhook receiver gets a `traceparent` naming the
//! webhook span; a retried event has one deliver span per attempt; an unsampled `traceparent` is
//! passed on and makes no span; a dead-letter replay starts a trace linked to the original one.
//!
//! The OpenTelemetry pipeline is process-wide, so the nodes are real `herald node` processes
//! (`HERALD_OTLP_ENDPOINT`), each exporting with its own resource (`herald.node_id`). Every wait
//! polls with a deadline; every port is 0 or free.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use actix_web::HttpResponse;
use common::cluster::{start_cluster_with, urls};
use common::views::wait_placed;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use serde_json::json;

/// One span as the collector got it (ids in lower-case hex, attributes as strings).
#[derive(Clone, Debug)]
struct Got {
    /// `herald.node_id` of the exporting process's resource.
    node: String,
    resource: BTreeMap<String, String>,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attrs: BTreeMap<String, String>,
    links: Vec<String>,
}

impl Got {
    fn attr(&self, key: &str) -> &str {
        self.attrs.get(key).map_or("", String::as_str)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn strings(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

/// An OTLP/HTTP (protobuf) trace receiver on 127.0.0.1:0: decodes every
/// `ExportTraceServiceRequest` POSTed to `/v1/traces` and keeps its spans.
struct Collector {
    base: String,
    spans: Arc<Mutex<Vec<Got>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    fn start() -> Collector {
        let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s, r) = (spans.clone(), requests.clone());
        let (addr, _handle) = serve("127.0.0.1:0", 1, move |req, body| {
            let (s, r) = (s.clone(), r.clone());
            async move {
                let content_type = req
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                r.lock()
                    .unwrap()
                    .push(format!("{} {} {content_type}", req.method(), req.path()));
                let Ok(export) = ExportTraceServiceRequest::decode(body) else {
                    return HttpResponse::BadRequest().finish();
                };
                let mut got = s.lock().unwrap();
                for rs in export.resource_spans {
                    let resource = strings(&rs.resource.map(|r| r.attributes).unwrap_or_default());
                    let node = resource.get("herald.node_id").cloned().unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            got.push(Got {
                                node: node.clone(),
                                resource: resource.clone(),
                                name: span.name.clone(),
                                trace: hex(&span.trace_id),
                                id: hex(&span.span_id),
                                parent: hex(&span.parent_span_id),
                                attrs: strings(&span.attributes),
                                links: span.links.iter().map(|l| hex(&l.trace_id)).collect(),
                            });
                        }
                    }
                }
                HttpResponse::Ok()
                    .content_type("application/x-protobuf")
                    .body(ExportTraceServiceResponse::default().encode_to_vec())
            }
        });
        Collector {
            base: format!("http://{addr}"),
            spans,
            requests,
        }
    }

    fn of_trace(&self, trace: &str) -> Vec<Got> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == trace)
            .cloned()
            .collect()
    }

    fn all(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

/// The one span named `name` of `spans` (fails if there is not exactly one).
fn one<'a>(spans: &'a [Got], name: &str) -> &'a Got {
    let found: Vec<&Got> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span expected in {spans:#?}");
    found[0]
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

#[actix_rt::test]
async fn one_event_across_two_nodes_is_one_trace_with_a_deliver_span_per_attempt_and_replays_linked_to_it() {
    let collector = Collector::start();
    let cluster = start_cluster_with(
        2,
        &[
            ("HERALD_OTLP_ENDPOINT", collector.base.as_str()),
            ("HERALD_TRACE_SAMPLE_RATIO", "1"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let urls = urls(&cluster);
    let ok_hook = Receiver::start(0).await;
    let flaky_hook = Receiver::start(2).await;
    let once_failing_hook = Receiver::start(1).await;
    for (topic, hook, attempts) in [
        ("traced.orders", &ok_hook, 5),
        ("traced.retries", &flaky_hook, 5),
        ("traced.dead", &once_failing_hook, 1),
    ] {
        subscribe(
            &urls[0],
            &json!({"topic": topic, "group": "hook", "handler": {"kind": "webhook", "url": hook.url}, "instances": 1, "max_attempts": attempts}),
        )
        .await;
    }
    // Node B runs the subscription; the event is published to node A, the other one.
    let (_, hosts) = wait_placed(&urls, "traced.orders", "hook", 1).await;
    let b = hosts[0];
    let a = if b == 1 { 2 } else { 1 };
    let url_a = &urls[a as usize - 1];

    // 1. A caller's trace, continued across both nodes.
    let traceparent = format!("00-{TRACE}-{CALLER}-01");
    let answer = request(
        "POST",
        &format!("{url_a}/v1/topics/traced.orders/events"),
        &[
            ("content-type", "application/json"),
            ("traceparent", traceparent.as_str()),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
        r#"{"order":1}"#,
    )
    .await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    let id = answer.body["id"].as_str().unwrap().to_string();
    let got = eventually("the webhook receives the event", || async {
        ok_hook.events().first().cloned()
    })
    .await;
    let header = got
        .header("traceparent")
        .expect("the webhook call carries a traceparent")
        .to_string();
    assert_eq!(got.header("tracestate"), Some("congo=t61rcWkgMzE"));
    let parts: Vec<&str> = header.split('-').collect();
    assert_eq!(parts.len(), 4, "{header}");
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", TRACE, "01"),
        "same trace, sampled: {header}"
    );

    let spans = eventually("the four spans of the trace reach the collector", || async {
        let spans = collector.of_trace(TRACE);
        let names = ["publish", "forward", "deliver", "webhook"];
        names
            .iter()
            .all(|n| spans.iter().any(|s| s.name == *n))
            .then_some(spans)
    })
    .await;
    let (publish, forward, deliver, webhook) = (
        one(&spans, "publish"),
        one(&spans, "forward"),
        one(&spans, "deliver"),
        one(&spans, "webhook"),
    );
    assert_eq!(publish.parent, CALLER, "the publish span continues the caller's span");
    assert_eq!(forward.parent, publish.id, "forward is a child of publish");
    assert_eq!(
        deliver.parent, forward.id,
        "deliver (on B) is a child of forward (on A)"
    );
    assert_eq!(webhook.parent, deliver.id, "webhook is a child of deliver");
    assert_eq!(parts[2], webhook.id, "the receiver's parent is the webhook span");
    // Where each ran, and what each says.
    assert_eq!(
        (publish.node.as_str(), forward.node.as_str()),
        (a.to_string().as_str(), a.to_string().as_str())
    );
    assert_eq!(
        (deliver.node.as_str(), webhook.node.as_str()),
        (b.to_string().as_str(), b.to_string().as_str())
    );
    assert_eq!(publish.resource.get("service.name").map(String::as_str), Some("herald"));
    assert_eq!(
        publish.resource.get("herald.cluster").map(String::as_str),
        Some("herald")
    );
    assert_eq!(publish.attr("herald.event_id"), id);
    assert_eq!(publish.attr("herald.topic"), "traced.orders");
    assert_eq!(publish.attr("herald.ack"), "accepted");
    assert_eq!(forward.attr("herald.peer"), b.to_string());
    assert_eq!(forward.attr("herald.subscription"), "traced.orders/hook");
    assert_eq!(deliver.attr("herald.attempt"), "1");
    assert_eq!(deliver.attr("herald.outcome"), "ok");
    assert_eq!(deliver.attr("herald.event_id"), id);
    assert_eq!(webhook.attr("http.response.status_code"), "200");

    // 2. No traceparent: a new trace (sample ratio 1); the handler fails twice, then succeeds.
    let (_, retry_hosts) = wait_placed(&urls, "traced.retries", "hook", 1).await;
    let other = if retry_hosts[0] == 1 { 2 } else { 1 };
    let answer = post_json(
        &format!("{}/v1/topics/traced.retries/events", urls[other as usize - 1]),
        &json!({"order": 2}),
    )
    .await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    let retried = answer.body["id"].as_str().unwrap().to_string();
    let delivers = eventually("three deliver spans of the retried event", || async {
        let all = collector.all();
        let publish = all
            .iter()
            .find(|s| s.name == "publish" && s.attr("herald.event_id") == retried)?
            .clone();
        let mut delivers: Vec<Got> = all
            .iter()
            .filter(|s| s.trace == publish.trace && s.name == "deliver")
            .cloned()
            .collect();
        delivers.sort_by(|x, y| x.attr("herald.attempt").cmp(y.attr("herald.attempt")));
        let webhooks = all
            .iter()
            .filter(|s| s.trace == publish.trace && s.name == "webhook")
            .count();
        (delivers.len() >= 3 && webhooks >= 3).then_some((publish, delivers, all))
    })
    .await;
    let (publish, delivers, all) = delivers;
    assert_ne!(publish.trace, TRACE, "a new trace");
    assert_eq!(publish.parent, "", "the publish span is the new trace's root");
    let attempts: Vec<(&str, &str)> = delivers
        .iter()
        .map(|d| (d.attr("herald.attempt"), d.attr("herald.outcome")))
        .collect();
    assert_eq!(attempts, [("1", "error"), ("2", "error"), ("3", "ok")]);
    for d in &delivers {
        assert_eq!(d.node, retry_hosts[0].to_string());
        let webhooks: Vec<&Got> = all.iter().filter(|s| s.name == "webhook" && s.parent == d.id).collect();
        assert_eq!(webhooks.len(), 1, "one webhook call per attempt: {d:?}");
    }
    let forward = one(
        &all.iter()
            .filter(|s| s.trace == publish.trace)
            .cloned()
            .collect::<Vec<_>>(),
        "forward",
    )
    .clone();
    assert_eq!(forward.parent, publish.id);
    assert!(
        delivers.iter().all(|d| d.parent == forward.id),
        "every attempt is a child of the one forward hop"
    );

    // 3. An unsampled traceparent makes no span and is passed on unchanged.
    let unsampled = format!("00-{}-{CALLER}-00", "a".repeat(32));
    let answer = request(
        "POST",
        &format!("{url_a}/v1/topics/traced.orders/events"),
        &[
            ("content-type", "application/json"),
            ("traceparent", unsampled.as_str()),
        ],
        r#"{"order":3}"#,
    )
    .await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    let got = eventually("the webhook receives the unsampled event", || async {
        ok_hook.events().get(1).cloned()
    })
    .await;
    assert_eq!(got.header("traceparent"), Some(unsampled.as_str()));
    assert!(collector.of_trace(&"a".repeat(32)).is_empty());

    // 4. A dead-lettered event (its one attempt fails), replayed: the replay span starts a new
    // trace linked to the original one, and the new attempt is its grandchild (replay → deliver).
    let answer = post_json(&format!("{url_a}/v1/topics/traced.dead/events"), &json!({"order": 4})).await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    let dead = answer.body["id"].as_str().unwrap().to_string();
    let dead_letter = eventually("the event is dead-lettered", || async {
        let (status, list) = get(&format!("{url_a}/v1/dead-letters?topic=traced.dead")).await;
        (status == 200).then_some(())?;
        list.as_array()?
            .iter()
            .find(|d| d["event_id"] == dead.as_str())
            .map(|d| d["id"].as_str().unwrap().to_string())
    })
    .await;
    let original = eventually("the dead-lettered attempt's span", || async {
        collector
            .all()
            .into_iter()
            .find(|s| s.name == "deliver" && s.attr("herald.event_id") == dead)
    })
    .await;
    assert_eq!(original.attr("herald.outcome"), "dead-lettered");
    let replayed = request(
        "POST",
        &format!("{url_a}/v1/dead-letters/{dead_letter}/replay"),
        &[],
        "",
    )
    .await;
    assert!(replayed.status < 300, "{:?}", replayed.body);
    let (replay, again) = eventually("the replay span and the new attempt", || async {
        let all = collector.all();
        let replay = all
            .iter()
            .find(|s| s.name == "replay" && s.attr("herald.event_id") == dead)?
            .clone();
        let again = all
            .iter()
            .find(|s| s.name == "deliver" && s.trace == replay.trace && s.attr("herald.outcome") == "ok")?
            .clone();
        Some((replay, again))
    })
    .await;
    assert_eq!(replay.attr("herald.replay"), "dead_letter");
    assert_ne!(replay.trace, original.trace, "a new trace");
    assert_eq!(
        replay.links,
        vec![original.trace.clone()],
        "linked to the original trace"
    );
    assert_eq!(
        again.parent, replay.id,
        "the replayed delivery is a child of the replay span"
    );

    let requests = collector.requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("POST /v1/traces application/x-protobuf")),
        "{requests:?}"
    );
}

/// Publishes one event (no subscription needed: the publish span is made on the ingress) to the
/// node at `url`; its id.
async fn publish_one(url: &str, n: u32) -> String {
    let answer = post_json(&format!("{url}/v1/topics/traced.fallback/events"), &json!({ "n": n })).await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    answer.body["id"].as_str().unwrap().to_string()
}

/// The publish span of event `id` that `collector` got, if any.
fn publish_span(collector: &Collector, id: &str) -> Option<Got> {
    collector
        .all()
        .into_iter()
        .find(|s| s.name == "publish" && s.attr("herald.event_id") == id)
}

/// README, "Configuration": `telemetry.otlp_endpoint` is `--otlp-endpoint` /
/// `HERALD_OTLP_ENDPOINT`, else the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (as in the README's
/// Jaeger example): with only the standard variable the spans go there; with both, Herald's own
/// variable wins and the standard one gets nothing.
#[actix_rt::test]
async fn otel_exporter_otlp_endpoint_is_the_fallback_and_herald_otlp_endpoint_wins() {
    let standard = Collector::start();
    let own = Collector::start();

    let only_standard = start_cluster_with(
        1,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", standard.base.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let first = publish_one(only_standard[0].url(), 1).await;
    let span = eventually("the publish span reaches the standard variable's collector", || async {
        publish_span(&standard, &first)
    })
    .await;
    assert_eq!(span.attr("herald.topic"), "traced.fallback");
    drop(only_standard);

    let both = start_cluster_with(
        1,
        &[
            ("HERALD_OTLP_ENDPOINT", own.base.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", standard.base.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let second = publish_one(both[0].url(), 2).await;
    eventually("the publish span reaches HERALD_OTLP_ENDPOINT's collector", || async {
        publish_span(&own, &second)
    })
    .await;
    // A later event reached `own` too: had the standard collector been sent the first one, it
    // would have been by then (the exporter sends its batches in order).
    let third = publish_one(both[0].url(), 3).await;
    eventually(
        "a later publish span reaches HERALD_OTLP_ENDPOINT's collector",
        || async { publish_span(&own, &third) },
    )
    .await;
    assert!(
        publish_span(&standard, &second).is_none() && publish_span(&standard, &third).is_none(),
        "HERALD_OTLP_ENDPOINT wins over OTEL_EXPORTER_OTLP_ENDPOINT"
    );
    assert!(
        own.all().iter().all(|s| s.attr("herald.event_id") != first),
        "nothing of the first node went to HERALD_OTLP_ENDPOINT's collector"
    );
}
