//! The built-in handler kinds: `webhook` and `log`.

use std::time::Duration;

use actix::prelude::*;

use super::{Delivery, HandlerError, HandlerResult, Invoke, Spawner};

/// POSTs each event as a structured CloudEvent (`application/cloudevents+json`); any 2xx status
/// acknowledges it, anything else (or a timeout) fails the attempt.
pub struct Webhook {
    url: String,
    /// `awc::Client` is not `Send`: each instance builds its own on its worker thread.
    client: awc::Client,
}

impl Webhook {
    /// A webhook handler posting to `url` with a per-request `timeout`.
    pub fn new(url: impl Into<String>, timeout: Duration) -> Self {
        Webhook {
            url: url.into(),
            client: awc::Client::builder().timeout(timeout).finish(),
        }
    }
}

impl Actor for Webhook {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Webhook {
    type Result = ResponseFuture<HandlerResult>;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> Self::Result {
        let request = self
            .client
            .post(&self.url)
            .insert_header(("content-type", "application/cloudevents+json"))
            .insert_header(("x-herald-subscription", d.subscription.to_string()))
            .insert_header(("x-herald-attempt", d.attempt.to_string()));
        let url = self.url.clone();
        Box::pin(async move {
            let body = serde_json::to_vec(&d.event.to_cloudevent()?)?;
            let response = request
                .send_body(body)
                .await
                .map_err(|e| HandlerError::msg(format!("POST {url}: {e}")))?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(HandlerError::msg(format!("POST {url}: status {}", response.status())))
            }
        })
    }
}

pub(crate) struct WebhookSpawner {
    pub(crate) url: String,
    pub(crate) timeout: Duration,
}

impl Spawner for WebhookSpawner {
    fn start(&self) -> Box<dyn Invoke> {
        Box::new(Webhook::new(self.url.clone(), self.timeout).start())
    }
}

/// Writes each event to the node's log at `info` level and acknowledges it.
#[derive(Default)]
pub struct Log;

impl Actor for Log {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Log {
    type Result = HandlerResult;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        let e = &d.event;
        tracing::info!(
            subscription = %d.subscription,
            id = %e.id,
            key = e.key.as_deref().unwrap_or(""),
            content_type = %e.content_type,
            data = %String::from_utf8_lossy(&e.data),
            "event"
        );
        Ok(())
    }
}

pub(crate) struct LogSpawner;

impl Spawner for LogSpawner {
    fn start(&self) -> Box<dyn Invoke> {
        Box::new(super::start_actor(Log))
    }

    fn pipelined(&self) -> bool {
        true
    }
}
