//! Hostile peers (issue 13, point 4): a rogue node that passed the peer handshake under its own id
//! — it is authenticated — and then misbehaves, against a running 3-node in-process cluster.
//!
//! Each test checks that the attack is refused (the `herald_peer_messages_refused_total` metric,
//! an answer, or the state), that the cluster stays ready with one leader, and that no accepted
//! event is lost (events published with `ack=accepted` before and after the attack all reach
//! their handler). Waits poll against deadlines; the metrics recorder is shared by the process,
//! so each test looks at a `(kind, reason)` that only it provokes, and only at its increase.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::membership::state::Command;
use herald::node::Node;
use herald::proto::{peer_message, AckBatch, AckCode, AckRecord, PeerMessage};
use herald::transport::wire::{Pong, Proposal, ProposalResult};
use herald::transport::{Body, Bus, Envelope, TransportConfig};
use prost::Message as _;
use raft::prelude::{Message as RaftMessage, MessageType};
use raft_prost::Message as _;
use serde_json::json;
use tokio::sync::mpsc;

use common::{cluster, eventually, get, get_text, metric, post_json, request, within, Receiver, TestNode};

const REFUSED: &str = "herald_peer_messages_refused_total";

/// A rogue peer: its peer bus, the address it listens on (members dial it back), and what it
/// receives besides pings (which it answers, so that it looks healthy).
struct Rogue {
    id: u64,
    bus: Bus,
    addr: String,
    control: mpsc::UnboundedReceiver<(u64, Envelope)>,
    app: Option<mpsc::Receiver<(u64, bytes::Bytes)>>,
}

/// Starts rogue node `id` and connects it to every node of `nodes`. The ONE place that builds
/// the rogue's identity and transport configuration: today, with no cluster secret configured,
/// a loopback peer passes the handshake under any id it names; with mutual TLS this is where it
/// gets a certificate of the cluster's CA for its own id.
async fn rogue(nodes: &[TestNode], id: u64) -> Rogue {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    let cluster_id = nodes[0].node.core().config().cluster_id.clone();
    // A node with a valid certificate from the cluster's CA (an insider: a compromised or
    // misbehaving node), so every refusal below is authorisation, not authentication.
    let tls = common::node_tls(&cluster_id, id);
    let config = TransportConfig::new(cluster_id, id, addr.clone()).with_tls(Some(tls));
    let (control_tx, mut control_rx) = mpsc::channel::<(u64, Envelope)>(1024);
    let (app_tx, app_rx) = mpsc::channel(herald::transport::APP_QUEUE);
    let bus = Bus::start(config, control_tx, app_tx).expect("the rogue's bus starts");
    bus.serve(listener);
    for n in nodes {
        bus.add_peer(node_id(n), n.node.core().membership().peer_addr().to_string());
    }
    // Pings are answered (a rogue that looks healthy gets work); the rest goes to the test.
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let control = bus.control().clone();
    actix_rt::spawn(async move {
        while let Some((from, env)) = control_rx.recv().await {
            match env.body {
                Some(Body::Ping(p)) => {
                    let pong = Pong {
                        seq: p.seq,
                        sent_unix_nanos: p.sent_unix_nanos,
                        handled: 0,
                        backlog: 0,
                    };
                    let _ = control.send(from, Envelope::new(Body::Pong(pong)));
                }
                _ => {
                    let _ = seen_tx.send((from, env));
                }
            }
        }
    });
    Rogue {
        id,
        bus,
        addr,
        control: seen_rx,
        app: Some(app_rx),
    }
}

impl Rogue {
    /// Sends `env` to node `to` on the control channel.
    fn send(&self, to: u64, env: Envelope) {
        self.bus.control().send(to, env).expect("the rogue can queue to a node");
    }

    /// Proposes `command` to node `to` as a forwarded proposal with id `id`.
    fn propose(&self, to: u64, id: u64, command: &Command) {
        self.send(
            to,
            Envelope::new(Body::Propose(Proposal {
                id,
                command: command.to_bytes().into(),
                origin: 0,
            })),
        );
    }

