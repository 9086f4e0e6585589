//! Property-based fuzzing (proptest, stable Rust) of every reader of untrusted bytes: the peer
//! frame decoder, every prost message (peer wire, event plane, WAL and dead-letter records, Raft
//! commands and raft-rs's own messages), CloudEvents parsing, and the HTTP publish and
//! subscription routes of an in-process node driven with arbitrary bodies and headers.
//!
//! The properties: nothing panics; a decoder answers an error or a value that encodes and decodes
//! back to itself; frames split anywhere decode to what was sent; HTTP never answers 5xx (and
//! always answers).
//!
//! Each property runs proptest's default number of cases (256, or `PROPTEST_CASES`), which keeps
//! CI fast; `HERALD_FUZZ_CASES=<n>` runs `n` cases of each instead, e.g.
//! `HERALD_FUZZ_CASES=20000 cargo test --test fuzz`. A failure is shrunk to a minimal input and
//! printed; proptest's seed file (`tests/fuzz.proptest-regressions`) replays it first next time.

mod common;

use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use bytes::{Bytes, BytesMut};
use herald::event::Event;
use herald::membership::state as cmd;
use herald::proto;
use herald::transport::frame::{self, FrameCodec, HANDSHAKE_MAX_FRAME_LEN};
use herald::transport::wire::{self, envelope::Body, Envelope, Handshake};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message;
use serde_json::{json, Value};
use tokio_util::codec::Decoder;

/// proptest's configuration, with `HERALD_FUZZ_CASES` overriding the number of cases.
fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if let Some(n) = std::env::var("HERALD_FUZZ_CASES").ok().and_then(|v| v.parse().ok()) {
        c.cases = n;
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Inputs: arbitrary bytes, and protobuf-shaped bytes that get past the first byte of a decoder
// ---------------------------------------------------------------------------------------------

/// One protobuf field of any wire type, nested messages and groups included.
#[derive(Debug, Clone)]
enum Field {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Fixed32(u32, u32),
    Delimited(u32, Vec<u8>),
    Message(u32, Vec<Field>),
    Group(u32, Vec<Field>),
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(tag: u32, wire: u64, out: &mut Vec<u8>) {
    put_varint(u64::from(tag) << 3 | wire, out);
}

fn encode_fields(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        match f {
            Field::Varint(t, v) => {
                put_key(*t, 0, out);
                put_varint(*v, out);
            }
            Field::Fixed64(t, v) => {
                put_key(*t, 1, out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Field::Fixed32(t, v) => {
                put_key(*t, 5, out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Field::Delimited(t, b) => {
                put_key(*t, 2, out);
                put_varint(b.len() as u64, out);
                out.extend_from_slice(b);
            }
            Field::Message(t, inner) => {
                let mut body = Vec::new();
                encode_fields(inner, &mut body);
                put_key(*t, 2, out);
                put_varint(body.len() as u64, out);
                out.extend_from_slice(&body);
            }
            Field::Group(t, inner) => {
                put_key(*t, 3, out);
                encode_fields(inner, out);
                put_key(*t, 4, out);
            }
        }
    }
}

/// Field tags: mostly the small ones messages use, sometimes any.
fn tag() -> impl Strategy<Value = u32> {
    prop_oneof![12 => 1u32..=12, 1 => 1u32..(1 << 29)]
}

fn varint() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..4, 2 => any::<u64>(), 1 => Just(u64::MAX), 1 => 0u64..300]
}

/// Text (so that string fields decode) or any bytes.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(any::<char>(), 0..12).prop_map(|c| c.into_iter().collect::<String>().into_bytes()),
        1 => vec(any::<u8>(), 0..24),
    ]
}

fn fields() -> impl Strategy<Value = Vec<Field>> {
    let leaf = prop_oneof![
        (tag(), varint()).prop_map(|(t, v)| Field::Varint(t, v)),
        (tag(), any::<u64>()).prop_map(|(t, v)| Field::Fixed64(t, v)),
        (tag(), any::<u32>()).prop_map(|(t, v)| Field::Fixed32(t, v)),
        (tag(), payload()).prop_map(|(t, v)| Field::Delimited(t, v)),
    ];
    let field = leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            2 => inner.clone(),
            3 => (tag(), vec(inner.clone(), 0..6)).prop_map(|(t, f)| Field::Message(t, f)),
            1 => (tag(), vec(inner, 0..3)).prop_map(|(t, f)| Field::Group(t, f)),
        ]
    });
    vec(field, 0..8)
}

