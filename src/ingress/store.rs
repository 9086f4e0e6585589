//! The node's durable store on redb: the write-ahead log of accepted events and the dead letters.
//!
//! One writer thread owns every write. Callers send operations over a channel; the writer takes
//! everything queued (up to `wal.max_batch`), applies it in one transaction and commits once —
//! group commit — then answers each caller. Under load one fsync covers thousands of events, which
//! is what keeps `ack=accepted` fast. Reads use redb's concurrent read transactions directly.
//!
//! Durability (`wal.fsync`): `always` commits every group durably before answering; `interval`
//! commits with redb's `Durability::None` and a tick every `wal.flush_interval_ms` makes a durable
//! commit, which makes every earlier commit durable too (redb persists a prefix of its commits);
//! `never` commits nothing durably until the database is closed on a clean shutdown.
//!
//! Storage faults: when a commit fails with an I/O error (a full disk, ENOSPC) redb refuses all
//! further writes until it is reopened. The writer then closes the database, reports the problem
//! (callers get [`StoreError::Full`] or [`StoreError::Database`], `/readyz` answers 503), and on
//! every tick reopens it and probes with a small durable commit; once that succeeds the store is
//! healthy again. Acks that could not be written are kept and written after the recovery.
//!
//! Recovery: the WAL is read in chunks ([`Store::wal_chunk`]); records that do not decode are
//! moved to the `wal_quarantine` table ([`Store::quarantine`]) instead of stopping the node.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{FsyncPolicy, HandlerConfig, WalConfig};
use crate::error::{Error, Result};
use crate::proto::{DeadLetterRecord, WalRecord};

const WAL: TableDefinition<u64, &[u8]> = TableDefinition::new("wal");
const DEAD_LETTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("dead_letters");
/// Undecodable WAL records, kept aside under their sequence numbers for inspection.
const WAL_QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("wal_quarantine");
/// One row rewritten by the probe commit that tests whether the disk takes writes again.
const PROBE: TableDefinition<u64, u64> = TableDefinition::new("probe");

/// redb's page cache (its default is 1 GiB, which a large WAL read at start-up would fill).
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Dead letters deleted per tick at most (retention catches up over several ticks).
const RETAIN_PER_TICK: u64 = 10_000;
/// When the store file is compacted (redb hands the pages freed by removed WAL records and dead
/// letters back to the file system): after [`Compaction::after_removed`] records were removed since
/// the last compaction, and at most once per [`Compaction::every`]. Never with `wal.fsync =
/// "never"` (a compaction commits durably, and `never` promises nothing durable).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Compaction {
    pub after_removed: u64,
    pub every: Duration,
}

impl Default for Compaction {
    fn default() -> Compaction {
        Compaction {
            after_removed: 100_000,
            every: Duration::from_secs(600),
        }
    }
}

/// Dead-letter retention (`handlers.dead_letter_max_age_s`, `handlers.dead_letter_max_count`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Retention {
    /// Dead letters older than this are deleted.
    pub max_age: Option<Duration>,
    /// Most dead letters kept; the oldest beyond it are deleted.
    pub max_count: Option<u64>,
}

impl Retention {
    pub(crate) fn of(h: &HandlerConfig) -> Retention {
        Retention {
            max_age: (h.dead_letter_max_age_s > 0).then(|| Duration::from_secs(h.dead_letter_max_age_s)),
            max_count: (h.dead_letter_max_count > 0).then_some(h.dead_letter_max_count),
        }
    }
}

/// Ticks when `wal.fsync` is not `interval` (they drive the recovery after a storage fault).
const TICK: Duration = Duration::from_millis(500);

/// A store failure as reported to callers (the writer thread keeps running). Cloned to every
/// caller whose operation was in the failed group commit.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database refused the operation: an I/O error (a failing disk), or a damaged or locked
    /// file.
    #[error("store: {0}")]
    Database(Arc<redb::Error>),
    /// The disk is full (ENOSPC): nothing was written. The store recovers by itself once there
    /// is space again.
    #[error("store: the disk is full; nothing was written ({0})")]
    Full(Arc<str>),
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

impl StoreError {
    /// Whether this error means the disk (or the database on it) refuses writes: redb must be
    /// reopened before it takes any again.
    fn is_storage_fault(&self) -> bool {
        match self {
            StoreError::Full(_) => true,
            StoreError::Database(e) => matches!(
                **e,
                redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed | redb::Error::Backend(_)
            ),
            _ => false,
        }
    }

    /// [`StoreError::Full`] for an out-of-space I/O error, the error itself otherwise.
    fn classify(self) -> StoreError {
        if let StoreError::Database(e) = &self {
            if let redb::Error::Io(io) = &**e {
                // ENOSPC (28) and EDQUOT (122) on Linux.
                if io.kind() == std::io::ErrorKind::StorageFull || matches!(io.raw_os_error(), Some(28 | 122)) {
                    return StoreError::Full(io.to_string().into());
                }
            }
        }
        self
    }
}

/// WAL records with their sequence numbers, each decoded or undecodable ([`Store::wal_chunk`]).
pub(crate) type WalChunk = Vec<(u64, Result<WalRecord, prost::DecodeError>)>;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    /// Append records; answers their sequence numbers.
    /// Each record is an encoded `WalRecord`.
    Append(Vec<Vec<u8>>, Reply<Vec<u64>>),
    /// Events finished by every subscription (or owed to none); no answer needed.
    Ack(Vec<u64>),
    /// Store a dead letter under its id.
    DeadLetter(String, Box<DeadLetterRecord>, Reply<()>),
    /// Move a dead letter back into the WAL, owed to its group only.
    Replay(String, Reply<Option<(u64, DeadLetterRecord)>>),
    /// Move WAL records to the quarantine table; answers how many were moved.
    Quarantine(Vec<u64>, Reply<usize>),
    /// Time passed: dead-letter retention, recovery from a storage fault, and with `true` a
    /// durable flush (`interval`).
    Tick(bool),
}

