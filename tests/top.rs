//! `herald top` against a real 3-node cluster: one frame shows every member with its role, and
//! the rates of a topic that is being published to while it samples.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::cluster::{start_cluster, urls};
use common::{cli, post_json};
use serde_json::json;

#[actix_rt::test]
async fn top_shows_the_members_the_leader_and_the_rates_of_a_busy_topic() {
    let c = start_cluster(3).await;
    let urls = urls(&c);
    let spec = json!({ "topic": "orders", "group": "audit", "handler": { "kind": "log" }, "instances": 3 });
    let a = post_json(&format!("{}/v1/subscriptions", urls[0]), &spec).await;
    assert_eq!(a.status, 201, "{}", a.body);

    // Publish through every node while `top` samples (bounded: at most 2,000 events, and it
    // stops as soon as `top` has exited).
    let done = Rc::new(Cell::new(false));
    let publisher = {
        let (done, urls) = (done.clone(), urls.clone());
        async move {
            let mut sent = 0;
            while !done.get() && sent < 2_000 {
                let url = &urls[sent % urls.len()];
                let a = post_json(&format!("{url}/v1/topics/orders/events"), &json!({ "n": sent })).await;
                assert!(matches!(a.status, 202 | 503), "{}: {}", a.status, a.body);
                sent += 1;
            }
            sent
        }
    };
    let top = async {
        let out = cli(&["top", "--url", &urls[1], "--interval", "1", "--frames", "2"]).await;
        done.set(true);
        out
    };
    let (sent, out) = futures_util::join!(publisher, top);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "herald top failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(sent > 0);
    // Not a terminal: frames follow each other, without escape codes.
    assert!(!text.contains('\x1b'), "{text:?}");
    let last = text.rsplit("herald top — ").next().expect("a frame");
    assert!(last.contains("members 3"), "{last}");
    let rows: Vec<Vec<&str>> = last
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cells| cells.len() >= 9 && ["1", "2", "3"].contains(&cells[0]))
        .collect();
    assert_eq!(rows.len(), 3, "one row per member:\n{last}");
    assert!(rows.iter().all(|r| r[1] == "up"), "{last}");
    assert_eq!(rows.iter().filter(|r| r[2] == "leader").count(), 1, "{last}");
    let topic: Vec<&str> = last
        .lines()
        .find(|l| l.starts_with("orders "))
        .unwrap_or_else(|| panic!("no row for the topic:\n{last}"))
        .split_whitespace()
        .collect();
    let rate: f64 = topic[1].trim_end_matches('k').parse().expect("a rate");
    assert!(rate > 0.0, "the topic was published to during the frame:\n{last}");
    assert!(
        last.lines().any(|l| l.starts_with("orders/audit")),
        "no row for the subscription:\n{last}"
    );
}
