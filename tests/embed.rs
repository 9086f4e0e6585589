//! Embedding: a node started with `Node::builder()…start()` inside an application that already
//! runs its own actix-web server. The library must leave the process to the application: no argv
//! parsing, no global tracing subscriber, no metrics recorder, no signal handlers; the
//! application publishes through the node's Rust handle from its own routes.
//!
//! This file holds one test on purpose: it checks process-wide state (the global subscriber and
//! recorder), which another test in the same binary could set.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use herald::prelude::*;
use serde_json::json;

/// Records the `order_id` of every order it handles.
struct Orders(Arc<Mutex<Vec<u64>>>);

impl Actor for Orders {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Orders {
    type Result = HandlerResult;
    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        let order: serde_json::Value = d.event.json_data()?;
        let id = order["order_id"]
            .as_u64()
            .ok_or_else(|| HandlerError::msg("no order_id"))?;
        self.0.lock().unwrap().push(id);
        Ok(())
    }
}

/// The application's own route: takes an order and publishes it through the node, waiting until
/// the handler processed it.
async fn place_order(publisher: web::Data<Publisher>, body: web::Json<serde_json::Value>) -> HttpResponse {
    let event = match Event::json("orders.placed", &body.into_inner()) {
        Ok(e) => e,
        Err(e) => return HttpResponse::BadRequest().body(e.to_string()),
    };
    match publisher.publish(event, AckMode::Processed).await {
        Ok(answer) => HttpResponse::Ok().json(json!({ "event_id": answer.id, "subscriptions": answer.subscriptions })),
        Err(e) => HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
}

#[actix_rt::test]
async fn a_node_runs_inside_an_existing_actix_web_application() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handled = seen.clone();
    let mut builder = Node::builder()
        .handler("orders", move || Orders(handled.clone()))
        .subscribe("orders.placed", "fulfilment", "orders");
    let c = builder.config_mut();
    c.http.addr = "127.0.0.1:0".into();
    c.cluster.peer = "127.0.0.1:0".into();
    c.data_dir = dir.path().to_path_buf();
    // An embedded node needs peer certificates like any other; the library makes them too.
    let ca = herald::pki::Ca::generate(&c.cluster_id).expect("a CA");
    let tls = dir.path().join("tls");
    ca.issue_node(c.node_id, &[], &[], 1)
        .expect("a node certificate")
        .save(&tls, false)
        .expect("saved");
    let (ca_file, cert, key) = herald::pki::NodeCert::paths(&tls);
    (c.peer_tls.ca, c.peer_tls.cert, c.peer_tls.key) = (Some(ca_file), Some(cert), Some(key));
    // `start` reads no flags or `HERALD_*` variables: only `from_env_and_args` (or `.main()`) does.
    let node = builder
        .start()
        .await
        .expect("the node starts inside the application's actix system");
    tokio::time::timeout(Duration::from_secs(20), node.ready())
        .await
        .expect("the node is ready within 20 s");

    let publisher = node.publisher();
    let app = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(publisher.clone()))
            .route("/orders", web::post().to(place_order))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .expect("bind the application's port");
    let app_addr = app.addrs()[0];
    let server = app.run();
    let app_handle = server.handle();
    actix_rt::spawn(server);

    let client = awc::Client::builder().timeout(Duration::from_secs(30)).finish();
    for order_id in [7u64, 8, 9] {
        let mut r = client
            .post(format!("http://{app_addr}/orders"))
            .send_json(&json!({ "order_id": order_id }))
            .await
            .expect("the application answers");
        let body: serde_json::Value = r.json().await.expect("a JSON answer");
        assert_eq!(r.status().as_u16(), 200, "order {order_id}: {body}");
        assert_eq!(body["subscriptions"], 1, "order {order_id}: {body}");
    }
    assert_eq!(
        *seen.lock().unwrap(),
        vec![7, 8, 9],
        "each order handled once, in order"
    );

    // The node's own Rust handle answers one result for one event.
    let answer = node
        .publish(
            Event::json("orders.placed", &json!({ "order_id": 10 })).unwrap(),
            AckMode::Processed,
        )
        .await
        .expect("published");
    assert_eq!(answer.subscriptions, 1);
    assert_eq!(seen.lock().unwrap().last(), Some(&10));

    // The library touched no process-wide state: the application may install its own subscriber
    // and recorder after starting a node.
    assert!(
        !tracing::dispatcher::has_been_set(),
        "starting a node installed a global tracing subscriber"
    );
    metrics::set_global_recorder(metrics::NoopRecorder).expect("starting a node installed a global metrics recorder");

    app_handle.stop(true).await;
    node.shutdown().await;
}
