//! `herald-bench soak`: a 3-node cluster under steady mixed load for a bounded time, sampling every
//! node's resources; it fails when one grows past its warm-up level plus a stated margin.
//!
//! The load is paced (`--rate` events/s in total, at most [`MAX_INFLIGHT`] requests in flight, a
//! request the pacer cannot start is counted as `skipped`, never queued) and spread round-robin over
//! three topics, the three ack modes (`none`, `accepted`: persisted in the WAL, `processed`) and
//! the three nodes. `soak.sink` (2 instances) and `soak.keyed` (1 instance, partition keys) run
//! `bench-sink`; `soak.flaky` runs `bench-flaky` with `max_attempts` 3, which fails some events on
//! their first attempt (retried) and some on every attempt (dead-lettered), so retries, restarts
//! and dead letters happen all along. The nodes keep at most [`DEAD_LETTER_CAP`] dead letters
//! (`handlers.dead_letter_max_count`), so retention runs too.
//!
//! Every `--sample-every` it prints one line per node: RSS and threads (`/proc/<pid>/status`),
//! open file descriptors (`/proc/<pid>/fd`), the size of the node's store file (`herald.redb`: the
//! WAL and the dead letters) and the p99 publish latency of the period, as the publisher saw it.
//! The verdict compares each node's resources after the warm-up (`--warmup`, a share of the run)
//! with their highest level during it, plus the margins of [`Margins`] (see BENCHMARKS.md for why
//! these). Latency is printed, never judged: the machine may be shared, and speed is not what a
//! soak checks.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::Args;

use super::cluster::{payload, settled, start_on_free_ports_with, unix_nanos, Cluster, LOG_TAIL};
use super::percentile;

/// Requests the pacer has in flight at most.
pub(super) const MAX_INFLIGHT: usize = 64;
/// `handlers.dead_letter_max_count` of the soak's nodes.
pub(super) const DEAD_LETTER_CAP: u64 = 200;
const GROUP: &str = "sink";
/// (topic, handler, instances, max_attempts)
const TOPICS: [(&str, &str, u32, u32); 3] = [
    ("soak.sink", super::cluster::SINK, 2, 5),
    ("soak.keyed", super::cluster::SINK, 1, 5),
    ("soak.flaky", super::cluster::FLAKY, 2, 3),
];
const ACKS: [&str; 3] = ["none", "accepted", "processed"];
/// One `soak.flaky` event in this many fails on every attempt, and one more on its first only.
const FLAKY_EVERY: u64 = 25;

/// Arguments of `herald-bench soak`.
#[derive(Args, Debug)]
pub(super) struct SoakArgs {
    /// How long the load runs (`180s`, `30m`, `1h`).
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    duration: Duration,
    /// How often each node is sampled.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    sample_every: Duration,
    /// Events/s published in total, paced.
    #[arg(long, default_value_t = 150)]
    rate: u64,
    /// Share of the run (0 to 1) whose samples set the levels the rest is compared with.
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    #[command(flatten)]
    margins: Margins,
    /// Write the samples (`soak.csv`) and plots (`soak-*.svg`) into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the nodes' data and logs.
    #[arg(long)]
    keep: bool,
}

/// How far past its warm-up level a resource may go: `level × (1 + pct/100) + abs`.
#[derive(Args, Debug, Clone)]
pub(super) struct Margins {
    /// RSS: percent of the warm-up level.
    #[arg(long, default_value_t = 20.0)]
    rss_margin_pct: f64,
    /// RSS: MiB on top.
    #[arg(long, default_value_t = 16.0)]
    rss_margin_mib: f64,
    /// Open file descriptors on top of the warm-up level.
    #[arg(long, default_value_t = 16.0)]
    fd_margin: f64,
    /// Threads on top of the warm-up level.
    #[arg(long, default_value_t = 8.0)]
    thread_margin: f64,
    /// Store file: percent of the warm-up level.
    #[arg(long, default_value_t = 50.0)]
    store_margin_pct: f64,
    /// Store file: MiB on top.
    #[arg(long, default_value_t = 8.0)]
    store_margin_mib: f64,
    /// Backlog (events accepted, not yet handled): percent of the warm-up level.
    #[arg(long, default_value_t = 100.0)]
    backlog_margin_pct: f64,
    /// Backlog: events on top.
    #[arg(long, default_value_t = 1000.0)]
    backlog_margin: f64,
}

