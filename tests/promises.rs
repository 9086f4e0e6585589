//! README promises that had no test of their own (issue 17, point 3), each against a real
//! `herald node` process: `[[subscriptions]]` in the config file, a data directory that belongs to
//! one node id, and the loopback-only bind of a node without tokens. `tests/README.md` maps every
//! README claim to its test.
//!
//! Every node runs on port 0 with its own data dir; every wait polls with a deadline.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

/// A config file with one `[[subscriptions]]` entry: `topic`/`group` to the webhook `url`.
fn config_with_subscription(topic: &str, group: &str, url: &str, instances: u32) -> String {
    format!(
        "[[subscriptions]]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = {{ kind = \"webhook\", url = \"{url}\" }}\ninstances = {instances}\n"
    )
}

/// The subscriptions a node lists.
async fn subscriptions(url: &str) -> Vec<Value> {
    let (status, list) = get(&format!("{url}/v1/subscriptions")).await;
    assert_eq!(status, 200, "{list}");
    list.as_array().cloned().unwrap_or_default()
}

/// README, "Subscriptions": declared ones (`[[subscriptions]]`) are created or updated at every
/// start.
#[actix_rt::test]
async fn subscriptions_in_the_config_file_are_created_and_updated_at_every_start() {
    let dir = tempfile::tempdir().unwrap();
    let (data, config) = (dir.path().join("data"), dir.path().join("herald.toml"));
    let receiver = Receiver::start(0).await;
    std::fs::write(
        &config,
        config_with_subscription("cfg.orders", "hook", &receiver.url, 1),
    )
    .unwrap();
    let args = ["--config", p(&config), "--data-dir", p(&data)];

    let node = spawn_herald(&args, &[]);
    let subs = subscriptions(&node.url).await;
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert_eq!(
        (subs[0]["topic"].as_str(), subs[0]["group"].as_str()),
        (Some("cfg.orders"), Some("hook"))
    );
    assert_eq!(subs[0]["instances"], 1);
    assert_eq!(subs[0]["handler"], json!({ "kind": "webhook", "url": receiver.url }));
    // It runs: an event reaches the webhook.
    let a = post_json(
        &format!("{}/v1/topics/cfg.orders/events?ack=processed", node.url),
        &json!({ "n": 1 }),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let got = receiver.events();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].body["data"], json!({ "n": 1 }));
    assert!(terminate(node).await.success());

    // Changed in the file: updated at the next start, on the same data dir.
    std::fs::write(
        &config,
        config_with_subscription("cfg.orders", "hook", &receiver.url, 2),
    )
    .unwrap();
    let node = spawn_herald(&args, &[]);
    let subs = subscriptions(&node.url).await;
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert_eq!(
        subs[0]["instances"], 2,
        "the declared subscription is updated at start: {subs:?}"
    );
    assert!(terminate(node).await.success());
    receiver.stop().await;
}

/// README, "Launch a cluster": a data directory belongs to one node id; starting another id on it
/// is refused.
#[actix_rt::test]
async fn a_data_directory_belongs_to_one_node_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = spawn_herald(&["--data-dir", p(&data), "--node-id", "1"], &[]);
    assert!(terminate(node).await.success());

    let o = cli(&[
        "node",
        "--http",
        "127.0.0.1:0",
        "--insecure-peers",
        "--data-dir",
        p(&data),
        "--node-id",
        "2",
    ])
    .await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "node 2 started on node 1's data dir: {err}");
    assert!(err.contains("belongs to node 1"), "the refusal names the owner: {err}");

    // The owner itself starts again on it.
    let node = spawn_herald(&["--data-dir", p(&data), "--node-id", "1"], &[]);
    assert!(terminate(node).await.success());
}

