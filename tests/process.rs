//! End-to-end tests against real `herald` processes: the CLI client commands, webhook delivery,
//! crash recovery from the WAL after SIGKILL, graceful SIGTERM, configuration precedence and
//! validation, bearer-token auth, JSON logs and the `/metrics` exposition (checked by `promtool`).
//!
//! Every node runs on 127.0.0.1 port 0 with its own temporary data dir, so the tests run in
//! parallel; every wait is a poll with a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A subscription spec for the HTTP API.
fn webhook_sub(topic: &str, group: &str, url: &str, instances: u32, max_attempts: u32) -> Value {
    json!({
        "topic": topic,
        "group": group,
        "handler": { "kind": "webhook", "url": url },
        "instances": instances,
        "max_attempts": max_attempts,
    })
}

// ---------------------------------------------------------------------------------------------
// 1. Webhook delivery with CloudEvents attributes, through the CLI.
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn cli_subscribe_and_publish_deliver_a_cloudevent_to_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let node = spawn_herald(&["--data-dir", p(dir.path())], &[]);
    let ok = Receiver::start(0).await;
    let flaky = Receiver::start(1).await;
    let topic = "user.login";

    for (group, r) in [("hooks", &ok), ("flaky", &flaky)] {
        let o = cli(&["subscribe", "--url", &node.url, topic, group, "--webhook", &r.url]).await;
        assert!(o.status.success(), "herald subscribe failed: {}", stderr(&o));
        let answer: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("subscribe printed no JSON ({e}): {}", stdout(&o)));
        assert_eq!(answer["handler"]["kind"], "webhook");
        assert_eq!(answer["handler"]["url"], r.url.as_str());
    }

    let o = cli(&[
        "publish",
        "--url",
        &node.url,
        topic,
        r#"{"user_id":1}"#,
        "--key",
        "u1",
        "--id",
        "my-id-1",
    ])
    .await;
    assert!(o.status.success(), "herald publish failed: {}", stderr(&o));
    let published: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("publish printed no JSON ({e}): {}", stdout(&o)));
    assert_eq!(published["id"], "my-id-1", "{published}");
    assert_eq!(published["topic"], topic);
    assert_eq!(
        published["subscriptions"], 2,
        "both subscriptions should get the event: {published}"
    );

    let got = eventually("the webhook receives the event", || {
        let first = ok.events().into_iter().next();
        async move { first }
    })
    .await;
    assert_eq!(
        got.header("content-type"),
        Some("application/cloudevents+json"),
        "{:?}",
        got.headers
    );
    assert_eq!(
        got.header("x-herald-subscription"),
        Some("user.login/hooks"),
        "{:?}",
        got.headers
    );
    assert_eq!(got.header("x-herald-attempt"), Some("1"), "{:?}", got.headers);
    let ce = &got.body;
    assert_eq!(ce["specversion"], "1.0", "{ce}");
    assert_eq!(ce["id"], "my-id-1", "{ce}");
    assert_eq!(ce["source"], herald::event::DEFAULT_SOURCE, "{ce}");
    assert_eq!(ce["type"], topic, "{ce}");
    assert_eq!(ce["heraldtopic"], topic, "{ce}");
    assert_eq!(ce["partitionkey"], "u1", "{ce}");
    assert_eq!(ce["data"], json!({ "user_id": 1 }), "{ce}");
    assert!(
        ce["time"].is_string(),
        "a CloudEvent from Herald carries its time: {ce}"
    );

    // The flaky receiver answered 500 once; the event still arrives, on the second attempt.
    let retried = eventually("the failing webhook gets the event on a retry", || {
        let first = flaky.events().into_iter().next();
        async move { first }
    })
    .await;
    assert_eq!(retried.header("x-herald-attempt"), Some("2"), "{:?}", retried.headers);
    assert_eq!(retried.header("x-herald-subscription"), Some("user.login/flaky"));
    assert_eq!(retried.body["id"], "my-id-1");
    assert_eq!(retried.body["data"], json!({ "user_id": 1 }));

    let text = metrics_of(&node.url).await;
    assert_eq!(
        metric(
            &text,
            "herald_events_delivered_total",
            &[("group", "flaky"), ("outcome", "error")]
        ),
        Some(1.0),
        "one failed attempt for the flaky subscription:\n{text}"
    );
    assert_eq!(ok.events().len(), 1, "the healthy webhook got the event exactly once");
    assert!(terminate(node).await.success());
}

