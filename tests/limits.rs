//! Resource limits a client cannot get around (issue 14, "Bounded everything" and "Input"): the
//! HTTP connection cap, the request head and body deadlines (slowloris), one metric series for
//! all topics without subscriptions, the refusal to remove a cluster's only member, and the one
//! WARN line a flood of refused peer connections leaves in the log.
//!
//! Raw TCP clients play the slow and the greedy ones. Waits poll against deadlines; the one check
//! that something does *not* happen (a connection over the cap is not served while the cap is
//! held) gives it a fixed grace, and the positive half (it is served once a slot frees) follows.

mod common;

use std::time::Duration;

use herald::node::Node;
use herald::subscription::{HandlerSpec, SubscriptionSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{eventually, get, get_text, metric, request, start_node, TestNode};

const DEADLINE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {DEADLINE:?}"))
}

async fn connect(n: &TestNode) -> TcpStream {
    TcpStream::connect(n.url.trim_start_matches("http://"))
        .await
        .expect("connect")
}

/// Reads a response head (up to the blank line) or whatever came before EOF.
async fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

async fn node_with(f: impl FnOnce(&mut herald::config::Config)) -> TestNode {
    let mut b = Node::builder();
    f(b.config_mut());
    start_node(b).await
}

/// `http.max_connections = 1`: while one connection is open, the next one is not served; it is
/// as soon as the first closes.
#[actix_rt::test]
async fn connections_beyond_http_max_connections_wait_for_a_free_slot() {
    let n = node_with(|c| c.http.max_connections = 1).await;
    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: herald\r\n\r\n";
    let mut first = connect(&n).await;
    first.write_all(GET).await.expect("write");
    // Served once the readiness probes' connections are gone; it then holds the only slot
    // (keep-alive).
    let head = within("the first connection's answer", read_head(&mut first)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    let mut second = connect(&n).await;
    second.write_all(GET).await.expect("write");
    let early = tokio::time::timeout(Duration::from_millis(500), read_head(&mut second)).await;
    assert!(
        early.is_err(),
        "a connection over http.max_connections was served: {early:?}"
    );
    drop(first);
    let head = within(
        "the second connection's answer once the first closed",
        read_head(&mut second),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    n.node.shutdown().await;
}

/// A client that sends its request head a byte at a time is cut off after
/// `http.request_timeout_ms`, long before it would have finished.
#[actix_rt::test]
async fn a_request_head_sent_byte_by_byte_is_cut_off() {
    let n = node_with(|c| c.http.request_timeout_ms = 300).await;
    let mut s = connect(&n).await;
    let head = b"GET /healthz HTTP/1.1\r\nHost: herald\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let (mut r, mut w) = s.split();
    let cut = async {
        let mut got = Vec::new();
        let _ = r.read_to_end(&mut got).await;
        got
    };
    // Paced at 40 ms a byte: the whole head takes about 3 s (under actix-web's default of 5 s,
    // so without the setting it would be served).
    let trickle = async {
        for b in head.iter() {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        // All sent: wait for the answer (the cut, if it comes late).
        std::future::pending::<()>().await;
    };
    let got = within("the node cutting the slow client off", async {
        tokio::select! {
            got = cut => got,
            () = trickle => unreachable!(),
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains("200 OK"),
        "the slow request was served instead of cut off: {text}"
    );
    n.node.shutdown().await;
}

/// A body that stops arriving gets 408 after `http.body_timeout_ms` (before: the request hung
/// as long as the client kept the connection).
#[actix_rt::test]
async fn a_body_that_stops_arriving_gets_408() {
    let n = node_with(|c| c.http.body_timeout_ms = 300).await;
    let mut s = connect(&n).await;
    s.write_all(
        b"POST /v1/topics/limits.slow/events HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":",
    )
    .await
    .expect("write");
    let head = within("the answer to a stalled body", read_head(&mut s)).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    n.node.shutdown().await;
}

/// Topics without subscriptions share one series, `topic="(other)"`: 30 such topics added 30
/// series before.
#[actix_rt::test]
async fn topics_without_subscriptions_share_one_metric_series() {
    let mut spec = SubscriptionSpec::rust("limits.subscribed", "g", "unused");
    spec.handler = HandlerSpec::Log;
    let n = start_node(Node::builder().subscription(spec)).await;
    let before = metric(
        &get_text(&format!("{}/metrics", n.url)).await,
        herald::metrics::EVENTS_PUBLISHED,
        &[("topic", herald::metrics::OTHER_TOPIC)],
    )
    .unwrap_or(0.0);
    for i in 0..30 {
        let a = request(
            "POST",
            &format!("{}/v1/topics/limits.unsubscribed.{i}/events", n.url),
            &[("content-type", "application/json")],
            "{}",
        )
        .await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
    let a = request(
        "POST",
        &format!("{}/v1/topics/limits.subscribed/events", n.url),
        &[("content-type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let text = get_text(&format!("{}/metrics", n.url)).await;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(herald::metrics::EVENTS_PUBLISHED) && l.contains("limits.unsubscribed"))
        .collect();
    assert!(
        series.is_empty(),
        "a series per topic without subscriptions: {series:?}"
    );
    let other = metric(
        &text,
        herald::metrics::EVENTS_PUBLISHED,
        &[("topic", herald::metrics::OTHER_TOPIC)],
    )
    .expect("the (other) series");
    assert!(other >= before + 30.0, "{other} (before: {before})");
    assert_eq!(
        metric(
            &text,
            herald::metrics::EVENTS_PUBLISHED,
            &[("topic", "limits.subscribed")]
        ),
        Some(1.0)
    );
    n.node.shutdown().await;
}

/// Removing the only member answers 409 and changes nothing (before: 204, and the node was left
/// without a cluster while `/readyz` said 200).
#[actix_rt::test]
async fn removing_the_only_member_is_refused_with_409() {
    let n = node_with(|_| {}).await;
    let id = n.node.core().config().node_id;
    let a = request("DELETE", &format!("{}/v1/cluster/nodes/{id}", n.url), &[], "").await;
    assert_eq!(a.status, 409, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "last_member", "{}", a.body);
    let (status, view) = get(&format!("{}/v1/cluster", n.url)).await;
    assert_eq!(status, 200);
    let members = view["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{view}");
    assert_eq!(members[0]["id"], id);
    assert_ne!(members[0]["status"], "leaving", "{view}");
    eventually("still ready", || async {
        (get(&format!("{}/readyz", n.url)).await.0 == 200).then_some(())
    })
    .await;
    n.node.shutdown().await;
}

/// A flood of refused peer connections (an HTTP request where a handshake belongs) is counted
/// whole in `herald_transport_connections_refused_total{reason="handshake"}` but logged once: the
/// WARN is rate-limited to one line per reason per 30 s (the lines of a whole run are read after
/// the node exits, so none can be missed), and the node stays ready.
#[actix_rt::test]
async fn a_flood_of_refused_peer_connections_is_counted_whole_and_logged_once() {
    use std::io::{Read, Write};
    const FLOOD: usize = 200;
    const LINE: &str = "refused an inbound peer connection";
    let dir = tempfile::tempdir().expect("tempdir");
    let peer = format!("127.0.0.1:{}", common::free_port());
    let (node, rx) = common::spawn_herald_stderr(&["--data-dir", common::p(dir.path()), "--peer", &peer], &[]);
    common::wait_ready(&node.url);
    let flood = peer.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..FLOOD {
            let mut s = std::net::TcpStream::connect(&flood).expect("connect");
            s.set_read_timeout(Some(DEADLINE)).expect("timeout");
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: herald\r\n\r\n");
            // Until the node closes it (EOF or a reset): one refusal at a time.
            let _ = s.read_to_end(&mut Vec::new());
        }
    })
    .await
    .expect("flood");
    let refused = |m: &str| {
        metric(
            m,
            "herald_transport_connections_refused_total",
            &[("reason", "handshake")],
        )
    };
    eventually("every refusal counted", || async {
        let n = refused(&common::metrics_of(&node.url).await);
        (n == Some(FLOOD as f64)).then_some(())
    })
    .await;
    assert_eq!(get(&format!("{}/readyz", node.url)).await.0, 200, "still ready");
    assert!(common::terminate(node).await.success());
    let warned: Vec<String> = rx.iter().filter(|l| l.contains(LINE)).collect();
    assert_eq!(warned.len(), 1, "{FLOOD} refusals, one WARN line: {warned:#?}");
    assert!(
        warned[0].contains("WARN") && warned[0].contains(r#"reason="handshake""#),
        "{}",
        warned[0]
    );
}