/// Bytes a decoder may meet: random, protobuf-shaped, or protobuf-shaped and then damaged
/// (truncated or with one byte overwritten).
fn untrusted_bytes() -> impl Strategy<Value = Vec<u8>> {
    let shaped = || {
        fields().prop_map(|f| {
            let mut out = Vec::new();
            encode_fields(&f, &mut out);
            out
        })
    };
    prop_oneof![
        2 => vec(any::<u8>(), 0..200),
        4 => shaped(),
        2 => (shaped(), any::<Index>(), any::<u8>(), any::<bool>()).prop_map(|(mut b, at, byte, cut)| {
            if !b.is_empty() {
                let i = at.index(b.len());
                if cut {
                    b.truncate(i);
                } else {
                    b[i] = byte;
                }
            }
            b
        }),
        // Deep nesting: groups and messages opened far deeper than any schema (recursion limits).
        1 => (1usize..2000, any::<bool>()).prop_map(|(depth, groups)| {
            let mut b = Vec::new();
            for _ in 0..depth {
                if groups {
                    put_key(1, 3, &mut b);
                } else {
                    // An unterminated nest of length-delimited fields claiming huge lengths.
                    put_key(2, 2, &mut b);
                    put_varint(u64::from(u32::MAX), &mut b);
                }
            }
            b
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Every prost message
// ---------------------------------------------------------------------------------------------

macro_rules! decode_check {
    ($name:ident, $trait:path) => {
        /// Decoding `bytes` does not panic; what it decodes encodes to `encoded_len` bytes that
        /// decode back to the same value.
        fn $name<M: $trait + Default + PartialEq + Debug>(bytes: &[u8]) -> Result<Option<M>, TestCaseError> {
            let Ok(m) = M::decode(bytes) else {
                return Ok(None);
            };
            let again = m.encode_to_vec();
            prop_assert_eq!(
                again.len(),
                m.encoded_len(),
                "{}: encoded_len",
                std::any::type_name::<M>()
            );
            match M::decode(again.as_slice()) {
                Ok(back) => prop_assert_eq!(&back, &m, "{} does not round-trip", std::any::type_name::<M>()),
                Err(e) => prop_assert!(
                    false,
                    "{} re-encoded does not decode: {e}",
                    std::any::type_name::<M>()
                ),
            }
            Ok(Some(m))
        }
    };
}

decode_check!(herald_message, prost::Message);
decode_check!(raft_message, raft_prost::Message);

/// Every prost message of the peer wire, the event plane, the WAL and dead-letter records and the
/// Raft commands; and raft-rs's messages, which are decoded from peer bytes too.
fn check_every_message(b: &[u8]) -> Result<(), TestCaseError> {
    herald_message::<Envelope>(b)?;
    herald_message::<wire::Ping>(b)?;
    herald_message::<wire::Pong>(b)?;
    herald_message::<wire::Proposal>(b)?;
    herald_message::<wire::ProposalResult>(b)?;
    herald_message::<Handshake>(b)?;
    herald_message::<wire::Hello>(b)?;
    herald_message::<wire::Refusal>(b)?;
    herald_message::<wire::Accepted>(b)?;

    if let Some(r) = herald_message::<proto::EventRecord>(b)? {
        // A stored or forwarded record becomes an event without panicking.
        let _ = Event::from(r);
    }
    if let Some(w) = herald_message::<proto::WalRecord>(b)? {
        let _ = w.event.map(Event::from);
    }
    herald_message::<proto::DeadLetterRecord>(b)?;
    herald_message::<proto::PeerMessage>(b)?;
    herald_message::<proto::DeadLetterRequest>(b)?;
    herald_message::<proto::ListDeadLetters>(b)?;
    herald_message::<proto::ReplayDeadLetter>(b)?;
    herald_message::<proto::DeadLetterResponse>(b)?;
    herald_message::<proto::StoredDeadLetter>(b)?;
    herald_message::<proto::EventBatch>(b)?;
    if let Some(f) = herald_message::<proto::Forwarded>(b)? {
        let _ = f.event.map(Event::from);
    }
    herald_message::<proto::AckBatch>(b)?;
    herald_message::<proto::LaneCredit>(b)?;
    herald_message::<proto::AckRecord>(b)?;

    herald_message::<cmd::Command>(b)?;
    herald_message::<cmd::NodeRecord>(b)?;
    herald_message::<cmd::NodeRef>(b)?;
    herald_message::<cmd::SubscriptionRecord>(b)?;
    herald_message::<cmd::SubscriptionRef>(b)?;
    herald_message::<cmd::PlacementRecord>(b)?;
    herald_message::<cmd::PlacementEntry>(b)?;
    herald_message::<cmd::MemberRecord>(b)?;
    herald_message::<cmd::SnapshotRecord>(b)?;

    use raft::eraftpb;
    raft_message::<eraftpb::Message>(b)?;
    raft_message::<eraftpb::Entry>(b)?;
    raft_message::<eraftpb::Snapshot>(b)?;
    raft_message::<eraftpb::HardState>(b)?;
    raft_message::<eraftpb::ConfState>(b)?;
    raft_message::<eraftpb::ConfChange>(b)?;
    raft_message::<eraftpb::ConfChangeV2>(b)?;
    Ok(())
}

// Structured values, for round trips from the value side.

fn text(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..=max).prop_map(|c| c.into_iter().collect())
}

fn data() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        6 => vec(any::<u8>(), 0..64).prop_map(Bytes::from),
        // At least frame::ZERO_COPY_MIN: framed without a copy.
        1 => (frame::ZERO_COPY_MIN..frame::ZERO_COPY_MIN + 300, any::<u8>()).prop_map(|(n, b)| Bytes::from(vec![b; n])),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    prop_oneof![
        Just(Envelope::default()),
        data().prop_map(Envelope::raft),
        data().prop_map(Envelope::app),
        (any::<u64>(), any::<i64>()).prop_map(|(s, t)| Envelope::ping(s, t)),
        (any::<u64>(), any::<i64>(), any::<u64>(), any::<u64>()).prop_map(
            |(seq, sent_unix_nanos, handled, backlog)| {
                Envelope::new(Body::Pong(wire::Pong {
                    seq,
                    sent_unix_nanos,
                    handled,
                    backlog,
                }))
            }
        ),
        (any::<u64>(), data(), any::<u64>())
            .prop_map(|(id, command, origin)| Envelope::new(Body::Propose(wire::Proposal { id, command, origin }))),
        (any::<u64>(), text(20))
            .prop_map(|(id, error)| Envelope::new(Body::ProposeResult(wire::ProposalResult { id, error }))),
    ]
}

/// Any event whose time is representable (as every accepted event's is).
fn event() -> impl Strategy<Value = Event> {
    (
        (text(30), text(20), proptest::option::of(text(10)), data(), text(20)),
        (any::<i64>(), text(10), text(10), vec((text(8), text(8)), 0..4)),
    )
        .prop_map(
            |((id, topic, key, data, content_type), (nanos, source, event_type, headers))| {
                let mut e = Event::new(topic, data, &content_type);
                e.id = id.into();
                e.key = key.map(Into::into);
                e.time = chrono::DateTime::from_timestamp_nanos(nanos);
                e.source = source.into();
                e.event_type = event_type.into();
                e.headers = headers.into_iter().collect();
                e
            },
        )
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary and protobuf-shaped bytes: every message decodes them without panicking, and
    /// what decodes round-trips.
    #[test]
    fn every_message_decodes_untrusted_bytes_and_round_trips(bytes in untrusted_bytes()) {
        check_every_message(&bytes)?;
    }

    /// From the value side: envelopes, handshakes and events encode and decode to themselves.
    #[test]
    fn messages_round_trip_from_values(env in envelope(), e in event(), groups in vec(text(8), 0..3),
                                       cluster in text(12), node in any::<u64>(), channel in 0i32..3) {
        prop_assert_eq!(Envelope::decode(env.encode_to_vec().as_slice()).ok(), Some(env));
        let hello = Handshake { step: Some(wire::handshake::Step::Hello(wire::Hello {
            cluster_id: cluster, node_id: node, peer_addr: "127.0.0.1:1".into(),
            protocol_version: wire::PROTOCOL_VERSION, channel,
        })) };
        prop_assert_eq!(Handshake::decode(hello.encode_to_vec().as_slice()).ok(), Some(hello));
        // The WAL record: an event and its groups come back exactly.
        let wal = proto::WalRecord { event: Some(proto::EventRecord::from(&e)), groups };
        let back = proto::WalRecord::decode(wal.encode_to_vec().as_slice());
        prop_assert_eq!(back.as_ref().ok(), Some(&wal));
        let back: Event = back.unwrap().event.unwrap().into();
        prop_assert_eq!(back, e);
    }

    /// Frames written back to back and read in arbitrary pieces decode to what was sent, with
    /// either writer (copying or zero-copy).
    #[test]
    fn frames_split_anywhere_decode_to_what_was_sent(envs in vec(envelope(), 0..8),
                                                     cuts in vec(any::<Index>(), 0..6),
                                                     zero_copy in any::<bool>()) {
        let max = frame::DEFAULT_MAX_FRAME_LEN;
        let mut wire_bytes = Vec::new();
        for env in &envs {
            let mut buf = BytesMut::new();
            if zero_copy {
                let (n, held) = frame::encode_envelope_frame(env, max, &mut buf).expect("fits");
                if let Some(p) = held {
                    buf.extend_from_slice(&p);
                }
                prop_assert_eq!(n, buf.len());
            } else {
                let n = frame::encode_frame(env, max, &mut buf).expect("fits");
                prop_assert_eq!(n, buf.len());
            }
            wire_bytes.extend_from_slice(&buf);
        }
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(wire_bytes.len() + 1)).collect();
        at.push(wire_bytes.len());
        at.sort_unstable();
        let mut codec = FrameCodec::<Envelope>::new(max);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut from = 0;
        for to in at {
            buf.extend_from_slice(&wire_bytes[from..to]);
            from = to;
            while let Some((env, n)) = codec.decode(&mut buf).expect("valid frames") {
                prop_assert_eq!(n, frame::HEADER_LEN + env.encoded_len());
                got.push(env);
            }
        }
        prop_assert!(codec.decode_eof(&mut buf).expect("clean end").is_none());
        prop_assert_eq!(got, envs);
    }

    /// Any bytes, in any pieces, into the envelope and handshake decoders: frames or an error,
    /// never a panic; an error ends the connection, as the reader does.
    #[test]
    fn frame_decoders_take_untrusted_streams(chunks in vec(frame_stream_piece(), 0..6), small in any::<bool>()) {
        let max = if small { 64 } else { frame::DEFAULT_MAX_FRAME_LEN };
        read_stream(FrameCodec::<Envelope>::new(max), &chunks)?;
        read_stream(FrameCodec::<Handshake>::new(HANDSHAKE_MAX_FRAME_LEN), &chunks)?;
    }
}

/// A piece of a peer stream: raw bytes, or a well-framed protobuf-shaped payload (so the
/// payload decoders are reached), or a frame header announcing anything.
fn frame_stream_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..40),
        untrusted_bytes().prop_map(|p| {
            let mut f = (p.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&p);
            f
        }),
        any::<u32>().prop_map(|n| n.to_be_bytes().to_vec()),
    ]
}

