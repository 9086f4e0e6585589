//! Publishing from Rust inside one node with `Publisher::emit` (`Ingress::emit`): Herald's
//! `do_send`, `ack=none` answering only accepted or refused (issue 16, point 1). It must keep
//! every promise `publish` with `ack=none` keeps: each subscription of the topic gets every
//! accepted event once (one-to-many across groups), in publish order on a one-instance
//! subscription; invalid events are refused; a full mailbox refuses with `Overloaded` instead of
//! queueing without bound, and every event that was accepted is still handled.
//!
//! Every wait polls against a deadline.

mod common;

use std::sync::{Arc, Condvar, Mutex};

use herald::prelude::*;

use common::{eventually, start_node, TestNode};

/// What the handlers saw: (group, event id), in handling order.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// Open (`true`) or closed, and the handlers waiting for it to open.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.opened.notify_all();
    }

    /// Blocks the calling (worker) thread while the gate is closed.
    fn pass(&self) {
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            closed = self.opened.wait(closed).unwrap();
        }
    }
}

/// Records each delivery; while `gate` is closed, blocks its worker until it opens (the slow
/// consumer of the overload test).
struct Record {
    seen: Seen,
    gate: Arc<Gate>,
}

impl Actor for Record {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Record {
    type Result = HandlerResult;
    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        self.gate.pass();
        self.seen
            .lock()
            .unwrap()
            .push((d.subscription.group.clone(), d.event.id.to_string()));
        Ok(())
    }
}

/// A node whose handler `record` runs the one subscription `orders`/`billing`, with `configure`
/// applied to its config.
async fn billing_node(seen: &Seen, gate: &Arc<Gate>, configure: impl FnOnce(&mut herald::config::Config)) -> TestNode {
    let (s, g) = (seen.clone(), gate.clone());
    let mut builder = Node::builder()
        .handler("record", move || Record {
            seen: s.clone(),
            gate: g.clone(),
        })
        .subscription(SubscriptionSpec::rust("orders", "billing", "record"));
    configure(builder.config_mut());
    start_node(builder).await
}

fn handled(seen: &Seen, group: &str) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(g, _)| g == group)
        .map(|(_, id)| id.clone())
        .collect()
}

#[actix_rt::test]
async fn emitted_events_reach_every_subscription_once_in_order_and_invalid_ones_are_refused() {
    let seen: Seen = Arc::default();
    let gate = Arc::new(Gate::default());
    let (s, g) = (seen.clone(), gate.clone());
    let node = start_node(
        Node::builder()
            .handler("record", move || Record {
                seen: s.clone(),
                gate: g.clone(),
            })
            .subscription(SubscriptionSpec::rust("orders", "billing", "record"))
            .subscription(SubscriptionSpec::rust("orders", "audit", "record")),
    )
    .await;
    let publisher = node.node.publisher();

    let mut ids = Vec::new();
    for i in 0..500u32 {
        let e = Event::json("orders", &serde_json::json!({ "n": i })).unwrap();
        ids.push(e.id.to_string());
        publisher.emit(e).expect("an emitted event is accepted");
    }
    for group in ["billing", "audit"] {
        eventually(&format!("{group} handled all 500 emitted events"), || {
            let n = handled(&seen, group).len();
            async move { (n >= 500).then_some(()) }
        })
        .await;
        assert_eq!(handled(&seen, group), ids, "{group}: every event once, in emit order");
    }

    // Refused like `publish`: an invalid event is not accepted and reaches no handler.
    let mut bad = Event::json("orders", &serde_json::json!({})).unwrap();
    bad.topic = "no spaces allowed".into();
    match publisher.emit(bad) {
        Err(PublishError::Invalid(_)) => {}
        other => panic!("an event with an invalid topic must be refused as invalid, got {other:?}"),
    }
    // A topic nobody subscribes to: accepted, delivered nowhere (as `publish` answers 0
    // subscriptions). The node's own handle emits the same way.
    node.node
        .emit(Event::json("nobody.listens", &serde_json::json!({})).unwrap())
        .expect("an event of a topic without subscriptions is accepted");

    // The handle is still held: the shutdown does not leave the WAL open for it (a node starts
    // on the same data dir at once: an open store would refuse it), and the handle's publishes
    // are refused from then on.
    let dir = node.dir;
    node.node.shutdown().await;
    match publisher.emit(Event::json("orders", &serde_json::json!({})).unwrap()) {
        Err(PublishError::Unavailable(_)) => {}
        other => panic!("a publish after shutdown must be refused as unavailable, got {other:?}"),
    }
    assert_eq!(seen.lock().unwrap().len(), 1000, "nothing else was handled");
    let again = common::start_node_in(Node::builder(), dir).await;
    again.node.shutdown().await;
}