    /// Joins the cluster as itself (allowed: `cluster.join_approval` is `auto`) through node
    /// `seed`, and waits until every node lists it as a member.
    async fn join(&self, nodes: &[TestNode], seed: u64, handlers: &[&str]) {
        let join = Command::join(self.id, "127.0.0.1:9", self.addr.clone(), handlers.iter().copied());
        self.propose(seed, 0, &join);
        let id = self.id;
        for n in nodes {
            let url = n.url.clone();
            eventually("the rogue is a member", || {
                let url = url.clone();
                async move {
                    let (_, v) = get(&format!("{url}/v1/cluster")).await;
                    v["members"].as_array()?.iter().any(|m| m["id"] == id).then_some(())
                }
            })
            .await;
        }
    }

    /// Waits for the answer to proposal `id`.
    async fn proposal_result(&mut self, id: u64) -> (u64, ProposalResult) {
        within("an answer to the rogue's proposal", common::DEADLINE, || {
            let got = loop {
                match self.control.try_recv() {
                    Ok((
                        from,
                        Envelope {
                            body: Some(Body::ProposeResult(r)),
                        },
                    )) if r.id == id => break Some((from, r)),
                    Ok(_) => continue,
                    Err(_) => break None,
                }
            };
            async move { got }
        })
        .await
    }
}

fn node_id(n: &TestNode) -> u64 {
    n.node.core().config().node_id
}

/// `(leader, term)` as node `n`'s Raft driver sees it.
fn raft_of(n: &TestNode) -> (u64, u64) {
    let s = n.node.core().membership().status().borrow().clone();
    (s.leader, s.term)
}

