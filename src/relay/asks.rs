//! Requests and answers between nodes about dead letters, on the events channel.
//!
//! Dead letters are stored where their instance ran, and any node lists and replays all of them.
//! Nodes ask each other over the peer transport (authenticated peers, the relay's own schema:
//! [`DeadLetterRequest`] and [`DeadLetterResponse`] in `proto::PeerMessage`), never over HTTP
//! with a user's token.
//!
//! **Asking** ([`Asks::ask`]). A request gets an id and waits (with a timeout) in a bounded table
//! of outstanding requests ([`MAX_OUTSTANDING`]); an answer completes it only if it comes from
//! the peer that was asked — an answer with an unknown id, or from another peer, is dropped.
//!
//! **Answering.** An incoming request becomes a [`PeerAsk`] on a bounded channel that the node
//! layer serves (it authorises the asker against the membership table and reads the ingress's
//! dead-letter store: the relay does neither). A full channel answers `Busy` at once. A page
//! is cut to fit one transport frame ([`Reply::page`] sets `truncated`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::Net;
use crate::proto::{
    dead_letter_request::Kind, peer_message, DeadLetterRecord, DeadLetterRequest, DeadLetterResponse, DeadLetterStatus,
    PeerMessage, StoredDeadLetter,
};
use crate::transport::Envelope;

/// Requests this node may have waiting for answers at once; more are refused (`AskError::Busy`).
pub(crate) const MAX_OUTSTANDING: usize = 256;

/// Requests from peers queued for the node layer at once; more are answered `Busy`.
pub(crate) const ASK_QUEUE: usize = 64;

