//! `herald-bench report`: runs every scenario, one after another, and writes `BENCHMARKS.md`.
//!
//! Each scenario runs as a child process of this binary (`herald-bench <scenario> … --json F`),
//! with its output shown as it goes, so a scenario is measured exactly as a user would run it by
//! hand and the report only gathers what the scenarios wrote (the shape is in [`super::record`]).
//! The report holds the machine, the exact commands, the performance goals with the measured
//! figures, one table per scenario with the peer measured in the same run, and SVG plots
//! (drawn with `plotters`) of throughput and latency percentiles.
//!
//! A scenario that fails is reported as failed (with its exit status) and the others still run;
//! the command then exits non-zero.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

use super::compare::Metric;
use super::percentile;

/// `herald-bench report` arguments.
#[derive(Args, Debug)]
pub(super) struct ReportArgs {
    /// The report to write.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Directory of the plots (SVG), referred to from the report by a relative path
    /// (default: `benchmarks/` next to the report).
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Runs per figure of the scenarios that alternate Herald and a peer.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    runs: u64,
    /// Failover rounds (node kills) of the cluster scenario.
    #[arg(long, default_value_t = 20)]
    failovers: usize,
    /// Only these scenarios (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Every scenario in its smoke form (a minute in all; the figures mean little).
    #[arg(long)]
    smoke: bool,
    /// The nats-server program, passed on to the NATS scenarios.
    #[arg(long)]
    nats_server: Option<PathBuf>,
}

/// One scenario of the report: its name and the arguments of its full and smoke runs.
struct Plan {
    name: &'static str,
    args: Vec<String>,
}

