//! The event: Herald's unit of work, its validation, and its CloudEvents mapping.
//!
//! This module owns the [`Event`] type and the rules for names (topics, groups) and ids. It does no
//! I/O: HTTP parsing lives in `http`, persistence in `ingress::store`. The W3C trace context an
//! event carries is [`TraceContext`] (`trace`).

pub mod trace;

pub use trace::TraceContext;

use std::collections::BTreeMap;

use bytes::Bytes;
pub use bytestring::ByteString;
use chrono::{DateTime, Utc};
use cloudevents::{AttributesReader, Data, EventBuilder, EventBuilderV10};
use serde::de::DeserializeOwned;

/// The content type given to plain JSON bodies.
pub const JSON: &str = "application/json";
/// The `source` given to events whose publisher did not name one.
pub const DEFAULT_SOURCE: &str = "herald";
/// Longest accepted event id, partition key or header value (bytes).
pub const MAX_ID_LEN: usize = 256;
/// Deepest nesting of arrays and objects accepted in a JSON body (the same as serde_json's own
/// recursion limit for typed values): a deeper body answers 400.
pub const MAX_JSON_DEPTH: usize = 128;

/// One event, as handlers see it.
///
/// Cloning is cheap for `data` (reference counted); handlers receive an `Arc<Event>` anyway.
/// Build one with [`Event::json`] or [`Event::new`] and the `with_*` methods; fields may be added
/// in a minor release (`#[non_exhaustive]`), so outside Herald it has no struct literal.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Event {
    /// Idempotency key chosen by the publisher (CloudEvents `id`, `Idempotency-Key` header), or a
    /// generated ULID. Handler-side duplicate detection keys on it. Shared text ([`ByteString`]):
    /// a received event's id is a slice of the received frame, and the generated ids of an HTTP
    /// batch are slices of one buffer.
    pub id: ByteString,
    /// The topic it was published to; every subscription of the topic receives it. Text shared
    /// by reference count ([`ByteString`]: reads as a `&str`) with the other events of its
    /// batch or frame.
    pub topic: ByteString,
    /// Partition key: events with the same key go to the same handler instance, in order.
    /// Shared text, as `id`.
    pub key: Option<ByteString>,
    /// The payload, exactly as published.
    pub data: Bytes,
    /// MIME type of `data` (`application/json` for plain JSON publishes).
    pub content_type: ByteString,
    /// When the event happened (CloudEvents `time`), or when Herald accepted it.
    pub time: DateTime<Utc>,
    /// Who produced it (CloudEvents `source`).
    pub source: ByteString,
    /// CloudEvents `type`; defaults to the topic.
    pub event_type: ByteString,
    /// CloudEvents extensions and `subject`, as strings.
    pub headers: BTreeMap<String, String>,
    /// The W3C trace context the event continues (`traceparent`/`tracestate` of the publish, or
    /// of the CloudEvents distributed-tracing extension), if any. Once published it names the
    /// publish span (in the WAL) or the forward span (in a forwarded frame) as parent; a handler
    /// reads the context of its own deliver span from `Delivery::trace` (module `handler`).
    pub trace: Option<TraceContext>,
}

/// Why an event or name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// A topic or group name breaks `[a-zA-Z0-9._-]{1,200}`.
    #[error("invalid {what} {name:?}: use 1 to 200 characters from [a-zA-Z0-9._-]")]
    InvalidName {
        /// `topic` or `group`.
        what: &'static str,
        /// The refused name (truncated).
        name: String,
    },
    /// An id, key or header is empty or too long.
    #[error("invalid {what}: must be 1 to {MAX_ID_LEN} bytes")]
    InvalidField {
        /// Which field.
        what: &'static str,
    },
    /// The event time cannot be stored: outside 1677-09-21T00:12:44Z..=2262-04-11T23:47:16Z
    /// (nanoseconds since the Unix epoch in an i64, as the WAL and the peer wire keep it).
    #[error("invalid time {0}: events are stored with nanosecond times from 1677-09-21 to 2262-04-11")]
    TimeOutOfRange(DateTime<Utc>),
    /// The body claimed to be a CloudEvent but is not a valid one.
    #[error("invalid CloudEvent: {0}")]
    CloudEvent(String),
}

