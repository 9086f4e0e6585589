mod common;
use common::*;

#[actix_rt::test]
async fn node_starts_and_answers() {
    let n = start_node(herald::node::Node::builder()).await;
    let (s, b) = get(&format!("{}/v1/cluster", n.url)).await;
    assert_eq!(s, 200);
    assert_eq!(b["members"][0]["status"], "up");
    let p = spawn_herald(&["--data-dir", n.dir.path().join("p").to_str().unwrap()], &[]);
    let (s, _) = get(&format!("{}/healthz", p.url)).await;
    assert_eq!(s, 200);
    assert!(terminate(p).await.success());
    n.node.shutdown().await;
}