impl Op {
    fn writes(&self) -> bool {
        !matches!(self, Op::Tick(_))
    }

    /// Answers the operation with `e` (acks are kept by the caller, not answered).
    fn fail(self, e: &StoreError) {
        match self {
            Op::Append(_, r) => drop(r.send(Err(e.clone()))),
            Op::DeadLetter(_, _, r) => drop(r.send(Err(e.clone()))),
            Op::Replay(_, r) => drop(r.send(Err(e.clone()))),
            Op::Quarantine(_, r) => drop(r.send(Err(e.clone()))),
            Op::Ack(_) | Op::Tick(_) => {}
        }
    }
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
/// are the [`Store::closed`] watchers told. `None` between a storage fault and the reopening.
struct Db {
    path: PathBuf,
    db: RwLock<Option<Database>>,
    /// Why the store refuses writes (a storage fault), until it has recovered.
    problem: Mutex<Option<StoreError>>,
    /// Compactions done since the store opened (`herald_store_compactions_total` counts them too).
    compactions: std::sync::atomic::AtomicU64,
    _closed: watch::Sender<()>,
}

impl Db {
    /// Runs `f` on the open database (readers); a closed one answers the storage problem.
    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        match db.as_ref() {
            Some(db) => f(db),
            None => Err(self.problem().unwrap_or(StoreError::Stopped)),
        }
    }

