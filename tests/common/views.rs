//! Reading what nodes show of their cluster — the members, statuses and leader of `/v1/cluster`,
//! the placements of `/v1/cluster/placements` — and waiting until every node agrees. One parser of
//! each answer for every test file (in-process nodes and real processes alike).

use serde_json::Value;

use super::cluster::converge;

/// `(id, status, voter)` of every member of a `/v1/cluster` view, by id.
pub fn members(view: &Value) -> Vec<(u64, String, bool)> {
    let mut m: Vec<(u64, String, bool)> = view["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    (
                        m["id"].as_u64().unwrap_or(0),
                        m["status"].as_str().unwrap_or("?").to_string(),
                        m["voter"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    m.sort();
    m
}

/// `(id, status)` of every member of a `/v1/cluster` view, by id.
pub fn statuses(view: &Value) -> Vec<(u64, String)> {
    members(view).into_iter().map(|(id, s, _)| (id, s)).collect()
}

/// The member ids of a `/v1/cluster` view, sorted.
pub fn member_ids(view: &Value) -> Vec<u64> {
    members(view).into_iter().map(|(id, _, _)| id).collect()
}

/// `(id, "up", voter)` for each of `ids`, voters as in `voters`: what [`members`] shows of a whole
/// cluster.
pub fn all_up(ids: &[u64], voters: &[u64]) -> Vec<(u64, String, bool)> {
    ids.iter()
        .map(|&id| (id, "up".to_string(), voters.contains(&id)))
        .collect()
}

/// The ids of the voters of a `/v1/cluster` view.
pub fn voters(view: &Value) -> Vec<u64> {
    members(view).into_iter().filter(|m| m.2).map(|m| m.0).collect()
}

/// The leader a `/v1/cluster` view names, if any.
pub fn leader(view: &Value) -> Option<u64> {
    view["leader"].as_u64()
}

/// The same leader on every view, if they all know one.
pub fn common_leader(views: &[Value]) -> Option<u64> {
    let l = leader(views.first()?)?;
    views.iter().all(|v| leader(v) == Some(l)).then_some(l)
}

/// `(topic, group, epoch, nodes)` of every placement in a `/v1/cluster/placements` answer, sorted.
pub fn placements(answer: &Value) -> Vec<(String, String, u64, Vec<u64>)> {
    let mut rows: Vec<_> = answer
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    (
                        p["topic"].as_str().unwrap_or("?").to_string(),
                        p["group"].as_str().unwrap_or("?").to_string(),
                        p["epoch"].as_u64().unwrap_or(0),
                        p["nodes"]
                            .as_array()
                            .map(|ns| ns.iter().map(|n| n.as_u64().unwrap_or(0)).collect())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    rows.sort();
    rows
}

/// `(epoch, nodes)` of the placement of `topic`/`group` in a `/v1/cluster/placements` answer.
pub fn placement_of(answer: &Value, topic: &str, group: &str) -> Option<(u64, Vec<u64>)> {
    placements(answer)
        .into_iter()
        .find(|(t, g, _, _)| t == topic && g == group)
        .map(|(_, _, epoch, nodes)| (epoch, nodes))
}

/// `(topic, group, nodes)` of every placement, sorted (epochs left out).
pub fn placement_rows(answer: &Value) -> Vec<(String, String, Vec<u64>)> {
    placements(answer).into_iter().map(|(t, g, _, n)| (t, g, n)).collect()
}

/// Waits until every node in `urls` shows exactly `ids` as members, all `up`, and one leader;
/// returns the first node's view.
pub async fn wait_formed(urls: &[String], ids: &[u64]) -> Value {
    let want: Vec<(u64, String)> = ids.iter().map(|&id| (id, "up".to_string())).collect();
    wait_agreed(
        "every node shows the same members, all up, and one leader",
        urls,
        statuses,
        want,
    )
    .await
}

/// Like [`wait_formed`], and the voters are exactly `voter_ids`.
pub async fn wait_formed_with_voters(urls: &[String], ids: &[u64], voter_ids: &[u64]) -> Value {
    let want = all_up(ids, voter_ids);
    wait_agreed(
        "every node shows the same members, voters and leader",
        urls,
        members,
        want,
    )
    .await
}

/// Waits until every node names the same leader and `seen` of its `/v1/cluster` view is `want`.
async fn wait_agreed<T: PartialEq>(what: &str, urls: &[String], seen: fn(&Value) -> T, want: T) -> Value {
    converge(what, urls, "/v1/cluster", |views| {
        common_leader(views)?;
        views.iter().all(|v| seen(v) == want).then(|| views[0].clone())
    })
    .await
}

/// Waits until every node shows the same placement of `topic`/`group` with `instances` nodes;
/// returns its `(epoch, nodes)`.
pub async fn wait_placed(urls: &[String], topic: &str, group: &str, instances: usize) -> (u64, Vec<u64>) {
    wait_placement(urls, topic, group, &format!("on {instances} node(s)"), |n| {
        n.len() == instances
    })
    .await
}

/// Waits until every node shows the same placement of `topic`/`group`, one whose nodes `accept`
/// takes (`what` says which); returns its `(epoch, nodes)`.
pub async fn wait_placement(
    urls: &[String],
    topic: &str,
    group: &str,
    what: &str,
    accept: impl Fn(&[u64]) -> bool,
) -> (u64, Vec<u64>) {
    converge(
        &format!("every node shows the same placement of {topic}/{group} {what}"),
        urls,
        "/v1/cluster/placements",
        |ps| {
            let first = placement_of(&ps[0], topic, group)?;
            (accept(&first.1)
                && ps
                    .iter()
                    .all(|p| placement_of(p, topic, group).as_ref() == Some(&first)))
            .then_some(first)
        },
    )
    .await
}
