//! The node's durable store on redb: the write-ahead log of accepted events and the dead letters.
//!
//! One writer thread owns every write. Callers send operations over a channel; the writer takes
//! everything queued (up to `wal.max_batch`), applies it in one transaction and commits once —
//! group commit — then answers each caller. Under load one fsync covers thousands of events, which
//! is what keeps `ack=accepted` fast. Reads use redb's concurrent read transactions directly.

use std::path::Path;
use std::sync::Arc;

use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::FsyncPolicy;
use crate::error::{Error, Result};
use crate::proto::{DeadLetterRecord, WalRecord};

const WAL: TableDefinition<u64, &[u8]> = TableDefinition::new("wal");
const DEAD_LETTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("dead_letters");

/// A store failure as reported to callers (the writer thread keeps running). Cloned to every
/// caller whose operation was in the failed group commit.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database refused the operation: an I/O error (a full or failing disk), or a damaged
    /// or locked file.
    #[error("store: {0}")]
    Database(Arc<redb::Error>),
    /// A record did not decode: the file is damaged, or was written by something else.
    #[error("store: corrupt {what} {key}: {source}")]
    Corrupt {
        /// `WAL record` or `dead letter`.
        what: &'static str,
        /// The record's key.
        key: String,
        /// Why it did not decode.
        #[source]
        source: prost::DecodeError,
    },
    /// The writer thread has stopped (the node is shutting down).
    #[error("store: the WAL writer has stopped")]
    Stopped,
}

fn store_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Database(Arc::new(e.into()))
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    /// Append records; answers their sequence numbers.
    /// Each record is an encoded `WalRecord`.
    Append(Vec<Vec<u8>>, Reply<Vec<u64>>),
    /// An event is finished by every subscription; no answer needed.
    Ack(u64),
    /// Store a dead letter under its id.
    DeadLetter(String, Box<DeadLetterRecord>, Reply<()>),
    /// Move a dead letter back into the WAL, owed to its group only.
    Replay(String, Reply<Option<(u64, DeadLetterRecord)>>),
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    db: Arc<Db>,
    ops: mpsc::UnboundedSender<Op>,
    /// Closed once the database is (see [`Store::closed`]).
    closed: watch::Receiver<()>,
}

/// The database; when the last handle goes, it is closed (releasing the file lock) and only then
/// are the [`Store::closed`] watchers told.
struct Db {
    db: Option<Database>,
    _closed: watch::Sender<()>,
}

impl std::ops::Deref for Db {
    type Target = Database;

    fn deref(&self) -> &Database {
        self.db.as_ref().expect("the database is open until Db is dropped")
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // Close the file before `_closed` is dropped (fields drop after this body).
        self.db.take();
    }
}

impl Store {
    /// Opens (or creates) `herald.redb` in `dir` and starts the writer thread.
    pub(crate) fn open(dir: &Path, fsync: FsyncPolicy, max_batch: usize) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create data dir {}", dir.display()), e))?;
        let path = dir.join("herald.redb");
        let fail = |e: &dyn std::fmt::Display| Error::Store {
            path: path.clone(),
            message: e.to_string(),
        };
        let db = Database::create(&path).map_err(|e| fail(&e))?;
        // Create the tables so readers never see "table does not exist".
        let txn = db.begin_write().map_err(|e| fail(&e))?;
        let next_seq = {
            let wal = txn.open_table(WAL).map_err(|e| fail(&e))?;
            txn.open_table(DEAD_LETTERS).map_err(|e| fail(&e))?;
            let last = wal.last().map_err(|e| fail(&e))?.map(|(k, _)| k.value());
            metrics::gauge!(crate::metrics::WAL_EVENTS).set(wal.len().map_err(|e| fail(&e))? as f64);
            last.map_or(1, |s| s + 1)
        };
        txn.commit().map_err(|e| fail(&e))?;
        let (closed_tx, closed) = watch::channel(());
        let db = Arc::new(Db {
            db: Some(db),
            _closed: closed_tx,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            db: db.clone(),
            durability: match fsync {
                FsyncPolicy::Always => Durability::Immediate,
                FsyncPolicy::Never => Durability::None,
            },
            max_batch,
            next_seq,
        };
        std::thread::Builder::new()
            .name("herald-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io("cannot start the WAL writer thread", e))?;
        Ok(Store { db, ops: tx, closed })
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.ops.send(op(tx)).map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Durably appends records, each an encoded [`WalRecord`] (one group commit with whatever else
    /// is queued).
    pub(crate) async fn append(&self, records: Vec<Vec<u8>>) -> Result<Vec<u64>, StoreError> {
        self.call(|r| Op::Append(records, r)).await
    }

    /// Drops a finished event from the WAL (batched with the next commit).
    pub(crate) fn ack(&self, seq: u64) {
        let _ = self.ops.send(Op::Ack(seq));
    }

    pub(crate) async fn put_dead_letter(&self, id: String, record: DeadLetterRecord) -> Result<(), StoreError> {
        self.call(|r| Op::DeadLetter(id, Box::new(record), r)).await
    }

    pub(crate) async fn replay_dead_letter(&self, id: String) -> Result<Option<(u64, DeadLetterRecord)>, StoreError> {
        self.call(|r| Op::Replay(id, r)).await
    }

    /// Every record in the WAL, oldest first (start-up replay).
    pub(crate) fn wal_records(&self) -> Result<Vec<(u64, WalRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(WAL).map_err(store_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(store_err)? {
            let (k, v) = row.map_err(store_err)?;
            let record = WalRecord::decode(v.value()).map_err(|source| StoreError::Corrupt {
                what: "WAL record",
                key: k.value().to_string(),
                source,
            })?;
            out.push((k.value(), record));
        }
        Ok(out)
    }

    /// Dead letters in id (time) order, after `after` if given, at most `limit`.
    pub(crate) fn dead_letters(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, DeadLetterRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(DEAD_LETTERS).map_err(store_err)?;
        let mut out = Vec::new();
        let rows = match after {
            Some(a) => table.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => table.range::<&str>(..),
        }
        .map_err(store_err)?;
        for row in rows {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row.map_err(store_err)?;
            let record = DeadLetterRecord::decode(v.value()).map_err(|source| StoreError::Corrupt {
                what: "dead letter",
                key: k.value().to_string(),
                source,
            })?;
            out.push((k.value().to_string(), record));
        }
        Ok(out)
    }

    /// One dead letter by id.
    pub(crate) fn dead_letter(&self, id: &str) -> Result<Option<DeadLetterRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(DEAD_LETTERS).map_err(store_err)?;
        match table.get(id).map_err(store_err)? {
            Some(v) => DeadLetterRecord::decode(v.value())
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    what: "dead letter",
                    key: id.to_string(),
                    source,
                }),
            None => Ok(None),
        }
    }

    /// Waits until everything sent before has been committed.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.append(Vec::new()).await.map(drop)
    }