/// The refusal counter for `kind` and `reason` (0 while never counted).
async fn refused(url: &str, kind: &str, reason: &str) -> f64 {
    metric(
        &get_text(&format!("{url}/metrics")).await,
        REFUSED,
        &[("kind", kind), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// Waits until the refusal counter for `kind` and `reason` exceeds `before`.
async fn wait_refused(url: &str, kind: &str, reason: &str, before: f64) -> f64 {
    let what = format!("{REFUSED}{{kind={kind}, reason={reason}}} > {before}");
    eventually(&what, || async move {
        let now = refused(url, kind, reason).await;
        (now > before).then_some(now)
    })
    .await
}

/// Every node is ready, its driver runs, and all agree on one leader among them.
async fn assert_one_leader_and_ready(nodes: &[TestNode]) {
    let ids: Vec<u64> = nodes.iter().map(node_id).collect();
    eventually("every node ready, with one leader", || {
        let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
        let running = nodes.iter().all(|n| n.node.core().membership().is_running());
        let leaders: BTreeSet<u64> = nodes.iter().map(|n| raft_of(n).0).collect();
        let ids = ids.clone();
        async move {
            for u in &urls {
                if get(&format!("{u}/readyz")).await.0 != 200 {
                    return None;
                }
            }
            let one = leaders.len() == 1 && leaders.iter().all(|l| ids.contains(l));
            (running && one).then_some(())
        }
    })
    .await;
}

/// Creates a webhook subscription of `topic` to `receiver` with `instances`, and waits until
/// every node holds its placement.
async fn subscribe(nodes: &[TestNode], topic: &str, receiver: &Receiver, instances: u32) -> Vec<u64> {
    let spec = json!({"topic": topic, "group": "g", "handler": {"kind": "webhook", "url": receiver.url},
                      "instances": instances});
    let a = post_json(&format!("{}/v1/subscriptions", nodes[0].url), &spec).await;
    assert!(a.status == 201 || a.status == 200, "subscribe: {}", a.body);
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    common::views::wait_placed(&urls, topic, "g", instances as usize)
        .await
        .1
}

/// Publishes `n` events to `topic` with `ack=accepted`, round robin over the nodes; their ids.
async fn publish(nodes: &[TestNode], topic: &str, n: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let url = &nodes[i % nodes.len()].url;
        let a = request(
            "POST",
            &format!("{url}/v1/topics/{topic}/events?ack=accepted"),
            &[("content-type", "application/json")],
            json!({ "n": i }).to_string(),
        )
        .await;
        assert_eq!(a.status, 202, "publish: {}", a.body);
        ids.insert(a.body["id"].as_str().expect("an event id").to_string());
    }
    ids
}

/// Waits until every event of `want` was handled: received by `receiver`, or in `also`.
async fn wait_handled(receiver: &Receiver, want: &BTreeSet<String>, also: &Mutex<BTreeSet<String>>) {
    within("every accepted event is handled", Duration::from_secs(60), || {
        let mut got: BTreeSet<String> = receiver.ids().into_iter().collect();
        got.extend(also.lock().unwrap().iter().cloned());
        let missing = want.difference(&got).count();
        async move { (missing == 0).then_some(()) }
    })
    .await;
}

async fn shutdown(nodes: Vec<TestNode>, rogue: Rogue) {
    rogue.bus.shutdown();
    for n in nodes.into_iter().rev() {
        n.node.shutdown().await;
    }
}

fn three() -> Vec<herald::node::NodeBuilder> {
    (0..3).map(|_| Node::builder()).collect()
}

/// (a) A Raft message whose `from` names the leader, sent on the rogue's own connection: a
/// `MsgTimeoutNow`, which would make a follower start an election at once.
#[actix_rt::test]
async fn a_raft_message_with_a_forged_sender_is_refused() {
    let receiver = Receiver::start(0).await;
    let nodes = cluster(three()).await;
    subscribe(&nodes, "hostile.a", &receiver, 1).await;
    let mut want = publish(&nodes, "hostile.a", 10).await;
    let r = rogue(&nodes, 9).await;
    let (leader, term) = raft_of(&nodes[0]);
    let target = nodes.iter().map(node_id).find(|&id| id != leader).unwrap();
    let before = refused(&nodes[0].url, "raft", "forged_from").await;

    let mut m = RaftMessage::default();
    m.set_msg_type(MessageType::MsgTimeoutNow);
    m.from = leader;
    m.to = target;
    m.term = term;
    r.send(target, Envelope::raft(m.encode_to_vec()));

    wait_refused(&nodes[0].url, "raft", "forged_from", before).await;
    assert_one_leader_and_ready(&nodes).await;
    assert_eq!(
        raft_of(&nodes[target as usize - 1]),
        (leader, term),
        "the forged message started no election"
    );
    want.extend(publish(&nodes, "hostile.a", 10).await);
    wait_handled(&receiver, &want, &Mutex::default()).await;
    shutdown(nodes, r).await;
}

/// (b) A member's heartbeat whose commit index is far beyond the follower's log: raft-rs panics
/// on it, which used to stop the follower's membership driver for good.
#[actix_rt::test]
async fn a_heartbeat_with_a_huge_commit_is_dropped_and_the_follower_keeps_running() {
    let receiver = Receiver::start(0).await;
    let nodes = cluster(three()).await;
    subscribe(&nodes, "hostile.b", &receiver, 1).await;
    let mut want = publish(&nodes, "hostile.b", 10).await;
    let r = rogue(&nodes, 9).await;
    // A member (a learner): its Raft messages get past the membership check.
    r.join(&nodes, 1, &[]).await;
    let (leader, term) = raft_of(&nodes[0]);
    let target = nodes.iter().map(node_id).find(|&id| id != leader).unwrap();
    let before = refused(&nodes[0].url, "raft", "commit_beyond_log").await;

    let mut hb = RaftMessage::default();
    hb.set_msg_type(MessageType::MsgHeartbeat);
    hb.from = r.id;
    hb.to = target;
    hb.term = term;
    hb.commit = 1 << 40;
    r.send(target, Envelope::raft(hb.encode_to_vec()));

    wait_refused(&nodes[0].url, "raft", "commit_beyond_log", before).await;
    assert!(
        nodes[target as usize - 1].node.core().membership().is_running(),
        "the follower's membership driver stopped"
    );
    assert_one_leader_and_ready(&nodes).await;
    want.extend(publish(&nodes, "hostile.b", 10).await);
    wait_handled(&receiver, &want, &Mutex::default()).await;
    shutdown(nodes, r).await;
}

/// (c) A node that is not a member proposes a subscription, and a `Join` in another node's name:
/// both are refused with an answer that says why, and neither reaches the table.
#[actix_rt::test]
async fn proposals_from_a_non_member_are_refused_with_a_reason() {
    let receiver = Receiver::start(0).await;
    let nodes = cluster(three()).await;
    subscribe(&nodes, "hostile.c", &receiver, 1).await;
    let mut want = publish(&nodes, "hostile.c", 10).await;
    let mut r = rogue(&nodes, 9).await;
    let before = refused(&nodes[0].url, "proposal", "not_a_member").await;
    let before_other = refused(&nodes[0].url, "proposal", "join_for_other_id").await;

    let evil: herald::subscription::SubscriptionSpec = serde_json::from_value(
        json!({"topic": "hostile.c.evil", "group": "g", "handler": {"kind": "log"}, "instances": 1}),
    )
    .expect("a valid spec");
    r.propose(2, 41, &Command::subscribe(&evil));
    let (from, answer) = r.proposal_result(41).await;
    assert_eq!(from, 2);
    assert!(answer.error.contains("not a member"), "{answer:?}");

    r.propose(3, 42, &Command::join(7, "127.0.0.1:7", "127.0.0.1:7", ["log"]));
    let (from, answer) = r.proposal_result(42).await;
    assert_eq!(from, 3);
    assert!(answer.error.contains("only join as itself"), "{answer:?}");

    wait_refused(&nodes[0].url, "proposal", "not_a_member", before).await;
    wait_refused(&nodes[0].url, "proposal", "join_for_other_id", before_other).await;
    for n in &nodes {
        let (_, subs) = get(&format!("{}/v1/subscriptions", n.url)).await;
        assert!(
            !subs.to_string().contains("hostile.c.evil"),
            "a non-member created a subscription: {subs}"
        );
        let (_, c) = get(&format!("{}/v1/cluster", n.url)).await;
        assert!(
            c["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["id"] != 7 && m["id"] != 9),
            "{c}"
        );
    }
    assert_one_leader_and_ready(&nodes).await;
    want.extend(publish(&nodes, "hostile.c", 10).await);
    wait_handled(&receiver, &want, &Mutex::default()).await;
    shutdown(nodes, r).await;
}

/// (d) A member that runs an instance learns the delivery ids the ingress node hands out, and
/// acks the neighbouring ids — deliveries sent to the other nodes — as done. Those acks are
/// refused: only the node a delivery was sent to may answer for it.
#[actix_rt::test]
async fn forged_acks_for_another_peers_deliveries_are_refused() {
    // Slow: deliveries to the honest nodes stay pending while the forged acks arrive.
    let receiver = Receiver::start_with("127.0.0.1:0", 0, Duration::from_millis(200)).await;
    let nodes = cluster(three()).await;
    let mut r = rogue(&nodes, 9).await;
    r.join(&nodes, 1, &["webhook"]).await;
    let on = subscribe(&nodes, "hostile.d", &receiver, 4).await;
    assert!(on.contains(&9), "the rogue runs an instance: {on:?}");
    let before = refused(&nodes[0].url, "ack", "not_sent_to_peer").await;

    // The rogue acks what it was sent (honestly), and forges acks for the ids just below: the
    // ingress node handed them out just before, to the other nodes, whose slow handler has not
    // answered yet.
    let handled_by_rogue = Arc::new(Mutex::new(BTreeSet::new()));
    let mut app = r.app.take().unwrap();
    let events = r.bus.events().clone();
    let mine = handled_by_rogue.clone();
    actix_rt::spawn(async move {
        let mut sent_to_me = BTreeSet::new();
        while let Some((from, bytes)) = app.recv().await {
            let Ok(PeerMessage {
                body: Some(peer_message::Body::Events(batch)),
            }) = PeerMessage::decode(bytes)
            else {
                continue;
            };
            let ids: BTreeSet<u64> = batch.deliveries.iter().map(|d| d.id).collect();
            sent_to_me.extend(ids.iter().copied());
            mine.lock().unwrap().extend(
                batch
                    .deliveries
                    .iter()
                    .filter_map(|d| Some(d.event.as_ref()?.id.clone())),
            );
            let ack = |id| AckRecord {
                id,
                code: AckCode::Ok as i32,
                attempts: 1,
                error: String::new(),
            };
            let mut acks: Vec<AckRecord> = ids.iter().map(|&id| ack(id)).collect();
            let first = *ids.first().unwrap();
            acks.extend(
                (first.saturating_sub(8)..first)
                    .filter(|id| !sent_to_me.contains(id))
                    .map(ack),
            );
            let msg = PeerMessage {
                body: Some(peer_message::Body::Acks(AckBatch { acks, credits: vec![] })),
            };
            let _ = events.send(from, Envelope::app(msg.encode_to_vec()));
        }
    });

    // Published on node 1, so its deliveries to nodes 2, 3 and the rogue share one id counter.
    let want = publish(&nodes[..1], "hostile.d", 40).await;
    wait_refused(&nodes[0].url, "ack", "not_sent_to_peer", before).await;
    assert_one_leader_and_ready(&nodes).await;
    wait_handled(&receiver, &want, &handled_by_rogue).await;
    shutdown(nodes, r).await;
}

/// With `cluster.join_approval = "manual"`, a new node's `Join` leaves it pending — shown in
/// `/v1/cluster`, asked again it is told it waits — until an admin approves it.
#[actix_rt::test]
async fn a_join_waits_for_an_admins_approval_when_approval_is_manual() {
    let builders = (0..3)
        .map(|i| {
            let mut b = Node::builder();
            // Node 1 admits the other two as the cluster forms; they ask for approval.
            if i > 0 {
                b.config_mut().cluster.join_approval = herald::config::JoinApproval::Manual;
            }
            b
        })
        .collect();
    let nodes = cluster(builders).await;
    let mut r = rogue(&nodes, 9).await;
    let join = Command::join(r.id, "127.0.0.1:9", r.addr.clone(), ["log"]);
    r.propose(2, 0, &join);
    for n in &nodes {
        let url = n.url.clone();
        eventually("the join is pending on every node", || {
            let url = url.clone();
            async move {
                let (_, c) = get(&format!("{url}/v1/cluster")).await;
                c["pending_joins"].as_array()?.iter().any(|p| p["id"] == 9).then_some(c)
            }
        })
        .await;
    }
    let url = nodes[0].url.clone();
    let (_, c) = get(&format!("{url}/v1/cluster")).await;
    assert!(c["members"].as_array().unwrap().iter().all(|m| m["id"] != 9), "{c}");
    r.propose(2, 43, &join);
    let (_, answer) = r.proposal_result(43).await;
    assert!(answer.error.contains("approve"), "{answer:?}");

    let a = request("POST", &format!("{url}/v1/cluster/nodes/7/approve"), &[], "").await;
    assert_eq!(a.status, 404, "{}", a.body);
    let a = request("POST", &format!("{url}/v1/cluster/nodes/9/approve"), &[], "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let (_, c) = get(&format!("{url}/v1/cluster")).await;
    assert!(c["members"].as_array().unwrap().iter().any(|m| m["id"] == 9), "{c}");
    assert_eq!(c["pending_joins"], json!([]), "{c}");
    assert_one_leader_and_ready(&nodes).await;
    shutdown(nodes, r).await;
}

/// Handshakes with node `n`'s peer listener as `identity`, dialing for the control channel.
async fn dial(
    n: &TestNode,
    identity: &herald::transport::Identity,
) -> Result<herald::transport::Established<tokio::net::TcpStream>, herald::transport::HandshakeError> {
    let addr = n.node.core().membership().peer_addr();
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    herald::transport::handshake_on(
        stream,
        identity,
        addr,
        None,
        Some(herald::transport::Channel::Control),
        Duration::from_secs(5),
        |_, _| false,
    )
    .await
}

/// (f) The TLS equivalents of impersonation: a node with a valid certificate claiming to be the
/// leader; a certificate of another CA; TLS without a client certificate; and plaintext. All are refused at
/// the handshake, and the cluster goes on.
#[actix_rt::test]
async fn impostors_strangers_and_plaintext_peers_are_refused_at_the_handshake() {
    use herald::transport::{HandshakeError, Identity, PeerTls};
    let receiver = Receiver::start(0).await;
    let nodes = cluster(three()).await;
    subscribe(&nodes, "hostile.f", &receiver, 1).await;
    let mut want = publish(&nodes, "hostile.f", 10).await;
    let (leader, term) = raft_of(&nodes[0]);
    let cluster_id = nodes[0].node.core().config().cluster_id.clone();

    // Node 9's own, valid certificate, and a Hello that says it is the leader.
    let impostor = Identity {
        cluster_id: cluster_id.clone(),
        node_id: leader,
        advertise_addr: "127.0.0.1:9".into(),
        tls: Some(common::node_tls(&cluster_id, 9)),
    };
    let target = nodes.iter().find(|n| node_id(n) != leader).expect("a follower");
    match dial(target, &impostor).await {
        Err(HandshakeError::Untrusted { message, .. }) => {
            assert!(message.contains(&format!("claims to be node {leader}")), "{message}")
        }
        other => panic!("the impostor: expected Untrusted, got {other:?}"),
    }

    // A certificate for node 9 of this cluster id from a CA the cluster does not trust.
    let stranger_ca = herald::pki::Ca::generate(&cluster_id).expect("ca");
    let n = stranger_ca.issue_node(9, &[], &[], 1).expect("issue");
    let stranger = Identity {
        tls: Some(Arc::new(
            PeerTls::from_pem(&n.ca_pem, &n.cert_pem, &n.key_pem, &cluster_id, 9).expect("usable"),
        )),
        node_id: 9,
        ..impostor.clone()
    };
    let r = dial(target, &stranger).await;
    assert!(matches!(r, Err(HandshakeError::Tls { .. })), "another CA: {r:?}");

    // TLS without a client certificate (a client that trusts anything the node presents).
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything))
        .with_no_client_auth();
    let stream = tokio::net::TcpStream::connect(target.node.core().membership().peer_addr())
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("herald-peer").expect("name");
    let answer = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(anonymous))
            .connect(name, stream)
            .await?;
        // TLS 1.3: the server's verdict on the client certificate arrives after the handshake.
        let mut buf = [0u8; 64];
        tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await
    };
    let r = tokio::time::timeout(Duration::from_secs(20), answer)
        .await
        .expect("answered");
    assert!(
        r.as_ref().is_err_and(|e| e.to_string().contains("CertificateRequired")),
        "no client certificate: {r:?}"
    );

    // No TLS at all.
    let plain = Identity {
        tls: None,
        node_id: 9,
        ..impostor
    };
    let r = dial(target, &plain).await;
    assert!(r.is_err(), "plaintext: {r:?}");

    assert_one_leader_and_ready(&nodes).await;
    assert_eq!(raft_of(target), (leader, term), "nothing disturbed the Raft group");
    want.extend(publish(&nodes, "hostile.f", 10).await);
    wait_handled(&receiver, &want, &Mutex::default()).await;
    for n in nodes.into_iter().rev() {
        n.node.shutdown().await;
    }
}

