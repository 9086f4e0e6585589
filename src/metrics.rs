//! Metric names (a public contract: the README's "Metrics" section lists them), their descriptions, and per-subscription handles.
//!
//! The library only emits through the `metrics` facade; the binary installs the Prometheus
//! recorder with [`install_prometheus`]. Hot paths hold pre-registered handles (`SubMetrics`)
//! instead of looking a metric up by name and labels for every event.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::types::SubscriptionKey;

/// Events accepted by this node, by topic; topics without subscriptions share `topic="(other)"`.
pub const EVENTS_PUBLISHED: &str = "herald_events_published_total";
/// Handler attempts by topic, group and outcome (`ok`, `error`, `dead_lettered`).
pub const EVENTS_DELIVERED: &str = "herald_events_delivered_total";
/// Deliveries repeated: retries after a failure and WAL replays after a restart.
pub const EVENTS_REDELIVERED: &str = "herald_events_redelivered_total";
/// Events stored as dead letters, by topic and group.
pub const DEAD_LETTERS: &str = "herald_dead_letters_total";
/// Handler call duration, by topic and group.
pub const HANDLER_DURATION: &str = "herald_handler_duration_seconds";
/// Handler instance restarts after an error, panic or timeout.
pub const HANDLER_RESTARTS: &str = "herald_handler_restarts_total";
/// Events waiting in the mailboxes of a subscription's instances.
pub const MAILBOX_DEPTH: &str = "herald_mailbox_depth";
/// Events accepted and not yet finished by every subscription.
pub const INFLIGHT_EVENTS: &str = "herald_inflight_events";
/// Events in the write-ahead log.
pub const WAL_EVENTS: &str = "herald_wal_events";
/// The Raft term this node is in.
pub const RAFT_TERM: &str = "herald_raft_term";
/// 1 on the Raft leader, 0 elsewhere.
pub const RAFT_IS_LEADER: &str = "herald_raft_is_leader";
/// The highest committed Raft index this node knows.
pub const RAFT_COMMIT_INDEX: &str = "herald_raft_commit_index";
/// Cluster members by status.
pub const CLUSTER_MEMBERS: &str = "herald_cluster_members";
/// The placement epoch this node holds.
pub const PLACEMENT_EPOCH: &str = "herald_placement_epoch";
/// HTTP requests by route pattern and status code.
pub const HTTP_REQUESTS: &str = "herald_http_requests_total";
/// WAL group commits.
pub const WAL_COMMITS: &str = "herald_wal_commits_total";
/// Durable WAL commits: every group commit with `wal.fsync = "always"`, each flush with `interval`.
pub const WAL_FLUSHES: &str = "herald_wal_flushes_total";
/// Dead letters deleted by retention, by `reason` (`age`, `count`).
pub const DEAD_LETTERS_EXPIRED: &str = "herald_dead_letters_expired_total";
/// Compactions of the store file after many records were removed.
pub const STORE_COMPACTIONS: &str = "herald_store_compactions_total";
/// Undecodable WAL records moved aside to the quarantine table.
pub const WAL_QUARANTINED: &str = "herald_wal_quarantined_total";
/// 1 while the store refuses writes (disk full or failing), 0 when healthy.
pub const STORAGE_UNHEALTHY: &str = "herald_storage_unhealthy";
/// Publishes refused because mailboxes or the in-flight byte budget were full.
pub const EVENTS_REJECTED: &str = "herald_events_rejected_total";
/// The phi of this node's failure detector for each peer.
pub const PEER_PHI: &str = "herald_peer_phi";
/// The last ping round-trip time to each peer.
pub const PEER_RTT: &str = "herald_peer_rtt_seconds";
/// Ping round-trip times to each peer (control-plane latency, over the peer bus's control channel).
pub const PEER_PING_RTT: &str = "herald_peer_ping_rtt_seconds";
/// Events handed to other nodes, by peer (first sends and re-sends).
pub const EVENTS_FORWARDED: &str = "herald_events_forwarded_total";
/// Forwarded deliveries waiting for their handler node's ack.
pub const FORWARD_PENDING: &str = "herald_forward_pending";
/// Deliveries (published here or forwarded) this node, hosting their instance, did not run again
/// because their `(subscription, event id)` was in its dedup window.
pub const EVENTS_DEDUPLICATED: &str = "herald_events_deduplicated_total";
/// Events accepted for a topic without any subscription (delivered nowhere), by topic: the first
/// [`UNROUTED_TOPICS`] topics seen get their own series, later ones share `topic="(other)"`.
pub const EVENTS_UNROUTED: &str = "herald_events_unrouted_total";
/// At most this many topics get their own `herald_events_unrouted_total` series.
pub const UNROUTED_TOPICS: usize = 100;

