//! Clusters of real `herald node` processes on 127.0.0.1: forming a cluster, voters and learners,
//! subscriptions and placements replicated through Raft, losing the leader, joining, removing and
//! draining nodes, and restarting the whole cluster.
//!
//! Every node gets its own temporary data dir and free ports, so these tests run in parallel with
//! each other and with the other test files; every wait is a poll with a deadline.

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use common::cluster::*;
use common::views::*;
use common::*;
use serde_json::{json, Value};

fn node(nodes: &[Node], id: u64) -> &Node {
    nodes.iter().find(|n| n.id() == id).expect("a node with that id")
}

/// GET `path` on `url`, which must answer 200.
async fn get_ok(url: &str, path: &str) -> Value {
    let (status, body) = get(&format!("{url}{path}")).await;
    assert_eq!(status, 200, "GET {url}{path}: {body}");
    body
}

fn term(view: &Value) -> u64 {
    view["term"].as_u64().expect("term")
}

/// Waits until every node in `urls` shows the same placements, `subscriptions` of them; returns them.
async fn same_placements(what: &str, urls: &[String], subscriptions: usize) -> Vec<(String, String, Vec<u64>)> {
    converge(what, urls, "/v1/cluster/placements", |ps| {
        let rows: Vec<_> = ps.iter().map(placement_rows).collect();
        (rows.iter().all(|r| *r == rows[0]) && rows[0].len() == subscriptions).then(|| rows[0].clone())
    })
    .await
}

/// Whether every answer equals the first.
fn all_same(answers: &[Value]) -> bool {
    answers.iter().all(|a| a == &answers[0])
}

fn log_sub(topic: &str, group: &str, instances: u32) -> Value {
    json!({ "topic": topic, "group": group, "handler": { "kind": "log" }, "instances": instances })
}

// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn three_nodes_form_one_cluster() {
    let nodes = start_cluster(3).await;
    let urls = urls(&nodes);
    let view = wait_formed_with_voters(&urls, &[1, 2, 3], &[1, 2, 3]).await;
    assert!(
        (1..=3).contains(&leader(&view).unwrap()),
        "the leader is one of the members: {view}"
    );
    // Each node answers for itself, they are one cluster, and the table holds the addresses the
    // nodes were started with.
    for n in &nodes {
        let v = get_ok(n.url(), "/v1/cluster").await;
        assert_eq!(v["node_id"], n.id(), "{v}");
        assert_eq!(v["cluster_id"], view["cluster_id"], "{v}");
        assert!(term(&v) >= 1, "a node in a cluster has a Raft term: {v}");
        let me = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == n.id())
            .unwrap_or_else(|| panic!("node {} lists itself: {v}", n.id()));
        assert_eq!(me["peer"], n.peer(), "{v}");
        assert_eq!(me["http"], n.http(), "{v}");
        let handlers: BTreeSet<&str> = me["handlers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            handlers.contains("log") && handlers.contains("webhook"),
            "every node runs the built-in handlers: {me}"
        );
    }
    // The peers agree on the addresses of every member, not only their own.
    let tables: Vec<Value> = {
        let mut t = Vec::new();
        for u in &urls {
            let v = get_ok(u, "/v1/cluster").await;
            let mut ms: Vec<Value> = v["members"].as_array().unwrap().clone();
            ms.sort_by_key(|m| m["id"].as_u64());
            t.push(json!(ms
                .iter()
                .map(|m| json!([m["id"], m["http"], m["peer"]]))
                .collect::<Vec<_>>()));
        }
        t
    };
    assert!(
        all_same(&tables),
        "the member addresses differ between nodes: {tables:?}"
    );
}

#[actix_rt::test]
async fn five_nodes_have_three_voters_and_two_learners() {
    let nodes = start_cluster(5).await;
    let urls = urls(&nodes);
    let view = wait_formed_with_voters(&urls, &[1, 2, 3, 4, 5], &[1, 2, 3]).await;
    assert_eq!(voters(&view), vec![1, 2, 3], "the first three to join vote: {view}");
    // The leader is a voter, on every node.
    let l = leader(&view).unwrap();
    assert!([1, 2, 3].contains(&l), "a learner cannot lead: {view}");
    // Learners know the leader too.
    for u in &urls[3..] {
        let v = get_ok(u, "/v1/cluster").await;
        assert_eq!(leader(&v), Some(l), "{v}");
    }
}