/// Checks a topic or group name against `[a-zA-Z0-9._-]{1,200}`.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), EventError> {
    let ok = (1..=200).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(EventError::InvalidName {
            what,
            name: name.chars().take(64).collect(),
        })
    }
}

fn validate_field(what: &'static str, value: &str) -> Result<(), EventError> {
    if value.is_empty() || value.len() > MAX_ID_LEN {
        Err(EventError::InvalidField { what })
    } else {
        Ok(())
    }
}

/// A new event id: a ULID, sortable by creation time.
pub fn new_id() -> String {
    ulid_string(ulid::Ulid::new())
}

/// A new id greater than every id this function gave before in this process (a ULID from a
/// monotonic generator: within one millisecond the random part counts up). Dead letters take
/// theirs from it, so that the oldest of them has the smallest id, which retention by count
/// deletes first; plain ULIDs made in the same millisecond sort at random.
pub(crate) fn new_ordered_id() -> String {
    static GENERATOR: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
    let mut generator = GENERATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // Overflow of the 80 random bits within one millisecond: practically never; a fresh ULID then.
    ulid_string(generator.generate().unwrap_or_else(|_| ulid::Ulid::new()))
}

/// `ulid` as its 26-character text. (`Ulid::to_string` checks its own ASCII output as UTF-8: a
/// few percent of an ingress node's CPU at small events.)
pub(crate) fn ulid_string(ulid: ulid::Ulid) -> String {
    let mut buf = [0u8; ulid::ULID_LEN];
    ulid.array_to_str(&mut buf).to_owned()
}

impl Event {
    /// A JSON event on `topic` with a generated id, the current time and the default source.
    pub fn json(topic: impl Into<ByteString>, value: &impl serde::Serialize) -> serde_json::Result<Self> {
        Ok(Self::new(topic, serde_json::to_vec(value)?, JSON))
    }

    /// An event on `topic` carrying `data` of `content_type`, with a generated id.
    pub fn new(topic: impl Into<ByteString>, data: impl Into<Bytes>, content_type: &str) -> Self {
        let topic = topic.into();
        Event {
            id: new_id().into(),
            event_type: topic.clone(),
            topic,
            key: None,
            data: data.into(),
            content_type: if content_type == JSON {
                ByteString::from_static(JSON)
            } else {
                content_type.into()
            },
            time: Utc::now(),
            source: ByteString::from_static(DEFAULT_SOURCE),
            headers: BTreeMap::new(),
            trace: None,
        }
    }

    /// Sets the trace context the event continues.
    pub fn with_trace(mut self, trace: Option<TraceContext>) -> Self {
        self.trace = trace;
        self
    }

    /// Sets the partition key.
    pub fn with_key(mut self, key: impl Into<ByteString>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the id (the publisher's idempotency key).
    pub fn with_id(mut self, id: impl Into<ByteString>) -> Self {
        self.id = id.into();
        self
    }

    /// Decodes `data` as JSON into `T`. In a handler, `?` turns a decode error into a handler
    /// failure (retried, then dead-lettered).
    pub fn json_data<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.data)
    }

    /// Checks every field a publisher controls.
    pub fn validate(&self) -> Result<(), EventError> {
        self.validate_after(None)
    }

    /// [`Event::validate`] for the events of a batch in order, `previous` being the one before
    /// (already valid): a topic or time equal to its one is not checked again (the events of one
    /// HTTP batch share both).
    pub(crate) fn validate_after(&self, previous: Option<&Event>) -> Result<(), EventError> {
        if previous.is_none_or(|p| p.topic != self.topic) {
            validate_name("topic", &self.topic)?;
        }
        validate_field("event id", &self.id)?;
        validate_field("source", &self.source)?;
        validate_field("type", &self.event_type)?;
        if let Some(key) = &self.key {
            validate_field("partition key", key)?;
        }
        for v in self.headers.values() {
            validate_field("header value", v)?;
        }
        if previous.is_none_or(|p| p.time != self.time) && self.time.timestamp_nanos_opt().is_none() {
            // Stored, it would read back as 1970-01-01 (found by tests/fuzz.rs).
            return Err(EventError::TimeOutOfRange(self.time));
        }
        Ok(())
    }