// ---------------------------------------------------------------------------------------------
// 2. Crash recovery: SIGKILL with 1,000 undelivered events, restart, everything arrives.
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn sigkill_loses_no_accepted_event() {
    const N: usize = 1000;
    const BATCH: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("herald.toml");
    std::fs::write(&config, "[handlers]\nbackoff_initial_ms = 10\nbackoff_max_ms = 200\n").unwrap();
    // A port that nothing listens on yet: every delivery attempt is refused until the restart.
    let port = free_port();
    let hook = format!("http://127.0.0.1:{port}/hook");
    let args = ["--config", p(&config), "--data-dir", p(&data)];

    let mut first = spawn_herald(&args, &[]);
    let a = post_json(
        &format!("{}/v1/subscriptions", first.url),
        &webhook_sub("orders", "shipping", &hook, 2, 1000),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);

    let t_publish = Instant::now();
    let mut expected = BTreeMap::new();
    for b in 0..N / BATCH {
        let body: Vec<Value> = (0..BATCH).map(|i| json!({ "n": b * BATCH + i })).collect();
        let idem = format!("crash-{b}");
        let a = request(
            "POST",
            &format!("{}/v1/topics/orders/events/batch?ack=accepted", first.url),
            &[("content-type", "application/json"), ("idempotency-key", &idem)],
            Value::from(body).to_string(),
        )
        .await;
        assert_eq!(a.status, 202, "batch {b}: {}", a.body);
        assert_eq!(a.body["subscriptions"], 1, "{}", a.body);
        let ids = a.body["ids"].as_array().expect("ids");
        assert_eq!(ids.len(), BATCH);
        for (i, id) in ids.iter().enumerate() {
            let id = id.as_str().expect("id").to_string();
            assert_eq!(id, format!("crash-{b}-{i}"));
            expected.insert(id, b * BATCH + i);
        }
    }
    let publish_time = t_publish.elapsed();
    assert_eq!(expected.len(), N);

    // Everything is in the WAL and the node is trying (and failing) to deliver.
    let text = metrics_of(&first.url).await;
    assert_eq!(metric(&text, "herald_wal_events", &[]), Some(N as f64), "{text}");
    let url = first.url.clone();
    eventually("failed delivery attempts", || {
        let url = url.clone();
        async move {
            let text = metrics_of(&url).await;
            let errors = metric(
                &text,
                "herald_events_delivered_total",
                &[("group", "shipping"), ("outcome", "error")],
            )?;
            (errors >= 2.0).then_some(())
        }
    })
    .await;
    let text = metrics_of(&first.url).await;
    assert_eq!(
        metric(
            &text,
            "herald_events_delivered_total",
            &[("group", "shipping"), ("outcome", "ok")]
        )
        .unwrap_or(0.0),
        0.0,
        "nothing can have been delivered before the receiver exists"
    );

    first.kill9();
    let receiver = Receiver::start_on(&format!("127.0.0.1:{port}")).await;
    assert_eq!(receiver.url, hook);

    let t_restart = Instant::now();
    let second = spawn_herald(&args, &[]);
    let received = within(
        "all 1,000 events delivered after the restart",
        Duration::from_secs(90),
        || {
            let events = receiver.events();
            async move {
                let distinct: BTreeSet<String> = events
                    .iter()
                    .filter_map(|e| e.body["id"].as_str().map(str::to_string))
                    .collect();
                (distinct.len() >= N).then_some(events)
            }
        },
    )
    .await;
    let redelivery_time = t_restart.elapsed();

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &received {
        let id = e.body["id"].as_str().expect("CloudEvent id").to_string();
        let n = *expected
            .get(&id)
            .unwrap_or_else(|| panic!("received an id that was never published: {id}"));
        assert_eq!(e.body["data"]["n"], n, "event {id} carries its own data");
        assert_eq!(e.header("x-herald-subscription"), Some("orders/shipping"));
        *counts.entry(id).or_default() += 1;
    }
    assert_eq!(counts.len(), N);
    assert!(expected.keys().all(|id| counts.contains_key(id)));
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let duplicated: Vec<&String> = counts.iter().filter(|(_, c)| **c > 1).map(|(id, _)| id).collect();
    println!(
        "crash recovery: published {N} in {publish_time:?}; restart to all delivered {redelivery_time:?}; \
         {} requests, {duplicates} duplicates {duplicated:?}",
        received.len()
    );

    let url = second.url.clone();
    eventually("the WAL drains to 0 after redelivery", || {
        let url = url.clone();
        async move { (metric(&metrics_of(&url).await, "herald_wal_events", &[]) == Some(0.0)).then_some(()) }
    })
    .await;
    let text = metrics_of(&second.url).await;
    let redelivered = metric(&text, "herald_events_redelivered_total", &[]).unwrap_or(0.0);
    assert!(
        redelivered >= N as f64,
        "the restart replays the WAL: redelivered {redelivered}\n{text}"
    );
    assert!(terminate(second).await.success());
    receiver.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. The /metrics exposition passes `promtool check metrics`.
// ---------------------------------------------------------------------------------------------

/// A node with a flaky webhook (one 500 first) and a log subscription after five processed
/// publishes to `orders` and one request to an unknown route: its `/metrics` text. The node is
/// stopped with SIGTERM and must exit 0.
async fn busy_node_metrics() -> String {
    let dir = tempfile::tempdir().unwrap();
    let node = spawn_herald(&["--data-dir", p(dir.path())], &[]);
    let flaky = Receiver::start(1).await;
    let a = post_json(
        &format!("{}/v1/subscriptions", node.url),
        &webhook_sub("orders", "hook", &flaky.url, 1, 5),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let a = post_json(
        &format!("{}/v1/subscriptions", node.url),
        &json!({ "topic": "orders", "group": "audit", "handler": { "kind": "log" } }),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    for i in 0..5 {
        let a = post_json(
            &format!("{}/v1/topics/orders/events?ack=processed", node.url),
            &json!({ "n": i }),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(get(&format!("{}/no/such/route", node.url)).await.0, 404);
    let text = metrics_of(&node.url).await;
    assert!(terminate(node).await.success());
    flaky.stop().await;
    text
}

/// The metric names and values of a busy node, checked without any tool (runs everywhere).
#[actix_rt::test]
async fn metrics_expose_the_documented_names_and_values() {
    let text = busy_node_metrics().await;
    for name in [
        "herald_events_published_total",
        "herald_events_delivered_total",
        "herald_events_redelivered_total",
        "herald_handler_duration_seconds_bucket",
        "herald_handler_restarts_total",
        "herald_wal_events",
        "herald_http_requests_total",
    ] {
        assert!(
            metric(&text, name, &[]).is_some(),
            "{name} missing from /metrics:\n{text}"
        );
    }
    assert_eq!(
        metric(&text, "herald_events_published_total", &[("topic", "orders")]),
        Some(5.0)
    );
    // The publish route counts through its cached handles, the others by matching the path.
    assert_eq!(
        metric(
            &text,
            "herald_http_requests_total",
            &[("route", "/v1/topics/{topic}/events"), ("status", "200")]
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &text,
            "herald_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "herald_events_delivered_total",
            &[("group", "hook"), ("outcome", "ok")]
        ),
        Some(5.0)
    );
}

/// The same node's exposition passes `promtool check metrics`.
#[actix_rt::test]
#[ignore = "needs promtool (apt-get install prometheus); CI runs it with --include-ignored"]
async fn metrics_pass_promtool_check() {
    let promtool = require_tool("promtool", "apt-get install prometheus");
    let text = busy_node_metrics().await;
    assert_promtool_passes(&promtool, text, "a node with a flaky webhook and a log subscription").await;
}

// ---------------------------------------------------------------------------------------------
// 4. SIGTERM drains queued events, then exits 0.
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn sigterm_drains_queued_events_and_exits_zero() {
    const N: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = spawn_herald(&["--data-dir", p(&data)], &[]);
    // 20 ms per request, one instance: about 3 s of work queued when SIGTERM arrives.
    let slow = Receiver::start_with("127.0.0.1:0", 0, Duration::from_millis(20)).await;
    let a = post_json(
        &format!("{}/v1/subscriptions", node.url),
        &webhook_sub("jobs", "slow", &slow.url, 1, 5),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let body: Vec<Value> = (0..N).map(|n| json!({ "n": n })).collect();
    let a = request(
        "POST",
        &format!("{}/v1/topics/jobs/events/batch?ack=accepted", node.url),
        &[("content-type", "application/json"), ("idempotency-key", "drain")],
        Value::from(body).to_string(),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);

    let before = slow.events().len();
    assert!(
        before < N,
        "the test needs events still queued at SIGTERM, but all {before} were delivered already"
    );
    let started = Instant::now();
    let status = terminate(node).await;
    println!(
        "SIGTERM with {} of {N} delivered; exited {status} after {:?}",
        before,
        started.elapsed()
    );
    assert!(status.success(), "herald exits 0 after SIGTERM, got {status}");
    let ids: BTreeSet<String> = slow.ids().into_iter().collect();
    assert_eq!(
        ids.len(),
        N,
        "every queued event was delivered before the process exited"
    );

    // And the drained events were removed from the WAL: a restart has nothing to replay.
    let again = spawn_herald(&["--data-dir", p(&data)], &[]);
    let url = again.url.clone();
    eventually("the restarted node is ready", || {
        let url = url.clone();
        async move { (get(&format!("{url}/readyz")).await.0 == 200).then_some(()) }
    })
    .await;
    assert_eq!(
        metric(&metrics_of(&again.url).await, "herald_wal_events", &[]),
        Some(0.0)
    );
    assert_eq!(
        slow.events().len(),
        N,
        "nothing is delivered twice after a clean shutdown"
    );
    assert!(terminate(again).await.success());
}

// ---------------------------------------------------------------------------------------------
// 5. Configuration: flags beat env beat file beat defaults; validation errors name the key.
// ---------------------------------------------------------------------------------------------

/// Starts a node with `args` on a fresh data dir (a data dir belongs to one node id) and returns
/// the node id it reports.
async fn node_id_of(args: &[&str], env: &[(&str, &str)]) -> Value {
    let data = tempfile::tempdir().unwrap();
    let args = [args, &["--data-dir", p(data.path())]].concat();
    let node = spawn_herald(&args, env);
    let (status, body) = get(&format!("{}/v1/cluster", node.url)).await;
    assert_eq!(status, 200, "{body}");
    assert!(terminate(node).await.success());
    body["node_id"].clone()
}

#[actix_rt::test]
async fn config_precedence_flag_env_file_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "node_id = 3\n").unwrap();
    let base: [&str; 0] = [];

    let all = [&base[..], &["--config", p(&file), "--node-id", "9"]].concat();
    assert_eq!(
        node_id_of(&all, &[("HERALD_NODE_ID", "7")]).await,
        9,
        "flag beats env and file"
    );
    let env_file = [&base[..], &["--config", p(&file)]].concat();
    assert_eq!(
        node_id_of(&env_file, &[("HERALD_NODE_ID", "7")]).await,
        7,
        "env beats file"
    );
    assert_eq!(node_id_of(&env_file, &[]).await, 3, "file beats default");
    // The file can also come from the environment.
    assert_eq!(
        node_id_of(&base, &[("HERALD_CONFIG", p(&file))]).await,
        3,
        "HERALD_CONFIG names the file"
    );
    assert_eq!(node_id_of(&base, &[]).await, 1, "default");
}

async fn node_fails(config: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, config).unwrap();
    let args = vec![
        "node".to_string(),
        "--config".to_string(),
        p(&file).to_string(),
        "--data-dir".to_string(),
        p(&dir.path().join("data")).to_string(),
    ];
    let o = actix_rt::task::spawn_blocking(move || run_to_exit(herald_cmd(&args)))
        .await
        .expect("node thread");
    assert!(
        !o.status.success(),
        "herald node should refuse this config:\n{config}\nstdout: {}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("listening on"), "{}", stdout(&o));
    o
}

#[actix_rt::test]
async fn invalid_config_exits_nonzero_naming_the_key() {
    let o = node_fails("[http]\naddr = \"nope\"\n").await;
    assert!(
        stderr(&o).contains("http.addr"),
        "stderr should name http.addr: {}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(2), "configuration errors exit 2");

    let o = node_fails("[handlers]\nbackof_initial_ms = 10\n").await;
    assert!(
        stderr(&o).contains("backof_initial_ms"),
        "stderr should name the unknown key: {}",
        stderr(&o)
    );

    let o = node_fails("node_id = 3\ncolour = \"blue\"\n").await;
    assert!(
        stderr(&o).contains("colour"),
        "stderr should name the unknown key: {}",
        stderr(&o)
    );

    let o = node_fails("[handlers]\nbackoff_initial_ms = 500\nbackoff_max_ms = 100\n").await;
    assert!(stderr(&o).contains("handlers.backoff_initial_ms"), "{}", stderr(&o));
}

// ---------------------------------------------------------------------------------------------
// 6. Bearer tokens from the config file, through the CLI.
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn cli_uses_bearer_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(
        &file,
        "[[auth.tokens]]\ntoken = \"publisher-token-1\"\nrole = \"publish\"\n\n\
         [[auth.tokens]]\ntoken = \"admin-token-0001\"\nrole = \"admin\"\n",
    )
    .unwrap();
    let node = spawn_herald(&["--config", p(&file), "--data-dir", p(&dir.path().join("data"))], &[]);
    let addr = node.url.trim_start_matches("http://").to_string();

    let o = cli(&["status", "--url", &node.url, "--token", "admin-token-0001"]).await;
    assert!(o.status.success(), "status with the admin token: {}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.lines()
            .any(|l| l.starts_with("ID") && l.contains("STATUS") && l.contains("HTTP")),
        "{out}"
    );
    let member = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&"1") && cells.get(1) == Some(&"up"))
        .unwrap_or_else(|| panic!("no member row for node 1:\n{out}"));
    assert_eq!(member[2], addr, "{out}");

    let o = cli(&["status", "--url", &node.url]).await;
    assert!(!o.status.success(), "status without a token must fail: {}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("401") && err.to_lowercase().contains("unauthorized"),
        "{err}"
    );

    let o = cli(&["status", "--url", &node.url, "--token", "wrong-token-123"]).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));

    let o = cli(&["status", "--url", &node.url, "--token", "publisher-token-1"]).await;
    assert!(!o.status.success(), "a publish token cannot read the cluster");
    assert!(stderr(&o).contains("403"), "{}", stderr(&o));

    let o = cli(&[
        "publish",
        "--url",
        &node.url,
        "--token",
        "publisher-token-1",
        "orders",
        r#"{"n":1}"#,
        "--id",
        "auth-1",
    ])
    .await;
    assert!(o.status.success(), "publish with the publish token: {}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("publish prints JSON");
    assert_eq!(v["id"], "auth-1");

    let o = cli(&["publish", "--url", &node.url, "orders", r#"{"n":1}"#]).await;
    assert!(!o.status.success(), "publish without a token must fail");
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));

    // The token can come from HERALD_TOKEN too.
    let args: Vec<String> = ["status", "--url", &node.url].iter().map(|s| s.to_string()).collect();
    let o = actix_rt::task::spawn_blocking(move || {
        let mut cmd = herald_cmd(&args);
        cmd.env("HERALD_TOKEN", "admin-token-0001");
        run_to_exit(cmd)
    })
    .await
    .unwrap();
    assert!(o.status.success(), "HERALD_TOKEN: {}", stderr(&o));
    assert!(terminate(node).await.success());
}

// ---------------------------------------------------------------------------------------------
// 7. --log-format json.
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn log_format_json_writes_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (node, rx) = spawn_herald_stderr(
        &["--data-dir", p(&dir.path().join("json")), "--log-format", "json"],
        &[],
    );
    let mut lines = lines_until(&rx, "herald node started");
    // Started is not ready: publishes answer 503 until the node has joined and replayed.
    wait_ready(&node.url);
    let a = post_json(
        &format!("{}/v1/subscriptions", node.url),
        &json!({ "topic": "audit", "group": "log", "handler": { "kind": "log" } }),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let a = request(
        "POST",
        &format!("{}/v1/topics/audit/events?ack=processed", node.url),
        &[("content-type", "application/json"), ("idempotency-key", "json-log-1")],
        r#"{"who":"ann"}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    lines.extend(lines_until(&rx, "json-log-1"));
    let status = terminate(node).await;
    assert!(status.success());
    lines.extend(rx.iter()); // the rest, until the process closed stderr

    let objects: Vec<Value> = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) if v.is_object() => v,
            _ => panic!("not a JSON object log line: {l}"),
        })
        .collect();
    for o in &objects {
        assert!(
            o["timestamp"].is_string() && o["level"].is_string() && o["message"].is_string(),
            "{o}"
        );
    }
    let started = objects
        .iter()
        .find(|o| o["message"] == "herald node started")
        .expect("a start line");
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["node_id"], 1, "fields are JSON keys: {started}");
    let event = objects
        .iter()
        .find(|o| o["id"] == "json-log-1")
        .expect("the log handler's line");
    assert_eq!(event["subscription"], "audit/log", "{event}");
    assert!(
        objects.iter().any(|o| o["message"] == "herald node stopped"),
        "a stop line"
    );

    // Without the flag the same line is plain text.
    let (text_node, rx) = spawn_herald_stderr(&["--data-dir", p(&dir.path().join("text"))], &[]);
    let lines = lines_until(&rx, "herald node started");
    let line = lines.last().unwrap();
    assert!(
        serde_json::from_str::<Value>(line).is_err(),
        "text format is not JSON: {line}"
    );
    assert!(terminate(text_node).await.success());
}