/// `180s`, `3m`, `1h`, `500ms` or bare seconds.
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 180s, 30m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One node's resources at one time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Usage {
    pub(super) rss_bytes: f64,
    pub(super) threads: f64,
    pub(super) fds: f64,
    pub(super) store_bytes: f64,
    /// Events accepted and not yet handled or dead-lettered (`herald_inflight_events`).
    pub(super) backlog: f64,
}

/// `VmRSS` (bytes) and `Threads` of a `/proc/<pid>/status` text.
pub(super) fn parse_status(text: &str) -> Option<(f64, f64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((field("VmRSS:")? * 1024.0, field("Threads:")?))
}

fn usage(pid: u32, data_dir: &Path) -> Result<Usage, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("process {pid}: {e}"))?;
    let (rss_bytes, threads) = parse_status(&status).ok_or_else(|| format!("process {pid}: no VmRSS/Threads"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("process {pid}: {e}"))?
        .count() as f64;
    let store_bytes = std::fs::metadata(data_dir.join("herald.redb")).map_or(0.0, |m| m.len() as f64);
    Ok(Usage {
        rss_bytes,
        threads,
        fds,
        store_bytes,
        backlog: 0.0,
    })
}

/// One sample: seconds since the load started, and per node its usage and the p99 latency of
/// the publishes it answered in the period.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    pub(super) at_s: f64,
    pub(super) nodes: BTreeMap<u64, Usage>,
    pub(super) p99_ms: BTreeMap<u64, f64>,
}

/// A resource that grew past its warm-up level plus margin.
#[derive(Debug, PartialEq)]
pub(super) struct Growth {
    pub(super) node: u64,
    pub(super) what: &'static str,
    pub(super) level: f64,
    pub(super) limit: f64,
    pub(super) peak: f64,
    pub(super) at_s: f64,
}

