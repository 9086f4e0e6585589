//! `herald-bench scale`: a cluster of many node processes on this one machine (default 20).
//!
//! The nodes (`herald-bench node`, mutual TLS between them, as users run them) start on free
//! ports: node 1 founds the cluster and nodes 2…N−1 join it. `--subscriptions` one-instance
//! subscriptions of the `bench-sink` handler are spread over them. Then, in order:
//!
//! 1. **join**: node N starts and joins; timed from its start to its `/readyz` and to the first
//!    instance the leader places on it;
//! 2. **idle**: once every node agrees on the table (the same leader and placement epoch, every
//!    member up), each node's CPU time (`/proc/<pid>/stat`), write syscalls (`/proc/<pid>/io`: the
//!    peer messages and log lines it sends) over `--idle-seconds`, then its RSS, and its PSS and
//!    anonymous memory (`/proc/<pid>/smaps_rollup`: the program's code is shared by the nodes);
//! 3. **leader kills**: SIGKILL the Raft leader; timed until every survivor names the same new
//!    leader in a later term, then until the restarted node agrees with them too;
//! 4. **failover**: the `cluster` scenario's failover rounds over all N nodes — SIGKILL the node
//!    running a one-instance subscription while a survivor is published to, and time kill → first
//!    event handled on another node, read from the handlers' own clocks.
//!
//! The figures go to stdout and, with `--json`, to the report ([`super::record`]). No figure is
//! checked here: the report judges them against the goals (idle CPU < 1 % of a core and RSS
//! < 40 MB per node, failover p99 ≤ 1 s).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

use super::cluster::{self, get_json, http, Cluster, LOG_TAIL, SINK};
use super::{latency_row, record};
use herald::harness::NodeSpec;

/// `herald-bench scale` arguments.
#[derive(Args, Debug)]
pub(super) struct ScaleArgs {
    /// Node processes; the last one joins after the others have placed the subscriptions, and is
    /// timed. Several sizes (`5,10,20`) run one after another, each on a new cluster.
    #[arg(long, value_delimiter = ',', default_values_t = [20u64], value_parser = clap::value_parser!(u64).range(3..=64))]
    nodes: Vec<u64>,
    /// One-instance `bench-sink` subscriptions spread over the nodes before the last one joins.
    #[arg(long, default_value_t = 100)]
    subscriptions: usize,
    /// Seconds over which each node's idle CPU, write syscalls and RSS are measured.
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
    /// Leader kills, each timed until the survivors agree on a new leader.
    #[arg(long, default_value_t = 3)]
    leader_kills: usize,
    /// Failover rounds: each SIGKILLs the node running a one-instance subscription, then restarts
    /// it.
    #[arg(long, default_value_t = 10)]
    failovers: usize,
    /// Events/s published (ack=accepted) to a surviving node during a failover round.
    #[arg(long, default_value_t = 500)]
    failover_rate: u64,
    /// A smoke run: one cluster of at most 5 nodes, 10 subscriptions, 3 s idle, 1 leader kill, 2
    /// failover rounds.
    #[arg(long)]
    smoke: bool,
    /// Keep the nodes' data directories and logs (the path is printed) instead of removing them.
    #[arg(long)]
    keep: bool,
    /// Also write the figures as JSON to this file (for `herald-bench report`).
    #[arg(long)]
    json: Option<PathBuf>,
}

const MIB: f64 = 1024.0 * 1024.0;

/// How long the whole cluster gets to become ready, and each wait for agreement.
const READY_WITHIN: Duration = Duration::from_secs(180);

/// `herald-bench scale`.
pub(super) fn run(mut a: ScaleArgs) -> Result<(), String> {
    if a.smoke {
        a.nodes = vec![a.nodes.iter().copied().min().unwrap_or(5).min(5)];
        a.subscriptions = a.subscriptions.min(10);
        a.idle_seconds = a.idle_seconds.min(3);
        a.leader_kills = a.leader_kills.min(1);
        a.failovers = a.failovers.min(2);
    }
    if a.idle_seconds == 0 || a.failover_rate == 0 {
        return Err("--idle-seconds and --failover-rate must be positive".into());
    }
    a.nodes.sort_unstable();
    a.nodes.dedup();
    let mut rows = Vec::new();
    for &n in &a.nodes {
        let started = Instant::now();
        let mut c = cluster::start_on_free_ports("herald-bench-scale", (n - 1) as usize, None, false, a.keep)?;
        let outcome = actix_rt::System::new().block_on(async {
            let signal = herald::node::shutdown_signal();
            tokio::select! {
                r = scenario(&mut c, &a, n, started) => r,
                _ = signal => Err("interrupted".to_string()),
            }
        });
        match outcome {
            Ok(r) => rows.extend(r),
            Err(e) => {
                c.print_logs(LOG_TAIL);
                return Err(format!("{n} nodes: {e}"));
            }
        }
    }
    if let Some(path) = &a.json {
        let meta = serde_json::json!({
            "command": "herald-bench scale",
            "time": chrono::Utc::now().to_rfc3339(),
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "nodes": a.nodes,
            "subscriptions": a.subscriptions,
            "idle_seconds": a.idle_seconds,
        });
        record::write(path, meta, rows)?;
    }
    Ok(())
}