// ---------------------------------------------------------------------------------------------
// 8. `herald status` lists subscriptions created with `herald subscribe`.
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn status_lists_subscriptions_and_placements() {
    let dir = tempfile::tempdir().unwrap();
    let node = spawn_herald(
        &["--data-dir", p(dir.path()), "--node-id", "4", "--cluster-id", "blue"],
        &[],
    );
    let o = cli(&[
        "subscribe",
        "--url",
        &node.url,
        "orders",
        "audit",
        "--handler",
        "log",
        "--instances",
        "2",
    ])
    .await;
    assert!(o.status.success(), "subscribe: {}", stderr(&o));
    let o = cli(&[
        "subscribe",
        "--url",
        &node.url,
        "orders",
        "archive",
        "--handler",
        "log",
        "--max-attempts",
        "9",
    ])
    .await;
    assert!(o.status.success(), "subscribe: {}", stderr(&o));

    let o = cli(&["status", "--url", &node.url]).await;
    assert!(o.status.success(), "status: {}", stderr(&o));
    let out = stdout(&o);
    println!("{out}");
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(out.starts_with("cluster blue  node 4  leader 4"), "{out}");
    for header in [
        &["ID", "STATUS", "HTTP", "PEER", "PHI", "HANDLERS"][..],
        &["TOPIC", "GROUP", "HANDLER", "INSTANCES", "MAX_ATTEMPTS"][..],
        &["TOPIC", "GROUP", "EPOCH", "NODES"][..],
    ] {
        assert!(
            rows.iter().any(|r| r == header),
            "missing table header {header:?}:\n{out}"
        );
    }
    assert!(
        rows.iter().any(|r| r[..] == ["orders", "audit", "log", "2", "5"]),
        "subscription row:\n{out}"
    );
    assert!(
        rows.iter().any(|r| r[..] == ["orders", "archive", "log", "1", "9"]),
        "subscription row:\n{out}"
    );
    assert!(
        rows.iter().any(|r| r.len() == 4
            && r[..2] == ["orders", "audit"]
            && r[2].parse::<u64>().is_ok_and(|e| e > 0)
            && r[3] == "4,4"),
        "placement row (2 instances on node 4):\n{out}"
    );
    assert!(
        rows.iter().any(|r| r.first() == Some(&"4") && r.get(1) == Some(&"up")),
        "member row:\n{out}"
    );
    assert!(terminate(node).await.success());
}