/// The verdict: every resource of every node after `warmup_s`, against the highest level it had
/// up to then plus its margin. Empty when nothing grew too much.
pub(super) fn verdict(samples: &[Sample], warmup_s: f64, m: &Margins) -> Result<Vec<Growth>, String> {
    let (warm, after): (Vec<&Sample>, Vec<&Sample>) = samples.iter().partition(|s| s.at_s <= warmup_s);
    if warm.is_empty() || after.is_empty() {
        return Err(format!(
            "{} warm-up and {} later samples: a verdict needs both (a longer --duration or a shorter --sample-every)",
            warm.len(),
            after.len()
        ));
    }
    const MIB: f64 = 1024.0 * 1024.0;
    type Get = fn(&Usage) -> f64;
    let checks: [(&'static str, Get, f64, f64); 5] = [
        ("rss", |u| u.rss_bytes, m.rss_margin_pct, m.rss_margin_mib * MIB),
        ("fds", |u| u.fds, 0.0, m.fd_margin),
        ("threads", |u| u.threads, 0.0, m.thread_margin),
        ("store", |u| u.store_bytes, m.store_margin_pct, m.store_margin_mib * MIB),
        ("backlog", |u| u.backlog, m.backlog_margin_pct, m.backlog_margin),
    ];
    let mut grew = Vec::new();
    let nodes: Vec<u64> = samples.iter().flat_map(|s| s.nodes.keys().copied()).collect();
    let mut nodes = nodes;
    nodes.sort_unstable();
    nodes.dedup();
    for node in nodes {
        for (what, get, pct, abs) in checks {
            let level = warm
                .iter()
                .filter_map(|s| s.nodes.get(&node).map(get))
                .fold(f64::NAN, f64::max);
            if level.is_nan() {
                continue;
            }
            let limit = level * (1.0 + pct / 100.0) + abs;
            let peak = after
                .iter()
                .filter_map(|s| s.nodes.get(&node).map(|u| (s.at_s, get(u))))
                .fold(None::<(f64, f64)>, |best, (t, v)| match best {
                    Some((_, b)) if b >= v => best,
                    _ => Some((t, v)),
                });
            if let Some((at_s, peak)) = peak {
                if peak > limit {
                    grew.push(Growth {
                        node,
                        what,
                        level,
                        limit,
                        peak,
                        at_s,
                    });
                }
            }
        }
    }
    Ok(grew)
}

/// What the publisher saw.
#[derive(Default)]
struct Load {
    /// Latencies (ms) of the answered requests of the current period, by the node asked.
    period_ms: BTreeMap<u64, Vec<f64>>,
    sent: u64,
    /// Requests the pacer could not start (every slot busy): the load is paced, never queued.
    skipped: u64,
    /// Answers by status (0: no answer).
    statuses: BTreeMap<u16, u64>,
    inflight: usize,
}

/// `herald-bench soak`.
pub(super) fn run(a: SoakArgs) -> Result<(), String> {
    if a.rate == 0 || !(0.05..=0.9).contains(&a.warmup) {
        return Err("--rate must be positive and --warmup between 0.05 and 0.9".into());
    }
    if a.sample_every > a.duration / 4 {
        return Err("--sample-every must leave at least 4 samples in --duration".into());
    }
    let config = std::env::temp_dir().join(format!("herald-soak-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!("[handlers]\ndead_letter_max_count = {DEAD_LETTER_CAP}\n"),
    )
    .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let extra = vec!["--config".to_string(), config.display().to_string()];
    // The nodes read it when they start (and would again on a restart): it lives as long as they.
    let outcome = start_on_free_ports_with("herald-bench-soak", 3, None, true, a.keep, &extra).and_then(|mut c| {
        let outcome = actix_rt::System::new().block_on(async {
            let signal = herald::node::shutdown_signal();
            tokio::select! {
                r = soak(&mut c, &a) => r,
                _ = signal => Err("interrupted".to_string()),
            }
        });
        if outcome.is_err() {
            c.print_logs(LOG_TAIL);
        }
        outcome
    });
    let _ = std::fs::remove_file(&config);
    outcome
}

async fn subscribe(c: &Cluster, client: &awc::Client) -> Result<(), String> {
    for (topic, handler, instances, max_attempts) in TOPICS {
        let spec = serde_json::json!({
            "topic": topic, "group": GROUP, "handler": {"kind": "rust", "name": handler},
            "instances": instances, "max_attempts": max_attempts,
        });
        super::cluster::create_subscription(c, client, &spec).await?;
    }
    Ok(())
}

/// The `i`-th request: the node asked, the URL, body and partition key.
fn request(c: &Cluster, i: u64, flaky_n: &mut u64) -> (u64, String, String, Option<String>) {
    let (topic, ..) = TOPICS[(i % 3) as usize];
    let ack = ACKS[((i / 3) % 3) as usize];
    let node = &c.nodes()[((i / 9) % c.nodes().len() as u64) as usize];
    let url = format!(
        "http://{}/v1/topics/{topic}/events?ack={ack}&timeout_ms=10000",
        node.http()
    );
    let now = unix_nanos();
    let (body, key) = match topic {
        "soak.flaky" => {
            *flaky_n += 1;
            // f=1: fails on every attempt (dead letter); f=2: fails on its first attempt only.
            let f = match *flaky_n % FLAKY_EVERY {
                0 => 1,
                1 => 2,
                _ => 0,
            };
            (format!("{{\"t\":{now},\"f\":{f}}}"), None)
        }
        "soak.keyed" => (payload(64, now), Some(format!("k{}", i % 16))),
        _ => (payload(64, now), None),
    };
    (node.id(), url, body, key)
}

async fn soak(c: &mut Cluster, a: &SoakArgs) -> Result<(), String> {
    let client = super::cluster::node_client(Duration::from_secs(30), MAX_INFLIGHT + 8);
    let poll = super::cluster::node_client(Duration::from_secs(2), super::cluster::CONNECTIONS);
    c.wait_ready(Duration::from_secs(60)).await?;
    subscribe(c, &client).await?;
    for (topic, ..) in TOPICS {
        settled(c, &poll, topic, Duration::from_millis(500), Duration::from_secs(60)).await?;
    }
    let nodes: Vec<(u64, u32, PathBuf)> = c
        .nodes()
        .iter()
        .map(|n| {
            n.pid()
                .map(|pid| (n.id(), pid, n.data_dir().to_path_buf()))
                .ok_or_else(|| format!("node {} is not running", n.id()))
        })
        .collect::<Result<_, _>>()?;
    println!(
        "soak: 3 nodes, {} events/s over {} topics x ack none/accepted/processed x 3 nodes, for {:?}, a sample every {:?}, warm-up {:.0} %",
        a.rate,
        TOPICS.len(),
        a.duration,
        a.sample_every,
        a.warmup * 100.0
    );
    println!(
        "{:>7} {:>4} {:>9} {:>5} {:>7} {:>10} {:>8} {:>9}  {:>8} {:>7}",
        "t_s", "node", "rss_mib", "fds", "threads", "store_mib", "backlog", "p99_ms", "sent", "errors"
    );
    let load = Rc::new(RefCell::new(Load::default()));
    let start = Instant::now();
    let mut next_sample = a.sample_every;
    let mut samples: Vec<Sample> = Vec::new();
    let mut flaky_n = 0u64;
    let mut i = 0u64;
    let tick = Duration::from_millis(10);
    while start.elapsed() < a.duration {
        // Paced: as many requests as the rate allows by now, none beyond MAX_INFLIGHT.
        let due = (start.elapsed().as_secs_f64() * a.rate as f64) as u64;
        while i < due {
            let (node, url, body, key) = request(c, i, &mut flaky_n);
            i += 1;
            let mut l = load.borrow_mut();
            if l.inflight >= MAX_INFLIGHT {
                l.skipped += 1;
                continue;
            }
            l.inflight += 1;
            l.sent += 1;
            drop(l);
            let load = load.clone();
            let mut req = client.post(&url).insert_header(("content-type", "application/json"));
            if let Some(k) = key {
                req = req.insert_header(("x-herald-key", k));
            }
            actix_rt::spawn(async move {
                let t = Instant::now();
                let status = match req.send_body(body).await {
                    Ok(mut r) => {
                        let _ = r.body().await;
                        r.status().as_u16()
                    }
                    Err(_) => 0,
                };
                let mut l = load.borrow_mut();
                l.inflight -= 1;
                *l.statuses.entry(status).or_default() += 1;
                if status == 200 || status == 202 {
                    l.period_ms
                        .entry(node)
                        .or_default()
                        .push(t.elapsed().as_secs_f64() * 1e3);
                }
            });
        }
        if start.elapsed() >= next_sample {
            next_sample += a.sample_every;
            let period = std::mem::take(&mut load.borrow_mut().period_ms);
            let at_s = start.elapsed().as_secs_f64();
            let mut s = Sample {
                at_s,
                nodes: BTreeMap::new(),
                p99_ms: BTreeMap::new(),
            };
            let (sent, errors) = {
                let l = load.borrow();
                let ok: u64 = [200, 202].iter().filter_map(|s| l.statuses.get(s)).sum();
                let answered: u64 = l.statuses.values().sum();
                (l.sent, answered - ok)
            };
            for (id, pid, dir) in &nodes {
                let mut u = usage(*pid, dir)?;
                let http = super::cluster::http(c, *id);
                let text = super::cluster::get_text(&poll, &format!("http://{http}/metrics")).await?;
                u.backlog = metric_sum(&text, herald::metrics::INFLIGHT_EVENTS);
                let mut ms = period.get(id).cloned().unwrap_or_default();
                ms.sort_by(f64::total_cmp);
                let p99_ms = percentile(&ms, 0.99);
                s.p99_ms.insert(*id, p99_ms);
                println!(
                    "{at_s:>7.0} {id:>4} {:>9.1} {:>5} {:>7} {:>10.2} {:>8} {p99_ms:>9.2}  {sent:>8} {errors:>7}",
                    u.rss_bytes / 1048576.0,
                    u.fds,
                    u.threads,
                    u.store_bytes / 1048576.0,
                    u.backlog
                );
                s.nodes.insert(*id, u);
            }
            samples.push(s);
        }
        actix_rt::time::sleep(tick).await;
    }
    // Let the last requests finish (bounded), then read what the nodes counted.
    let drain_until = Instant::now() + Duration::from_secs(15);
    while load.borrow().inflight > 0 && Instant::now() < drain_until {
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    let mut dead = 0.0;
    let mut redelivered = 0.0;
    let mut expired = 0.0;
    for n in c.nodes() {
        let text = super::cluster::get_text(&poll, &format!("http://{}/metrics", n.http())).await?;
        dead += metric_sum(&text, herald::metrics::DEAD_LETTERS);
        redelivered += metric_sum(&text, herald::metrics::EVENTS_REDELIVERED);
        expired += metric_sum(&text, herald::metrics::DEAD_LETTERS_EXPIRED);
    }
    let l = load.borrow();
    println!(
        "load: {} requests sent, {} skipped (every slot busy), answers by status {:?}; cluster: {dead} dead letters, {redelivered} redeliveries, {expired} dead letters expired by retention",
        l.sent, l.skipped, l.statuses
    );
    let answered: u64 = l.statuses.values().sum();
    let wrong = wrong_answers(&l.statuses);
    let totals = format!(
        "{} requests sent ({} skipped: every slot busy), answers by status {:?}; {dead} dead letters, {redelivered} redeliveries, {expired} dead letters deleted by retention",
        l.sent, l.skipped, l.statuses
    );
    drop(l);
    let warmup_s = a.duration.as_secs_f64() * a.warmup;
    let grew = verdict(&samples, warmup_s, &a.margins)?;
    if let Some(dir) = &a.out {
        write_out(dir, &samples, warmup_s)?;
        let md = summary(a, &samples, warmup_s, &totals, &grew, dir);
        let path = dir.join("soak.md");
        std::fs::write(&path, md).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let mut problems: Vec<String> = grew
        .iter()
        .map(|g| {
            let unit = |v: f64| match g.what {
                "rss" | "store" => format!("{:.1} MiB", v / 1048576.0),
                _ => format!("{v:.0}"),
            };
            format!(
                "node {} {}: {} at {:.0} s, over its warm-up level {} plus margin (limit {})",
                g.node,
                g.what,
                unit(g.peak),
                g.at_s,
                unit(g.level),
                unit(g.limit)
            )
        })
        .collect();
    // The scenario must have done what it is for: failures handled, and (nearly) every request answered.
    if dead == 0.0 || redelivered == 0.0 {
        problems.push(format!(
            "the flaky handler produced {dead} dead letters and {redelivered} redeliveries: the soak did not exercise them"
        ));
    }
    if wrong > 0 {
        problems.push(format!(
            "{wrong} of {answered} well-formed requests were answered 500 or refused with a 4xx other than 408/429"
        ));
    }
    if problems.is_empty() {
        println!(
            "verdict: PASS (after the first {warmup_s:.0} s, no node's RSS, fds, threads, store or backlog grew past its warm-up level plus margin)"
        );
        Ok(())
    } else {
        for p in &problems {
            println!("verdict: FAIL {p}");
        }
        Err(format!("soak failed: {}", problems.join("; ")))
    }
}

/// Answers that are wrong whatever the machine's speed: 500, and a 4xx other than 408 and 429
/// (every request is well-formed). 503, 504, 408, 429 and no answer depend on how loaded the
/// machine is; they are printed, not judged.
pub(super) fn wrong_answers(statuses: &BTreeMap<u16, u64>) -> u64 {
    statuses
        .iter()
        .filter(|(s, _)| **s == 500 || ((400..500).contains(*s) && **s != 408 && **s != 429))
        .map(|(_, n)| n)
        .sum()
}

/// The sum of every series of a Prometheus counter in `text`.
pub(super) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `## soak` section of BENCHMARKS.md (`soak.md` in `--out`; `herald-bench report` appends
/// it): the run, per node each resource's warm-up level, peak after it and limit, and the plots.
fn summary(a: &SoakArgs, samples: &[Sample], warmup_s: f64, totals: &str, grew: &[Growth], dir: &Path) -> String {
    use std::fmt::Write;
    let m = &a.margins;
    let link = dir
        .file_name()
        .map_or_else(|| ".".to_string(), |d| d.to_string_lossy().into_owned());
    let mut s = String::new();
    let _ = writeln!(s, "## `soak`\n");
    let _ = writeln!(
        s,
        "A 3-node loopback cluster under steady mixed load: {} events/s (paced) over `soak.sink` (2 instances), `soak.keyed` (1 instance, 16 partition keys) and `soak.flaky` (`bench-flaky`, `max_attempts` 3: one event in {FLAKY_EVERY} fails on every attempt and is dead-lettered, one more fails once and is retried), each with `ack=none`, `accepted` and `processed`, to every node in turn. Nodes keep at most {DEAD_LETTER_CAP} dead letters; the retry backoff is the default (per event since issue 18's fix). Written by `herald-bench soak --duration {}s --sample-every {}s --rate {} --out {link}` on {}.\n",
        a.rate,
        a.duration.as_secs(),
        a.sample_every.as_secs(),
        a.rate,
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
    );
    let _ = writeln!(s, "Load: {totals}.\n");
    let _ = writeln!(
        s,
        "The verdict compares every sample after the warm-up (the first {warmup_s:.0} s) with the highest level of the warm-up plus a margin: {}.\n",
        if grew.is_empty() { "**pass**" } else { "**fail**" }
    );
    let _ = writeln!(s, "| resource | margin | why this margin |\n|---|---|---|");
    let _ = writeln!(s, "| RSS | +{:.0} % + {:.0} MiB | the allocator keeps freed memory for reuse and grows its arenas in steps, metric histograms and HTTP/peer buffers reach their size under load; a leak of 1 KiB per event still crosses it within minutes at this rate |", m.rss_margin_pct, m.rss_margin_mib);
    let _ = writeln!(s, "| open fds | +{:.0} | the publisher's pooled connections (up to {MAX_INFLIGHT} in flight) open and close with the load, peer sockets reconnect; a leaked socket per request crosses it in seconds |", m.fd_margin);
    let _ = writeln!(s, "| threads | +{:.0} | tokio's blocking pool starts threads on demand (file and DNS work) and retires them after 10 s idle |", m.thread_margin);
    let _ = writeln!(s, "| store file (`herald.redb`: WAL and dead letters) | +{:.0} % + {:.0} MiB | redb grows its file in regions and reuses freed pages, dead letters fill up to their cap; a WAL that is never trimmed grows by the events' size, far past it |", m.store_margin_pct, m.store_margin_mib);
    let _ = writeln!(s, "| backlog (`herald_inflight_events`) | +{:.0} % + {:.0} events | events wait for retries and `ack=processed` round trips; a handler that falls behind for good grows it without bound |\n", m.backlog_margin_pct, m.backlog_margin);
    let _ = writeln!(
        s,
        "| node | resource | warm-up level | peak after warm-up | limit |\n|---|---|---|---|---|"
    );
    let (warm, after): (Vec<&Sample>, Vec<&Sample>) = samples.iter().partition(|x| x.at_s <= warmup_s);
    let ids: Vec<u64> = samples
        .first()
        .map(|x| x.nodes.keys().copied().collect())
        .unwrap_or_default();
    type Get = fn(&Usage) -> f64;
    let rows: [(&str, Get, f64, f64, &str); 5] = [
        (
            "RSS",
            |u| u.rss_bytes / 1048576.0,
            m.rss_margin_pct,
            m.rss_margin_mib,
            "MiB",
        ),
        ("fds", |u| u.fds, 0.0, m.fd_margin, ""),
        ("threads", |u| u.threads, 0.0, m.thread_margin, ""),
        (
            "store",
            |u| u.store_bytes / 1048576.0,
            m.store_margin_pct,
            m.store_margin_mib,
            "MiB",
        ),
        ("backlog", |u| u.backlog, m.backlog_margin_pct, m.backlog_margin, ""),
    ];
    for id in &ids {
        for (what, get, pct, abs, unit) in rows {
            let of = |v: &[&Sample]| {
                v.iter()
                    .filter_map(|x| x.nodes.get(id).map(get))
                    .fold(f64::NAN, f64::max)
            };
            let (level, peak) = (of(&warm), of(&after));
            let limit = level * (1.0 + pct / 100.0) + abs;
            let _ = writeln!(
                s,
                "| {id} | {what} | {level:.1} {unit} | {peak:.1} {unit} | {limit:.1} {unit} |"
            );
        }
    }
    let mut p99: Vec<f64> = samples
        .iter()
        .flat_map(|x| x.p99_ms.values().copied())
        .filter(|v| v.is_finite())
        .collect();
    p99.sort_by(f64::total_cmp);
    let _ = writeln!(
        s,
        "\np99 publish latency per node and period (all ack modes, as the publisher saw it): median {:.1} ms, highest {:.1} ms. Printed, not judged: the machine is shared.\n",
        percentile(&p99, 0.5),
        p99.last().copied().unwrap_or(f64::NAN)
    );
    for kind in ["rss", "fds", "threads", "store", "backlog", "p99"] {
        let _ = writeln!(s, "![soak: {kind}]({link}/soak-{kind}.svg)");
    }
    s.push('\n');
    s
}

/// `soak.csv` and the plots of RSS, fds, threads, store size and p99 over time.
fn write_out(dir: &Path, samples: &[Sample], warmup_s: f64) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut csv = String::from("t_s,node,rss_bytes,fds,threads,store_bytes,backlog,p99_ms\n");
    for s in samples {
        for (id, u) in &s.nodes {
            csv.push_str(&format!(
                "{:.1},{id},{},{},{},{},{},{:.3}\n",
                s.at_s,
                u.rss_bytes,
                u.fds,
                u.threads,
                u.store_bytes,
                u.backlog,
                s.p99_ms.get(id).copied().unwrap_or(f64::NAN)
            ));
        }
    }
    let path = dir.join("soak.csv");
    std::fs::write(&path, csv).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    type Get = fn(&Usage) -> f64;
    let per_node: [(&str, &str, &str, Get); 5] = [
        ("rss", "RSS per node", "MiB", |u| u.rss_bytes / 1048576.0),
        ("fds", "Open file descriptors per node", "fds", |u| u.fds),
        ("threads", "Threads per node", "threads", |u| u.threads),
        ("store", "Store file (herald.redb) per node", "MiB", |u| {
            u.store_bytes / 1048576.0
        }),
        ("backlog", "Events accepted, not yet handled, per node", "events", |u| {
            u.backlog
        }),
    ];
    let ids: Vec<u64> = samples
        .first()
        .map(|s| s.nodes.keys().copied().collect())
        .unwrap_or_default();
    for (kind, title, y, get) in per_node {
        let lines: Vec<(String, Vec<(f64, f64)>)> = ids
            .iter()
            .map(|id| {
                let points = samples
                    .iter()
                    .filter_map(|s| s.nodes.get(id).map(|u| (s.at_s, get(u))))
                    .collect();
                (format!("node {id}"), points)
            })
            .collect();
        super::plot::lines(&dir.join(format!("soak-{kind}.svg")), title, y, &lines, Some(warmup_s))?;
    }
    let p99: Vec<(String, Vec<(f64, f64)>)> = ids
        .iter()
        .map(|id| {
            let points = samples
                .iter()
                .filter_map(|s| s.p99_ms.get(id).filter(|v| v.is_finite()).map(|v| (s.at_s, *v)))
                .collect();
            (format!("node {id}"), points)
        })
        .collect();
    super::plot::lines(
        &dir.join("soak-p99.svg"),
        "p99 publish latency per node asked (all ack modes)",
        "ms",
        &p99,
        Some(warmup_s),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn margins() -> Margins {
        Margins {
            rss_margin_pct: 20.0,
            rss_margin_mib: 16.0,
            fd_margin: 16.0,
            thread_margin: 8.0,
            store_margin_pct: 50.0,
            store_margin_mib: 8.0,
            backlog_margin_pct: 100.0,
            backlog_margin: 1000.0,
        }
    }

    fn sample(at_s: f64, rss_mib: f64, fds: f64, threads: f64, store_mib: f64) -> Sample {
        let u = Usage {
            rss_bytes: rss_mib * 1048576.0,
            threads,
            fds,
            store_bytes: store_mib * 1048576.0,
            backlog: 10.0,
        };
        Sample {
            at_s,
            nodes: BTreeMap::from([(1, u), (2, u)]),
            p99_ms: BTreeMap::from([(1, 1.0), (2, 1.0)]),
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("180s"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("12"), Ok(Duration::from_secs(12)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn proc_status_gives_rss_bytes_and_threads() {
        let text = "Name:\therald\nVmPeak:\t  9000 kB\nVmRSS:\t   51200 kB\nThreads:\t17\n";
        assert_eq!(parse_status(text), Some((51200.0 * 1024.0, 17.0)));
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn the_verdict_passes_within_the_margins_and_names_what_grew_past_them() {
        // Levels move inside the margins after warm-up: a pass, even below the warm-up level.
        let steady = vec![
            sample(10.0, 40.0, 30.0, 20.0, 2.0),
            sample(20.0, 50.0, 34.0, 22.0, 4.0),
            sample(30.0, 65.0, 49.0, 29.0, 13.0),
            sample(40.0, 45.0, 30.0, 20.0, 3.0),
        ];
        assert_eq!(verdict(&steady, 20.0, &margins()), Ok(vec![]));
        // RSS 50 MiB in warm-up: the limit is 50 × 1.2 + 16 = 76 MiB; fds 34 + 16 = 50.
        let leaking = vec![
            sample(10.0, 40.0, 30.0, 20.0, 2.0),
            sample(20.0, 50.0, 34.0, 22.0, 4.0),
            sample(30.0, 70.0, 40.0, 22.0, 4.0),
            sample(40.0, 77.0, 51.0, 22.0, 4.0),
        ];
        let grew = verdict(&leaking, 20.0, &margins()).expect("a verdict");
        let what: Vec<(u64, &str)> = grew.iter().map(|g| (g.node, g.what)).collect();
        assert_eq!(what, vec![(1, "rss"), (1, "fds"), (2, "rss"), (2, "fds")]);
        let rss = &grew[0];
        assert_eq!(
            (rss.level, rss.peak, rss.at_s),
            (50.0 * 1048576.0, 77.0 * 1048576.0, 40.0)
        );
        assert!((rss.limit - 76.0 * 1048576.0).abs() < 1.0, "{rss:?}");
    }

    #[test]
    fn a_verdict_needs_samples_on_both_sides_of_the_warm_up() {
        let only_warm = vec![sample(10.0, 40.0, 30.0, 20.0, 2.0)];
        assert!(verdict(&only_warm, 20.0, &margins()).is_err());
        assert!(verdict(&only_warm, 5.0, &margins()).is_err());
    }

    #[test]
    fn only_speed_independent_failures_are_wrong_answers() {
        let statuses = BTreeMap::from([(200, 10), (202, 10), (0, 1), (408, 1), (429, 2), (503, 3), (504, 4)]);
        assert_eq!(wrong_answers(&statuses), 0);
        let statuses = BTreeMap::from([(202, 10), (400, 1), (415, 2), (500, 4), (504, 8)]);
        assert_eq!(wrong_answers(&statuses), 7);
    }

    #[test]
    fn counters_are_summed_over_their_series() {
        let text = "# TYPE herald_dead_letters_total counter\nherald_dead_letters_total{topic=\"a\"} 3\nherald_dead_letters_total{topic=\"b\"} 4\nherald_dead_letters_total_other 9\n";
        assert_eq!(metric_sum(text, "herald_dead_letters_total"), 7.0);
        assert_eq!(metric_sum(text, "herald_events_redelivered_total"), 0.0);
    }
}