fn read_stream<M: Message + Default>(mut codec: FrameCodec<M>, chunks: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut consumed = 0;
    for c in chunks {
        buf.extend_from_slice(c);
        fed += c.len();
        loop {
            match codec.decode(&mut buf) {
                Ok(Some((_, n))) => {
                    prop_assert!(n >= frame::HEADER_LEN);
                    consumed += n;
                    prop_assert!(consumed <= fed);
                }
                Ok(None) => break,
                Err(_) => return Ok(()),
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CloudEvents
// ---------------------------------------------------------------------------------------------

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        text(12).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((text(6), inner), 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A timestamp string: valid RFC 3339 across the whole range chrono accepts (years 0 to 9999,
/// most of them outside the span an i64 of nanoseconds covers), or garbage.
fn timestamp() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            0i32..10000,
            1u32..13,
            1u32..29,
            0u32..24,
            0u32..60,
            0u32..60,
            0u32..1_000_000_000
        )
            .prop_map(|(y, mo, d, h, mi, s, ns)| format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ns:09}Z")),
        (1678i32..2262).prop_map(|y| format!("{y:04}-06-01T12:00:00+02:00")),
        text(30),
    ]
}

/// A string attribute: empty, ordinary, long (past the 256-byte field limit), or anything.
fn attribute() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("")),
        "[a-z0-9./:-]{1,20}".prop_map(Value::from),
        (250usize..300).prop_map(|n| Value::from("x".repeat(n))),
        text(20).prop_map(Value::from),
        json_value(),
    ]
}