    /// Maps a parsed CloudEvent (any spec version) onto a Herald event on `topic`.
    ///
    /// The CloudEvents `partitionkey` extension becomes the partition key; the distributed-tracing
    /// extension (`traceparent`, `tracestate`) becomes the trace context (dropped if it does not
    /// parse: the publish then starts a new trace); other extensions and `subject` become headers.
    pub fn from_cloudevent(topic: &str, ce: cloudevents::Event) -> Result<Self, EventError> {
        let mut headers = BTreeMap::new();
        let mut key = None;
        let (mut traceparent, mut tracestate) = (None, None);
        for (name, value) in ce.iter_extensions() {
            if name == "partitionkey" {
                key = Some(ByteString::from(value.to_string()));
            } else if name == "traceparent" {
                traceparent = Some(value.to_string());
            } else if name == "tracestate" {
                tracestate = Some(value.to_string());
            } else {
                headers.insert(name.to_string(), value.to_string());
            }
        }
        if let Some(subject) = ce.subject() {
            headers.insert("subject".to_string(), subject.to_string());
        }
        let declared = ce.datacontenttype().map(ByteString::from);
        let (content_type, data) = match ce.data() {
            None => (declared.unwrap_or(ByteString::from_static(JSON)), Bytes::new()),
            Some(Data::Json(v)) => (
                declared.unwrap_or(ByteString::from_static(JSON)),
                Bytes::from(serde_json::to_vec(v).map_err(|e| EventError::CloudEvent(e.to_string()))?),
            ),
            Some(Data::String(s)) => (
                declared.unwrap_or(ByteString::from_static("text/plain")),
                Bytes::from(s.clone().into_bytes()),
            ),
            Some(Data::Binary(b)) => (
                declared.unwrap_or(ByteString::from_static("application/octet-stream")),
                Bytes::from(b.clone()),
            ),
        };
        let event = Event {
            id: ce.id().into(),
            topic: topic.into(),
            key,
            data,
            content_type,
            time: ce.time().copied().unwrap_or_else(Utc::now),
            source: ce.source().as_str().into(),
            event_type: ce.ty().into(),
            headers,
            trace: traceparent.and_then(|tp| TraceContext::parse(&tp, tracestate.as_deref())),
        };
        event.validate()?;
        Ok(event)
    }

    /// This event as a CloudEvent (spec 1.0), as the webhook handler sends it.
    ///
    /// The topic travels in the `heraldtopic` extension and the key in `partitionkey`; headers
    /// whose names are valid CloudEvents extension names are carried as extensions, and the trace
    /// context as the distributed-tracing extension (`traceparent`, `tracestate`).
    pub fn to_cloudevent(&self) -> Result<cloudevents::Event, EventError> {
        let data = if is_json(&self.content_type) {
            match serde_json::from_slice::<serde_json::Value>(&self.data) {
                Ok(v) => Data::Json(v),
                Err(_) => Data::Binary(self.data.to_vec()),
            }
        } else if self.content_type.starts_with("text/") {
            match std::str::from_utf8(&self.data) {
                Ok(s) => Data::String(s.to_string()),
                Err(_) => Data::Binary(self.data.to_vec()),
            }
        } else {
            Data::Binary(self.data.to_vec())
        };
        let mut builder = EventBuilderV10::new()
            .id(self.id.clone())
            .source(&*self.source)
            .ty(&*self.event_type)
            .time(self.time)
            .extension("heraldtopic", &*self.topic);
        if !self.data.is_empty() {
            builder = builder.data(&*self.content_type, data);
        }
        if let Some(key) = &self.key {
            builder = builder.extension("partitionkey", &**key);
        }
        if let Some(trace) = &self.trace {
            builder = builder.extension("traceparent", trace.traceparent());
            if let Some(state) = &trace.state {
                builder = builder.extension("tracestate", state.clone());
            }
        }
        for (name, value) in &self.headers {
            if self.trace.is_some() && (name == "traceparent" || name == "tracestate") {
                continue;
            }
            if name == "subject" {
                builder = builder.subject(value.clone());
            } else if is_extension_name(name) {
                builder = builder.extension(name, value.clone());
            }
        }
        builder.build().map_err(|e| EventError::CloudEvent(e.to_string()))
    }
}

/// Whether a MIME type is JSON (`application/json`, `application/x+json`, with parameters).
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case(JSON) || essence.to_ascii_lowercase().ends_with("+json")
}

