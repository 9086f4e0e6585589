//! The publish routes: plain JSON, CloudEvents structured, binary and batch modes.

use std::time::Duration;

use actix_web::http::header::{AsHeaderName, HeaderMap, HeaderName};
use actix_web::{web, HttpRequest, HttpResponse};
use cloudevents::{EventBuilder, EventBuilderV10};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{authorize, media_type, read_body, ApiError, Caller, State};
use crate::config::Role;
use crate::event::{self, ByteString, Event, TraceContext};
use crate::ingress::{AckMode, Answer, Published};

const CE_JSON: &str = "application/cloudevents+json";
const CE_BATCH: &str = "application/cloudevents-batch+json";
/// Longest `ack=processed` wait a request may ask for.
const MAX_TIMEOUT_MS: u64 = 300_000;

/// Query of the publish routes.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishQuery {
    /// `none`, `accepted` (default) or `processed`.
    ack: Option<AckMode>,
    /// With `ack=processed`: how long to wait before answering 504 (default 30000, max 300000).
    #[param(minimum = 1, maximum = 300000)]
    timeout_ms: Option<u64>,
    /// `true`: refuse (404 `no_subscription`) an event whose topic has no subscription, instead
    /// of accepting it for no one. Default: `http.require_subscription` (false).
    require_subscription: Option<bool>,
}

impl PublishQuery {
    /// 404 `no_subscription` when the publisher (or the node's `http.require_subscription`) asks
    /// for a subscription and some event's topic has none.
    fn check_subscribed(&self, events: &[Event], state: &State) -> Result<(), ApiError> {
        if !self
            .require_subscription
            .unwrap_or(state.core.config().http.require_subscription)
        {
            return Ok(());
        }
        match state.core.ingress().unsubscribed_topic(events) {
            None => Ok(()),
            Some(topic) => Err(ApiError::new(
                actix_web::http::StatusCode::NOT_FOUND,
                "no_subscription",
                format!(
                    "topic {topic:?} has no subscription, so its events would be delivered nowhere; nothing was \
                     accepted (subscribe first, check the topic's spelling, or publish without require_subscription)"
                ),
            )),
        }
    }

    fn timeout(&self) -> Result<Duration, ApiError> {
        match self.timeout_ms {
            Some(0) => Err(ApiError::bad_request("invalid_query", "timeout_ms must be at least 1")),
            Some(t) if t > MAX_TIMEOUT_MS => Err(ApiError::bad_request(
                "invalid_query",
                format!("timeout_ms must be at most {MAX_TIMEOUT_MS}"),
            )),
            t => Ok(Duration::from_millis(t.unwrap_or(30_000))),
        }
    }
}

/// The answer to a batch publish.
#[derive(Serialize, ToSchema)]
pub struct BatchAnswer {
    /// The topic.
    pub topic: String,
    /// The ids of the accepted events, in order.
    pub ids: Vec<String>,
    /// How many subscriptions receive each event.
    pub subscriptions: usize,
    /// Per event outcomes (`ack=processed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<Published>>,
}

/// A structured CloudEvent as the OpenAPI document describes it (parsing uses the `cloudevents`
/// crate; this type only documents the shape).
#[derive(Serialize, ToSchema)]
#[schema(as = CloudEvent)]
#[allow(dead_code)]
pub(crate) struct CloudEventDoc {
    /// `1.0`.
    #[schema(pattern = "^1\\.0$")]
    specversion: String,
    /// Event id.
    id: String,
    /// URI-reference of the producer.
    source: String,
    /// Event type.
    #[serde(rename = "type")]
    ty: String,
    /// RFC 3339 timestamp.
    time: Option<String>,
    /// Subject.
    subject: Option<String>,
    /// Media type of `data`.
    datacontenttype: Option<String>,
    /// The data (JSON).
    data: Option<serde_json::Value>,
    /// The data (base64).
    data_base64: Option<String>,
}

