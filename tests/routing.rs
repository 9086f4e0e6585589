//! Cross-node routing with in-process clusters: events published on one node reach subscriptions
//! placed on others; remote outcomes and dead letters; backpressure across nodes; a node whose
//! handler threads are wedged is reported degraded and routed around; a drain under load loses
//! nothing.
//!
//! Every node runs in this test process with its own ports, data dir, membership thread and
//! worker threads; they talk over the real peer transport on 127.0.0.1.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::{Actor, Context, Handler};
use herald::handler::{Delivery, HandlerResult};
use herald::node::Node;
use herald::subscription::SubscriptionSpec;
use serde_json::{json, Value};

use common::rng::Rng;
use common::{cluster, eventually, get, post_json, request, within, Receiver, TestNode};

/// Creates `spec` through `url` and returns the node ids of its instances once every node agrees.
async fn subscribe(nodes: &[TestNode], spec: Value) -> Vec<u64> {
    let a = post_json(&format!("{}/v1/subscriptions", nodes[0].url), &spec).await;
    assert!(a.status == 201 || a.status == 200, "subscribe: {}", a.body);
    let (topic, group) = (
        spec["topic"].as_str().expect("topic"),
        spec["group"].as_str().expect("group"),
    );
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    common::views::wait_placement(&urls, topic, group, "on some node", |n| !n.is_empty())
        .await
        .1
}

async fn publish(url: &str, topic: &str, ack: &str, data: &Value) -> common::Answer {
    request(
        "POST",
        &format!("{url}/v1/topics/{topic}/events?ack={ack}"),
        &[("content-type", "application/json")],
        data.to_string(),
    )
    .await
}

fn node_of(nodes: &[TestNode], id: u64) -> &TestNode {
    &nodes[id as usize - 1]
}

async fn wait_received(r: &Receiver, want: &BTreeSet<String>, deadline: Duration) {
    within("every accepted event reaches the receiver", deadline, || {
        let got: BTreeSet<String> = r.ids().into_iter().collect();
        let missing = want.difference(&got).count();
        async move { (missing == 0).then_some(()) }
    })
    .await;
}

async fn shutdown(nodes: Vec<TestNode>) {
    for n in nodes.into_iter().rev() {
        n.node.shutdown().await;
    }
}

#[actix_rt::test]
async fn a_remote_handlers_outcome_and_its_dead_letter_are_seen_from_any_node() {
    let receiver = Receiver::start(1).await;
    let nodes = cluster((0..3).map(|_| Node::builder()).collect()).await;
    let host = subscribe(
        &nodes,
        json!({"topic": "rt.dl", "group": "g", "handler": {"kind": "webhook", "url": receiver.url},
               "instances": 1, "max_attempts": 1}),
    )
    .await[0];
    let others: Vec<&TestNode> = nodes
        .iter()
        .filter(|n| n.node.core().config().node_id != host)
        .collect();

    // ack=processed waits for the handler on the other node: its outcome comes back in the ack.
    let a = publish(&others[0].url, "rt.dl", "processed", &json!({"n": 1})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["outcomes"][0]["outcome"], "dead_lettered", "{}", a.body);
    let event_id = a.body["id"].as_str().unwrap().to_string();

    // Listed from a node that neither received nor ran it.
    let (status, list) = get(&format!("{}/v1/dead-letters", others[1].url)).await;
    assert_eq!(status, 200, "{list}");
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["event_id"], event_id.as_str());
    let (_, local) = get(&format!("{}/v1/dead-letters?scope=local", others[1].url)).await;
    assert_eq!(local, json!([]), "the dead letter is stored where the handler ran");

    // Replayed from there too; the handler now succeeds.
    let dl = list[0]["id"].as_str().unwrap();
    let r = request(
        "POST",
        &format!("{}/v1/dead-letters/{dl}/replay", others[1].url),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["event_id"], event_id.as_str());
    wait_received(&receiver, &BTreeSet::from([event_id]), Duration::from_secs(20)).await;
    eventually("the replayed dead letter is gone everywhere", || {
        let url = others[0].url.clone();
        async move { (get(&format!("{url}/v1/dead-letters")).await.1 == json!([])).then_some(()) }
    })
    .await;
    let r = request(
        "POST",
        &format!("{}/v1/dead-letters/nope/replay", others[0].url),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    shutdown(nodes).await;
}

