//! The Grafana dashboard `cluster/grafana/herald.json` (provisioned by the compose file's
//! `monitoring` profile) against real nodes:
//!
//! * its layout is sound (unique panel ids, every panel on the 24-column grid, every query on the
//!   dashboard's data-source variable and filtered by the `instance` variable);
//! * every metric name it queries exists in the `/metrics` of a 3-node cluster that has done some
//!   work (events forwarded, handled, dead-lettered), so renaming a metric or dropping one breaks
//!   this test instead of leaving an empty panel;
//! * every query is valid PromQL (`promtool check rules` on the queries; needs promtool, so it is
//!   ignored unless run with `--include-ignored`, as CI does).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{start_cluster, urls};
use common::{metrics_of, post_json, require_tool, DEADLINE};
use serde_json::{json, Value};

const DASHBOARD: &str = include_str!("../cluster/grafana/herald.json");

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("cluster/grafana/herald.json is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// Every PromQL query: the panels' targets (with the panel's title, for messages).
fn queries(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or("").to_string()))
        })
        .collect()
}

/// The `herald_…` metric names in a PromQL expression (or a Grafana `label_values(…)` query).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("herald_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The metric names of a Prometheus text exposition (histograms as their `_bucket`, `_sum` and
/// `_count` series, as queries name them).
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_dashboard_is_laid_out_on_its_variables() {
    let d = dashboard();
    assert_eq!(d["uid"], "herald-overview");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .expect("templating variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "instance"]);

    let mut ids = BTreeSet::new();
    let mut charts = 0;
    for p in panels(&d) {
        let title = p["title"].as_str().expect("every panel has a title");
        let id = p["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} ({title}) is used twice");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(w > 0 && x + w <= 24, "panel {title} is off the 24-column grid: {g}");
        if p["type"] == "row" {
            continue;
        }
        charts += 1;
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title} does not use the data-source variable"
        );
        let targets = p["targets"].as_array().expect("a chart has targets");
        assert!(!targets.is_empty(), "panel {title} queries nothing");
        for t in targets {
            let expr = t["expr"].as_str().expect("a target has an expr");
            assert!(
                expr.contains("instance=~\"$instance\""),
                "panel {title} ignores the node selector: {expr}"
            );
            assert!(
                !metric_names(expr).is_empty(),
                "panel {title} queries no Herald metric: {expr}"
            );
        }
    }
    assert!(charts >= 20, "only {charts} charts");
}

#[actix_rt::test]
async fn every_metric_the_dashboard_queries_is_served_by_a_working_cluster() {
    let d = dashboard();
    let mut wanted: BTreeSet<String> = queries(&d).iter().flat_map(|(_, e)| metric_names(e)).collect();
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            wanted.extend(metric_names(q));
        }
    }
    assert!(wanted.len() >= 20, "the dashboard queries only {wanted:?}");

    // A cluster that forwards, handles, retries and dead-letters: a log subscription with an
    // instance on every node, and a webhook that nothing listens on (one attempt, then a dead
    // letter), published to through every node.
    let c = start_cluster(3).await;
    let urls = urls(&c);
    let closed = common::free_port();
    for spec in [
        json!({ "topic": "orders", "group": "audit", "handler": { "kind": "log" }, "instances": 3 }),
        json!({ "topic": "orders", "group": "hook", "max_attempts": 1,
                "handler": { "kind": "webhook", "url": format!("http://127.0.0.1:{closed}/hook") } }),
    ] {
        let a = post_json(&format!("{}/v1/subscriptions", urls[0]), &spec).await;
        assert_eq!(a.status, 201, "{spec}: {}", a.body);
    }
    let start = Instant::now();
    let mut missing = wanted.clone();
    let mut round = 0;
    while !missing.is_empty() {
        assert!(
            start.elapsed() < DEADLINE,
            "after {DEADLINE:?} of traffic, the dashboard queries metrics no node serves: {missing:?}"
        );
        // Placements reach every node asynchronously: keep publishing (a few events per round,
        // bounded by the deadline) until the metrics appear.
        for url in &urls {
            let a = post_json(&format!("{url}/v1/topics/orders/events"), &json!({ "round": round })).await;
            assert!(matches!(a.status, 202 | 503), "{url}: {} {}", a.status, a.body);
        }
        round += 1;
        let mut served = BTreeSet::new();
        for url in &urls {
            served.extend(exposed(&metrics_of(url).await));
        }
        missing.retain(|m| !served.contains(m));
        if !missing.is_empty() {
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[test]
#[ignore = "needs promtool (apt-get install prometheus); CI runs it"]
fn every_dashboard_query_is_valid_promql() {
    let promtool = require_tool("promtool", "apt-get install prometheus");
    let d = dashboard();
    // Grafana's variables, as Grafana substitutes them, so promtool parses the query it would run.
    let rules: Vec<String> = queries(&d)
        .iter()
        .enumerate()
        .map(|(i, (title, expr))| {
            let expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*");
            format!(
                "      - record: herald:dashboard_query_{i}\n        # {title}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(
        &file,
        format!("groups:\n  - name: dashboard\n    rules:\n{}", rules.concat()),
    )
    .unwrap();
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check rules refused a dashboard query:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metric_names_are_read_from_queries_and_expositions() {
    assert_eq!(
        metric_names("sum by (le) (rate(herald_a_bucket{x=~\"$x\"}[1m])) / herald_b"),
        BTreeSet::from(["herald_a_bucket".into(), "herald_b".into()])
    );
    assert_eq!(
        exposed("# HELP herald_a x\nherald_a{k=\"v\"} 1\nherald_b 2\n"),
        BTreeSet::from(["herald_a".into(), "herald_b".into()])
    );
}