/// Peer messages dropped because the authenticated sender may not send them, by `kind` (raft,
/// proposal, proposal_result, ack, credit, not_placed) and `reason`.
pub const PEER_MESSAGES_REFUSED: &str = "herald_peer_messages_refused_total";

/// Finished spans the trace exporter dropped because its bounded queue was full (export never
/// waits on the event path; see `telemetry`).
pub const TRACE_SPANS_DROPPED: &str = "herald_trace_spans_dropped_total";

/// The `topic` label of [`EVENTS_PUBLISHED`] for events of topics without subscriptions: they
/// share this one series (no topic name contains parentheses), so the number of series is bounded
/// by the subscriptions, not by the topics publishers make up.
pub const OTHER_TOPIC: &str = "(other)";

/// One metric's series in a parsed exposition: each with its labels and value.
pub type Series = Vec<(BTreeMap<String, String>, f64)>;

/// Parses a Prometheus text exposition into name → series; lines it cannot read are skipped
/// (the input may come from the network: `herald top` reads other nodes' `/metrics`).
pub fn parse_exposition(text: &str) -> BTreeMap<String, Series> {
    parse_exposition_of(text, |_| true)
}

/// [`parse_exposition`] of the metrics whose name `wanted` accepts: the other lines are skipped
/// before anything is read or allocated for them (the dashboard's sampler wants three metrics of
/// a node's whole exposition, every second).
pub fn parse_exposition_of(text: &str, wanted: impl Fn(&str) -> bool) -> BTreeMap<String, Series> {
    let mut out: BTreeMap<String, Series> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if !wanted(&line[..name_end]) {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (head, BTreeMap::new()),
        };
        out.entry(name.to_string()).or_default().push((labels, value));
    }
    out
}

/// `a="x",b="y"` → {a: x, b: y} (values with `\"`, `\\` and `\n` escapes).
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels
}

/// The sum of `name`'s series in a parsed exposition whose labels include every pair of `with`,
/// grouped by the values of the labels `by` (a missing label counts as `""`).
pub fn sum_by(
    m: &BTreeMap<String, Series>,
    name: &str,
    by: &[&str],
    with: &[(&str, &str)],
) -> BTreeMap<Vec<String>, f64> {
    let mut out = BTreeMap::new();
    for (labels, v) in m.get(name).into_iter().flatten() {
        if with
            .iter()
            .any(|(k, want)| labels.get(*k).map(String::as_str) != Some(*want))
        {
            continue;
        }
        let key = by.iter().map(|k| labels.get(*k).cloned().unwrap_or_default()).collect();
        *out.entry(key).or_insert(0.0) += v;
    }
    out
}

/// A histogram's cumulative buckets `(le, count)`, ascending `le` (`+Inf` as infinity), per group,
/// from sums keyed by the group's label values followed by `le` (as [`sum_by`] gives them with
/// `le` as the last label); a key with an unreadable `le` is skipped.
pub fn buckets(sums: &BTreeMap<Vec<String>, f64>) -> BTreeMap<Vec<String>, Vec<(f64, f64)>> {
    let mut out: BTreeMap<Vec<String>, Vec<(f64, f64)>> = BTreeMap::new();
    for (key, count) in sums {
        let Some((le, group)) = key.split_last() else { continue };
        let le = match le.as_str() {
            "+Inf" => f64::INFINITY,
            x => match x.parse() {
                Ok(le) => le,
                Err(_) => continue,
            },
        };
        out.entry(group.to_vec()).or_default().push((le, *count));
    }
    for b in out.values_mut() {
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
    }
    out
}