/// README, "HTTP: TLS and tokens": with no tokens configured the API is open but the node binds
/// loopback only, unless `http.allow_unauthenticated_remote = true`.
#[actix_rt::test]
async fn without_tokens_the_api_binds_loopback_only_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let node = spawn_herald(
        &[
            "--http",
            "0.0.0.0:0",
            "--peer",
            "127.0.0.1:0",
            "--data-dir",
            p(&dir.path().join("a")),
        ],
        &[],
    );
    assert!(
        node.url.starts_with("http://127.0.0.1:"),
        "asked for 0.0.0.0 without tokens, it must listen on loopback: {}",
        node.url
    );
    assert!(terminate(node).await.success());

    let node = spawn_herald(
        &[
            "--http",
            "0.0.0.0:0",
            // Plaintext peers (the harness's `--insecure-peers`) must stay on loopback.
            "--peer",
            "127.0.0.1:0",
            "--allow-unauthenticated-remote",
            "--data-dir",
            p(&dir.path().join("b")),
        ],
        &[],
    );
    assert!(
        node.url.starts_with("http://0.0.0.0:"),
        "allowed explicitly, it listens where asked: {}",
        node.url
    );
    assert!(terminate(node).await.success());
}

/// One event's data for the byte-budget test: `{"n":…,"pad":"xxx…"}`, about 1 KB.
fn padded(n: usize) -> Value {
    json!({ "n": n, "pad": "x".repeat(1000) })
}

/// README, "Delivery guarantees": all queued events share a byte budget
/// (`handlers.max_inflight_bytes`); when it is full, publishing answers `429` with
/// `Retry-After: 1` and nothing of that request is accepted (README, "Publish events": a batch is
/// accepted whole or not at all), counted in `herald_events_rejected_total`.
///
/// The webhook points at a port where nothing listens yet, so every accepted event stays in
/// flight (retried) and holds its bytes until the receiver starts on that port. Then every event
/// answered `202` arrives, and none of a refused request ever does.
#[actix_rt::test]
async fn a_full_inflight_byte_budget_answers_429_and_a_refused_batch_is_never_delivered() {
    const BUDGET: usize = 16 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let (data, config) = (dir.path().join("data"), dir.path().join("herald.toml"));
    // Retries every 50-200 ms, up to 1,000 attempts: nothing is dead-lettered meanwhile.
    std::fs::write(
        &config,
        format!(
            "[http]\nmax_body_bytes = {BUDGET}\n[handlers]\nmax_inflight_bytes = {BUDGET}\nbackoff_initial_ms = 50\nbackoff_max_ms = 200\n"
        ),
    )
    .unwrap();
    let node = spawn_herald(&["--config", p(&config), "--data-dir", p(&data)], &[]);
    let closed = free_port();
    subscribe(
        &node.url,
        &json!({ "topic": "budget", "group": "hook", "instances": 1, "max_attempts": 1000,
                 "handler": { "kind": "webhook", "url": format!("http://127.0.0.1:{closed}/hook") } }),
    )
    .await;
    let batch_url = format!("{}/v1/topics/budget/events/batch", node.url);
    let publish_batch = |key: &'static str, n: usize, from: usize| {
        let body = Value::from((from..from + n).map(padded).collect::<Vec<_>>()).to_string();
        let url = batch_url.clone();
        async move {
            assert!(body.len() <= BUDGET, "the batch fits in max_body_bytes");
            request(
                "POST",
                &url,
                &[("content-type", "application/json"), ("idempotency-key", key)],
                body,
            )
            .await
        }
    };
    let overloaded = |a: &Answer, what: &str| {
        assert_error(a, 429, "overloaded");
        assert_eq!(
            a.headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1"),
            "{what}: a 429 carries Retry-After: 1"
        );
    };
    let mut refusals = 0;

    // 1. A batch whose first events fit in the empty budget but not all of them: refused whole.
    let a = publish_batch("refused-whole", 14, 0).await;
    overloaded(&a, "a batch larger than the budget");
    refusals += 1;

    // 2. A batch that fits: accepted whole.
    let a = publish_batch("accepted", 5, 100).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let mut accepted: BTreeSet<String> = (0..5).map(|i| format!("accepted-{i}")).collect();
    let ids: BTreeSet<String> = a.body["ids"]
        .as_array()
        .expect("a batch answer lists its ids")
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, accepted, "{}", a.body);

    // 3. Single events until the budget is full (bounded: 20 publishes).
    let mut singles = 0;
    let refused_single = loop {
        assert!(
            singles < 20,
            "20 events of 1 KB accepted with a budget of {BUDGET} bytes"
        );
        let id = format!("single-{singles}");
        let a = request(
            "POST",
            &format!("{}/v1/topics/budget/events", node.url),
            &[("content-type", "application/json"), ("idempotency-key", &id)],
            padded(200 + singles).to_string(),
        )
        .await;
        match a.status {
            202 => {
                accepted.insert(id);
                singles += 1;
            }
            _ => break a,
        }
    };
    overloaded(&refused_single, "a single event over the budget");
    refusals += 1;
    let held = accepted.len();
    assert!(
        held < 14,
        "{held} events fit in the budget, so the first batch of 14 did not fit"
    );
    assert!(
        held * padded(0).to_string().len() <= BUDGET,
        "{held} events of 1 KB held with a budget of {BUDGET} bytes"
    );

    // 4. A full budget refuses a small batch too.
    let a = publish_batch("refused-full", 2, 300).await;
    overloaded(&a, "a batch while the budget is full");
    refusals += 1;
    assert_eq!(
        metric_of(&node.url, "herald_events_rejected_total", &[]).await,
        refusals as f64,
        "every 429 is counted once"
    );

    // 5. The webhook comes up: every accepted event arrives, then a marker published after them
    // (the budget has room again), and nothing of a refused request.
    let receiver = Receiver::start_on(&format!("127.0.0.1:{closed}")).await;
    within("every accepted event is delivered", DEADLINE, || async {
        let got: BTreeSet<String> = receiver.ids().into_iter().collect();
        accepted.is_subset(&got).then_some(())
    })
    .await;
    let a = post_json(&format!("{}/v1/topics/budget/events", node.url), &padded(999)).await;
    assert_eq!(
        a.status, 202,
        "the budget is given back once events are delivered: {}",
        a.body
    );
    let marker = a.body["id"].as_str().unwrap().to_string();
    eventually("the marker is delivered", || async {
        receiver.ids().contains(&marker).then_some(())
    })
    .await;
    let got: BTreeSet<String> = receiver.ids().into_iter().collect();
    let mut expected = accepted.clone();
    expected.insert(marker);
    assert_eq!(
        got, expected,
        "exactly the accepted events arrive: none of a batch or event answered 429"
    );
    assert!(terminate(node).await.success());
    receiver.stop().await;
}