/// Mostly a valid attribute value, sometimes `other`.
fn valid_or(other: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    prop_oneof![3 => "[a-zA-Z0-9]{1,8}".prop_map(Value::from), 1 => other]
}

/// A structured CloudEvent: valid ones, and ones with each attribute missing or wrong.
fn cloudevent_json() -> impl Strategy<Value = Value> {
    (
        prop_oneof![4 => Just(json!("1.0")), 1 => Just(json!("0.3")), 1 => json_value()],
        (valid_or(attribute()), valid_or(attribute()), valid_or(attribute())),
        proptest::option::of(timestamp().prop_map(Value::from)),
        proptest::option::of(prop_oneof![
            Just(json!("application/json")),
            Just(json!("text/plain")),
            attribute()
        ]),
        proptest::option::of(json_value()),
        proptest::option::of(prop_oneof![Just(json!("aGVsbG8=")), attribute()]),
        vec(("[a-z0-9]{1,10}|\\PC{0,8}", attribute()), 0..4),
        any::<u8>(),
    )
        .prop_map(|(spec, (id, source, ty), time, dct, data, data_b64, ext, omit)| {
            let mut o = serde_json::Map::new();
            o.insert("specversion".into(), spec);
            o.insert("id".into(), id);
            o.insert("source".into(), source);
            o.insert("type".into(), ty);
            if let Some(t) = time {
                o.insert("time".into(), t);
            }
            if let Some(c) = dct {
                o.insert("datacontenttype".into(), c);
            }
            if let Some(d) = data {
                o.insert("data".into(), d);
            }
            if let Some(d) = data_b64 {
                o.insert("data_base64".into(), d);
            }
            for (k, v) in ext {
                o.insert(k, v);
            }
            // Sometimes drop a required attribute.
            match omit % 8 {
                0 => drop(o.remove("id")),
                1 => drop(o.remove("source")),
                2 => drop(o.remove("type")),
                3 => drop(o.remove("specversion")),
                _ => {}
            }
            Value::Object(o)
        })
}