/// Per second between two readings of a counter `secs` apart. A counter that went down (its
/// process restarted) counts as 0, so a restart never shows a negative rate.
pub fn counter_rate(before: f64, now: f64, secs: f64) -> f64 {
    if secs <= 0.0 || now < before {
        0.0
    } else {
        (now - before) / secs
    }
}

/// The `q` quantile (0..1) of what a histogram observed between two readings of its cumulative
/// buckets: the upper bound of the first bucket that holds `q` of the interval's observations
/// (infinity when that is the `+Inf` bucket); `None` when nothing was observed. A bucket missing
/// from `before` (the series is new) counts from 0.
pub fn interval_quantile(before: &[(f64, f64)], now: &[(f64, f64)], q: f64) -> Option<f64> {
    let earlier = |le: f64| before.iter().find(|(x, _)| *x == le).map_or(0.0, |(_, c)| *c);
    let delta: Vec<(f64, f64)> = now.iter().map(|(le, c)| (*le, (c - earlier(*le)).max(0.0))).collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| *le)
}

/// Registers the description of every metric (shown as `# HELP`).
pub fn describe() {
    describe_counter!(
        EVENTS_PUBLISHED,
        "Events accepted by this node, by topic (topics without subscriptions: topic=\"(other)\")."
    );
    describe_counter!(
        EVENTS_DELIVERED,
        "Handler attempts by topic, group and outcome (ok, error, dead_lettered)."
    );
    describe_counter!(
        EVENTS_REDELIVERED,
        "Deliveries repeated after a handler failure or a WAL replay."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Events stored as dead letters after max_attempts failures."
    );
    describe_counter!(
        HANDLER_RESTARTS,
        "Handler instance restarts after an error, panic or timeout."
    );
    describe_gauge!(
        MAILBOX_DEPTH,
        "Events waiting in the mailboxes of a subscription's instances."
    );
    describe_gauge!(
        INFLIGHT_EVENTS,
        "Events accepted and not yet finished by every subscription."
    );
    describe_gauge!(
        WAL_EVENTS,
        "Events in the write-ahead log, waiting for their subscriptions."
    );
    describe_gauge!(RAFT_TERM, "The Raft term this node is in.");
    describe_gauge!(RAFT_IS_LEADER, "1 on the Raft leader, 0 elsewhere.");
    describe_gauge!(RAFT_COMMIT_INDEX, "The highest committed Raft index this node knows.");
    describe_gauge!(CLUSTER_MEMBERS, "Cluster members by status.");
    describe_gauge!(PLACEMENT_EPOCH, "The placement epoch this node holds.");
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route pattern and status code.");
    describe_counter!(WAL_COMMITS, "Write-ahead log group commits.");
    describe_counter!(
        WAL_FLUSHES,
        "Durable write-ahead log commits (each group commit with fsync=always, each flush with interval)."
    );
    describe_counter!(
        DEAD_LETTERS_EXPIRED,
        "Dead letters deleted by retention (handlers.dead_letter_max_age_s, dead_letter_max_count), by reason."
    );
    describe_counter!(
        STORE_COMPACTIONS,
        "Compactions of the store file after many records were removed."
    );
    describe_counter!(
        WAL_QUARANTINED,
        "Undecodable write-ahead log records moved to the quarantine table."
    );
    describe_gauge!(
        STORAGE_UNHEALTHY,
        "1 while the store refuses writes (disk full or failing), 0 when healthy."
    );
    crate::transport::describe();
    describe_counter!(
        EVENTS_REJECTED,
        "Publishes refused with 429 because mailboxes or the in-flight byte budget were full."
    );
    describe_gauge!(
        PEER_PHI,
        "Phi of the failure detector for each peer (suspect above cluster.phi_threshold)."
    );
    describe_gauge!(PEER_RTT, Unit::Seconds, "The last ping round-trip time to each peer.");
    describe_histogram!(
        PEER_PING_RTT,
        Unit::Seconds,
        "Ping round-trip times to each peer, as the failure detector sees them (control-plane latency)."
    );
    describe_counter!(
        EVENTS_FORWARDED,
        "Event deliveries sent to other nodes, by peer, re-sends included."
    );
    describe_gauge!(
        FORWARD_PENDING,
        "Forwarded deliveries waiting for their handler node's ack."
    );
    describe_counter!(
        EVENTS_DEDUPLICATED,
        "Deliveries answered from the hosting node's dedup window instead of running the handler again (published there or forwarded)."
    );
    describe_counter!(
        EVENTS_UNROUTED,
        "Events accepted for a topic without any subscription (delivered nowhere), by topic (the first 100 topics; later ones topic=\"(other)\")."
    );
    describe_counter!(
        TRACE_SPANS_DROPPED,
        "Finished trace spans dropped because the OTLP exporter's queue was full (export never waits on the event path)."
    );
    describe_counter!(
        PEER_MESSAGES_REFUSED,
        "Peer messages dropped because the authenticated sender may not send them (not a member, a forged sender, an ack for a delivery not sent to it, a message raft-rs would fail on), by kind and reason."
    );
}

