//! Herald's persisted (and, later, wire) records, as prost messages.
//!
//! The messages are declared with `prost`'s derive instead of a `.proto` file compiled by
//! `build.rs`, so building Herald needs no `protoc`. Field tags are the schema: never reuse or
//! renumber one.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::event::{ByteString, Event, TraceContext};
use prost::Message;

/// An event (the `event::Event` fields).
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventRecord {
    /// Event id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Topic.
    #[prost(string, tag = "2")]
    pub topic: String,
    /// Partition key.
    #[prost(string, optional, tag = "3")]
    pub key: Option<String>,
    /// Payload.
    #[prost(bytes = "bytes", tag = "4")]
    pub data: Bytes,
    /// MIME type of the payload.
    #[prost(string, tag = "5")]
    pub content_type: String,
    /// Event time, nanoseconds since the Unix epoch.
    #[prost(int64, tag = "6")]
    pub time_unix_nanos: i64,
    /// CloudEvents source.
    #[prost(string, tag = "7")]
    pub source: String,
    /// CloudEvents type.
    #[prost(string, tag = "8")]
    pub event_type: String,
    /// Extensions and subject.
    #[prost(btree_map = "string, string", tag = "9")]
    pub headers: BTreeMap<String, String>,
    /// W3C `traceparent` (`event::TraceContext`): in the WAL the publish span, in a forwarded
    /// frame the forward span. Parsed on the way in; one that does not parse is no context.
    #[prost(string, optional, tag = "10")]
    pub traceparent: Option<String>,
    /// W3C `tracestate` that goes with `traceparent` (dropped beyond 512 bytes).
    #[prost(string, optional, tag = "11")]
    pub tracestate: Option<String>,
}

/// One accepted event in the write-ahead log, with the subscriptions (groups) it is owed to.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WalRecord {
    /// The event.
    #[prost(message, optional, tag = "1")]
    pub event: Option<EventRecord>,
    /// Groups of the event's topic that had not acknowledged it when it was written.
    #[prost(string, repeated, tag = "2")]
    pub groups: Vec<String>,
}

/// An event that exhausted its attempts in one subscription.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeadLetterRecord {
    /// The event.
    #[prost(message, optional, tag = "1")]
    pub event: Option<EventRecord>,
    /// The subscription's group (its topic is the event's).
    #[prost(string, tag = "2")]
    pub group: String,
    /// How many attempts were made.
    #[prost(uint32, tag = "3")]
    pub attempts: u32,
    /// The last attempt's error.
    #[prost(string, tag = "4")]
    pub error: String,
    /// When it was dead-lettered, milliseconds since the Unix epoch.
    #[prost(int64, tag = "5")]
    pub failed_at_unix_ms: i64,
}

/// An event-plane message between nodes, carried as the transport's opaque `app` payload (the
/// transport knows nothing of events).
///
/// ```text
/// message PeerMessage { oneof body { EventBatch events = 1; AckBatch acks = 2; } }
/// message EventBatch  { repeated Forwarded deliveries = 1; }
/// message Forwarded   { uint64 id = 1; string group = 2; uint64 epoch = 3; EventRecord event = 4;
///                         uint64 lane = 5; }   // lane != 0: at-most-once, no ack (id is 0)
/// message AckBatch    { repeated AckRecord acks = 1; repeated LaneCredit credits = 2; }
/// message AckRecord   { uint64 id = 1; AckCode code = 2; uint32 attempts = 3; string error = 4; }
/// message LaneCredit  { uint64 lane = 1; uint64 n = 2; }  // n deliveries of the lane are done
/// ```
///
/// Dead letters are listed and replayed across the cluster over the same channel (never over
/// HTTP with a user's token): a node asks a member with a [`DeadLetterRequest`] (tag 3) and the
/// member answers with a [`DeadLetterResponse`] (tag 4) carrying the request's id.
///
/// ```text
/// message DeadLetterRequest  { uint64 id = 1; oneof kind { ListDeadLetters list = 2;
///                                ReplayDeadLetter replay = 3; } }
/// message ListDeadLetters    { optional string after = 1; uint32 limit = 2;
///                                optional string topic = 3; optional string group = 4; }
/// message ReplayDeadLetter   { string id = 1; }
/// message DeadLetterResponse { uint64 id = 1; DeadLetterStatus status = 2; string message = 3;
///                                repeated StoredDeadLetter entries = 4; bool truncated = 5;
///                                string event_id = 6; }
/// message StoredDeadLetter   { string id = 1; DeadLetterRecord record = 2; }
/// ```
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerMessage {
    /// The message.
    #[prost(oneof = "peer_message::Body", tags = "1, 2, 3, 4")]
    pub body: Option<peer_message::Body>,
}

/// The variants of [`PeerMessage`].
pub mod peer_message {
    /// One event-plane message.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// Events for subscriptions placed on the receiver.
        #[prost(message, tag = "1")]
        Events(super::EventBatch),
        /// Outcomes of events the receiver forwarded.
        #[prost(message, tag = "2")]
        Acks(super::AckBatch),
        /// A question about the receiver's dead letters.
        #[prost(message, tag = "3")]
        DeadLetterRequest(super::DeadLetterRequest),
        /// The answer to a [`DeadLetterRequest`](super::DeadLetterRequest) the receiver sent.
        #[prost(message, tag = "4")]
        DeadLetterResponse(super::DeadLetterResponse),
    }
}

/// A node asks a member about the dead letters stored there.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeadLetterRequest {
    /// The asker's request id, echoed in the answer.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// What is asked.
    #[prost(oneof = "dead_letter_request::Kind", tags = "2, 3")]
    pub kind: Option<dead_letter_request::Kind>,
}

/// The variants of [`DeadLetterRequest`].
pub mod dead_letter_request {
    /// One question.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// A page of the member's dead letters.
        #[prost(message, tag = "2")]
        List(super::ListDeadLetters),
        /// Replay one of the member's dead letters.
        #[prost(message, tag = "3")]
        Replay(super::ReplayDeadLetter),
    }
}

/// A page of dead letters in id order (the `GET /v1/dead-letters` query).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListDeadLetters {
    /// Only ids after this one.
    #[prost(string, optional, tag = "1")]
    pub after: Option<String>,
    /// Page size (the answering node caps it at 1000).
    #[prost(uint32, tag = "2")]
    pub limit: u32,
    /// Only this topic.
    #[prost(string, optional, tag = "3")]
    pub topic: Option<String>,
    /// Only this group.
    #[prost(string, optional, tag = "4")]
    pub group: Option<String>,
}

