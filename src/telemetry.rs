//! Traces: the spans of an event's path and their export over OTLP/HTTP.
//!
//! **Spans.** The event path makes `tracing` spans of the [`TARGET`] target (`herald::trace`),
//! bridged to OpenTelemetry by `tracing-opentelemetry`: `publish` (ingress), `forward` (each hop
//! to a peer), `deliver` (each handler attempt), `webhook` (the POST), `replay` (WAL and
//! dead-letter replays, linked to the event's original trace). Their parents come from the
//! event's [`TraceContext`] (set with [`continue_trace`]), not from whatever span is current, so
//! one event is one trace across nodes. A span is made only for an event whose context is
//! *sampled* and only if the subscriber wants the target ([`enabled`]); otherwise the event path
//! pays one flag test and passes the context on unchanged. A publish without a context starts a
//! trace with the probability `telemetry.sample_ratio` ([`Sampler`]). In a process whose own
//! exporter is active ([`Telemetry::activate`]), `publish` and `forward` are made directly as
//! OpenTelemetry span data instead ([`EventSpan`], [`DirectSpan`]: the same names, attributes
//! and links, without the bridge's cost); the others stay `tracing` spans.
//!
//! **Export.** [`install`] builds the OTLP/HTTP (protobuf) exporter and returns the
//! `tracing-opentelemetry` layer to add to the process's subscriber. It is process-wide state:
//! only the process layer (`cli`) calls it; an embedded node installs nothing, and its spans go
//! to the embedding application's subscriber. Finished spans go through a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048) to one exporter thread that sends batches
//! (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512) at least every `OTEL_BSP_SCHEDULE_DELAY` ms (1000);
//! a full queue drops the span and counts it in `herald_trace_spans_dropped_total`, so export
//! never blocks the event path. The thread is woken by a whole batch, not by each span. The HTTP client is a small blocking HTTP/1.1 POST on that
//! thread (`http://` only: no TLS stack is linked for it).
//!
//! **Cost bounds.** What traces cost the node — the exporter thread's CPU time and the event
//! path's making of spans, measured on a sample (`metered`) — stays within a share of one core
//! ([`EXPORT_CPU_ENV`], 0.04 by default): the thread rests after each batch in proportion to the
//! CPU time the batch took plus the span making charged since the last one. While the queue is full the event path makes no span ([`admit`], checked by [`traced`] and
//! before a publish span): a span costs microseconds to make, and one made then would be dropped
//! when it ends. Sampling every event of a saturated node therefore costs a bounded share of it,
//! and the spans it cannot afford are counted, not made.

use std::fmt;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::TelemetryConfig;
use crate::event::TraceContext;

mod otlp;

/// The target of every span Herald makes for an event (and only of those): a subscriber filters
/// them in or out by it; the `herald node` log filters them out.
pub const TARGET: &str = "herald::trace";

/// Whether the subscriber records Herald's trace spans at all. Checked before a span is made,
/// so that without an exporter the event path makes none (a cached callsite check).
#[inline]
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// Whether an event with this context gets spans: sampled, wanted by the subscriber, and the
/// exporter has room for them ([`admit`]).
#[inline]
pub fn traced(trace: Option<&TraceContext>) -> bool {
    trace.is_some_and(TraceContext::sampled) && enabled() && admit()
}

/// The installed exporter's queue, as the event path sees it (set once, by [`Telemetry::activate`]).
static SHEDDING: OnceLock<Arc<Intake>> = OnceLock::new();

/// Whether a span may be made now. While the installed exporter's queue is full, no: the span
/// would be dropped when it ends, after it cost its whole making (some microseconds: the
/// `tracing` registry, the OpenTelemetry bridge and the SDK span), so it is not made, and it is
/// counted as dropped (`herald_trace_spans_dropped_total`) right away. The event's context passes
/// on unchanged, so the spans made after it name the last span made before it as their parent:
/// the trace has a hop fewer, not a broken link. Without an installed exporter (an embedded node),
/// always yes.
#[inline]
pub fn admit() -> bool {
    admit_with(SHEDDING.get().map(|i| &**i))
}

fn admit_with(shedding: Option<&Intake>) -> bool {
    match shedding {
        Some(s) if s.shared.full.load(Ordering::Relaxed) => {
            s.dropped.increment(1);
            false
        }
        _ => true,
    }
}

/// Decides which publishes without a context start a trace (`telemetry.sample_ratio`).
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    ratio: f64,
    /// A draw of [`crate::types::random_u64`] below this starts a trace: `ratio` of 2^64.
    below: u64,
}

impl Sampler {
    /// Starts a trace for a share `ratio` (0 to 1) of the publishes without a context.
    pub fn new(ratio: f64) -> Self {
        let ratio = ratio.clamp(0.0, 1.0);
        Sampler {
            ratio,
            // `as` saturates: 1.0 gives u64::MAX (not used: a ratio of 1 draws nothing).
            below: (ratio * 2f64.powi(64)) as u64,
        }
    }

    /// Whether this publish starts a trace: never when no subscriber wants the spans. The draw
    /// comes first: asking the subscriber costs more (its filters are evaluated on each call).
    /// The draw is the per-thread xorshift generator's, not `rand`'s thread RNG (a ChaCha block
    /// cipher): it runs for every publish without a context, and a sample needs spread, not
    /// unpredictability.
    pub fn start(&self) -> bool {
        self.ratio > 0.0 && (self.ratio >= 1.0 || crate::types::random_u64() < self.below) && enabled()
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::new(TelemetryConfig::default().sample_ratio)
    }
}

/// The OpenTelemetry form of a W3C context (a remote parent).
fn span_context(t: &TraceContext) -> SpanContext {
    let state = t
        .state
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    SpanContext::new(
        TraceId::from_bytes(t.trace_id),
        SpanId::from_bytes(t.span_id),
        TraceFlags::new(t.flags),
        true,
        state,
    )
}