proptest! {
    #![proptest_config(config())]

    /// CloudEvents JSON (valid, broken, or any JSON) maps to a valid event or an error; an
    /// accepted event survives the WAL record exactly (its time included) and maps back to a
    /// CloudEvent without panicking.
    #[test]
    fn cloudevents_parse_to_valid_events_that_survive_the_wal(v in prop_oneof![3 => cloudevent_json(), 1 => json_value()]) {
        let bytes = serde_json::to_vec(&v).expect("serializable");
        let Ok(ce) = serde_json::from_slice::<cloudevents::Event>(&bytes) else {
            return Ok(());
        };
        let Ok(e) = Event::from_cloudevent("fuzz.topic", ce) else {
            return Ok(());
        };
        prop_assert!(e.validate().is_ok());
        let record = proto::EventRecord::from(&e);
        let back: Event = proto::EventRecord::decode(record.encode_to_vec().as_slice()).expect("decodes").into();
        prop_assert_eq!(&back, &e, "the stored event differs from the accepted one");
        let _ = e.to_cloudevent();
    }

    /// Arbitrary bytes as a CloudEvent body: no panic.
    #[test]
    fn cloudevents_parse_arbitrary_bytes(b in vec(any::<u8>(), 0..200)) {
        if let Ok(ce) = serde_json::from_slice::<cloudevents::Event>(&b) {
            let _ = Event::from_cloudevent("fuzz.topic", ce);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: the publish and subscription routes of an in-process node
// ---------------------------------------------------------------------------------------------

/// Panics anywhere in the process (a handler, a spawned task, an actor) since the hook was set.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

/// An HTTP request as raw parts, so that headers may hold any bytes.
#[derive(Debug, Clone)]
struct RawRequest {
    method: &'static str,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// A path segment: a valid name, or anything (percent-encoded).
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("fuzz.orders".to_string()),
        2 => "[a-zA-Z0-9._-]{1,12}",
        1 => text(12).prop_map(|s| percent(&s)),
        1 => (190usize..210).prop_map(|n| "t".repeat(n)),
    ]
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn query() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(String::new()),
        1 => Just("?ack=none".to_string()),
        1 => Just("?ack=accepted".to_string()),
        1 => Just("?ack=processed&timeout_ms=30000".to_string()),
        1 => "(ack|timeout_ms|x)=[a-z0-9%]{0,12}".prop_map(|q| format!("?{q}")),
        1 => Just("?timeout_ms=0".to_string()),
        1 => Just("?timeout_ms=18446744073709551616".to_string()),
    ]
}

/// A header value: ordinary, or any bytes a client could send (no CR/LF).
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[ -~]{0,40}".prop_map(String::into_bytes),
        text(20).prop_map(String::into_bytes),
        vec(
            any::<u8>().prop_filter("no line break", |b| *b != b'\r' && *b != b'\n'),
            0..40
        ),
        (250usize..300).prop_map(|n| vec![b'k'; n]),
    ]
}