/// Replay the dead letter `id` where it is stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReplayDeadLetter {
    /// The dead-letter id.
    #[prost(string, tag = "1")]
    pub id: String,
}

/// A member's answer to a [`DeadLetterRequest`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeadLetterResponse {
    /// The request id of [`DeadLetterRequest::id`].
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// How it went.
    #[prost(enumeration = "DeadLetterStatus", tag = "2")]
    pub status: i32,
    /// Why, when it did not go well.
    #[prost(string, tag = "3")]
    pub message: String,
    /// A listing's page, in id order.
    #[prost(message, repeated, tag = "4")]
    pub entries: Vec<StoredDeadLetter>,
    /// The page was cut short to fit one frame: more may follow after its last entry.
    #[prost(bool, tag = "5")]
    pub truncated: bool,
    /// A replay's event id.
    #[prost(string, tag = "6")]
    pub event_id: String,
}

/// One dead letter with its id.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredDeadLetter {
    /// The dead-letter id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The dead letter.
    #[prost(message, optional, tag = "2")]
    pub record: Option<DeadLetterRecord>,
}

/// The status codes of [`DeadLetterResponse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DeadLetterStatus {
    /// Done: the page, or the replayed event's id.
    Ok = 0,
    /// No such dead letter on the member.
    NotFound = 1,
    /// The dead letter's subscription no longer exists.
    SubscriptionGone = 2,
    /// The member has too many requests queued; ask again later.
    Busy = 3,
    /// The member could not answer (its store failed).
    Failed = 4,
}

/// Events an ingress node hands to the node running their subscription's instance.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventBatch {
    /// The deliveries, in the order they were routed.
    #[prost(message, repeated, tag = "1")]
    pub deliveries: Vec<Forwarded>,
}

/// One event for one subscription (the topic is the event's).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Forwarded {
    /// The ingress node's delivery id, echoed in the ack.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The subscription's group.
    #[prost(string, tag = "2")]
    pub group: String,
    /// The placement epoch the ingress routed with (fencing).
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
    /// The event.
    #[prost(message, optional, tag = "4")]
    pub event: Option<EventRecord>,
    /// Non-zero for an at-most-once (`ack=none`) delivery: the receiver acks nothing for it, it
    /// only returns a [`LaneCredit`] for the lane once done with it, and the sender never
    /// re-sends it (its `id` is 0).
    #[prost(uint64, tag = "5")]
    pub lane: u64,
}

/// Outcomes of forwarded deliveries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AckBatch {
    /// The acks.
    #[prost(message, repeated, tag = "1")]
    pub acks: Vec<AckRecord>,
    /// Counts of at-most-once deliveries finished (or dropped), by lane.
    #[prost(message, repeated, tag = "2")]
    pub credits: Vec<LaneCredit>,
}

/// At-most-once deliveries of one lane that the receiver is done with: the sender gives their
/// window units back.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LaneCredit {
    /// The lane of [`Forwarded::lane`].
    #[prost(uint64, tag = "1")]
    pub lane: u64,
    /// How many.
    #[prost(uint64, tag = "2")]
    pub n: u64,
}

/// How one forwarded delivery ended on the handler node.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AckRecord {
    /// The delivery id of [`Forwarded::id`].
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// What happened.
    #[prost(enumeration = "AckCode", tag = "2")]
    pub code: i32,
    /// Attempts made.
    #[prost(uint32, tag = "3")]
    pub attempts: u32,
    /// The last error (dead-lettered, failed) or why it was refused.
    #[prost(string, tag = "4")]
    pub error: String,
}

/// The outcome codes of [`AckRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AckCode {
    /// The handler acknowledged it.
    Ok = 0,
    /// Every attempt failed; stored as a dead letter on the handler node.
    DeadLettered = 1,
    /// Every attempt failed and the dead letter could not be stored.
    Failed = 2,
    /// Refused: the receiver holds no instance of the subscription (fencing); route it again.
    NotPlaced = 3,
}

impl From<&Event> for EventRecord {
    fn from(e: &Event) -> Self {
        EventRecord {
            id: e.id.to_string(),
            topic: e.topic.to_string(),
            key: e.key.as_ref().map(ByteString::to_string),
            data: e.data.clone(),
            content_type: e.content_type.to_string(),
            time_unix_nanos: e.time.timestamp_nanos_opt().unwrap_or(0),
            source: e.source.to_string(),
            event_type: e.event_type.to_string(),
            headers: e.headers.clone(),
            traceparent: e.trace.as_ref().map(TraceContext::traceparent),
            tracestate: e.trace.as_ref().and_then(|t| t.state.clone()),
        }
    }
}

impl From<EventRecord> for Event {
    fn from(r: EventRecord) -> Self {
        Event {
            id: r.id.into(),
            topic: r.topic.into(),
            key: r.key.map(ByteString::from),
            data: r.data,
            content_type: r.content_type.into(),
            time: DateTime::<Utc>::from_timestamp_nanos(r.time_unix_nanos),
            source: r.source.into(),
            event_type: r.event_type.into(),
            headers: r.headers,
            // Untrusted (a peer, the disk): bounded by the parser, or no context.
            trace: r
                .traceparent
                .and_then(|tp| TraceContext::parse(&tp, r.tracestate.as_deref())),
        }
    }
}

// ---- direct encoding (hot path) -------------------------------------------------------------
//
// The event plane and the WAL encode each event once, straight from `&Event` into the output
// buffer, instead of cloning it into an `EventRecord` (every string and the header map) and then
// encoding that. The bytes are exactly what prost's derived `encode` writes for the same record
// (fields in tag order, proto3 defaults skipped, map entries as prost writes them); the tests
// below compare the two on random events.

use prost::encoding::{encode_varint, encoded_len_varint};

/// Length of a length-delimited field (key + length + payload) with a payload of `len` bytes.
#[inline]
fn delimited_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

#[inline]
fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(tag, s.len())
    }
}

#[inline]
fn put_key(tag: u32, wire: u32, buf: &mut Vec<u8>) {
    encode_varint(u64::from(tag << 3 | wire), buf);
}

#[inline]
fn put_bytes_always(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
    put_key(tag, 2, buf);
    encode_varint(b.len() as u64, buf);
    buf.extend_from_slice(b);
}

#[inline]
fn put_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
    if !s.is_empty() {
        put_bytes_always(tag, s.as_bytes(), buf);
    }
}

