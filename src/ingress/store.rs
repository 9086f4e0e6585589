//! The node's durable store on redb: the write-ahead log of accepted events and the dead letters.
//!
//! One writer thread owns every write. Callers send operations over a channel; the writer takes
//! everything queued (up to `wal.max_batch`), applies it in one transaction and commits once —
//! group commit — then answers each caller. Under load one fsync covers thousands of events, which
//! is what keeps `ack=accepted` fast. Reads use redb's concurrent read transactions directly.
//! (The event-plane simulation runs the same writer on the calling thread instead, one batch per
//! call, so that its virtual time stands still while it writes: `Store::open_inline`, test only.)
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
//! healthy again. Acks that could not be written are kept and written after the recovery, and so
//! is, with `interval`, everything the commits since the last durable one wrote (the reopened
//! file went back to it; `Writer::redo`).
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
pub(crate) const TICK: Duration = Duration::from_millis(500);

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
    /// A record is damaged (its checksum failed, or it did not decode): the disk changed it, or
    /// something else wrote it.
    #[error("store: corrupt {what} {key}: {source}")]
    Corrupt {
        /// `WAL record` or `dead letter`.
        what: &'static str,
        /// The record's key.
        key: String,
        /// Why it is not a record: its checksum failed, or it did not decode.
        #[source]
        source: RecordError,
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

/// WAL records with their sequence numbers, each decoded or damaged ([`Store::wal_chunk`]).
pub(crate) type WalChunk = Vec<(u64, Result<WalRecord, RecordError>)>;

/// Why a stored value (a WAL record, a dead letter) is not a record.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The bytes are not the ones written: the disk (or something else) changed them.
    #[error("checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum {
        /// The checksum stored with the value.
        stored: u32,
        /// The checksum of the bytes read.
        computed: u32,
    },
    /// Too short to hold its checksum.
    #[error("truncated ({0} bytes)")]
    Truncated(usize),
    /// The checksum holds (or there is none) but the bytes are not the record.
    #[error(transparent)]
    Decode(#[from] prost::DecodeError),
}

/// The first byte of a checksummed value. No protobuf field is numbered 0, so a value written
/// before records were checksummed (a bare message) never starts with it.
const CHECKED: u8 = 0;

