//! `herald top`: a terminal view of a running cluster, refreshed in place (like `nats-top`).
//!
//! Every interval it reads `/v1/cluster` from the node the user named (members, leader, term,
//! epoch) and `/metrics` from every member's HTTP address, and prints rates computed from the
//! counters' difference between two reads: events published per node and per topic, handler
//! outcomes, dead letters and the handler p99 per subscription (from the histogram buckets'
//! difference). It uses only the public HTTP API and the same token, so it works wherever `herald
//! status` does, over ssh included: plain text, redrawn with two ANSI escapes (cursor home, clear)
//! when stdout is a terminal, and one frame after another otherwise (`--frames` for scripts).
//!
//! The sampling and the drawing are apart: [`Sample`] is what one round read, [`frame`] turns
//! two rounds into text without I/O (unit-tested with plain values), [`run`] does the requests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::metrics::{self, counter_rate, parse_exposition, sum_by, Series};
use crate::text::table;

/// Where `top` reads from: the node the user named, with the client (TLS settings) and token the
/// CLI built from its flags.
pub(crate) struct Source {
    /// Base URL of any node; members' `/metrics` are read with the same scheme.
    pub url: String,
    /// Bearer token, sent to every node.
    pub token: Option<String>,
    /// The HTTP client (timeouts and TLS as for every CLI command).
    pub client: awc::Client,
}

/// What one round read: the cluster view, and each member's metrics (absent when unreachable).
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    /// `/v1/cluster` of the named node.
    pub cluster: Value,
    /// Per node id: metric name → series (`None`: its `/metrics` did not answer).
    pub metrics: BTreeMap<u64, Option<BTreeMap<String, Series>>>,
    /// When the round was read.
    pub at: Option<Instant>,
}

/// Summed over the nodes that answered in both rounds: `name` grouped by `by`, now and before.
fn cluster_sum(
    before: &Sample,
    now: &Sample,
    name: &str,
    by: &[&str],
    with: &[(&str, &str)],
) -> (BTreeMap<Vec<String>, f64>, BTreeMap<Vec<String>, f64>) {
    let (mut b, mut n) = (BTreeMap::new(), BTreeMap::new());
    for (id, m) in &now.metrics {
        let (Some(m), Some(Some(p))) = (m, before.metrics.get(id)) else {
            continue;
        };
        for (k, v) in sum_by(m, name, by, with) {
            *n.entry(k).or_insert(0.0) += v;
        }
        for (k, v) in sum_by(p, name, by, with) {
            *b.entry(k).or_insert(0.0) += v;
        }
    }
    (b, n)
}

fn fmt_rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.1}k", r / 1000.0)
    } else {
        format!("{r:.1}")
    }
}

fn fmt_seconds(s: f64) -> String {
    if s.is_infinite() {
        "> max".into()
    } else if s >= 1.0 {
        format!("{s:.1}s")
    } else {
        format!("{:.1}ms", s * 1000.0)
    }
}