/// Header names looked up on every publish, built once (a `&str` lookup allocates a name).
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const HERALD_KEY: HeaderName = HeaderName::from_static("x-herald-key");
const CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");

fn header(headers: &HeaderMap, name: impl AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn invalid_ce(message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_cloudevent", message.to_string())
}

/// A header that must be visible ASCII when present (`Idempotency-Key`, `X-Herald-Key`): any
/// other byte answers 400 rather than the header being ignored.
fn ascii_header(headers: &HeaderMap, name: HeaderName) -> Result<Option<&str>, ApiError> {
    match headers.get(&name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            ApiError::bad_request(
                "invalid_header",
                format!("the {name} header must be visible ASCII (bytes 0x20 to 0x7e)"),
            )
        }),
    }
}

/// The `Idempotency-Key` header, if present: visible ASCII (else 400 `invalid_header`) of 1 to
/// [`event::MAX_ID_LEN`] bytes (else 400 `invalid_idempotency_key`: an empty key would make every
/// publish a duplicate of the last, and an over-long one could not be stored as an id).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let key = ascii_header(headers, IDEMPOTENCY_KEY)?;
    match key {
        Some(k) if k.is_empty() || k.len() > event::MAX_ID_LEN => Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!(
                "the Idempotency-Key header must be 1 to {} bytes (got {})",
                event::MAX_ID_LEN,
                k.len()
            ),
        )),
        key => Ok(key),
    }
}

/// The W3C `traceparent`/`tracestate` headers, if the `traceparent` is valid (an invalid one is
/// ignored: the publish starts a new trace, and the publisher gets no error).
fn trace_headers(headers: &HeaderMap) -> Option<TraceContext> {
    let parent = header(headers, "traceparent")?;
    TraceContext::parse(parent, header(headers, "tracestate"))
}

/// Applies `Idempotency-Key` and `X-Herald-Key` (they win over body attributes), and a valid
/// `traceparent` header (it wins over the CloudEvents distributed-tracing extension: the publish
/// span continues the caller's trace).
fn apply_headers(mut e: Event, headers: &HeaderMap) -> Result<Event, ApiError> {
    if let Some(id) = idempotency_key(headers)? {
        e.id = id.into();
    }
    if let Some(key) = ascii_header(headers, HERALD_KEY)? {
        e.key = Some(key.into());
    }
    if let Some(trace) = trace_headers(headers) {
        e.trace = Some(trace);
    }
    Ok(e)
}

/// Refuses a JSON body that is not UTF-8 or nests deeper than [`event::MAX_JSON_DEPTH`] (see
/// [`event::check_json`]) with 400 and `code`.
fn check_json(body: &[u8], code: &'static str) -> Result<(), ApiError> {
    event::check_json(body).map_err(|e| ApiError::bad_request(code, e.to_string()))
}

/// Parses a single-event body in any of the accepted modes.
fn parse_one(topic: &str, req: &HttpRequest, body: web::Bytes) -> Result<Event, ApiError> {
    let headers = req.headers();
    let media = media_type(req);
    if headers.contains_key(CE_SPECVERSION) {
        return binary_cloudevent(topic, headers, media, body);
    }
    let event = match media.as_deref() {
        Some(CE_JSON) => {
            check_json(&body, "invalid_cloudevent")?;
            let ce: cloudevents::Event = serde_json::from_slice(&body).map_err(invalid_ce)?;
            Event::from_cloudevent(topic, ce).map_err(invalid_ce)?
        }
        Some(CE_BATCH) => {
            return Err(ApiError::unsupported_media_type(format!(
                "{CE_BATCH} is for POST /v1/topics/{{topic}}/events/batch"
            )))
        }
        None => json_event(topic, body)?,
        Some(m) if event::is_json(m) => json_event(topic, body)?,
        Some(m) => {
            return Err(ApiError::unsupported_media_type(format!(
                "content type {m} is not accepted: send JSON (application/json), a structured CloudEvent ({CE_JSON}), or a binary-mode CloudEvent with ce-* headers"
            )))
        }
    };
    apply_headers(event, headers)
}