#[actix_rt::test]
async fn emit_refuses_with_overloaded_when_the_mailbox_is_full_and_handles_every_accepted_event() {
    let seen: Seen = Arc::default();
    let gate = Arc::new(Gate::default());
    let node = billing_node(&seen, &gate, |c| {
        c.handlers.mailbox_capacity = 8;
        c.http.max_batch_events = 8;
    })
    .await;
    let publisher = node.node.publisher();

    // The handler blocks on the gate: the supervisor hands it a pipeline of events, then its
    // mailbox of 8 fills, and `emit` must refuse rather than queue.
    gate.set(true);
    let mut accepted = Vec::new();
    let mut overloaded = 0;
    for i in 0..1000u32 {
        let e = Event::json("orders", &serde_json::json!({ "n": i })).unwrap();
        let id = e.id.to_string();
        match publisher.emit(e) {
            Ok(()) => accepted.push(id),
            Err(PublishError::Overloaded(_)) => {
                overloaded += 1;
                if overloaded == 20 {
                    break;
                }
                // Let the supervisor take what it can from the mailbox before trying again.
                tokio::task::yield_now().await;
            }
            Err(other) => panic!("unexpected refusal: {other}"),
        }
    }
    assert_eq!(
        overloaded,
        20,
        "a full mailbox refuses emits ({} accepted)",
        accepted.len()
    );
    assert!(
        accepted.len() < 1000 && !accepted.is_empty(),
        "some events were accepted before the mailbox filled, not all: {}",
        accepted.len()
    );
    gate.set(false);

    eventually("every accepted event handled", || {
        let n = handled(&seen, "billing").len();
        let want = accepted.len();
        async move { (n >= want).then_some(()) }
    })
    .await;
    assert_eq!(
        handled(&seen, "billing"),
        accepted,
        "every accepted event handled once, in order; no refused one"
    );
    node.node.shutdown().await;
}

#[actix_rt::test]
async fn emitted_events_give_their_bytes_back_to_the_in_flight_budget_once_handled() {
    let seen: Seen = Arc::default();
    let gate = Arc::new(Gate::default());
    // Room for three events in flight (each costs its data plus 256 bytes).
    let node = billing_node(&seen, &gate, |c| {
        c.http.max_body_bytes = 1024;
        c.handlers.max_inflight_bytes = 1024;
    })
    .await;
    let publisher = node.node.publisher();
    let event = |i: u32| Event::json("orders", &serde_json::json!({ "n": i })).unwrap();

    // Held by a closed gate, the fourth event no longer fits: the budget counts what is in flight.
    gate.set(true);
    let mut refused = None;
    for i in 0..10 {
        if let Err(e) = publisher.emit(event(i)) {
            refused = Some((i, e));
            break;
        }
    }
    match refused {
        Some((3, PublishError::Overloaded(_))) => {}
        other => panic!("the fourth event must be refused for the in-flight budget, got {other:?}"),
    }
    gate.set(false);

    // One at a time, each handled before the next: 100 events through a budget of three, so every
    // handled event gave its bytes back (a job that held on to them would stop this at the fourth:
    // each emit is retried until accepted, which then never happens). A share comes back just
    // after its handler returned, so an emit may briefly find the budget full and is retried.
    for i in 0..100 {
        let want = 3 + i as usize + 1;
        eventually(&format!("event {i} after the gate opened accepted"), || {
            let accepted = publisher.emit(event(100 + i)).is_ok();
            async move { accepted.then_some(()) }
        })
        .await;
        eventually("the event handled", || {
            let n = handled(&seen, "billing").len();
            async move { (n >= want).then_some(()) }
        })
        .await;
    }
    node.node.shutdown().await;
}