/// Bytes of a frame kept for what surrounds a page's entries (envelope, message heads).
const FRAME_SLACK: usize = 4096;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AskError {
    /// Too many requests of this node are waiting for answers.
    #[error("too many requests to other members are waiting for answers")]
    Busy,
    /// The request could not be queued to the peer.
    #[error("cannot send to the member: {0}")]
    Send(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A request from a peer, for the node layer to answer.
pub(crate) struct PeerAsk {
    /// The authenticated peer that asks.
    pub(crate) from: u64,
    /// What it asks.
    pub(crate) kind: Kind,
    /// Where the answer goes.
    pub(crate) reply: Reply,
}

/// The way back to the peer that asked.
pub(crate) struct Reply {
    transport: Net,
    peer: u64,
    id: u64,
}

impl Reply {
    fn send(self, mut answer: DeadLetterResponse) {
        answer.id = self.id;
        let message = PeerMessage {
            body: Some(peer_message::Body::DeadLetterResponse(answer)),
        };
        if let Err(e) = self
            .transport
            .send(self.peer, Envelope::app(Bytes::from(message.encode_to_vec())))
        {
            tracing::warn!(peer = self.peer, error = %e, "cannot answer a member's dead-letter request");
        }
    }

    /// Answers with a status and no content.
    pub(crate) fn status(self, status: DeadLetterStatus, message: impl Into<String>) {
        self.send(DeadLetterResponse {
            status: status as i32,
            message: message.into(),
            ..Default::default()
        });
    }

    /// Answers a replay with the replayed event's id.
    pub(crate) fn replayed(self, event_id: String) {
        self.send(DeadLetterResponse {
            status: DeadLetterStatus::Ok as i32,
            event_id,
            ..Default::default()
        });
    }

    /// Answers a listing with `entries` (in id order), as many as fit one transport frame; the
    /// answer says `truncated` when some were left out.
    pub(crate) fn page(self, entries: Vec<(String, DeadLetterRecord)>) {
        let budget = self.transport.max_frame_len().saturating_sub(FRAME_SLACK);
        let (entries, truncated) = fit(entries, budget);
        self.send(DeadLetterResponse {
            status: DeadLetterStatus::Ok as i32,
            entries,
            truncated,
            ..Default::default()
        });
    }
}

/// The first `entries` whose encoding fits in `budget` bytes, and whether any were left out.
fn fit(entries: Vec<(String, DeadLetterRecord)>, budget: usize) -> (Vec<StoredDeadLetter>, bool) {
    let mut used = 0;
    let mut out = Vec::with_capacity(entries.len());
    for (id, record) in entries {
        let entry = StoredDeadLetter {
            id,
            record: Some(record),
        };
        // A repeated field's entry: key byte, length varint, body.
        let len = 1 + prost::encoding::encoded_len_varint(entry.encoded_len() as u64) + entry.encoded_len();
        if used + len > budget {
            return (out, true);
        }
        used += len;
        out.push(entry);
    }
    (out, false)
}

/// This node's side of the requests: outstanding ones waiting for answers.
pub(crate) struct Asks {
    transport: Net,
    next: AtomicU64,
    /// Request id → the peer asked and the waiting requester.
    waiting: Mutex<HashMap<u64, (u64, oneshot::Sender<DeadLetterResponse>)>>,
    /// Where requests from peers go (the node layer serves them).
    incoming: mpsc::Sender<PeerAsk>,
}

impl Asks {
    pub(crate) fn new(transport: Net, incoming: mpsc::Sender<PeerAsk>) -> Asks {
        Asks {
            transport,
            next: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            incoming,
        }
    }

    /// Asks `peer` and waits up to `timeout` for its answer.
    pub(crate) async fn ask(&self, peer: u64, kind: Kind, timeout: Duration) -> Result<DeadLetterResponse, AskError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if waiting.len() >= MAX_OUTSTANDING {
                return Err(AskError::Busy);
            }
            waiting.insert(id, (peer, tx));
        }
        // Removes the entry however this ends (answer, timeout, error, or the caller going away).
        let _forget = Forget(self, id);
        let message = PeerMessage {
            body: Some(peer_message::Body::DeadLetterRequest(DeadLetterRequest {
                id,
                kind: Some(kind),
            })),
        };
        self.transport
            .send(peer, Envelope::app(Bytes::from(message.encode_to_vec())))
            .map_err(|e| AskError::Send(e.to_string()))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            // The sender is only dropped with the table (the relay stopping) or by `Forget`.
            Ok(Err(_)) | Err(_) => Err(AskError::Timeout(timeout)),
        }
    }

    /// Requests currently waiting for answers.
    #[cfg(test)]
    pub(crate) fn outstanding(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// An answer from `from`: it completes its request only if that request was sent to `from`.
    pub(crate) fn on_response(&self, from: u64, answer: DeadLetterResponse) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        match waiting.get(&answer.id) {
            Some((peer, _)) if *peer == from => {
                if let Some((_, tx)) = waiting.remove(&answer.id) {
                    let _ = tx.send(answer);
                }
            }
            Some((peer, _)) => {
                tracing::warn!(
                    from,
                    asked = *peer,
                    id = answer.id,
                    "dead-letter answer from a member that was not asked dropped"
                );
            }
            None => tracing::debug!(from, id = answer.id, "late or unknown dead-letter answer dropped"),
        }
    }

    /// A request from `from`: queued for the node layer, or answered `Busy` when its queue is full.
    pub(crate) fn on_request(&self, from: u64, request: DeadLetterRequest) {
        let reply = Reply {
            transport: self.transport.clone(),
            peer: from,
            id: request.id,
        };
        let Some(kind) = request.kind else {
            reply.status(DeadLetterStatus::Failed, "empty request");
            return;
        };
        match self.incoming.try_send(PeerAsk { from, kind, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ask)) => ask
                .reply
                .status(DeadLetterStatus::Busy, "too many dead-letter requests queued"),
            Err(mpsc::error::TrySendError::Closed(ask)) => {
                ask.reply.status(DeadLetterStatus::Failed, "the node is stopping")
            }
        }
    }
}

