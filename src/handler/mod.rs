//! The user-facing handler API and the supervision of handler instances.
//!
//! A handler is a plain actix actor that handles [`Delivery`] and answers a [`HandlerResult`]:
//! `Ok(())` acknowledges the event, `Err(_)` fails it. Sync handlers return the result directly;
//! async handlers return `ResponseFuture<HandlerResult>` (or `ResponseActFuture`/`AtomicResponse`).
//!
//! Each running instance is one actor owned by a supervisor task on a worker thread
//! (`supervisor`). An instance handles one event at a time (so a keyed event stream is handled
//! strictly in order, retries included); a sync handler gets unkeyed events pipelined (several
//! queued in its mailbox before the first answer, which it still handles one by one, in order).
//! The supervisor retries a failed event up to `max_attempts` (each retry of one event waiting
//! longer, exponentially; the next event starts over), and then hands it to the dead-letter sink.
//! An `Err` answer fails only the attempt: the same actor gets the retry. A panic or a timeout
//! also replaces the actor with a fresh one from its factory.
//!
//! This module knows nothing of HTTP, the WAL or Raft: completion and dead-lettering go through
//! the `supervisor::Completion` and `supervisor::DeadLetterSink` traits.

pub mod builtin;
pub(crate) mod supervisor;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;

use crate::event::{Event, TraceContext};
use crate::subscription::egress::EgressPolicy;
use crate::subscription::HandlerSpec;
// Shared vocabulary (placement, metrics and membership name it too); this is its public path.
pub use crate::types::SubscriptionKey;

/// One event delivered to one handler instance. Fields may be added in a minor release
/// (`#[non_exhaustive]`): to test a handler, build one with [`Delivery::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Delivery {
    /// The event.
    pub event: Arc<Event>,
    /// The subscription it is delivered for.
    pub subscription: Arc<SubscriptionKey>,
    /// 1 on the first try, then 2, 3 … up to the subscription's `max_attempts`.
    pub attempt: u32,
    /// The W3C trace context to continue: this attempt's `deliver` span when the event is traced,
    /// else the event's own context (passed on unchanged), if it has one. See [`Delivery::trace`].
    pub trace: Option<TraceContext>,
    /// This attempt's `deliver` span (target `herald::trace`), disabled when the event is not
    /// traced. Enter it, or `instrument` a future with it, to make the handler's own spans its
    /// children.
    pub span: tracing::Span,
}

impl Delivery {
    /// The `attempt`-th delivery of `event` for `subscription`, as the supervisor makes it (for
    /// handler unit tests): no span, and the event's own trace context.
    pub fn new(event: impl Into<Arc<Event>>, subscription: SubscriptionKey, attempt: u32) -> Self {
        let event = event.into();
        Delivery {
            trace: event.trace.clone(),
            event,
            subscription: Arc::new(subscription),
            attempt,
            span: tracing::Span::none(),
        }
    }

    /// The trace context a handler continues: pass `trace.traceparent()` (and `trace.state`) to
    /// the services it calls, as the webhook handler does. `None` when the event carries no trace.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }
}

impl Message for Delivery {
    type Result = HandlerResult;
}

/// What a handler answers: `Ok(())` acknowledges, `Err` fails the attempt.
pub type HandlerResult = Result<(), HandlerError>;

/// A handler failure. Any `std::error::Error` converts into it with `?`.
///
/// Like `anyhow::Error` it does not implement `std::error::Error` itself, which is what lets every
/// error type convert into it.
pub struct HandlerError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl HandlerError {
    /// A failure with a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        HandlerError(message.to_string().into())
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError(Box::new(e))
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// An actor that can serve as a handler instance.
pub trait HandlerActor: Actor<Context = Context<Self>> + Handler<Delivery> {}
impl<A: Actor<Context = Context<A>> + Handler<Delivery>> HandlerActor for A {}

/// Starts handler actors. Called on the worker thread that will run the instance.
pub(crate) trait Spawner: Send + Sync + 'static {
    /// Starts a fresh actor and returns a way to call it.
    fn start(&self) -> Box<dyn Invoke>;

    /// Whether the actor answers every delivery inside `handle`, in mailbox order, one at a time
    /// (a sync handler): then the supervisor may hand it several before the first answer
    /// (`supervisor::PIPELINE`). An async handler's answer is a future actix runs alongside the
    /// next messages, so pipelining would run several events of one instance at once.
    fn pipelined(&self) -> bool {
        false
    }
}