/// One screen from two rounds `before` and `now` (no I/O).
pub(crate) fn frame(before: &Sample, now: &Sample) -> String {
    let secs = match (before.at, now.at) {
        (Some(b), Some(n)) => n.duration_since(b).as_secs_f64(),
        _ => 0.0,
    };
    let c = &now.cluster;
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let members = c["members"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "herald top — cluster {}  leader {}  term {}  epoch {}  members {}  (rates over {:.1}s)",
        s(&c["cluster_id"]),
        s(&c["leader"]),
        s(&c["term"]),
        s(&c["epoch"]),
        members.len(),
        secs
    );
    for problem in c["problems"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "problem: {}", s(problem));
    }
    out.push('\n');

    // Members: one row each, with that node's own counters.
    let leader = c["leader"].as_u64();
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            let id = m["id"].as_u64().unwrap_or(0);
            let pair = (before.metrics.get(&id), now.metrics.get(&id));
            let (b, n) = match pair {
                (Some(Some(b)), Some(Some(n))) => (Some(b), Some(n)),
                _ => (None, None),
            };
            let counter = |name: &str| -> String {
                match (b, n) {
                    (Some(b), Some(n)) => {
                        let total = |m| sum_by(m, name, &[], &[]).values().sum::<f64>();
                        fmt_rate(counter_rate(total(b), total(n), secs))
                    }
                    _ => "-".into(),
                }
            };
            let gauge = |name: &str| -> String {
                // `+ 0.0`: an empty sum is -0.0.
                n.map(|n| format!("{}", sum_by(n, name, &[], &[]).values().sum::<f64>() + 0.0))
                    .unwrap_or_else(|| "-".into())
            };
            let role = match (Some(id) == leader, m["voter"].as_bool()) {
                (true, _) => "leader",
                (false, Some(true)) => "voter",
                (false, Some(false)) => "learner",
                (false, None) => "-",
            };
            vec![
                id.to_string(),
                s(&m["status"]),
                role.to_string(),
                m["phi"]
                    .as_f64()
                    .map(|p| format!("{p:.2}"))
                    .unwrap_or_else(|| "-".into()),
                counter(metrics::EVENTS_PUBLISHED),
                counter(metrics::EVENTS_FORWARDED),
                gauge(metrics::INFLIGHT_EVENTS),
                gauge(metrics::WAL_EVENTS),
                if n.is_some() {
                    s(&m["http"])
                } else {
                    format!("{} (no answer)", s(&m["http"]))
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "NODE", "STATUS", "ROLE", "PHI", "PUB/S", "FWD/S", "INFLIGHT", "WAL", "HTTP",
        ],
        &rows,
    ));
    out.push_str("\n\n");

    // Topics: published per second over the whole cluster.
    let (b, n) = cluster_sum(before, now, metrics::EVENTS_PUBLISHED, &["topic"], &[]);
    let rows: Vec<Vec<String>> = n
        .iter()
        // A series that never counted (`(other)` before any unrouted event) is noise.
        .filter(|(_, v)| **v > 0.0)
        .map(|(k, v)| {
            vec![
                k[0].clone(),
                // A topic new since the last round counted from 0.
                fmt_rate(counter_rate(b.get(k).copied().unwrap_or(0.0), *v, secs)),
                format!("{v}"),
            ]
        })
        .collect();
    out.push_str(&table(&["TOPIC", "PUB/S", "TOTAL"], &rows));
    out.push_str("\n\n");

    // Subscriptions: handler outcomes, dead letters and p99 over the interval.
    let by = ["topic", "group"];
    let outcome = |o: &str| cluster_sum(before, now, metrics::EVENTS_DELIVERED, &by, &[("outcome", o)]);
    let (ok_b, ok_n) = outcome("ok");
    let (err_b, err_n) = outcome("error");
    let (dl_b, dl_n) = cluster_sum(before, now, metrics::DEAD_LETTERS, &by, &[]);
    let (_, depth) = cluster_sum(before, now, metrics::MAILBOX_DEPTH, &by, &[]);
    let bucket = format!("{}_bucket", metrics::HANDLER_DURATION);
    let (hb, hn) = cluster_sum(before, now, &bucket, &["topic", "group", "le"], &[]);
    let (hb, hn) = (metrics::buckets(&hb), metrics::buckets(&hn));
    let mut keys: Vec<Vec<String>> = ok_n.keys().chain(err_n.keys()).chain(dl_n.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    let r = |b: &BTreeMap<Vec<String>, f64>, n: &BTreeMap<Vec<String>, f64>, k: &Vec<String>| {
        let at = |m: &BTreeMap<Vec<String>, f64>| m.get(k).copied().unwrap_or(0.0);
        fmt_rate(counter_rate(at(b), at(n), secs))
    };
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let p99 = hn
                .get(k)
                .and_then(|now| metrics::interval_quantile(hb.get(k).map_or(&[], Vec::as_slice), now, 0.99));
            vec![
                format!("{}/{}", k[0], k[1]),
                r(&ok_b, &ok_n, k),
                r(&err_b, &err_n, k),
                r(&dl_b, &dl_n, k),
                format!("{}", depth.get(k).copied().unwrap_or(0.0)),
                p99.map(fmt_seconds).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &["SUBSCRIPTION", "OK/S", "ERR/S", "DEAD/S", "MAILBOX", "P99"],
        &rows,
    ));
    out.push('\n');
    out
}

async fn get(src: &Source, url: &str) -> Result<String, String> {
    let mut req = src.client.get(url);
    if let Some(t) = &src.token {
        req = req.insert_header(("authorization", format!("Bearer {t}")));
    }
    let mut res = req.send().await.map_err(|e| format!("cannot reach {url}: {e}"))?;
    let body = res
        .body()
        .limit(16 << 20)
        .await
        .map_err(|e| format!("reading {url}: {e}"))?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if !res.status().is_success() {
        return Err(format!("{url} answered {}: {}", res.status(), text.trim()));
    }
    Ok(text)
}

/// One round: the cluster view from the named node, then every member's `/metrics`.
async fn sample(src: &Source) -> Result<Sample, String> {
    let base = src.url.trim_end_matches('/');
    let text = get(src, &format!("{base}/v1/cluster")).await?;
    let cluster: Value =
        serde_json::from_str(&text).map_err(|e| format!("{base}/v1/cluster is not the cluster view: {e}"))?;
    let scheme = if base.starts_with("https://") { "https" } else { "http" };
    let mut metrics = BTreeMap::new();
    for m in cluster["members"].as_array().into_iter().flatten() {
        let (Some(id), Some(http)) = (m["id"].as_u64(), m["http"].as_str()) else {
            continue;
        };
        let url = if http.contains("://") {
            format!("{}/metrics", http.trim_end_matches('/'))
        } else {
            format!("{scheme}://{http}/metrics")
        };
        metrics.insert(id, get(src, &url).await.ok().map(|t| parse_exposition(&t)));
    }
    Ok(Sample {
        cluster,
        metrics,
        at: Some(Instant::now()),
    })
}