#[inline]
fn put_u64(tag: u32, v: u64, buf: &mut Vec<u8>) {
    if v != 0 {
        put_key(tag, 0, buf);
        encode_varint(v, buf);
    }
}

fn header_entry_len(k: &str, v: &str) -> usize {
    str_len(1, k) + str_len(2, v)
}

fn time_nanos(e: &Event) -> i64 {
    e.time.timestamp_nanos_opt().unwrap_or(0)
}

/// The encoded length of the trace fields (10, 11) of `trace`.
fn trace_len(trace: Option<&TraceContext>) -> usize {
    trace.map_or(0, |t| {
        delimited_len(10, crate::event::trace::TRACEPARENT_LEN)
            + t.state.as_ref().map_or(0, |s| delimited_len(11, s.len()))
    })
}

/// The encoded length of `EventRecord::from(e)`.
pub(crate) fn event_record_len(e: &Event) -> usize {
    event_record_len_with(e, e.trace.as_ref())
}

/// [`event_record_len`] with `trace` in place of the event's own context.
fn event_record_len_with(e: &Event, trace: Option<&TraceContext>) -> usize {
    let t = time_nanos(e);
    str_len(1, &e.id)
        + str_len(2, &e.topic)
        + e.key.as_ref().map_or(0, |k| delimited_len(3, k.len()))
        + if e.data.is_empty() {
            0
        } else {
            delimited_len(4, e.data.len())
        }
        + str_len(5, &e.content_type)
        + if t == 0 { 0 } else { 1 + encoded_len_varint(t as u64) }
        + str_len(7, &e.source)
        + str_len(8, &e.event_type)
        + e.headers
            .iter()
            .map(|(k, v)| delimited_len(9, header_entry_len(k, v)))
            .sum::<usize>()
        + trace_len(trace)
}

/// Appends the encoding of `EventRecord::from(e)` (without a length prefix) to `buf`.
pub(crate) fn encode_event_record(e: &Event, buf: &mut Vec<u8>) {
    encode_event_record_with(e, e.trace.as_ref(), buf)
}

/// [`encode_event_record`] with `trace` in place of the event's own context.
fn encode_event_record_with(e: &Event, trace: Option<&TraceContext>, buf: &mut Vec<u8>) {
    put_str(1, &e.id, buf);
    put_str(2, &e.topic, buf);
    if let Some(k) = &e.key {
        put_bytes_always(3, k.as_bytes(), buf);
    }
    if !e.data.is_empty() {
        put_bytes_always(4, &e.data, buf);
    }
    put_str(5, &e.content_type, buf);
    let t = time_nanos(e);
    if t != 0 {
        put_key(6, 0, buf);
        encode_varint(t as u64, buf);
    }
    put_str(7, &e.source, buf);
    put_str(8, &e.event_type, buf);
    for (k, v) in &e.headers {
        put_key(9, 2, buf);
        encode_varint(header_entry_len(k, v) as u64, buf);
        put_str(1, k, buf);
        put_str(2, v, buf);
    }
    if let Some(t) = trace {
        // Optional fields are written even when empty (a traceparent never is).
        put_bytes_always(10, &t.traceparent_bytes(), buf);
        if let Some(state) = &t.state {
            put_bytes_always(11, state.as_bytes(), buf);
        }
    }
}

/// Appends the encoding of `WalRecord { event: Some(e.into()), groups }` to `buf`.
pub(crate) fn encode_wal_record<'a>(e: &Event, groups: impl Iterator<Item = &'a str> + Clone, buf: &mut Vec<u8>) {
    let len = event_record_len(e);
    buf.reserve(delimited_len(1, len) + groups.clone().map(|g| delimited_len(2, g.len())).sum::<usize>());
    put_key(1, 2, buf);
    encode_varint(len as u64, buf);
    encode_event_record(e, buf);
    for g in groups {
        // Repeated strings are written even when empty.
        put_bytes_always(2, g.as_bytes(), buf);
    }
}

/// Appends one `EventBatch.deliveries` entry (field 1 of [`EventBatch`], length-prefixed) holding
/// `Forwarded { id, group, epoch, event: Some(e.into()) }` to `buf`: a run of these is the body
/// of an [`EventBatch`]. The event's trace context is `trace` (the forward span's), not its own.
pub(crate) fn encode_delivery(
    id: u64,
    group: &str,
    epoch: u64,
    e: &Event,
    trace: Option<&TraceContext>,
    buf: &mut Vec<u8>,
) {
    encode_delivery_on(id, group, epoch, 0, e, trace, buf);
}

/// [`encode_delivery`] with [`Forwarded::lane`] set (an at-most-once delivery when non-zero).
pub(crate) fn encode_delivery_on(
    id: u64,
    group: &str,
    epoch: u64,
    lane: u64,
    e: &Event,
    trace: Option<&TraceContext>,
    buf: &mut Vec<u8>,
) {
    let event_len = event_record_len_with(e, trace);
    let len = if id == 0 { 0 } else { 1 + encoded_len_varint(id) }
        + str_len(2, group)
        + if epoch == 0 { 0 } else { 1 + encoded_len_varint(epoch) }
        + delimited_len(4, event_len)
        + if lane == 0 { 0 } else { 1 + encoded_len_varint(lane) };
    buf.reserve(delimited_len(1, len));
    put_key(1, 2, buf);
    encode_varint(len as u64, buf);
    put_u64(1, id, buf);
    put_str(2, group, buf);
    put_u64(3, epoch, buf);
    put_key(4, 2, buf);
    encode_varint(event_len as u64, buf);
    encode_event_record_with(e, trace, buf);
    put_u64(5, lane, buf);
}

/// A `PeerMessage { events: EventBatch }` whose batch body (a run of [`encode_delivery`]
/// entries) is the concatenation of `chunks`.
pub(crate) fn peer_message_events<'a>(chunks: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let body: usize = chunks.clone().map(<[u8]>::len).sum();
    let mut buf = Vec::with_capacity(delimited_len(1, body));
    put_key(1, 2, &mut buf);
    encode_varint(body as u64, &mut buf);
    for c in chunks {
        buf.extend_from_slice(c);
    }
    buf
}

/// Bytes kept free at the front of an [`EventsBuffer`] for the `PeerMessage` head (a key byte
/// and a length varint of up to 5 bytes, enough for 32 GiB).
const EVENTS_HEAD_ROOM: usize = 6;

