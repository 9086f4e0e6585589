//! `herald up`: a local cluster of node processes for development.
//!
//! Starts N processes of the running binary (so a user's binary with its own Rust handlers
//! starts nodes that run them), node 1 first and the others joining it, each with its own ports,
//! data directory and log file. Waits until every node is ready, prints the URLs and how to
//! publish, and on Ctrl-C or SIGTERM stops every node gracefully (SIGTERM, then SIGKILL after a
//! grace period). Running it again on the same directory resumes the same cluster.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

/// `herald up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// How many nodes (1 to 9).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
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
}

/// One started node.
pub struct NodeProc {
    /// Node id.
    pub id: u16,
    /// HTTP address, IP:port.
    pub http: String,
    /// Peer address, IP:port.
    pub peer: String,
    /// The file its stdout and stderr go to.
    pub log: std::path::PathBuf,
    /// The process.
    pub child: Child,
}

/// Runs `herald up` until Ctrl-C.
pub(crate) fn run(a: UpArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("cannot create {}: {e}", a.dir.display()))?;
    let last_peer = u32::from(a.base_port) + 100 + u32::from(a.nodes) - 1;
    if last_peer > u32::from(u16::MAX) {
        return Err(format!("--base-port {} leaves no room for the peer ports", a.base_port));
    }
    let seed = format!("127.0.0.1:{}", a.base_port + 100);
    let mut nodes: Vec<NodeProc> = Vec::new();
    for id in 1..=a.nodes {
        let http = format!("127.0.0.1:{}", a.base_port + id - 1);
        let peer = format!("127.0.0.1:{}", a.base_port + 100 + id - 1);
        let data = a.dir.join(format!("node-{id}"));
        let log = a.dir.join(format!("node-{id}.log"));
        match start(&exe, id, &http, &peer, &data, &log, (id > 1).then_some(seed.as_str())) {
            Ok(child) => nodes.push(NodeProc {
                id,
                http,
                peer,
                log,
                child,
            }),
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e);
            }
        }
        eprintln!(
            "started node {id}: http://{}  (log {})",
            nodes[nodes.len() - 1].http,
            log_name(&nodes[nodes.len() - 1].log)
        );
    }
    let outcome = actix_rt::System::new().block_on(async {
        let signal = crate::node::shutdown_signal();
        tokio::pin!(signal);
        tokio::select! {
            r = wait_ready(&mut nodes, Duration::from_secs(a.ready_timeout)) => {
                r?;
            }
            _ = &mut signal => return Ok(()),
        }
        print_summary(&nodes);
        tokio::select! {
            _ = &mut signal => Ok(()),
            e = watch_children(&mut nodes) => Err(e),
        }
    });
    eprintln!("stopping {} nodes…", nodes.len());
    stop_all(&mut nodes);
    outcome
}

fn log_name(p: &Path) -> String {
    p.display().to_string()
}

/// Starts `exe node` with this id, addresses and data dir (joining `join` if given), its stdout
/// and stderr written to `log`.
pub fn start(
    exe: &Path,
    id: u16,
    http: &str,
    peer: &str,
    data: &Path,
    log: &Path,
    join: Option<&str>,
) -> Result<Child, String> {
    let out = File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .args(["--node-id", &id.to_string(), "--http", http, "--peer", peer])
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some(seed) = join {
        cmd.args(["--join", seed]);
    }
    cmd.spawn().map_err(|e| format!("cannot start node {id}: {e}"))
}

/// Polls every node's `/readyz` until all answer 200, printing progress; fails if a node exits.
pub async fn wait_ready(nodes: &mut [NodeProc], timeout: Duration) -> Result<(), String> {
    let client = awc::Client::builder().timeout(Duration::from_secs(2)).finish();
    let started = Instant::now();
    let mut ready = vec![false; nodes.len()];
    let mut last_report = Instant::now();
    while ready.iter().any(|r| !r) {
        for (i, n) in nodes.iter_mut().enumerate() {
            if let Ok(Some(status)) = n.child.try_wait() {
                return Err(format!(
                    "node {} exited ({status}) during start-up; see {}",
                    n.id,
                    log_name(&n.log)
                ));
            }
            if !ready[i] {
                let ok = client
                    .get(format!("http://{}/readyz", n.http))
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                if ok {
                    ready[i] = true;
                    eprintln!("node {} ready ({:.1} s)", n.id, started.elapsed().as_secs_f64());
                }
            }
        }
        if started.elapsed() > timeout {
            let waiting: Vec<u16> = nodes
                .iter()
                .zip(&ready)
                .filter(|(_, r)| !**r)
                .map(|(n, _)| n.id)
                .collect();
            return Err(format!(
                "nodes {waiting:?} not ready after {timeout:?}; see their logs in the data dir"
            ));
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "waiting for {} of {} nodes…",
                ready.iter().filter(|r| !**r).count(),
                nodes.len()
            );
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Resolves with a message when a node exits on its own.
async fn watch_children(nodes: &mut [NodeProc]) -> String {
    loop {
        for n in nodes.iter_mut() {
            if let Ok(Some(status)) = n.child.try_wait() {
                return format!("node {} exited ({status}); see {}", n.id, log_name(&n.log));
            }
        }
        actix_rt::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_summary(nodes: &[NodeProc]) {
    println!("\nHerald cluster of {} nodes is up:\n", nodes.len());
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                format!("http://{}", n.http),
                n.peer.clone(),
                log_name(&n.log),
            ]
        })
        .collect();
    println!("{}\n", crate::text::table(&["NODE", "HTTP", "PEER", "LOG"], &rows));
    let url = format!("http://{}", nodes[0].http);
    println!("Publish to any node:");
    println!(
        "  curl -XPOST {url}/v1/topics/user.login/events -H 'content-type: application/json' -d '{{\"user_id\":42}}'"
    );
    println!("Inspect:");
    println!("  herald status --url {url}      curl {url}/metrics");
    println!("\nCtrl-C stops every node.");
}

/// SIGTERM every running node, wait for them, SIGKILL whoever is left after the grace period.
pub fn stop_all(nodes: &mut [NodeProc]) {
    for n in nodes.iter_mut() {
        if let Ok(None) = n.child.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &n.child.id().to_string()]).status();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in nodes.iter_mut() {
        loop {
            match n.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    eprintln!("node {} did not stop in time; killing it", n.id);
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