/// Makes `span` a child of the remote context `parent` (before the span is first used).
pub fn continue_trace(span: &tracing::Span, parent: &TraceContext) {
    metered(Call::Parent, || {
        let cx = opentelemetry::Context::new().with_remote_span_context(span_context(parent));
        let _ = span.set_parent(cx);
    })
}

/// Links `span` to `other` (a replay to the event's original trace).
pub fn link(span: &tracing::Span, other: &TraceContext) {
    span.add_link(span_context(other));
}

/// The W3C context naming `span` as parent, if it is recorded by OpenTelemetry.
pub fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    if span.is_disabled() {
        return None;
    }
    let sc = metered(Call::Context, || span.context().span().span_context().clone());
    if !sc.is_valid() {
        return None;
    }
    let state = sc.trace_state().header();
    let mut t = TraceContext::new(
        sc.trace_id().to_bytes(),
        sc.span_id().to_bytes(),
        sc.trace_flags().to_u8(),
    )?;
    t.state = (!state.is_empty()).then_some(state);
    Some(t)
}

/// `span`'s context, or `fallback` when it has none (not recorded: the context passes on).
pub fn context_or(span: &tracing::Span, fallback: Option<&TraceContext>) -> Option<TraceContext> {
    context_of(span).or_else(|| fallback.cloned())
}

// ---- direct spans ---------------------------------------------------------------------------

/// A span Herald makes straight as OpenTelemetry span data, without a `tracing` span: the
/// `publish` and `forward` spans, when this process's exporter is installed and active ([`Telemetry::activate`]).
///
/// Through the `tracing` → OpenTelemetry bridge a span cost the event path some microseconds
/// (more on a node where spans are rare and its caches are cold): the registry's slot, the
/// bridge's span builder and its lock, the SDK's span and its data. These two spans are never
/// entered and have no children of their own on the node that makes them (their context travels
/// in the event), so nothing needs them to be `tracing` spans: they are made here with the same
/// names, kinds, attributes and parent links, and queued to the same exporter when they end
/// (drop). An embedded node, which installs no exporter, makes `tracing` spans instead
/// ([`EventSpan`]), for its application's subscriber.
pub struct DirectSpan {
    intake: &'static Intake,
    context: SpanContext,
    /// The context's `tracestate` as given (passed on in the event's context).
    state: Option<String>,
    parent: SpanId,
    name: &'static str,
    kind: opentelemetry::trace::SpanKind,
    start: std::time::SystemTime,
    attributes: Vec<KeyValue>,
    status: opentelemetry::trace::Status,
}

impl DirectSpan {
    /// Starts a span named `name`, a child of `parent` (a remote parent) or the root of a new
    /// sampled trace; `None` when no exporter of this process takes direct spans.
    fn start(
        name: &'static str,
        kind: opentelemetry::trace::SpanKind,
        parent: Option<&TraceContext>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<DirectSpan> {
        let intake: &'static Intake = SHEDDING.get()?;
        Some(DirectSpan::start_on(intake, name, kind, parent, attributes))
    }

    /// [`DirectSpan::start`], queued to `intake` when it ends.
    fn start_on(
        intake: &'static Intake,
        name: &'static str,
        kind: opentelemetry::trace::SpanKind,
        parent: Option<&TraceContext>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> DirectSpan {
        metered(Call::New, || {
            let span_id = nonzero_id();
            let (trace_id, flags, state, parent_id) = match parent {
                Some(p) => (p.trace_id, p.flags, p.state.clone(), SpanId::from_bytes(p.span_id)),
                None => {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&nonzero_id());
                    id[8..].copy_from_slice(&crate::types::random_u64().to_be_bytes());
                    (id, TraceFlags::SAMPLED.to_u8(), None, SpanId::INVALID)
                }
            };
            let trace_state = state
                .as_deref()
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default();
            DirectSpan {
                intake,
                context: SpanContext::new(
                    TraceId::from_bytes(trace_id),
                    SpanId::from_bytes(span_id),
                    TraceFlags::new(flags),
                    false,
                    trace_state,
                ),
                state,
                parent: parent_id,
                name,
                kind,
                start: std::time::SystemTime::now(),
                attributes: attributes(),
                status: opentelemetry::trace::Status::Unset,
            }
        })
    }

    /// The W3C context naming this span as parent.
    fn trace_context(&self) -> TraceContext {
        TraceContext {
            trace_id: self.context.trace_id().to_bytes(),
            span_id: self.context.span_id().to_bytes(),
            flags: self.context.trace_flags().to_u8(),
            state: self.state.clone(),
        }
    }
}

impl Drop for DirectSpan {
    fn drop(&mut self) {
        metered(Call::Close, || {
            self.intake.offer(SpanData {
                span_context: self.context.clone(),
                parent_span_id: self.parent,
                parent_span_is_remote: self.parent != SpanId::INVALID,
                span_kind: self.kind.clone(),
                name: std::borrow::Cow::Borrowed(self.name),
                start_time: self.start,
                end_time: std::time::SystemTime::now(),
                attributes: std::mem::take(&mut self.attributes),
                dropped_attributes_count: 0,
                events: Default::default(),
                links: Default::default(),
                status: std::mem::replace(&mut self.status, opentelemetry::trace::Status::Unset),
                instrumentation_scope: self.intake.scope.clone(),
            });
        });
    }
}

/// A random span id (never all zeros).
fn nonzero_id() -> [u8; 8] {
    (crate::types::random_u64() | 1).to_be_bytes()
}

/// A span of an event's path: made directly ([`DirectSpan`]) where this process exports its
/// own spans, else a `tracing` span (an embedded node: the application's subscriber gets it).
pub enum EventSpan {
    /// Made and queued by Herald.
    Direct(DirectSpan),
    /// A `tracing` span of the [`TARGET`] target.
    Bridged(tracing::Span),
}

impl EventSpan {
    /// Starts the span: direct when this process exports them, else `bridged()` (a `tracing`
    /// span) made a child of `parent`.
    pub fn start(
        name: &'static str,
        kind: opentelemetry::trace::SpanKind,
        parent: Option<&TraceContext>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
        bridged: impl FnOnce() -> tracing::Span,
    ) -> EventSpan {
        match DirectSpan::start(name, kind, parent, attributes) {
            Some(d) => EventSpan::Direct(d),
            None => {
                let span = bridged();
                if let Some(parent) = parent {
                    continue_trace(&span, parent);
                }
                EventSpan::Bridged(span)
            }
        }
    }

