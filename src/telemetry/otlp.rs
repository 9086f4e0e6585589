//! The OTLP/HTTP exporter: finished spans encoded straight from the SDK's span data into an
//! OTLP `ExportTraceServiceRequest` (protobuf), POSTed by the exporter thread.
//!
//! `opentelemetry-otlp` first converted each span into `opentelemetry-proto`'s message structs
//! (a `String` or `Vec` allocated for every id, key and value) and then encoded those: some 2 µs
//! a span on the benchmark machine, most of what exporting cost. Here the same wire format is
//! written in one pass from the span data, with no allocation per span. The test at the end
//! decodes the output with `opentelemetry-proto` and compares it with that crate's conversion of
//! the same spans.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// OTLP span flags: the context says whether its parent is remote, and whether it is.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// Exports batches of spans to an OTLP/HTTP endpoint (`…/v1/traces`), protobuf-encoded.
#[derive(Debug)]
pub(super) struct OtlpHttp {
    endpoint: http::Uri,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TRACES_HEADERS`).
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    timeout: Duration,
    /// The `Resource` message of every request, encoded once.
    resource: Vec<u8>,
    schema_url: String,
}

impl OtlpHttp {
    /// An exporter to `endpoint` (the full URL, `…/v1/traces`).
    pub(super) fn new(endpoint: &str, timeout: Duration) -> Result<OtlpHttp, String> {
        let endpoint: http::Uri = endpoint
            .parse()
            .map_err(|e| format!("{endpoint} is not a valid OTLP endpoint: {e}"))?;
        if endpoint.scheme_str() != Some("http") || endpoint.host().is_none() {
            return Err(format!("{endpoint}: only http:// OTLP endpoints are supported"));
        }
        let mut headers = Vec::new();
        // The signal's own variable wins over the general one for a header both set.
        for var in ["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"] {
            if let Ok(v) = std::env::var(var) {
                for (name, value) in parse_headers(&v).map_err(|e| format!("{var}: {e}"))? {
                    if !headers.iter().any(|(n, _)| *n == name) {
                        headers.push((name, value));
                    }
                }
            }
        }
        Ok(OtlpHttp {
            endpoint,
            headers,
            timeout,
            resource: Vec::new(),
            schema_url: String::new(),
        })
    }

    /// The request body for `spans`.
    fn encode(&self, spans: &[SpanData]) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + spans.len() * 256);
        message(&mut out, 1, |out| {
            message(out, 1, |out| out.extend_from_slice(&self.resource));
            // One `ScopeSpans` per instrumentation scope, in the order first seen.
            let mut scopes: Vec<&InstrumentationScope> = Vec::new();
            for s in spans {
                if !scopes.contains(&&s.instrumentation_scope) {
                    scopes.push(&s.instrumentation_scope);
                }
            }
            for scope in scopes {
                message(out, 2, |out| {
                    message(out, 1, |out| encode_scope(out, scope));
                    for s in spans.iter().filter(|s| &s.instrumentation_scope == scope) {
                        message(out, 2, |out| encode_span(out, s));
                    }
                    string(out, 3, scope.schema_url().unwrap_or_default());
                });
            }
            string(out, 3, &self.schema_url);
        });
        out
    }
}

impl SpanExporter for OtlpHttp {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let body = Bytes::from(self.encode(&batch));
        let mut request = http::Request::post(self.endpoint.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()));
        if let Ok(r) = &mut request {
            for (name, value) in &self.headers {
                r.headers_mut().insert(name.clone(), value.clone());
            }
        }
        let result = request.and_then(|r| {
            let answer = super::post(r, self.timeout).map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?;
            if answer.status().is_success() {
                Ok(())
            } else {
                Err(OTelSdkError::InternalFailure(format!(
                    "the OTLP endpoint answered {}",
                    answer.status()
                )))
            }
        });
        std::future::ready(result)
    }

    fn set_resource(&mut self, resource: &Resource) {
        let mut out = Vec::new();
        for (k, v) in resource.iter() {
            message(&mut out, 1, |out| {
                string(out, 1, k.as_str());
                message(out, 2, |out| encode_value(out, v));
            });
        }
        self.resource = out;
        self.schema_url = resource.schema_url().unwrap_or_default().to_string();
    }
}

/// `key1=value1,key2=value2`, values percent-decoded (the OpenTelemetry variables' format).
fn parse_headers(text: &str) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
    let mut headers = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("{:?} is not a header name", name.trim()))?;
        let value = http::HeaderValue::from_bytes(&percent_decode(value.trim()))
            .map_err(|_| format!("the value of {name} is not a header value"))?;
        headers.push((name, value));
    }
    Ok(headers)
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

fn encode_scope(out: &mut Vec<u8>, scope: &InstrumentationScope) {
    string(out, 1, scope.name());
    string(out, 2, scope.version().unwrap_or_default());
    attributes(out, 3, scope.attributes());
}

fn encode_span(out: &mut Vec<u8>, s: &SpanData) {
    let cx = &s.span_context;
    bytes(out, 1, &cx.trace_id().to_bytes());
    bytes(out, 2, &cx.span_id().to_bytes());
    string(out, 3, &cx.trace_state().header());
    if s.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        bytes(out, 4, &s.parent_span_id.to_bytes());
    }
    string(out, 5, &s.name);
    uint(out, 6, span_kind(&s.span_kind));
    fixed64(out, 7, nanos(s.start_time));
    fixed64(out, 8, nanos(s.end_time));
    attributes(out, 9, s.attributes.iter());
    uint(out, 10, u64::from(s.dropped_attributes_count));
    for e in s.events.iter() {
        message(out, 11, |out| {
            fixed64(out, 1, nanos(e.timestamp));
            string(out, 2, &e.name);
            attributes(out, 3, e.attributes.iter());
            uint(out, 4, u64::from(e.dropped_attributes_count));
        });
    }
    uint(out, 12, u64::from(s.events.dropped_count));
    for l in s.links.iter() {
        message(out, 13, |out| {
            let lc = &l.span_context;
            bytes(out, 1, &lc.trace_id().to_bytes());
            bytes(out, 2, &lc.span_id().to_bytes());
            string(out, 3, &lc.trace_state().header());
            attributes(out, 4, l.attributes.iter());
            uint(out, 5, u64::from(l.dropped_attributes_count));
            fixed32(out, 6, flags(lc.is_remote(), lc.trace_flags().to_u8()));
        });
    }
    uint(out, 14, u64::from(s.links.dropped_count));
    message(out, 15, |out| {
        let (code, text) = match &s.status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, &**description),
        };
        string(out, 2, text);
        uint(out, 3, code);
    });
    fixed32(out, 16, flags(s.parent_span_is_remote, cx.trace_flags().to_u8()));
}

fn flags(remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 }
}

fn span_kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn attributes<'a>(out: &mut Vec<u8>, field: u32, kvs: impl IntoIterator<Item = &'a KeyValue>) {
    for kv in kvs {
        message(out, field, |out| {
            string(out, 1, kv.key.as_str());
            message(out, 2, |out| encode_value(out, &kv.value));
        });
    }
}

/// An `AnyValue`: its one field is written even when it holds the default (a `oneof`).
fn encode_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::String(s) => string_value(out, s.as_str()),
        Value::Bool(b) => {
            key(out, 2, VARINT);
            varint(out, u64::from(*b));
        }
        Value::I64(i) => {
            key(out, 3, VARINT);
            varint(out, *i as u64);
        }
        Value::F64(f) => {
            key(out, 4, FIXED64);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Array(a) => message(out, 5, |out| match a {
            Array::Bool(v) => v
                .iter()
                .for_each(|x| message(out, 1, |o| encode_value(o, &Value::Bool(*x)))),
            Array::I64(v) => v
                .iter()
                .for_each(|x| message(out, 1, |o| encode_value(o, &Value::I64(*x)))),
            Array::F64(v) => v
                .iter()
                .for_each(|x| message(out, 1, |o| encode_value(o, &Value::F64(*x)))),
            Array::String(v) => v.iter().for_each(|x| message(out, 1, |o| string_value(o, x.as_str()))),
            // A kind of array added to `opentelemetry` later: an empty array.
            _ => {}
        }),
        // A kind of value added to `opentelemetry` later: its text.
        other => string_value(out, &other.to_string()),
    }
}

/// An `AnyValue`'s `string_value`, written even when empty (a `oneof` member).
fn string_value(out: &mut Vec<u8>, s: &str) {
    key(out, 1, LEN);
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

/// A length-delimited field written by `body`, its length put in front once known.
fn message(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    key(out, field, LEN);
    let start = out.len();
    body(out);
    let mut len = (out.len() - start) as u64;
    let (mut prefix, mut n) = ([0u8; 10], 0);
    while len >= 0x80 {
        prefix[n] = (len as u8) | 0x80;
        len >>= 7;
        n += 1;
    }
    prefix[n] = len as u8;
    out.splice(start..start, prefix[..=n].iter().copied());
}

/// A `string` field, left out when empty (proto3).
fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

/// A `bytes` field, left out when empty (proto3).
fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    if !b.is_empty() {
        key(out, field, LEN);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
}

fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(out, field, VARINT);
        varint(out, v);
    }
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(out, field, FIXED64);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        key(out, field, FIXED32);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Event, Link, SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use prost::Message;

    fn context(t: u8, s: u8, flags: u8, remote: bool, state: &str) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes([t; 16]),
            SpanId::from_bytes([s; 8]),
            TraceFlags::new(flags),
            remote,
            state.parse::<TraceState>().unwrap(),
        )
    }

    fn spans() -> Vec<SpanData> {
        let at = |s: u64| UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000 + s);
        let herald = InstrumentationScope::builder("herald").build();
        let other = InstrumentationScope::builder("app")
            .with_version("1.2")
            .with_schema_url("https://example.com/schema")
            .with_attributes([KeyValue::new("scope.k", "v")])
            .build();
        let mut events = opentelemetry_sdk::trace::SpanEvents::default();
        events.events.push(Event::new(
            "retry",
            at(5),
            vec![KeyValue::new("n", 2_i64), KeyValue::new("", "")],
            1,
        ));
        events.dropped_count = 3;
        let mut links = opentelemetry_sdk::trace::SpanLinks::default();
        links.links.push(Link::new(
            context(9, 8, 1, true, "k=v"),
            vec![KeyValue::new("herald.replay", "wal")],
            0,
        ));
        let base = SpanData {
            span_context: context(1, 2, 1, false, ""),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "publish".into(),
            start_time: at(1),
            end_time: at(2_000),
            attributes: vec![
                KeyValue::new("herald.event_id", "01J…"),
                KeyValue::new("herald.peer", 3_i64),
                KeyValue::new("neg", -7_i64),
                KeyValue::new("ok", true),
                KeyValue::new("no", false),
                KeyValue::new("ratio", 0.25),
                KeyValue::new("zero", 0.0),
                KeyValue::new("empty", ""),
                KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("ints", Value::Array(Array::I64(vec![0, -1, 300]))),
                KeyValue::new("floats", Value::Array(Array::F64(vec![1.5]))),
                KeyValue::new("strings", Value::Array(Array::String(vec!["a".into(), "".into()]))),
            ],
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: herald.clone(),
        };
        let long = "x".repeat(300);
        vec![
            base.clone(),
            SpanData {
                span_context: context(1, 3, 1, false, "a=b,c=d"),
                parent_span_id: SpanId::from_bytes([2; 8]),
                parent_span_is_remote: true,
                span_kind: SpanKind::Producer,
                name: long.clone().into(),
                attributes: vec![KeyValue::new("long", long)],
                dropped_attributes_count: 4,
                status: Status::error("the handler failed"),
                events,
                links,
                instrumentation_scope: other,
                ..base.clone()
            },
            SpanData {
                span_context: context(5, 6, 0, false, ""),
                span_kind: SpanKind::Consumer,
                status: Status::Ok,
                start_time: UNIX_EPOCH,
                end_time: UNIX_EPOCH - Duration::from_secs(1),
                attributes: Vec::new(),
                ..base.clone()
            },
            SpanData {
                span_kind: SpanKind::Client,
                ..base.clone()
            },
            SpanData {
                span_kind: SpanKind::Internal,
                status: Status::error(""),
                ..base
            },
        ]
    }

    /// What we send decodes to exactly what `opentelemetry-proto` makes of the same spans and
    /// resource (the conversion `opentelemetry-otlp` sends).
    #[test]
    fn the_encoding_decodes_to_what_opentelemetry_proto_makes_of_the_same_spans() {
        let resource = Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", "herald"),
                KeyValue::new("herald.node_id", 3_i64),
            ])
            .build();
        let mut exporter = OtlpHttp::new("http://127.0.0.1:4318/v1/traces", Duration::from_secs(1)).unwrap();
        exporter.set_resource(&resource);
        let spans = spans();
        let ours = ExportTraceServiceRequest::decode(&exporter.encode(&spans)[..]).expect("decodes");
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans, &ResourceAttributesWithSchema::from(&resource)),
        };
        assert_eq!(ours, theirs);
        assert_eq!(ours.resource_spans[0].scope_spans.len(), 2, "two scopes, two groups");
    }

    #[test]
    fn headers_come_from_the_opentelemetry_format() {
        let h = parse_headers("api-key=s%3Dcret, x-tenant = blue ,").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].0, "api-key");
        assert_eq!(h[0].1, "s=cret");
        assert_eq!(h[1].0, "x-tenant");
        assert_eq!(h[1].1, "blue");
        assert!(parse_headers("novalue").is_err());
        assert!(parse_headers("bad name=1").is_err());
        assert!(OtlpHttp::new("https://collector:4318/v1/traces", Duration::from_secs(1)).is_err());
    }
}
