//! The live dashboard (`/ui`) of a 3-node cluster.
//!
//! * Everywhere: the page and its assets are served with a strict Content-Security-Policy, and
//!   `/v1/stats/series` charts what the node accepted.
//! * In a real browser (headless Chromium driven over WebDriver by chromedriver; ignored unless
//!   run with `--include-ignored`, as CI does after installing Debian's `chromium` and
//!   `chromium-driver`): the page shows the 3 members and the leader; published events appear in
//!   the topic's chart; after `kill -9` of a node the page shows it suspect or down, then down,
//!   and its instances placed elsewhere, and the timeline says so. A screenshot is saved to
//!   `$CARGO_TARGET_TMPDIR/dashboard.png`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{start_cluster, urls};
use common::{free_port, get, get_text, post_json, request, require_tool, DEADLINE};
use serde_json::{json, Value};

/// How long the page may take to show a killed node down with its work moved. Herald detects a
/// dead node in about a second and the page refreshes every second; this bound is generous for a
/// loaded 2-core machine running a browser, so only a regression to many seconds fails.
const FAILOVER_ON_PAGE: Duration = Duration::from_secs(10);

fn hdr<'a>(a: &'a common::Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).and_then(|v| v.to_str().ok())
}

async fn subscribe(url: &str, instances: u32) {
    let spec = json!({ "topic": "orders", "group": "audit", "handler": { "kind": "log" }, "instances": instances });
    let a = post_json(&format!("{url}/v1/subscriptions"), &spec).await;
    assert_eq!(a.status, 201, "{}", a.body);
}

