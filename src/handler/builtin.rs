//! The built-in handler kinds: `webhook` and `log`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_tls::connect::{Resolve, Resolver};
use futures_util::future::LocalBoxFuture;

use super::{Delivery, HandlerError, HandlerResult, Invoke, Spawner};
use crate::subscription::egress::EgressPolicy;

/// POSTs each event as a structured CloudEvent (`application/cloudevents+json`); any 2xx status
/// acknowledges it, anything else (or a timeout) fails the attempt.
///
/// Every call is checked against the node's webhook egress policy
/// ([`EgressPolicy`], `handlers.webhook_allow`/`webhook_deny`): the URL's host first, then every
/// address its name resolves to (the client resolves through `PolicyResolver`, so it connects
/// only to addresses that were checked). A refused destination fails the attempt with an error
/// naming the rule; it is retried and dead-lettered like any other failure.
pub struct Webhook {
    url: String,
    policy: Arc<EgressPolicy>,
    /// `awc::Client` is not `Send`: each instance builds its own on its worker thread.
    client: awc::Client,
}

impl Webhook {
    /// A webhook handler posting to `url` with a per-request `timeout`, under the built-in
    /// egress rules.
    pub fn new(url: impl Into<String>, timeout: Duration) -> Self {
        Webhook::with_policy(url, timeout, Arc::default())
    }

    /// A webhook handler posting to `url` with a per-request `timeout`, under `policy`.
    pub fn with_policy(url: impl Into<String>, timeout: Duration, policy: Arc<EgressPolicy>) -> Self {
        // HTTP/1.1 only: h2 0.3 (the only h2 awc uses) is under RUSTSEC-2026-0258 (see deny.toml).
        let connector = awc::Connector::new()
            .max_http_version(awc::http::Version::HTTP_11)
            .connector(actix_tls::connect::Connector::new(Resolver::custom(PolicyResolver(policy.clone()))).service());
        Webhook {
            url: url.into(),
            policy,
            client: awc::Client::builder().timeout(timeout).connector(connector).finish(),
        }
    }
}

/// Resolves host names with the system resolver and refuses the lookup when an address is
/// refused by the egress policy (DNS may change after the subscription was created).
struct PolicyResolver(Arc<EgressPolicy>);

impl Resolve for PolicyResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> LocalBoxFuture<'a, Result<Vec<SocketAddr>, Box<dyn std::error::Error>>> {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
            for a in &addrs {
                self.0
                    .check_resolved(host, a.ip())
                    .map_err(|e| format!("refused by the webhook egress policy: {e}"))?;
            }
            Ok(addrs)
        })
    }
}

impl Actor for Webhook {
    type Context = Context<Self>;
}

impl Handler<Delivery> for Webhook {
    type Result = ResponseFuture<HandlerResult>;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> Self::Result {
        let mut request = self
            .client
            .post(&self.url)
            .insert_header(("content-type", "application/cloudevents+json"))
            .insert_header(("x-herald-subscription", d.subscription.to_string()))
            .insert_header(("x-herald-attempt", d.attempt.to_string()));
        // The `webhook` span (a child of this attempt's deliver span) is the receiver's parent;
        // an event that is not traced passes its own context on, if any.
        let span = if d.span.is_disabled() || !crate::telemetry::admit() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                target: "herald::trace",
                parent: &d.span,
                "webhook",
                otel.kind = "client",
                http.request.method = "POST",
                url.full = %self.url,
                http.response.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        };
        if let Some(trace) = crate::telemetry::context_or(&span, d.trace.as_ref()) {
            request = request.insert_header(("traceparent", trace.traceparent()));
            if let Some(state) = &trace.state {
                request = request.insert_header(("tracestate", state.clone()));
            }
        }
        let url = self.url.clone();
        // A literal IP (never resolved) and the host name itself; resolved addresses are checked
        // by the resolver.
        let allowed = self.policy.check_url(&url);
        Box::pin(async move {
            allowed.map_err(|e| HandlerError::msg(format!("POST {url}: refused by the webhook egress policy: {e}")))?;
            let body = serde_json::to_vec(&d.event.to_cloudevent()?)?;
            let sent = request.send_body(body).await;
            match &sent {
                Ok(r) => {
                    span.record("http.response.status_code", r.status().as_u16());
                    if !r.status().is_success() {
                        span.record("otel.status_code", "ERROR");
                    }
                }
                Err(_) => {
                    span.record("otel.status_code", "ERROR");
                }
            }
            drop(span);
            let response = sent.map_err(|e| HandlerError::msg(format!("POST {url}: {e}")))?;
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
    pub(crate) policy: Arc<EgressPolicy>,
}

impl Spawner for WebhookSpawner {
    fn start(&self) -> Box<dyn Invoke> {
        Box::new(Webhook::with_policy(self.url.clone(), self.timeout, self.policy.clone()).start())
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