#[actix_rt::test]
async fn a_subscription_made_on_a_follower_is_placed_identically_everywhere() {
    let nodes = start_cluster(3).await;
    let urls = urls(&nodes);
    let view = wait_formed_with_voters(&urls, &[1, 2, 3], &[1, 2, 3]).await;
    let l = leader(&view).unwrap();
    let follower = nodes.iter().find(|n| n.id() != l).unwrap();
    subscribe(follower.url(), &log_sub("orders", "audit", 3)).await;

    let placements = converge(
        "every node shows the same placement of orders/audit",
        &urls,
        "/v1/cluster/placements",
        |ps| (all_same(ps) && ps[0].as_array().is_some_and(|a| a.len() == 1)).then(|| ps[0].clone()),
    )
    .await;
    let p = &placements[0];
    assert_eq!(
        (p["topic"].as_str(), p["group"].as_str()),
        (Some("orders"), Some("audit")),
        "{p}"
    );
    let epoch = p["epoch"].as_u64().unwrap();
    assert!(epoch >= 1, "a committed placement has an epoch: {p}");
    let placed: Vec<u64> = p["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(placed.len(), 3, "one node per instance: {p}");
    assert!(
        placed.iter().all(|n| (1..=3).contains(n)),
        "instances run on members: {p}"
    );
    // Every node lists the subscription as it was made.
    for u in &urls {
        let subs = get_ok(u, "/v1/subscriptions").await;
        let subs = subs.as_array().unwrap();
        assert_eq!(subs.len(), 1, "{subs:?}");
        assert_eq!(subs[0]["handler"], json!({ "kind": "log" }), "{subs:?}");
        assert_eq!(subs[0]["instances"], 3, "{subs:?}");
    }

    // `herald status` against another node shows the subscription and where it runs.
    let other = nodes
        .iter()
        .find(|n| n.id() != follower.id())
        .unwrap()
        .url()
        .to_string();
    let o = actix_rt::task::spawn_blocking(move || cli_blocking(&["status", "--url", &other]))
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "herald status failed: {}{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(
        rows.iter()
            .any(|r| r.len() >= 4 && r[..4] == ["orders", "audit", "log", "3"]),
        "no subscription row in:\n{out}"
    );
    let nodes_col = placed.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    assert!(
        rows.iter()
            .any(|r| *r == ["orders", "audit", epoch.to_string().as_str(), nodes_col.as_str()]),
        "no placement row `orders audit {epoch} {nodes_col}` in:\n{out}"
    );
    for id in 1..=3 {
        assert!(
            rows.iter()
                .any(|r| r.first() == Some(&id.to_string().as_str()) && r.get(1) == Some(&"up")),
            "no member row for node {id} in:\n{out}"
        );
    }
}