fn json_event(topic: &str, body: web::Bytes) -> Result<Event, ApiError> {
    check_json(&body, "invalid_json")?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}")))?;
    Ok(Event::new(topic, body, event::JSON))
}

/// Binary mode: attributes in `ce-*` headers, the body is the data.
fn binary_cloudevent(
    topic: &str,
    headers: &HeaderMap,
    media: Option<String>,
    body: web::Bytes,
) -> Result<Event, ApiError> {
    let required = |name: &str| {
        header(headers, name).ok_or_else(|| invalid_ce(format!("binary-mode CloudEvent is missing the {name} header")))
    };
    let spec = required("ce-specversion")?;
    if spec != "1.0" {
        return Err(invalid_ce(format!("unsupported ce-specversion {spec:?}; use 1.0")));
    }
    let mut builder = EventBuilderV10::new()
        .id(required("ce-id")?)
        .source(required("ce-source")?)
        .ty(required("ce-type")?);
    if let Some(t) = header(headers, "ce-time") {
        builder = builder.time(t.to_string());
    }
    if let Some(s) = header(headers, "ce-subject") {
        builder = builder.subject(s);
    }
    for (name, value) in headers {
        let name = name.as_str();
        let Some(ext) = name.strip_prefix("ce-") else { continue };
        if matches!(
            ext,
            "specversion" | "id" | "source" | "type" | "time" | "subject" | "dataschema" | "datacontenttype"
        ) {
            continue;
        }
        let value = value
            .to_str()
            .map_err(|_| invalid_ce(format!("header {name} is not ASCII")))?;
        builder = builder.extension(ext, value.to_string());
    }
    let content_type = media.unwrap_or_else(|| event::JSON.to_string());
    if event::is_json(&content_type) && !body.is_empty() {
        check_json(&body, "invalid_json")?;
    }
    if !body.is_empty() {
        builder = builder.data(content_type.clone(), body.to_vec());
    }
    let ce = builder.build().map_err(invalid_ce)?;
    let mut e = Event::from_cloudevent(topic, ce).map_err(invalid_ce)?;
    e.content_type = content_type.into();
    apply_headers(e, headers)
}

/// What both publish routes check first: the token, the topic (a `publish:<pattern>` token gets
/// 403 outside its patterns, before the body is read), the query; then the body is read.
async fn admit(
    req: &HttpRequest,
    topic: web::Path<String>,
    query: &PublishQuery,
    payload: web::Payload,
    state: &State,
) -> Result<(Caller, String, Duration, web::Bytes), ApiError> {
    let caller = authorize(req, state, Role::Publish)?;
    let topic = topic.into_inner();
    event::validate_name("topic", &topic).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
    caller.check_topic(&topic)?;
    let timeout = query.timeout()?;
    let body = read_body(req, payload, &state.core.config().http).await?;
    Ok((caller, topic, timeout, body))
}