    /// The W3C context naming this span as parent, or `fallback` when it has none.
    pub fn context_or(&self, fallback: Option<&TraceContext>) -> Option<TraceContext> {
        match self {
            EventSpan::Direct(d) => Some(d.trace_context()),
            EventSpan::Bridged(span) => context_or(span, fallback),
        }
    }

    /// Marks the span failed with `error` (`herald.error`, status error).
    pub fn fail(&mut self, error: &dyn fmt::Display) {
        match self {
            EventSpan::Direct(d) => {
                d.attributes.push(KeyValue::new("herald.error", error.to_string()));
                d.status = opentelemetry::trace::Status::error("");
            }
            EventSpan::Bridged(span) => {
                span.record("herald.error", tracing::field::display(error));
                span.record("otel.status_code", "ERROR");
            }
        }
    }
}

// ---- what making spans costs ----------------------------------------------------------------

/// The calls that make a span, each measured on a sample of its own.
#[derive(Clone, Copy)]
enum Call {
    /// The OpenTelemetry layer sees a new span (`tracing-opentelemetry`'s span builder).
    New,
    /// [`continue_trace`]: the span's remote parent is set.
    Parent,
    /// [`context_of`]: the span's context is read (and the SDK span started).
    Context,
    /// The OpenTelemetry layer sees the span close (the SDK's span data, the batcher's queue).
    Close,
}

/// One call of each kind in this many is measured (the monotonic clock read before and after,
/// some tens of nanoseconds each), and counts for this many. The thread's CPU clock, a system
/// call, measured its own cold cost more than the span's: at 1 % sampling it charged 2.5 µs for
/// a direct span the monotonic clock times at 0.7 µs.
const MEASURE_EVERY: u32 = 8;

thread_local! {
    /// Calls of each [`Call`] kind on this thread, to measure one in [`MEASURE_EVERY`].
    static CALLS: std::cell::Cell<[u32; 4]> = const { std::cell::Cell::new([0; 4]) };
}

/// The time (ns) the event path's threads spent making spans, estimated from the measured
/// sample, not yet charged to the exporter thread's [`Pace`]: the thread rests for it too, so
/// that what traces cost a node, making spans and exporting them, stays within its share.
static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs `f` (a part of making a span) and, while an exporter is installed, measures one call of
/// each `kind` in [`MEASURE_EVERY`] on the monotonic clock, adding what it took (the clock's own
/// cost taken off, at most [`LONGEST_SECTION`]; times [`MEASURE_EVERY`]) to [`MADE`].
#[inline]
fn metered<R>(kind: Call, f: impl FnOnce() -> R) -> R {
    if SHEDDING.get().is_none() {
        return f();
    }
    let measure = CALLS.with(|c| {
        let mut n = c.get();
        let i = kind as usize;
        n[i] = n[i].wrapping_add(1);
        c.set(n);
        n[i] % MEASURE_EVERY == 0
    });
    if !measure {
        return f();
    }
    let before = Instant::now();
    let r = f();
    MADE.fetch_add(charge(before.elapsed(), clock_cost()), Ordering::Relaxed);
    r
}

/// What one measured call is charged (ns): what it took less the clock's own cost, at most
/// [`LONGEST_SECTION`], for the [`MEASURE_EVERY`] calls it stands for.
fn charge(took: Duration, clock: Duration) -> u64 {
    let took = took.saturating_sub(clock).min(LONGEST_SECTION);
    // At most 20 µs: the cast cannot truncate.
    took.as_nanos() as u64 * u64::from(MEASURE_EVERY)
}

/// What reading the clock twice costs (the least of a few tries, measured once): taken off
/// each measurement, which would otherwise count the clock's own reads.
fn clock_cost() -> Duration {
    static COST: OnceLock<Duration> = OnceLock::new();
    *COST.get_or_init(|| (0..64).map(|_| Instant::now().elapsed()).min().unwrap_or_default())
}

/// A measured part of making a span counts for at most this long: one that took longer had its
/// thread switched out in the middle (the parts take microseconds), and the time it waited was
/// not spent on the span.
const LONGEST_SECTION: Duration = Duration::from_micros(20);

/// The making of spans charged to `made` since the last call ([`MADE`], as measured by
/// [`metered`]).
fn take_made(made: &std::sync::atomic::AtomicU64) -> Duration {
    Duration::from_nanos(made.swap(0, Ordering::Relaxed))
}

/// The OpenTelemetry layer, with its span callbacks measured ([`metered`]): what it costs to
/// turn a `tracing` span into an OpenTelemetry one and to end it is most of what a span costs
/// the event path.
struct Metered<L>(L);

impl<S, L> tracing_subscriber::Layer<S> for Metered<L>
where
    S: tracing::Subscriber,
    L: tracing_subscriber::Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }

    fn register_callsite(&self, metadata: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        self.0.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) -> bool {
        self.0.enabled(metadata, ctx)
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        metered(Call::New, || self.0.on_new_span(attrs, id, ctx));
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.0.max_level_hint()
    }

    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_record(span, values, ctx);
    }

    fn on_follows_from(
        &self,
        span: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_follows_from(span, follows, ctx);
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) -> bool {
        self.0.event_enabled(event, ctx)
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_event(event, ctx);
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_exit(id, ctx);
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        metered(Call::Close, || self.0.on_close(id, ctx));
    }

    fn on_id_change(
        &self,
        old: &tracing::span::Id,
        new: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_id_change(old, new, ctx);
    }

    // `OpenTelemetrySpanExt` finds the OpenTelemetry layer by downcasting the subscriber: the
    // wrapper answers for itself and passes every other type on to the layer it wraps.
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            Some(self as *const Self as *const ())
        } else {
            // SAFETY: the caller's contract is passed on unchanged to the wrapped layer.
            unsafe { self.0.downcast_raw(id) }
        }
    }
}