/// What one node used while the cluster was idle.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Idle {
    /// CPU time over wall time, in % of one core.
    cpu_percent: f64,
    /// `write`-family syscalls per second.
    writes_per_s: f64,
    /// Resident set at the end, MiB.
    rss_mib: f64,
    /// Proportional set at the end, MiB: the pages shared with the other nodes (the program's
    /// code) divided among them.
    pss_mib: f64,
    /// Anonymous memory at the end, MiB (heap, stacks: what is the node's alone).
    anon_mib: f64,
}

/// CPU seconds (user + system) of a `/proc/<pid>/stat` text, with `ticks` clock ticks a second.
fn cpu_seconds(stat: &str, ticks: f64) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces: count after its `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14 and stime field 15 (1-based).
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// The `syscw` (write-family syscalls) of a `/proc/<pid>/io` text.
fn write_syscalls(io: &str) -> Option<f64> {
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The `Pss:` and `Anonymous:` lines of a `/proc/<pid>/smaps_rollup` text, in bytes.
fn pss_and_anon(rollup: &str) -> Option<(f64, f64)> {
    let field = |name: &str| {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib * 1024.0)
    };
    Some((field("Pss:")?, field("Anonymous:")?))
}

/// (CPU seconds, write syscalls) of process `pid` so far.
fn usage(pid: u32) -> Result<(f64, f64), String> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("process {pid}: {e}"))?;
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).map_err(|e| format!("process {pid}: {e}"))?;
    let cpu = cpu_seconds(&stat, ticks).ok_or_else(|| format!("process {pid}: unreadable stat"))?;
    let writes = write_syscalls(&io).ok_or_else(|| format!("process {pid}: no syscw in io"))?;
    Ok((cpu, writes))
}

/// `Some((leader, epoch))` when every running node names the same leader and placement epoch,
/// in a term after `after_term`, and (when given) sees `up` members up.
async fn agreed(c: &Cluster, poll: &awc::Client, up: Option<usize>, after_term: u64) -> Option<(u64, u64)> {
    let mut seen = None;
    for n in c.nodes().iter().filter(|n| n.running()) {
        let v = get_json(poll, &format!("http://{}/v1/cluster", n.http())).await.ok()?;
        let seen_up = v["members"].as_array()?.iter().filter(|m| m["status"] == "up").count();
        if up.is_some_and(|up| up != seen_up) || v["term"].as_u64()? <= after_term {
            return None;
        }
        let this = (v["leader"].as_u64()?, v["epoch"].as_u64()?);
        if seen.is_some_and(|s| s != this) {
            return None;
        }
        seen = Some(this);
    }
    seen
}

/// Polls [`agreed`] until it holds; returns the agreement and the time it took.
async fn wait_agreed(
    c: &Cluster,
    poll: &awc::Client,
    up: Option<usize>,
    after_term: u64,
    what: &str,
) -> Result<((u64, u64), Duration), String> {
    let t0 = Instant::now();
    loop {
        if let Some(a) = agreed(c, poll, up, after_term).await {
            return Ok((a, t0.elapsed()));
        }
        if t0.elapsed() > READY_WITHIN {
            return Err(format!("{what}: the nodes did not agree within {READY_WITHIN:?}"));
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The nodes each subscription runs on, as node `id` sees the placement.
async fn placements(c: &Cluster, poll: &awc::Client, id: u64) -> Result<Vec<Vec<u64>>, String> {
    let p = get_json(poll, &format!("http://{}/v1/cluster/placements", http(c, id))).await?;
    Ok(p.as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            s["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .collect()
        })
        .collect())
}

/// One cluster of `n` nodes; returns its rows, each with the mode `<n> nodes`.
async fn scenario(c: &mut Cluster, a: &ScaleArgs, n: u64, started: Instant) -> Result<Vec<Value>, String> {
    let client = crate::cluster::node_client(Duration::from_secs(30), 64);
    let poll = crate::cluster::node_client(Duration::from_secs(5), crate::cluster::CONNECTIONS);
    c.wait_ready(READY_WITHIN).await?;
    let formed = started.elapsed();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "herald-bench scale: {n} herald processes on 127.0.0.1 ({cores} cores), mutual TLS between them ({})",
        c.dir().display()
    );
    println!("{} nodes started and ready in {:.1} s", n - 1, formed.as_secs_f64());
    cluster::check_peers(c, false)?;

    // Subscriptions, spread by the leader over the n − 1 nodes.
    for i in 0..a.subscriptions {
        let spec = serde_json::json!({
            "topic": format!("bench.scale.{i}"), "group": "sink",
            "handler": {"kind": "rust", "name": SINK}, "instances": 1,
        });
        cluster::create_subscription(c, &client, &spec).await?;
    }
    let t0 = Instant::now();
    loop {
        let p = placements(c, &poll, 1).await?;
        if p.len() >= a.subscriptions && p.iter().all(|nodes| !nodes.is_empty()) {
            break;
        }
        if t0.elapsed() > READY_WITHIN {
            return Err(format!(
                "the {} subscriptions were not all placed within {READY_WITHIN:?}",
                a.subscriptions
            ));
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    wait_agreed(c, &poll, Some((n - 1) as usize), 0, "after subscribing").await?;
    println!("{} subscriptions placed on {} nodes", a.subscriptions, n - 1);

    // The last node joins.
    let peer = cluster::free_ports(1)?[0];
    let seed = c.node(1)?.peer().to_string();
    let t0 = Instant::now();
    c.start(NodeSpec {
        id: n,
        http: "127.0.0.1:0".into(),
        peer: format!("127.0.0.1:{peer}"),
        join: vec![seed],
        args: Vec::new(),
    })?;
    c.wait_ready(READY_WITHIN).await?;
    let join_ready = t0.elapsed();
    let join_placed = loop {
        if placements(c, &poll, 1).await?.iter().any(|nodes| nodes.contains(&n)) {
            break t0.elapsed();
        }
        if t0.elapsed() > READY_WITHIN {
            return Err(format!("node {n} got no instance within {READY_WITHIN:?} of its start"));
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "node {n} joined: ready {:.0} ms, first instance placed on it {:.0} ms after its start",
        ms(join_ready),
        ms(join_placed)
    );

    // Idle.
    wait_agreed(c, &poll, Some(n as usize), 0, "after the join").await?;
    let pids: Vec<(u64, u32)> = c.nodes().iter().filter_map(|n| Some((n.id(), n.pid()?))).collect();
    let before: Vec<(f64, f64)> = pids.iter().map(|(_, pid)| usage(*pid)).collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    actix_rt::time::sleep(Duration::from_secs(a.idle_seconds)).await;
    let wall = t0.elapsed().as_secs_f64();
    let mut idle = Vec::new();
    for ((id, pid), (cpu0, writes0)) in pids.iter().zip(&before) {
        let (cpu1, writes1) = usage(*pid)?;
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("process {pid}: {e}"))?;
        let (rss, _threads) = super::soak::parse_status(&status).ok_or_else(|| format!("process {pid}: no VmRSS"))?;
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).map_err(|e| format!("process {pid}: {e}"))?;
        let (pss, anon) = pss_and_anon(&rollup).ok_or_else(|| format!("process {pid}: no Pss/Anonymous"))?;
        idle.push((
            *id,
            Idle {
                cpu_percent: (cpu1 - cpu0) / wall * 100.0,
                writes_per_s: (writes1 - writes0) / wall,
                rss_mib: rss / MIB,
                pss_mib: pss / MIB,
                anon_mib: anon / MIB,
            },
        ));
    }
    // The cluster must have stayed idle and whole: a churning table would not be an idle figure.
    wait_agreed(c, &poll, Some(n as usize), 0, "after the idle sample").await?;
    println!("\nidle over {wall:.1} s, per node:");
    println!(
        "{:>5} {:>12} {:>10} {:>9} {:>9} {:>10}",
        "node", "CPU % core", "writes/s", "RSS MiB", "PSS MiB", "anon MiB"
    );
    for (id, i) in &idle {
        println!(
            "{id:>5} {:>12.2} {:>10.1} {:>9.1} {:>9.1} {:>10.1}",
            i.cpu_percent, i.writes_per_s, i.rss_mib, i.pss_mib, i.anon_mib
        );
    }

    // Leader kills.
    let mut survivors_agree = Vec::new();
    let mut all_agree = Vec::new();
    for round in 1..=a.leader_kills {
        let old = c.leader().await?;
        c.kill(old.id)?;
        let ((leader, _), took) = wait_agreed(c, &poll, None, old.term, "after a leader kill").await?;
        if leader == old.id {
            return Err(format!("the survivors agree on the killed node {leader} as leader"));
        }
        let t0 = Instant::now();
        c.restart(old.id)?;
        c.wait_ready(READY_WITHIN).await?;
        let (_, rejoin) = wait_agreed(c, &poll, Some(n as usize), old.term, "after the restart").await?;
        let rejoin = t0.elapsed().max(rejoin);
        println!(
            "leader kill {round}/{}: killed node {} (term {}); the {} survivors agree on node {leader} after {:.0} ms; restarted, all {n} agree {:.0} ms after its start",
            a.leader_kills,
            old.id,
            old.term,
            n - 1,
            ms(took),
            ms(rejoin)
        );
        survivors_agree.push(ms(took));
        all_agree.push(ms(rejoin));
    }

    // Failover of a subscription's instance, over all n nodes.
    let rounds = cluster::failover(c, &client, &poll, a.failovers, a.failover_rate, 1000).await?;
    let failover_ms: Vec<f64> = rounds.iter().map(|(ms, _)| *ms).collect();

    println!(
        "\n{:<40} {:>6} {:>10} {:>10} {:>10}",
        "timing", "n", "p50 ms", "p99 ms", "max ms"
    );
    let timings = [
        ("start -> ready (all but the last node)", vec![ms(formed)]),
        ("join -> ready (the last node)", vec![ms(join_ready)]),
        ("join -> placed (the last node)", vec![ms(join_placed)]),
        ("leader kill -> survivors agree", survivors_agree),
        ("leader restart -> all agree", all_agree),
        ("kill -> first event handled elsewhere", failover_ms),
    ];
    for (case, v) in &timings {
        println!("{}", latency_row(case, v.clone()));
    }
    let column = |f: fn(&Idle) -> f64| idle.iter().map(|(_, i)| f(i)).collect::<Vec<f64>>();
    let (cpu, writes, rss, pss, anon) = (
        column(|i| i.cpu_percent),
        column(|i| i.writes_per_s),
        column(|i| i.rss_mib),
        column(|i| i.pss_mib),
        column(|i| i.anon_mib),
    );
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "idle per node (max over {n}): CPU {:.2} % of a core, {:.0} write syscalls/s, RSS {:.1} MiB, PSS {:.1} MiB, anonymous {:.1} MiB",
        max(&cpu),
        max(&writes),
        max(&rss),
        max(&pss),
        max(&anon)
    );
    let mode = format!("{n} nodes");
    let row = |case: &str, metric: &str, v: &[f64]| record::row("scale", &mode, case, metric, false, v, None);
    let mut rows: Vec<Value> = timings.iter().map(|(case, v)| row(case, "samples_ms", v)).collect();
    rows.push(row("idle CPU per node", "cpu_percent", &cpu));
    rows.push(row("idle write syscalls per node", "writes_per_second", &writes));
    rows.push(row("idle RSS per node", "rss_mib", &rss));
    rows.push(row(
        "idle PSS per node (shared code divided among the nodes)",
        "pss_mib",
        &pss,
    ));
    rows.push(row("idle anonymous memory per node", "anon_mib", &anon));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_gives_user_plus_system_seconds_past_a_name_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime …
        let stat = "4242 (herald bench) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 12 0";
        assert_eq!(cpu_seconds(stat, 100.0), Some(3.0));
        assert_eq!(cpu_seconds("4242 (x) S 1", 100.0), None);
    }

    #[test]
    fn smaps_rollup_gives_pss_and_anonymous_bytes() {
        let rollup = "5555-7777 ---p 00000000 00:00 0 [rollup]\nRss: 41524 kB\nPss: 30233 kB\nPss_Anon: 27748 kB\nAnonymous: 27748 kB\n";
        assert_eq!(pss_and_anon(rollup), Some((30233.0 * 1024.0, 27748.0 * 1024.0)));
        assert_eq!(pss_and_anon("Rss: 1 kB\n"), None);
    }

    #[test]
    fn proc_io_gives_the_write_syscalls() {
        let io = "rchar: 10\nwchar: 20\nsyscr: 3\nsyscw: 7\nread_bytes: 0\n";
        assert_eq!(write_syscalls(io), Some(7.0));
        assert_eq!(write_syscalls("rchar: 10\n"), None);
    }
}