#[utoipa::path(post, path = "/v1/topics/{topic}/events", tag = "events",
    params(("topic" = String, Path, description = "Topic, [a-zA-Z0-9._-]{1,200}", pattern = "^[a-zA-Z0-9._-]{1,200}$"), PublishQuery,
           ("Idempotency-Key" = Option<String>, Header, description = "Event id"),
           ("X-Herald-Key" = Option<String>, Header, description = "Partition key"),
           ("ce-specversion" = Option<String>, Header, description = "Binary-mode CloudEvent: `1.0`; with it ce-id, ce-source and ce-type are required and the body is the event's data, of any media type"),
           ("ce-id" = Option<String>, Header, description = "Binary-mode CloudEvent id"),
           ("ce-source" = Option<String>, Header, description = "Binary-mode CloudEvent source"),
           ("ce-type" = Option<String>, Header, description = "Binary-mode CloudEvent type")),
    request_body(content(
        (serde_json::Value = "application/json"),
        (CloudEventDoc = "application/cloudevents+json"),
        ("application/octet-stream")),
        description = "Any JSON (application/json), a structured CloudEvent (application/cloudevents+json), or a binary-mode CloudEvent: the ce-* headers carry the attributes and the body, of any media type, is the data"),
    responses((status = 202, description = "Accepted", body = Published),
              (status = 200, description = "Processed (ack=processed)", body = Published),
              (status = 400, description = "Invalid (JSON, UTF-8, nesting deeper than 128, a non-ASCII Idempotency-Key or X-Herald-Key, an empty or over-256-byte Idempotency-Key: invalid_idempotency_key, a CloudEvent, the query)", body = super::error::ErrorBody),
              (status = 404, description = "require_subscription: the topic has no subscription (no_subscription); nothing accepted", body = super::error::ErrorBody),
              (status = 408, description = "The body did not arrive within http.body_timeout_ms", body = super::error::ErrorBody),
              (status = 413, description = "Too large", body = super::error::ErrorBody),
              (status = 415, description = "Unsupported content type (not JSON, not a structured CloudEvent, and no ce-specversion header)", body = super::error::ErrorBody),
              (status = 429, description = "Overloaded; see Retry-After", body = super::error::ErrorBody),
              (status = 503, description = "Not ready, subscription unplaced, or the WAL is unavailable (wal_unavailable)", body = super::error::ErrorBody),
              (status = 507, description = "The disk is full (storage_full); nothing accepted, retry after Retry-After", body = super::error::ErrorBody),
              (status = 504, description = "ack=processed timed out; the event is accepted (its id in error.ids)", body = super::error::ErrorBody)))]
pub(crate) async fn publish_one(
    req: HttpRequest,
    topic: web::Path<String>,
    query: web::Query<PublishQuery>,
    payload: web::Payload,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let (caller, topic, timeout, body) = admit(&req, topic, &query, payload, &state).await?;
    let e = parse_one(&topic, &req, body)?;
    caller.check_topic(&e.topic)?;
    query.check_subscribed(std::slice::from_ref(&e), &state)?;
    let ack = query.ack.unwrap_or_default();
    let answer = state.core.ingress().publish(e, ack, timeout).await?;
    Ok(if ack == AckMode::Processed {
        HttpResponse::Ok().json(answer)
    } else {
        HttpResponse::Accepted().json(answer)
    })
}

#[utoipa::path(post, path = "/v1/topics/{topic}/events/batch", tag = "events",
    params(("topic" = String, Path, description = "Topic, [a-zA-Z0-9._-]{1,200}", pattern = "^[a-zA-Z0-9._-]{1,200}$"), PublishQuery,
           ("Idempotency-Key" = Option<String>, Header, description = "Event ids: `K` gives `K-0`, `K-1` … (JSON arrays)"),
           ("X-Herald-Key" = Option<String>, Header, description = "Partition key of every event (JSON arrays)")),
    request_body(content(
        (Vec<serde_json::Value> = "application/json"),
        (Vec<CloudEventDoc> = "application/cloudevents-batch+json")),
        description = "A JSON array (each element is one event's data), or a CloudEvents batch (application/cloudevents-batch+json)"),
    responses((status = 202, description = "All accepted", body = BatchAnswer),
              (status = 200, description = "All processed (ack=processed)", body = BatchAnswer),
              (status = 400, description = "Invalid; nothing accepted", body = super::error::ErrorBody),
              (status = 408, description = "The body did not arrive within http.body_timeout_ms", body = super::error::ErrorBody),
              (status = 404, description = "require_subscription: a topic has no subscription (no_subscription); nothing accepted", body = super::error::ErrorBody),
              (status = 413, description = "Too large", body = super::error::ErrorBody),
              (status = 415, description = "Unsupported content type", body = super::error::ErrorBody),
              (status = 429, description = "Overloaded; nothing accepted", body = super::error::ErrorBody),
              (status = 503, description = "Not ready, subscription unplaced, or the WAL is unavailable (wal_unavailable)", body = super::error::ErrorBody),
              (status = 507, description = "The disk is full (storage_full); nothing accepted", body = super::error::ErrorBody),
              (status = 504, description = "ack=processed timed out; the events are accepted (their ids in error.ids)", body = super::error::ErrorBody)))]