/// README, "Supervision, retries and dead letters": a handler that does not answer within
/// `handlers.call_timeout_ms` fails the attempt, which is retried on a fresh actor (counted in
/// `herald_handler_restarts_total`); after `max_attempts` the event becomes a dead letter naming
/// the timeout. The webhook here answers after 10 s and its own timeout is a minute, so only the
/// 300 ms call timeout can fail the attempts — and it does before the webhook has answered once.
#[actix_rt::test]
async fn a_handler_slower_than_call_timeout_ms_is_retried_on_a_fresh_actor_then_dead_lettered() {
    const ATTEMPTS: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let (data, config) = (dir.path().join("data"), dir.path().join("herald.toml"));
    std::fs::write(
        &config,
        "[handlers]\ncall_timeout_ms = 300\nwebhook_timeout_ms = 60000\nbackoff_initial_ms = 50\nbackoff_max_ms = 100\n",
    )
    .unwrap();
    let node = spawn_herald(&["--config", p(&config), "--data-dir", p(&data)], &[]);
    let slow = Receiver::start_with("127.0.0.1:0", 0, Duration::from_secs(10)).await;
    subscribe(
        &node.url,
        &json!({ "topic": "slow", "group": "hook", "instances": 1, "max_attempts": ATTEMPTS,
                 "handler": { "kind": "webhook", "url": slow.url } }),
    )
    .await;
    let a = post_json(&format!("{}/v1/topics/slow/events", node.url), &json!({ "n": 1 })).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.body["id"].as_str().unwrap().to_string();

    let dead = eventually("the timed-out event is dead-lettered", || async {
        let (status, list) = get(&format!("{}/v1/dead-letters?topic=slow", node.url)).await;
        assert_eq!(status, 200, "{list}");
        list.as_array()?.iter().find(|d| d["event_id"] == id.as_str()).cloned()
    })
    .await;
    assert!(
        slow.events().is_empty(),
        "dead-lettered before the webhook answered a single call: the call timeout failed them"
    );
    assert_eq!(dead["attempts"], ATTEMPTS, "{dead}");
    assert_eq!(dead["group"], "hook", "{dead}");
    let error = dead["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("did not answer within 300ms"),
        "the dead letter names the call timeout: {dead}"
    );

    let text = metrics_of(&node.url).await;
    let sub = [("topic", "slow"), ("group", "hook")];
    let outcome = |o: &'static str| {
        metric(
            &text,
            "herald_events_delivered_total",
            &[sub[0], sub[1], ("outcome", o)],
        )
    };
    assert_eq!(
        outcome("error"),
        Some(f64::from(ATTEMPTS)),
        "every attempt failed:\n{text}"
    );
    assert_eq!(outcome("dead_lettered"), Some(1.0), "{text}");
    assert_eq!(outcome("ok"), Some(0.0), "{text}");
    let restarts = metric(&text, "herald_handler_restarts_total", &sub).unwrap_or(0.0);
    assert!(
        restarts >= f64::from(ATTEMPTS - 1),
        "each retry after a timeout runs on a fresh actor: {restarts} restarts\n{text}"
    );
    assert_eq!(metric(&text, "herald_dead_letters_total", &sub), Some(1.0), "{text}");
    assert!(terminate(node).await.success());
    slow.stop().await;
}