fn plans(a: &ReportArgs) -> Vec<Plan> {
    let runs = a.runs.to_string();
    let mut nats = vec!["--runs".to_string(), runs.clone()];
    if let Some(p) = &a.nats_server {
        nats.extend(["--nats-server".to_string(), p.display().to_string()]);
    }
    let smoke = |mut v: Vec<String>| {
        if a.smoke {
            v.push("--smoke".into());
        }
        v
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let all = vec![
        Plan {
            name: "local",
            args: smoke(vec!["--runs".into(), runs.clone()]),
        },
        Plan {
            name: "nats",
            // Herald with mTLS (the default) and with plaintext peers, next to NATS with TLS.
            args: smoke([nats.clone(), s(&["--herald-peers", "both"])].concat()),
        },
        Plan {
            name: "jetstream",
            args: smoke(nats),
        },
        Plan {
            name: "http",
            args: smoke(vec!["--runs".into(), runs.clone()]),
        },
        Plan {
            name: "cluster",
            // The max-rate runs also on a cluster with plaintext peers, alternating with mTLS.
            args: smoke(vec![
                "--failovers".into(),
                a.failovers.to_string(),
                "--herald-peers".into(),
                "both".into(),
            ]),
        },
        Plan {
            name: "membership",
            args: if a.smoke {
                s(&["--subscriptions", "5", "--joins", "1", "--failovers", "1"])
            } else {
                s(&["--subscriptions", "50", "--joins", "5", "--failovers", "10"])
            },
        },
        Plan {
            name: "memory",
            args: smoke(Vec::new()),
        },
        Plan {
            name: "scale",
            args: smoke(s(&["--nodes", "5,10,20", "--failovers", "10"])),
        },
    ];
    all.into_iter()
        .filter(|p| a.only.is_empty() || a.only.iter().any(|o| o == p.name))
        .collect()
}

/// What one scenario run left: its command line, how long it took, and its figures (or why not).
struct Outcome {
    name: &'static str,
    command: String,
    took: Duration,
    doc: Result<Value, String>,
}

/// `herald-bench report`.
pub(super) fn run(a: ReportArgs) -> Result<(), String> {
    let plans = plans(&a);
    if plans.is_empty() {
        return Err(format!(
            "--only {} names no scenario (local, nats, jetstream, http, cluster, membership, memory, scale)",
            a.only.join(",")
        ));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("herald-bench-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let plots = a
        .plots
        .clone()
        .unwrap_or_else(|| a.out.parent().unwrap_or(Path::new("")).join("benchmarks"));
    std::fs::create_dir_all(&plots).map_err(|e| format!("cannot create {}: {e}", plots.display()))?;
    let started = Instant::now();
    let date = chrono::Utc::now();
    let mut outcomes = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        let json = dir.join(format!("{}.json", p.name));
        let command = format!("herald-bench {} {}", p.name, p.args.join(" "));
        eprintln!(
            "\n=== [{}/{}] {command}   ({:.0} s so far)",
            i + 1,
            plans.len(),
            started.elapsed().as_secs_f64()
        );
        let t0 = Instant::now();
        let status = Command::new(&exe)
            .arg(p.name)
            .args(&p.args)
            .arg("--json")
            .arg(&json)
            .status();
        let doc = match status {
            Err(e) => Err(format!("could not start: {e}")),
            Ok(s) if !s.success() => Err(format!("failed ({s})")),
            Ok(_) => std::fs::read_to_string(&json)
                .map_err(|e| format!("wrote no figures ({e})"))
                .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("unreadable figures: {e}"))),
        };
        if let Err(e) = &doc {
            eprintln!("=== {} {e}; the report goes on without it", p.name);
        }
        outcomes.push(Outcome {
            name: p.name,
            command,
            took: t0.elapsed(),
            doc,
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    let plot_ref = relative_to(&plots, a.out.parent().unwrap_or(Path::new("")));
    let mut drawn = Vec::new();
    for o in &outcomes {
        if let Ok(doc) = &o.doc {
            drawn.extend(super::plot::draw(o.name, &rows(doc), &plots)?);
        }
    }
    let invocation = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let machine = Machine::read(a.nats_server.as_deref());
    let text = markdown(
        &format!("herald-bench {invocation}"),
        &date.format("%Y-%m-%d %H:%M UTC").to_string(),
        started.elapsed(),
        &machine,
        &outcomes,
        &drawn,
        &plot_ref,
    );
    // The soak runs for long on its own (`herald-bench soak --out <plots>`); its section is kept.
    let text = match std::fs::read_to_string(plots.join("soak.md")) {
        Ok(soak) => format!("{text}{soak}"),
        Err(_) => text,
    };
    std::fs::write(&a.out, text).map_err(|e| format!("cannot write {}: {e}", a.out.display()))?;
    eprintln!(
        "\nwrote {} and {} plots in {} ({:.0} s in all)",
        a.out.display(),
        drawn.len(),
        plots.display(),
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<&str> = outcomes.iter().filter(|o| o.doc.is_err()).map(|o| o.name).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("scenarios failed: {} (see the report)", failed.join(", ")))
    }
}

/// `plots` as seen from `base` (both as given: the report links its plots relatively).
fn relative_to(plots: &Path, base: &Path) -> String {
    let s = plots.strip_prefix(base).unwrap_or(plots).display().to_string();
    if s.is_empty() {
        ".".into()
    } else {
        s
    }
}

/// One row of a scenario's figures (see [`super::record`]).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Fig {
    pub(super) scenario: String,
    pub(super) mode: String,
    pub(super) case: String,
    pub(super) metric: String,
    pub(super) higher_is_better: bool,
    pub(super) herald: Vec<f64>,
    pub(super) peer: Option<(String, Vec<f64>)>,
    /// Herald with plaintext peers in the same runs (`herald` is then Herald with mTLS); empty
    /// when not measured.
    pub(super) plain: Vec<f64>,
}

impl Fig {
    /// The median of Herald's figures over the peer's.
    pub(super) fn ratio(&self) -> Option<f64> {
        let (_, p) = self.peer.as_ref()?;
        super::compare::median_ratio(&self.herald, p)
    }

    /// The median of Herald's figures (mTLS) over those of Herald with plaintext peers.
    pub(super) fn tls_ratio(&self) -> Option<f64> {
        super::compare::median_ratio(&self.herald, &self.plain)
    }

    /// `ack=none, 16 B` (the mode and the case, whichever are set).
    pub(super) fn label(&self) -> String {
        match (self.mode.is_empty(), self.case.is_empty()) {
            (false, false) => format!("{}, {}", self.mode, self.case),
            (true, _) => self.case.clone(),
            (_, true) => self.mode.clone(),
        }
    }
}

fn runs(v: &Value) -> Vec<f64> {
    v["runs"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
        .unwrap_or_default()
}

/// The rows of a scenario's document; `case` falls back to the payload size.
pub(super) fn rows(doc: &Value) -> Vec<Fig> {
    doc["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Fig {
            scenario: r["scenario"].as_str().unwrap_or("").to_string(),
            mode: r["herald_mode"].as_str().unwrap_or("").to_string(),
            case: r["case"].as_str().map(str::to_string).unwrap_or_else(|| {
                r["payload_bytes"]
                    .as_u64()
                    .map_or(String::new(), |b| super::compare::fmt_size(b as usize))
            }),
            metric: r["metric"].as_str().unwrap_or("").to_string(),
            higher_is_better: r["better"].as_str() == Some("higher"),
            herald: runs(&r["herald"]),
            peer: r["peer"]
                .as_str()
                .filter(|_| r["peer_figures"].is_object())
                .map(|p| (p.to_string(), runs(&r["peer_figures"]))),
            plain: runs(&r["herald_plaintext"]),
        })
        .collect()
}

/// What the report says about the machine it ran on.
#[derive(Debug, Default)]
struct Machine {
    cpu: String,
    cores: usize,
    memory: String,
    os: String,
    kernel: String,
    herald: String,
    nats: String,
}

impl Machine {
    fn read(nats_server: Option<&Path>) -> Machine {
        let file = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = file("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory = file("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
            .map_or("unknown".into(), |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0));
        let os = file("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map_or("unknown".into(), |v| v.trim_matches('"').to_string());
        let program = super::nats::find_server(nats_server).ok();
        let nats = program
            .and_then(|p| Command::new(p).arg("--version").output().ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "not found".into());
        let commit = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory,
            os,
            kernel: file("/proc/sys/kernel/osrelease").trim().to_string(),
            herald: match commit {
                Some(c) => format!("{} (git {c}, release build)", env!("CARGO_PKG_VERSION")),
                None => env!("CARGO_PKG_VERSION").to_string(),
            },
            nats,
        }
    }
}

/// A performance goal, and how the report reads it off the figures.
struct Goal {
    what: &'static str,
    scenario: &'static str,
    /// The rows it applies to.
    pick: fn(&Fig) -> bool,
    /// What is compared with `bound`.
    judged: Judged,
    /// Met when the figure is at least (ratios) or at most (the others) this.
    bound: f64,
}

/// The figure of a goal.
enum Judged {
    /// This ratio of each picked row (at least the bound).
    Ratio(fn(&Fig) -> Option<f64>),
    /// The p99 of the picked row's samples, in ms (at most the bound).
    P99,
    /// The largest value of each picked row: one value per node (at most the bound).
    Max,
}

const GOALS: &[Goal] = &[
    Goal {
        what: "cross-node `ack=none`, Herald with mTLS ≥ 1.0× NATS core with TLS (events/s)",
        scenario: "nats",
        pick: |f| f.metric == "events_per_second",
        judged: Judged::Ratio(Fig::ratio),
        bound: 1.0,
    },
    Goal {
        what: "cross-node `ack=none`, Herald with mTLS within 15 % of Herald with plaintext peers (mTLS / plaintext ≥ 0.85, events/s)",
        scenario: "nats",
        pick: |f| f.metric == "events_per_second",
        judged: Judged::Ratio(Fig::tls_ratio),
        bound: 0.85,
    },
    Goal {
        what: "cross-node `ack=accepted` ≥ 1.0× JetStream, memory storage (events/s)",
        scenario: "jetstream",
        pick: |f| f.metric == "events_per_second",
        judged: Judged::Ratio(Fig::ratio),
        bound: 1.0,
    },
    Goal {
        what: "HTTP publish (`ack=none`: routing on top of HTTP) ≥ 0.8× a bare actix-web handler (events/s; issue 16 point 3)",
        scenario: "http",
        pick: |f| f.metric == "events_per_second" && f.case.starts_with("ack=none"),
        judged: Judged::Ratio(Fig::ratio),
        bound: 0.8,
    },
    Goal {
        what: "local dispatch ≥ 0.5× raw actix `do_send` of the same `Event`, like for like (events/s; issue 16 point 1)",
        scenario: "local",
        pick: |f| f.metric == "events_per_second" && f.mode == "ack=none" && f.case.ends_with("emit vs do_send(Event)"),
        judged: Judged::Ratio(Fig::ratio),
        bound: 0.5,
    },
    Goal {
        what: "local publish/subscribe `ack=none` ≥ 1.0× `actix-broker`, one subscriber and three (events/s)",
        scenario: "local",
        pick: |f| f.metric == "events_per_second" && f.mode == "ack=none" && f.case.contains("actix-broker"),
        judged: Judged::Ratio(Fig::ratio),
        bound: 1.0,
    },
    Goal {
        what: "failover p99 ≤ 1 s (kill → first event handled elsewhere)",
        scenario: "cluster",
        pick: |f| f.metric == "samples_ms" && f.case.starts_with("kill"),
        judged: Judged::P99,
        bound: 1000.0,
    },
    Goal {
        what: "`scale`: failover p99 ≤ 1 s with every node a process on this machine (kill → first event handled elsewhere)",
        scenario: "scale",
        pick: |f| f.metric == "samples_ms" && f.case.starts_with("kill"),
        judged: Judged::P99,
        bound: 1000.0,
    },
    Goal {
        what: "`scale`: idle CPU < 1 % of a core on every node",
        scenario: "scale",
        pick: |f| f.metric == "cpu_percent",
        judged: Judged::Max,
        bound: 1.0,
    },
    Goal {
        what: "`scale`: RSS < 40 MB on every node at idle",
        scenario: "scale",
        pick: |f| f.metric == "rss_mib",
        judged: Judged::Max,
        // 40 MB in MiB.
        bound: 40e6 / (1024.0 * 1024.0),
    },
];

/// The goal's measured figures (`0.42× (16 B)`, `p50 20 ms, p99 640 ms over 20 kills`, or
/// `max 0.61 % over 20 nodes`) and whether all met it.
fn judge(goal: &Goal, figs: &[Fig]) -> Option<(String, bool)> {
    let mine: Vec<&Fig> = figs
        .iter()
        .filter(|f| f.scenario == goal.scenario && (goal.pick)(f))
        .collect();
    mine.first()?;
    let finite = |f: &Fig| {
        let mut v: Vec<f64> = f.herald.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    // Several rows (the `scale` sizes): each must meet the goal, and each is named by its mode.
    let named = |f: &Fig, text: String| {
        if mine.len() > 1 && !f.mode.is_empty() {
            format!("{}: {text}", f.mode)
        } else {
            text
        }
    };
    match goal.judged {
        // Per row: the figure judged against the bound, and how the report shows it.
        Judged::P99 | Judged::Max => {
            let mut met = true;
            let parts: Vec<String> = mine
                .iter()
                .map(|f| {
                    let v = finite(f);
                    let (figure, text) = if matches!(goal.judged, Judged::P99) {
                        let p99 = percentile(&v, 0.99);
                        let text = format!(
                            "p50 {} ms, p99 {} ms over {} kills",
                            fmt_ms(percentile(&v, 0.5)),
                            fmt_ms(p99),
                            v.len()
                        );
                        (p99, text)
                    } else {
                        let max = v.last().copied().unwrap_or(f64::NAN);
                        let text = format!(
                            "max {} {}, median {} over {} nodes",
                            fmt_ms(max),
                            metric_label(&f.metric),
                            fmt_ms(percentile(&v, 0.5)),
                            v.len()
                        );
                        (max, text)
                    };
                    // A p99 meets its bound at it; a per-node maximum must stay below it.
                    met &= if matches!(goal.judged, Judged::P99) {
                        figure <= goal.bound
                    } else {
                        figure < goal.bound
                    };
                    named(f, text)
                })
                .collect();
            Some((parts.join("; "), met))
        }
        Judged::Ratio(ratio) => {
            let mut met = true;
            let parts: Vec<String> = mine
                .iter()
                .map(|f| match ratio(f) {
                    Some(r) => {
                        met &= r >= goal.bound;
                        format!("{r:.2}× ({})", f.case)
                    }
                    None => {
                        met = false;
                        format!("- ({})", f.case)
                    }
                })
                .collect();
            Some((parts.join(", "), met))
        }
    }
}

/// Documented failure-detection defaults of the peers (not run here), in ms.
pub(super) const PEER_FAILOVER_DEFAULTS: &[(&str, f64)] = &[
    ("Dapr ~3 s", 3_000.0),
    ("Akka unreachable ~5 s", 5_000.0),
    ("Orleans dead ~15 s", 15_000.0),
    ("Akka downed ~25 s", 25_000.0),
];

fn fmt_ms(v: f64) -> String {
    super::compare::fmt_value(Metric::P50Ms, v)
}

fn fmt_runs(metric: &str, v: &[f64]) -> String {
    super::compare::fmt_summary_with(Metric::from_name(metric), v, "–")
}

fn metric_label(metric: &str) -> &str {
    match metric {
        "events_per_second" => "events/s",
        "p50_ms" => "p50 ms",
        "p99_ms" => "p99 ms",
        "p999_ms" => "p99.9 ms",
        "samples_ms" => "ms",
        "cpu_percent" => "% of a core",
        "writes_per_second" => "write syscalls/s",
        "rss_mib" => "RSS MiB",
        "pss_mib" => "PSS MiB",
        "anon_mib" => "anonymous MiB",
        "bytes" => "heap bytes",
        "kib" => "heap KiB",
        other => other,
    }
}

/// What each scenario measures, for the reader of the report.
fn describe(name: &str) -> &'static str {
    match name {
        "local" => {
            "Publish → no-op Rust handler inside one node (in-process through `Publisher`, one event per call, no \
             HTTP), next to raw actix from one task to a no-op actor on another thread: `do_send` of an empty \
             message, `do_send` of the same event Herald carries, and `send` of it with each answer awaited (a \
             request/response per event, as Herald's supervisor needs for acks and retries). Herald publishes \
             with `publish` (`ack=none`; answers the event's id, topic and subscription count) or with `emit` \
             (`ack=none`, answers accepted or refused only: Herald's `do_send`, the goal's row against \
             `do_send` of the same event, like for like). Then `actix-broker`'s system broker (what a Rust user \
             would pick for in-process publish/subscribe on actix: `Broker::issue_async` of the same event) to \
             one subscriber actor, and to three, next to Herald emitting to one subscription and to a topic of \
             three subscriptions (events/s counts published events; each of the three handles every one). Each \
             subscription has one handler instance, like for like with the one raw actor and actix-broker's \
             subscribers on one arbiter. The rows take turns slice by slice: each run is ten slices, each round \
             runs a slice of every row in turn, so Herald's run `i` and its peer's run `i` met the same moments \
             of the machine (which flips between a fast and a slow mode for seconds at a time)."
        }
        "nats" => {
            "Cross-node at-most-once: Herald `ack=none` (HTTP batches to node 1, handlers on nodes 2 and 3) next to \
             NATS core pub/sub (publisher on server 1, queue subscribers on servers 2 and 3), three processes each, \
             on loopback; same payloads and publishing pattern, runs alternating. Herald's peers talk mutual TLS \
             1.3 (the default); a second Herald cluster with plaintext peers (`--insecure-peers`) runs in the same \
             rotation, so the table shows what mTLS costs. NATS runs TLS on its client connections and routes \
             (`verify: true`, certificates from the same CA as Herald's, the clients present one). Latency is \
             publish → receive at a paced rate."
        }
        "jetstream" => {
            "Cross-node at-least-once: Herald `ack=accepted` (WAL, fsync always; mTLS peers) next to NATS \
             JetStream with memory storage (acked async publish, durable pull consumer with explicit acks; TLS \
             on clients and routes), same layout as above, runs alternating."
        }
        "http" => {
            "HTTP publish, one event per request, to one node whose subscription runs the no-op `bench-sink`, \
             next to a bare actix-web server (same worker count) answering 202 on the same path. Events/s \
             in a closed loop at several concurrencies; latency percentiles in an open loop at a fixed rate, \
             measured from each request's intended send time (no coordinated omission). `ack=accepted` \
             waits for the WAL's fsync; `ack=none` measures what routing costs on top of HTTP."
        }
        "cluster" => {
            "Herald alone on a 3-node loopback cluster: cross-node throughput and paced latency, then failover: \
             SIGKILL the node running a one-instance subscription while events are published to a survivor, \
             and time kill → first event handled on another node (read from the handlers' own clocks)."
        }
        "membership" => {
            "Herald alone on a 3-node loopback cluster: subscribe → placed, a new node's start → its first \
             placed instance, and leader kill → the survivors agree on a new leader."
        }
        "memory" => {
            "One in-process node, its heap counted by this binary's allocator (net bytes requested, without the \
             allocator's overhead): the node itself, started and ready with no subscription; per idle subscription instance (one-instance subscriptions of a no-op Rust \
             handler, each having handled one event, so its actor runs), and per in-flight event (events held \
             behind a handler that has not answered its first delivery, with `ack=accepted`, WAL included, and \
             `ack=none`), then what each left once all were handled."
        }
        "scale" => {
            "Many node processes on this one machine (mutual TLS between them): the last node's start → ready \
             and → its first placed instance, once the others have placed one-instance subscriptions; then, \
             with the cluster idle and agreed, each node's CPU (% of one core), write syscalls/s (its peer \
             messages and log lines), RSS, PSS (the program's code, shared by the nodes, divided among them) and \
             anonymous memory; leader kill → every survivor names the same new leader, and the \
             restarted node's start → all agree again; and the `cluster` scenario's failover rounds over all \
             the nodes. The per-node rows give the median (min–max) over the nodes."
        }
        _ => "",
    }
}

fn markdown(
    invocation: &str,
    date: &str,
    took: Duration,
    m: &Machine,
    outcomes: &[Outcome],
    plots: &[(String, String)],
    plot_dir: &str,
) -> String {
    let mut s = String::new();
    let figs: Vec<Fig> = outcomes
        .iter()
        .filter_map(|o| o.doc.as_ref().ok())
        .flat_map(rows)
        .collect();
    let _ = writeln!(s, "# Herald benchmarks\n");
    let _ = writeln!(
        s,
        "Written by `{invocation}` on {date} in {:.0} min. Every peer figure comes from the same run on the \
         same machine; absolute figures drift on shared machines, so read the ratios. Regenerate with \
         `cargo run --release -p herald-bench -- report` (needs \
         Debian's `nats-server`).\n",
        took.as_secs_f64() / 60.0
    );
    let _ = writeln!(s, "## Machine\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| CPU | {} ({} cores seen) |", m.cpu, m.cores);
    let _ = writeln!(s, "| memory | {} |", m.memory);
    let _ = writeln!(s, "| OS | {}, Linux {} |", m.os, m.kernel);
    let _ = writeln!(s, "| herald | {} |", m.herald);
    let _ = writeln!(s, "| nats-server | {} |\n", m.nats);

    let _ = writeln!(s, "## Goals\n");
    let _ = writeln!(s, "| goal | measured | met |\n|---|---|---|");
    for g in GOALS {
        match judge(g, &figs) {
            Some((text, met)) => {
                let _ = writeln!(s, "| {} | {text} | {} |", g.what, if met { "yes" } else { "**no**" });
            }
            None => {
                let _ = writeln!(s, "| {} | not measured in this run | - |", g.what);
            }
        }
    }
    let _ = writeln!(
        s,
        "\nNo false downs under CPU saturation is a test, not a figure: \
         `tests/failover.rs::a_cpu_saturated_machine_marks_no_node_down`.\n"
    );

    for o in outcomes {
        let _ = writeln!(s, "## `{}`\n", o.name);
        let _ = writeln!(s, "{}\n", describe(o.name));
        let _ = writeln!(s, "```\n{}\n```\n", o.command);
        let doc = match &o.doc {
            Ok(d) => d,
            Err(e) => {
                let _ = writeln!(s, "**This scenario {e}** after {:.0} s.\n", o.took.as_secs_f64());
                continue;
            }
        };
        let _ = writeln!(s, "Took {:.0} s.\n", o.took.as_secs_f64());
        let figs = rows(doc);
        let (with_peer, alone): (Vec<&Fig>, Vec<&Fig>) = figs.iter().partition(|f| f.peer.is_some());
        if !with_peer.is_empty() {
            let peer = with_peer[0].peer.as_ref().map_or("", |p| p.0.as_str());
            let plain = with_peer.iter().any(|f| !f.plain.is_empty());
            let fmt_ratio = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}×"));
            if plain {
                let _ = writeln!(
                    s,
                    "| case | metric | Herald mTLS median (min–max) | Herald plaintext median (min–max) | {peer} median (min–max) | Herald mTLS / {peer} | mTLS / plaintext | better |"
                );
                let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
            } else {
                let _ = writeln!(
                    s,
                    "| case | metric | Herald median (min–max) | {peer} median (min–max) | Herald / {peer} | better |"
                );
                let _ = writeln!(s, "|---|---|---|---|---|---|");
            }
            for f in &with_peer {
                let p = f.peer.as_ref().map(|p| p.1.as_slice()).unwrap_or_default();
                let mut cells = vec![
                    f.label(),
                    metric_label(&f.metric).to_string(),
                    fmt_runs(&f.metric, &f.herald),
                ];
                if plain {
                    cells.push(fmt_runs(&f.metric, &f.plain));
                }
                cells.extend([fmt_runs(&f.metric, p), fmt_ratio(f.ratio())]);
                if plain {
                    cells.push(fmt_ratio(f.tls_ratio()));
                }
                cells.push(if f.higher_is_better { "higher" } else { "lower" }.to_string());
                let _ = writeln!(s, "| {} |", cells.join(" | "));
            }
            s.push('\n');
        }
        let (samples, single): (Vec<&Fig>, Vec<&Fig>) = alone.into_iter().partition(|f| f.metric == "samples_ms");
        if !single.is_empty() {
            let _ = writeln!(s, "| case | metric | Herald |\n|---|---|---|");
            for f in single {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    f.label(),
                    metric_label(&f.metric),
                    fmt_runs(&f.metric, &f.herald)
                );
            }
            s.push('\n');
        }
        if !samples.is_empty() {
            let _ = writeln!(
                s,
                "| timing | n | p50 ms | p99 ms | min–max ms |\n|---|---|---|---|---|"
            );
            // The mode names the rows only where it tells them apart (the `scale` sizes).
            let modes_differ = samples.iter().any(|f| f.mode != samples[0].mode);
            for f in samples {
                let mut ms: Vec<f64> = f.herald.iter().copied().filter(|x| x.is_finite()).collect();
                ms.sort_by(f64::total_cmp);
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {}–{} |",
                    if modes_differ { f.label() } else { f.case.clone() },
                    ms.len(),
                    fmt_ms(percentile(&ms, 0.5)),
                    fmt_ms(percentile(&ms, 0.99)),
                    fmt_ms(ms.first().copied().unwrap_or(f64::NAN)),
                    fmt_ms(ms.last().copied().unwrap_or(f64::NAN))
                );
            }
            s.push('\n');
            if o.name == "cluster" {
                let defaults: Vec<String> = PEER_FAILOVER_DEFAULTS.iter().map(|(n, _)| n.to_string()).collect();
                let _ = writeln!(
                    s,
                    "Documented failure-detection defaults of the peers, for context (not run here): {}.\n",
                    defaults.join("; ")
                );
            }
        }
        let mut notes: Vec<String> = doc["meta"]["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w.as_str().map(str::to_string))
            .collect();
        if let Some(p) = doc["meta"]["peer_description"].as_str() {
            notes.insert(0, format!("peer: {p}"));
        }
        if let Some(line) = doc["meta"]["stalls"]["line"].as_str() {
            notes.push(line.to_string());
        }
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
        for (scenario, file) in plots {
            if scenario == o.name {
                let _ = writeln!(s, "\n![{scenario}: {file}]({plot_dir}/{file})");
            }
        }
        s.push('\n');
    }
    s
}

