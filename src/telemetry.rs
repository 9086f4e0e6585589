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
//! trace with the probability `telemetry.sample_ratio` ([`Sampler`]); the ids are then the
//! OpenTelemetry SDK's.
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
//! **Cost bounds.** The exporter thread spends at most a share of one core ([`EXPORT_CPU_ENV`],
//! a tenth by default: it rests after each batch in proportion to the CPU time the batch took).
//! While the queue is full the event path makes no span ([`admit`], checked by [`traced`] and
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

/// The installed exporter's queue, as the event path sees it (set once, by [`install`]).
static SHEDDING: OnceLock<Shedding> = OnceLock::new();

/// Whether the exporter's queue is full, and the counter of the spans it drops.
struct Shedding {
    shared: Arc<Shared>,
    dropped: metrics::Counter,
}

/// Whether a span may be made now. While the installed exporter's queue is full, no: the span
/// would be dropped when it ends, after it cost its whole making (some microseconds: the
/// `tracing` registry, the OpenTelemetry bridge and the SDK span), so it is not made, and it is
/// counted as dropped (`herald_trace_spans_dropped_total`) right away. The event's context passes
/// on unchanged, so the spans made after it name the last span made before it as their parent:
/// the trace has a hop fewer, not a broken link. Without an installed exporter (an embedded node),
/// always yes.
#[inline]
pub fn admit() -> bool {
    admit_with(SHEDDING.get())
}

fn admit_with(shedding: Option<&Shedding>) -> bool {
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
    let cx = opentelemetry::Context::new().with_remote_span_context(span_context(parent));
    let _ = span.set_parent(cx);
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
    let cx = span.context();
    let sc = cx.span().span_context().clone();
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

// ---- export ---------------------------------------------------------------------------------

/// The installed exporter; [`Telemetry::shutdown`] (or drop) flushes what is queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports what is queued and stops the exporter thread (waits at most a few seconds).
    pub fn shutdown(self) {
        drop(self);
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
/// handle that flushes it at exit. Called once, by the process layer.
pub fn install<S>(
    config: &TelemetryConfig,
    node_id: u64,
    cluster: &str,
) -> Result<(impl tracing_subscriber::Layer<S> + Send + Sync + 'static, Telemetry), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync + 'static,
{
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let base = config
        .otlp_endpoint
        .as_deref()
        .ok_or("telemetry.otlp_endpoint is not set")?;
    let endpoint = format!("{}/v1/traces", base.trim_end_matches('/'));
    let timeout = Duration::from_millis(env_ms("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000));
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(PlainHttp { timeout })
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
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
    let _ = SHEDDING.set(Shedding {
        shared: processor.shared.clone(),
        dropped: processor.dropped.clone(),
    });
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
        .with_level(false);
    Ok((layer, Telemetry { provider }))
}

/// A non-negative integer environment variable (an `OTEL_*` setting), or `default`.
fn env_ms(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The environment variable that sets the exporter thread's share of one core (from 0 to 1;
/// a tenth by default): see the module's cost bounds.
pub const EXPORT_CPU_ENV: &str = "HERALD_OTLP_EXPORT_CPU";

/// How much of one core the exporter thread may spend converting, encoding and sending spans.
///
/// After exporting, the thread rests in proportion to the CPU time the export took (its own
/// thread's clock, not the wall clock: waiting for the collector costs nothing), so that it uses
/// at most `share` of a core; spans that arrive meanwhile wait in the bounded queue, and a full
/// queue drops them (counted). Without this, sampling every event of a busy node kept the thread
/// encoding flat out: a quarter of a 2-core machine taken from the event path. A flush or
/// shutdown does not wait.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pace {
    share: f64,
}

impl Pace {
    /// A tenth of a core: some 50,000 spans a second at the ~2 µs a span costs to export on the
    /// benchmark machine, several times what 1 % sampling of a saturated node makes there.
    const DEFAULT_SHARE: f64 = 0.1;

    /// `share` of a core, more than 0 and at most 1 (1: no rest).
    fn new(share: f64) -> Result<Pace, String> {
        if share.is_finite() && share > 0.0 && share <= 1.0 {
            Ok(Pace { share })
        } else {
            Err(format!(
                "{EXPORT_CPU_ENV} must be a share of one core, more than 0 and at most 1 (like 0.1), not {share}"
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
                    "{EXPORT_CPU_ENV}={v:?} is not a number (a share of one core, like 0.1)"
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
    shared: Arc<Shared>,
    capacity: usize,
    max_batch: usize,
    dropped: metrics::Counter,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl fmt::Debug for Batcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("capacity", &self.capacity)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
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
            shared,
            capacity: queue.max(1),
            max_batch,
            dropped: metrics::counter!(crate::metrics::TRACE_SPANS_DROPPED),
            thread: Mutex::new(thread),
        }
    }

    /// Asks the thread for a flush (`shutdown`: and to stop) and waits for the answer, at most
    /// `timeout` (these come from shutdown, not from the event path).
    fn ask(&self, shutdown: bool, timeout: Duration) {
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut q = self.shared.lock();
            if q.closing.is_some() {
                return;
            }
            if shutdown {
                q.closing = Some(Some(tx));
            } else {
                q.flushes.push(tx);
            }
        }
        self.shared.wake.notify_one();
        let _ = rx.recv_timeout(timeout);
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        // The thread exports what is queued and ends.
        self.shared.lock().closing.get_or_insert(None);
        self.shared.wake.notify_one();
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
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
        rest_until = Instant::now() + pace.rest_after(thread_cpu_time().saturating_sub(cpu));
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

/// A blocking HTTP/1.1 client for the exporter thread: one `Connection: close` POST per batch,
/// `http://` only. The answer's status is read; its body (at most 64 KiB) is kept.
#[derive(Debug)]
struct PlainHttp {
    timeout: Duration,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for PlainHttp {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        post(request, self.timeout)
    }
}

fn post(
    request: http::Request<Bytes>,
    timeout: Duration,
) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
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
        let shedding = Shedding {
            shared: batcher.shared.clone(),
            dropped: batcher.dropped.clone(),
        };
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
        while !batcher.shared.lock().spans.is_empty() {
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
            batcher.shared.lock().spans.len(),
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