fn content_type() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"application/json".to_vec()),
        Just(b"application/cloudevents+json; charset=utf-8".to_vec()),
        Just(b"application/cloudevents-batch+json".to_vec()),
        Just(b"application/vnd.x+JSON".to_vec()),
        Just(b"text/plain".to_vec()),
        header_value(),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let named = prop_oneof![
        4 => content_type().prop_map(|v| ("content-type".to_string(), v)),
        2 => header_value().prop_map(|v| ("idempotency-key".to_string(), v)),
        2 => header_value().prop_map(|v| ("x-herald-key".to_string(), v)),
        2 => prop_oneof![Just(b"1.0".to_vec()), Just(b"0.3".to_vec()), header_value()]
            .prop_map(|v| ("ce-specversion".to_string(), v)),
        1 => header_value().prop_map(|v| ("ce-id".to_string(), v)),
        1 => header_value().prop_map(|v| ("ce-source".to_string(), v)),
        1 => header_value().prop_map(|v| ("ce-type".to_string(), v)),
        1 => timestamp().prop_map(|v| ("ce-time".to_string(), v.into_bytes())),
        1 => header_value().prop_map(|v| ("ce-subject".to_string(), v)),
        1 => ("ce-[a-z0-9]{1,10}", header_value()),
        1 => header_value().prop_map(|v| ("authorization".to_string(), v)),
        1 => header_value().prop_map(|v| ("content-encoding".to_string(), v)),
        1 => ("x-[a-z-]{1,10}", header_value()),
    ];
    vec(named, 0..6)
}

