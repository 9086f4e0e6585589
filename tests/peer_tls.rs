//! Mutual TLS between nodes, as a user sets it up: `herald cert`, real `herald node` processes,
//! the secure default (no certificate, no start), certificate reload, and a node from another
//! CA kept out. The attacks on a running cluster are in `tests/hostile.rs`; the handshake's
//! refusals one by one are unit tests in `transport::handshake`.

mod common;

use std::path::Path;

use common::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `herald node` for a configuration that must be refused: its exit code and stderr.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["node", "--http", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let o = cli_blocking(&all);
    (o.status.code(), text(&o.stderr))
}

#[test]
fn a_node_without_certificates_refuses_to_start_unless_told_insecure_on_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (code, err) = refused(&["--data-dir", p(&data)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("peer_tls") && err.contains("herald cert") && err.contains("--insecure-peers"),
        "{err}"
    );

    let (code, err) = refused(&["--data-dir", p(&data), "--insecure-peers", "--peer", "0.0.0.0:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("only on loopback") && err.contains("0.0.0.0"), "{err}");

    let (code, err) = refused(&[
        "--data-dir",
        p(&data),
        "--insecure-peers",
        "--peer",
        "127.0.0.1:0",
        "--advertise",
        "herald-1.example:7170",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("advertised"), "{err}");

    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret").expect("write");
    let (code, err) = refused(&[
        "--data-dir",
        p(&data),
        "--insecure-peers",
        "--cluster-secret-file",
        p(&secret),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("was removed") && err.contains("herald cert"), "{err}");

    let (code, err) = refused(&["--data-dir", p(&data), "--peer-ca", p(&secret)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("peer_tls.cert") && err.contains("peer_tls.key"), "{err}");

    // With the flag, on loopback, it runs, and says what it gives up.
    let (node, rx) = spawn_herald_stderr(&["--data-dir", p(&data), "--insecure-peers"], &[]);
    let lines = lines_until(&rx, "insecure peers");
    assert!(lines.iter().any(|l| l.contains("WARN")), "{lines:?}");
    drop(node);
}

#[test]
fn herald_cert_makes_a_ca_and_node_certificates_and_refuses_to_overwrite_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let o = cli_blocking(&["cert", "ca", "--dir", p(&ca), "--cluster", "blue"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("ca.key"), "{}", text(&o.stdout));
    let o = cli_blocking(&["cert", "ca", "--dir", p(&ca), "--cluster", "blue"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("--force"), "{}", text(&o.stderr));

    let out = dir.path().join("n2");
    let o = cli_blocking(&[
        "cert",
        "node",
        "--ca-dir",
        p(&ca),
        "--out",
        p(&out),
        "--id",
        "2",
        "--dns",
        "herald-1",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let cert = std::fs::read_to_string(out.join("node.pem")).expect("node.pem");
    let der = herald::pki::first_cert_der(&cert).expect("a certificate");
    assert_eq!(
        herald::pki::peer_identity(&der),
        Some(herald::pki::NodeIdentity {
            cluster: "blue".into(),
            node: 2
        })
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("node.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key is private");
    }
    let o = cli_blocking(&["cert", "node", "--ca-dir", p(&ca), "--out", p(&out), "--id", "2"]);
    assert_eq!(o.status.code(), Some(1), "no overwrite without --force");

    // A node of another cluster id cannot use it, and says why.
    let (code, err) = refused(&[
        "--data-dir",
        p(&dir.path().join("data")),
        "--node-id",
        "2",
        "--peer-ca",
        p(&out.join("ca.pem")),
        "--peer-cert",
        p(&out.join("node.pem")),
        "--peer-key",
        p(&out.join("node.key")),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cluster \"blue\"") && err.contains("\"herald\""), "{err}");
}

/// Node `id`'s flags for the certificates in `dir/n<id>`.
fn tls_args(dir: &Path, id: u64) -> Vec<String> {
    let d = dir.join(format!("n{id}"));
    [
        "--peer-ca",
        "ca.pem",
        "--peer-cert",
        "node.pem",
        "--peer-key",
        "node.key",
    ]
    .chunks(2)
    .flat_map(|f| [f[0].to_string(), d.join(f[1]).display().to_string()])
    .collect()
}

fn issue(ca_dir: &Path, out: &Path, id: u64, extra: &[&str]) {
    let mut args = vec!["cert", "node", "--ca-dir", p(ca_dir), "--out", p(out), "--id"];
    let id = id.to_string();
    args.push(&id);
    args.extend_from_slice(extra);
    let o = cli_blocking(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[actix_rt::test]
async fn nodes_with_certificates_form_a_cluster_reload_a_renewed_one_and_keep_another_ca_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, stranger) = (dir.path().join("ca"), dir.path().join("stranger-ca"));
    for d in [&ca, &stranger] {
        let o = cli_blocking(&["cert", "ca", "--dir", p(d)]);
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    for id in [1, 2] {
        issue(&ca, &dir.path().join(format!("n{id}")), id, &[]);
    }
    // Node 3 has a certificate for this cluster id, from a CA the cluster does not trust.
    issue(&stranger, &dir.path().join("n3"), 3, &[]);
    let config = dir.path().join("herald.toml");
    std::fs::write(&config, "[peer_tls]\nreload_interval_ms = 100\n").expect("config");

    let ports = herald::harness::free_ports(3).expect("ports");
    let peer = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let start = |id: u64, join: Option<String>| {
        let mut args: Vec<String> = vec![
            "--config".into(),
            p(&config).into(),
            "--node-id".into(),
            id.to_string(),
            "--peer".into(),
            peer(id as usize - 1),
            "--data-dir".into(),
            dir.path().join(format!("data-{id}")).display().to_string(),
        ];
        args.extend(tls_args(dir.path(), id));
        if let Some(j) = join {
            args.extend(["--join".to_string(), j]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_herald_stderr(&args, &[])
    };
    let (n1, _rx1) = start(1, None);
    let (n2, _rx2) = start(2, Some(peer(0)));
    let urls = vec![n1.url.clone(), n2.url.clone()];
    common::views::wait_formed(&urls, &[1, 2]).await;

    // The certificate in use expires in about a year; a renewed one (30 days) is picked up.
    let expiry = |text: &str| metric(text, "herald_peer_tls_cert_not_after_seconds", &[]);
    let before = expiry(&get_text(&format!("{}/metrics", n1.url)).await).expect("the expiry gauge");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(before - now > 300.0 * 86_400.0, "{before} vs {now}");
    issue(&ca, &dir.path().join("n1"), 1, &["--days", "30", "--force"]);
    let url = n1.url.clone();
    let after = eventually("node 1 reloads its renewed certificate", || {
        let url = url.clone();
        async move {
            let text = get_text(&format!("{url}/metrics")).await;
            let t = expiry(&text)?;
            let reloads = metric(&text, "herald_peer_tls_reloads_total", &[("outcome", "ok")])?;
            (t < before && reloads >= 1.0).then_some(t)
        }
    })
    .await;
    assert!((after - now - 30.0 * 86_400.0).abs() < 2.0 * 3600.0, "{after} vs {now}");
    // New connections use it: cut node 2 off by restarting it, and it comes back in.
    drop(n2);
    let (n2, _rx2) = start(2, Some(peer(0)));
    let url2 = n2.url.clone();
    eventually("node 2 is back, talking to node 1 with its renewed certificate", || {
        let url2 = url2.clone();
        async move { (get(&format!("{url2}/readyz")).await.0 == 200).then_some(()) }
    })
    .await;

    // The stranger's node is refused by TLS on both sides and never joins.
    let (_n3, rx3) = start(3, Some(peer(0)));
    let lines = lines_until(&rx3, "TLS handshake failed");
    assert!(lines.last().is_some_and(|l| l.contains("127.0.0.1")), "{lines:?}");
    let (_, v) = get(&format!("{}/v1/cluster", n1.url)).await;
    let ids: Vec<u64> = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![1, 2], "{v}");
}
