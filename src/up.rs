//! `herald up`: a local cluster of node processes for development.
//!
//! Starts N processes of the running binary (so a user's binary with its own Rust handlers
//! starts nodes that run them), node 1 first and the others joining it, each with its own ports,
//! data directory and log file. Waits until every node is ready, prints the URLs and how to
//! publish, and on Ctrl-C or SIGTERM stops every node gracefully (SIGTERM, then SIGKILL after a
//! grace period). Running it again on the same directory resumes the same cluster.
//!
//! One `up` per directory: the running one holds `<dir>/up.lock` (its pid). A second `up` on the
//! same directory finds it before touching any file (the nodes' logs and data are the running
//! cluster's) and exits with an error naming the pid; a lock whose process is gone is taken over.
//!
//! The summary names the program as it was started (its file name), so a user's own node binary
//! shows its own commands.
//!
//! A node that exits on its own (killed to watch failover, or crashed) does not stop the others:
//! `up` says so and starts it again after `--restart-after` seconds, longer each time it dies again
//! soon after a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;

use crate::harness::{Harness, HarnessError, Node, Ports};

/// `herald up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// How many nodes (1 to 64; 20 run on a 2-core machine, see BENCHMARKS.md `scale`).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nodes: u16,
    /// HTTP port of node 1; node i listens on base-port + i - 1, and its peer port is 100 higher.
    #[arg(long, default_value_t = 7070)]
    pub base_port: u16,
    /// Where the nodes keep their data and logs (node-1/, node-1.log, …). Running `up` again
    /// resumes the same cluster.
    #[arg(long, default_value = "herald-up")]
    pub dir: PathBuf,
    /// How long to wait for every node to be ready, in seconds.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout: u64,
    /// Seconds before a node that exited on its own is started again (doubling, up to a minute,
    /// while it keeps dying within a minute of its restart); 0 leaves it stopped.
    #[arg(long, default_value_t = 5)]
    pub restart_after: u64,
}

/// How long the nodes get to stop after SIGTERM before they are SIGKILLed.
const GRACE: Duration = Duration::from_secs(15);

/// Runs `herald up` until Ctrl-C.
pub(crate) fn run(a: UpArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    let last_peer = u32::from(a.base_port) + 100 + u32::from(a.nodes) - 1;
    if last_peer > u32::from(u16::MAX) {
        return Err(format!("--base-port {} leaves no room for the peer ports", a.base_port));
    }
    // Before anything in the directory is touched: it may be a running cluster's.
    let _lock = UpLock::take(&a.dir)?;
    let mut h = Harness::new(exe, &a.dir).map_err(|e| e.to_string())?.progress(true);
    let program = program_name(std::env::args_os().next());
    actix_rt::System::new().block_on(async {
        let outcome = up(&mut h, &a, &program).await;
        let running = h.nodes().iter().filter(|n| n.running()).count();
        if running > 0 {
            eprintln!("stopping {running} nodes…");
        }
        h.stop_all(GRACE).await;
        outcome
    })
}

/// Starts the nodes, waits for them, prints the summary and keeps them up until a signal or until
/// one exits.
async fn up(h: &mut Harness, a: &UpArgs, program: &str) -> Result<(), String> {
    h.start_cluster(u64::from(a.nodes), &Ports::Base(a.base_port))
        .map_err(|e| e.to_string())?;
    for n in h.nodes() {
        eprintln!("started node {}: {}  (log {})", n.id(), n.url(), n.log().display());
    }
    let signal = crate::node::shutdown_signal();
    tokio::pin!(signal);
    tokio::select! {
        r = h.wait_ready(Duration::from_secs(a.ready_timeout)) => r.map_err(|e| e.to_string())?,
        _ = &mut signal => return Ok(()),
    }
    print_summary(h.nodes(), a.restart_after, h.dir(), program);
    // Restarts so far, per node: how many in a row came soon after the previous one, and when.
    let mut restarts: HashMap<u64, (u32, Instant)> = HashMap::new();
    loop {
        let exited = tokio::select! {
            _ = &mut signal => return Ok(()),
            e = h.exited() => e,
        };
        let HarnessError::Exited { id, status, log, .. } = &exited else {
            return Err(exited.to_string());
        };
        let id = *id;
        if a.restart_after == 0 {
            eprintln!(
                "node {id} exited ({status}); the other nodes keep running (see {}). Ctrl-C stops them.",
                log.display()
            );
            continue;
        }
        let previous = restarts.get(&id).map(|(n, at)| (*n, at.elapsed()));
        let (delay, in_a_row) = restart_delay(Duration::from_secs(a.restart_after), previous);
        eprintln!(
            "node {id} exited ({status}); the other nodes keep running. Starting it again in {}s (see {}); Ctrl-C stops every node.",
            delay.as_secs(),
            log.display()
        );
        tokio::select! {
            _ = &mut signal => return Ok(()),
            _ = actix_rt::time::sleep(delay) => {}
        }
        h.restart(id).map_err(|e| e.to_string())?;
        restarts.insert(id, (in_a_row, Instant::now()));
        if let Ok(n) = h.node(id) {
            eprintln!("started node {id} again: {}", n.url());
        }
    }
}

