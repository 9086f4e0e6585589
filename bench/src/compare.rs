//! Herald next to a peer system, measured in the same run: per payload size (and case, e.g. an
//! ack mode and a concurrency) and metric, the figures of every run of both systems, their
//! medians and ranges, and the ratio Herald/peer.
//!
//! Pure (no I/O): the scenarios collect [`Row`]s, this module prints the table and the JSON
//! that `--json PATH` writes (one object per row, for a later report to gather).

use serde::Serialize;
use serde_json::{json, Value};

/// What a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Metric {
    /// Events/s at the maximum rate: received by the subscriber side (`nats`, `jetstream`), or
    /// accepted by the server (`http`: one event per request).
    EventsPerSecond,
    /// Latency percentiles at a paced rate, in ms: publish → receive (`nats`, `jetstream`), or
    /// intended send → response of a request (`http`).
    P50Ms,
    P99Ms,
    P999Ms,
}

impl Metric {
    /// The metric of a JSON row's `metric` name; other names (e.g. `samples_ms`) read as a
    /// latency in ms, which formats alike.
    pub(super) fn from_name(name: &str) -> Metric {
        match name {
            "events_per_second" => Metric::EventsPerSecond,
            "p99_ms" => Metric::P99Ms,
            "p999_ms" => Metric::P999Ms,
            _ => Metric::P50Ms,
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Metric::EventsPerSecond => "events/s",
            Metric::P50Ms => "p50 ms",
            Metric::P99Ms => "p99 ms",
            Metric::P999Ms => "p99.9 ms",
        }
    }

    /// Whether a larger figure is better (throughput) or worse (latency).
    pub(super) fn higher_is_better(self) -> bool {
        matches!(self, Metric::EventsPerSecond)
    }
}

/// Median, minimum and maximum of the finite values (`None` when there is none).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(super) struct Summary {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) n: usize,
}

pub(super) fn summarize(values: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// One payload size, case and metric: the per-run figures of Herald and of the peer, in run
/// order (run i of both systems ran back to back).
#[derive(Clone, Debug)]
pub(super) struct Row {
    pub(super) payload_bytes: usize,
    /// What else tells this row from the others of the same payload and metric (`ack=none,
    /// c=16`); printed in a CASE column when any row has one.
    pub(super) label: Option<String>,
    pub(super) metric: Metric,
    pub(super) herald: Vec<f64>,
    pub(super) peer: Vec<f64>,
    /// Herald with plaintext peers (`--insecure-peers`), measured in the same runs when asked
    /// (`--herald-peers both`; `herald` is then Herald with mTLS); empty otherwise.
    pub(super) plain: Vec<f64>,
}

/// The ratio of the medians of `a` and `b` (`None` when either has no figure, or `b`'s is 0).
pub(super) fn median_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    let (a, b) = (summarize(a)?, summarize(b)?);
    (b.median != 0.0).then(|| a.median / b.median)
}

impl Row {
    /// Herald's median / the peer's median.
    pub(super) fn ratio(&self) -> Option<f64> {
        median_ratio(&self.herald, &self.peer)
    }

    /// Herald's median (mTLS) / the median of Herald with plaintext peers: what mTLS keeps.
    pub(super) fn tls_ratio(&self) -> Option<f64> {
        median_ratio(&self.herald, &self.plain)
    }

    /// Min and max of the per-run ratios herald[i] / peer[i] (the runs of a pair ran back to
    /// back, so a slow moment of the machine hits both).
    pub(super) fn paired_ratios(&self) -> Option<(f64, f64)> {
        let r: Vec<f64> = self
            .herald
            .iter()
            .zip(&self.peer)
            .filter(|(_, p)| **p != 0.0)
            .map(|(h, p)| h / p)
            .collect();
        let s = summarize(&r)?;
        Some((s.min, s.max))
    }
}

