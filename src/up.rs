//! `herald up`: a local cluster of node processes for development.
//!
//! Starts N processes of the running binary (so a user's binary with its own Rust handlers
//! starts nodes that run them), node 1 first and the others joining it, each with its own ports,
//! data directory and log file. Waits until every node is ready, prints the URLs and how to
//! publish, and on Ctrl-C or SIGTERM stops every node gracefully (SIGTERM, then SIGKILL after a
//! grace period). Running it again on the same directory resumes the same cluster.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::harness::{Harness, Node, Ports};

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

/// How long the nodes get to stop after SIGTERM before they are SIGKILLed.
const GRACE: Duration = Duration::from_secs(15);

/// Runs `herald up` until Ctrl-C.
pub(crate) fn run(a: UpArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    let last_peer = u32::from(a.base_port) + 100 + u32::from(a.nodes) - 1;
    if last_peer > u32::from(u16::MAX) {
        return Err(format!("--base-port {} leaves no room for the peer ports", a.base_port));
    }
    let mut h = Harness::new(exe, &a.dir).map_err(|e| e.to_string())?.progress(true);
    actix_rt::System::new().block_on(async {
        let outcome = up(&mut h, &a).await;
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
async fn up(h: &mut Harness, a: &UpArgs) -> Result<(), String> {
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
    print_summary(h.nodes());
    tokio::select! {
        _ = &mut signal => Ok(()),
        e = h.exited() => Err(e.to_string()),
    }
}

fn print_summary(nodes: &[Node]) {
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
    let url = nodes.first().map(Node::url).unwrap_or_default().to_string();
    println!("Publish to any node:");
    println!(
        "  curl -XPOST {url}/v1/topics/user.login/events -H 'content-type: application/json' -d '{{\"user_id\":42}}'"
    );
    println!("Inspect:");
    println!("  herald status --url {url}      curl {url}/metrics");
    println!("\nCtrl-C stops every node.");
}