/// A TLS client's certificate check that accepts any server: for playing a stranger.
#[derive(Debug)]
struct TrustAnything;

impl rustls::client::danger::ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// (g) Garbage and an oversized frame on the peer port, and 500 half-open connections held open:
/// each bad connection is dropped on its own; of the half-open ones, those beyond
/// `cluster.max_pending_handshakes` (256) at once and the others once their handshake times out
/// (a peer connecting meanwhile gets a slot then); and meanwhile the cluster keeps its leader and
/// delivers every accepted event.
#[actix_rt::test]
async fn garbage_oversized_frames_and_half_open_connections_leave_the_cluster_working() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let receiver = Receiver::start(0).await;
    let nodes = cluster(three()).await;
    subscribe(&nodes, "hostile.g", &receiver, 1).await;
    let mut want = publish(&nodes, "hostile.g", 10).await;
    let (leader, term) = raft_of(&nodes[0]);
    let target = nodes.iter().find(|n| node_id(n) != leader).expect("a follower");
    let addr = target.node.core().membership().peer_addr();

    let mut half_open = Vec::new();
    for _ in 0..500 {
        half_open.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    for garbage in [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), vec![0xff; 64 * 1024]] {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(&garbage).await;
        let mut rest = Vec::new();
        // Closed (EOF, or a reset for the unread garbage): either way, dropped.
        let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the node dropped a garbage connection");
    }
    // An authenticated peer (node 9's certificate) announces a 1 GB frame after the handshake.
    let cluster_id = target.node.core().config().cluster_id.clone();
    let rogue = herald::transport::Identity {
        cluster_id: cluster_id.clone(),
        node_id: 9,
        advertise_addr: "127.0.0.1:9".into(),
        tls: Some(common::node_tls(&cluster_id, 9)),
    };
    // The half-open connections hold every handshake slot until their handshake times out.
    let mut est = common::within("node 9 admitted", Duration::from_secs(30), || async {
        dial(target, &rogue).await.ok()
    })
    .await;
    let mut frame = (1u32 << 30).to_be_bytes().to_vec();
    frame.extend_from_slice(&[0u8; 1024]);
    est.stream.write_all(&frame).await.expect("write");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), est.stream.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the node dropped the connection of the oversized frame");

    // With the 500 still open, the cluster works.
    assert_one_leader_and_ready(&nodes).await;
    want.extend(publish(&nodes, "hostile.g", 10).await);
    wait_handled(&receiver, &want, &Mutex::default()).await;
    assert_eq!(raft_of(target), (leader, term), "no election");

    // The node closes each half-open connection once its handshake times out (5 s).
    for mut s in half_open {
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a half-open connection was closed by the node: {closed:?}"
        );
    }
    for n in nodes.into_iter().rev() {
        n.node.shutdown().await;
    }
}