/// The metric names of README's metrics table (section "Metrics"): every `herald_…` name in the
/// first column, without its labels.
fn readme_metric_names() -> BTreeSet<String> {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n### Metrics\n")
        .nth(1)
        .expect("README has a \"### Metrics\" section");
    let names: BTreeSet<String> = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|row| row.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .filter(|code| code.starts_with("herald_"))
        .map(|code| code.split('{').next().unwrap_or(code).to_string())
        .collect();
    names
}

/// The metric names a Prometheus text exposition serves samples of; a histogram's `_bucket`,
/// `_sum` and `_count` series also count as its own name.
fn served_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for name in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
    {
        names.insert(name.to_string());
        if let Some(base) = name.strip_suffix("_bucket") {
            names.insert(base.to_string());
        }
    }
    names
}

#[test]
fn the_readme_metric_table_is_read_whole() {
    let names = readme_metric_names();
    for name in [
        "herald_events_published_total",
        "herald_cluster_members",
        "herald_placement_epoch",
        "herald_raft_commit_index",
        "herald_trace_spans_dropped_total",
    ] {
        assert!(names.contains(name), "{name} not read from README's table: {names:?}");
    }
    assert!(names.len() >= 35, "{names:?}");
    assert_eq!(
        served_names("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\nc{a=\"b\"} 2\ng 0\n"),
        BTreeSet::from(["h_bucket", "h", "h_sum", "h_count", "c", "g"].map(String::from))
    );
}

/// README metrics whose series only an authenticated peer that misbehaves makes (their labels
/// are an open set of `(kind, reason)` pairs): `hostile.rs` provokes and checks each in-process.
const MADE_BY_A_HOSTILE_PEER: [&str; 1] = ["herald_peer_messages_refused_total"];