/// A `PeerMessage { events: EventBatch }` being built in place: deliveries are appended with
/// [`encode_delivery`] after room for the message head, which [`EventsBuffer::finish`] fills in,
/// so the finished message is the buffer itself (no copy of the deliveries).
pub(crate) struct EventsBuffer(Vec<u8>);

impl EventsBuffer {
    /// An empty batch with room for about `capacity` bytes of deliveries.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(EVENTS_HEAD_ROOM + capacity);
        buf.resize(EVENTS_HEAD_ROOM, 0);
        EventsBuffer(buf)
    }

    /// Where deliveries are appended.
    pub(crate) fn deliveries_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// The encoded deliveries (the batch body).
    pub(crate) fn body(&self) -> &[u8] {
        &self.0[EVENTS_HEAD_ROOM..]
    }

    /// The finished `PeerMessage`.
    pub(crate) fn finish(self) -> Bytes {
        let body = self.0.len() - EVENTS_HEAD_ROOM;
        let head = 1 + encoded_len_varint(body as u64);
        if head > EVENTS_HEAD_ROOM {
            return Bytes::from(peer_message_events(std::iter::once(self.body())));
        }
        let start = EVENTS_HEAD_ROOM - head;
        let mut buf = self.0;
        let mut at = &mut buf[start..EVENTS_HEAD_ROOM];
        put_key_into(1, 2, &mut at);
        encode_varint(body as u64, &mut at);
        Bytes::from(buf).slice(start..)
    }
}

fn put_key_into(tag: u32, wire: u32, buf: &mut impl bytes::BufMut) {
    encode_varint(u64::from(tag << 3 | wire), buf);
}

/// A decoded `PeerMessage`, with an event batch left encoded (its deliveries are decoded one at
/// a time by [`Deliveries`]).
pub(crate) enum PeerBody {
    /// The body of an [`EventBatch`].
    Events(Bytes),
    Acks(AckBatch),
    DeadLetterRequest(DeadLetterRequest),
    DeadLetterResponse(DeadLetterResponse),
}

/// Splits a `PeerMessage` without decoding its event batch. The last body field wins, as with
/// prost's `oneof`; unknown fields are skipped.
pub(crate) fn decode_peer_message(mut buf: Bytes) -> Result<Option<PeerBody>, prost::DecodeError> {
    use prost::encoding::{decode_key, skip_field, DecodeContext, WireType};
    let mut body = None;
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf)?;
        match (tag, wire) {
            (1..=4, WireType::LengthDelimited) => {
                let mut field = Bytes::new();
                prost::encoding::bytes::merge(wire, &mut field, &mut buf, DecodeContext::default())?;
                body = Some(match tag {
                    1 => PeerBody::Events(field),
                    2 => PeerBody::Acks(AckBatch::decode(field)?),
                    3 => PeerBody::DeadLetterRequest(DeadLetterRequest::decode(field)?),
                    _ => PeerBody::DeadLetterResponse(DeadLetterResponse::decode(field)?),
                });
            }
            _ => skip_field(wire, tag, &mut buf, DecodeContext::default())?,
        }
    }
    Ok(body)
}

/// The next encoded delivery (field 1) of an [`EventBatch`] body, other fields skipped.
fn next_delivery<'a>(body: &mut &'a [u8]) -> Result<Option<&'a [u8]>, prost::DecodeError> {
    use prost::encoding::{decode_key, skip_field, DecodeContext, WireType};
    while !body.is_empty() {
        let (tag, wire) = decode_key(body)?;
        if tag == 1 && wire == WireType::LengthDelimited {
            return Ok(Some(length_delimited(tag, wire, body)?));
        }
        skip_field(wire, tag, body, DecodeContext::default())?;
    }
    Ok(None)
}

/// The deliveries of an encoded [`EventBatch`] body, each decoded as prost decodes a
/// [`Forwarded`] (the reference [`Incomings`] is tested against).
#[cfg(test)]
pub(crate) struct Deliveries(pub(crate) Bytes);

#[cfg(test)]
impl Iterator for Deliveries {
    type Item = Result<Forwarded, prost::DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut rest = &self.0[..];
        let next = next_delivery(&mut rest).and_then(|d| d.map(Forwarded::decode).transpose());
        let at = self.0.len() - rest.len();
        match next {
            Ok(Some(f)) => {
                self.0 = self.0.split_off(at);
                Some(Ok(f))
            }
            Ok(None) => None,
            Err(e) => {
                // Stop at the first malformed entry.
                self.0 = Bytes::new();
                Some(Err(e))
            }
        }
    }
}

// ---- direct decoding (hot path) -------------------------------------------------------------
//
// A receiving node decodes every forwarded event. prost would decode it into a `Forwarded` and
// an `EventRecord` (growing each string from empty, and taking a counted reference to the
// received buffer for every field), which the relay then moves into an `Event` and drops. Here
// each delivery is read from the received bytes as a plain slice and decoded straight into the
// `Event` the handler gets: each string allocated once at its size, and only the payload and the
// group kept as references into the buffer. The result is what prost gives for the same bytes
// (last value of a field wins, unknown fields skipped, refusals of bad UTF-8, wire types and
// lengths at the same delivery); the tests compare the two on random and damaged batches.

/// One delivery of an event batch, decoded for the relay (see [`Forwarded`] for the fields).
pub(crate) struct Incoming {
    pub(crate) id: u64,
    /// The group's bytes, checked UTF-8.
    group: Bytes,
    pub(crate) epoch: u64,
    /// Shared from the start: the handler's job holds it as it is, so the event (~300 bytes) is
    /// moved once into its allocation, not once per hand-off from the decoder to the job (the
    /// moves cost ~5 % of a receiving node at 16-byte events).
    pub(crate) event: Option<Arc<Event>>,
    pub(crate) lane: u64,
}

impl Incoming {
    /// The subscription's group.
    pub(crate) fn group(&self) -> &str {
        std::str::from_utf8(&self.group).unwrap_or_default()
    }
}

/// The deliveries of an encoded [`EventBatch`] body, decoded one at a time; the iteration ends
/// after the first malformed one (its error).
pub(crate) struct Incomings {
    body: Bytes,
    /// Where the next delivery starts.
    at: usize,
}

impl Incomings {
    pub(crate) fn new(body: Bytes) -> Self {
        Incomings { body, at: 0 }
    }
}

impl Iterator for Incomings {
    type Item = Result<Incoming, prost::DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut rest = self.body.get(self.at..).unwrap_or_default();
        let next = next_delivery(&mut rest).and_then(|d| d.map(|d| decode_incoming(&self.body, d)).transpose());
        self.at = self.body.len() - rest.len();
        match next {
            Ok(Some(f)) => Some(Ok(f)),
            Ok(None) => None,
            Err(e) => {
                self.at = self.body.len();
                Some(Err(e))
            }
        }
    }
}

