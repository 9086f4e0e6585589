//! `herald up`: a local cluster of node processes, stopped by Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A base port whose HTTP ports (base..base+n) and peer ports (base+100..) are free right now.
fn free_base(n: u16) -> u16 {
    for attempt in 0..200u32 {
        let base = 20_000 + ((std::process::id() * 7919 + attempt * 104_729) % 30_000) as u16;
        let free = (0..n)
            .flat_map(|i| [base + i, base + 100 + i])
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free port range found");
}

#[test]
fn herald_up_starts_a_cluster_and_ctrl_c_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base(3);
    let mut up = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["up", "--nodes", "3", "--base-port", &base.to_string(), "--dir"])
        .arg(dir.path().join("up"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn herald up");
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