/// README, "Metrics": every metric the table lists is served by `/metrics` of a working cluster
/// once the traffic that makes it happened (forwarding, handling, retries, dead letters, the
/// dedup window, an unrouted topic, a trace exporter); counters of rare events are served at 0
/// from the start. The names are read from README's table, so a metric added there and not
/// served fails this test.
#[actix_rt::test]
async fn every_metric_of_the_readme_is_served_by_a_working_cluster() {
    let mut wanted = readme_metric_names();
    for name in MADE_BY_A_HOSTILE_PEER {
        assert!(wanted.remove(name), "{name} is no longer in README's table");
    }
    // The exporter serves `herald_trace_spans_dropped_total`; nothing listens on its endpoint.
    let otlp = format!("http://127.0.0.1:{}", free_port());
    let c = common::cluster::start_cluster_with(3, &[("HERALD_OTLP_ENDPOINT", otlp.as_str())]).await;
    let urls = common::cluster::urls(&c);
    let closed = free_port();
    for spec in [
        json!({ "topic": "orders", "group": "audit", "handler": { "kind": "log" }, "instances": 3 }),
        json!({ "topic": "orders", "group": "hook", "max_attempts": 2,
                "handler": { "kind": "webhook", "url": format!("http://127.0.0.1:{closed}/hook") } }),
    ] {
        subscribe(&urls[0], &spec).await;
    }
    let start = std::time::Instant::now();
    let mut missing = wanted.clone();
    let mut round = 0;
    while !missing.is_empty() {
        assert!(
            start.elapsed() < DEADLINE,
            "after {DEADLINE:?} of traffic, README lists metrics no node serves: {missing:?}"
        );
        for url in &urls {
            let a = post_json(&format!("{url}/v1/topics/orders/events"), &json!({ "round": round })).await;
            assert!(matches!(a.status, 202 | 503), "{url}: {} {}", a.status, a.body);
            // The same event id again: the hosting nodes answer it from their dedup window.
            let a = request(
                "POST",
                &format!("{url}/v1/topics/orders/events"),
                &[("content-type", "application/json"), ("idempotency-key", "again")],
                "{}",
            )
            .await;
            assert!(matches!(a.status, 202 | 503), "{url}: {} {}", a.status, a.body);
            let a = post_json(&format!("{url}/v1/topics/nowhere/events"), &json!({})).await;
            assert_eq!(a.status, 202, "{url}: {}", a.body);
        }
        round += 1;
        let mut served = BTreeSet::new();
        for url in &urls {
            served.extend(served_names(&metrics_of(url).await));
        }
        missing.retain(|m| !served.contains(m));
        if !missing.is_empty() {
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// In a 2-node cluster, the node that does not host the one instance of `topic`/`group` (once it
/// is placed): publishing there forwards every event.
async fn the_other_node(urls: &[String], topic: &str, group: &str) -> u64 {
    let (_, hosts) = common::views::wait_placed(urls, topic, group, 1).await;
    if hosts[0] == 1 {
        2
    } else {
        1
    }
}

/// README, "Delivery guarantees": `ack=accepted` answers once the event is in the ingress node's
/// WAL, and nothing acknowledged is lost when that node crashes — here with every event still
/// forwarded and unacked (the hosting node's webhook does not answer yet, and the hosting node
/// acks a forwarded event only once it is handled). After SIGKILL and a restart the ingress node
/// still holds every one of them in its WAL, every one is delivered, and their acks then empty it.
#[actix_rt::test]
async fn an_ingress_node_killed_with_unacked_forwarded_events_has_them_all_delivered_after_its_restart() {
    const N: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herald.toml");
    std::fs::write(&config, "[handlers]\nbackoff_initial_ms = 50\nbackoff_max_ms = 200\n").unwrap();
    let mut c = common::cluster::start_cluster_with(2, &[("HERALD_CONFIG", p(&config))]).await;
    let urls = common::cluster::urls(&c);
    let closed = free_port();
    subscribe(
        &urls[0],
        &json!({ "topic": "forwarded", "group": "hook", "instances": 1, "max_attempts": 1000,
                 "handler": { "kind": "webhook", "url": format!("http://127.0.0.1:{closed}/hook") } }),
    )
    .await;
    let ingress = the_other_node(&urls, "forwarded", "hook").await;
    let url = &urls[ingress as usize - 1];
    let mut accepted = BTreeSet::new();
    for i in 0..N {
        let a = post_json(
            &format!("{url}/v1/topics/forwarded/events?ack=accepted"),
            &json!({ "i": i }),
        )
        .await;
        assert_eq!(a.status, 202, "{}", a.body);
        accepted.insert(a.body["id"].as_str().unwrap().to_string());
    }
    assert_eq!(accepted.len(), N);
    wait_metric(url, "herald_forward_pending", &[], N as f64).await;

    c.kill9(ingress);
    c.restart(ingress);
    c.ready().await;
    // Restarted on HTTP port 0: a new address.
    let url = c[ingress as usize - 1].url().to_string();
    assert_eq!(
        metric_of(&url, "herald_wal_events", &[]).await,
        N as f64,
        "the restarted ingress node holds every unfinished event in its WAL"
    );

    let receiver = Receiver::start_on(&format!("127.0.0.1:{closed}")).await;
    within(
        "every event acknowledged before the kill is delivered",
        DEADLINE,
        || async {
            let got: BTreeSet<String> = receiver.ids().into_iter().collect();
            accepted.is_subset(&got).then_some(())
        },
    )
    .await;
    eventually("the handled events' acks empty the ingress node's WAL", || async {
        (metric_of(&url, "herald_wal_events", &[]).await == 0.0).then_some(())
    })
    .await;
    receiver.stop().await;
}

/// README, "Delivery guarantees": a forwarded event the handler node has not acked within
/// `cluster.redeliver_after_ms` is sent again, and the handler node runs it once all the same (its
/// dedup window knows the copy is running or done). The webhook takes `SLOW` per call, longer than
/// the 300 ms setting, so every event is re-sent at least once while it waits its turn; with the
/// setting at a minute, none is. Either way the webhook sees each event exactly once (checked once a
/// marker published after them has run) and the ingress node's WAL empties.
#[actix_rt::test]
async fn a_forwarded_event_unacked_past_redeliver_after_ms_is_sent_again_and_runs_once() {
    const N: usize = 4;
    const SLOW: Duration = Duration::from_millis(1000);
    for (redeliver_after_ms, resent) in [(300, true), (60_000, false)] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("herald.toml");
        std::fs::write(
            &config,
            format!("[cluster]\nredeliver_after_ms = {redeliver_after_ms}\n[handlers]\nwebhook_timeout_ms = 60000\ncall_timeout_ms = 60000\n"),
        )
        .unwrap();
        let c = common::cluster::start_cluster_with(2, &[("HERALD_CONFIG", p(&config))]).await;
        let urls = common::cluster::urls(&c);
        let slow = Receiver::start_with("127.0.0.1:0", 0, SLOW).await;
        subscribe(
            &urls[0],
            &json!({ "topic": "redeliver", "group": "hook", "instances": 1,
                     "handler": { "kind": "webhook", "url": slow.url } }),
        )
        .await;
        let ingress = the_other_node(&urls, "redeliver", "hook").await;
        let url = &urls[ingress as usize - 1];
        let mut accepted = BTreeSet::new();
        for i in 0..N {
            let a = post_json(&format!("{url}/v1/topics/redeliver/events"), &json!({ "i": i })).await;
            assert_eq!(a.status, 202, "{}", a.body);
            accepted.insert(a.body["id"].as_str().unwrap().to_string());
        }
        within(
            "every event reaches the slow webhook",
            DEADLINE + SLOW * N as u32,
            || async { accepted.iter().all(|id| slow.ids().contains(id)).then_some(()) },
        )
        .await;
        eventually("the handled events' acks empty the ingress node's WAL", || async {
            (metric_of(url, "herald_wal_events", &[]).await == 0.0).then_some(())
        })
        .await;
        // A marker behind them: the handler node's mailbox is first in, first out, and copies sent
        // again were sent before the acks came back, on the same connection, so once the marker
        // ran every copy has had its turn.
        let m = post_json(&format!("{url}/v1/topics/redeliver/events"), &json!({ "marker": true })).await;
        assert_eq!(m.status, 202, "{}", m.body);
        let marker = m.body["id"].as_str().unwrap().to_string();
        within(
            "the marker reaches the slow webhook",
            DEADLINE + SLOW * 2 * N as u32,
            || async { slow.ids().contains(&marker).then_some(()) },
        )
        .await;
        let ids: Vec<String> = slow.ids().into_iter().filter(|id| *id != marker).collect();
        assert_eq!(
            ids.len(),
            N,
            "redeliver_after_ms = {redeliver_after_ms}: the webhook ran each event once (the handler node's dedup window), got {ids:?}"
        );
        let redelivered = metric_of(url, "herald_events_redelivered_total", &[]).await;
        if resent {
            assert!(
                redelivered >= N as f64,
                "redeliver_after_ms = {redeliver_after_ms}: each event waited longer than that for its ack and was sent again: {redelivered} redeliveries"
            );
        } else {
            assert_eq!(
                redelivered, 0.0,
                "redeliver_after_ms = {redeliver_after_ms}: nothing waited that long, nothing was sent again"
            );
        }
        slow.stop().await;
    }
}