// ---- export ---------------------------------------------------------------------------------

/// The installed exporter; [`Telemetry::shutdown`] (or drop) flushes what is queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
    intake: Arc<Intake>,
}

impl Telemetry {
    /// Exports what is queued and stops the exporter thread (waits at most a few seconds).
    pub fn shutdown(self) {
        drop(self);
    }

    /// Makes this exporter the process's, as the event path sees it: its full queue stops the
    /// making of spans ([`admit`]), the making is measured and charged to it, and the publish and
    /// forward spans are made directly for it ([`EventSpan`]). Called once its layer is in the
    /// process's subscriber (not when another subscriber was there first); only the first call
    /// in a process counts.
    pub fn activate(&self) {
        let _ = SHEDDING.set(self.intake.clone());
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown_with_timeout(Duration::from_secs(5));
    }
}

/// Builds the OTLP/HTTP exporter for `config` (`otlp_endpoint` must be set) with the resource
/// attributes `service.name`, `herald.node_id` (also `service.instance.id`) and `herald.cluster`,
/// and returns the layer to add to the subscriber (filtered to [`TARGET`] by the caller) with the
/// handle that flushes it at exit; once the layer is in the process's subscriber, the caller
/// makes it the event path's with [`Telemetry::activate`]. Called once, by the process layer.
pub fn install<S>(
    config: &TelemetryConfig,
    node_id: u64,
    cluster: &str,
) -> Result<(impl tracing_subscriber::Layer<S> + Send + Sync + 'static, Telemetry), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync + 'static,
{
    let base = config
        .otlp_endpoint
        .as_deref()
        .ok_or("telemetry.otlp_endpoint is not set")?;
    let endpoint = format!("{}/v1/traces", base.trim_end_matches('/'));
    let timeout = Duration::from_millis(env_ms("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000));
    let mut exporter = otlp::OtlpHttp::new(&endpoint, timeout)?;
    let resource = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", config.service_name.clone()),
            KeyValue::new("service.instance.id", node_id.to_string()),
            KeyValue::new("herald.node_id", node_id as i64),
            KeyValue::new("herald.cluster", cluster.to_string()),
        ])
        .build();
    exporter.set_resource(&resource);
    let processor = Batcher::start(
        exporter,
        env_ms("OTEL_BSP_MAX_QUEUE_SIZE", 2048) as usize,
        env_ms("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512).max(1) as usize,
        Duration::from_millis(env_ms("OTEL_BSP_SCHEDULE_DELAY", 1000).max(1)),
        Pace::from_env()?,
    );
    let intake = processor.intake.clone();
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        // Herald decides which traces start (`Sampler`) and follows the sampled flag of the
        // contexts it is given: every span it makes is recorded.
        .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::AlwaysOn,
        )))
        .with_span_processor(processor)
        .build();
    let tracer = provider.tracer("herald");
    metrics::counter!(crate::metrics::TRACE_SPANS_DROPPED).absolute(0);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_level(false);
    Ok((Metered(layer), Telemetry { provider, intake }))
}

/// A non-negative integer environment variable (an `OTEL_*` setting), or `default`.
fn env_ms(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The environment variable that sets the share of one core traces may cost a node, making
/// spans and exporting them (from 0 to 1; 0.04 by default): see the module's cost bounds.
pub const EXPORT_CPU_ENV: &str = "HERALD_OTLP_EXPORT_CPU";

/// How much of one core traces may cost the node: the exporter thread encoding and sending spans,
/// and the event path making them.
///
/// After exporting, the thread rests in proportion to the CPU time the export took (its own
/// thread's clock, not the wall clock: waiting for the collector costs nothing) plus the span
/// making charged to `made` since the last export, so that traces use at most `share` of a core;
/// spans that arrive meanwhile wait in the bounded queue, and a full queue drops them (counted)
/// and stops the making of more ([`admit`]). Without this, sampling every event of a busy node
/// kept the thread encoding flat out and the event path making spans for it: a third of a 2-core
/// machine taken from the event path. A flush or shutdown does not wait.
#[derive(Clone, Copy, Debug)]
struct Pace {
    share: f64,
    /// Where the event path's making of spans is charged ([`MADE`]; a test's own counter).
    made: &'static std::sync::atomic::AtomicU64,
}

impl Pace {
    /// 4 % of a core: some 30,000 spans a second at the ~1.3 µs a direct span costs to make and
    /// export on the benchmark machine, half again what 1 % sampling of a node saturated by a
    /// million events a second makes there (20,000: its publish and forward spans).
    const DEFAULT_SHARE: f64 = 0.04;

    /// `share` of a core, more than 0 and at most 1 (1: no rest).
    fn new(share: f64) -> Result<Pace, String> {
        if share.is_finite() && share > 0.0 && share <= 1.0 {
            Ok(Pace { share, made: &MADE })
        } else {
            Err(format!(
                "{EXPORT_CPU_ENV} must be a share of one core, more than 0 and at most 1 (like 0.04), not {share}"
            ))
        }
    }

    /// From [`EXPORT_CPU_ENV`], or [`Pace::DEFAULT_SHARE`].
    fn from_env() -> Result<Pace, String> {
        match std::env::var(EXPORT_CPU_ENV) {
            Err(_) => Pace::new(Pace::DEFAULT_SHARE),
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(share) => Pace::new(share),
                Err(_) => Err(format!(
                    "{EXPORT_CPU_ENV}={v:?} is not a number (a share of one core, like 0.04)"
                )),
            },
        }
    }

    /// How long to rest after an export that took `cpu` of the thread's time.
    fn rest_after(&self, cpu: Duration) -> Duration {
        cpu.mul_f64((1.0 - self.share) / self.share)
    }
}