/// A stored value: [`CHECKED`], the CRC-32 of the rest (little-endian), then the message that
/// `encode` appends.
fn checked_value(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = vec![CHECKED, 0, 0, 0, 0];
    encode(&mut buf);
    let crc = crc32fast::hash(&buf[5..]);
    buf[1..5].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Reads a stored value ([`checked_value`]); a bare message of an older Herald is read unchecked.
fn read_checked<M: Message + Default>(v: &[u8]) -> Result<M, RecordError> {
    match v.first() {
        Some(&CHECKED) => {
            let (head, record) = v.split_at_checked(5).ok_or(RecordError::Truncated(v.len()))?;
            let stored = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
            let computed = crc32fast::hash(record);
            if stored != computed {
                return Err(RecordError::Checksum { stored, computed });
            }
            Ok(M::decode(record)?)
        }
        _ => Ok(M::decode(v)?),
    }
}

/// A WAL value: the `WalRecord` that `encode` appends, with its checksum ([`checked_value`]). The
/// checksum is computed by the caller's thread (the publishing one), not the writer's.
pub(crate) fn wal_value(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    checked_value(encode)
}

/// Reads a WAL value ([`wal_value`]); a bare `WalRecord` of an older Herald is read unchecked.
pub(crate) fn read_wal_value(v: &[u8]) -> Result<WalRecord, RecordError> {
    read_checked(v)
}

/// Reads a stored dead letter (checksummed like a WAL value, or bare from an older Herald).
fn read_dead_letter(v: &[u8]) -> Result<DeadLetterRecord, RecordError> {
    read_checked(v)
}

/// A disk that changed what it stored: flips bit `bit` (modulo the value's bits) of the WAL
/// record `pick` (modulo their number) in the closed store in `dir`. Answers the record's
/// sequence number and its event's id, or `None` for an empty WAL. Test only (the simulation).
#[cfg(test)]
pub(crate) fn flip_a_bit(dir: &Path, pick: u64, bit: u64) -> Option<(u64, String)> {
    let db = Database::create(dir.join("herald.redb")).expect("open the closed store");
    let txn = db.begin_write().expect("write");
    let found = {
        let mut wal = txn.open_table(WAL).expect("the WAL table");
        let n = wal.len().expect("count");
        if n == 0 {
            None
        } else {
            let (seq, mut value) = {
                let row = wal.iter().expect("iterate").nth((pick % n) as usize)?.expect("read");
                (row.0.value(), row.1.value().to_vec())
            };
            let id = read_wal_value(&value).ok()?.event?.id;
            let bit = (bit % (value.len() as u64 * 8)) as usize;
            value[bit / 8] ^= 1 << (bit % 8);
            wal.insert(seq, value.as_slice()).expect("write back");
            Some((seq, id))
        }
    };
    txn.commit().expect("commit");
    found
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    /// Append records; answers their sequence numbers.
    /// Each record is a WAL value ([`wal_value`]).
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
    /// The writer, run on the calling thread ([`Store::open_inline`]).
    #[cfg(test)]
    inline: Option<Arc<Mutex<Inline>>>,
}

/// The writer of an inline store and the operations queued for it.
#[cfg(test)]
struct Inline {
    /// `None` once the store crashed.
    writer: Option<Writer>,
    rx: mpsc::UnboundedReceiver<Op>,
}

/// The database; when the last handle goes, it is closed (releasing the file lock) and only then
/// are the [`Store::closed`] watchers told. `None` between a storage fault and the reopening.
struct Db {
    path: PathBuf,
    disk: Disk,
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

/// The disk the database's file is on: the machine's (a zero-sized value), or in tests one whose
/// writes fail on demand ([`FailingDisk`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Disk {
    #[cfg(test)]
    failing: Option<Arc<FailingDisk>>,
}

#[cfg(test)]
impl Disk {
    /// The file on `disk`, whose writes fail while it says so.
    pub(crate) fn failing(disk: Arc<FailingDisk>) -> Disk {
        Disk { failing: Some(disk) }
    }
}

/// A disk whose writes (and syncs, and growth) fail with an errno while one is set, as a full
/// disk (ENOSPC) or a failing one (EIO) does; reads go on. Test only.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct FailingDisk {
    errno: std::sync::atomic::AtomicI32,
}

#[cfg(test)]
impl FailingDisk {
    /// Writes fail with `errno` from now on (0: they succeed again).
    pub(crate) fn fail_with(&self, errno: i32) {
        self.errno.store(errno, std::sync::atomic::Ordering::Relaxed);
    }

    fn check(&self) -> std::io::Result<()> {
        match self.errno.load(std::sync::atomic::Ordering::Relaxed) {
            0 => Ok(()),
            errno => Err(std::io::Error::from_raw_os_error(errno)),
        }
    }
}

/// redb's file on a [`FailingDisk`]. It takes no file locks (redb then allows one writer, which
/// the store is).
#[cfg(test)]
#[derive(Debug)]
struct FailingFile {
    file: std::fs::File,
    disk: Arc<FailingDisk>,
}

#[cfg(test)]
impl FailingFile {
    fn open(path: &Path, disk: Arc<FailingDisk>) -> Result<FailingFile, StoreError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(store_err)?;
        Ok(FailingFile { file, disk })
    }
}

#[cfg(test)]
impl redb::StorageBackend for FailingFile {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, out, offset)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.disk.check()?;
        self.file.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.disk.check()?;
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.disk.check()?;
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, offset)
    }
}