/// A length-delimited field's payload (its key read: `tag`, `wire`); prost's errors for another
/// wire type or a length beyond the buffer.
fn length_delimited<'a>(
    tag: u32,
    wire: prost::encoding::WireType,
    buf: &mut &'a [u8],
) -> Result<&'a [u8], prost::DecodeError> {
    use prost::encoding::{check_wire_type, decode_varint, skip_field, DecodeContext, WireType};
    check_wire_type(WireType::LengthDelimited, wire)?;
    let before = *buf;
    let len = decode_varint(buf)?;
    if len > buf.len() as u64 {
        // prost's own error, from skipping the same field.
        let mut again = before;
        return Err(skip_field(wire, tag, &mut again, DecodeContext::default())
            .expect_err("prost skipped a field longer than its buffer"));
    }
    let (field, rest) = buf.split_at(len as usize);
    *buf = rest;
    Ok(field)
}

/// A varint field (its key read: `wire`); prost's error for another wire type.
fn varint(wire: prost::encoding::WireType, buf: &mut &[u8]) -> Result<u64, prost::DecodeError> {
    let mut v = 0;
    prost::encoding::uint64::merge(wire, &mut v, buf, prost::encoding::DecodeContext::default())?;
    Ok(v)
}

/// A string field's bytes as text; prost's error when they are not UTF-8.
fn utf8(field: &[u8]) -> Result<&str, prost::DecodeError> {
    std::str::from_utf8(field).map_err(|_| {
        // prost's own error, from decoding the same field as a string.
        let mut again = Vec::with_capacity(field.len() + 10);
        encode_varint(field.len() as u64, &mut again);
        again.extend_from_slice(field);
        let mut text = String::new();
        let ctx = prost::encoding::DecodeContext::default();
        match prost::encoding::string::merge(
            prost::encoding::WireType::LengthDelimited,
            &mut text,
            &mut again.as_slice(),
            ctx,
        ) {
            Err(e) => e,
            Ok(()) => unreachable!("prost accepted bytes that are not UTF-8"),
        }
    })
}

/// A string field as text that shares `origin` (`field` is a slice of it); prost's error when it
/// is not UTF-8.
fn text_of(origin: &Bytes, field: &[u8]) -> Result<ByteString, prost::DecodeError> {
    // The usual content type and source are static text: sharing them costs no reference count.
    for known in [crate::event::JSON, crate::event::DEFAULT_SOURCE] {
        if field == known.as_bytes() {
            return Ok(ByteString::from_static(known));
        }
    }
    ByteString::try_from(origin.slice_ref(field)).map_err(|_| match utf8(field) {
        Err(e) => e,
        Ok(_) => unreachable!("the same bytes are UTF-8 for one check and not the other"),
    })
}

/// One delivery, `buf` a slice of `origin` (the payload and the group are kept as slices of it).
fn decode_incoming(origin: &Bytes, mut buf: &[u8]) -> Result<Incoming, prost::DecodeError> {
    use prost::encoding::{decode_key, skip_field, DecodeContext};
    let mut d = Incoming {
        id: 0,
        group: Bytes::new(),
        epoch: 0,
        event: None,
        lane: 0,
    };
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf)?;
        match tag {
            1 | 3 | 5 => {
                let v = varint(wire, &mut buf)?;
                match tag {
                    1 => d.id = v,
                    3 => d.epoch = v,
                    _ => d.lane = v,
                }
            }
            2 => {
                let group = length_delimited(tag, wire, &mut buf)?;
                utf8(group)?;
                d.group = origin.slice_ref(group);
            }
            4 => {
                let field = length_delimited(tag, wire, &mut buf)?;
                // A repeated message field merges into the one before, as prost does.
                // The `Arc` is this delivery's own until it is returned.
                let mut record = DecodedEvent::from(d.event.take().and_then(Arc::into_inner));
                record.merge(origin, field)?;
                d.event = Some(Arc::new(record.finish()));
            }
            _ => skip_field(wire, tag, &mut buf, DecodeContext::default())?,
        }
    }
    Ok(d)
}