#[actix_rt::test]
async fn a_slow_subscription_on_another_node_pushes_back_with_429_and_loses_nothing() {
    let receiver = Receiver::start_with("127.0.0.1:0", 0, Duration::from_millis(200)).await;
    let small = || {
        let mut b = Node::builder();
        b.config_mut().handlers.mailbox_capacity = 4;
        b.config_mut().http.max_batch_events = 4;
        b
    };
    let nodes = cluster((0..3).map(|_| small()).collect()).await;
    let host = subscribe(
        &nodes,
        json!({"topic": "rt.bp", "group": "g", "handler": {"kind": "webhook", "url": receiver.url}, "instances": 1}),
    )
    .await[0];
    let ingress = nodes.iter().find(|n| n.node.core().config().node_id != host).unwrap();
    let mut accepted = BTreeSet::new();
    let mut refused = 0;
    for i in 0..30 {
        let a = publish(&ingress.url, "rt.bp", "accepted", &json!({"i": i})).await;
        match a.status {
            202 => {
                accepted.insert(a.body["id"].as_str().unwrap().to_string());
            }
            429 => {
                assert_eq!(a.body["error"]["code"], "overloaded", "{}", a.body);
                let retry = a.headers.get("retry-after").expect("Retry-After on 429");
                assert!(retry.to_str().unwrap().parse::<u64>().unwrap() >= 1);
                refused += 1;
            }
            s => panic!("unexpected {s}: {}", a.body),
        }
    }
    println!(
        "slow remote subscription: {} accepted, {refused} refused with 429",
        accepted.len()
    );
    assert!(refused > 0, "a full window towards the slow node must refuse publishes");
    assert!(!accepted.is_empty());
    wait_received(&receiver, &accepted, Duration::from_secs(30)).await;
    shutdown(nodes).await;
}

#[actix_rt::test]
async fn ack_none_events_reach_a_remote_node_and_their_window_comes_back() {
    // A window of 4 towards the remote instance: 40 at-most-once events (and 20 emitted) only get through if the
    // handler node credits their window units back (they are never acked one by one; the lane's
    // give-back after `redeliver_after` is pushed out of the test's reach).
    let receiver = Receiver::start(0).await;
    let small = || {
        let mut b = Node::builder();
        b.config_mut().handlers.mailbox_capacity = 4;
        b.config_mut().http.max_batch_events = 4;
        b.config_mut().cluster.redeliver_after_ms = 600_000;
        b
    };
    let nodes = cluster((0..3).map(|_| small()).collect()).await;
    let host = subscribe(
        &nodes,
        json!({"topic": "rt.none", "group": "g", "handler": {"kind": "webhook", "url": receiver.url}, "instances": 1}),
    )
    .await[0];
    let ingress = nodes.iter().find(|n| n.node.core().config().node_id != host).unwrap();
    let mut accepted = BTreeSet::new();
    for i in 0..40 {
        let id = within(
            "the window towards the handler node opens again",
            Duration::from_secs(30),
            || {
                let url = ingress.url.clone();
                async move {
                    let a = publish(&url, "rt.none", "none", &json!({"i": i})).await;
                    match a.status {
                        202 => Some(a.body["id"].as_str().unwrap().to_string()),
                        429 => {
                            actix_rt::time::sleep(Duration::from_millis(20)).await;
                            None
                        }
                        s => panic!("unexpected {s}: {}", a.body),
                    }
                }
            },
        )
        .await;
        accepted.insert(id);
    }
    // The same through `emit` (the Rust API's `do_send`): its one subscription is placed on
    // another node, so the event takes the window towards it, and a full window refuses.
    let publisher = ingress.node.publisher();
    for i in 40..60 {
        let id = within("emit: the window opens again", Duration::from_secs(30), || {
            let event = herald::event::Event::json("rt.none", &json!({"i": i})).unwrap();
            let id = event.id.to_string();
            let emitted = publisher.emit(event);
            async move {
                match emitted {
                    Ok(()) => Some(id),
                    Err(herald::ingress::PublishError::Overloaded(_)) => {
                        actix_rt::time::sleep(Duration::from_millis(20)).await;
                        None
                    }
                    Err(e) => panic!("emit refused: {e}"),
                }
            }
        })
        .await;
        accepted.insert(id);
    }
    wait_received(&receiver, &accepted, Duration::from_secs(30)).await;
    assert_eq!(receiver.ids().len(), accepted.len(), "at most once: no duplicates");
    shutdown(nodes).await;
}