/// Opens (or creates) the database at `path` with its tables; answers the next WAL sequence
/// number and the number of WAL records.
/// With `check`, redb verifies its page checksums first (the whole file is read).
fn open_db(path: &Path, disk: &Disk, check: bool) -> Result<(Database, u64, u64), StoreError> {
    let mut builder = Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    // With `check`, a file damaged outside redb (a disk that changed its bytes) fails to open with
    // an error rather than a panic.
    builder.set_check_integrity_on_open(check);
    #[cfg(test)]
    let db = match &disk.failing {
        Some(failing) => builder.create_with_backend(FailingFile::open(path, failing.clone())?),
        None => builder.create(path),
    };
    #[cfg(not(test))]
    let db = {
        let Disk {} = disk;
        builder.create(path)
    };
    let db = db.map_err(store_err)?;
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
        let (db, writer, closed) = Store::prepare(dir, wal, retention, compaction, Disk::default())?;
        let (tx, rx) = mpsc::unbounded_channel();
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
        Ok(Store {
            db,
            ops: tx,
            closed,
            #[cfg(test)]
            inline: None,
        })
    }

    /// A store whose operations are written on the calling thread, at once (no writer or ticker
    /// thread, no group commit across calls), on `disk`: the event-plane simulation, whose
    /// virtual time must not run on while a write is under way, and whose runs must replay
    /// exactly. Nothing ticks it: the caller does ([`Store::tick_inline`]).
    #[cfg(test)]
    pub(crate) fn open_inline(dir: &Path, wal: &WalConfig, retention: Retention, disk: Disk) -> Result<Store> {
        let (db, writer, closed) = Store::prepare(dir, wal, retention, Compaction::default(), disk)?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Store {
            db,
            ops: tx,
            closed,
            inline: Some(Arc::new(Mutex::new(Inline {
                writer: Some(writer),
                rx,
            }))),
        })
    }

    /// The simulation's crash of an inline store, as a killed process has it: the file keeps what
    /// was written to it and nothing more (redb's buffered pages, its non-durable commits and its
    /// clean close are lost: the next open recovers to the last durable commit); the file is
    /// closed at once, so the node's next run can open it, and every later operation of this run
    /// fails.
    #[cfg(test)]
    pub(crate) fn crash(&self) {
        if let Some(inline) = &self.inline {
            inline.lock().unwrap_or_else(|p| p.into_inner()).writer = None;
        }
        self.db.set_problem(Some(StoreError::Stopped));
        // What the kernel holds at the moment of the kill; closing redb would write more.
        let on_disk = std::fs::read(&self.db.path).expect("read the WAL file at the crash");
        self.db.db.write().unwrap_or_else(|p| p.into_inner()).take();
        std::fs::write(&self.db.path, on_disk).expect("put back the WAL file as the crash left it");
    }

    /// What the ticker thread does, for an inline store (the simulation runs its own ticker in
    /// virtual time): housekeeping, the recovery from a storage fault, and with `flush` a durable
    /// commit if anything is not yet. Whether the store takes writes after it (with `flush`:
    /// everything it holds is durable).
    #[cfg(test)]
    pub(crate) fn tick_inline(&self, flush: bool) -> bool {
        let _ = self.send(Op::Tick(flush));
        self.db.problem().is_none()
    }

    /// Queues `op` for the writer (an inline store writes it now).
    fn send(&self, op: Op) -> Result<(), StoreError> {
        self.ops.send(op).map_err(|_| StoreError::Stopped)?;
        #[cfg(test)]
        if let Some(inline) = &self.inline {
            let mut inline = inline.lock().unwrap_or_else(|p| p.into_inner());
            let mut batch = Vec::new();
            while let Ok(op) = inline.rx.try_recv() {
                batch.push(op);
            }
            match &mut inline.writer {
                Some(writer) => writer.step(&mut batch),
                None => batch.into_iter().for_each(|op| op.fail(&StoreError::Stopped)),
            }
        }
        Ok(())
    }

    /// Opens the database and makes the writer that will own its writes.
    fn prepare(
        dir: &Path,
        wal: &WalConfig,
        retention: Retention,
        compaction: Compaction,
        disk: Disk,
    ) -> Result<(Arc<Db>, Writer, watch::Receiver<()>)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create data dir {}", dir.display()), e))?;
        let path = dir.join("herald.redb");
        let (db, next_seq, len) = open_db(&path, &disk, true).map_err(|e| Error::Store {
            path: path.clone(),
            message: match &e {
                StoreError::Database(inner) if matches!(**inner, redb::Error::Corrupted(_)) => format!(
                    "{e}; the file's pages fail their checksums (changed outside Herald: a failing disk?). \
                     Keep a copy, then move it aside to start with an empty write-ahead log: the events it \
                     held that were not delivered are lost"
                ),
                _ => e.to_string(),
            },
        })?;
        metrics::gauge!(crate::metrics::WAL_EVENTS).set(len as f64);
        metrics::gauge!(crate::metrics::STORAGE_UNHEALTHY).set(0.0);
        let (closed_tx, closed) = watch::channel(());
        let db = Arc::new(Db {
            path,
            disk,
            db: RwLock::new(Some(db)),
            problem: Mutex::new(None),
            compactions: Default::default(),
            _closed: closed_tx,
        });
        let writer = Writer {
            db: db.clone(),
            fsync: wal.fsync,
            max_batch: wal.max_batch,
            next_seq,
            dirty: false,
            deferred_acks: Vec::new(),
            redo: Vec::new(),
            last_attempt: None,
            retention,
            removed: 0,
            last_compaction: crate::monitor::now(),
            compaction,
        };
        Ok((db, writer, closed))
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(op(tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Appends records, each a WAL value ([`wal_value`]) (one group commit with whatever else is
    /// queued), durably as `wal.fsync` says.
    pub(crate) async fn append(&self, records: Vec<Vec<u8>>) -> Result<Vec<u64>, StoreError> {
        self.call(|r| Op::Append(records, r)).await
    }

    /// Drops a finished event from the WAL (batched with the next commit).
    pub(crate) fn ack(&self, seq: u64) {
        let _ = self.send(Op::Ack(vec![seq]));
    }

    /// Drops finished events from the WAL (batched with the next commit).
    pub(crate) fn ack_all(&self, seqs: Vec<u64>) {
        if !seqs.is_empty() {
            let _ = self.send(Op::Ack(seqs));
        }
    }

    pub(crate) async fn put_dead_letter(&self, id: String, record: DeadLetterRecord) -> Result<(), StoreError> {
        self.call(|r| Op::DeadLetter(id, Box::new(record), r)).await
    }

    pub(crate) async fn replay_dead_letter(&self, id: String) -> Result<Option<(u64, DeadLetterRecord)>, StoreError> {
        self.call(|r| Op::Replay(id, r)).await
    }

    /// Moves damaged WAL records (checksum failed, undecodable) to the quarantine table; answers
    /// how many were moved.
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
    /// (`Err`) damaged: its checksum failed or it does not decode. One short read transaction
    /// per chunk, so start-up replay holds one chunk in memory, not the WAL.
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
                out.push((k.value(), read_wal_value(v.value())));
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
                match read_dead_letter(v.value()) {
                    Ok(record) => out.push((k.value().to_string(), record)),
                    // Skipped, not fatal: one bad record must not hide all the others. It cannot
                    // be replayed; retention deletes it by the age of its id.
                    Err(error) => tracing::warn!(id = k.value(), %error, "skipped a damaged dead letter (checksum failed or undecodable)"),
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
                Some(v) => read_dead_letter(v.value())
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
    /// `interval`: what the commits since the last durable one wrote, in order. A storage fault
    /// takes the file back to that commit while the node goes on from what it was told (events
    /// accepted, dead letters stored, records acked or quarantined), so [`Writer::recover`] writes
    /// it all again. Without it, acks came undone (finished events lingered in the WAL until the
    /// next start delivered them again) and so did dead letters and quarantines.
    redo: Vec<Redo>,
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
            self.step(&mut batch);
        }
    }

    /// Writes one batch of operations (a group commit) and answers them.
    fn step(&mut self, batch: &mut Vec<Op>) {
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
            return;
        }
        if ticked {
            self.housekeeping();
        }
        let flush = self.fsync == FsyncPolicy::Interval && flush_due && self.dirty;
        if batch.is_empty() && self.deferred_acks.is_empty() && !flush {
            return;
        }
        let durable = match self.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval => flush_due,
            FsyncPolicy::Never => false,
        };
        let seq_before = self.next_seq;
        let mut pending = Vec::with_capacity(batch.len());
        let mut acks = std::mem::take(&mut self.deferred_acks);
        match self.commit(batch, &mut pending, &mut acks, durable) {
            Ok(delta) => {
                metrics::counter!(crate::metrics::WAL_COMMITS).increment(1);
                if durable {
                    metrics::counter!(crate::metrics::WAL_FLUSHES).increment(1);
                }
                self.dirty = !durable;
                if durable {
                    self.redo.clear();
                }
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

    /// A commit failed with an I/O error: redb refuses further writes until it is reopened, so
    /// close it and report the problem until [`Writer::recover`] succeeds.
    fn fault(&mut self, e: StoreError) {
        tracing::error!(error = %e, "the store refuses writes; publishing answers storage_full or wal_unavailable and /readyz 503 until it recovers");
        self.db.set_problem(Some(e));
        self.db.db.write().unwrap_or_else(|p| p.into_inner()).take();
        self.last_attempt = Some(crate::monitor::now());
    }

    /// Reopens the database and probes it with a small durable commit; true once the store takes
    /// writes again. Tried on ticks, and at most every [`RETRY`] for operations in between.
    fn recover(&mut self, ticked: bool) -> bool {
        if !ticked
            && self
                .last_attempt
                .is_some_and(|t| crate::monitor::now().saturating_duration_since(t) < RETRY)
        {
            return false;
        }
        self.last_attempt = Some(crate::monitor::now());
        let mut guard = self.db.db.write().unwrap_or_else(|p| p.into_inner());
        guard.take();
        let redo = &self.redo;
        // Checked when the store opened; a reopening after an I/O error is tried every tick while
        // the disk fails, and need not read the whole file each time (redb recovers its own
        // unfinished commit).
        let reopened = open_db(&self.db.path, &self.db.disk, false).and_then(|(db, next_seq, len)| {
            let txn = db.begin_write().map_err(store_err)?;
            let len = {
                let mut probe = txn.open_table(PROBE).map_err(store_err)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                probe.insert(0, now).map_err(store_err)?;
                // What the non-durable commits the reopening went back on had written.
                if redo.is_empty() {
                    len
                } else {
                    let mut tables = Tables::open(&txn)?;
                    for r in redo {
                        r.write(&mut tables)?;
                    }
                    tables.wal.len().map_err(store_err)?
                }
            };
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
                self.redo.clear();
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
        // What this commit writes, kept if it is not durable (`interval`; see `redo`).
        let mut redo = (self.fsync == FsyncPolicy::Interval && !durable).then(Vec::new);
        {
            let mut tables = Tables::open(&txn)?;
            for seq in acks.iter() {
                if tables.wal.remove(*seq).map_err(store_err)?.is_some() {
                    delta -= 1;
                    self.removed += 1;
                }
            }
            if let Some(redo) = &mut redo {
                redo.extend(acks.iter().map(|&seq| Redo::Remove(seq)));
            }
            let mut rest = std::mem::take(ops).into_iter();
            while let Some(op) = rest.next() {
                let applied = self.apply(op, &mut tables, pending, acks, redo.as_mut());
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
        if let Some(redo) = redo {
            self.redo.extend(redo);
        }
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
            && crate::monitor::now().saturating_duration_since(self.last_compaction) >= self.compaction.every
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
        let failed_at = |id: &str, v: &[u8]| match read_dead_letter(v) {
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
        self.last_compaction = crate::monitor::now();
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
        tables: &mut Tables,
        pending: &mut Vec<Answer>,
        acks: &mut Vec<u64>,
        mut redo: Option<&mut Vec<Redo>>,
    ) -> Result<i64, StoreError> {
        let Tables { wal, dead, quarantine } = tables;
        let mut delta = 0i64;
        match op {
            Op::Append(records, reply) => {
                let mut seqs = Vec::with_capacity(records.len());
                for r in records {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    wal.insert(seq, r.as_slice()).map_err(store_err)?;
                    seqs.push(seq);
                    if let Some(redo) = redo.as_deref_mut() {
                        redo.push(Redo::Insert(seq, r));
                    }
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
                if let Some(redo) = redo {
                    redo.extend(seqs.iter().map(|&seq| Redo::Remove(seq)));
                }
                acks.extend(seqs);
            }
            Op::DeadLetter(id, record, reply) => {
                let value = checked_value(|buf| record.encode_raw(buf));
                dead.insert(id.as_str(), value.as_slice()).map_err(store_err)?;
                if let Some(redo) = redo {
                    redo.push(Redo::PutDead(id, value));
                }
                pending.push(answer(reply, ()));
            }
            Op::Replay(id, reply) => {
                let found = dead
                    .remove(id.as_str())
                    .map_err(store_err)?
                    .map(|v| read_dead_letter(v.value()));
                let found_record = match found {
                    Some(Ok(record)) => {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        let wal_record = WalRecord {
                            event: record.event.clone(),
                            groups: vec![record.group.clone()],
                        };
                        let value = wal_value(|buf| wal_record.encode_raw(buf));
                        wal.insert(seq, value.as_slice()).map_err(store_err)?;
                        if let Some(redo) = redo {
                            redo.push(Redo::RemoveDead(id.clone()));
                            redo.push(Redo::Insert(seq, value));
                        }
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
                    if let Some(redo) = redo.as_deref_mut() {
                        redo.push(Redo::Quarantine(seq, v.value().to_vec()));
                    }
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

/// The tables a write transaction changes.
struct Tables<'t> {
    wal: redb::Table<'t, u64, &'static [u8]>,
    dead: redb::Table<'t, &'static str, &'static [u8]>,
    quarantine: redb::Table<'t, u64, &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Tables<'t>, StoreError> {
        Ok(Tables {
            wal: txn.open_table(WAL).map_err(store_err)?,
            dead: txn.open_table(DEAD_LETTERS).map_err(store_err)?,
            quarantine: txn.open_table(WAL_QUARANTINE).map_err(store_err)?,
        })
    }
}

/// One write of a non-durable commit, kept to be written again after a storage fault
/// ([`Writer::recover`]).
enum Redo {
    /// A WAL record (an append, or a replayed dead letter).
    Insert(u64, Vec<u8>),
    /// A finished WAL record (an ack).
    Remove(u64),
    /// A dead letter stored.
    PutDead(String, Vec<u8>),
    /// A dead letter replayed (moved to the WAL).
    RemoveDead(String),
    /// A damaged WAL record moved to the quarantine table.
    Quarantine(u64, Vec<u8>),
}

impl Redo {
    fn write(&self, t: &mut Tables) -> Result<(), StoreError> {
        let Tables { wal, dead, quarantine } = t;
        match self {
            Redo::Insert(seq, value) => drop(wal.insert(*seq, value.as_slice()).map_err(store_err)?),
            Redo::Remove(seq) => drop(wal.remove(*seq).map_err(store_err)?),
            Redo::PutDead(id, value) => drop(dead.insert(id.as_str(), value.as_slice()).map_err(store_err)?),
            Redo::RemoveDead(id) => drop(dead.remove(id.as_str()).map_err(store_err)?),
            Redo::Quarantine(seq, value) => {
                wal.remove(*seq).map_err(store_err)?;
                quarantine.insert(*seq, value.as_slice()).map_err(store_err)?;
            }
        }
        Ok(())
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
    /// Whether a repair moved the damaged records aside.
    pub repaired: bool,
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "wal records:            {}", self.wal)?;
        writeln!(f, "damaged wal records:    {}", self.bad_wal.len())?;
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
            write!(f, "\nrepaired: the damaged records were moved to the quarantine tables")?;
        }
        Ok(())
    }
}

/// Undecodable dead letters, kept aside under their ids by `herald wal repair`.
const DEAD_LETTER_QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("dead_letter_quarantine");

/// Reads every record of `dir/herald.redb` offline (the node must be stopped: the file is locked
/// while it runs) and, with `repair`, moves the damaged ones to the quarantine tables.
pub(crate) fn inspect(dir: &Path, repair: bool) -> Result<Inspection, StoreError> {
    let path = dir.join("herald.redb");
    if !path.exists() {
        return Err(StoreError::Database(Arc::new(redb::Error::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} does not exist", path.display()),
        )))));
    }
    let (db, _, _) = open_db(&path, &Disk::default(), true)?;
    let mut out = Inspection::default();
    {
        let txn = db.begin_read().map_err(store_err)?;
        let wal = txn.open_table(WAL).map_err(store_err)?;
        for row in wal.iter().map_err(store_err)? {
            let (k, v) = row.map_err(store_err)?;
            out.wal += 1;
            if read_wal_value(v.value()).is_err() {
                out.bad_wal.push(k.value());
            }
        }
        let dead = txn.open_table(DEAD_LETTERS).map_err(store_err)?;
        for row in dead.iter().map_err(store_err)? {
            let (k, v) = row.map_err(store_err)?;
            out.dead_letters += 1;
            if read_dead_letter(v.value()).is_err() {
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
        let record = WalRecord {
            event: Some(EventRecord {
                id: id.into(),
                topic: "orders".into(),
                ..Default::default()
            }),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        wal_value(|buf| record.encode_raw(buf))
    }

    /// A file damaged outside redb fails to open with an error (the node then refuses to start and
    /// says which file), never a panic: redb checks its page checksums at every open. Without the
    /// check, 7 of these 60 damaged copies made redb panic.
    #[tokio::test]
    async fn a_store_file_damaged_outside_redb_fails_to_open_with_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let open_here = || Store::open_inline(dir.path(), &WalConfig::default(), Retention::default(), Disk::default());
        {
            // Inline: the file is closed when the store is dropped, not later by a writer thread.
            let store = open_here().unwrap();
            let records = (0..200).map(|i| wal_record(&format!("e{i}"), &["g"])).collect();
            store.append(records).await.unwrap();
        }
        let path = dir.path().join("herald.redb");
        let (panicked, errors) = crate::types::damage_each_of(&path, 60, || {
            let store = open_here().map_err(|e| e.to_string())?;
            store.wal_chunk(None, u64::MAX, 1000).map_err(|e| e.to_string())?;
            Ok(())
        });
        assert_eq!(panicked, 0, "an open of a damaged file panicked");
        // What the operator reads when the node cannot start on such a file.
        assert!(
            errors
                .iter()
                .any(|e| e.contains("fail their checksums") && e.contains("move it aside")),
            "some damage must be found and explained: {errors:?}"
        );
    }

    #[test]
    fn a_wal_value_carries_a_checksum_that_catches_any_changed_byte() {
        let value = wal_record("e1", &["g"]);
        let record = read_wal_value(&value).unwrap();
        assert_eq!(record.event.unwrap().id, "e1");
        // Every single-bit change of the checksum or the record is caught; with a bit of the
        // marker changed the value reads as an older, unchecked record, which it is not.
        for i in 0..value.len() {
            for bit in 0..8 {
                let mut bad = value.clone();
                bad[i] ^= 1 << bit;
                let read = read_wal_value(&bad);
                if i == 0 {
                    assert!(read.is_err(), "marker bit {bit} flipped: {read:?}");
                } else {
                    assert!(
                        matches!(read, Err(RecordError::Checksum { .. })),
                        "byte {i} bit {bit}: {read:?}"
                    );
                }
            }
        }
        assert!(matches!(read_wal_value(&value[..3]), Err(RecordError::Truncated(3))));
        // A record an older Herald wrote (no checksum) is still read.
        let legacy = WalRecord {
            event: Some(EventRecord {
                id: "old".into(),
                topic: "orders".into(),
                ..Default::default()
            }),
            groups: vec!["g".into()],
        }
        .encode_to_vec();
        assert_eq!(read_wal_value(&legacy).unwrap().event.unwrap().id, "old");
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

    /// With `interval`, a failed disk takes the file back to its last flush, so what was committed
    /// since is lost with it while the node goes on from it: the store writes it all again once
    /// it recovers — appends, acks (or finished events linger in the WAL, to be delivered again at
    /// the next start), dead letters (or, their acks written again, they vanish) and quarantines.
    #[tokio::test]
    async fn what_interval_committed_since_the_last_flush_is_written_again_after_a_storage_fault() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(FailingDisk::default());
        let wal = WalConfig {
            fsync: FsyncPolicy::Interval,
            ..Default::default()
        };
        let store = Store::open_inline(dir.path(), &wal, Retention::default(), Disk::failing(disk.clone())).unwrap();
        let records = (0..4).map(|i| wal_record(&format!("e{i}"), &["g"])).collect();
        assert_eq!(store.append(records).await.unwrap(), vec![1, 2, 3, 4]);
        assert!(store.tick_inline(true), "flushed");
        // Not durable: an ack, a dead letter with its event's ack, a quarantine, an append.
        store.ack_all(vec![1]);
        store.put_dead_letter("d2".into(), dead_letter("g", 2)).await.unwrap();
        store.ack_all(vec![2]);
        assert_eq!(store.quarantine(vec![3]).await.unwrap(), 1);
        assert_eq!(store.append(vec![wal_record("e5", &["g"])]).await.unwrap(), vec![5]);
        async fn state(store: &Store) -> (Vec<u64>, Vec<String>) {
            let dead = dead_letter_ids(store).await;
            (seqs(&store.wal_chunk(None, u64::MAX, 10).unwrap()), dead)
        }
        let before = state(&store).await;
        assert_eq!(before, (vec![4, 5], vec!["d2".to_string()]));
        disk.fail_with(5);
        assert!(!store.tick_inline(true), "the flush fails: the store refuses writes");
        assert!(store.problem().is_some());
        disk.fail_with(0);
        assert!(store.tick_inline(true), "reopened and flushed");
        assert_eq!(state(&store).await, before, "what the fault undid is written again");
        // And durably: a crash now keeps it, the quarantined record included.
        store.crash();
        let store = Store::open_inline(dir.path(), &wal, Retention::default(), Disk::default()).unwrap();
        assert_eq!(state(&store).await, before);
        assert_eq!(
            store.append(vec![wal_record("e6", &["g"])]).await.unwrap(),
            vec![6],
            "no number reused"
        );
        let inspection = {
            store.crash();
            inspect(dir.path(), false).unwrap()
        };
        assert_eq!(inspection.quarantined, 1, "{inspection}");
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

    /// A dead letter the disk changed fails its checksum: it is left out of listings, and asked
    /// for by id (or replayed) it is an error, not an event with other bytes.
    #[tokio::test]
    async fn a_dead_letter_the_disk_changed_fails_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let open_here = || Store::open_inline(dir.path(), &WalConfig::default(), Retention::default(), Disk::default());
        {
            let store = open_here().unwrap();
            store.put_dead_letter("d1".into(), dead_letter("g", 1)).await.unwrap();
            store.put_dead_letter("d2".into(), dead_letter("g", 2)).await.unwrap();
        }
        {
            let db = Database::create(dir.path().join("herald.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut dead = txn.open_table(DEAD_LETTERS).unwrap();
                let mut value = dead.get("d1").unwrap().unwrap().value().to_vec();
                *value.last_mut().unwrap() ^= 1;
                dead.insert("d1", value.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = open_here().unwrap();
        assert_eq!(dead_letter_ids(&store).await, vec!["d2".to_string()]);
        let err = store.dead_letter("d1").unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::Corrupt {
                    source: RecordError::Checksum { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(store.replay_dead_letter("d1".into()).await.is_err());
        assert_eq!(store.dead_letter("d2").unwrap().unwrap().failed_at_unix_ms, 2);
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
            source: RecordError::Decode(WalRecord::decode(&[0xff][..]).unwrap_err()),
        };
        assert!(!corrupt.classify().is_storage_fault(), "a bad record is not a bad disk");
    }
}
