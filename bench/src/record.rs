//! The figures a scenario writes with `--json PATH`, for `herald-bench report` to gather.
//!
//! One document per scenario run: `{"meta": {...}, "rows": [row, ...]}`. A row is one case and
//! metric of one scenario, with every run's figure (or every sample, for the timing scenarios) of
//! Herald and, when the scenario measures one, of its peer in the same run:
//!
//! ```json
//! {"scenario": "nats", "herald_mode": "ack=none", "peer": "nats", "case": "16 B",
//!  "metric": "events_per_second", "better": "higher",
//!  "herald": {"runs": [..], "median": .., "min": .., "max": ..},
//!  "peer_figures": {"runs": [..], ...}, "ratio": ..}
//! ```
//!
//! Metrics: `events_per_second`, `p50_ms`/`p99_ms`/`p999_ms` (one figure per run), and
//! `samples_ms` (each value is one timed occurrence, e.g. one failover round; the report takes
//! their percentiles).

use std::path::Path;

use serde_json::{json, Value};

use super::compare::summarize;

/// Every run's figure (non-finite ones as `null`), and their median, min and max.
pub(super) fn side(values: &[f64]) -> Value {
    let s = summarize(values);
    json!({
        "runs": values.iter().map(|x| if x.is_finite() { json!(x) } else { Value::Null }).collect::<Vec<_>>(),
        "median": s.map(|s| s.median),
        "min": s.map(|s| s.min),
        "max": s.map(|s| s.max),
    })
}

/// A row of one case and metric; `peer` is the peer's name and figures, when measured.
pub(super) fn row(
    scenario: &str,
    herald_mode: &str,
    case: &str,
    metric: &str,
    higher_is_better: bool,
    herald: &[f64],
    peer: Option<(&str, &[f64])>,
) -> Value {
    let ratio = peer.and_then(|(_, p)| {
        let (h, p) = (summarize(herald)?, summarize(p)?);
        (p.median != 0.0).then(|| h.median / p.median)
    });
    json!({
        "scenario": scenario,
        "herald_mode": herald_mode,
        "peer": peer.map(|(name, _)| name),
        "case": case,
        "metric": metric,
        "better": if higher_is_better { "higher" } else { "lower" },
        "herald": side(herald),
        "peer_figures": peer.map(|(_, p)| side(p)),
        "ratio": ratio,
    })
}

/// Writes `{"meta": meta, "rows": rows}` to `path` and says so.
pub(super) fn write(path: &Path, meta: Value, rows: Vec<Value>) -> Result<(), String> {
    let doc = json!({ "meta": meta, "rows": rows });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_carry_runs_summaries_and_the_ratio() {
        let r = row(
            "local",
            "ack=none",
            "1 event per call",
            "events_per_second",
            true,
            &[1.0, 3.0, 2.0],
            Some(("raw actix", &[4.0, 4.0, f64::NAN])),
        );
        assert_eq!(r["herald"]["median"], 2.0);
        assert_eq!(r["peer_figures"]["runs"][2], Value::Null);
        assert_eq!(r["ratio"], 0.5);
        assert_eq!(r["better"], "higher");
        let alone = row("cluster", "ack=accepted", "failover", "samples_ms", false, &[5.0], None);
        assert_eq!(alone["peer"], Value::Null);
        assert_eq!(alone["ratio"], Value::Null);
    }
}