#[actix_rt::test]
async fn the_leader_is_killed_and_a_new_one_is_elected() {
    let mut nodes = start_cluster(3).await;
    let urls = urls(&nodes);
    let view = wait_formed_with_voters(&urls, &[1, 2, 3], &[1, 2, 3]).await;
    let old = leader(&view).unwrap();
    let old_term = term(&view);

    nodes.kill9(old);
    let killed_at = Instant::now();
    let survivors: Vec<&Node> = nodes.iter().filter(|n| n.id() != old).collect();
    let urls = self::urls(survivors.iter().copied());
    let (new, new_term) = converge("the survivors agree on a new leader", &urls, "/v1/cluster", |views| {
        let l = common_leader(views)?;
        let t = term(&views[0]);
        (l != old && t > old_term && views.iter().all(|v| term(v) == t)).then_some((l, t))
    })
    .await;
    let election = killed_at.elapsed();
    println!(
        "leader {old} (term {old_term}) killed; node {new} leads term {new_term} on both survivors after {election:?}"
    );
    assert!(survivors.iter().any(|n| n.id() == new), "the new leader is a survivor");

    // The survivors still form a majority: a subscription made on one of them commits.
    let t = Instant::now();
    subscribe(survivors[1].url(), &log_sub("after", "failover", 2)).await;
    println!("first subscription after the failover committed in {:?}", t.elapsed());
    let rows = same_placements("both survivors show the new subscription's placement", &urls, 1).await;
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("after", "failover"));
    assert_eq!(rows[0].2.len(), 2, "{rows:?}");
    for u in &urls {
        let v = get_ok(u, "/v1/cluster").await;
        assert_eq!(leader(&v), Some(new), "{v}");
        assert_eq!(member_ids(&v), vec![1, 2, 3], "the killed node is still a member: {v}");
    }
}

#[actix_rt::test]
async fn a_node_joins_and_is_removed() {
    let mut nodes = start_cluster(3).await;
    let urls3 = urls(&nodes);
    let view = wait_formed_with_voters(&urls3, &[1, 2, 3], &[1, 2, 3]).await;

    // Node 4 joins through a follower, which forwards the Join to the leader; node 4 must answer
    // the leader before it knows the member table.
    let l = leader(&view).unwrap();
    let seed = nodes.iter().find(|n| n.id() != l).unwrap().peer().to_string();
    let started = Instant::now();
    nodes.add(4, &[seed]).await;
    let ready = started.elapsed();
    let urls4 = urls(&nodes);
    let view = wait_formed_with_voters(&urls4, &[1, 2, 3, 4], &[1, 2, 3]).await;
    println!(
        "node 4 ready after {ready:?}; visible as a learner on all four nodes after {:?}",
        started.elapsed()
    );
    assert_eq!(voters(&view), vec![1, 2, 3], "node 4 learns: {view}");

    let a = request(
        "DELETE",
        &format!("{}/v1/cluster/nodes/4?force=true", nodes[1].url()),
        &[],
        "",
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.body);
    converge(
        "node 4 is gone from every remaining node",
        &urls3,
        "/v1/cluster",
        |views| {
            common_leader(views)?;
            views
                .iter()
                .all(|v| members(v) == all_up(&[1, 2, 3], &[1, 2, 3]))
                .then_some(())
        },
    )
    .await;
    for u in &urls3 {
        let a = request("DELETE", &format!("{u}/v1/cluster/nodes/4"), &[], "").await;
        assert_eq!(a.status, 404, "node 4 was already removed: {}", a.body);
    }
    let a = request("DELETE", &format!("{}/v1/cluster/nodes/99", nodes[0].url()), &[], "").await;
    assert_eq!(a.status, 404, "{}", a.body);
    // The remaining three still commit changes.
    subscribe(nodes[0].url(), &log_sub("still", "working", 1)).await;
}

#[actix_rt::test]
async fn a_learner_is_promoted_when_a_voter_is_removed() {
    let mut nodes = start_cluster(4).await;
    let urls = urls(&nodes);
    let view = wait_formed_with_voters(&urls, &[1, 2, 3, 4], &[1, 2, 3]).await;
    let l = leader(&view).unwrap();
    let gone = [1, 2, 3].into_iter().find(|&id| id != l).unwrap();

    let status = nodes.terminate(gone).await;
    assert!(status.success(), "SIGTERM ends node {gone} cleanly: {status:?}");
    let rest: Vec<&Node> = nodes.iter().filter(|n| n.id() != gone).collect();
    let a = request("DELETE", &format!("{}/v1/cluster/nodes/{gone}", rest[0].url()), &[], "").await;
    assert_eq!(a.status, 204, "{}", a.body);

    let ids: Vec<u64> = rest.iter().map(|n| n.id()).collect();
    let urls = self::urls(rest.iter().copied());
    converge(
        "node 4 is promoted to voter on every remaining node",
        &urls,
        "/v1/cluster",
        |views| {
            common_leader(views)?;
            views.iter().all(|v| members(v) == all_up(&ids, &ids)).then_some(())
        },
    )
    .await;
    for u in &urls {
        let v = get_ok(u, "/v1/cluster").await;
        assert_eq!(voters(&v).len(), 3, "{v}");
        assert!(voters(&v).contains(&4), "{v}");
    }
    // The new configuration has a working majority.
    subscribe(node(&nodes, 4).url(), &log_sub("promoted", "learner", 1)).await;
}