/// The name to show for this program in commands: the file name it was started as (`argv[0]`),
/// `herald` when there is none.
fn program_name(argv0: Option<std::ffi::OsString>) -> String {
    argv0
        .as_deref()
        .map(Path::new)
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "herald".to_string())
}

/// The file a running `up` holds in its directory, naming its pid.
const LOCK_FILE: &str = "up.lock";

/// `<dir>/up.lock` while this `up` runs; removed when dropped.
struct UpLock {
    path: PathBuf,
}

impl UpLock {
    /// Takes the directory for this process, or says which `up` holds it. A lock left by a
    /// process that no longer runs (a killed `up`) is taken over.
    fn take(dir: &Path) -> Result<UpLock, String> {
        use std::io::Write;
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        for _ in 0..3 {
            match std::fs::File::options().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let lock = UpLock { path };
                    writeln!(f, "{}", std::process::id())
                        .map_err(|e| format!("cannot write {}: {e}", lock.path.display()))?;
                    return Ok(lock);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    match holder.trim().parse::<u32>() {
                        Ok(pid) if alive(pid) => {
                            return Err(format!(
                                "another herald up (pid {pid}) is running the cluster in {}: stop it first (Ctrl-C), or give another --dir (if no process {pid} runs, remove {})",
                                dir.display(),
                                path.display()
                            ))
                        }
                        // Being written by an `up` that has just taken it.
                        Err(_) if just_made(&path) => {
                            return Err(format!(
                                "another herald up is starting in {}: stop it first, or give another --dir",
                                dir.display()
                            ))
                        }
                        // Its process is gone: the lock is stale.
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
            }
        }
        Err(format!(
            "cannot take {}: another herald up keeps taking it",
            path.display()
        ))
    }
}

impl Drop for UpLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether process `pid` runs (`kill -0`).
fn alive(pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `path` was modified in the last few seconds.
fn just_made(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < Duration::from_secs(5))
}

/// A restart that comes this soon after the previous one counts as the node dying again.
const SOON: Duration = Duration::from_secs(60);

/// How long to wait before restarting a node, and how many restarts in a row this one makes:
/// `base` for a node that ran a while (or never was restarted), doubling for each restart that
/// came within [`SOON`] of the previous one, up to [`SOON`].
fn restart_delay(base: Duration, previous: Option<(u32, Duration)>) -> (Duration, u32) {
    let in_a_row = match previous {
        Some((n, since)) if since < SOON => n + 1,
        _ => 0,
    };
    let delay = base.saturating_mul(1 << in_a_row.min(6)).min(SOON.max(base));
    (delay, in_a_row)
}

fn print_summary(nodes: &[Node], restart_after: u64, dir: &Path, program: &str) {
    println!("\nHerald cluster of {} nodes is up:\n", nodes.len());
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id().to_string(),
                n.url().to_string(),
                n.peer().to_string(),
                n.log().display().to_string(),
            ]
        })
        .collect();
    println!("{}\n", crate::text::table(&["NODE", "HTTP", "PEER", "LOG"], &rows));
    println!(
        "The nodes talk mutual TLS; the cluster's CA and their certificates are in {}.\n",
        dir.join("tls").display()
    );
    let url = nodes.first().map(Node::url).unwrap_or_default().to_string();
    println!("Publish to any node:");
    println!(
        "  curl -XPOST {url}/v1/topics/user.login/events -H 'content-type: application/json' -d '{{\"user_id\":42,\"username\":\"ada\",\"login_time\":\"2026-11-26T10:00:00Z\"}}'"
    );
    println!("Inspect:");
    println!("  {program} status --url {url}      curl {url}/metrics");
    if restart_after > 0 {
        println!(
            "\nKill a node to watch failover: the others take its work, and up starts it again after {restart_after}s."
        );
    }
    println!("Ctrl-C stops every node.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_named_by_its_file_name() {
        assert_eq!(program_name(Some("/opt/acme/bin/acme-events".into())), "acme-events");
        assert_eq!(program_name(Some("./herald".into())), "herald");
        assert_eq!(program_name(Some("".into())), "herald");
        assert_eq!(program_name(None), "herald");
    }

    #[test]
    fn one_up_holds_a_directory_and_a_stale_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lock = UpLock::take(dir.path()).unwrap();
        let held = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(held.trim(), std::process::id().to_string());
        let e = UpLock::take(dir.path()).err().expect("a second up is refused");
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains(&dir.path().display().to_string()),
            "{e}"
        );
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists(), "the lock is removed when up ends");
        // A lock naming a process that has exited (a killed up) is taken over.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id();
        gone.wait().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), format!("{pid}\n")).unwrap();
        let _lock = UpLock::take(dir.path()).expect("a stale lock is taken over");
    }

    #[test]
    fn restarts_back_off_only_while_a_node_keeps_dying() {
        let base = Duration::from_secs(5);
        assert_eq!(restart_delay(base, None), (base, 0));
        assert_eq!(restart_delay(base, Some((0, Duration::from_secs(10)))), (base * 2, 1));
        assert_eq!(restart_delay(base, Some((1, Duration::from_secs(10)))), (base * 4, 2));
        assert_eq!(restart_delay(base, Some((5, Duration::from_secs(1)))), (SOON, 6));
        // A node that ran for longer than a minute starts over.
        assert_eq!(restart_delay(base, Some((5, SOON + Duration::from_secs(1)))), (base, 0));
    }
}