/// The rate limit of repeated log lines (defined with the vocabulary so that every layer, the
/// transport included, can use it).
pub use crate::types::LogLimit;

/// Counts peer messages refused by `kind` and `reason` ([`PEER_MESSAGES_REFUSED`]) and logs them
/// at WARN, once and then at most once per [`LogLimit::EVERY`] per `(kind, reason)` with a count.
#[derive(Debug, Default)]
pub struct Refusals {
    limits: std::sync::Mutex<std::collections::HashMap<(&'static str, &'static str), LogLimit>>,
}

impl Refusals {
    /// Records `n` refused messages of `kind` from `peer` for `reason`; `detail` is logged.
    pub fn refuse(&self, kind: &'static str, reason: &'static str, peer: u64, n: u64, detail: impl FnOnce() -> String) {
        metrics::counter!(PEER_MESSAGES_REFUSED, "kind" => kind, "reason" => reason).increment(n);
        let log = self
            .limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((kind, reason))
            .or_default()
            .hit(std::time::Instant::now());
        if let Some(suppressed) = log {
            tracing::warn!(
                peer,
                kind,
                reason,
                refused = n,
                suppressed,
                "peer message refused: {}",
                detail()
            );
        }
    }
}

/// Installs the Prometheus recorder as the global `metrics` recorder (once per process) and returns
/// the handle that renders `/metrics`. For binaries and tests; the library never calls it itself.
pub fn install_prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(PEER_PING_RTT.to_string()), &ping_rtt_buckets())
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by an embedding application); then
            // this handle renders nothing, which /metrics makes visible rather than crashing.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics shows only Herald's own handle");
            }
            describe();
            // Histograms buffer raw samples until they are drained into buckets; without a
            // scrape they would grow without bound, so drain them on a timer.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("herald-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms drain only when scraped");
            }
            handle
        })
        .clone()
}

/// Buckets of [`PEER_PING_RTT`]: 10 µs to 10 s, 10 per decade (each about 26 % wide), fine
/// enough to tell a loopback round trip from one that waited behind a queue.
pub fn ping_rtt_buckets() -> Vec<f64> {
    (0..=60).map(|i| 1e-5 * 10f64.powf(f64::from(i) / 10.0)).collect()
}

/// Pre-registered handles for one subscription.
pub(crate) struct SubMetrics {
    pub(crate) delivered_ok: Counter,
    pub(crate) delivered_error: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) dead_letters: Counter,
    pub(crate) restarts: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) duration: Arc<DurationHistogram>,
    pub(crate) mailbox_depth: Gauge,
}