/// Removing the leader while it runs: it must not commit its own removal (a raft-rs leader that
/// does keeps leading a group it is not in and drops every proposal); it hands leadership to
/// another voter, which removes it and promotes the learner.
#[actix_rt::test]
async fn a_removed_leader_hands_over_and_the_others_go_on() {
    let nodes = start_cluster(4).await;
    let all = urls(&nodes);
    let view = wait_formed_with_voters(&all, &[1, 2, 3, 4], &[1, 2, 3]).await;
    let l = leader(&view).unwrap();
    let rest: Vec<&Node> = nodes.iter().filter(|n| n.id() != l).collect();
    let a = request(
        "DELETE",
        &format!("{}/v1/cluster/nodes/{l}?force=true", rest[0].url()),
        &[],
        "",
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.body);

    let ids: Vec<u64> = rest.iter().map(|n| n.id()).collect();
    let urls = self::urls(rest.iter().copied());
    let new = converge(
        "the removed leader is gone from the table and the Raft group, another leads, and the learner votes",
        &urls,
        "/v1/cluster",
        |views| {
            let new = common_leader(views)?;
            let done = views.iter().all(|v| {
                members(v) == all_up(&ids, &ids) && v["problems"] == serde_json::json!([]) && voters(v) == ids
            });
            (new != l && done).then_some(new)
        },
    )
    .await;
    // The new configuration commits.
    subscribe(node(&nodes, new).url(), &log_sub("after", "leader-removal", 1)).await;
}

#[actix_rt::test]
async fn a_full_cluster_restart_keeps_members_and_subscriptions_and_places_them_again() {
    let mut nodes = start_cluster(3).await;
    let urls = urls(&nodes);
    wait_formed_with_voters(&urls, &[1, 2, 3], &[1, 2, 3]).await;
    subscribe(nodes[0].url(), &log_sub("restart", "one", 2)).await;
    subscribe(nodes[1].url(), &log_sub("restart", "two", 3)).await;
    let placements = same_placements("both subscriptions are placed identically everywhere", &urls, 2).await;
    let table = |v: &Value| {
        let mut ms: Vec<Value> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| json!([m["id"], m["http"], m["peer"], m["status"], m["voter"], m["handlers"]]))
            .collect();
        ms.sort_by_key(|m| m[0].as_u64());
        ms
    };
    let before = table(&get_ok(nodes[0].url(), "/v1/cluster").await);
    let subs_before = get_ok(nodes[0].url(), "/v1/subscriptions").await;
    assert_eq!(subs_before.as_array().unwrap().len(), 2, "{subs_before}");

    for id in [3, 2, 1] {
        let status = nodes.terminate(id).await;
        assert!(status.success(), "SIGTERM ends node {id} cleanly: {status:?}");
    }
    // No node is ready before a majority is back, so start all three before waiting.
    for id in 1..=3 {
        nodes.restart(id);
    }
    nodes.ready().await;
    assert_eq!(urls, self::urls(&nodes), "the nodes kept their HTTP addresses");

    converge(
        "the same members and a leader after the restart",
        &urls,
        "/v1/cluster",
        |views| {
            common_leader(views)?;
            views.iter().all(|v| table(v) == before).then_some(())
        },
    )
    .await;
    // SIGTERM hands a node's instances to the others before it stops, so the instances may sit
    // elsewhere after the restart; every subscription is placed again with all its instances,
    // identically on every node.
    let shape = |rows: &[(String, String, Vec<u64>)]| {
        rows.iter()
            .map(|(t, g, nodes)| (t.clone(), g.clone(), nodes.len()))
            .collect::<Vec<_>>()
    };
    converge(
        "every subscription placed again after the restart",
        &urls,
        "/v1/cluster/placements",
        |ps| {
            let rows: Vec<_> = ps.iter().map(placement_rows).collect();
            let placed = rows.iter().all(|r| *r == rows[0])
                && shape(&rows[0]) == shape(&placements)
                && rows[0]
                    .iter()
                    .all(|(_, _, nodes)| nodes.iter().all(|n| (1..=3).contains(n)));
            placed.then_some(())
        },
    )
    .await;
    for u in &urls {
        let subs = get_ok(u, "/v1/subscriptions").await;
        assert_eq!(subs, subs_before, "subscriptions on {u} after the restart");
    }
    // The restarted cluster commits changes.
    subscribe(nodes[2].url(), &log_sub("restart", "three", 1)).await;
}