    fn problem(&self) -> Option<StoreError> {
        self.problem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_problem(&self, p: Option<StoreError>) {
        metrics::gauge!(crate::metrics::STORAGE_UNHEALTHY).set(if p.is_some() { 1.0 } else { 0.0 });
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = p;
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // Close the file before `_closed` is dropped (fields drop after this body).
        self.db.get_mut().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Opens (or creates) the database at `path` with its tables; answers the next WAL sequence
/// number and the number of WAL records.
fn open_db(path: &Path) -> Result<(Database, u64, u64), StoreError> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(store_err)?;
    // Create the tables so readers never see "table does not exist".
    let txn = db.begin_write().map_err(store_err)?;
    let (next_seq, len) = {
        let wal = txn.open_table(WAL).map_err(store_err)?;
        txn.open_table(DEAD_LETTERS).map_err(store_err)?;
        let q = txn.open_table(WAL_QUARANTINE).map_err(store_err)?;
        let last = wal.last().map_err(store_err)?.map(|(k, _)| k.value());
        let last_q = q.last().map_err(store_err)?.map(|(k, _)| k.value());
        let last = last.max(last_q);
        (last.map_or(1, |s| s + 1), wal.len().map_err(store_err)?)
    };
    txn.commit().map_err(store_err)?;
    Ok((db, next_seq, len))
}

impl Store {
    /// Opens (or creates) `herald.redb` in `dir` and starts the writer thread.
    pub(crate) fn open(dir: &Path, wal: &WalConfig, retention: Retention) -> Result<Store> {
        Store::open_with(dir, wal, retention, Compaction::default())
    }

    /// [`Store::open`] with the compaction thresholds given.
    pub(crate) fn open_with(
        dir: &Path,
        wal: &WalConfig,
        retention: Retention,
        compaction: Compaction,
    ) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create data dir {}", dir.display()), e))?;
        let path = dir.join("herald.redb");
        let (db, next_seq, len) = open_db(&path).map_err(|e| Error::Store {
            path: path.clone(),
            message: e.to_string(),
        })?;
        metrics::gauge!(crate::metrics::WAL_EVENTS).set(len as f64);
        metrics::gauge!(crate::metrics::STORAGE_UNHEALTHY).set(0.0);
        let (closed_tx, closed) = watch::channel(());
        let db = Arc::new(Db {
            path,
            db: RwLock::new(Some(db)),
            problem: Mutex::new(None),
            compactions: Default::default(),
            _closed: closed_tx,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            db: db.clone(),
            fsync: wal.fsync,
            max_batch: wal.max_batch,
            next_seq,
            dirty: false,
            deferred_acks: Vec::new(),
            last_attempt: None,
            retention,
            removed: 0,
            last_compaction: Instant::now(),
            compaction,
        };
        std::thread::Builder::new()
            .name("herald-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io("cannot start the WAL writer thread", e))?;
        // The ticker holds only a weak sender, so it never keeps the writer (and the file) open.
        let flush_every = Duration::from_millis(wal.flush_interval_ms);
        let weak = tx.downgrade();
        let interval = wal.fsync == FsyncPolicy::Interval;
        std::thread::Builder::new()
            .name("herald-wal-tick".into())
            .spawn(move || {
                let mut last_flush = Instant::now();
                loop {
                    // Wake for the next flush when it is due sooner than the next tick.
                    let next_flush = flush_every.saturating_sub(last_flush.elapsed());
                    std::thread::sleep(if interval { TICK.min(next_flush) } else { TICK });
                    let Some(tx) = weak.upgrade() else { return };
                    // With `interval` a tick is a flush once per `flush_interval_ms`.
                    let flush =
                        interval && last_flush.elapsed() >= flush_every.saturating_sub(Duration::from_millis(1));
                    if flush {
                        last_flush = Instant::now();
                    }
                    if tx.send(Op::Tick(flush)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the WAL ticker thread", e))?;
        Ok(Store { db, ops: tx, closed })
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.ops.send(op(tx)).map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Appends records, each an encoded [`WalRecord`] (one group commit with whatever else is
    /// queued), durably as `wal.fsync` says.
    pub(crate) async fn append(&self, records: Vec<Vec<u8>>) -> Result<Vec<u64>, StoreError> {
        self.call(|r| Op::Append(records, r)).await
    }

    /// Drops a finished event from the WAL (batched with the next commit).
    pub(crate) fn ack(&self, seq: u64) {
        let _ = self.ops.send(Op::Ack(vec![seq]));
    }

    /// Drops finished events from the WAL (batched with the next commit).
    pub(crate) fn ack_all(&self, seqs: Vec<u64>) {
        if !seqs.is_empty() {
            let _ = self.ops.send(Op::Ack(seqs));
        }
    }

    pub(crate) async fn put_dead_letter(&self, id: String, record: DeadLetterRecord) -> Result<(), StoreError> {
        self.call(|r| Op::DeadLetter(id, Box::new(record), r)).await
    }

    pub(crate) async fn replay_dead_letter(&self, id: String) -> Result<Option<(u64, DeadLetterRecord)>, StoreError> {
        self.call(|r| Op::Replay(id, r)).await
    }

    /// Moves undecodable WAL records to the quarantine table; answers how many were moved.
    pub(crate) async fn quarantine(&self, seqs: Vec<u64>) -> Result<usize, StoreError> {
        self.call(|r| Op::Quarantine(seqs, r)).await
    }

    /// The last WAL sequence number now (start-up replay reads up to it).
    pub(crate) fn wal_last(&self) -> Result<Option<u64>, StoreError> {
        self.db.with(|db| {
            let txn = db.begin_read().map_err(store_err)?;
            let table = txn.open_table(WAL).map_err(store_err)?;
            let last = table.last().map_err(store_err)?.map(|(k, _)| k.value());
            Ok(last)
        })
    }

    /// At most `limit` WAL records after `after` and up to `upto`, oldest first, each decoded or
    /// (`Err`) undecodable. One short read transaction per chunk, so start-up replay holds one
    /// chunk in memory, not the WAL.
    pub(crate) fn wal_chunk(&self, after: Option<u64>, upto: u64, limit: usize) -> Result<WalChunk, StoreError> {
        self.db.with(|db| {
            let txn = db.begin_read().map_err(store_err)?;
            let table = txn.open_table(WAL).map_err(store_err)?;
            let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
            let mut out = Vec::with_capacity(limit.min(4096));
            for row in table
                .range::<u64>((start, std::ops::Bound::Included(upto)))
                .map_err(store_err)?
            {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = row.map_err(store_err)?;
                out.push((k.value(), WalRecord::decode(v.value())));
            }
            Ok(out)
        })
    }

    /// Dead letters in id (time) order, after `after` if given, at most `limit`.
    pub(crate) fn dead_letters(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, DeadLetterRecord)>, StoreError> {
        self.db.with(|db| {
            let txn = db.begin_read().map_err(store_err)?;
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
                match DeadLetterRecord::decode(v.value()) {
                    Ok(record) => out.push((k.value().to_string(), record)),
                    // Skipped, not fatal: one bad record must not hide all the others. It cannot
                    // be replayed; retention deletes it by the age of its id.
                    Err(error) => tracing::warn!(id = k.value(), %error, "skipped a dead letter that does not decode"),
                }
            }
            Ok(out)
        })
    }

    /// One dead letter by id.
    pub(crate) fn dead_letter(&self, id: &str) -> Result<Option<DeadLetterRecord>, StoreError> {
        self.db.with(|db| {
            let txn = db.begin_read().map_err(store_err)?;
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
        })
    }

    /// Why the store refuses writes (disk full or failing), while it does.
    pub(crate) fn problem(&self) -> Option<StoreError> {
        self.db.problem()
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
    fsync: FsyncPolicy,
    max_batch: usize,
    next_seq: u64,
    /// `interval`: something was committed since the last durable commit.
    dirty: bool,
    /// Acks that a failed commit did not write; written with the next one.
    deferred_acks: Vec<u64>,
    /// The last attempt to reopen the database after a storage fault.
    last_attempt: Option<Instant>,
    retention: Retention,
    /// Records removed since the last compaction.
    removed: u64,
    last_compaction: Instant,
    compaction: Compaction,
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

/// How often a storage fault is retried while operations keep arriving.
const RETRY: Duration = Duration::from_millis(200);

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
            let ticked = batch.iter().any(|op| !op.writes());
            let flush_due = batch.iter().any(|op| matches!(op, Op::Tick(true)));
            batch.retain(Op::writes);
            if self.db.problem().is_some() && !self.recover(ticked) {
                let e = self.db.problem().unwrap_or(StoreError::Stopped);
                for op in batch.drain(..) {
                    if let Op::Ack(seqs) = op {
                        self.deferred_acks.extend(seqs);
                    } else {
                        op.fail(&e);
                    }
                }
                continue;
            }
            if ticked {
                self.housekeeping();
            }
            let flush = self.fsync == FsyncPolicy::Interval && flush_due && self.dirty;
            if batch.is_empty() && self.deferred_acks.is_empty() && !flush {
                continue;
            }
            let durable = match self.fsync {
                FsyncPolicy::Always => true,
                FsyncPolicy::Interval => flush_due,
                FsyncPolicy::Never => false,
            };
            let seq_before = self.next_seq;
            let mut pending = Vec::with_capacity(batch.len());
            let mut acks = std::mem::take(&mut self.deferred_acks);
            match self.commit(&mut batch, &mut pending, &mut acks, durable) {
                Ok(delta) => {
                    metrics::counter!(crate::metrics::WAL_COMMITS).increment(1);
                    if durable {
                        metrics::counter!(crate::metrics::WAL_FLUSHES).increment(1);
                    }
                    self.dirty = !durable;
                    metrics::gauge!(crate::metrics::WAL_EVENTS).increment(delta as f64);
                    pending.into_iter().for_each(|answer| answer(None));
                }
                Err(e) => {
                    let e = e.classify();
                    tracing::error!(error = %e, "WAL commit failed");
                    self.next_seq = seq_before;
                    // The acks are written again with the next commit (removing a record twice
                    // is harmless).
                    self.deferred_acks = acks;
                    for op in batch.drain(..) {
                        if let Op::Ack(seqs) = op {
                            self.deferred_acks.extend(seqs);
                        } else {
                            op.fail(&e);
                        }
                    }
                    if e.is_storage_fault() {
                        self.fault(e.clone());
                    }
                    pending.into_iter().for_each(|answer| answer(Some(&e)));
                }
            }
            batch.clear();
        }
    }

    /// A commit failed with an I/O error: redb refuses further writes until it is reopened, so
    /// close it and report the problem until [`Writer::recover`] succeeds.
    fn fault(&mut self, e: StoreError) {
        tracing::error!(error = %e, "the store refuses writes; publishing answers storage_full or wal_unavailable and /readyz 503 until it recovers");
        self.db.set_problem(Some(e));
        self.db.db.write().unwrap_or_else(|p| p.into_inner()).take();
        self.last_attempt = Some(Instant::now());
    }

    /// Reopens the database and probes it with a small durable commit; true once the store takes
    /// writes again. Tried on ticks, and at most every [`RETRY`] for operations in between.
    fn recover(&mut self, ticked: bool) -> bool {
        if !ticked && self.last_attempt.is_some_and(|t| t.elapsed() < RETRY) {
            return false;
        }
        self.last_attempt = Some(Instant::now());
        let mut guard = self.db.db.write().unwrap_or_else(|p| p.into_inner());
        guard.take();
        let reopened = open_db(&self.db.path).and_then(|(db, next_seq, len)| {
            let txn = db.begin_write().map_err(store_err)?;
            {
                let mut probe = txn.open_table(PROBE).map_err(store_err)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                probe.insert(0, now).map_err(store_err)?;
            }
            txn.commit().map_err(store_err)?;
            Ok((db, next_seq, len))
        });
        match reopened {
            Ok((db, next_seq, len)) => {
                *guard = Some(db);
                drop(guard);
                // A failed commit may still have become durable: never reuse its numbers.
                self.next_seq = self.next_seq.max(next_seq);
                self.dirty = false;
                metrics::gauge!(crate::metrics::WAL_EVENTS).set(len as f64);
                self.db.set_problem(None);
                tracing::info!("the store takes writes again");
                true
            }
            Err(e) => {
                let e = e.classify();
                tracing::debug!(error = %e, "the store still refuses writes");
                if e.is_storage_fault() {
                    self.db.set_problem(Some(e));
                }
                false
            }
        }
    }

    /// Applies `ops` and `acks` in one transaction. Returns the change in the number of WAL
    /// records.
    fn commit(
        &mut self,
        ops: &mut Vec<Op>,
        pending: &mut Vec<Answer>,
        acks: &mut Vec<u64>,
        durable: bool,
    ) -> Result<i64, StoreError> {
        let shared = self.db.clone();
        let guard = shared.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard.as_ref().ok_or(StoreError::Stopped)?;
        let mut txn = db.begin_write().map_err(store_err)?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(store_err)?;
        let mut delta = 0i64;
        {
            let mut wal = txn.open_table(WAL).map_err(store_err)?;
            let mut dead = txn.open_table(DEAD_LETTERS).map_err(store_err)?;
            let mut quarantine = txn.open_table(WAL_QUARANTINE).map_err(store_err)?;
            for seq in acks.iter() {
                if wal.remove(*seq).map_err(store_err)?.is_some() {
                    delta -= 1;
                    self.removed += 1;
                }
            }
            let mut rest = std::mem::take(ops).into_iter();
            while let Some(op) = rest.next() {
                let applied = self.apply(op, &mut wal, &mut dead, &mut quarantine, pending, acks);
                match applied {
                    Ok(d) => delta += d,
                    Err(e) => {
                        // Left for the caller to answer.
                        ops.extend(rest);
                        return Err(e);
                    }
                }
            }
        }
        txn.commit().map_err(store_err)?;
        Ok(delta)
    }

    /// On ticks: dead-letter retention, then compaction when many records were removed.
    fn housekeeping(&mut self) {
        if let Err(e) = self.retain() {
            tracing::warn!(error = %e, "dead-letter retention failed; retried on the next tick");
            let e = e.classify();
            if e.is_storage_fault() {
                self.fault(e);
            }
            return;
        }
        // Not with `never`: a compaction commits durably, and `never` promises nothing durable.
        if self.fsync != FsyncPolicy::Never
            && self.removed >= self.compaction.after_removed
            && self.last_compaction.elapsed() >= self.compaction.every
        {
            self.compact();
        }
    }

    /// Deletes the dead letters beyond `max_count` and older than `max_age`, oldest first (ids
    /// are ULIDs: time-ordered), at most [`RETAIN_PER_TICK`].
    fn retain(&mut self) -> Result<(), StoreError> {
        let Retention { max_age, max_count } = self.retention;
        if max_age.is_none() && max_count.is_none() {
            return Ok(());
        }
        let cutoff = max_age.map(|a| chrono::Utc::now().timestamp_millis() - a.as_millis() as i64);
        // A record that does not decode is aged by its id (a ULID made when it was stored), so
        // one corrupt dead letter cannot keep everything newer than it forever.
        let failed_at = |id: &str, v: &[u8]| match DeadLetterRecord::decode(v) {
            Ok(r) => Some(r.failed_at_unix_ms),
            Err(_) => ulid::Ulid::from_string(id).ok().map(|u| u.timestamp_ms() as i64),
        };
        let expired = |id: &str, v: &[u8]| cutoff.is_some_and(|c| failed_at(id, v).is_some_and(|at| at < c));
        let shared = self.db.clone();
        let guard = shared.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard.as_ref().ok_or(StoreError::Stopped)?;
        // A read first: most ticks have nothing to delete.
        let excess = {
            let txn = db.begin_read().map_err(store_err)?;
            let table = txn.open_table(DEAD_LETTERS).map_err(store_err)?;
            let excess = max_count.map_or(0, |m| table.len().unwrap_or(0).saturating_sub(m));
            let oldest_expired = table
                .first()
                .map_err(store_err)?
                .is_some_and(|(k, v)| expired(k.value(), v.value()));
            if excess == 0 && !oldest_expired {
                return Ok(());
            }
            excess
        };
        let mut txn = db.begin_write().map_err(store_err)?;
        let durable = self.fsync == FsyncPolicy::Always;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(store_err)?;
        let (mut by_count, mut by_age) = (0u64, 0u64);
        {
            let mut table = txn.open_table(DEAD_LETTERS).map_err(store_err)?;
            while by_count + by_age < RETAIN_PER_TICK {
                let Some((id, old)) = table
                    .first()
                    .map_err(store_err)?
                    .map(|(k, v)| (k.value().to_string(), expired(k.value(), v.value())))
                else {
                    break;
                };
                if by_count < excess {
                    by_count += 1;
                } else if old {
                    by_age += 1;
                } else {
                    break;
                }
                table.remove(id.as_str()).map_err(store_err)?;
            }
        }
        txn.commit().map_err(store_err)?;
        self.dirty |= !durable;
        self.removed += by_count + by_age;
        metrics::counter!(crate::metrics::DEAD_LETTERS_EXPIRED, "reason" => "count").increment(by_count);
        metrics::counter!(crate::metrics::DEAD_LETTERS_EXPIRED, "reason" => "age").increment(by_age);
        tracing::info!(by_count, by_age, "deleted dead letters past their retention");
        Ok(())
    }

    /// Compacts the file (redb returns freed pages at its end to the file system). Readers wait
    /// meanwhile; a failure only logs.
    fn compact(&mut self) {
        self.removed = 0;
        self.last_compaction = Instant::now();
        let size = || std::fs::metadata(&self.db.path).map_or(0, |m| m.len());
        let before = size();
        let mut guard = self.db.db.write().unwrap_or_else(|p| p.into_inner());
        let Some(db) = guard.as_mut() else { return };
        match db.compact() {
            Ok(_) => {
                drop(guard);
                // Compaction commits durably: whatever was pending is durable now.
                self.dirty = false;
                self.db.compactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!(crate::metrics::STORE_COMPACTIONS).increment(1);
                tracing::info!(before, after = size(), "compacted the store file");
            }
            Err(e) => tracing::warn!(error = %e, "cannot compact the store file"),
        }
    }

    /// Applies one operation; answers the change in the number of WAL records.
    fn apply(
        &mut self,
        op: Op,
        wal: &mut redb::Table<u64, &[u8]>,
        dead: &mut redb::Table<&str, &[u8]>,
        quarantine: &mut redb::Table<u64, &[u8]>,
        pending: &mut Vec<Answer>,
        acks: &mut Vec<u64>,
    ) -> Result<i64, StoreError> {
        let mut delta = 0i64;
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
            Op::Ack(seqs) => {
                for seq in &seqs {
                    if wal.remove(*seq).map_err(store_err)?.is_some() {
                        delta -= 1;
                        self.removed += 1;
                    }
                }
                acks.extend(seqs);
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
            Op::Quarantine(seqs, reply) => {
                let mut moved = 0;
                for seq in seqs {
                    let Some(v) = wal.remove(seq).map_err(store_err)? else {
                        continue;
                    };
                    quarantine.insert(seq, v.value()).map_err(store_err)?;
                    delta -= 1;
                    moved += 1;
                }
                pending.push(answer(reply, moved));
            }
            Op::Tick(_) => {}
        }
        Ok(delta)
    }
}

/// What `herald wal check` found in a data directory (see [`inspect`]).
#[derive(Debug, Default)]
pub(crate) struct Inspection {
    /// WAL records (decodable or not).
    pub wal: u64,
    /// Sequence numbers of WAL records that do not decode.
    pub bad_wal: Vec<u64>,
    /// Records in the quarantine table (after a repair, the ones it moved).
    pub quarantined: u64,
    /// Dead letters (decodable or not).
    pub dead_letters: u64,
    /// Ids of dead letters that do not decode.
    pub bad_dead_letters: Vec<String>,
    /// Whether a repair moved the undecodable records aside.
    pub repaired: bool,
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "wal records:            {}", self.wal)?;
        writeln!(f, "undecodable wal records: {}", self.bad_wal.len())?;
        for seq in &self.bad_wal {
            writeln!(f, "  wal {seq}")?;
        }
        writeln!(f, "dead letters:           {}", self.dead_letters)?;
        writeln!(f, "undecodable dead letters: {}", self.bad_dead_letters.len())?;
        for id in &self.bad_dead_letters {
            writeln!(f, "  dead letter {id}")?;
        }
        write!(f, "quarantined records:    {}", self.quarantined)?;
        if self.repaired {
            write!(
                f,
                "\nrepaired: the undecodable records were moved to the quarantine tables"
            )?;
        }
        Ok(())
    }
}

/// Undecodable dead letters, kept aside under their ids by `herald wal repair`.
const DEAD_LETTER_QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("dead_letter_quarantine");

/// Reads every record of `dir/herald.redb` offline (the node must be stopped: the file is locked
/// while it runs) and, with `repair`, moves the undecodable ones to the quarantine tables.
pub(crate) fn inspect(dir: &Path, repair: bool) -> Result<Inspection, StoreError> {
    let path = dir.join("herald.redb");
    if !path.exists() {
        return Err(StoreError::Database(Arc::new(redb::Error::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} does not exist", path.display()),
        )))));
    }
    let (db, _, _) = open_db(&path)?;
    let mut out = Inspection::default();
    {
        let txn = db.begin_read().map_err(store_err)?;
        let wal = txn.open_table(WAL).map_err(store_err)?;
        for row in wal.iter().map_err(store_err)? {
            let (k, v) = row.map_err(store_err)?;
            out.wal += 1;
            if WalRecord::decode(v.value()).is_err() {
                out.bad_wal.push(k.value());
            }
        }
        let dead = txn.open_table(DEAD_LETTERS).map_err(store_err)?;
        for row in dead.iter().map_err(store_err)? {
            let (k, v) = row.map_err(store_err)?;
            out.dead_letters += 1;
            if DeadLetterRecord::decode(v.value()).is_err() {
                out.bad_dead_letters.push(k.value().to_string());
            }
        }
    }
    if repair && !(out.bad_wal.is_empty() && out.bad_dead_letters.is_empty()) {
        let txn = db.begin_write().map_err(store_err)?;
        {
            let mut wal = txn.open_table(WAL).map_err(store_err)?;
            let mut quarantine = txn.open_table(WAL_QUARANTINE).map_err(store_err)?;
            for seq in &out.bad_wal {
                if let Some(v) = wal.remove(*seq).map_err(store_err)? {
                    quarantine.insert(*seq, v.value()).map_err(store_err)?;
                }
            }
            let mut dead = txn.open_table(DEAD_LETTERS).map_err(store_err)?;
            let mut dead_q = txn.open_table(DEAD_LETTER_QUARANTINE).map_err(store_err)?;
            for id in &out.bad_dead_letters {
                if let Some(v) = dead.remove(id.as_str()).map_err(store_err)? {
                    dead_q.insert(id.as_str(), v.value()).map_err(store_err)?;
                }
            }
        }
        txn.commit().map_err(store_err)?;
        out.repaired = true;
    }
    let txn = db.begin_read().map_err(store_err)?;
    out.quarantined = txn
        .open_table(WAL_QUARANTINE)
        .map_err(store_err)?
        .len()
        .map_err(store_err)?;
    if let Ok(t) = txn.open_table(DEAD_LETTER_QUARANTINE) {
        out.quarantined += t.len().map_err(store_err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::EventRecord;

    fn open(dir: &Path, retention: Retention) -> Store {
        Store::open(dir, &WalConfig::default(), retention).unwrap()
    }

    fn wal_record(id: &str, groups: &[&str]) -> Vec<u8> {
        WalRecord {
            event: Some(EventRecord {
                id: id.into(),
                topic: "orders".into(),
                ..Default::default()
            }),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
        .encode_to_vec()
    }

    fn dead_letter(group: &str, failed_at_unix_ms: i64) -> DeadLetterRecord {
        DeadLetterRecord {
            event: Some(EventRecord {
                id: "e".into(),
                topic: "orders".into(),
                ..Default::default()
            }),
            group: group.into(),
            attempts: 3,
            error: "boom".into(),
            failed_at_unix_ms,
        }
    }

    fn seqs(chunk: &WalChunk) -> Vec<u64> {
        chunk.iter().map(|(seq, _)| *seq).collect()
    }

    /// Runs the writer's tick work now (the ticker thread would, within 500 ms) and waits for it.
    async fn tick(store: &Store) {
        store.ops.send(Op::Tick(false)).unwrap();
        store.flush().await.unwrap();
    }

    async fn dead_letter_ids(store: &Store) -> Vec<String> {
        store.flush().await.unwrap();
        store
            .dead_letters(None, 100)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    #[tokio::test]
    async fn replay_reads_the_wal_in_chunks_up_to_where_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Retention::default());
        assert_eq!(store.wal_last().unwrap(), None);
        let records = (0..5).map(|i| wal_record(&format!("e{i}"), &["g"])).collect();
        let appended = store.append(records).await.unwrap();
        assert_eq!(appended, vec![1, 2, 3, 4, 5]);
        let upto = store.wal_last().unwrap().unwrap();
        // Appended after replay started: not replayed (it is being delivered already).
        store.append(vec![wal_record("late", &["g"])]).await.unwrap();
        let first = store.wal_chunk(None, upto, 2).unwrap();
        assert_eq!(seqs(&first), vec![1, 2]);
        let second = store.wal_chunk(Some(2), upto, 2).unwrap();
        assert_eq!(seqs(&second), vec![3, 4]);
        let last = store.wal_chunk(Some(4), upto, 2).unwrap();
        assert_eq!(seqs(&last), vec![5]);
        assert!(store.wal_chunk(Some(5), upto, 2).unwrap().is_empty());
        let ids: Vec<String> = first.into_iter().map(|(_, r)| r.unwrap().event.unwrap().id).collect();
        assert_eq!(ids, vec!["e0", "e1"]);
        // Finished events leave the WAL; a chunk skips the holes.
        store.ack_all(vec![2, 3]);
        store.flush().await.unwrap();
        assert_eq!(seqs(&store.wal_chunk(None, upto, 10).unwrap()), vec![1, 4, 5]);
    }

    #[tokio::test]
    async fn undecodable_records_are_read_as_errors_quarantined_and_their_numbers_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Retention::default());
        let seqs_in = store
            .append(vec![
                wal_record("a", &["g"]),
                vec![0xff, 0xff, 0xff],
                wal_record("b", &["g"]),
            ])
            .await
            .unwrap();
        let chunk = store.wal_chunk(None, 3, 10).unwrap();
        let decoded: Vec<bool> = chunk.iter().map(|(_, r)| r.is_ok()).collect();
        assert_eq!(decoded, vec![true, false, true]);
        assert_eq!(store.quarantine(vec![seqs_in[1], 99]).await.unwrap(), 1);
        assert_eq!(seqs(&store.wal_chunk(None, 3, 10).unwrap()), vec![1, 3]);
        // A quarantined record that was the last one: a reopened store does not reuse its number.
        assert_eq!(store.append(vec![vec![0xff]]).await.unwrap(), vec![4]);
        assert_eq!(store.quarantine(vec![4]).await.unwrap(), 1);
        store.ack_all(vec![1, 3]);
        store.flush().await.unwrap();
        let closed = store.closed();
        drop(store);
        closed.await;
        let store = open(dir.path(), Retention::default());
        assert_eq!(store.wal_last().unwrap(), None);
        assert_eq!(store.append(vec![wal_record("c", &["g"])]).await.unwrap(), vec![5]);
    }

    #[tokio::test]
    async fn a_replayed_dead_letter_moves_to_the_wal_owed_to_its_group_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Retention::default());
        store
            .put_dead_letter("d1".into(), dead_letter("billing", 0))
            .await
            .unwrap();
        let (seq, record) = store.replay_dead_letter("d1".into()).await.unwrap().unwrap();
        assert_eq!(record.group, "billing");
        assert!(store.dead_letter("d1").unwrap().is_none(), "moved, not copied");
        let chunk = store.wal_chunk(None, seq, 10).unwrap();
        let [(got, Ok(wal))] = chunk.as_slice() else {
            panic!("one decodable record: {chunk:?}");
        };
        assert_eq!((*got, wal.groups.as_slice()), (seq, &["billing".to_string()][..]));
        assert!(store.replay_dead_letter("d1".into()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn retention_by_count_deletes_the_oldest_dead_letters_beyond_the_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            max_age: None,
            max_count: Some(2),
        };
        let store = open(dir.path(), retention);
        let now = chrono::Utc::now().timestamp_millis();
        for id in ["01", "02", "03", "04", "05"] {
            store.put_dead_letter(id.into(), dead_letter("g", now)).await.unwrap();
        }
        tick(&store).await;
        assert_eq!(dead_letter_ids(&store).await, vec!["04", "05"]);
        tick(&store).await;
        assert_eq!(dead_letter_ids(&store).await, vec!["04", "05"], "nothing more");
    }

    /// A store keeping dead letters for an hour, now and two hours ago (Unix ms).
    fn keeping_an_hour(dir: &Path) -> (Store, i64, i64) {
        let retention = Retention {
            max_age: Some(Duration::from_secs(3600)),
            max_count: None,
        };
        let now = chrono::Utc::now().timestamp_millis();
        (open(dir, retention), now, now - 2 * 3600 * 1000)
    }

    #[tokio::test]
    async fn retention_by_age_deletes_old_dead_letters_from_the_oldest_and_stops_at_a_recent_one() {
        let dir = tempfile::tempdir().unwrap();
        let (store, now, old) = keeping_an_hour(dir.path());
        // Ids are time-ordered in real use; "03" out of order shows where deletion stops.
        for (id, at) in [("01", old), ("02", old), ("03", now), ("04", old)] {
            store.put_dead_letter(id.into(), dead_letter("g", at)).await.unwrap();
        }
        tick(&store).await;
        assert_eq!(dead_letter_ids(&store).await, vec!["03", "04"]);
    }

    #[tokio::test]
    async fn a_dead_letter_that_does_not_decode_is_aged_by_its_ulid_and_does_not_block_retention() {
        let dir = tempfile::tempdir().unwrap();
        let (store, now, old) = keeping_an_hour(dir.path());
        let ulid_at = |ms: i64| ulid::Ulid::from_parts(ms as u64, 1).to_string();
        let (first, corrupt, after, recent) = (ulid_at(old - 2), ulid_at(old - 1), ulid_at(old), ulid_at(now));
        store
            .put_dead_letter(first.clone(), dead_letter("g", old))
            .await
            .unwrap();
        store
            .put_dead_letter(after.clone(), dead_letter("g", old))
            .await
            .unwrap();
        store
            .put_dead_letter(recent.clone(), dead_letter("g", now))
            .await
            .unwrap();
        store.flush().await.unwrap();
        {
            let guard = store.db.db.read().unwrap();
            let txn = guard.as_ref().unwrap().begin_write().unwrap();
            txn.open_table(DEAD_LETTERS)
                .unwrap()
                .insert(corrupt.as_str(), &[0xffu8, 0xff, 0xff][..])
                .unwrap();
            txn.commit().unwrap();
        }
        let stored = || {
            let guard = store.db.db.read().unwrap();
            let txn = guard.as_ref().unwrap().begin_read().unwrap();
            txn.open_table(DEAD_LETTERS).unwrap().len().unwrap()
        };
        assert_eq!(stored(), 4);
        let listed = vec![first, after, recent.clone()];
        assert_eq!(dead_letter_ids(&store).await, listed, "listed without the corrupt one");
        tick(&store).await;
        assert_eq!(dead_letter_ids(&store).await, vec![recent], "the old ones are deleted");
        assert_eq!(stored(), 1, "the corrupt one too");
    }

    #[tokio::test]
    async fn retention_by_count_and_age_deletes_the_excess_then_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            max_age: Some(Duration::from_secs(3600)),
            max_count: Some(3),
        };
        let store = open(dir.path(), retention);
        let now = chrono::Utc::now().timestamp_millis();
        let old = now - 2 * 3600 * 1000;
        for (id, at) in [("01", now), ("02", old), ("03", old), ("04", now), ("05", now)] {
            store.put_dead_letter(id.into(), dead_letter("g", at)).await.unwrap();
        }
        // Two beyond the count ("01", recent, and "02"), then "03" for its age.
        tick(&store).await;
        assert_eq!(dead_letter_ids(&store).await, vec!["04", "05"]);
    }

    /// A store that compacts as soon as `after_removed` records were removed.
    fn open_compacting(dir: &Path, wal: &WalConfig, retention: Retention, after_removed: u64) -> Store {
        let compaction = Compaction {
            after_removed,
            every: Duration::ZERO,
        };
        Store::open_with(dir, wal, retention, compaction).unwrap()
    }

    fn file_size(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("herald.redb")).unwrap().len()
    }

    /// A WAL record of about 4 KiB.
    fn big_record(i: usize) -> Vec<u8> {
        WalRecord {
            event: Some(EventRecord {
                id: format!("e{i}"),
                topic: "orders".into(),
                data: vec![i as u8; 4096].into(),
                ..Default::default()
            }),
            groups: vec!["g".into()],
        }
        .encode_to_vec()
    }

    fn big_dead_letter(at: i64) -> DeadLetterRecord {
        let mut d = dead_letter("g", at);
        d.event.as_mut().unwrap().data = vec![7u8; 4096].into();
        d
    }

    #[tokio::test]
    async fn the_file_shrinks_once_enough_wal_records_and_dead_letters_are_removed_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            max_age: None,
            max_count: Some(10),
        };
        let store = open_compacting(dir.path(), &WalConfig::default(), retention, 2_000);
        // 8 MiB of WAL records and 4 MiB of dead letters, of which retention keeps 10. (The
        // store's own ticker may run retention or a compaction at any time too; the order of the
        // removals makes the outcome the same.)
        let mut done = Vec::new();
        for chunk in 0..20 {
            let records = (0..100).map(|i| big_record(chunk * 100 + i)).collect();
            done.extend(store.append(records).await.unwrap());
        }
        let now = chrono::Utc::now().timestamp_millis();
        for i in 0..1_000 {
            store
                .put_dead_letter(format!("{i:04}"), big_dead_letter(now))
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        let full = file_size(dir.path());
        assert!(full > 12 << 20, "3,000 records of 4 KiB make a file of {full} bytes");
        let compactions = || store.db.compactions.load(std::sync::atomic::Ordering::Relaxed);
        // 990 dead letters removed: below the threshold.
        tick(&store).await;
        assert_eq!(dead_letter_ids(&store).await.len(), 10);
        assert_eq!(compactions(), 0, "no compaction before 2,000 removals");
        // All WAL records but the last 10 finished: 2,980 removals, and the next tick compacts.
        let keep = done.split_off(done.len() - 10);
        store.ack_all(done);
        store.flush().await.unwrap();
        tick(&store).await;
        assert_eq!(compactions(), 1);
        let compacted = file_size(dir.path());
        assert!(
            compacted * 4 < full,
            "the file shrinks to less than a quarter: {full} -> {compacted} bytes"
        );
        // What was kept is intact, and the sequence goes on.
        let upto = store.wal_last().unwrap().unwrap();
        let chunk = store.wal_chunk(None, upto, 100).unwrap();
        assert_eq!(seqs(&chunk), keep);
        let first = chunk[0].1.as_ref().unwrap().event.as_ref().unwrap();
        assert_eq!((first.id.as_str(), first.data.len()), ("e1990", 4096));
        let kept: Vec<String> = (990..1_000).map(|i| format!("{i:04}")).collect();
        assert_eq!(dead_letter_ids(&store).await, kept);
        assert_eq!(store.append(vec![big_record(0)]).await.unwrap(), vec![upto + 1]);
    }

    #[tokio::test]
    async fn with_fsync_never_the_file_is_never_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let wal = WalConfig {
            fsync: FsyncPolicy::Never,
            ..WalConfig::default()
        };
        let store = open_compacting(dir.path(), &wal, Retention::default(), 100);
        let seqs = store.append((0..500).map(big_record).collect()).await.unwrap();
        store.ack_all(seqs);
        store.flush().await.unwrap();
        tick(&store).await;
        tick(&store).await;
        let compactions = store.db.compactions.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(compactions, 0, "a compaction would commit durably");
        assert_eq!(store.wal_last().unwrap(), None);
    }

    #[test]
    fn a_zero_retention_setting_means_keep_forever() {
        let mut h = HandlerConfig {
            dead_letter_max_age_s: 0,
            dead_letter_max_count: 0,
            ..HandlerConfig::default()
        };
        let r = Retention::of(&h);
        assert_eq!((r.max_age, r.max_count), (None, None));
        h.dead_letter_max_age_s = 60;
        h.dead_letter_max_count = 10;
        let r = Retention::of(&h);
        assert_eq!((r.max_age, r.max_count), (Some(Duration::from_secs(60)), Some(10)));
    }

    #[test]
    fn a_full_disk_is_told_apart_from_other_storage_faults() {
        let io = |e: std::io::Error| StoreError::Database(Arc::new(redb::Error::Io(e)));
        for code in [28, 122] {
            let e = io(std::io::Error::from_raw_os_error(code)).classify();
            assert!(matches!(e, StoreError::Full(_)), "errno {code}: {e}");
            assert!(e.is_storage_fault());
        }
        let other = io(std::io::Error::other("bad sector")).classify();
        assert!(matches!(other, StoreError::Database(_)));
        assert!(other.is_storage_fault(), "an I/O error closes the database too");
        let closed = StoreError::Database(Arc::new(redb::Error::DatabaseClosed));
        assert!(closed.is_storage_fault());
        assert!(!StoreError::Stopped.is_storage_fault());
        let corrupt = StoreError::Corrupt {
            what: "WAL record",
            key: "1".into(),
            source: WalRecord::decode(&[0xff][..]).unwrap_err(),
        };
        assert!(!corrupt.classify().is_storage_fault(), "a bad record is not a bad disk");
    }
}