/// Records `(node, event id)` of every event it handles.
struct Recorder {
    node: u64,
    seen: Arc<Mutex<Vec<(u64, String)>>>,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Recorder {
    type Result = HandlerResult;
    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        self.seen.lock().unwrap().push((self.node, d.event.id.to_string()));
        Ok(())
    }
}

/// Blocks its worker thread (the gray failure a node's pings do not show) until released.
struct Blocker {
    release: Arc<AtomicBool>,
}

impl Actor for Blocker {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Blocker {
    type Result = HandlerResult;
    fn handle(&mut self, _: Delivery, _: &mut Context<Self>) -> HandlerResult {
        let start = Instant::now();
        while !self.release.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

#[actix_rt::test]
async fn a_node_with_a_wedged_worker_is_degraded_and_its_events_are_handled_elsewhere() {
    let seen: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let release = Arc::new(AtomicBool::new(false));
    let builders = (1..=3u64)
        .map(|id| {
            let s = seen.clone();
            let mut b = Node::builder().handler("record", move || Recorder {
                node: id,
                seen: s.clone(),
            });
            b.config_mut().cluster.degraded_after_ms = 1000;
            if id == 3 {
                let r = release.clone();
                b = b.handler("block", move || Blocker { release: r.clone() });
                b.config_mut().handlers.workers = 1;
            }
            b
        })
        .collect();
    let nodes = cluster(builders).await;
    let placed = subscribe(
        &nodes,
        serde_json::to_value(SubscriptionSpec::rust("rt.fine", "g", "record").instances(3)).unwrap(),
    )
    .await;
    assert_eq!(
        placed.iter().collect::<BTreeSet<_>>().len(),
        3,
        "one instance per node: {placed:?}"
    );
    assert_eq!(
        subscribe(
            &nodes,
            serde_json::to_value(SubscriptionSpec::rust("rt.stuck", "g", "block")).unwrap()
        )
        .await,
        vec![3]
    );

    // Wedge node 3's only worker thread.
    let a = publish(&nodes[0].url, "rt.stuck", "accepted", &json!({})).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let started = Instant::now();
    let mut accepted = BTreeSet::new();
    let mut reported = None;
    // Keep publishing (unkeyed, so node 3's instance gets its share) until node 1 reports node 3
    // degraded (or already down), then a while longer.
    while accepted.len() < 400 && started.elapsed() < Duration::from_secs(30) {
        let a = publish(&nodes[0].url, "rt.fine", "accepted", &json!({"i": accepted.len()})).await;
        if a.status == 202 {
            accepted.insert(a.body["id"].as_str().unwrap().to_string());
        }
        if reported.is_none() {
            let (_, v) = get(&format!("{}/v1/cluster", nodes[0].url)).await;
            let status = v["members"].as_array().unwrap().iter().find(|m| m["id"] == 3).unwrap()["status"].clone();
            if status == "degraded" || status == "down" {
                reported = Some((status, started.elapsed()));
            }
        }
        if let Some((_, at)) = &reported {
            if started.elapsed() > *at + Duration::from_secs(1) {
                break;
            }
        }
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, after) = reported.expect("node 1 reports node 3 degraded or down while its worker is wedged");
    println!("node 3 reported {status} {after:?} after its worker was wedged");
    // Everything accepted is handled while node 3 stays wedged: what it held was sent elsewhere.
    within(
        "every accepted event handled on a healthy node",
        Duration::from_secs(20),
        || {
            let handled: BTreeSet<String> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(node, _)| *node != 3)
                .map(|(_, id)| id.clone())
                .collect();
            let missing = accepted.difference(&handled).count();
            async move { (missing == 0).then_some(()) }
        },
    )
    .await;
    release.store(true, Ordering::SeqCst);
    shutdown(nodes).await;
}

#[actix_rt::test]
async fn draining_the_hosting_node_under_load_loses_nothing() {
    let receiver = Receiver::start(0).await;
    let nodes = cluster((0..3).map(|_| Node::builder()).collect()).await;
    let host = subscribe(
        &nodes,
        json!({"topic": "rt.drain", "group": "g", "handler": {"kind": "webhook", "url": receiver.url}, "instances": 1}),
    )
    .await[0];
    let ingress = nodes.iter().find(|n| n.node.core().config().node_id != host).unwrap();
    let mut accepted = BTreeSet::new();
    let mut drained = false;
    for i in 0..300 {
        if i == 100 {
            let a = request(
                "POST",
                &format!("{}/v1/cluster/nodes/{host}/drain", ingress.url),
                &[],
                "",
            )
            .await;
            assert!(a.status < 300, "drain: {}", a.body);
            drained = true;
        }
        let a = publish(&ingress.url, "rt.drain", "accepted", &json!({"i": i})).await;
        assert_eq!(a.status, 202, "{}", a.body);
        accepted.insert(a.body["id"].as_str().unwrap().to_string());
    }
    assert!(drained);
    let (_, ps) = get(&format!("{}/v1/cluster/placements", node_of(&nodes, host).url)).await;
    assert!(
        !ps[0]["nodes"].as_array().unwrap().contains(&json!(host)),
        "the drained node holds no instance: {ps}"
    );
    wait_received(&receiver, &accepted, Duration::from_secs(30)).await;
    let got = receiver.ids();
    println!(
        "drain under load: {} accepted, {} received ({} duplicates)",
        accepted.len(),
        got.len(),
        got.len() - got.iter().collect::<BTreeSet<_>>().len()
    );
    shutdown(nodes).await;
}

/// The seeds of the partition rounds: `HERALD_PARTITION_SEED=<n>` replays one; by default the
/// first three, which cover an isolated ingress, an isolated host and a random choice.
fn partition_seeds() -> Vec<u64> {
    match std::env::var("HERALD_PARTITION_SEED") {
        Ok(s) => vec![s.parse().expect("HERALD_PARTITION_SEED is a number")],
        Err(_) => vec![1, 2, 3],
    }
}

/// Cuts `isolated` off from every other node (both directions) or heals everything.
fn partition(nodes: &[TestNode], isolated: Option<u64>) {
    for n in nodes {
        let t = n.node.core().membership().transport();
        let me = n.node.core().config().node_id;
        match isolated {
            None => t.heal(),
            Some(x) if x == me => t.cut_off(
                nodes
                    .iter()
                    .map(|o| o.node.core().config().node_id)
                    .filter(|id| *id != me),
            ),
            Some(x) => t.cut_off([x]),
        }
    }
}

#[actix_rt::test]
async fn partitions_keep_every_ingress_accepting_and_everything_is_delivered_after_healing() {
    for seed in partition_seeds() {
        let mut rng = Rng(seed);
        let receiver = Receiver::start(0).await;
        let nodes = cluster((0..3).map(|_| Node::builder()).collect()).await;
        let host = subscribe(
            &nodes,
            json!({"topic": "rt.part", "group": "g", "handler": {"kind": "webhook", "url": receiver.url}, "instances": 1}),
        )
        .await[0];
        let others: Vec<u64> = (1..=3).filter(|id| *id != host).collect();
        // Seed 1: the ingress is the isolated minority; seed 2: the host is; later seeds: random.
        let (isolated, ingress) = match seed {
            1 => (others[0], others[0]),
            2 => (host, others[0]),
            _ => (1 + rng.below(3), 1 + rng.below(3)),
        };
        let cut_for = Duration::from_millis(2000 + rng.below(3000));
        println!("partition seed {seed}: host {host}, node {isolated} cut off for {cut_for:?}, publishing to node {ingress} (replay with HERALD_PARTITION_SEED={seed})");
        let url = node_of(&nodes, ingress).url.clone();
        let mut accepted = BTreeSet::new();
        let publish_some = |n: usize, url: String| {
            let mut got = Vec::new();
            async move {
                for i in 0..n {
                    let a = publish(&url, "rt.part", "accepted", &json!({"i": i})).await;
                    assert_eq!(
                        a.status, 202,
                        "seed {seed}: publishing to node {ingress} must keep working: {}",
                        a.body
                    );
                    got.push(a.body["id"].as_str().unwrap().to_string());
                }
                got
            }
        };
        accepted.extend(publish_some(50, url.clone()).await);
        partition(&nodes, Some(isolated));
        let cut_at = Instant::now();
        let mut during = 0;
        while cut_at.elapsed() < cut_for {
            accepted.extend(publish_some(10, url.clone()).await);
            during += 10;
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        partition(&nodes, None);
        accepted.extend(publish_some(50, url.clone()).await);
        wait_received(&receiver, &accepted, Duration::from_secs(60)).await;
        let got = receiver.ids();
        println!(
            "partition seed {seed}: {} accepted ({during} during the partition), {} received, {} duplicates",
            accepted.len(),
            got.len(),
            got.len() - got.iter().collect::<BTreeSet<_>>().len()
        );
        shutdown(nodes).await;
        receiver.stop().await;
    }
}

/// Every node's dead letters, read from each node alone (`scope=local`): the ground truth the
/// cluster-wide listing is compared with, as `(dead-letter id, node id)`, in id order.
async fn stored_dead_letters(nodes: &[TestNode]) -> Vec<(Value, u64)> {
    let mut all = Vec::new();
    for n in nodes {
        let (status, list) = get(&format!("{}/v1/dead-letters?scope=local&limit=1000", n.url)).await;
        assert_eq!(status, 200, "{list}");
        let id = n.node.core().config().node_id;
        all.extend(list.as_array().unwrap().iter().map(|d| (d.clone(), id)));
    }
    all.sort_by(|a, b| a.0["id"].as_str().cmp(&b.0["id"].as_str()));
    all
}

fn ids(list: &[Value]) -> Vec<String> {
    list.iter().map(|d| d["id"].as_str().unwrap().to_string()).collect()
}

/// Lists the cluster's dead letters through `url` with `query`, sending a user's token; asserts
/// every member answered.
async fn list_dead_letters(url: &str, query: &str) -> Vec<Value> {
    let a = request(
        "GET",
        &format!("{url}/v1/dead-letters?{query}"),
        &[("authorization", "Bearer user-admin-token")],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.headers.get("x-herald-unreachable").is_none(),
        "every member answered: {:?}",
        a.headers.get("x-herald-unreachable")
    );
    a.body.as_array().unwrap().clone()
}

#[actix_rt::test]
async fn dead_letters_are_listed_paged_and_replayed_across_nodes_over_the_peer_transport_without_forwarding_tokens() {
    // Every member declares the decoy as its HTTP address: a node that asked others over HTTP
    // (with the caller's Authorization header, as Herald once did) would call it.
    let decoy = Receiver::start(0).await;
    let decoy_addr = decoy
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/hook")
        .to_string();
    let failing = Receiver::start(usize::MAX).await;
    let builder = || {
        let mut b = Node::builder();
        b.config_mut().http.advertise = decoy_addr.clone();
        b
    };
    let nodes = cluster((0..3).map(|_| builder()).collect()).await;
    for group in ["ga", "gb"] {
        let hosts = subscribe(
            &nodes,
            json!({"topic": "rt.dlx", "group": group, "handler": {"kind": "webhook", "url": failing.url},
                   "instances": 3, "max_attempts": 1}),
        )
        .await;
        assert!(
            hosts.iter().collect::<BTreeSet<_>>().len() >= 2,
            "the instances of {group} run on several nodes: {hosts:?}"
        );
    }
    for i in 0..24 {
        let a = request(
            "POST",
            &format!("{}/v1/topics/rt.dlx/events?ack=processed", nodes[i % 3].url),
            &[("content-type", "application/json"), ("x-herald-key", &format!("k{i}"))],
            json!({ "i": i }).to_string(),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let stored = stored_dead_letters(&nodes).await;
    assert_eq!(stored.len(), 48, "each event dead-lettered in both groups");
    let holders: BTreeSet<u64> = stored.iter().map(|(_, n)| *n).collect();
    assert!(holders.len() >= 2, "dead letters stored on several nodes: {holders:?}");
    let truth: Vec<Value> = stored.iter().map(|(d, _)| d.clone()).collect();

    // The whole listing, from every node, is every node's dead letters in id order.
    for n in &nodes {
        assert_eq!(
            list_dead_letters(&n.url, "limit=1000").await,
            truth,
            "listed through {}",
            n.url
        );
    }
    // `group` across nodes.
    let ga: Vec<Value> = truth.iter().filter(|d| d["group"] == "ga").cloned().collect();
    assert_eq!(ga.len(), 24);
    assert_eq!(list_dead_letters(&nodes[1].url, "group=ga&limit=1000").await, ga);
    // `after` and `limit` page through the merged list without gaps or repeats.
    for (query, want) in [("limit=7", &truth), ("group=ga&limit=5", &ga)] {
        let mut paged = Vec::new();
        let mut after = String::new();
        loop {
            let page = list_dead_letters(&nodes[2].url, &format!("{query}{after}")).await;
            let size: usize = query.rsplit('=').next().unwrap().parse().unwrap();
            assert!(page.len() <= size, "{query}: a page of {}", page.len());
            let Some(last) = page.last() else { break };
            after = format!("&after={}", last["id"].as_str().unwrap());
            paged.extend(page);
        }
        assert_eq!(ids(&paged), ids(want), "{query}: the pages are the whole list");
    }
    let tail = list_dead_letters(
        &nodes[0].url,
        &format!("after={}&limit=3", truth[40]["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(ids(&tail), ids(&truth[41..44]));

    // Replay, through node 1, a dead letter that another node stores.
    let (dl, holder) = stored
        .iter()
        .find(|(_, n)| *n != 1)
        .cloned()
        .expect("a dead letter stored elsewhere than node 1");
    let dl_id = dl["id"].as_str().unwrap().to_string();
    let r = request(
        "POST",
        &format!("{}/v1/dead-letters/{dl_id}/replay", nodes[0].url),
        &[("authorization", "Bearer user-admin-token")],
        "",
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["event_id"], dl["event_id"], "{}", r.body);
    // It fails again (the endpoint still fails): a new dead letter of the same event and group.
    eventually("the replayed event is dead-lettered anew", || {
        let nodes = &nodes;
        let dl = dl.clone();
        let dl_id = dl_id.clone();
        async move {
            let now = stored_dead_letters(nodes).await;
            let gone = now.iter().all(|(d, _)| d["id"] != dl_id.as_str());
            let again = now.iter().any(|(d, _)| {
                d["event_id"] == dl["event_id"] && d["group"] == dl["group"] && d["id"] != dl_id.as_str()
            });
            (gone && again).then_some(())
        }
    })
    .await;
    let r = request(
        "POST",
        &format!("{}/v1/dead-letters/{dl_id}/replay", nodes[0].url),
        &[],
        "",
    )
    .await;
    assert_eq!(
        r.status, 404,
        "replayed once only (stored on node {holder}): {}",
        r.body
    );

    // No node called another's HTTP API: no request (and so no user token) reached the address
    // the members declared.
    let calls = decoy.events();
    assert!(
        calls.is_empty(),
        "nodes called the members' declared HTTP address: {:?}",
        calls.iter().map(|c| c.header("authorization")).collect::<Vec<_>>()
    );
    shutdown(nodes).await;
}

#[actix_rt::test]
async fn a_member_that_does_not_answer_is_named_in_the_unreachable_header() {
    let failing = Receiver::start(usize::MAX).await;
    let mut nodes = cluster((0..3).map(|_| Node::builder()).collect()).await;
    subscribe(
        &nodes,
        json!({"topic": "rt.dlu", "group": "g", "handler": {"kind": "webhook", "url": failing.url},
               "instances": 3, "max_attempts": 1}),
    )
    .await;
    for i in 0..12 {
        let a = request(
            "POST",
            &format!("{}/v1/topics/rt.dlu/events?ack=processed", nodes[0].url),
            &[("content-type", "application/json"), ("x-herald-key", &format!("k{i}"))],
            json!({ "i": i }).to_string(),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let before = stored_dead_letters(&nodes[..2]).await;
    // Node 3 stops (it stays a member): it answers no request any more.
    let third = nodes.pop().unwrap();
    third.node.shutdown().await;
    let a = request("GET", &format!("{}/v1/dead-letters?limit=1000", nodes[0].url), &[], "").await;
    assert_eq!(a.status, 200, "the listing does not fail: {}", a.body);
    assert_eq!(
        a.headers.get("x-herald-unreachable").and_then(|v| v.to_str().ok()),
        Some("3"),
        "the silent member is named"
    );
    let listed = a.body.as_array().unwrap();
    assert_eq!(
        ids(listed),
        ids(&before.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>()),
        "what the answering members store is listed"
    );
    shutdown(nodes).await;
}

#[actix_rt::test]
async fn a_peer_that_is_not_a_member_gets_no_dead_letters() {
    use herald::proto::{dead_letter_request, peer_message, DeadLetterRequest, ListDeadLetters, PeerMessage};
    use herald::transport::{Channel, Envelope, Transport, TransportConfig};
    use prost::Message;

    let failing = Receiver::start(usize::MAX).await;
    let nodes = cluster((0..2).map(|_| Node::builder()).collect()).await;
    subscribe(
        &nodes,
        json!({"topic": "rt.dlm", "group": "g", "handler": {"kind": "webhook", "url": failing.url},
               "instances": 2, "max_attempts": 1}),
    )
    .await;
    for i in 0..6 {
        let a = request(
            "POST",
            &format!("{}/v1/topics/rt.dlm/events?ack=processed", nodes[0].url),
            &[("content-type", "application/json"), ("x-herald-key", &format!("k{i}"))],
            json!({ "i": i }).to_string(),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let refused_before = refused_requests(&nodes[0].url).await;

    // An authenticated peer of the cluster's transport that is not in the membership table asks
    // node 1 for its dead letters on the events channel.
    let (tx, mut answers) = tokio::sync::mpsc::channel(16);
    let cluster_id = nodes[0].node.core().config().cluster_id.clone();
    let tls = common::node_tls(&cluster_id, 99);
    let mut config = TransportConfig::new(cluster_id, 99, "127.0.0.1:1").with_tls(Some(tls));
    config.channel = Channel::Events;
    let rogue = Transport::new(config, tx).expect("transport");
    rogue.add_peer(1, nodes[0].node.core().membership().peer_addr().to_string());
    let ask = PeerMessage {
        body: Some(peer_message::Body::DeadLetterRequest(DeadLetterRequest {
            id: 1,
            kind: Some(dead_letter_request::Kind::List(ListDeadLetters {
                limit: 1000,
                ..Default::default()
            })),
        })),
    };
    rogue.send(1, Envelope::app(ask.encode_to_vec())).expect("queued");
    eventually("node 1 refuses the non-member's request", || {
        let url = nodes[0].url.clone();
        async move { (refused_requests(&url).await > refused_before).then_some(()) }
    })
    .await;
    // (Node 1 could not even send it an answer: it dials only members. The refusal above is what
    // keeps a peer that later becomes reachable from reading the store.)
    assert!(answers.try_recv().is_err(), "no answer to the non-member");
    // The members still list each other's dead letters.
    let (status, list) = get(&format!("{}/v1/dead-letters", nodes[1].url)).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(6), "{list}");
    rogue.shutdown();
    shutdown(nodes).await;
}

async fn refused_requests(url: &str) -> f64 {
    let text = common::get_text(&format!("{url}/metrics")).await;
    common::metric(&text, herald::node::PEER_REQUESTS_REFUSED, &[]).unwrap_or(0.0)
}
