//! The dashboard's short history: every second, the node reads its own metrics (the same
//! exposition `/metrics` serves) and keeps, for the last [`KEEP`] samples, the counters the charts
//! need: events published per topic, and per subscription the handler outcomes and the handler
//! duration histogram. `GET /v1/stats/series` turns consecutive samples into per-second rates and
//! a p99 per interval.
//!
//! Bounded: [`KEEP`] samples of at most one entry per topic series and per subscription the node
//! exports (topics without subscriptions already share one `(other)` series, see
//! [`crate::metrics::OTHER_TOPIC`]). Nothing here is on the event path: the sampler runs on the
//! HTTP runtime and only renders the exposition the recorder already holds.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use utoipa::ToSchema;

use crate::control::NodeCore;
use crate::metrics::{self, parse_exposition_of};

/// Samples kept: 10 minutes at one per second.
pub(crate) const KEEP: usize = 600;
/// Time between samples.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// One subscription's counters at one sample.
#[derive(Debug, Clone, Default, PartialEq)]
struct SubPoint {
    ok: f64,
    error: f64,
    dead: f64,
    /// Cumulative handler-duration buckets `(le, count)`, ascending `le` (`+Inf` last).
    buckets: Vec<(f64, f64)>,
}

/// The counters of one sample.
#[derive(Debug, Clone, Default, PartialEq)]
struct Point {
    /// Unix milliseconds.
    at_ms: u64,
    published: BTreeMap<String, f64>,
    subs: BTreeMap<String, SubPoint>,
}

/// The last [`KEEP`] samples.
#[derive(Debug, Default)]
pub(crate) struct History {
    points: Mutex<VecDeque<Point>>,
}

/// Per-second rates over the kept history, oldest first (one entry per interval between two
/// samples).
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub(crate) struct SeriesView {
    /// Seconds between samples.
    pub interval_seconds: f64,
    /// The end of each interval, Unix milliseconds.
    pub t: Vec<u64>,
    /// Per topic: events accepted by this node per second.
    pub topics: BTreeMap<String, TopicSeries>,
    /// Per subscription (`topic/group`): handler outcomes per second on this node and the p99
    /// handler duration of each interval (`null` when no call ended in it).
    pub subscriptions: BTreeMap<String, SubscriptionSeries>,
}

/// One topic's rates.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Default)]
pub(crate) struct TopicSeries {
    /// Events published per second.
    pub published: Vec<f64>,
}

/// One subscription's rates.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Default)]
pub(crate) struct SubscriptionSeries {
    /// Handler calls that succeeded, per second.
    pub delivered: Vec<f64>,
    /// Handler calls that failed (to be retried), per second.
    pub errors: Vec<f64>,
    /// Events dead-lettered, per second.
    pub dead_letters: Vec<f64>,
    /// The p99 handler duration of each interval, in milliseconds (the upper bound of its
    /// histogram bucket).
    pub p99_ms: Vec<Option<f64>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The counters the charts use, read from an exposition.
fn point(text: &str, at_ms: u64) -> Point {
    let durations = format!("{}_bucket", metrics::HANDLER_DURATION);
    let m = parse_exposition_of(text, |name| {
        name == metrics::EVENTS_PUBLISHED || name == metrics::EVENTS_DELIVERED || name == durations
    });
    let published = metrics::sum_by(&m, metrics::EVENTS_PUBLISHED, &["topic"], &[]);
    let delivered = metrics::sum_by(&m, metrics::EVENTS_DELIVERED, &["topic", "group", "outcome"], &[]);
    let buckets = metrics::buckets(&metrics::sum_by(&m, &durations, &["topic", "group", "le"], &[]));
    let sub = |k: &[String]| format!("{}/{}", k[0], k[1]);
    let mut p = Point {
        at_ms,
        published: published.into_iter().map(|(k, v)| (k[0].clone(), v)).collect(),
        subs: BTreeMap::new(),
    };
    for (k, v) in delivered {
        let s = p.subs.entry(sub(&k)).or_default();
        match k[2].as_str() {
            "ok" => s.ok += v,
            "error" => s.error += v,
            "dead_lettered" => s.dead += v,
            _ => {}
        }
    }
    for (k, b) in buckets {
        p.subs.entry(sub(&k)).or_default().buckets = b;
    }
    p
}

/// Per second from `a` to `b`, to the hundredth (see [`metrics::counter_rate`]).
fn per_second(a: f64, b: f64, secs: f64) -> f64 {
    (metrics::counter_rate(a, b, secs) * 100.0).round() / 100.0
}

/// The p99 of the calls that ended between two cumulative histograms, in milliseconds (`None`
/// also when it lies above the largest bound).
fn p99_ms(a: &[(f64, f64)], b: &[(f64, f64)]) -> Option<f64> {
    metrics::interval_quantile(a, b, 0.99)
        .filter(|le| le.is_finite())
        .map(|le| le * 1000.0)
}

impl History {
    /// Adds a sample read from `text` (the node's exposition), dropping the oldest beyond [`KEEP`].
    fn record(&self, text: &str, at_ms: u64) {
        let p = point(text, at_ms);
        let mut points = self.points.lock().unwrap_or_else(|e| e.into_inner());
        if points.len() == KEEP {
            points.pop_front();
        }
        points.push_back(p);
    }