/// Draws a frame every `interval` until interrupted, or `frames` frames. On a terminal each frame
/// replaces the last; otherwise frames follow each other, separated by a blank line.
pub(crate) async fn run(src: Source, interval: Duration, frames: Option<u64>) -> Result<(), String> {
    let tty = std::io::stdout().is_terminal();
    let mut before = sample(&src).await?;
    let mut drawn = 0u64;
    loop {
        actix_rt::time::sleep(interval).await;
        let now = match sample(&src).await {
            Ok(s) => s,
            // A node that stops answering mid-run (killed, restarting) is what `top` is for
            // watching: say so in place and keep trying.
            Err(e) if frames.is_none() => {
                let mut out = std::io::stdout().lock();
                let _ = write!(
                    out,
                    "{}{e}\n(retrying every {interval:?})\n",
                    if tty { "\x1b[H\x1b[2J" } else { "" }
                );
                let _ = out.flush();
                continue;
            }
            Err(e) => return Err(e),
        };
        let text = frame(&before, &now);
        {
            let mut out = std::io::stdout().lock();
            let _ = if tty {
                write!(out, "\x1b[H\x1b[2J{text}")
            } else {
                writeln!(out, "{text}")
            };
            let _ = out.flush();
        }
        before = now;
        drawn += 1;
        if frames.is_some_and(|f| drawn >= f) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(at: Instant, texts: &[(u64, Option<&str>)]) -> Sample {
        Sample {
            cluster: json!({
                "cluster_id": "demo", "leader": 1, "term": 4, "epoch": 9, "problems": [],
                "members": [
                    { "id": 1, "status": "up", "phi": 0.0, "voter": true, "http": "127.0.0.1:7070" },
                    { "id": 2, "status": "suspect", "phi": 9.5, "voter": false, "http": "127.0.0.1:7071" },
                ]
            }),
            metrics: texts.iter().map(|(id, t)| (*id, t.map(parse_exposition))).collect(),
            at: Some(at),
        }
    }

    #[test]
    fn a_frame_shows_members_roles_rates_and_the_p99_of_the_interval() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let before = sample(
            t0,
            &[
                (
                    1,
                    Some(
                        "herald_events_published_total{topic=\"orders\"} 100\n\
                         herald_events_delivered_total{topic=\"orders\",group=\"audit\",outcome=\"ok\"} 50\n\
                         herald_handler_duration_seconds_bucket{topic=\"orders\",group=\"audit\",le=\"0.01\"} 50\n\
                         herald_handler_duration_seconds_bucket{topic=\"orders\",group=\"audit\",le=\"1\"} 50\n\
                         herald_handler_duration_seconds_bucket{topic=\"orders\",group=\"audit\",le=\"+Inf\"} 50\n",
                    ),
                ),
                (2, None),
            ],
        );
        let now = sample(
            t1,
            &[
                (
                    1,
                    Some(
                        "herald_events_published_total{topic=\"orders\"} 300\n\
                         herald_events_delivered_total{topic=\"orders\",group=\"audit\",outcome=\"ok\"} 150\n\
                         herald_handler_duration_seconds_bucket{topic=\"orders\",group=\"audit\",le=\"0.01\"} 51\n\
                         herald_handler_duration_seconds_bucket{topic=\"orders\",group=\"audit\",le=\"1\"} 150\n\
                         herald_handler_duration_seconds_bucket{topic=\"orders\",group=\"audit\",le=\"+Inf\"} 150\n\
                         herald_wal_events 7\n",
                    ),
                ),
                (2, None),
            ],
        );
        let f = frame(&before, &now);
        assert!(f.contains("cluster demo  leader 1  term 4  epoch 9  members 2"), "{f}");
        let node1 = f.lines().find(|l| l.starts_with("1 ")).expect("row of node 1");
        let cells: Vec<&str> = node1.split_whitespace().collect();
        // NODE STATUS ROLE PHI PUB/S FWD/S INFLIGHT WAL HTTP
        assert_eq!(
            cells[..8],
            ["1", "up", "leader", "0.00", "100.0", "0.0", "0", "7"],
            "{f}"
        );
        let node2 = f.lines().find(|l| l.starts_with("2 ")).expect("row of node 2");
        assert!(
            node2.contains("suspect") && node2.contains("learner") && node2.contains("(no answer)"),
            "{f}"
        );
        let topic = f.lines().find(|l| l.starts_with("orders ")).expect("topic row");
        assert_eq!(
            topic.split_whitespace().collect::<Vec<_>>(),
            ["orders", "100.0", "300"],
            "{f}"
        );
        // 100 calls in the interval, 1 under 10 ms and 99 between 10 ms and 1 s: p99 is 1 s.
        let sub = f
            .lines()
            .find(|l| l.starts_with("orders/audit"))
            .expect("subscription row");
        assert_eq!(
            sub.split_whitespace().collect::<Vec<_>>(),
            ["orders/audit", "50.0", "0.0", "0.0", "0", "1.0s"],
            "{f}"
        );
    }
}