#[actix_rt::test]
async fn herald_health_exits_zero_only_when_the_node_answers() {
    let dir = tempfile::tempdir().unwrap();
    let node = spawn_herald(&["--data-dir", p(dir.path())], &[]);
    let ready = cli(&["health", "--url", &node.url]).await;
    assert!(ready.status.success(), "health of a ready node: {}", stderr(&ready));
    assert!(stdout(&ready).starts_with("200"), "{}", stdout(&ready));
    let live = cli(&["health", "--live", "--url", &node.url]).await;
    assert!(live.status.success(), "liveness: {}", stderr(&live));

    let closed = format!("http://127.0.0.1:{}", free_port());
    let down = cli(&["health", "--url", &closed, "--timeout-ms", "2000"]).await;
    assert_eq!(down.status.code(), Some(1), "no node there: {}", stdout(&down));
    assert!(stderr(&down).contains("cannot reach"), "{}", stderr(&down));
}

/// The container settings: the node id from a StatefulSet host name, API tokens from a file.
#[actix_rt::test]
async fn node_id_from_the_host_name_and_tokens_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("api-tokens");
    std::fs::write(&tokens, "# role token\nadmin admin-token-1\npublish publish-token-1\n").unwrap();
    let data = dir.path().join("data");
    let node = spawn_herald(
        &["--data-dir", p(&data), "--tokens-file", p(&tokens)],
        &[("HERALD_NODE_ID_FROM_HOSTNAME", "true"), ("HOSTNAME", "herald-4")],
    );
    let cluster = format!("{}/v1/cluster", node.url);
    let anonymous = request("GET", &cluster, &[], "").await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    let publisher = request("GET", &cluster, &[("authorization", "Bearer publish-token-1")], "").await;
    assert_eq!(publisher.status, 403, "{}", publisher.body);
    let admin = request("GET", &cluster, &[("authorization", "Bearer admin-token-1")], "").await;
    assert_eq!(admin.status, 200, "{}", admin.body);
    assert_eq!(admin.body["node_id"], 5, "herald-4 is node 5: {}", admin.body);

    // A host name without an ordinal is refused, naming the setting.
    let args: Vec<String> = [
        "node",
        "--data-dir",
        p(&dir.path().join("other")),
        "--node-id-from-hostname",
    ]
    .map(String::from)
    .to_vec();
    let o = actix_rt::task::spawn_blocking(move || {
        let mut cmd = herald_cmd(&args);
        cmd.env("HOSTNAME", "builder");
        run_to_exit(cmd)
    })
    .await
    .expect("node thread");
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("node_id_from_hostname") && stderr(&o).contains("\"builder\""),
        "{}",
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------------------------
// Issue 18, rough edge 11: a misspelt HERALD_ variable is not ignored without a word.
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn an_unknown_herald_variable_is_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (node, rx) = spawn_herald_stderr(
        &["--data-dir", p(dir.path())],
        &[("HERALD_MAILBOX_CAPACTY", "10"), ("HERALD_MAILBOX_CAPACITY", "4000")],
    );
    let lines = lines_until(&rx, "HERALD_MAILBOX_CAPACTY");
    let line = lines.last().unwrap();
    assert!(line.contains("WARN"), "{line}");
    // The correctly spelt one is read, not reported.
    let (unknown, known) = line.split_once(" known=").expect("the known variables are listed");
    // (The list may hold other variables the test's environment has, e.g. CI's own.)
    let unknown: Vec<&str> = unknown
        .rsplit_once("unknown=")
        .expect("the unknown variables are listed")
        .1
        .split(", ")
        .map(str::trim)
        .collect();
    assert!(unknown.contains(&"HERALD_MAILBOX_CAPACTY"), "{line}");
    assert!(!unknown.contains(&"HERALD_MAILBOX_CAPACITY"), "{line}");
    assert!(known.contains("HERALD_MAILBOX_CAPACITY"), "{line}");
    assert!(terminate(node).await.success());
}

