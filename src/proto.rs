//! Herald's persisted (and, later, wire) records, as prost messages.
//!
//! The messages are declared with `prost`'s derive instead of a `.proto` file compiled by
//! `build.rs`, so building Herald needs no `protoc`. Field tags are the schema: never reuse or
//! renumber one.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::event::Event;

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
/// message Forwarded   { uint64 id = 1; string group = 2; uint64 epoch = 3; EventRecord event = 4; }
/// message AckBatch    { repeated AckRecord acks = 1; }
/// message AckRecord   { uint64 id = 1; AckCode code = 2; uint32 attempts = 3; string error = 4; }
/// ```
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerMessage {
    /// The message.
    #[prost(oneof = "peer_message::Body", tags = "1, 2")]
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
    }
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
}

/// Outcomes of forwarded deliveries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AckBatch {
    /// The acks.
    #[prost(message, repeated, tag = "1")]
    pub acks: Vec<AckRecord>,
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
            id: e.id.clone(),
            topic: e.topic.clone(),
            key: e.key.clone(),
            data: e.data.clone(),
            content_type: e.content_type.clone(),
            time_unix_nanos: e.time.timestamp_nanos_opt().unwrap_or(0),
            source: e.source.clone(),
            event_type: e.event_type.clone(),
            headers: e.headers.clone(),
        }
    }
}

impl From<EventRecord> for Event {
    fn from(r: EventRecord) -> Self {
        Event {
            id: r.id,
            topic: r.topic,
            key: r.key,
            data: r.data,
            content_type: r.content_type,
            time: DateTime::<Utc>::from_timestamp_nanos(r.time_unix_nanos),
            source: r.source,
            event_type: r.event_type,
            headers: r.headers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn event_round_trips_through_the_record() {
        let mut e = Event::json("a.b", &serde_json::json!({"x": 1})).unwrap().with_key("k");
        e.headers.insert("h".into(), "v".into());
        let bytes = EventRecord::from(&e).encode_to_vec();
        let back: Event = EventRecord::decode(bytes.as_slice()).unwrap().into();
        assert_eq!(back, e);
    }
}