/// An [`EventRecord`] being decoded into an [`Event`]: the trace context stays text until the
/// record is complete (as `From<EventRecord>` parses it).
struct DecodedEvent {
    event: Event,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl From<Option<Event>> for DecodedEvent {
    fn from(event: Option<Event>) -> Self {
        match event {
            None => DecodedEvent {
                event: Event {
                    id: ByteString::new(),
                    topic: ByteString::new(),
                    key: None,
                    data: Bytes::new(),
                    content_type: ByteString::new(),
                    time: DateTime::<Utc>::from_timestamp_nanos(0),
                    source: ByteString::new(),
                    event_type: ByteString::new(),
                    headers: BTreeMap::new(),
                    trace: None,
                },
                traceparent: None,
                tracestate: None,
            },
            Some(mut event) => {
                // Merging again: the context is re-encoded text, as prost would hold it.
                let trace = event.trace.take();
                DecodedEvent {
                    traceparent: trace.as_ref().map(TraceContext::traceparent),
                    tracestate: trace.and_then(|t| t.state),
                    event,
                }
            }
        }
    }
}

impl DecodedEvent {
    /// Merges the record in `buf`, a slice of `origin`.
    fn merge(&mut self, origin: &Bytes, mut buf: &[u8]) -> Result<(), prost::DecodeError> {
        use prost::encoding::{decode_key, skip_field, DecodeContext};
        let e = &mut self.event;
        while !buf.is_empty() {
            let (tag, wire) = decode_key(&mut buf)?;
            if tag == 6 {
                let mut nanos = 0i64;
                prost::encoding::int64::merge(wire, &mut nanos, &mut buf, DecodeContext::default())?;
                e.time = DateTime::<Utc>::from_timestamp_nanos(nanos);
                continue;
            }
            if !(1..=11).contains(&tag) {
                skip_field(wire, tag, &mut buf, DecodeContext::default())?;
                continue;
            }
            let field = length_delimited(tag, wire, &mut buf)?;
            match tag {
                4 => e.data = origin.slice_ref(field),
                9 => {
                    let (k, v) = map_entry(field)?;
                    e.headers.insert(k, v);
                }
                // The event's text: slices of the received buffer, as the payload is, not a copy
                // each (and the events of a batch share one topic, source, type and content type).
                1 | 2 | 3 | 5 | 7 | 8 => {
                    let text = text_of(origin, field)?;
                    match tag {
                        1 => e.id = text,
                        2 => e.topic = text,
                        3 => e.key = Some(text),
                        5 => e.content_type = text,
                        7 => e.source = text,
                        _ => e.event_type = text,
                    }
                }
                _ => {
                    let text = utf8(field)?.to_owned();
                    match tag {
                        10 => self.traceparent = Some(text),
                        _ => self.tracestate = Some(text),
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> Event {
        let DecodedEvent {
            mut event,
            traceparent,
            tracestate,
        } = self;
        // Untrusted (a peer): bounded by the parser, or no context.
        event.trace = traceparent.and_then(|tp| TraceContext::parse(&tp, tracestate.as_deref()));
        event
    }
}

/// A `map<string, string>` entry: key (1) and value (2), missing ones empty.
fn map_entry(mut buf: &[u8]) -> Result<(String, String), prost::DecodeError> {
    use prost::encoding::{decode_key, skip_field, DecodeContext};
    let (mut k, mut v) = (String::new(), String::new());
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf)?;
        match tag {
            1 | 2 => {
                let text = utf8(length_delimited(tag, wire, &mut buf)?)?.to_owned();
                if tag == 1 {
                    k = text;
                } else {
                    v = text;
                }
            }
            _ => skip_field(wire, tag, &mut buf, DecodeContext::default())?,
        }
    }
    Ok((k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_round_trips_through_the_record() {
        let mut e = Event::json("a.b", &serde_json::json!({"x": 1})).unwrap().with_key("k");
        e.headers.insert("h".into(), "v".into());
        let bytes = EventRecord::from(&e).encode_to_vec();
        let back: Event = EventRecord::decode(bytes.as_slice()).unwrap().into();
        assert_eq!(back, e);
    }
    fn random_event(rng: &mut impl rand::Rng) -> Event {
        let s = |rng: &mut dyn rand::RngCore, max: usize| -> String {
            let n = rand::Rng::random_range(rng, 0..=max);
            (0..n)
                .map(|_| char::from_u32(rand::Rng::random_range(rng, 0x20..0x3000)).unwrap_or('x'))
                .collect()
        };
        let mut e = Event::new(
            s(rng, 30),
            Bytes::from(
                (0..rng.random_range(0..300))
                    .map(|_| rng.random::<u8>())
                    .collect::<Vec<u8>>(),
            ),
            &s(rng, 20),
        );
        e.id = s(rng, 40).into();
        e.key = rng.random_bool(0.5).then(|| s(rng, 10).into());
        e.source = s(rng, 10).into();
        e.event_type = s(rng, 10).into();
        e.time = match rng.random_range(0..4) {
            0 => DateTime::<Utc>::from_timestamp_nanos(0),
            1 => DateTime::<Utc>::from_timestamp_nanos(-rng.random_range(1..i64::MAX / 2)),
            _ => DateTime::<Utc>::from_timestamp_nanos(rng.random_range(1..i64::MAX / 2)),
        };
        for _ in 0..rng.random_range(0..4) {
            e.headers.insert(s(rng, 8), s(rng, 8));
        }
        if rng.random_bool(0.5) {
            let mut t = TraceContext::new(rng.random::<[u8; 16]>(), rng.random::<[u8; 8]>(), rng.random())
                .expect("random ids are not zero");
            t.state = rng.random_bool(0.5).then(|| format!("k{}=v", rng.random::<u16>()));
            e.trace = Some(t);
        }
        e
    }

    #[test]
    fn a_forwarded_frame_carries_the_given_trace_context_and_the_wal_the_events_own() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let e = Event::new("t", "x", "text/plain").with_trace(TraceContext::parse(tp, Some("a=b")));
        let forward = e.trace.as_ref().unwrap().child([7; 8]);
        let mut buf = Vec::new();
        encode_delivery(1, "g", 1, &e, Some(&forward), &mut buf);
        let message = peer_message_events(std::iter::once(buf.as_slice()));
        let Ok(Some(PeerBody::Events(body))) = decode_peer_message(Bytes::from(message)) else {
            panic!("not an event batch");
        };
        let got: Vec<Forwarded> = Deliveries(body).collect::<Result<_, _>>().unwrap();
        let back = Event::from(got[0].event.clone().unwrap());
        assert_eq!(back.trace, Some(forward));
        let mut wal = Vec::new();
        encode_wal_record(&e, std::iter::once("g"), &mut wal);
        let back: Event = WalRecord::decode(wal.as_slice()).unwrap().event.unwrap().into();
        assert_eq!(back.trace, e.trace);
        // A malformed or oversized context from a peer or the disk is no context.
        for (tp, ts) in [("00-zz", None), (tp, Some("x".repeat(4096)))] {
            let record = EventRecord {
                traceparent: Some(tp.to_string()),
                tracestate: ts.clone(),
                ..EventRecord::from(&e)
            };
            let back = Event::from(EventRecord::decode(record.encode_to_vec().as_slice()).unwrap());
            match ts {
                None => assert_eq!(back.trace, None),
                Some(_) => assert_eq!(back.trace.unwrap().state, None),
            }
        }
    }

    #[test]
    fn direct_encoding_is_byte_identical_to_prost() {
        use rand::{Rng, SeedableRng};
        let seed = rand::random::<u64>();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..2000 {
            let e = random_event(&mut rng);
            let record = EventRecord::from(&e);
            let mut direct = Vec::new();
            encode_event_record(&e, &mut direct);
            assert_eq!(direct, record.encode_to_vec(), "seed {seed}: {e:?}");
            assert_eq!(event_record_len(&e), record.encoded_len(), "seed {seed}");

            let groups: Vec<String> = (0..rng.random_range(0..3))
                .map(|i| if i == 1 { String::new() } else { format!("g{i}") })
                .collect();
            let mut wal = Vec::new();
            encode_wal_record(&e, groups.iter().map(String::as_str), &mut wal);
            let expect = WalRecord {
                event: Some(record.clone()),
                groups: groups.clone(),
            };
            assert_eq!(wal, expect.encode_to_vec(), "seed {seed}");

            let id = if rng.random_bool(0.1) { 0 } else { rng.random() };
            let epoch = if rng.random_bool(0.1) { 0 } else { rng.random() };
            let group = if rng.random_bool(0.1) {
                String::new()
            } else {
                format!("grp{}", rng.random::<u16>())
            };
            let forwarded = Forwarded {
                id,
                group: group.clone(),
                epoch,
                event: Some(record.clone()),
                lane: 0,
            };
            let lane = if rng.random_bool(0.5) { 0 } else { rng.random() };
            let mut on_lane = Vec::new();
            encode_delivery_on(0, &group, epoch, lane, &e, e.trace.as_ref(), &mut on_lane);
            let expect = EventBatch {
                deliveries: vec![Forwarded {
                    id: 0,
                    group: group.clone(),
                    epoch,
                    event: Some(record),
                    lane,
                }],
            };
            assert_eq!(on_lane, expect.encode_to_vec(), "seed {seed}");
            let mut a = Vec::new();
            encode_delivery(id, &group, epoch, &e, e.trace.as_ref(), &mut a);
            let mut b = Vec::new();
            encode_delivery(1, "x", 2, &e, e.trace.as_ref(), &mut b);
            let batch = EventBatch {
                deliveries: vec![
                    forwarded.clone(),
                    Forwarded {
                        id: 1,
                        group: "x".into(),
                        epoch: 2,
                        event: Some(EventRecord::from(&e)),
                        lane: 0,
                    },
                ],
            };
            let message = PeerMessage {
                body: Some(peer_message::Body::Events(batch)),
            };
            let direct = peer_message_events([a.as_slice(), b.as_slice()].into_iter());
            assert_eq!(direct, message.encode_to_vec(), "seed {seed}");
            let mut in_place = EventsBuffer::with_capacity(0);
            in_place.deliveries_mut().extend_from_slice(&a);
            in_place.deliveries_mut().extend_from_slice(&b);
            assert_eq!(in_place.body(), &direct[direct.len() - a.len() - b.len()..]);
            assert_eq!(&in_place.finish()[..], &direct[..], "seed {seed}");

            // And back, lazily.
            let Ok(Some(PeerBody::Events(body))) = decode_peer_message(Bytes::from(direct)) else {
                panic!("seed {seed}: not an event batch");
            };
            let back: Vec<Forwarded> = Deliveries(body.clone()).collect::<Result<_, _>>().unwrap();
            assert_eq!(back.len(), 2);
            assert_eq!(back[0], forwarded, "seed {seed}");
            assert_eq!(Event::from(back[1].event.clone().unwrap()), e);
            same_decoding(&body, &format!("seed {seed}"));
            // Damaged batches: both decoders give the same deliveries and fail at the same one.
            for _ in 0..8 {
                let mut bad = body.to_vec();
                match rng.random_range(0..3) {
                    0 => bad.truncate(rng.random_range(0..=bad.len())),
                    1 if !bad.is_empty() => {
                        let i = rng.random_range(0..bad.len());
                        bad[i] = rng.random();
                    }
                    _ => bad
                        .splice(
                            rng.random_range(0..=bad.len())..,
                            (0..rng.random_range(0..8))
                                .map(|_| rng.random::<u8>())
                                .collect::<Vec<_>>(),
                        )
                        .for_each(drop),
                }
                same_decoding(&Bytes::from(bad), &format!("seed {seed}, damaged"));
            }
        }
    }

    #[test]
    fn received_events_share_their_text_with_the_frame_and_known_values_are_not_slices() {
        let e = Event::json("orders.eu", &serde_json::json!({"n": 1})).unwrap();
        let mut body = Vec::new();
        encode_delivery(1, "g", 1, &e, None, &mut body);
        encode_delivery(
            2,
            "g",
            1,
            &e.clone().with_id("second").with_key("user-7"),
            None,
            &mut body,
        );
        let body = Bytes::from(body);
        let frame = body.as_ptr_range();
        let inside = |t: &str| frame.contains(&t.as_ptr());
        let events: Vec<Arc<Event>> = Incomings::new(body.clone())
            .map(|d| d.unwrap().event.expect("an event"))
            .collect();
        assert_eq!(events.len(), 2);
        for got in &events {
            assert_eq!((&*got.topic, &*got.event_type), ("orders.eu", "orders.eu"));
            assert!(
                inside(&got.topic) && inside(&got.event_type),
                "topic and type are slices of the frame"
            );
            assert_eq!(
                (&*got.content_type, &*got.source),
                (crate::event::JSON, crate::event::DEFAULT_SOURCE)
            );
            assert!(
                !inside(&got.content_type) && !inside(&got.source),
                "the usual content type and the default source are static text, not slices"
            );
            assert!(inside(&got.id), "the id is a slice of the frame");
        }
        assert_eq!((&*events[0].id, &*events[1].id), (&*e.id, "second"));
        let key = events[1].key.as_ref().expect("the second event's key");
        assert!(key == "user-7" && inside(key), "the key is a slice of the frame");
    }

    /// The relay's direct decoding of a batch body gives what prost's does.
    fn same_decoding(body: &Bytes, context: &str) {
        let reference: Vec<_> = Deliveries(body.clone()).collect();
        let direct: Vec<_> = Incomings::new(body.clone()).collect();
        assert_eq!(reference.len(), direct.len(), "{context}");
        for (r, d) in reference.into_iter().zip(direct) {
            match (r, d) {
                (Ok(r), Ok(d)) => {
                    assert_eq!(
                        (r.id, r.group.as_str(), r.epoch, r.lane),
                        (d.id, d.group(), d.epoch, d.lane),
                        "{context}"
                    );
                    assert_eq!(r.event.map(Event::from), d.event.map(Arc::unwrap_or_clone), "{context}");
                }
                // Refused alike (the wording may differ: prost names the field path, and reports
                // a field running past its message as "delimited length exceeded").
                (Err(_), Err(_)) => {}
                (r, d) => panic!("{context}: prost {:?}, direct {:?}", r.map(|_| ()), d.map(|_| ())),
            }
        }
    }

    fn arbitrary_event() -> impl proptest::strategy::Strategy<Value = Event> {
        use proptest::prelude::*;
        let text = || proptest::collection::vec(any::<char>(), 0..16).prop_map(String::from_iter);
        (
            (text(), text(), proptest::option::of(text())),
            proptest::collection::vec(any::<u8>(), 0..64),
            (text(), any::<i64>(), text(), text()),
            proptest::collection::btree_map(text(), text(), 0..4),
            proptest::option::of((
                any::<[u8; 16]>(),
                any::<[u8; 8]>(),
                any::<u8>(),
                proptest::option::of("[a-z]{1,8}=[a-z0-9]{0,8}"),
            )),
        )
            .prop_map(
                |((id, topic, key), data, (content_type, nanos, source, event_type), headers, trace)| {
                    let mut e = Event::new(topic, data, &content_type);
                    e.id = id.into();
                    e.key = key.map(Into::into);
                    e.time = DateTime::<Utc>::from_timestamp_nanos(nanos);
                    e.source = source.into();
                    e.event_type = event_type.into();
                    e.headers = headers;
                    e.trace = trace
                        .and_then(|(t, s, f, state)| TraceContext::new(t, s, f).map(|c| TraceContext { state, ..c }));
                    e
                },
            )
    }

    proptest::proptest! {
        /// The direct (hot path) WAL and delivery encoders write exactly prost's bytes for any
        /// event, and the lazy peer-message decoder reads them back.
        #[test]
        fn direct_encoders_match_prost_for_any_event(e in arbitrary_event(),
                                                     groups in proptest::collection::vec("\\PC{0,6}", 0..3),
                                                     id: u64, epoch: u64, lane: u64) {
            let record = EventRecord::from(&e);
            let mut wal = Vec::new();
            encode_wal_record(&e, groups.iter().map(String::as_str), &mut wal);
            let expect = WalRecord { event: Some(record.clone()), groups };
            proptest::prop_assert_eq!(&wal, &expect.encode_to_vec());
            let back: Event = WalRecord::decode(wal.as_slice()).unwrap().event.unwrap().into();
            proptest::prop_assert_eq!(&back, &e);

            let mut delivery = Vec::new();
            encode_delivery_on(id, "g", epoch, lane, &e, e.trace.as_ref(), &mut delivery);
            let message = peer_message_events(std::iter::once(delivery.as_slice()));
            let Ok(Some(PeerBody::Events(body))) = decode_peer_message(Bytes::from(message)) else {
                return Err(proptest::test_runner::TestCaseError::fail("not an event batch"));
            };
            let got: Vec<Forwarded> = Deliveries(body).collect::<Result<_, _>>().unwrap();
            let sent = Forwarded { id, group: "g".into(), epoch, event: Some(record), lane };
            proptest::prop_assert_eq!(got, vec![sent]);
        }

        /// The lazy peer-message decoder takes any bytes without panicking, and where prost
        /// decodes a `PeerMessage` it decodes the same body.
        #[test]
        fn lazy_peer_message_decoding_takes_any_bytes(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let lazy = decode_peer_message(Bytes::from(b.clone()));
            if let Ok(Some(PeerBody::Events(body))) = &lazy {
                for f in Deliveries(body.clone()).flatten() {
                    let _ = f.event.map(Event::from);
                }
            }
            if let (Ok(m), Ok(lazy)) = (PeerMessage::decode(b.as_slice()), lazy) {
                match (m.body, lazy) {
                    (None, None) => {}
                    (Some(peer_message::Body::Acks(a)), Some(PeerBody::Acks(l))) => proptest::prop_assert_eq!(a, l),
                    (Some(peer_message::Body::DeadLetterRequest(a)), Some(PeerBody::DeadLetterRequest(l))) => {
                        proptest::prop_assert_eq!(a, l)
                    }
                    (Some(peer_message::Body::DeadLetterResponse(a)), Some(PeerBody::DeadLetterResponse(l))) => {
                        proptest::prop_assert_eq!(a, l)
                    }
                    (Some(peer_message::Body::Events(_)), Some(PeerBody::Events(_))) => {}
                    (a, _) => proptest::prop_assert!(false, "prost decoded {a:?}, the lazy decoder another body"),
                }
            }
        }
    }

    #[test]
    fn events_buffers_finish_in_place_for_every_head_length() {
        // Bodies whose length varint takes 1, 2 and 3 bytes.
        for body_len in [0usize, 100, 300, 20_000, 3_000_000] {
            let body = vec![0x5au8; body_len];
            let mut buf = EventsBuffer::with_capacity(body_len);
            buf.deliveries_mut().extend_from_slice(&body);
            let finished = buf.finish();
            assert_eq!(
                &finished[..],
                &peer_message_events(std::iter::once(body.as_slice()))[..]
            );
        }
    }

    #[test]
    fn peer_messages_split_like_prost() {
        let acks = PeerMessage {
            body: Some(peer_message::Body::Acks(AckBatch {
                acks: vec![AckRecord {
                    id: 7,
                    code: AckCode::NotPlaced as i32,
                    attempts: 0,
                    error: "x".into(),
                }],
                credits: vec![LaneCredit { lane: 3, n: 9 }],
            })),
        };
        match decode_peer_message(Bytes::from(acks.encode_to_vec())).unwrap() {
            Some(PeerBody::Acks(a)) => assert_eq!(Some(peer_message::Body::Acks(a)), acks.body),
            _ => panic!("not acks"),
        }
        assert!(decode_peer_message(Bytes::new()).unwrap().is_none());
        assert!(decode_peer_message(Bytes::from_static(&[0x0a, 0x05, 0x00])).is_err());
        let empty = PeerMessage {
            body: Some(peer_message::Body::Events(EventBatch::default())),
        };
        match decode_peer_message(Bytes::from(empty.encode_to_vec())).unwrap() {
            Some(PeerBody::Events(b)) => assert_eq!(Deliveries(b).count(), 0),
            _ => panic!("not events"),
        }
        let request = DeadLetterRequest {
            id: 42,
            kind: Some(dead_letter_request::Kind::List(ListDeadLetters {
                after: Some("01J".into()),
                limit: 10,
                topic: None,
                group: Some("g".into()),
            })),
        };
        let m = PeerMessage {
            body: Some(peer_message::Body::DeadLetterRequest(request.clone())),
        };
        match decode_peer_message(Bytes::from(m.encode_to_vec())).unwrap() {
            Some(PeerBody::DeadLetterRequest(r)) => assert_eq!(r, request),
            _ => panic!("not a dead-letter request"),
        }
        let response = DeadLetterResponse {
            id: 42,
            status: DeadLetterStatus::Ok as i32,
            entries: vec![StoredDeadLetter {
                id: "01J1".into(),
                record: Some(DeadLetterRecord::default()),
            }],
            truncated: true,
            ..Default::default()
        };
        let m = PeerMessage {
            body: Some(peer_message::Body::DeadLetterResponse(response.clone())),
        };
        match decode_peer_message(Bytes::from(m.encode_to_vec())).unwrap() {
            Some(PeerBody::DeadLetterResponse(r)) => assert_eq!(r, response),
            _ => panic!("not a dead-letter response"),
        }
    }
}