pub(crate) async fn publish_batch(
    req: HttpRequest,
    topic: web::Path<String>,
    query: web::Query<PublishQuery>,
    payload: web::Payload,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let (caller, topic, timeout, body) = admit(&req, topic, &query, payload, &state).await?;
    let config = &state.core.config().http;
    let events: Vec<Event> = match media_type(&req).as_deref() {
        Some(CE_BATCH) => {
            check_json(&body, "invalid_cloudevent")?;
            let batch: Vec<cloudevents::Event> = serde_json::from_slice(&body).map_err(invalid_ce)?;
            let trace = trace_headers(req.headers());
            batch
                .into_iter()
                .map(|ce| {
                    let e = Event::from_cloudevent(&topic, ce).map_err(invalid_ce)?;
                    Ok(match &trace {
                        Some(t) => e.with_trace(Some(t.clone())),
                        None => e,
                    })
                })
                .collect::<Result<_, ApiError>>()?
        }
        None => json_batch(&topic, &body, &req)?,
        Some(m) if m != CE_JSON && event::is_json(m) => json_batch(&topic, &body, &req)?,
        Some(m) => {
            return Err(ApiError::unsupported_media_type(format!(
                "content type {m} is not accepted for a batch: send a JSON array (application/json) or {CE_BATCH}"
            )))
        }
    };
    if events.is_empty() {
        return Err(ApiError::bad_request("empty_batch", "the batch holds no events"));
    }
    // Every event of the batch, not only the route's topic: nothing is accepted if one is refused.
    if caller.topic_limited() {
        for e in &events {
            caller.check_topic(&e.topic)?;
        }
    }
    if events.len() > config.max_batch_events {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!(
                "{} events in one batch; the limit is {} (http.max_batch_events)",
                events.len(),
                config.max_batch_events
            ),
        ));
    }
    query.check_subscribed(&events, &state)?;
    let ack = query.ack.unwrap_or_default();
    let answers = state.core.ingress().publish_answers(events, ack, timeout).await?;
    let subscriptions = answers.first().map_or(0, |a| a.subscriptions);
    if ack == AckMode::Processed {
        let published: Vec<Published> = answers.into_iter().map(Answer::into_published).collect();
        return Ok(HttpResponse::Ok().json(BatchAnswer {
            topic,
            ids: published.iter().map(|p| p.id.clone()).collect(),
            subscriptions,
            events: Some(published),
        }));
    }
    // The ids are written from the accepted events themselves (no copy per event).
    Ok(HttpResponse::Accepted().json(AcceptedBatch {
        topic: &topic,
        ids: Ids(&answers),
        subscriptions,
    }))
}

/// [`BatchAnswer`] without `events`, borrowing the ids from the answers (same JSON).
#[derive(Serialize)]
struct AcceptedBatch<'a> {
    topic: &'a str,
    ids: Ids<'a>,
    subscriptions: usize,
}

/// The ids of accepted events, as a JSON array of strings.
struct Ids<'a>(&'a [Answer]);

impl Serialize for Ids<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|a| &*a.event.id))
    }
}