    /// Resolves once the database file is closed and can be opened again: after every `Store`
    /// handle (this one included) is dropped and the writer thread has stopped.
    pub(crate) fn closed(&self) -> impl std::future::Future<Output = ()> + 'static {
        let mut closed = self.closed.clone();
        async move { while closed.changed().await.is_ok() {} }
    }
}

struct Writer {
    db: Arc<Db>,
    durability: Durability,
    max_batch: usize,
    next_seq: u64,
}

/// A reply to send once the transaction's fate is known (`None`: committed).
type Answer = Box<dyn FnOnce(Option<&StoreError>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, value: T) -> Answer {
    Box::new(move |failure| {
        let _ = reply.send(match failure {
            None => Ok(value),
            Some(e) => Err(e.clone()),
        });
    })
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let seq_before = self.next_seq;
            let mut pending = Vec::with_capacity(batch.len());
            match self.commit(&mut batch, &mut pending) {
                Ok(delta) => {
                    metrics::counter!(crate::metrics::WAL_COMMITS).increment(1);
                    metrics::gauge!(crate::metrics::WAL_EVENTS).increment(delta as f64);
                    pending.into_iter().for_each(|answer| answer(None));
                }
                Err(e) => {
                    tracing::error!(error = %e, "WAL commit failed");
                    self.next_seq = seq_before;
                    pending.into_iter().for_each(|answer| answer(Some(&e)));
                }
            }
            batch.clear();
        }
    }

    /// Applies `ops` in one transaction. Returns the change in the number of WAL records.
    fn commit(&mut self, ops: &mut Vec<Op>, pending: &mut Vec<Answer>) -> Result<i64, StoreError> {
        let mut txn = self.db.begin_write().map_err(store_err)?;
        txn.set_durability(self.durability).map_err(store_err)?;
        let mut delta = 0i64;
        {
            let mut wal = txn.open_table(WAL).map_err(store_err)?;
            let mut dead = txn.open_table(DEAD_LETTERS).map_err(store_err)?;
            for op in ops.drain(..) {
                match op {
                    Op::Append(records, reply) => {
                        let mut seqs = Vec::with_capacity(records.len());
                        for r in records {
                            let seq = self.next_seq;
                            self.next_seq += 1;
                            wal.insert(seq, r.as_slice()).map_err(store_err)?;
                            seqs.push(seq);
                        }
                        delta += seqs.len() as i64;
                        pending.push(answer(reply, seqs));
                    }
                    Op::Ack(seq) => {
                        if wal.remove(seq).map_err(store_err)?.is_some() {
                            delta -= 1;
                        }
                    }
                    Op::DeadLetter(id, record, reply) => {
                        dead.insert(id.as_str(), record.encode_to_vec().as_slice())
                            .map_err(store_err)?;
                        pending.push(answer(reply, ()));
                    }
                    Op::Replay(id, reply) => {
                        let found = dead
                            .remove(id.as_str())
                            .map_err(store_err)?
                            .map(|v| DeadLetterRecord::decode(v.value()));
                        let found_record = match found {
                            Some(Ok(record)) => {
                                let seq = self.next_seq;
                                self.next_seq += 1;
                                let wal_record = WalRecord {
                                    event: record.event.clone(),
                                    groups: vec![record.group.clone()],
                                };
                                wal.insert(seq, wal_record.encode_to_vec().as_slice())
                                    .map_err(store_err)?;
                                delta += 1;
                                Some((seq, record))
                            }
                            Some(Err(source)) => {
                                return Err(StoreError::Corrupt {
                                    what: "dead letter",
                                    key: id.clone(),
                                    source,
                                })
                            }
                            None => None,
                        };
                        pending.push(answer(reply, found_record));
                    }
                }
            }
        }
        txn.commit().map_err(store_err)?;
        Ok(delta)
    }
}