fn subscription_json() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just(json!("fuzz.orders")), attribute()],
        prop_oneof![Just(json!("g1")), attribute()],
        prop_oneof![
            Just(json!({"kind": "log"})),
            Just(json!({"kind": "rust", "name": "nope"})),
            Just(json!({"kind": "webhook", "url": "http://127.0.0.1:9/hook"})),
            attribute().prop_map(|u| json!({"kind": "webhook", "url": u})),
            json_value(),
        ],
        proptest::option::of(prop_oneof![
            json_value(),
            (0u64..5).prop_map(Value::from),
            Just(json!(u64::MAX))
        ]),
        proptest::option::of(json_value()),
    )
        .prop_map(|(topic, group, handler, instances, extra)| {
            let mut o = json!({"topic": topic, "group": group, "handler": handler});
            if let Some(i) = instances {
                o["instances"] = i;
            }
            if let Some(x) = extra {
                o["max_attempts"] = x;
            }
            o
        })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => vec(any::<u8>(), 0..200),
        2 => json_value().prop_map(|v| v.to_string().into_bytes()),
        3 => cloudevent_json().prop_map(|v| v.to_string().into_bytes()),
        2 => vec(cloudevent_json(), 0..4).prop_map(|v| Value::Array(v).to_string().into_bytes()),
        2 => subscription_json().prop_map(|v| v.to_string().into_bytes()),
        // JSON nested deeply, and invalid UTF-8 inside a JSON string.
        1 => (1usize..5000).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()),
        1 => Just(b"{\"a\":\"\xff\xfe\"}".to_vec()),
    ]
}

fn http_request() -> impl Strategy<Value = RawRequest> {
    let target = prop_oneof![
        3 => (segment(), query()).prop_map(|(t, q)| ("POST", format!("/v1/topics/{t}/events{q}"))),
        2 => (segment(), query()).prop_map(|(t, q)| ("POST", format!("/v1/topics/{t}/events/batch{q}"))),
        2 => Just(("POST", "/v1/subscriptions".to_string())),
        1 => (segment(), segment()).prop_map(|(t, g)| ("DELETE", format!("/v1/subscriptions/{t}/{g}"))),
        1 => Just(("GET", "/v1/subscriptions".to_string())),
    ];
    (target, headers(), body()).prop_map(|((method, target), headers, body)| RawRequest {
        method,
        target,
        headers,
        body,
    })
}

/// Sends `r` over a fresh connection and returns the status, or `None` when no status line came
/// back (the connection was dropped: a panic or a hang in the handler).
fn send(addr: &str, r: &RawRequest) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(common::DEADLINE)).ok()?;
    let mut out = format!(
        "{} {} HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n",
        r.method, r.target
    )
    .into_bytes();
    for (k, v) in &r.headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", r.body.len()).as_bytes());
    out.extend_from_slice(&r.body);
    s.write_all(&out).ok()?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let line = answer.split(|b| *b == b'\r').next()?;
    std::str::from_utf8(line).ok()?.split_whitespace().nth(1)?.parse().ok()
}

/// A node on its own thread and actix system, for the synchronous proptest runner.
struct NodeThread {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeThread {
    fn start() -> NodeThread {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let mut b = herald::node::Node::builder();
                b.config_mut().peer_tls.insecure = true;
                let node = common::start_node(b).await;
                let spec: herald::subscription::SubscriptionSpec =
                    serde_json::from_value(json!({"topic": "fuzz.orders", "group": "log", "handler": {"kind": "log"}}))
                        .expect("a spec");
                node.node.core().create_subscription(spec).await.expect("subscribed");
                addr_tx
                    .send(node.url.trim_start_matches("http://").to_string())
                    .expect("test waits");
                let _ = stopped.await;
                drop(node);
            });
        });
        let addr = addr_rx.recv_timeout(common::DEADLINE * 2).expect("the node starts");
        NodeThread {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for NodeThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn http_publish_and_subscription_routes_never_answer_5xx_or_panic() {
    count_panics();
    let node = NodeThread::start();
    let addr = node.addr.clone();
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let result = runner.run(&http_request(), |r| {
        let before = PANICS.load(Ordering::SeqCst);
        let status = send(&addr, &r);
        prop_assert!(status.is_some(), "no answer to {r:?}");
        let status = status.unwrap();
        prop_assert!(status < 500, "{status} for {r:?}");
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before, "a panic while handling {:?}", r);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Still serving, and still ready.
    let ready = send(
        &addr,
        &RawRequest {
            method: "GET",
            target: "/readyz".into(),
            headers: vec![],
            body: vec![],
        },
    );
    assert_eq!(ready, Some(200));
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic in the node");
}