/// Why a JSON body is refused before it is parsed (see [`check_json`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The bytes are not UTF-8 (RFC 8259 §8.1: JSON exchanged between systems is UTF-8).
    #[error("the body is not valid UTF-8 (at byte {0}); JSON must be UTF-8")]
    NotUtf8(usize),
    /// Arrays and objects nest deeper than [`MAX_JSON_DEPTH`].
    #[error("the body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels (at byte {0})")]
    TooDeep(usize),
}

/// Checks what a JSON syntax check that skips values does not: the whole body is UTF-8 (string
/// contents included; serde_json does not check them when it only skips a value) and arrays and
/// objects nest at most [`MAX_JSON_DEPTH`] deep (skipping a value has no depth limit). One pass,
/// no allocation; the syntax itself is left to the parser. A string is skipped with `memchr`
/// (to its next quote or backslash, many bytes at a time): scanned a byte at a time, this check
/// was 23 % of the nodes' CPU at 1 KiB events (`herald-bench nats`), more than the encryption.
pub fn check_json(body: &[u8]) -> Result<(), JsonError> {
    std::str::from_utf8(body).map_err(|e| JsonError::NotUtf8(e.valid_up_to()))?;
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Past the closing quote (or to the end of an unterminated string: the parser's
                // to refuse), a backslash escaping the byte after it.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', body.get(i..).unwrap_or_default()) {
                        None => return Ok(()),
                        Some(at) if body[i + at] == b'\\' => i += at + 2,
                        Some(at) => {
                            i += at;
                            break;
                        }
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(JsonError::TooDeep(i));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// CloudEvents extension names are lower-case ASCII letters and digits.
fn is_extension_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 20 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_ids_increase_even_within_one_millisecond() {
        let ids: Vec<String> = (0..10_000).map(|_| new_ordered_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
        let from_threads: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..1000).map(|_| new_ordered_id()).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = from_threads.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 4000, "ids are unique across threads");
    }

    #[test]
    fn a_batch_checks_every_topic_and_time_that_differs_from_the_event_before() {
        let a = Event::new("a", "{}", JSON);
        assert!(a.clone().validate_after(Some(&a)).is_ok());
        let mut b = a.clone();
        b.topic = "a b".into();
        assert!(matches!(
            b.validate_after(Some(&a)),
            Err(EventError::InvalidName { .. })
        ));
        let mut c = a.clone();
        c.time = DateTime::<Utc>::MAX_UTC;
        assert!(matches!(c.validate_after(Some(&a)), Err(EventError::TimeOutOfRange(_))));
        let mut d = a.clone();
        d.id = ByteString::new();
        assert!(
            d.validate_after(Some(&a)).is_err(),
            "fields other than topic and time are always checked"
        );
        let id = ulid_string(ulid::Ulid::new());
        assert_eq!(id.len(), 26);
        assert!(id.parse::<ulid::Ulid>().is_ok());
    }

    #[test]
    fn names_follow_the_topic_rule() {
        assert!(validate_name("topic", "user.login").is_ok());
        assert!(validate_name("topic", "a-b_c.D9").is_ok());
        assert!(validate_name("topic", "").is_err());
        assert!(validate_name("topic", "has space").is_err());
        assert!(validate_name("topic", "slash/no").is_err());
        assert!(validate_name("topic", &"x".repeat(200)).is_ok());
        assert!(validate_name("topic", &"x".repeat(201)).is_err());
    }

    #[test]
    fn cloudevent_round_trip_keeps_attributes() {
        let mut e = Event::json("user.login", &serde_json::json!({"user_id": 7}))
            .unwrap()
            .with_key("u7")
            .with_id("abc");
        e.headers.insert("region".into(), "eu".into());
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        e.trace = TraceContext::parse(tp, Some("vendor=x"));
        let ce = e.to_cloudevent().unwrap();
        assert_eq!(ce.id(), "abc");
        assert_eq!(ce.ty(), "user.login");
        assert_eq!(ce.extension("traceparent").map(|v| v.to_string()).as_deref(), Some(tp));
        let back = Event::from_cloudevent("user.login", ce).unwrap();
        assert_eq!(back.key.as_deref(), Some("u7"));
        assert_eq!(back.headers.get("region").map(String::as_str), Some("eu"));
        assert_eq!(back.trace, e.trace);
        assert!(!back.headers.contains_key("traceparent"));
        assert_eq!(back.headers.get("heraldtopic").map(String::as_str), Some("user.login"));
        let v: serde_json::Value = back.json_data().unwrap();
        assert_eq!(v["user_id"], 7);
    }

    #[test]
    fn the_distributed_tracing_extension_becomes_the_trace_context_and_a_bad_one_none() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ce = |traceparent: &str| -> cloudevents::Event {
            serde_json::from_value(serde_json::json!({
                "specversion": "1.0", "id": "1", "source": "s", "type": "t",
                "traceparent": traceparent, "tracestate": "k=v"
            }))
            .unwrap()
        };
        let e = Event::from_cloudevent("t", ce(tp)).unwrap();
        let trace = e.trace.expect("a valid traceparent");
        assert_eq!(trace.traceparent(), tp);
        assert_eq!(trace.state.as_deref(), Some("k=v"));
        assert!(e.headers.is_empty(), "{:?}", e.headers);
        // Invalid: no context (a new trace is started), and no error for the publisher.
        let e = Event::from_cloudevent("t", ce(&tp.to_uppercase())).unwrap();
        assert_eq!(e.trace, None);
        assert!(e.headers.is_empty(), "{:?}", e.headers);
    }

    #[test]
    fn times_outside_the_stored_range_are_refused() {
        for (time, ok) in [
            ("0000-01-01T00:00:00Z", false),
            ("1677-09-21T00:12:43Z", false),
            ("1677-09-21T00:12:44Z", true),
            ("2262-04-11T23:47:16Z", true),
            ("2262-04-11T23:47:17Z", false),
            ("9999-12-31T23:59:59Z", false),
        ] {
            let ce: cloudevents::Event = serde_json::from_value(serde_json::json!({
                "specversion": "1.0", "id": "1", "source": "s", "type": "t", "time": time
            }))
            .unwrap();
            let got = Event::from_cloudevent("t", ce);
            assert_eq!(got.is_ok(), ok, "{time}: {got:?}");
        }
    }

    #[test]
    fn cloudevent_without_required_attributes_is_refused() {
        let r = serde_json::from_str::<cloudevents::Event>(r#"{"specversion":"1.0","id":"1"}"#);
        assert!(r.is_err());
    }

    #[test]
    fn json_bodies_must_be_utf8_and_nest_at_most_the_limit() {
        assert_eq!(check_json(br#"{"a":[1,{"b":"\"[{"}]}"#), Ok(()));
        assert_eq!(check_json(b"{\"a\":\"\xff\xfe\"}"), Err(JsonError::NotUtf8(6)));
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check_json(nested(MAX_JSON_DEPTH).as_bytes()), Ok(()));
        assert_eq!(
            check_json(nested(MAX_JSON_DEPTH + 1).as_bytes()),
            Err(JsonError::TooDeep(MAX_JSON_DEPTH))
        );
        // Brackets inside strings do not count.
        let quoted = format!("[\"{}\"]", "[".repeat(1000));
        assert_eq!(check_json(quoted.as_bytes()), Ok(()));
    }

    /// [`check_json`] a byte at a time, as it was before it skipped strings with `memchr`.
    fn check_json_bytewise(body: &[u8]) -> Result<(), JsonError> {
        std::str::from_utf8(body).map_err(|e| JsonError::NotUtf8(e.valid_up_to()))?;
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for (i, &b) in body.iter().enumerate() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_JSON_DEPTH {
                        return Err(JsonError::TooDeep(i));
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        Ok(())
    }

    proptest::proptest! {
        /// Bodies made of JSON's structural bytes, quotes, backslashes and letters (escapes at
        /// the end, unterminated strings, brackets in strings, depth past the limit): the string
        /// skipping agrees with the byte-at-a-time scan on every one.
        #[test]
        fn skipping_strings_agrees_with_scanning_every_byte(
            body in proptest::collection::vec(
                proptest::sample::select(vec![b'"', b'\\', b'[', b']', b'{', b'}', b'a', b':', b',']),
                0..400,
            ),
            deep in 0usize..3,
        ) {
            // Sometimes a prefix deep enough to reach the limit inside `body`.
            let mut input = b"[".repeat(deep * (MAX_JSON_DEPTH / 2));
            input.extend_from_slice(&body);
            proptest::prop_assert_eq!(check_json(&input), check_json_bytewise(&input));
        }
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/cloudevents+json"));
        assert!(!is_json("text/plain"));
    }
}