/// Drops a request's entry from the table when its requester is done.
struct Forget<'a>(&'a Asks, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{EventRecord, ListDeadLetters};
    use crate::transport::{Transport, TransportConfig};

    fn record(bytes: usize) -> DeadLetterRecord {
        DeadLetterRecord {
            event: Some(EventRecord {
                id: "e".into(),
                topic: "t".into(),
                data: Bytes::from(vec![b'x'; bytes]),
                ..Default::default()
            }),
            group: "g".into(),
            attempts: 1,
            error: "boom".into(),
            failed_at_unix_ms: 1,
        }
    }

    #[test]
    fn a_page_is_cut_to_fit_the_frame_and_says_so() {
        let entries: Vec<_> = (0..10).map(|i| (format!("{i:02}"), record(1000))).collect();
        let (all, truncated) = fit(entries.clone(), 1 << 20);
        assert_eq!((all.len(), truncated), (10, false));
        let (some, truncated) = fit(entries.clone(), 3500);
        assert!(truncated);
        assert_eq!(some.len(), 3, "three ~1 KiB entries fit in 3500 bytes");
        assert_eq!(some[2].id, "02", "the first ones, in order");
        let encoded: usize = some
            .iter()
            .map(|e| 1 + prost::encoding::encoded_len_varint(e.encoded_len() as u64) + e.encoded_len())
            .sum();
        assert!(encoded <= 3500);
        let (none, truncated) = fit(entries, 10);
        assert!(
            none.is_empty() && truncated,
            "an entry larger than the budget is not sent"
        );
    }

    fn asks() -> (Asks, mpsc::Receiver<PeerAsk>) {
        let (tx, _) = mpsc::channel(16);
        let transport = Transport::new(TransportConfig::new("test", 1, "127.0.0.1:1"), tx).expect("transport");
        transport.add_peer(2, "127.0.0.1:1");
        transport.add_peer(3, "127.0.0.1:1");
        let (incoming, rx) = mpsc::channel(1);
        (Asks::new(std::sync::Arc::new(transport), incoming), rx)
    }

    fn list() -> Kind {
        Kind::List(ListDeadLetters {
            limit: 10,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn an_answer_counts_only_from_the_peer_that_was_asked() {
        let (asks, _rx) = asks();
        let asks = std::sync::Arc::new(asks);
        let waiting = {
            let asks = asks.clone();
            tokio::spawn(async move { asks.ask(2, list(), Duration::from_secs(10)).await })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while asks.outstanding() == 0 {
            assert!(std::time::Instant::now() < deadline, "the request never waited");
            tokio::task::yield_now().await;
        }
        let id = *asks.waiting.lock().unwrap().keys().next().unwrap();
        let forged = DeadLetterResponse {
            id,
            entries: vec![StoredDeadLetter {
                id: "forged".into(),
                record: None,
            }],
            ..Default::default()
        };
        asks.on_response(3, forged);
        assert_eq!(asks.outstanding(), 1, "peer 3 was not asked: its answer is dropped");
        asks.on_response(
            2,
            DeadLetterResponse {
                id,
                ..Default::default()
            },
        );
        let answer = waiting.await.unwrap().expect("answered");
        assert!(answer.entries.is_empty(), "the asked peer's answer, not the forged one");
        assert_eq!(asks.outstanding(), 0);
    }

    #[tokio::test]
    async fn requests_time_out_and_are_bounded() {
        let (asks, _rx) = asks();
        let err = asks.ask(2, list(), Duration::from_millis(20)).await.unwrap_err();
        assert!(matches!(err, AskError::Timeout(_)), "{err}");
        assert_eq!(asks.outstanding(), 0, "a timed-out request leaves the table");
        {
            let mut waiting = asks.waiting.lock().unwrap();
            for i in 0..MAX_OUTSTANDING as u64 {
                waiting.insert(1_000_000 + i, (2, oneshot::channel().0));
            }
        }
        let err = asks.ask(2, list(), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, AskError::Busy), "{err}");
    }

    #[tokio::test]
    async fn requests_beyond_the_queue_are_answered_busy_not_queued() {
        let (asks, mut rx) = asks();
        asks.on_request(
            2,
            DeadLetterRequest {
                id: 7,
                kind: Some(list()),
            },
        );
        asks.on_request(
            3,
            DeadLetterRequest {
                id: 8,
                kind: Some(list()),
            },
        );
        let first = rx.try_recv().expect("the first is queued");
        assert_eq!((first.from, first.reply.id), (2, 7));
        assert!(rx.try_recv().is_err(), "the second was answered Busy, not queued");
    }
}