/// A JSON array: each element becomes one event's data. `Idempotency-Key: K` gives ids `K-0`, `K-1` …
/// Each event's data is a slice of the body (no copy per event). The events of one batch share
/// one accept time, and their ids come from [`batch_ids`].
fn json_batch(topic: &str, body: &web::Bytes, req: &HttpRequest) -> Result<Vec<Event>, ApiError> {
    check_json(body, "invalid_json")?;
    let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("a batch must be a JSON array: {e}")))?;
    let headers = req.headers();
    let idem = idempotency_key(headers)?;
    if let Some(k) = idem {
        // The last id, `K-(n-1)`, is the longest: it must be a valid id too.
        let longest = k.len() + 1 + items.len().saturating_sub(1).to_string().len();
        if longest > event::MAX_ID_LEN {
            return Err(ApiError::bad_request(
                "invalid_idempotency_key",
                format!(
                    "with {} events the batch ids {k}-0 … would be up to {longest} bytes; an id is at most {} bytes: \
                     use a shorter Idempotency-Key",
                    items.len(),
                    event::MAX_ID_LEN
                ),
            ));
        }
    }
    let key = ascii_header(headers, HERALD_KEY)?.map(ByteString::from);
    let trace = trace_headers(headers);
    let template = Event::new(topic, web::Bytes::new(), event::JSON);
    let ids = batch_ids(idem, items.len());
    Ok(items
        .into_iter()
        .zip(ids)
        .map(|(raw, id)| Event {
            id,
            topic: template.topic.clone(),
            key: key.clone(),
            data: body.slice_ref(raw.get().as_bytes()),
            content_type: template.content_type.clone(),
            time: template.time,
            source: template.source.clone(),
            event_type: template.event_type.clone(),
            headers: Default::default(),
            trace: trace.clone(),
        })
        .collect())
}

/// The ids of a batch of `n` events, as slices of one buffer (one allocation for the batch, not
/// one per event): `K-0`, `K-1` … for `Idempotency-Key: K`, else consecutive ULIDs from one clock
/// read and one random draw (unique and ordered like the events) instead of a clock read and a
/// draw each.
fn batch_ids(idempotency_key: Option<&str>, n: usize) -> impl Iterator<Item = ByteString> {
    use std::fmt::Write;
    let mut text = String::with_capacity(n * idempotency_key.map_or(ulid::ULID_LEN, |k| k.len() + 6));
    let mut ends = Vec::with_capacity(n);
    let mut ulid = ulid::Ulid::new();
    for i in 0..n {
        match idempotency_key {
            Some(k) => {
                let _ = write!(text, "{k}-{i}");
            }
            None => {
                // The random part has 80 bits: it practically never overflows within a batch,
                // and a fresh ULID (not a nil one) takes over if it does.
                ulid = ulid
                    .increment()
                    .unwrap_or_else(|| ulid::Ulid::from_datetime(std::time::SystemTime::now()));
                let mut buf = [0u8; ulid::ULID_LEN];
                text.push_str(ulid.array_to_str(&mut buf));
            }
        }
        ends.push(text.len());
    }
    let text = ByteString::from(text);
    let mut start = 0;
    ends.into_iter().map(move |end| {
        let id = text.slice_ref(&text[start..end]);
        start = end;
        id
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_s_ids_are_ordered_ulids_or_key_and_index_in_one_buffer() {
        let ids: Vec<ByteString> = batch_ids(None, 1000).collect();
        assert_eq!(ids.len(), 1000);
        for pair in ids.windows(2) {
            assert!(
                pair[0] < pair[1],
                "consecutive ids increase: {} then {}",
                pair[0],
                pair[1]
            );
            assert_eq!(pair[1].len(), ulid::ULID_LEN);
            assert!(ulid::Ulid::from_string(&pair[1]).is_ok(), "{} is a ULID", pair[1]);
            // One buffer for the batch: each id follows the one before in memory.
            assert_eq!(pair[1].as_ptr(), pair[0].as_ptr().wrapping_add(pair[0].len()));
        }
        let keyed: Vec<ByteString> = batch_ids(Some("order-9"), 12).collect();
        let want: Vec<String> = (0..12).map(|i| format!("order-9-{i}")).collect();
        assert_eq!(keyed, want);
        assert_eq!(batch_ids(None, 0).count(), 0);
    }
}