/// The CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to write; the clock id is a constant.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
    if ok {
        Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32)
    } else {
        Duration::ZERO
    }
}

/// The spans waiting for the exporter thread, and what was asked of it.
#[derive(Default)]
struct Queue {
    spans: Vec<SpanData>,
    /// Flushes asked for: each is answered once what was queued before it is exported.
    flushes: Vec<SyncSender<()>>,
    /// Shutdown asked for (answered once everything queued is exported), or the batcher dropped.
    closing: Option<Option<SyncSender<()>>>,
}

/// The queue and the exporter thread's wake-up, shared by the batcher and its thread.
#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Set when a span found the queue full, cleared when the thread takes spans out of it: read
    /// by the event path ([`admit`]) without the lock.
    full: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The span processor: a bounded queue (drops counted, never waits) to one exporter thread.
///
/// A span is queued under a short lock, and the thread is woken only when a whole batch is
/// waiting (or a flush or shutdown is asked): otherwise it sleeps until the schedule delay. A
/// wake-up per span (a channel) cost a futex wake and a context switch per span, which on a busy
/// node was most of what traces cost at a low sampling ratio.
struct Batcher {
    intake: Arc<Intake>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl fmt::Debug for Batcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("capacity", &self.intake.capacity)
            .field("max_batch", &self.intake.max_batch)
            .finish_non_exhaustive()
    }
}

/// Where finished spans enter the exporter's queue: the SDK's (through [`Batcher`]'s `on_end`)
/// and Herald's direct ones ([`DirectSpan`]).
struct Intake {
    shared: Arc<Shared>,
    capacity: usize,
    max_batch: usize,
    dropped: metrics::Counter,
    /// The scope of Herald's spans (`herald`, as the tracer the bridge uses).
    scope: opentelemetry::InstrumentationScope,
}