/// `1234567` → `1.23M`, `224160` → `224.2k`, `2.5` → `2.50`.
pub(super) fn fmt_value(metric: Metric, v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    match metric {
        Metric::EventsPerSecond if v >= 1e6 => format!("{:.2}M", v / 1e6),
        Metric::EventsPerSecond if v >= 1e3 => format!("{:.1}k", v / 1e3),
        Metric::EventsPerSecond => format!("{v:.0}"),
        _ if v >= 100.0 => format!("{v:.0}"),
        _ if v >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

/// `median (min<dash>max)`, or the one figure.
pub(super) fn fmt_summary_with(metric: Metric, values: &[f64], dash: &str) -> String {
    match summarize(values) {
        None => "-".into(),
        Some(s) if s.n == 1 => fmt_value(metric, s.median),
        Some(s) => format!(
            "{} ({}{dash}{})",
            fmt_value(metric, s.median),
            fmt_value(metric, s.min),
            fmt_value(metric, s.max)
        ),
    }
}

fn fmt_summary(metric: Metric, values: &[f64]) -> String {
    fmt_summary_with(metric, values, "-")
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

/// `16 B`, `128 B`, `1 KiB`.
pub(super) fn fmt_size(bytes: usize) -> String {
    if bytes >= 1024 && bytes % 1024 == 0 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

/// The table: payload, case (when any row has a label), metric, Herald's and the peer's
/// median (min-max), the ratio of the medians and the range of the per-run ratios.
pub(super) fn table(peer: &str, rows: &[Row]) -> String {
    let cases = rows.iter().any(|r| r.label.is_some());
    let plain = rows.iter().any(|r| !r.plain.is_empty());
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![fmt_size(r.payload_bytes)];
            if cases {
                cells.push(r.label.clone().unwrap_or_default());
            }
            cells.extend([r.metric.label().to_string(), fmt_summary(r.metric, &r.herald)]);
            if plain {
                cells.push(fmt_summary(r.metric, &r.plain));
            }
            cells.extend([
                fmt_summary(r.metric, &r.peer),
                fmt_ratio(r.ratio()),
                r.paired_ratios()
                    .map_or("-".into(), |(lo, hi)| format!("{lo:.2}-{hi:.2}")),
            ]);
            if plain {
                cells.push(fmt_ratio(r.tls_ratio()));
            }
            cells.push(if r.metric.higher_is_better() { "higher" } else { "lower" }.to_string());
            cells
        })
        .collect();
    let herald = if plain {
        "HERALD MTLS median (min-max)"
    } else {
        "HERALD median (min-max)"
    };
    let peer_h = format!("{} median (min-max)", peer.to_uppercase());
    let ratio = format!("HERALD/{}", peer.to_uppercase());
    let mut header = vec!["PAYLOAD"];
    if cases {
        header.push("CASE");
    }
    header.extend(["METRIC", herald]);
    if plain {
        header.push("HERALD PLAINTEXT median (min-max)");
    }
    header.extend([peer_h.as_str(), &ratio, "PER-RUN RATIOS"]);
    if plain {
        header.push("MTLS/PLAINTEXT");
    }
    header.push("BETTER");
    herald::cli::table(&header, &body)
}

/// One JSON object per row, in the shape of [`super::record`] (`case` is the label and the payload
/// size) plus `payload_bytes`, `label`, `paired_ratio_min` and `paired_ratio_max`, and `meta`.
pub(super) fn json_rows(scenario: &str, herald_mode: &str, peer: &str, meta: &Value, rows: &[Row]) -> Value {
    let side = super::record::side;
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let pr = r.paired_ratios();
            json!({
                "scenario": scenario,
                "herald_mode": herald_mode,
                "peer": peer,
                "payload_bytes": r.payload_bytes,
                "label": r.label,
                "case": match &r.label {
                    Some(l) => format!("{l}, {}", fmt_size(r.payload_bytes)),
                    None => fmt_size(r.payload_bytes),
                },
                "metric": r.metric,
                "better": if r.metric.higher_is_better() { "higher" } else { "lower" },
                "herald": side(&r.herald),
                "peer_figures": side(&r.peer),
                "ratio": r.ratio(),
                "paired_ratio_min": pr.map(|p| p.0),
                "paired_ratio_max": pr.map(|p| p.1),
                "herald_plaintext": (!r.plain.is_empty()).then(|| side(&r.plain)),
                "ratio_vs_plaintext": r.tls_ratio(),
            })
        })
        .collect();
    json!({ "meta": meta, "rows": rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_skip_nan_and_take_the_middle() {
        let s = summarize(&[3.0, f64::NAN, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.5);
        assert!(summarize(&[f64::NAN]).is_none());
    }

    #[test]
    fn ratios_are_of_medians_and_per_run() {
        let r = Row {
            payload_bytes: 128,
            label: None,
            metric: Metric::EventsPerSecond,
            herald: vec![100.0, 300.0, 200.0],
            peer: vec![400.0, 400.0, 100.0],
            plain: vec![],
        };
        assert_eq!(r.ratio(), Some(0.5));
        assert_eq!(r.paired_ratios(), Some((0.25, 2.0)));
        let none = Row {
            peer: vec![],
            ..r.clone()
        };
        assert_eq!(none.ratio(), None);
    }

    #[test]
    fn values_and_sizes_format_compactly() {
        assert_eq!(fmt_value(Metric::EventsPerSecond, 1_234_567.0), "1.23M");
        assert_eq!(fmt_value(Metric::EventsPerSecond, 224_160.0), "224.2k");
        assert_eq!(fmt_value(Metric::EventsPerSecond, 950.0), "950");
        assert_eq!(fmt_value(Metric::P99Ms, 2.345), "2.35");
        assert_eq!(fmt_value(Metric::P999Ms, 12.34), "12.3");
        assert_eq!(fmt_value(Metric::P50Ms, f64::NAN), "-");
        assert_eq!(fmt_size(16), "16 B");
        assert_eq!(fmt_size(1024), "1 KiB");
    }

    #[test]
    fn the_table_and_json_carry_every_row() {
        let rows = vec![
            Row {
                payload_bytes: 16,
                label: None,
                metric: Metric::EventsPerSecond,
                herald: vec![200_000.0, 220_000.0],
                peer: vec![1_000_000.0, 1_100_000.0],
                plain: vec![],
            },
            Row {
                payload_bytes: 16,
                label: None,
                metric: Metric::P99Ms,
                herald: vec![3.0],
                peer: vec![1.5],
                plain: vec![],
            },
        ];
        let t = table("nats", &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("HERALD/NATS"));
        assert!(lines[1].contains("210.0k (200.0k-220.0k)"), "{t}");
        assert!(lines[1].contains("0.20x"), "{t}");
        assert!(lines[2].contains("2.00x") && lines[2].contains("lower"), "{t}");
        let j = json_rows("nats", "ack=none", "nats", &json!({"runs": 2}), &rows);
        assert_eq!(j["rows"].as_array().unwrap().len(), 2);
        assert_eq!(j["rows"][0]["metric"], "events_per_second");
        assert_eq!(j["rows"][0]["herald"]["runs"][1], 220_000.0);
        assert_eq!(j["rows"][1]["ratio"], 2.0);
        assert_eq!(j["meta"]["runs"], 2);
        assert!(j["rows"][0]["label"].is_null());
        assert!(!lines[0].contains("CASE"));
    }

    #[test]
    fn plaintext_figures_add_columns_and_the_mtls_ratio() {
        let rows = vec![Row {
            payload_bytes: 16,
            label: None,
            metric: Metric::EventsPerSecond,
            herald: vec![90.0, 80.0, 100.0],
            peer: vec![100.0],
            plain: vec![100.0, 110.0, 90.0],
        }];
        assert_eq!(rows[0].tls_ratio(), Some(0.9));
        assert_eq!(rows[0].ratio(), Some(0.9));
        let t = table("nats", &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("HERALD MTLS")
                && lines[0].contains("HERALD PLAINTEXT")
                && lines[0].contains("MTLS/PLAINTEXT"),
            "{t}"
        );
        assert!(
            lines[1].contains("100 (90-110)") && lines[1].matches("0.90x").count() == 2,
            "{t}"
        );
        let j = json_rows("nats", "ack=none", "nats", &json!({}), &rows);
        assert_eq!(j["rows"][0]["herald_plaintext"]["median"], 100.0);
        assert_eq!(j["rows"][0]["ratio_vs_plaintext"], 0.9);
        assert_eq!(median_ratio(&[1.0], &[]), None);
        assert_eq!(median_ratio(&[1.0], &[0.0]), None);
    }

    #[test]
    fn labelled_rows_get_a_case_column() {
        let rows = vec![Row {
            payload_bytes: 128,
            label: Some("ack=none, c=16".into()),
            metric: Metric::EventsPerSecond,
            herald: vec![30_000.0],
            peer: vec![40_000.0],
            plain: vec![],
        }];
        let t = table("bare-http", &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("PAYLOAD  CASE") && lines[0].contains("HERALD/BARE-HTTP"),
            "{t}"
        );
        assert!(lines[1].contains("ack=none, c=16") && lines[1].contains("0.75x"), "{t}");
        let j = json_rows("http", "ack=none", "bare-http", &json!({}), &rows);
        assert_eq!(j["rows"][0]["label"], "ack=none, c=16");
    }
}