impl SubMetrics {
    pub(crate) fn new(key: &SubscriptionKey) -> Self {
        let delivered = |outcome: &'static str| metrics::counter!(EVENTS_DELIVERED, "topic" => key.topic.clone(), "group" => key.group.clone(), "outcome" => outcome);
        let labels = [("topic", key.topic.clone()), ("group", key.group.clone())];
        SubMetrics {
            delivered_ok: delivered("ok"),
            delivered_error: delivered("error"),
            dead_lettered: delivered("dead_lettered"),
            dead_letters: metrics::counter!(DEAD_LETTERS, &labels),
            restarts: metrics::counter!(HANDLER_RESTARTS, &labels),
            redelivered: metrics::counter!(EVENTS_REDELIVERED),
            duration: DurationHistogram::of(key),
            mailbox_depth: metrics::gauge!(MAILBOX_DEPTH, &labels),
        }
    }
}

/// Upper bounds (seconds) of the [`HANDLER_DURATION`] buckets; `+Inf` follows.
pub const HANDLER_DURATION_BUCKETS: [f64; 11] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

/// [`HANDLER_DURATION`] of one subscription: a fixed-bucket histogram of plain atomic counters.
///
/// Handler durations are recorded once per delivered event, on every node that runs handlers.
/// Through the `metrics` facade each sample was pushed into the exporter's sample buffer (an
/// epoch-pinned lock-free append) and later drained into buckets: about 9 % of a receiving
/// node's CPU at 16-byte events. Here a sample is three relaxed additions, and the exposition
/// is written from the counters when `/metrics` renders ([`render_durations`]). One histogram per
/// `(topic, group)` lives for the process, as the exporter's series did: a subscription deleted
/// and made again continues its series.
pub(crate) struct DurationHistogram {
    /// `topic="…",group="…"`, escaped.
    labels: String,
    /// Per bucket (not cumulative), the last one `+Inf`.
    counts: [AtomicU64; HANDLER_DURATION_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// [`DurationHistogram`]s by `(topic, group)`.
type Durations = Mutex<BTreeMap<(String, String), Arc<DurationHistogram>>>;

/// Every [`DurationHistogram`] of the process.
fn durations() -> &'static Durations {
    static DURATIONS: OnceLock<Durations> = OnceLock::new();
    DURATIONS.get_or_init(Default::default)
}

/// A label value as the text exposition wants it (`\`, `"` and newlines escaped).
fn escape_label(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl DurationHistogram {
    /// The histogram of subscription `key` (made on first use).
    pub(crate) fn of(key: &SubscriptionKey) -> Arc<DurationHistogram> {
        let mut all = durations().lock().unwrap_or_else(|p| p.into_inner());
        all.entry((key.topic.clone(), key.group.clone()))
            .or_insert_with(|| {
                let mut labels = String::from("topic=\"");
                escape_label(&key.topic, &mut labels);
                labels.push_str("\",group=\"");
                escape_label(&key.group, &mut labels);
                labels.push('"');
                Arc::new(DurationHistogram {
                    labels,
                    counts: Default::default(),
                    sum_ns: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Counts one handler call that took `took`.
    pub(crate) fn record(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = HANDLER_DURATION_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(HANDLER_DURATION_BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Samples so far and their sum.
    #[cfg(test)]
    pub(crate) fn totals(&self) -> (u64, Duration) {
        let count = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        (count, Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed)))
    }

    /// Appends this histogram's `_bucket`, `_sum` and `_count` lines.
    fn render(&self, out: &mut String) {
        let mut cumulative = 0u64;
        let les = HANDLER_DURATION_BUCKETS
            .iter()
            .map(|le| le.to_string())
            .chain(["+Inf".to_string()]);
        for (count, le) in self.counts.iter().zip(les) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{HANDLER_DURATION}_bucket{{{},le=\"{le}\"}} {cumulative}",
                self.labels
            );
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{HANDLER_DURATION}_sum{{{}}} {sum}", self.labels);
        let _ = writeln!(out, "{HANDLER_DURATION}_count{{{}}} {cumulative}", self.labels);
    }
}

/// Appends [`HANDLER_DURATION`] of every subscription this process has run handlers for, as a
/// Prometheus text-format histogram (nothing before the first one). `/metrics` is the recorder's
/// rendering followed by this.
pub fn render_durations(out: &mut String) {
    let all = durations().lock().unwrap_or_else(|p| p.into_inner());
    if all.is_empty() {
        return;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let _ = writeln!(out, "# HELP {HANDLER_DURATION} Duration of handler calls.");
    let _ = writeln!(out, "# TYPE {HANDLER_DURATION} histogram");
    for histogram in all.values() {
        histogram.render(out);
    }
}

/// One counter per topic for a series whose topics publishers choose (see [`EVENTS_UNROUTED`]):
/// the first `cap` topics get their own series, later ones share `topic="(other)"`, so made-up
/// topics cannot add series without bound. For cold paths (a lock per call).
pub(crate) struct TopicCounters {
    name: &'static str,
    cap: usize,
    counters: std::sync::Mutex<std::collections::HashMap<String, metrics::Counter>>,
}

impl TopicCounters {
    pub(crate) fn new(name: &'static str, cap: usize) -> Self {
        TopicCounters {
            name,
            cap,
            counters: Default::default(),
        }
    }

    /// The label `topic` gets: itself while fewer than `cap` topics have a series, else
    /// [`OTHER_TOPIC`].
    fn label<'a>(seen: &std::collections::HashMap<String, metrics::Counter>, cap: usize, topic: &'a str) -> &'a str {
        if seen.contains_key(topic) || seen.len() < cap {
            topic
        } else {
            OTHER_TOPIC
        }
    }

    /// Adds `n` to `topic`'s series.
    pub(crate) fn increment(&self, topic: &str, n: u64) {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let label = Self::label(&counters, self.cap, topic).to_string();
        let name = self.name;
        counters
            .entry(label.clone())
            .or_insert_with(|| metrics::counter!(name, "topic" => label))
            .increment(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_of_some_metrics_gives_exactly_their_series_as_the_whole_parse_does() {
        let text = "# TYPE herald_a counter\nherald_a{topic=\"t\"} 3\nherald_ab 7\nherald_b{x=\"{ \"} 4.5\n\
                    herald_c 1\nherald_a{topic=\"u\"} 2\n";
        let all = parse_exposition(text);
        let some = parse_exposition_of(text, |name| name == "herald_a" || name == "herald_b");
        assert_eq!(
            some.keys().collect::<Vec<_>>(),
            ["herald_a", "herald_b"],
            "a prefix is not a name"
        );
        assert_eq!(some["herald_a"], all["herald_a"]);
        assert_eq!(some["herald_b"], all["herald_b"]);
        assert_eq!(some["herald_a"].len(), 2);
    }

    #[test]
    fn labels_and_values_are_parsed_with_escapes_and_junk_skipped() {
        let m = parse_exposition(
            "# HELP x y\nherald_a{topic=\"a\\\"b\",group=\"g\"} 3\nherald_b 4.5\nnot a metric\nherald_c{x=\"1\"} NaNx\n",
        );
        assert_eq!(m["herald_a"][0].0["topic"], "a\"b");
        assert_eq!(m["herald_a"][0].0["group"], "g");
        assert_eq!(m["herald_a"][0].1, 3.0);
        assert_eq!(m["herald_b"][0].1, 4.5);
        assert!(!m.contains_key("herald_c") && !m.contains_key("not"));
    }

    #[test]
    fn series_are_summed_by_labels_and_buckets_grouped_in_order() {
        let m = parse_exposition(
            "h_bucket{t=\"a\",n=\"1\",le=\"+Inf\"} 4\nh_bucket{t=\"a\",n=\"2\",le=\"+Inf\"} 1\n\
             h_bucket{t=\"a\",n=\"1\",le=\"0.5\"} 3\nh_bucket{t=\"a\",n=\"1\",le=\"x\"} 9\n\
             c{t=\"a\",o=\"ok\"} 2\nc{t=\"a\",o=\"error\"} 5\nc{t=\"b\",o=\"ok\"} 1\n",
        );
        let ok = sum_by(&m, "c", &["t"], &[("o", "ok")]);
        assert_eq!(ok, BTreeMap::from([(vec!["a".into()], 2.0), (vec!["b".into()], 1.0)]));
        let b = buckets(&sum_by(&m, "h_bucket", &["t", "le"], &[]));
        assert_eq!(b[&vec!["a".to_string()]], [(0.5, 3.0), (f64::INFINITY, 5.0)]);
    }

    #[test]
    fn interval_quantiles_and_rates_come_from_two_readings() {
        let before = [(0.1, 40.0), (1.0, 50.0), (f64::INFINITY, 50.0)];
        let now = [(0.1, 130.0), (1.0, 150.0), (f64::INFINITY, 150.0)];
        // 100 in the interval: 90 under 0.1, 10 under 1.
        assert_eq!(interval_quantile(&before, &now, 0.5), Some(0.1));
        assert_eq!(interval_quantile(&before, &now, 0.99), Some(1.0));
        assert_eq!(interval_quantile(&now, &now, 0.99), None, "nothing observed");
        assert_eq!(
            interval_quantile(&[], &[(0.1, 1.0), (f64::INFINITY, 2.0)], 0.99),
            Some(f64::INFINITY)
        );
        assert_eq!(counter_rate(10.0, 4.0, 1.0), 0.0, "a reset is not negative");
        assert_eq!(counter_rate(10.0, 14.0, 2.0), 2.0);
    }

    #[test]
    fn handler_durations_render_as_a_cumulative_histogram_the_parser_reads_back() {
        let key = SubscriptionKey {
            topic: "metrics.test.durations".into(),
            group: "g\"1".into(),
        };
        let h = DurationHistogram::of(&key);
        assert!(
            Arc::ptr_eq(&h, &DurationHistogram::of(&key)),
            "one histogram per subscription"
        );
        for us in [50, 100, 700, 2_000, 40_000_000] {
            h.record(Duration::from_micros(us));
        }
        let mut text = String::from("herald_other 1");
        render_durations(&mut text);
        assert!(
            text.starts_with("herald_other 1\n# HELP herald_handler_duration_seconds "),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE herald_handler_duration_seconds histogram").count(),
            1
        );
        let m = parse_exposition(&text);
        let ours = |name: &str| -> Vec<(String, f64)> {
            m[name]
                .iter()
                .filter(|(labels, _)| labels["topic"] == "metrics.test.durations" && labels["group"] == "g\"1")
                .map(|(labels, v)| (labels.get("le").cloned().unwrap_or_default(), *v))
                .collect()
        };
        let buckets = ours("herald_handler_duration_seconds_bucket");
        // 50 µs and 100 µs fall in le=0.0001 (bounds are inclusive), 700 µs in 0.001, 2 ms in
        // 0.005, 40 s only in +Inf.
        let at = |le: &str| buckets.iter().find(|(l, _)| l == le).map(|(_, v)| *v);
        assert_eq!(buckets.len(), HANDLER_DURATION_BUCKETS.len() + 1);
        assert_eq!(at("0.0001"), Some(2.0));
        assert_eq!(at("0.0005"), Some(2.0));
        assert_eq!(at("0.001"), Some(3.0));
        assert_eq!(at("0.005"), Some(4.0));
        assert_eq!(at("30"), Some(4.0));
        assert_eq!(at("+Inf"), Some(5.0));
        assert_eq!(ours("herald_handler_duration_seconds_count"), [(String::new(), 5.0)]);
        let sum = ours("herald_handler_duration_seconds_sum")[0].1;
        assert!((sum - 40.00285).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn only_the_first_topics_get_their_own_series() {
        let c = TopicCounters::new("herald_test_topics_total", 2);
        for t in ["a", "b", "c", "d", "a"] {
            c.increment(t, 1);
        }
        let mut labels: Vec<String> = c.counters.lock().unwrap().keys().cloned().collect();
        labels.sort();
        assert_eq!(labels, ["(other)", "a", "b"]);
    }
}
