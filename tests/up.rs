//! `herald up`: a local cluster of node processes, stopped by Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A running `herald up`: the child, and its stdout and stderr lines as they come (stderr is also
/// echoed to the test's stderr).
struct Up {
    child: std::process::Child,
    stdout: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
}

/// Starts `<program> up --nodes <n> --base-port <base> --dir <dir>` and the given flags.
fn spawn_up(program: &std::path::Path, dir: &std::path::Path, n: u16, base: u16, flags: &[&str]) -> Up {
    let mut child = Command::new(program)
        .args([
            "up",
            "--nodes",
            &n.to_string(),
            "--base-port",
            &base.to_string(),
            "--dir",
        ])
        .arg(dir)
        .args(flags)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald up");
    let lines = |pipe: Box<dyn std::io::Read + Send>, echo: bool| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("{line}");
                }
                let _ = tx.send(line);
            }
        });
        rx
    };
    let stdout = lines(Box::new(child.stdout.take().unwrap()), false);
    let stderr = lines(Box::new(child.stderr.take().unwrap()), true);
    Up { child, stdout, stderr }
}

impl Up {
    /// The summary `up` prints once every node is ready.
    fn summary(&mut self) -> String {
        let mut summary = Vec::new();
        loop {
            let line = self.stdout.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
                let _ = self.child.kill();
                panic!("herald up printed no summary:\n{}", summary.join("\n"))
            });
            let done = line.contains("Ctrl-C stops every node");
            summary.push(line);
            if done {
                return summary.join("\n");
            }
        }
    }

    /// Ctrl-C (SIGINT to `up` alone); waits for it to exit and returns its status.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("herald up did not stop within {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // A failed test leaves no `up` (whose nodes stop with it) behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
    }
}

#[test]
fn herald_up_starts_a_cluster_and_ctrl_c_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_port_base(3);
    let mut up = spawn_up(
        std::path::Path::new(env!("CARGO_BIN_EXE_herald")),
        &dir.path().join("up"),
        3,
        base,
        &["--restart-after", "1"],
    );
    let started = Instant::now();
    let text = up.summary();
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
    let nodes = node_children(up.child.id());
    assert_eq!(nodes.len(), 3, "herald up runs 3 node processes: {nodes:?}");
    let (killed_pid, _) = *nodes.iter().find(|(_, id)| *id == 2).expect("node 2's process");
    Command::new("kill")
        .args(["-KILL", &killed_pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut said = Vec::new();
    loop {
        while let Ok(line) = up.stderr.try_recv() {
            said.push(line);
        }
        assert!(
            up.child.try_wait().unwrap().is_none(),
            "herald up stopped when one node died:\n{}",
            said.join("\n")
        );
        let restarted = node_children(up.child.id())
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
    let status = up.interrupt();
    assert!(status.success(), "herald up exited with {status}");
    for url in &urls {
        assert!(
            get_blocking(url, "/healthz").is_none(),
            "{url} still answers after herald up stopped"
        );
    }
}

/// The README's first command, `cargo run --release --example user_login -- up`, then its `curl`:
/// the example binary (built by `cargo test` with the other examples) starts a 3-node cluster with
/// its `audit-logins` handler, and the README's login event is handled (`ack=processed`: the
/// answer waits for the handler). Then Ctrl-C stops it.
#[test]
fn the_readme_first_command_runs_the_example_cluster_and_handles_the_readme_event() {
    // target/<profile>/deps/up-<hash> → target/<profile>/examples/user_login
    let example = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join("user_login"))
        .unwrap();
    assert!(
        example.is_file(),
        "{} is missing: `cargo test` builds the examples; run the suite with `cargo test --workspace`",
        example.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let base = free_port_base(3);
    let mut up = spawn_up(&example, &dir.path().join("up"), 3, base, &[]);
    let text = up.summary();
    assert!(text.contains("Herald cluster of 3 nodes is up"), "{text}");
    let url = format!("http://127.0.0.1:{base}");
    // The README's event, as its curl sends it.
    let (status, body) = post_json_blocking(
        &url,
        "/v1/topics/user.login/events?ack=processed",
        r#"{"user_id":42,"username":"ada","login_time":"2026-11-26T10:00:00Z"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let outcomes = answer["outcomes"].as_array().cloned().unwrap_or_default();
    assert!(
        outcomes
            .iter()
            .any(|o| o["topic"] == "user.login" && o["group"] == "audit" && o["outcome"] == "ok"),
        "the example's audit handler did not handle the README's event: {answer}"
    );
    let status = up.interrupt();
    assert!(status.success(), "the example's up exited with {status}");
}

/// A user's node binary (here `herald` under another name) runs `up`: the summary shows its own
/// name in its commands. A second `up` on the same directory is refused before it touches the
/// running cluster's files, naming the running one's pid. Ctrl-C then stops the whole cluster
/// without any node waiting to hand its subscriptions to the others (which are stopping too),
/// and without an ERROR line in any log (issue 18: bug 6, rough edges 12 and 15).
#[test]
fn a_second_up_on_a_running_directory_is_refused_and_ctrl_c_stops_the_cluster_without_hand_over_waits() {
    let tmp = tempfile::tempdir().unwrap();
    let program = tmp.path().join("acme-events");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_herald"), &program).unwrap();
    let dir = tmp.path().join("cluster");
    let base = free_port_base(3);
    let mut up = spawn_up(&program, &dir, 3, base, &[]);
    let text = up.summary();
    assert!(
        text.contains(&format!("acme-events status --url http://127.0.0.1:{base}")),
        "{text}"
    );
    assert!(!text.contains("herald status"), "{text}");
    // A subscription, so that every node holds work it could hand over when it stops.
    let url = format!("http://127.0.0.1:{base}");
    let args = [
        "subscribe",
        "up.stop",
        "trail",
        "--handler",
        "log",
        "--instances",
        "3",
        "--url",
        &url,
    ];
    let o = run_to_exit(herald_cmd(&args.map(String::from)));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let logs: Vec<_> = (1..=3).map(|i| dir.join(format!("node-{i}.log"))).collect();
    let sizes: Vec<u64> = logs.iter().map(|l| std::fs::metadata(l).unwrap().len()).collect();
    let other_base = free_port_base(3).to_string();
    let args = [
        "up",
        "--ready-timeout",
        "5",
        "--base-port",
        &other_base,
        "--dir",
        p(&dir),
    ];
    let second = run_to_exit(herald_cmd(&args.map(String::from)));
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "a second up on a running directory succeeded: {said}"
    );
    assert!(
        said.contains(&format!("pid {}", up.child.id())) && said.contains(&dir.display().to_string()),
        "the refusal names neither the running up nor the directory: {said}"
    );
    for (log, before) in logs.iter().zip(&sizes) {
        let now = std::fs::metadata(log).unwrap().len();
        assert!(now >= *before, "{} shrank from {before} to {now} bytes", log.display());
    }
    assert!(
        get_blocking(&url, "/readyz").is_some_and(|(status, _)| status == 200),
        "the running cluster was disturbed"
    );

    let status = up.interrupt();
    assert!(status.success(), "herald up exited with {status}");
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("could not hand") || l.contains(" ERROR "))
            .collect();
        assert!(bad.is_empty(), "{}:\n{}", log.display(), bad.join("\n"));
        assert!(
            text.contains("herald node stopped"),
            "{} did not stop gracefully:\n{text}",
            log.display()
        );
    }
    assert!(!dir.join("up.lock").exists(), "up left its lock behind");
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