/// Starts `A` with a mailbox that holds a full pipeline (see `supervisor::ACTOR_MAILBOX`).
pub(crate) fn start_actor<A: HandlerActor>(actor: A) -> Addr<A> {
    A::create(move |ctx| {
        ctx.set_mailbox_capacity(supervisor::ACTOR_MAILBOX);
        actor
    })
}

/// Calls a running handler actor.
pub(crate) trait Invoke {
    /// Sends one delivery; `Err` means the actor is gone (it panicked or stopped).
    fn call(&self, d: Delivery) -> LocalBoxFuture<'static, Result<HandlerResult, MailboxError>>;
}

impl<A: HandlerActor> Invoke for Addr<A> {
    fn call(&self, d: Delivery) -> LocalBoxFuture<'static, Result<HandlerResult, MailboxError>> {
        Box::pin(self.send(d))
    }
}

/// A factory closure registered with `NodeBuilder::handler`.
struct FnSpawner<F>(F);

impl<A, F> Spawner for FnSpawner<F>
where
    A: HandlerActor,
    F: Fn() -> A + Send + Sync + 'static,
{
    fn start(&self) -> Box<dyn Invoke> {
        Box::new(start_actor((self.0)()))
    }

    fn pipelined(&self) -> bool {
        // A handler whose `Result` is `HandlerResult` itself answers inside `handle`; any other
        // (`ResponseFuture`, `ResponseActFuture`, `AtomicResponse`) answers later. `type_name`
        // needs no `'static` bound on the user's type; a mismatch only turns pipelining off.
        std::any::type_name::<<A as Handler<Delivery>>::Result>() == std::any::type_name::<HandlerResult>()
    }
}

/// The Rust handlers compiled into this node binary, by name.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    factories: BTreeMap<String, Arc<dyn Spawner>>,
}

impl fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.factories.keys()).finish()
    }
}

impl HandlerRegistry {
    /// Registers `factory` under `name`; a later registration of the same name replaces it.
    pub fn register<A, F>(&mut self, name: impl Into<String>, factory: F)
    where
        A: HandlerActor,
        F: Fn() -> A + Send + Sync + 'static,
    {
        self.factories.insert(name.into(), Arc::new(FnSpawner(factory)));
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }

    /// The registered names, comma separated (for error messages).
    pub fn names(&self) -> String {
        if self.factories.is_empty() {
            "(none)".to_string()
        } else {
            self.factories.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }

    /// The handler kinds this node can run, as shown in `/v1/cluster`.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.factories.keys().map(|n| format!("rust:{n}")).collect();
        kinds.push("webhook".to_string());
        kinds.push("log".to_string());
        kinds
    }

    /// The spawner for a validated handler spec.
    pub(crate) fn spawner(
        &self,
        spec: &HandlerSpec,
        webhook_timeout: std::time::Duration,
        webhook_policy: &Arc<EgressPolicy>,
    ) -> Option<Arc<dyn Spawner>> {
        match spec {
            HandlerSpec::Rust { name } => self.factories.get(name).cloned(),
            HandlerSpec::Webhook { url } => Some(Arc::new(builtin::WebhookSpawner {
                url: url.clone(),
                timeout: webhook_timeout,
                policy: webhook_policy.clone(),
            })),
            HandlerSpec::Log => Some(Arc::new(builtin::LogSpawner)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sync;
    impl Actor for Sync {
        type Context = Context<Self>;
    }
    impl Handler<Delivery> for Sync {
        type Result = HandlerResult;
        fn handle(&mut self, _: Delivery, _: &mut Context<Self>) -> HandlerResult {
            Ok(())
        }
    }

    struct Async;
    impl Actor for Async {
        type Context = Context<Self>;
    }
    impl Handler<Delivery> for Async {
        type Result = ResponseFuture<HandlerResult>;
        fn handle(&mut self, _: Delivery, _: &mut Context<Self>) -> Self::Result {
            Box::pin(async { Ok(()) })
        }
    }

    #[test]
    fn only_sync_handlers_are_pipelined() {
        assert!(FnSpawner(|| Sync).pipelined());
        assert!(!FnSpawner(|| Async).pipelined());
        assert!(builtin::LogSpawner.pipelined());
        let webhook = builtin::WebhookSpawner {
            url: "http://127.0.0.1:9/".into(),
            timeout: std::time::Duration::from_secs(1),
            policy: Arc::default(),
        };
        assert!(!webhook.pipelined());
    }
}