/// The figures grouped by case label, in first-seen order (for the plots).
pub(super) fn by_label<'a>(figs: &'a [Fig], metric: &str) -> Vec<(String, &'a Fig)> {
    let mut seen = BTreeMap::new();
    let mut out = Vec::new();
    for f in figs.iter().filter(|f| f.metric == metric) {
        if seen.insert(f.label(), ()).is_none() {
            out.push((f.label(), f));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{compare, record};
    use super::*;
    use serde_json::json;

    fn doc(rows: Vec<Value>) -> Value {
        json!({"meta": {"warnings": ["one warning"], "stalls": {"line": "machine stalls: cpu 0 …"}}, "rows": rows})
    }

    fn outcome(name: &'static str, doc: Result<Value, String>) -> Outcome {
        Outcome {
            name,
            command: format!("herald-bench {name} --runs 3"),
            took: Duration::from_secs(12),
            doc,
        }
    }

    #[test]
    fn the_report_judges_goals_and_tabulates_every_scenario() {
        let nats = doc(vec![
            record::row(
                "nats",
                "ack=none",
                "16 B",
                "events_per_second",
                true,
                &[200.0, 300.0],
                Some(("nats", &[400.0, 400.0])),
            ),
            record::row(
                "nats",
                "ack=none",
                "1 KiB",
                "events_per_second",
                true,
                &[500.0],
                Some(("nats", &[400.0])),
            ),
            record::row(
                "nats",
                "ack=none",
                "16 B",
                "p99_ms",
                false,
                &[2.0],
                Some(("nats", &[1.0])),
            ),
        ]);
        let rounds: Vec<f64> = (1..=20).map(|i| i as f64 * 10.0).collect();
        let cluster = doc(vec![
            record::row(
                "cluster",
                "ack=none",
                "max rate",
                "events_per_second",
                true,
                &[1e5],
                None,
            ),
            record::row(
                "cluster",
                "ack=accepted",
                "kill -> first event handled elsewhere",
                "samples_ms",
                false,
                &rounds,
                None,
            ),
        ]);
        let scale = doc(vec![
            record::row(
                "scale",
                "5 nodes",
                "idle CPU per node",
                "cpu_percent",
                false,
                &[0.4, 0.6, 0.8],
                None,
            ),
            record::row(
                "scale",
                "20 nodes",
                "idle CPU per node",
                "cpu_percent",
                false,
                &[0.4, 0.6, 1.2],
                None,
            ),
            record::row(
                "scale",
                "20 nodes",
                "idle RSS per node",
                "rss_mib",
                false,
                &[20.0, 30.0, 35.0],
                None,
            ),
            record::row(
                "scale",
                "5 nodes",
                "kill -> first event handled elsewhere",
                "samples_ms",
                false,
                &[20.0],
                None,
            ),
            record::row(
                "scale",
                "20 nodes",
                "kill -> first event handled elsewhere",
                "samples_ms",
                false,
                &[1200.0],
                None,
            ),
        ]);
        let outcomes = vec![
            outcome("nats", Ok(nats)),
            outcome("cluster", Ok(cluster)),
            outcome("local", Err("failed (exit status: 1)".into())),
            outcome("scale", Ok(scale)),
        ];
        let md = markdown(
            "herald-bench report",
            "2026-11-27 08:00 UTC",
            Duration::from_secs(600),
            &Machine::default(),
            &outcomes,
            &[("nats".into(), "nats-throughput.svg".into())],
            "benchmarks",
        );
        assert!(
            md.contains(
                "| cross-node `ack=none`, Herald with mTLS ≥ 1.0× NATS core with TLS (events/s) | 0.62× (16 B), 1.25× (1 KiB) | **no** |"
            ),
            "{md}"
        );
        assert!(
            md.contains("(mTLS / plaintext ≥ 0.85, events/s) | - (16 B), - (1 KiB) | **no** |"),
            "{md}"
        );
        assert!(md.contains("p50 110 ms, p99 200 ms over 20 kills | yes |"), "{md}");
        assert!(
            md.contains("| local dispatch ≥ 0.5× raw actix `do_send` of the same `Event`, like for like (events/s; issue 16 point 1) | not measured in this run | - |"),
            "{md}"
        );
        assert!(
            md.contains("| ack=none, 16 B | events/s | 250 (200–300) | 400 (400–400) | 0.62× | higher |"),
            "{md}"
        );
        assert!(md.contains("| ack=none, max rate | events/s | 100.0k |"), "{md}");
        assert!(
            md.contains("| kill -> first event handled elsewhere | 20 | 110 | 200 | 10.0–200 |"),
            "{md}"
        );
        assert!(md.contains("**This scenario failed (exit status: 1)**"), "{md}");
        // One node over the bound fails the goal; the per-node rows read median (min–max).
        assert!(
            md.contains("| `scale`: idle CPU < 1 % of a core on every node | 5 nodes: max 0.80 % of a core, median 0.60 over 3 nodes; 20 nodes: max 1.20 % of a core, median 0.60 over 3 nodes | **no** |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| `scale`: RSS < 40 MB on every node at idle | max 35.0 RSS MiB, median 30.0 over 3 nodes | yes |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| 20 nodes, idle CPU per node | % of a core | 0.60 (0.40–1.20) |"),
            "{md}"
        );
        // Every size must meet it; the timing rows are told apart by their size.
        assert!(
            md.contains("(kill → first event handled elsewhere) | 5 nodes: p50 20.0 ms, p99 20.0 ms over 1 kills; 20 nodes: p50 1200 ms, p99 1200 ms over 1 kills | **no** |"),
            "{md}"
        );
        assert!(
            md.contains("| 20 nodes, kill -> first event handled elsewhere | 1 | 1200 | 1200 | 1200–1200 |"),
            "{md}"
        );
        assert!(
            md.contains("![nats: nats-throughput.svg](benchmarks/nats-throughput.svg)"),
            "{md}"
        );
        assert!(md.contains("- one warning"), "{md}");
        assert!(md.contains("- machine stalls: cpu 0 …"), "{md}");
    }

    #[test]
    fn plaintext_figures_give_the_mtls_goal_and_columns() {
        let figures = vec![compare::Row {
            payload_bytes: 16,
            label: None,
            metric: compare::Metric::EventsPerSecond,
            herald: vec![90.0, 95.0],
            peer: vec![80.0, 100.0],
            plain: vec![100.0, 100.0],
        }];
        let nats = compare::json_rows("nats", "ack=none", "nats+tls", &json!({}), &figures);
        let figs = rows(&nats);
        assert_eq!(figs[0].plain, [100.0, 100.0]);
        assert_eq!(figs[0].tls_ratio(), Some(0.925));
        let md = markdown(
            "herald-bench report",
            "2026-12-03 10:00 UTC",
            Duration::from_secs(60),
            &Machine::default(),
            &[outcome("nats", Ok(nats))],
            &[],
            "benchmarks",
        );
        assert!(
            md.contains("(mTLS / plaintext ≥ 0.85, events/s) | 0.93× (16 B) | yes |"),
            "{md}"
        );
        assert!(
            md.contains("Herald with mTLS ≥ 1.0× NATS core with TLS (events/s) | 1.03× (16 B) | yes |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| ack=none, 16 B | events/s | 92 (90–95) | 100 (100–100) | 90 (80–100) | 1.03× | 0.93× | higher |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| Herald mTLS / nats+tls | mTLS / plaintext | better |"),
            "{md}"
        );
    }

    #[test]
    fn rows_fall_back_to_the_payload_size_and_read_missing_runs_as_nan() {
        let d = json!({"rows": [{"scenario": "jetstream", "herald_mode": "ack=accepted", "peer": "jetstream",
            "payload_bytes": 1024, "metric": "p50_ms", "better": "lower",
            "herald": {"runs": [1.0, null]}, "peer_figures": {"runs": [2.0]}}]});
        let r = rows(&d);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].case, "1 KiB");
        assert!(r[0].herald[1].is_nan());
        assert_eq!(r[0].ratio(), Some(0.5));
        assert!(!r[0].higher_is_better);
        assert_eq!(r[0].label(), "ack=accepted, 1 KiB");
    }

    #[test]
    fn plans_follow_only_and_smoke() {
        let a = ReportArgs {
            out: "B.md".into(),
            plots: None,
            runs: 2,
            failovers: 20,
            only: vec!["cluster".into(), "nats".into()],
            smoke: true,
            nats_server: None,
        };
        let p = plans(&a);
        assert_eq!(p.iter().map(|p| p.name).collect::<Vec<_>>(), ["nats", "cluster"]);
        assert_eq!(p[0].args, ["--runs", "2", "--herald-peers", "both", "--smoke"]);
        assert_eq!(p[1].args, ["--failovers", "20", "--herald-peers", "both", "--smoke"]);
        assert_eq!(relative_to(Path::new("out/benchmarks"), Path::new("out")), "benchmarks");
    }
}