async fn publish(url: &str, n: usize) {
    for i in 0..n {
        let a = post_json(&format!("{url}/v1/topics/orders/events"), &json!({ "n": i })).await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
}

#[actix_rt::test]
async fn the_page_is_served_locked_down_and_the_series_count_published_events() {
    let c = start_cluster(1).await;
    let url = &urls(&c)[0];
    let page = request("GET", &format!("{url}/ui"), &[], "").await;
    assert_eq!(page.status, 200);
    let csp = hdr(&page, "content-security-policy").expect("a CSP on the page");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(
        !page.body.to_string().contains("http://") && !page.body.to_string().contains("https://"),
        "the page loads nothing from elsewhere"
    );
    for asset in ["/ui/app.js", "/ui/app.css"] {
        let a = request("GET", &format!("{url}{asset}"), &[], "").await;
        assert_eq!(a.status, 200, "{asset}");
        assert!(hdr(&a, "content-security-policy").is_some(), "{asset} has a CSP");
    }
    // `/` sends browsers to the page (the client may follow the redirect itself).
    let root = request("GET", &format!("{url}/"), &[], "").await;
    match root.status {
        302 => assert_eq!(hdr(&root, "location"), Some("/ui")),
        status => assert_eq!((status, &root.body), (200, &page.body), "/ is the page"),
    }

    subscribe(url, 1).await;
    publish(url, 20).await;
    // The sampler reads every second: within the deadline the 20 events show as a rate.
    let start = Instant::now();
    loop {
        let (status, body) = get(&format!("{url}/v1/stats/series?seconds=60")).await;
        assert_eq!(status, 200, "{body}");
        let rates = body["topics"]["orders"]["published"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let seconds = body["interval_seconds"].as_f64().unwrap_or(1.0);
        let total: f64 = rates.iter().filter_map(Value::as_f64).sum::<f64>() * seconds;
        // Rates are per measured second; the sampler ticks every second, within a few ms.
        if (total - 20.0).abs() < 0.5 {
            assert_eq!(body["t"].as_array().map(Vec::len), Some(rates.len()));
            let delivered: f64 = body["subscriptions"]["orders/audit"]["delivered"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .sum();
            if delivered * seconds >= 19.5 {
                break;
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the series never showed the 20 events: {body}"
        );
        actix_rt::time::sleep(Duration::from_millis(250)).await;
    }
    let openapi = get_text(&format!("{url}/openapi.json")).await;
    assert!(
        openapi.contains("/v1/stats/series"),
        "the series endpoint is documented"
    );
}

/// chromedriver on a free loopback port, killed (by its pid) when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let bin = require_tool("chromedriver", "apt-get install chromium chromium-driver");
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let d = Driver { child, url };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < DEADLINE, "chromedriver did not listen on {port}");
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
        loop {
            let a = request("GET", &format!("{}/status", d.url), &[], "").await;
            if a.status == 200 && a.body["value"]["ready"] == true {
                return d;
            }
            assert!(start.elapsed() < DEADLINE, "chromedriver did not get ready: {}", a.body);
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The page's state, read from the DOM: members (id, status, role), the leader shown, the
/// placement of orders/audit, the published total of the orders chart and the timeline.
const READ_PAGE: &str = r#"
const rows = [...document.querySelectorAll('#members tbody tr')].map(r => [Number(r.dataset.node), r.dataset.status, r.dataset.role]);
const placement = document.querySelector('tr.placement[data-sub="orders/audit"]');
const chart = document.querySelector('.chart[data-topic="orders"][data-series="published"]');
return {
  members: rows,
  leader: document.querySelector('#leader').textContent,
  placement: placement ? placement.dataset.nodes : null,
  published: chart ? Number(chart.dataset.total) : 0,
  timeline: [...document.querySelectorAll('#timeline li span')].map(s => s.textContent),
  live: document.querySelector('#live-text').textContent,
};
"#;

async fn read_page(b: &fantoccini::Client) -> Value {
    b.execute(READ_PAGE, vec![]).await.expect("read the page")
}

/// Polls the page until `check` accepts it, failing after `within` with the last state.
async fn until(
    b: &fantoccini::Client,
    what: &str,
    within: Duration,
    check: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let page = read_page(b).await;
        if check(&page) {
            return (page, start.elapsed());
        }
        assert!(
            start.elapsed() < within,
            "the page never showed {what} within {within:?}; it shows {page:#}"
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
#[ignore = "needs chromium and chromedriver (apt-get install chromium chromium-driver); CI runs it"]
async fn the_dashboard_shows_the_cluster_live_in_a_real_browser() {
    let mut c = start_cluster(3).await;
    let urls = urls(&c);
    subscribe(&urls[0], 2).await;
    let (_, cluster) = get(&format!("{}/v1/cluster", urls[0])).await;
    let leader = cluster["leader"].as_u64().expect("a leader");
    let page_url = &urls[(leader - 1) as usize];

    let driver = Driver::start().await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1300"] }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let b = fantoccini::ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session");
    b.goto(&format!("{page_url}/ui")).await.expect("open the dashboard");

    // Three members up, one leader, and the header names it.
    let (page, _) = until(&b, "3 members up with the leader", DEADLINE, |p| {
        let m = p["members"].as_array().cloned().unwrap_or_default();
        m.len() == 3
            && m.iter().all(|r| r[1] == "up")
            && m.iter().filter(|r| r[2] == "leader").count() == 1
            && p["leader"].as_str().and_then(|s| s.parse::<u64>().ok()) == Some(leader)
    })
    .await;
    let shown_leader = page["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[2] == "leader")
        .unwrap()[0]
        .clone();
    assert_eq!(shown_leader, json!(leader));

    // Events published to the page's node appear in the topic's chart.
    publish(page_url, 30).await;
    until(&b, "the 30 published events in the orders chart", DEADLINE, |p| {
        p["published"].as_f64().unwrap_or(0.0) >= 29.5
    })
    .await;

    // Kill a node that runs an instance (not the leader, which serves the page).
    let (page, _) = until(&b, "the placement of orders/audit", DEADLINE, |p| {
        p["placement"].is_string()
    })
    .await;
    let placed: Vec<u64> = page["placement"]
        .as_str()
        .unwrap()
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();
    let victim = *placed
        .iter()
        .find(|n| **n != leader)
        .expect("an instance off the leader");
    c.kill9(victim);
    let killed = Instant::now();
    let row = |p: &Value| {
        p["members"]
            .as_array()
            .and_then(|m| m.iter().find(|r| r[0] == json!(victim)).cloned())
            .unwrap_or(Value::Null)
    };
    until(&b, &format!("node {victim} suspect or down"), FAILOVER_ON_PAGE, |p| {
        matches!(row(p)[1].as_str(), Some("suspect" | "down"))
    })
    .await;
    let (page, _) = until(
        &b,
        &format!("node {victim} down and its instance moved"),
        FAILOVER_ON_PAGE,
        |p| {
            let moved = p["placement"]
                .as_str()
                .is_some_and(|n| !n.split(',').any(|x| x == victim.to_string()) && n.split(',').count() == 2);
            row(p)[1] == "down" && moved
        },
    )
    .await;
    let took = killed.elapsed();
    assert!(took < FAILOVER_ON_PAGE);
    let timeline: Vec<String> = page["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str().map(String::from))
        .collect();
    assert!(
        timeline.iter().any(|t| t.starts_with(&format!("node {victim}: up → "))),
        "the timeline tells the status change: {timeline:?}"
    );
    assert!(
        timeline.iter().any(|t| t.starts_with("orders/audit moved")),
        "the timeline tells the move: {timeline:?}"
    );
    println!("the page showed node {victim} down with its instance moved {took:?} after kill -9");

    let png = b.screenshot().await.expect("a screenshot");
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&file, &png).expect("save the screenshot");
    println!("screenshot: {}", file.display());
    b.close().await.expect("close the session");
    drop(driver);
}