// ---------------------------------------------------------------------------------------------
// Issue 18, rough edge 12: a stopping node does not wait to hand over to members that are gone.
// ---------------------------------------------------------------------------------------------

/// Node 2 is stopped while the two other members are frozen (as when the whole cluster stops,
/// or they died): its hand-over can never commit. It stops waiting for it once it sees nobody
/// left to take its work, instead of waiting out `shutdown_timeout_ms` and then logging that it
/// could not hand over.
#[actix_rt::test]
async fn a_node_whose_peers_are_all_gone_stops_without_waiting_out_the_hand_over() {
    use common::cluster::{converge, start_cluster, urls};
    let mut c = start_cluster(3).await;
    let all = urls(&c);
    let spec = json!({ "topic": "stop.alone", "group": "trail", "handler": { "kind": "log" }, "instances": 3 });
    let a = post_json(&format!("{}/v1/subscriptions", all[0]), &spec).await;
    assert_eq!(a.status, 201, "{}", a.body);
    // Node 2 runs an instance: it holds work it would hand over.
    converge("node 2 holds an instance", &all, "/v1/cluster/placements", |views| {
        views
            .iter()
            .all(|ps| {
                ps.as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["topic"] == "stop.alone" && p["nodes"].as_array().is_some_and(|n| n.contains(&json!(2))))
            })
            .then_some(())
    })
    .await;
    c.signal(1, "STOP");
    c.signal(3, "STOP");
    let status = c.terminate(2).await;
    c.signal(1, "CONT");
    c.signal(3, "CONT");
    assert!(status.success(), "node 2 exited with {status}");
    let log = std::fs::read_to_string(c[1].log()).unwrap();
    assert!(log.contains("herald node stopped"), "{log}");
    assert!(
        !log.contains("could not hand"),
        "node 2 waited out the hand-over:\n{log}"
    );
    assert!(
        log.contains("every other member is stopping or unreachable too"),
        "node 2 did not say why it stopped waiting:\n{log}"
    );
}
