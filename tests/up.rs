//! `herald up`: a local cluster of node processes, stopped by Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn herald_up_starts_a_cluster_and_ctrl_c_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_port_base(3);
    let mut up = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "up",
            "--nodes",
            "3",
            "--restart-after",
            "1",
            "--base-port",
            &base.to_string(),
            "--dir",
        ])
        .arg(dir.path().join("up"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald up");
    // up's progress lines, shown as they come and kept for the assertions below.
    let stderr = up.stderr.take().unwrap();
    let (err_tx, err_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            let _ = err_tx.send(line);
        }
    });
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The summary comes once every node is ready.
    let started = Instant::now();
    let mut summary = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let _ = up.kill();
            panic!("herald up printed no summary:\n{}", summary.join("\n"))
        });
        let done = line.contains("Ctrl-C stops every node");
        summary.push(line);
        if done {
            break;
        }
    }
    let text = summary.join("\n");
    assert!(text.contains("Herald cluster of 3 nodes is up"), "{text}");
    eprintln!("herald up: 3 nodes ready after {:?}", started.elapsed());
    let urls: Vec<String> = (0..3).map(|i| format!("http://127.0.0.1:{}", base + i)).collect();
    for url in &urls {
        assert!(text.contains(url.as_str()), "summary lacks {url}:\n{text}");
        let (status, body) = get_blocking(url, "/v1/cluster").expect("node answers");
        assert_eq!(status, 200, "{body}");
        let view: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(view["members"].as_array().map(Vec::len), Some(3), "{view}");
        assert!(view["leader"].as_u64().is_some(), "{view}");
    }
    // A node killed with SIGKILL (as the README invites, to watch failover) does not stop the
    // others: up reports it and starts it again.
    let nodes = node_children(up.id());
    assert_eq!(nodes.len(), 3, "herald up runs 3 node processes: {nodes:?}");
    let (killed_pid, _) = *nodes.iter().find(|(_, id)| *id == 2).expect("node 2's process");
    Command::new("kill")
        .args(["-KILL", &killed_pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut said = Vec::new();
    loop {
        while let Ok(line) = err_rx.try_recv() {
            said.push(line);
        }
        assert!(
            up.try_wait().unwrap().is_none(),
            "herald up stopped when one node died:\n{}",
            said.join("\n")
        );
        let restarted = node_children(up.id())
            .iter()
            .any(|(pid, id)| *id == 2 && *pid != killed_pid);
        let reported =
            said.iter().any(|l| l.contains("node 2 exited")) && said.iter().any(|l| l.contains("started node 2 again"));
        if restarted
            && reported
            && urls
                .iter()
                .all(|u| get_blocking(u, "/readyz").is_some_and(|(status, _)| status == 200))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 was not restarted and ready again within 60 s:\n{}",
            said.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for url in [&urls[0], &urls[2]] {
        let (status, body) = get_blocking(url, "/v1/cluster").expect("node answers");
        assert_eq!(status, 200, "{body}");
    }

    // Ctrl-C (SIGINT to herald up alone) stops every node and exits 0.
    Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = up.kill();
            panic!("herald up did not stop within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "herald up exited with {status}");
    for url in &urls {
        assert!(
            get_blocking(url, "/healthz").is_none(),
            "{url} still answers after herald up stopped"
        );
    }
}

/// `(pid, node id)` of the `herald node` processes whose parent is `parent` (from /proc: the
/// node id is the argument after `--node-id` on their command line).
fn node_children(parent: u32) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: the command may hold spaces, so split after its ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Some(id) = args
            .iter()
            .position(|a| a == "--node-id")
            .and_then(|i| args.get(i + 1))
            .and_then(|id| id.parse().ok())
        {
            out.push((pid, id));
        }
    }
    out
}