    /// The rates over the last `seconds` (all kept samples when larger).
    pub(crate) fn view(&self, seconds: usize) -> SeriesView {
        let points = self.points.lock().unwrap_or_else(|e| e.into_inner());
        let skip = points.len().saturating_sub(seconds.saturating_add(1));
        let window: Vec<&Point> = points.iter().skip(skip).collect();
        let mut view = SeriesView {
            interval_seconds: EVERY.as_secs_f64(),
            t: Vec::new(),
            topics: BTreeMap::new(),
            subscriptions: BTreeMap::new(),
        };
        let intervals = window.len().saturating_sub(1);
        // Every name seen in the window gets a full-length series (0 where it did not exist yet).
        for p in &window {
            for topic in p.published.keys() {
                view.topics.entry(topic.clone()).or_default();
            }
            for key in p.subs.keys() {
                view.subscriptions.entry(key.clone()).or_default();
            }
        }
        for pair in window.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let secs = b.at_ms.saturating_sub(a.at_ms) as f64 / 1000.0;
            view.t.push(b.at_ms);
            for (topic, series) in view.topics.iter_mut() {
                // A series missing from a sample had not counted anything yet: 0.
                let x = a.published.get(topic).copied().unwrap_or(0.0);
                let y = b.published.get(topic).copied().unwrap_or(0.0);
                series.published.push(per_second(x, y, secs));
            }
            let empty = SubPoint::default();
            for (key, series) in view.subscriptions.iter_mut() {
                let y = b.subs.get(key).unwrap_or(&empty);
                let x = a.subs.get(key).unwrap_or(&empty);
                series.delivered.push(per_second(x.ok, y.ok, secs));
                series.errors.push(per_second(x.error, y.error, secs));
                series.dead_letters.push(per_second(x.dead, y.dead, secs));
                series.p99_ms.push(p99_ms(&x.buckets, &y.buckets));
            }
        }
        debug_assert!(view.t.len() == intervals);
        view
    }
}

/// Samples the node's metrics every [`EVERY`] into `history` while the node exists (a node
/// without a metrics recorder keeps an empty history).
pub(crate) async fn sample(core: Weak<NodeCore>, history: std::sync::Arc<History>) {
    let mut tick = actix_rt::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(core) = core.upgrade() else { return };
        let Some(text) = core.render_metrics() else { return };
        drop(core);
        history.record(&text, now_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(published: f64, ok: f64, err: f64, fast: f64, slow: f64) -> String {
        format!(
            "herald_events_published_total{{topic=\"orders\"}} {published}\n\
             herald_events_delivered_total{{topic=\"orders\",group=\"audit\",outcome=\"ok\"}} {ok}\n\
             herald_events_delivered_total{{topic=\"orders\",group=\"audit\",outcome=\"error\"}} {err}\n\
             herald_handler_duration_seconds_bucket{{topic=\"orders\",group=\"audit\",le=\"0.005\"}} {fast}\n\
             herald_handler_duration_seconds_bucket{{topic=\"orders\",group=\"audit\",le=\"0.5\"}} {}\n\
             herald_handler_duration_seconds_bucket{{topic=\"orders\",group=\"audit\",le=\"+Inf\"}} {}\n",
            fast + slow,
            fast + slow
        )
    }

    #[test]
    fn rates_and_the_p99_of_each_interval_come_from_consecutive_samples() {
        let h = History::default();
        h.record(&exposition(0.0, 0.0, 0.0, 0.0, 0.0), 1_000);
        h.record(&exposition(10.0, 10.0, 2.0, 10.0, 0.0), 2_000);
        h.record(&exposition(30.0, 20.0, 2.0, 10.0, 10.0), 4_000);
        // A restart resets the counters: no negative rate.
        h.record(&exposition(5.0, 5.0, 0.0, 5.0, 0.0), 5_000);
        let v = h.view(600);
        assert_eq!(v.t, [2_000, 4_000, 5_000]);
        assert_eq!(v.topics["orders"].published, [10.0, 10.0, 0.0]);
        let s = &v.subscriptions["orders/audit"];
        assert_eq!(s.delivered, [10.0, 5.0, 0.0]);
        assert_eq!(s.errors, [2.0, 0.0, 0.0]);
        assert_eq!(s.dead_letters, [0.0, 0.0, 0.0]);
        assert_eq!(s.p99_ms, [Some(5.0), Some(500.0), None]);
        // A topic first seen in a later sample counted from 0 (its series starts with the first event).
        h.record("herald_events_published_total{topic=\"new\"} 4\n", 6_000);
        assert_eq!(h.view(1).topics["new"].published, [4.0]);
        // The last two seconds only.
        assert_eq!(h.view(2).t, [5_000, 6_000]);
    }

    #[test]
    fn the_history_keeps_ten_minutes() {
        let h = History::default();
        for i in 0..(KEEP as u64 + 50) {
            h.record(&exposition(i as f64, 0.0, 0.0, 0.0, 0.0), i * 1000);
        }
        let v = h.view(usize::MAX);
        assert_eq!(v.t.len(), KEEP - 1);
        assert!(v.topics["orders"].published.iter().all(|r| *r == 1.0));
    }
}
