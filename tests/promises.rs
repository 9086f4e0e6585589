//! README promises that had no test of their own (issue 17, point 3), each against a real
//! `herald node` process: `[[subscriptions]]` in the config file, a data directory that belongs to
//! one node id, and the loopback-only bind of a node without tokens. `tests/README.md` maps every
//! README claim to its test.
//!
//! Every node runs on port 0 with its own data dir; every wait polls with a deadline.

mod common;

use common::*;
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