impl Intake {
    /// Queues a finished span, or drops it (counted) when the queue is full; never waits. Wakes
    /// the exporter thread when a whole batch is waiting.
    fn offer(&self, span: SpanData) {
        let queued = {
            let mut q = self.shared.lock();
            if q.spans.len() >= self.capacity || q.closing.is_some() {
                None
            } else {
                q.spans.push(span);
                Some(q.spans.len())
            }
        };
        match queued {
            Some(n) if n == self.max_batch => self.shared.wake.notify_one(),
            Some(_) => {}
            None => {
                self.dropped.increment(1);
                self.shared.full.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl Batcher {
    fn start<E: SpanExporter + 'static>(
        exporter: E,
        queue: usize,
        batch: usize,
        delay: Duration,
        pace: Pace,
    ) -> Batcher {
        let shared = Arc::new(Shared::default());
        let max_batch = batch.max(1);
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("herald-otlp".into())
                .spawn(move || export_loop(exporter, &shared, max_batch, delay, pace))
                .ok()
        };
        Batcher {
            intake: Arc::new(Intake {
                shared,
                capacity: queue.max(1),
                max_batch,
                dropped: metrics::counter!(crate::metrics::TRACE_SPANS_DROPPED),
                scope: opentelemetry::InstrumentationScope::builder("herald").build(),
            }),
            thread: Mutex::new(thread),
        }
    }

    /// Asks the thread for a flush (`shutdown`: and to stop) and waits for the answer, at most
    /// `timeout` (these come from shutdown, not from the event path).
    fn ask(&self, shutdown: bool, timeout: Duration) {
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut q = self.intake.shared.lock();
            if q.closing.is_some() {
                return;
            }
            if shutdown {
                q.closing = Some(Some(tx));
            } else {
                q.flushes.push(tx);
            }
        }
        self.intake.shared.wake.notify_one();
        let _ = rx.recv_timeout(timeout);
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        // The thread exports what is queued and ends.
        self.intake.shared.lock().closing.get_or_insert(None);
        self.intake.shared.wake.notify_one();
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() {
            self.intake.offer(span);
        }
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.ask(false, Duration::from_secs(5));
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.ask(true, timeout);
        if let Some(t) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        Ok(())
    }
}

/// The exporter thread: sleeps until a batch is waiting, a flush or shutdown is asked, or the
/// schedule delay passed; then takes a batch (everything, for a flush or shutdown) and exports it,
/// and rests as its [`Pace`] says before the next (a flush or shutdown cuts the rest short).
fn export_loop<E: SpanExporter>(exporter: E, shared: &Shared, max_batch: usize, delay: Duration, pace: Pace) {
    let mut due = Instant::now() + delay;
    let mut rest_until = Instant::now();
    let mut last_warning: Option<Instant> = None;
    loop {
        let (spans, flushes, closing) = {
            let mut q = shared.lock();
            loop {
                if !q.flushes.is_empty() || q.closing.is_some() {
                    break;
                }
                let now = Instant::now();
                let until = if now < rest_until {
                    rest_until
                } else if q.spans.len() >= max_batch || now >= due {
                    break;
                } else {
                    due
                };
                q = shared
                    .wake
                    .wait_timeout(q, until - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            let closing = q.closing.as_mut().map(Option::take);
            // One batch at a time (the queue's bound holds: at most a batch is out of it), all of
            // it for a flush or shutdown.
            let spans = if q.flushes.is_empty() && closing.is_none() && q.spans.len() > max_batch {
                q.spans.drain(..max_batch).collect()
            } else {
                std::mem::take(&mut q.spans)
            };
            shared.full.store(false, Ordering::Relaxed);
            (spans, std::mem::take(&mut q.flushes), closing)
        };
        if Instant::now() >= due {
            due = Instant::now() + delay;
        }
        let cpu = thread_cpu_time();
        let mut spans = spans.into_iter().peekable();
        while spans.peek().is_some() {
            let batch: Vec<SpanData> = spans.by_ref().take(max_batch).collect();
            let n = batch.len();
            if let Err(e) = futures_executor::block_on(exporter.export(batch)) {
                if last_warning.is_none_or(|t| t.elapsed() >= crate::metrics::LogLimit::EVERY) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(spans = n, error = %e, "cannot export trace spans to the OTLP endpoint (dropped)");
                }
            }
        }
        // The rest pays for this export and for the making of the spans since the last one.
        let spent = thread_cpu_time().saturating_sub(cpu) + take_made(pace.made);
        rest_until = Instant::now() + pace.rest_after(spent);
        for done in flushes {
            let _ = done.send(());
        }
        if let Some(done) = closing {
            if let Some(done) = done {
                let _ = done.send(());
            }
            return;
        }
    }
}

/// The exporter thread's HTTP/1.1 client: one blocking `Connection: close` POST per batch,
/// `http://` only. The answer's status is read; its body (at most 64 KiB) is kept.
fn post(
    request: http::Request<Bytes>,
    timeout: Duration,
) -> Result<http::Response<Bytes>, Box<dyn std::error::Error + Send + Sync>> {
    let uri = request.uri();
    if uri.scheme_str() != Some("http") {
        return Err(format!("{uri}: only http:// OTLP endpoints are supported").into());
    }
    let host = uri.host().ok_or("the OTLP endpoint has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        request.body().len()
    );
    for (name, value) in request.headers() {
        if let Ok(v) = value.to_str() {
            if !matches!(name.as_str(), "host" | "connection" | "content-length") {
                head.push_str(&format!("{name}: {v}\r\n"));
            }
        }
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(request.body())?;
    let mut answer = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut answer)?;
    let status_line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
    let status = std::str::from_utf8(status_line)
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("the OTLP endpoint's answer is not HTTP")?;
    let body = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(Bytes::new(), |at| Bytes::copy_from_slice(&answer[at + 4..]));
    Ok(http::Response::builder().status(status).body(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exporter that holds its first batch until told, then takes the rest at once.
    #[derive(Debug)]
    struct Stuck {
        release: Mutex<mpsc::Receiver<()>>,
        exported: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl SpanExporter for Stuck {
        fn export(
            &self,
            batch: Vec<SpanData>,
        ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
            let _ = self.release.lock().unwrap().recv_timeout(Duration::from_secs(20));
            self.exported
                .fetch_add(batch.len(), std::sync::atomic::Ordering::SeqCst);
            std::future::ready(Ok(()))
        }
    }

    fn span(n: u8, sampled: bool) -> SpanData {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes([n.max(1); 16]),
                SpanId::from_bytes([n.max(1); 8]),
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: opentelemetry::trace::SpanKind::Internal,
            name: "deliver".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: opentelemetry::trace::Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    /// A stuck exporter never makes the event path wait: spans beyond the queue are dropped at
    /// once and counted in `herald_trace_spans_dropped_total`; unsampled ones are not queued.
    #[test]
    fn a_full_export_queue_drops_spans_without_waiting_and_counts_them() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let (release, stuck) = mpsc::channel();
        let exported = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let exporter = Stuck {
            release: Mutex::new(stuck),
            exported: exported.clone(),
        };
        // Queue of 4, batches of 1: the thread takes one span and is stuck exporting it.
        let batcher = metrics::with_local_recorder(&recorder, || {
            Batcher::start(exporter, 4, 1, Duration::from_secs(60), Pace::new(1.0).unwrap())
        });
        batcher.on_end(span(1, true));
        let dropped = || {
            crate::metrics::parse_exposition(&handle.render())
                .get(crate::metrics::TRACE_SPANS_DROPPED)
                .and_then(|series| series.first().map(|(_, v)| *v))
                .unwrap_or(0.0)
        };
        // The queue holds 4: 3 more with the first span still in it, 4 once the stuck thread took
        // it. Of 100 more offered, every one that found no room is counted, and none waited.
        let started = Instant::now();
        for n in 2..=101 {
            batcher.on_end(span(n, true));
            batcher.on_end(span(n, false));
        }
        assert!(started.elapsed() < Duration::from_secs(10), "on_end never waits");
        let d = dropped();
        assert!(
            (96.0..=97.0).contains(&d),
            "100 offered behind a stuck exporter, 96 or 97 dropped: {d}"
        );
        // Released, it exports what was queued, and nothing more is dropped.
        for _ in 0..10 {
            let _ = release.send(());
        }
        batcher.force_flush().unwrap();
        assert_eq!(exported.load(std::sync::atomic::Ordering::SeqCst) as f64, 101.0 - d);
        assert_eq!(dropped(), d);
    }

    /// Once a span found the export queue full, no span is made until the exporter thread takes
    /// spans out of the queue: [`admit`] says no and counts the span as dropped at once (making
    /// it would cost its microseconds for nothing). Then spans are made again.
    #[test]
    fn while_the_export_queue_is_full_no_span_is_made_and_each_is_counted_as_dropped() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let (release, stuck) = mpsc::channel();
        let exporter = Stuck {
            release: Mutex::new(stuck),
            exported: Default::default(),
        };
        // Queue of 2, batches of 1: the thread takes the first span and is stuck exporting it.
        let batcher = metrics::with_local_recorder(&recorder, || {
            Batcher::start(exporter, 2, 1, Duration::from_secs(60), Pace::new(1.0).unwrap())
        });
        let shedding = batcher.intake.clone();
        let dropped = || {
            crate::metrics::parse_exposition(&handle.render())
                .get(crate::metrics::TRACE_SPANS_DROPPED)
                .and_then(|series| series.first().map(|(_, v)| *v))
                .unwrap_or(0.0)
        };
        assert!(admit_with(Some(&shedding)), "an empty queue admits spans");
        assert!(admit_with(None), "no installed exporter: always admitted");
        batcher.on_end(span(1, true));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !batcher.intake.shared.lock().spans.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the exporter thread never took the first span"
            );
            std::thread::yield_now();
        }
        // Two more fill the queue, the fourth finds it full.
        for n in 2..=4 {
            batcher.on_end(span(n, true));
        }
        assert_eq!(dropped(), 1.0);
        for _ in 0..3 {
            assert!(!admit_with(Some(&shedding)), "a full queue admits no span");
        }
        assert_eq!(dropped(), 4.0, "each span not made is counted as dropped");
        // Released, the thread takes the queued spans: spans are made again.
        for _ in 0..3 {
            let _ = release.send(());
        }
        batcher.force_flush().unwrap();
        assert!(
            admit_with(Some(&shedding)),
            "the thread took the queue's spans: spans are admitted again"
        );
        assert_eq!(dropped(), 4.0);
    }

    /// Sends each exported batch's size.
    #[derive(Debug)]
    struct Sizes(Mutex<mpsc::Sender<usize>>);

    impl SpanExporter for Sizes {
        fn export(
            &self,
            batch: Vec<SpanData>,
        ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
            let _ = self.0.lock().unwrap().send(batch.len());
            std::future::ready(Ok(()))
        }
    }

    /// The exporter thread is woken by a whole batch, not by each span: fewer spans wait in the
    /// queue (until the schedule delay, here a minute, or a flush), a whole batch goes at once.
    #[test]
    fn spans_wait_in_the_queue_until_a_whole_batch_is_there() {
        let (tx, sizes) = mpsc::channel();
        let batcher = Batcher::start(
            Sizes(Mutex::new(tx)),
            100,
            10,
            Duration::from_secs(60),
            Pace::new(1.0).unwrap(),
        );
        for n in 1..=9 {
            batcher.on_end(span(n, true));
        }
        // The thread takes spans only for a whole batch, a flush, a shutdown or the delay.
        assert_eq!(
            batcher.intake.shared.lock().spans.len(),
            9,
            "the thread took spans before a batch was whole"
        );
        batcher.on_end(span(10, true));
        assert_eq!(
            sizes.recv_timeout(Duration::from_secs(20)),
            Ok(10),
            "a whole batch is exported at once"
        );
        for n in 11..=13 {
            batcher.on_end(span(n, true));
        }
        batcher.force_flush().unwrap();
        assert_eq!(
            sizes.try_recv(),
            Ok(3),
            "a flush exports what is queued before it answers"
        );
        batcher.shutdown_with_timeout(Duration::from_secs(5)).unwrap();
        batcher.on_end(span(14, true));
        assert!(sizes.try_recv().is_err(), "nothing is exported after shutdown");
    }

    /// An exporter that spends `burn` of its thread's CPU on each batch and reports when each
    /// export started and ended, and the CPU time it took.
    #[derive(Debug)]
    struct Burner {
        burn: Duration,
        exports: Mutex<mpsc::Sender<(Instant, Instant, Duration)>>,
    }

    impl SpanExporter for Burner {
        fn export(
            &self,
            _: Vec<SpanData>,
        ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
            let (started, cpu) = (Instant::now(), thread_cpu_time());
            while thread_cpu_time().saturating_sub(cpu) < self.burn {
                std::hint::spin_loop();
            }
            let took = thread_cpu_time().saturating_sub(cpu);
            let _ = self.exports.lock().unwrap().send((started, Instant::now(), took));
            std::future::ready(Ok(()))
        }
    }

    /// With a fifth of a core, the exporter thread rests four times the CPU time of each export
    /// before the next one, though whole batches are waiting: it takes no more than its share
    /// from the event path. A flush does not wait for the rest.
    #[test]
    fn the_exporter_rests_in_proportion_to_the_cpu_its_exports_take() {
        let (tx, exports) = mpsc::channel();
        let pace = Pace::new(0.2).unwrap();
        let exporter = Burner {
            burn: Duration::from_millis(2),
            exports: Mutex::new(tx),
        };
        let batcher = Batcher::start(exporter, 1000, 10, Duration::from_secs(60), pace);
        // Eight whole batches wait from the start.
        for n in 1..=80 {
            batcher.on_end(span(n, true));
        }
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(exports.recv_timeout(Duration::from_secs(20)).expect("an export"));
        }
        for pair in seen.windows(2) {
            let ((_, ended, took), (next, _, _)) = (pair[0], pair[1]);
            let rest = next.duration_since(ended);
            assert!(
                rest >= pace.rest_after(took),
                "an export of {took:?} CPU was followed by a rest of {rest:?}, less than {:?}",
                pace.rest_after(took)
            );
        }
        // The three batches left go at once for a flush.
        batcher.force_flush().unwrap();
        assert_eq!(
            exports.try_iter().count(),
            3,
            "a flush exports everything queued before it answers"
        );
    }

    /// The rest after an export pays for the making of spans on the event path too (what
    /// [`metered`] charged since the last export), not only for the export's own CPU time: what
    /// traces cost a node in all stays within its share.
    #[test]
    fn the_making_of_spans_is_charged_to_the_exporters_rest() {
        static MADE_HERE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let (tx, exports) = mpsc::channel();
        let pace = Pace {
            share: 0.5,
            made: &MADE_HERE,
        };
        let exporter = Burner {
            burn: Duration::from_millis(1),
            exports: Mutex::new(tx),
        };
        // 40 ms of span making charged before the first export: with half a core, the rest
        // after it is at least as long as that export's CPU time plus those 40 ms.
        let charged = Duration::from_millis(40);
        MADE_HERE.store(charged.as_nanos() as u64, Ordering::Relaxed);
        let batcher = Batcher::start(exporter, 100, 10, Duration::from_secs(60), pace);
        for n in 1..=20 {
            batcher.on_end(span(n, true));
        }
        let (_, ended, took) = exports.recv_timeout(Duration::from_secs(20)).expect("an export");
        let (next, _, _) = exports.recv_timeout(Duration::from_secs(20)).expect("a second export");
        let rest = next.duration_since(ended);
        assert!(
            rest >= pace.rest_after(took + charged),
            "an export of {took:?} CPU after {charged:?} of span making was followed by a rest of {rest:?}"
        );
        assert_eq!(MADE_HERE.load(Ordering::Relaxed), 0, "the charge is taken once");
    }

    /// A measured call stands for the calls not measured; the clock's own cost is not charged,
    /// nor the time a thread switched out in the middle of a call waited.
    #[test]
    fn a_measured_call_is_charged_for_the_calls_it_stands_for() {
        let us = Duration::from_micros;
        let every = u64::from(MEASURE_EVERY);
        assert_eq!(charge(us(2), Duration::ZERO), 2_000 * every);
        assert_eq!(charge(us(2), Duration::from_nanos(40)), 1_960 * every);
        assert_eq!(charge(Duration::from_nanos(30), Duration::from_nanos(40)), 0);
        assert_eq!(
            charge(Duration::from_millis(4), Duration::ZERO),
            LONGEST_SECTION.as_nanos() as u64 * every,
            "a call its thread was switched out in counts as the longest a call takes"
        );
    }

    /// A direct span is queued when it ends, with its name, kind, attributes and ids; a child of
    /// a given context keeps its trace, flags and state and names it as its remote parent, and
    /// its own context names it; a failed span says so; a span without a parent starts a
    /// sampled trace of its own.
    #[test]
    fn a_direct_span_is_queued_when_it_ends_with_its_parent_and_what_it_recorded() {
        use opentelemetry::trace::{SpanKind, Status};
        // A queue with no exporter thread: what a span queues stays there to be read.
        let shared = Arc::new(Shared::default());
        let intake: &'static Intake = Box::leak(Box::new(Intake {
            shared: shared.clone(),
            capacity: 100,
            max_batch: 100,
            dropped: metrics::Counter::noop(),
            scope: opentelemetry::InstrumentationScope::builder("herald").build(),
        }));
        let parent =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some("a=b")).unwrap();
        let mut child = EventSpan::Direct(DirectSpan::start_on(
            intake,
            "publish",
            SpanKind::Server,
            Some(&parent),
            || vec![KeyValue::new("herald.topic", "orders")],
        ));
        let cx = child.context_or(None).expect("a direct span has a context");
        assert_eq!(
            (cx.trace_id, cx.flags, cx.state.as_deref()),
            (parent.trace_id, 1, Some("a=b"))
        );
        assert_ne!(cx.span_id, parent.span_id, "the span's own id");
        child.fail(&"no route");
        let root = DirectSpan::start_on(intake, "forward", SpanKind::Producer, None, Vec::new);
        let root_cx = root.trace_context();
        assert!(root_cx.sampled() && root_cx.trace_id != parent.trace_id);
        assert!(shared.lock().spans.is_empty(), "queued when they end, not before");
        drop(child);
        drop(root);
        let spans = std::mem::take(&mut shared.lock().spans);
        assert_eq!(spans.len(), 2);
        let (c, r) = (&spans[0], &spans[1]);
        assert_eq!((&*c.name, c.span_kind.clone()), ("publish", SpanKind::Server));
        assert_eq!(c.span_context.span_id().to_bytes(), cx.span_id);
        assert_eq!(c.span_context.trace_id().to_bytes(), parent.trace_id);
        assert_eq!(c.parent_span_id.to_bytes(), parent.span_id);
        assert!(c.parent_span_is_remote && c.span_context.is_sampled());
        assert_eq!(c.span_context.trace_state().header(), "a=b");
        assert_eq!(c.status, Status::error(""));
        let attrs: Vec<(String, String)> = c
            .attributes
            .iter()
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect();
        assert_eq!(
            attrs,
            [
                ("herald.topic".into(), "orders".into()),
                ("herald.error".into(), "no route".into())
            ]
        );
        assert!(c.end_time >= c.start_time);
        assert_eq!(
            (&*r.name, r.parent_span_id, r.parent_span_is_remote),
            ("forward", SpanId::INVALID, false)
        );
        assert_eq!(r.span_context.span_id().to_bytes(), root_cx.span_id);
        assert_eq!(c.instrumentation_scope.name(), "herald");
    }

    #[test]
    fn a_pace_is_a_share_of_one_core() {
        let tenth = Pace::new(0.1).unwrap();
        let rest = tenth.rest_after(Duration::from_millis(1));
        assert!(
            (rest.as_secs_f64() - 0.009).abs() < 1e-9,
            "a tenth of a core: 9 ms of rest after 1 ms of work, not {rest:?}"
        );
        assert_eq!(
            Pace::new(1.0).unwrap().rest_after(Duration::from_millis(5)),
            Duration::ZERO
        );
        for bad in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            let err = Pace::new(bad).expect_err("out of range");
            assert!(err.contains(EXPORT_CPU_ENV), "the error names the setting: {err}");
        }
    }

    #[test]
    fn a_sampler_without_a_subscriber_starts_nothing() {
        // No subscriber wants the target in a unit test: never a trace, whatever the ratio.
        assert!(!Sampler::new(1.0).start());
        assert!(!Sampler::new(0.0).start());
        assert!(!traced(
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None).as_ref()
        ));
    }

    #[test]
    fn a_sampler_starts_its_ratio_of_traces_when_the_spans_are_wanted() {
        // A bare registry wants every span, so `enabled()` holds and only the draw decides.
        tracing::subscriber::with_default(tracing_subscriber::registry(), || {
            let started = |ratio: f64| (0..100_000).filter(|_| Sampler::new(ratio).start()).count();
            assert_eq!(started(1.0), 100_000);
            assert_eq!(started(0.0), 0);
            for (ratio, lo, hi) in [(0.01, 800, 1_200), (0.25, 24_000, 26_000), (0.9, 89_000, 91_000)] {
                let n = started(ratio);
                assert!((lo..=hi).contains(&n), "ratio {ratio}: {n} of 100000 started");
            }
        });
    }

    #[test]
    fn the_otel_form_keeps_ids_flags_and_state() {
        let t = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some("a=b")).unwrap();
        let sc = span_context(&t);
        assert_eq!(sc.trace_id().to_bytes(), t.trace_id);
        assert_eq!(sc.span_id().to_bytes(), t.span_id);
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "a=b");
    }
}