#[actix_rt::test]
async fn drain_moves_instances_away() {
    let nodes = start_cluster(3).await;
    let urls = urls(&nodes);
    wait_formed_with_voters(&urls, &[1, 2, 3], &[1, 2, 3]).await;
    subscribe(nodes[0].url(), &log_sub("drain", "me", 3)).await;
    let rows = same_placements("the subscription is placed identically everywhere", &urls, 1).await;
    let drained = rows[0].2[0];
    let asked = nodes.iter().find(|n| n.id() != drained).unwrap();
    let a = post_json(&format!("{}/v1/cluster/nodes/{drained}/drain", asked.url()), &json!({})).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body, json!({ "id": drained, "status": "draining" }));

    converge(
        "no placement lists the drained node and it is draining",
        &urls,
        "/v1/cluster/placements",
        |ps| {
            ps.iter()
                .all(|p| {
                    let rows = placement_rows(p);
                    rows.len() == 1 && rows[0].2.len() == 3 && !rows[0].2.contains(&drained)
                })
                .then_some(())
        },
    )
    .await;
    converge(
        "every node shows the drained node as draining",
        &urls,
        "/v1/cluster",
        |views| {
            views
                .iter()
                .all(|v| {
                    members(v)
                        == [1, 2, 3]
                            .map(|id| (id, if id == drained { "draining" } else { "up" }.to_string(), true))
                            .to_vec()
                })
                .then_some(())
        },
    )
    .await;
    let a = post_json(&format!("{}/v1/cluster/nodes/99/drain", asked.url()), &json!({})).await;
    assert_eq!(a.status, 404, "{}", a.body);
}

#[actix_rt::test]
async fn a_node_joins_while_a_new_leader_is_elected() {
    let mut nodes = start_cluster(3).await;
    let view = wait_formed_with_voters(&urls(&nodes), &[1, 2, 3], &[1, 2, 3]).await;
    let old = leader(&view).unwrap();
    nodes.kill9(old);
    // The survivors still take the dead node for their leader, so the first Join that node 4's seed
    // forwards is lost; node 4 must send it again until the new leader commits it.
    let seed = nodes.iter().find(|n| n.id() != old).unwrap().peer().to_string();
    let started = Instant::now();
    nodes.add(4, &[seed]).await;
    let live: Vec<&Node> = nodes.iter().filter(|n| n.id() != old).collect();
    converge(
        "node 4 is a learner on the survivors and on itself, under a new leader",
        &urls(live.iter().copied()),
        "/v1/cluster",
        |views| {
            let l = common_leader(views)?;
            // The killed leader stays a (voting) member, marked down by the new leader's detector.
            let want: Vec<_> = all_up(&[1, 2, 3, 4], &[1, 2, 3])
                .into_iter()
                .map(|(id, status, voter)| (id, if id == old { "down".to_string() } else { status }, voter))
                .collect();
            (l != old && views.iter().all(|v| members(v) == want)).then_some(())
        },
    )
    .await;
    println!(
        "node 4 joined during the election of a new leader after {:?}",
        started.elapsed()
    );
}
