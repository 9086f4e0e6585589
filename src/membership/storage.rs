//! Raft log storage for the membership group (ARCHITECTURE.md, "Storage").
//!
//! This module owns what `raft::RawNode` must find again after a restart: the log entries, the
//! hard state (term, vote, commit), the conf state (voters and learners) and the latest snapshot of
//! the membership table. It serves them through [`raft::Storage`] and offers the write side the
//! driver loop calls, [`RaftLogStore`]: persist a `Ready`'s entries and hard state, set the commit
//! index and conf state, apply a snapshot from the leader, create a snapshot of the local state
//! machine and compact the log behind it.
//!
//! Two implementations follow one set of rules: [`MemStorage`] (in memory, for tests) and
//! [`RedbStorage`] (one redb file; every write is one transaction committed with
//! `Durability::Immediate`, so a write that returned `Ok` survives a crash). The rules — what may
//! be appended, compacted or snapshotted, and which error each mistake gets — live in one place,
//! `LogState`; a backend only stores and reads bytes. Both run the same conformance suite (`tests`).
//!
//! This module must not drive raft (no ticking, stepping or messages), interpret entry data or the
//! membership table (snapshot data is opaque bytes from the state machine), or decide when to
//! snapshot and compact: the driver does, after the state machine has applied the entries.
//!
//! # On disk
//!
//! Table `raft_entries` maps an index to its entry; table `raft_state` holds the hard state, the
//! conf state, the compaction point and the latest snapshot's metadata and data under fixed keys.
//! Records use the `eraftpb` protobuf encoding. They are declared here as prost messages with the
//! same field tags (raft's own prost 0.11 types would read the same bytes), so the on-disk format
//! does not depend on which codec raft-rs is built with.

use std::cmp;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// A Raft log storage failure: a request that breaks the log's rules, or a failing or corrupt
/// database.
///
/// Where raft needs its own error (the [`raft::Storage`] methods), [`From`] maps this into
/// `raft::Error::Store`: `Compacted`, `Unavailable`, `SnapshotOutOfDate` and
/// `SnapshotTemporarilyUnavailable` for the matching variants, `Other` (holding this error) for
/// the rest.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// The index is at or below the compaction point: its entry is gone (a snapshot covers it).
    #[error("raft log index {index} is compacted (the log starts after {compacted})")]
    Compacted {
        /// The index asked for or written.
        index: u64,
        /// The compaction point: the last index no longer in the log.
        compacted: u64,
    },
    /// The index is past the end of the log.
    #[error("raft log index {index} is past the last index {last}")]
    Unavailable {
        /// The index asked for.
        index: u64,
        /// The last index in the log.
        last: u64,
    },
    /// Appending these entries would leave a hole in the log.
    #[error("cannot append raft entry {index}: the log ends at {last}, which would leave a gap")]
    Gap {
        /// The first index to append.
        index: u64,
        /// The last index in the log.
        last: u64,
    },
    /// The entries of one append do not follow each other.
    #[error("raft entries to append are not consecutive: {index} follows {previous}")]
    NotConsecutive {
        /// The index before the hole.
        previous: u64,
        /// The index after it.
        index: u64,
    },
    /// The snapshot is older than what the storage already holds.
    #[error("raft snapshot at index {index} is out of date: the storage is already at {current}")]
    SnapshotOutOfDate {
        /// The snapshot's index.
        index: u64,
        /// The newer index the storage holds (compaction point or latest snapshot).
        current: u64,
    },
    /// No snapshot recent enough has been created yet.
    #[error(
        "no raft snapshot at or after index {requested} yet (the latest is at {latest}); the state \
         machine must create one"
    )]
    SnapshotNotReady {
        /// The lowest index acceptable to the caller.
        requested: u64,
        /// The latest snapshot's index (0: none).
        latest: u64,
    },
    /// A snapshot may only cover committed entries.
    #[error("cannot snapshot raft index {index}: it is not committed (commit index {commit})")]
    Uncommitted {
        /// The index to snapshot.
        index: u64,
        /// The commit index in the hard state.
        commit: u64,
    },
    /// Appending would overwrite a committed entry, which raft never does: a driver bug.
    #[error("cannot overwrite raft entry {index}: entries up to {commit} are committed")]
    OverwritesCommitted {
        /// The first index to append.
        index: u64,
        /// The commit index in the hard state.
        commit: u64,
    },
    /// The commit index would point past the last entry, so a restart could not recover.
    #[error("raft commit index {commit} is past the last index {last}")]
    CommitPastLast {
        /// The commit index to store.
        commit: u64,
        /// The last index in the log after the write.
        last: u64,
    },
    /// Compacting past the latest snapshot would leave lagging followers with neither the entries
    /// nor a snapshot to catch up from.
    #[error(
        "cannot compact the raft log to {index}: the latest snapshot is at {snapshot}; create a \
         snapshot at or after {index} first"
    )]
    NotSnapshotted {
        /// The index to compact to.
        index: u64,
        /// The latest snapshot's index.
        snapshot: u64,
    },
    /// The database file is already open, by this process or another one.
    #[error("raft storage {} is already open (by this or another process); close it first", path.display())]
    AlreadyOpen {
        /// The database file.
        path: PathBuf,
    },
    /// redb failed.
    #[error("raft storage {}: {op}: {source}", path.display())]
    Db {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// redb's error.
        #[source]
        source: Box<redb::Error>,
    },
    /// Stored data does not decode or breaks the log's invariants.
    #[error("raft storage {location} is corrupt: {what}")]
    Corrupt {
        /// The database file (or `memory`).
        location: String,
        /// What is wrong.
        what: String,
    },
    /// A thread panicked while holding the storage lock, so the cached state may be stale.
    #[error("raft storage lock poisoned: a thread panicked while using it; reopen the storage")]
    Poisoned,
}

impl From<LogStoreError> for raft::Error {
    fn from(e: LogStoreError) -> raft::Error {
        use raft::StorageError as S;
        raft::Error::Store(match e {
            LogStoreError::Compacted { .. } => S::Compacted,
            LogStoreError::Unavailable { .. } => S::Unavailable,
            LogStoreError::SnapshotOutOfDate { .. } => S::SnapshotOutOfDate,
            LogStoreError::SnapshotNotReady { .. } => S::SnapshotTemporarilyUnavailable,
            other => S::Other(Box::new(other)),
        })
    }
}

/// The write side of Raft log storage, on top of the [`raft::Storage`] read side.
///
/// Methods take `&self`: an implementation is a cheap handle (clone it to share it) with interior
/// locking, so the driver can give one clone to `RawNode` and still write through
/// `raw_node.store()`. Every method that returns `Ok` has made its change durable (for
/// [`RedbStorage`]) and visible to the read side; on `Err` nothing changed.
///
/// The driver loop per `Ready`: [`apply_snapshot`](Self::apply_snapshot) if the ready has one,
/// [`persist`](Self::persist) its entries and hard state, `advance`, then
/// [`set_commit`](Self::set_commit) with the light ready's commit index. After the state machine
/// applied up to `i`: [`create_snapshot`](Self::create_snapshot) at `i` with the membership table,
/// then [`compact`](Self::compact) to `i`.
pub trait RaftLogStore: Storage {
    /// Appends `entries` and sets `hard_state` (when given) in one atomic write: the shape of one
    /// `Ready` (`persist(ready.entries(), ready.hs())`).
    ///
    /// Entries must be consecutive and start at most one past the last index; any stored entry at
    /// or after the first new index (a conflicting suffix) is dropped first. Errors:
    /// [`LogStoreError::Compacted`] if they start at or below the compaction point,
    /// [`LogStoreError::OverwritesCommitted`] if at or below the stored commit index,
    /// [`LogStoreError::Gap`], [`LogStoreError::NotConsecutive`], and
    /// [`LogStoreError::CommitPastLast`] if the hard state commits past the last entry.
    fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), LogStoreError>;

    /// Appends entries, dropping any conflicting suffix (see [`persist`](Self::persist)).
    fn append(&self, entries: &[Entry]) -> Result<(), LogStoreError> {
        self.persist(entries, None)
    }

    /// Replaces the hard state.
    fn set_hardstate(&self, hard_state: HardState) -> Result<(), LogStoreError> {
        self.persist(&[], Some(&hard_state))
    }

    /// Sets only the hard state's commit index (for `LightReady::commit_index`);
    /// [`LogStoreError::CommitPastLast`] past the last entry.
    fn set_commit(&self, commit: u64) -> Result<(), LogStoreError>;

    /// Replaces the conf state (after a conf change is applied, or to bootstrap the first voters).
    fn set_conf_state(&self, conf_state: ConfState) -> Result<(), LogStoreError>;

    /// Replaces the whole log with a snapshot received from the leader: every entry is dropped,
    /// the compaction point becomes the snapshot's index and term (so `first_index` is one past
    /// its index), the conf state becomes the snapshot's, the commit index its index, and the
    /// snapshot (data included) becomes the one [`Storage::snapshot`] serves.
    ///
    /// [`LogStoreError::SnapshotOutOfDate`] if its index is at or below the compaction point or
    /// below the latest snapshot.
    fn apply_snapshot(&self, snapshot: Snapshot) -> Result<(), LogStoreError>;

    /// Drops every entry up to and including `index`, keeping `index`'s term (`term(index)` still
    /// answers; `first_index` becomes `index + 1`). A no-op at or below the compaction point.
    ///
    /// The latest snapshot must cover `index` ([`LogStoreError::NotSnapshotted`]), so a follower
    /// that needs a dropped entry can be sent the snapshot; [`LogStoreError::Unavailable`] past
    /// the last index.
    fn compact(&self, index: u64) -> Result<(), LogStoreError>;

    /// Stores the state machine's snapshot at `index` (the membership table bytes as of `index`,
    /// with `conf_state` as of `index`) so that [`Storage::snapshot`] returns it. The log is not
    /// touched: [`compact`](Self::compact) separately.
    ///
    /// `index` must be committed ([`LogStoreError::Uncommitted`]), still have a known term, and
    /// not be older than the latest snapshot or 0 ([`LogStoreError::SnapshotOutOfDate`]).
    fn create_snapshot(&self, index: u64, conf_state: ConfState, data: Vec<u8>) -> Result<(), LogStoreError>;
}

// ---------------------------------------------------------------------------------------------
// The rules, shared by both implementations.

/// Everything about the log except the entries and the snapshot data, with the rules for
/// changing it. Both implementations keep it in memory behind their lock; a change is computed
/// here first (failing without side effects), then stored by the backend, then swapped in.
#[derive(Debug, Clone, Default)]
struct LogState {
    /// The term, vote and commit index raft must never forget; `initial_state` returns it.
    hard_state: HardState,
    /// The current voters and learners; `initial_state` returns it.
    conf_state: ConfState,
    /// The last index dropped from the log (by compaction or a snapshot); 0 when none was.
    /// `first_index` is one past it.
    truncated_index: u64,
    /// The term of `truncated_index`: raft matches appends against `term(first_index - 1)`.
    truncated_term: u64,
    /// The newest entry's index, or `truncated_index` when the log is empty; cached so
    /// `last_index` and range checks need no read.
    last_index: u64,
    /// The latest snapshot's metadata (index 0: none yet); its data lives in the backend.
    snapshot: SnapshotMetadata,
}

impl LogState {
    fn first_index(&self) -> u64 {
        self.truncated_index + 1
    }

    /// The term of `index` if known without reading an entry (`Ok(None)`: read the entry).
    fn known_term(&self, index: u64) -> Result<Option<u64>, LogStoreError> {
        if index == self.truncated_index {
            Ok(Some(self.truncated_term))
        } else if index < self.truncated_index {
            Err(LogStoreError::Compacted {
                index,
                compacted: self.truncated_index,
            })
        } else if index > self.last_index {
            Err(LogStoreError::Unavailable {
                index,
                last: self.last_index,
            })
        } else {
            Ok(None)
        }
    }

    /// Checks that `[low, high)` is in the log; `Ok(false)` when the range is empty.
    fn check_range(&self, low: u64, high: u64) -> Result<bool, LogStoreError> {
        if low <= self.truncated_index {
            return Err(LogStoreError::Compacted {
                index: low,
                compacted: self.truncated_index,
            });
        }
        if high > self.last_index + 1 {
            return Err(LogStoreError::Unavailable {
                index: high - 1,
                last: self.last_index,
            });
        }
        Ok(low < high)
    }

    fn appended(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<LogState, LogStoreError> {
        let mut next = self.clone();
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            if let Some(pair) = entries.windows(2).find(|p| p[1].index != p[0].index + 1) {
                return Err(LogStoreError::NotConsecutive {
                    previous: pair[0].index,
                    index: pair[1].index,
                });
            }
            if first.index <= self.truncated_index {
                return Err(LogStoreError::Compacted {
                    index: first.index,
                    compacted: self.truncated_index,
                });
            }
            if first.index > self.last_index + 1 {
                return Err(LogStoreError::Gap {
                    index: first.index,
                    last: self.last_index,
                });
            }
            if first.index <= self.hard_state.commit {
                return Err(LogStoreError::OverwritesCommitted {
                    index: first.index,
                    commit: self.hard_state.commit,
                });
            }
            next.last_index = last.index;
        }
        if let Some(hs) = hard_state {
            next.hard_state = hs.clone();
        }
        next.check_commit()?;
        Ok(next)
    }

    fn with_commit(&self, commit: u64) -> Result<LogState, LogStoreError> {
        let mut next = self.clone();
        next.hard_state.commit = commit;
        next.check_commit()?;
        Ok(next)
    }

    fn check_commit(&self) -> Result<(), LogStoreError> {
        if self.hard_state.commit > self.last_index {
            return Err(LogStoreError::CommitPastLast {
                commit: self.hard_state.commit,
                last: self.last_index,
            });
        }
        Ok(())
    }

    /// `Ok(false)`: nothing to compact.
    fn check_compact(&self, index: u64) -> Result<bool, LogStoreError> {
        if index <= self.truncated_index {
            return Ok(false);
        }
        if index > self.last_index {
            return Err(LogStoreError::Unavailable {
                index,
                last: self.last_index,
            });
        }
        if index > self.snapshot.index {
            return Err(LogStoreError::NotSnapshotted {
                index,
                snapshot: self.snapshot.index,
            });
        }
        Ok(true)
    }

    fn compacted(&self, index: u64, term: u64) -> LogState {
        LogState {
            truncated_index: index,
            truncated_term: term,
            ..self.clone()
        }
    }

    fn snapshot_applied(&self, meta: &SnapshotMetadata) -> Result<LogState, LogStoreError> {
        if meta.index < self.first_index() || meta.index < self.snapshot.index {
            return Err(LogStoreError::SnapshotOutOfDate {
                index: meta.index,
                current: cmp::max(self.truncated_index, self.snapshot.index),
            });
        }
        let hard_state = HardState {
            term: cmp::max(self.hard_state.term, meta.term),
            commit: meta.index,
            ..self.hard_state.clone()
        };
        Ok(LogState {
            hard_state,
            conf_state: meta.get_conf_state().clone(),
            truncated_index: meta.index,
            truncated_term: meta.term,
            last_index: meta.index,
            snapshot: meta.clone(),
        })
    }

    /// The term of `index` if known here (`Ok(None)`: read the entry).
    fn check_create_snapshot(&self, index: u64) -> Result<Option<u64>, LogStoreError> {
        if index == 0 || index < self.snapshot.index {
            return Err(LogStoreError::SnapshotOutOfDate {
                index,
                current: self.snapshot.index,
            });
        }
        if index > self.hard_state.commit {
            return Err(LogStoreError::Uncommitted {
                index,
                commit: self.hard_state.commit,
            });
        }
        self.known_term(index)
    }

    fn snapshot_created(&self, index: u64, term: u64, conf_state: ConfState) -> LogState {
        let mut snapshot = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        snapshot.set_conf_state(conf_state);
        LogState {
            snapshot,
            ..self.clone()
        }
    }

    fn check_snapshot(&self, request_index: u64) -> Result<(), LogStoreError> {
        if self.snapshot.index == 0 || self.snapshot.index < request_index {
            return Err(LogStoreError::SnapshotNotReady {
                requested: request_index,
                latest: self.snapshot.index,
            });
        }
        Ok(())
    }
}

/// raft's `max_size` rule for `entries`: the first entry always, then more while the total
/// encoded size stays within the limit (the same rule as `raft::util::limit_size`).
struct SizeBudget {
    /// The limit (`None` or `raft::NO_LIMIT`: unlimited).
    max: Option<u64>,
    /// Encoded bytes admitted so far, plus the one refused.
    used: u64,
    /// Entries admitted so far; the first one is admitted whatever its size.
    taken: usize,
}

impl SizeBudget {
    fn new(max: Option<u64>) -> SizeBudget {
        SizeBudget { max, used: 0, taken: 0 }
    }

    /// Whether an entry of `size` encoded bytes still fits.
    fn admit(&mut self, size: u64) -> bool {
        self.used = self.used.saturating_add(size);
        let fits = self.taken == 0 || self.max.is_none_or(|max| self.used <= max);
        if fits {
            self.taken += 1;
        }
        fits
    }
}

/// A change for a backend to store, together with the new [`LogState`], atomically.
enum Change<'a> {
    /// Drop every entry at or after the first one's index, then store these (maybe none: only
    /// the state changes).
    Append(&'a [Entry]),
    /// Drop every entry up to and including this index.
    Compact(u64),
    /// Drop every entry and store this snapshot data (`apply_snapshot`).
    Replace(Bytes),
    /// Store this snapshot data; the log is unchanged (`create_snapshot`).
    SnapshotData(Bytes),
}

/// Where the entries and the snapshot data are kept. It does not check the rules: every call
/// comes after [`LogState`] approved it, with that state (`state` is the current one).
trait Backend {
    /// `[low, high)`, non-empty and inside the log, as many as `budget` admits.
    fn read_entries(
        &self,
        state: &LogState,
        low: u64,
        high: u64,
        budget: &mut SizeBudget,
    ) -> Result<Vec<Entry>, LogStoreError>;

    /// The term of the stored entry `index`.
    fn read_term(&self, state: &LogState, index: u64) -> Result<u64, LogStoreError>;

    /// The latest snapshot's data.
    fn read_snapshot_data(&self) -> Result<Bytes, LogStoreError>;

    /// Stores `change` and `next` atomically; on `Err` nothing changed.
    fn write(&mut self, state: &LogState, change: Change<'_>, next: &LogState) -> Result<(), LogStoreError>;
}

/// The state and a backend behind one lock, implementing both sides of storage once.
struct Core<B> {
    /// Readers share it; a writer holds it across the check, the write and the swap, so a
    /// reader never sees the state and the backend disagree.
    inner: RwLock<Inner<B>>,
}

/// What [`Core`]'s lock protects.
struct Inner<B> {
    /// The current state; replaced only after the backend stored a change.
    state: LogState,
    /// The entries and snapshot data.
    backend: B,
}

impl<B: Backend> Core<B> {
    fn new(state: LogState, backend: B) -> Core<B> {
        Core {
            inner: RwLock::new(Inner { state, backend }),
        }
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, Inner<B>>, LogStoreError> {
        self.inner.read().map_err(|_| LogStoreError::Poisoned)
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, Inner<B>>, LogStoreError> {
        self.inner.write().map_err(|_| LogStoreError::Poisoned)
    }

    fn initial_state(&self) -> Result<RaftState, LogStoreError> {
        let inner = self.read()?;
        Ok(RaftState::new(
            inner.state.hard_state.clone(),
            inner.state.conf_state.clone(),
        ))
    }

    fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>, LogStoreError> {
        let inner = self.read()?;
        if !inner.state.check_range(low, high)? {
            return Ok(Vec::new());
        }
        let mut budget = SizeBudget::new(max_size);
        inner.backend.read_entries(&inner.state, low, high, &mut budget)
    }

    fn term(&self, index: u64) -> Result<u64, LogStoreError> {
        let inner = self.read()?;
        match inner.state.known_term(index)? {
            Some(term) => Ok(term),
            None => inner.backend.read_term(&inner.state, index),
        }
    }

    fn first_index(&self) -> Result<u64, LogStoreError> {
        Ok(self.read()?.state.first_index())
    }

    fn last_index(&self) -> Result<u64, LogStoreError> {
        Ok(self.read()?.state.last_index)
    }

    fn snapshot(&self, request_index: u64) -> Result<Snapshot, LogStoreError> {
        let inner = self.read()?;
        inner.state.check_snapshot(request_index)?;
        let mut snapshot = Snapshot {
            data: inner.backend.read_snapshot_data()?.into(),
            ..Default::default()
        };
        snapshot.set_metadata(inner.state.snapshot.clone());
        Ok(snapshot)
    }

    /// Stores `change` with `next`, then makes `next` current.
    fn store_change(inner: &mut Inner<B>, change: Change<'_>, next: LogState) -> Result<(), LogStoreError> {
        inner.backend.write(&inner.state, change, &next)?;
        inner.state = next;
        Ok(())
    }

    fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), LogStoreError> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let mut inner = self.write()?;
        let next = inner.state.appended(entries, hard_state)?;
        Self::store_change(&mut inner, Change::Append(entries), next)
    }

    fn set_commit(&self, commit: u64) -> Result<(), LogStoreError> {
        let mut inner = self.write()?;
        let next = inner.state.with_commit(commit)?;
        Self::store_change(&mut inner, Change::Append(&[]), next)
    }

    fn set_conf_state(&self, conf_state: ConfState) -> Result<(), LogStoreError> {
        let mut inner = self.write()?;
        let next = LogState {
            conf_state,
            ..inner.state.clone()
        };
        Self::store_change(&mut inner, Change::Append(&[]), next)
    }

    fn apply_snapshot(&self, mut snapshot: Snapshot) -> Result<(), LogStoreError> {
        let mut inner = self.write()?;
        let next = inner.state.snapshot_applied(snapshot.get_metadata())?;
        let data = std::mem::take(&mut snapshot.data);
        Self::store_change(&mut inner, Change::Replace(Bytes::from(data)), next)?;
        tracing::info!(
            index = inner.state.truncated_index,
            term = inner.state.truncated_term,
            "raft log replaced by a snapshot"
        );
        Ok(())
    }

    fn compact(&self, index: u64) -> Result<(), LogStoreError> {
        let mut inner = self.write()?;
        if !inner.state.check_compact(index)? {
            return Ok(());
        }
        let term = inner.backend.read_term(&inner.state, index)?;
        let next = inner.state.compacted(index, term);
        Self::store_change(&mut inner, Change::Compact(index), next)?;
        tracing::debug!(index, term, "raft log compacted");
        Ok(())
    }

    fn create_snapshot(&self, index: u64, conf_state: ConfState, data: Vec<u8>) -> Result<(), LogStoreError> {
        let mut inner = self.write()?;
        let term = match inner.state.check_create_snapshot(index)? {
            Some(term) => term,
            None => inner.backend.read_term(&inner.state, index)?,
        };
        let next = inner.state.snapshot_created(index, term, conf_state);
        Self::store_change(&mut inner, Change::SnapshotData(Bytes::from(data)), next)?;
        tracing::debug!(index, term, "raft snapshot created");
        Ok(())
    }
}

/// Implements [`Storage`] and [`RaftLogStore`] for a handle type with a `core: Arc<Core<_>>`.
macro_rules! delegate_to_core {
    ($handle:ty) => {
        impl Storage for $handle {
            fn initial_state(&self) -> raft::Result<RaftState> {
                Ok(self.core.initial_state()?)
            }

            fn entries(
                &self,
                low: u64,
                high: u64,
                max_size: impl Into<Option<u64>>,
                // Entries are read synchronously: no `LogTemporarilyUnavailable`.
                _context: GetEntriesContext,
            ) -> raft::Result<Vec<Entry>> {
                Ok(self.core.entries(low, high, max_size.into())?)
            }

            fn term(&self, idx: u64) -> raft::Result<u64> {
                Ok(self.core.term(idx)?)
            }

            fn first_index(&self) -> raft::Result<u64> {
                Ok(self.core.first_index()?)
            }

            fn last_index(&self) -> raft::Result<u64> {
                Ok(self.core.last_index()?)
            }

            /// The latest snapshot created or applied, whichever peer `to` asks; if none is at
            /// or after `request_index`, `SnapshotTemporarilyUnavailable` (raft retries later).
            fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
                Ok(self.core.snapshot(request_index)?)
            }
        }

        impl RaftLogStore for $handle {
            fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), LogStoreError> {
                self.core.persist(entries, hard_state)
            }

            fn set_commit(&self, commit: u64) -> Result<(), LogStoreError> {
                self.core.set_commit(commit)
            }

            fn set_conf_state(&self, conf_state: ConfState) -> Result<(), LogStoreError> {
                self.core.set_conf_state(conf_state)
            }

            fn apply_snapshot(&self, snapshot: Snapshot) -> Result<(), LogStoreError> {
                self.core.apply_snapshot(snapshot)
            }

            fn compact(&self, index: u64) -> Result<(), LogStoreError> {
                self.core.compact(index)
            }

            fn create_snapshot(&self, index: u64, conf_state: ConfState, data: Vec<u8>) -> Result<(), LogStoreError> {
                self.core.create_snapshot(index, conf_state, data)
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// In memory.

/// Raft log storage in memory, for tests: same rules and errors as [`RedbStorage`], nothing
/// survives the process. Clones share the same log.
#[derive(Clone)]
pub struct MemStorage {
    /// Shared by every clone, so the driver and `RawNode` see one log.
    core: Arc<Core<MemLog>>,
}

impl MemStorage {
    /// An empty log: no entries, default hard and conf state, no snapshot.
    pub fn new() -> MemStorage {
        MemStorage {
            core: Arc::new(Core::new(LogState::default(), MemLog::default())),
        }
    }
}

impl Default for MemStorage {
    fn default() -> MemStorage {
        MemStorage::new()
    }
}

delegate_to_core!(MemStorage);

/// [`MemStorage`]'s backend.
#[derive(Default)]
struct MemLog {
    /// The log: `entries[i]` has index `first_index + i`.
    entries: Vec<Entry>,
    /// The latest snapshot's data.
    snapshot_data: Bytes,
}

impl MemLog {
    /// The position of `index` in `entries`, for an index `LogState` placed inside the log.
    fn position(state: &LogState, index: u64) -> usize {
        (index - state.first_index()) as usize
    }

    fn inconsistent(what: String) -> LogStoreError {
        LogStoreError::Corrupt {
            location: "memory".into(),
            what,
        }
    }
}

impl Backend for MemLog {
    fn read_entries(
        &self,
        state: &LogState,
        low: u64,
        high: u64,
        budget: &mut SizeBudget,
    ) -> Result<Vec<Entry>, LogStoreError> {
        let range = Self::position(state, low)..Self::position(state, high);
        let slice = self
            .entries
            .get(range)
            .ok_or_else(|| Self::inconsistent(format!("entries {low}..{high} are missing")))?;
        Ok(slice
            .iter()
            .take_while(|e| budget.admit(entry_size(e)))
            .cloned()
            .collect())
    }

    fn read_term(&self, state: &LogState, index: u64) -> Result<u64, LogStoreError> {
        self.entries
            .get(Self::position(state, index))
            .map(|e| e.term)
            .ok_or_else(|| Self::inconsistent(format!("entry {index} is missing")))
    }

    fn read_snapshot_data(&self) -> Result<Bytes, LogStoreError> {
        Ok(self.snapshot_data.clone())
    }

    fn write(&mut self, state: &LogState, change: Change<'_>, _next: &LogState) -> Result<(), LogStoreError> {
        match change {
            Change::Append(entries) => {
                if let Some(first) = entries.first() {
                    self.entries.truncate(Self::position(state, first.index));
                    self.entries.extend_from_slice(entries);
                }
            }
            Change::Compact(index) => {
                let keep_from = Self::position(state, index + 1).min(self.entries.len());
                self.entries.drain(..keep_from);
            }
            Change::Replace(data) => {
                self.entries.clear();
                self.snapshot_data = data;
            }
            Change::SnapshotData(data) => self.snapshot_data = data,
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// On redb.

/// Entries by index.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
/// The rest, under the `KEY_*` keys.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");
const KEY_HARD_STATE: &str = "hard_state";
const KEY_CONF_STATE: &str = "conf_state";
const KEY_TRUNCATED: &str = "truncated";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";

/// Durable Raft log storage in one redb file.
///
/// Every write method is one transaction committed with `Durability::Immediate`; [`persist`]
/// writes a `Ready`'s entries and hard state in one. [`RedbStorage::open`] recovers everything
/// written before a crash or restart. Clones share one open database; the file stays locked
/// until the last clone is dropped, and a second [`RedbStorage::open`] of it meanwhile fails with
/// [`LogStoreError::AlreadyOpen`]. Use a file of its own (not the node's `herald.redb`, which the
/// ingress store holds open).
///
/// The hard state, conf state, compaction point and snapshot metadata are also cached in memory;
/// entries and snapshot data are read from the file.
///
/// [`persist`]: RaftLogStore::persist
#[derive(Clone)]
pub struct RedbStorage {
    /// Shared by every clone, so the driver and `RawNode` see one log.
    core: Arc<Core<RedbLog>>,
    /// The database file, for messages and [`RedbStorage::path`].
    path: Arc<PathBuf>,
}

delegate_to_core!(RedbStorage);

impl RedbStorage {
    /// Opens the storage in the redb file `path`, creating it (empty) if missing, and recovers
    /// its state.
    ///
    /// Errors: [`LogStoreError::AlreadyOpen`] if the file is open already,
    /// [`LogStoreError::Corrupt`] if stored state does not decode or is inconsistent (entries not
    /// contiguous from the compaction point, a commit index past the last entry, …),
    /// [`LogStoreError::Db`] for other redb failures, among them a file whose pages fail redb's
    /// checksums (changed outside redb).
    pub fn open(path: impl AsRef<Path>) -> Result<RedbStorage, LogStoreError> {
        let path = path.as_ref().to_path_buf();
        // A file damaged outside redb fails to open with an error rather than a panic (the
        // check reads the file once; the log is compacted, so it stays small).
        let db = match Database::builder().set_check_integrity_on_open(true).create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(LogStoreError::AlreadyOpen { path }),
            Err(e) => return Err(db_error(&path, "open", e)),
        };
        let backend = RedbLog { db, path: path.clone() };
        let state = backend.recover()?;
        tracing::info!(
            path = %path.display(),
            first_index = state.first_index(),
            last_index = state.last_index,
            commit = state.hard_state.commit,
            term = state.hard_state.term,
            snapshot = state.snapshot.index,
            "raft storage opened"
        );
        Ok(RedbStorage {
            core: Arc::new(Core::new(state, backend)),
            path: Arc::new(path),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn db_error(path: &Path, op: &'static str, e: impl Into<redb::Error>) -> LogStoreError {
    LogStoreError::Db {
        path: path.to_path_buf(),
        op,
        source: Box::new(e.into()),
    }
}

/// [`RedbStorage`]'s backend.
struct RedbLog {
    /// The open database; dropping it releases the file.
    db: Database,
    /// The database file, for error messages.
    path: PathBuf,
}

impl RedbLog {
    /// Maps a redb error of `op` to [`LogStoreError::Db`].
    fn db_err<E: Into<redb::Error>>(&self, op: &'static str) -> impl FnOnce(E) -> LogStoreError + '_ {
        move |e| db_error(&self.path, op, e)
    }

    fn corrupt(&self, what: String) -> LogStoreError {
        LogStoreError::Corrupt {
            location: self.path.display().to_string(),
            what,
        }
    }

    /// Decodes a stored record, or gives its default when it is absent (a fresh log); `what`
    /// names it in the corruption error.
    fn decode_or_default<R: prost::Message + Default>(
        &self,
        bytes: Option<Vec<u8>>,
        what: &str,
    ) -> Result<R, LogStoreError> {
        match bytes {
            Some(b) => R::decode(b.as_slice()).map_err(|e| self.corrupt(format!("{what}: {e}"))),
            None => Ok(R::default()),
        }
    }

    /// Creates the tables if missing and loads and checks the state.
    fn recover(&self) -> Result<LogState, LogStoreError> {
        let mut txn = self.db.begin_write().map_err(self.db_err("begin write"))?;
        txn.set_durability(Durability::Immediate)
            .map_err(self.db_err("set durability"))?;
        let state = {
            let entries = txn.open_table(ENTRIES).map_err(self.db_err("open entries table"))?;
            let table = txn.open_table(STATE).map_err(self.db_err("open state table"))?;
            let get = |key: &str| -> Result<Option<Vec<u8>>, LogStoreError> {
                Ok(table
                    .get(key)
                    .map_err(self.db_err("read state"))?
                    .map(|v| v.value().to_vec()))
            };
            let hard_state = self
                .decode_or_default::<HardStateRecord>(get(KEY_HARD_STATE)?, "hard state")?
                .into_hard_state();
            let conf_state = self
                .decode_or_default::<ConfStateRecord>(get(KEY_CONF_STATE)?, "conf state")?
                .into_conf_state();
            let truncated = self.decode_or_default::<TruncatedRecord>(get(KEY_TRUNCATED)?, "compaction point")?;
            let snapshot = self
                .decode_or_default::<SnapshotMetadataRecord>(get(KEY_SNAPSHOT_META)?, "snapshot metadata")?
                .into_metadata();
            let has_data = table
                .get(KEY_SNAPSHOT_DATA)
                .map_err(self.db_err("read state"))?
                .is_some();
            if snapshot.index > 0 && !has_data {
                return Err(self.corrupt(format!("the snapshot at {} has no data", snapshot.index)));
            }
            let first = entries
                .first()
                .map_err(self.db_err("read entries"))?
                .map(|(k, _)| k.value());
            let last = entries
                .last()
                .map_err(self.db_err("read entries"))?
                .map(|(k, _)| k.value());
            let count = entries.len().map_err(self.db_err("count entries"))?;
            let last_index = match (first, last) {
                (Some(first), Some(last)) => {
                    if first != truncated.index + 1 || last - first + 1 != count {
                        return Err(self.corrupt(format!(
                            "{count} entries from {first} to {last} are not contiguous from the \
                             compaction point {}",
                            truncated.index
                        )));
                    }
                    last
                }
                _ => truncated.index,
            };
            if snapshot.index < truncated.index {
                return Err(self.corrupt(format!(
                    "the log is compacted to {} but the latest snapshot is at {}",
                    truncated.index, snapshot.index
                )));
            }
            if hard_state.commit > last_index {
                return Err(self.corrupt(format!(
                    "the commit index {} is past the last index {last_index}",
                    hard_state.commit
                )));
            }
            LogState {
                hard_state,
                conf_state,
                truncated_index: truncated.index,
                truncated_term: truncated.term,
                last_index,
                snapshot,
            }
        };
        txn.commit().map_err(self.db_err("commit"))?;
        Ok(state)
    }

    fn decode_entry(&self, index: u64, bytes: &[u8]) -> Result<Entry, LogStoreError> {
        let record = EntryRecord::decode(bytes).map_err(|e| self.corrupt(format!("entry {index}: {e}")))?;
        if record.index != index {
            return Err(self.corrupt(format!("entry stored under index {index} has index {}", record.index)));
        }
        record
            .into_entry()
            .map_err(|what| self.corrupt(format!("entry {index}: {what}")))
    }
}

impl Backend for RedbLog {
    fn read_entries(
        &self,
        _state: &LogState,
        low: u64,
        high: u64,
        budget: &mut SizeBudget,
    ) -> Result<Vec<Entry>, LogStoreError> {
        let txn = self.db.begin_read().map_err(self.db_err("begin read"))?;
        let table = txn.open_table(ENTRIES).map_err(self.db_err("open entries table"))?;
        let rows = table.range(low..high).map_err(self.db_err("read entries"))?;
        let mut out = Vec::new();
        let mut expected = low;
        for row in rows {
            let (k, v) = row.map_err(self.db_err("read entries"))?;
            let bytes = v.value();
            if k.value() != expected {
                break;
            }
            // The stored bytes are the entry's encoding, so their length is its size.
            if !budget.admit(bytes.len() as u64) {
                return Ok(out);
            }
            out.push(self.decode_entry(expected, bytes)?);
            expected += 1;
        }
        if expected != high {
            return Err(self.corrupt(format!("entry {expected} is missing")));
        }
        Ok(out)
    }

    fn read_term(&self, _state: &LogState, index: u64) -> Result<u64, LogStoreError> {
        let txn = self.db.begin_read().map_err(self.db_err("begin read"))?;
        let table = txn.open_table(ENTRIES).map_err(self.db_err("open entries table"))?;
        let value = table
            .get(index)
            .map_err(self.db_err("read entry"))?
            .ok_or_else(|| self.corrupt(format!("entry {index} is missing")))?;
        Ok(self.decode_entry(index, value.value())?.term)
    }

    fn read_snapshot_data(&self) -> Result<Bytes, LogStoreError> {
        let txn = self.db.begin_read().map_err(self.db_err("begin read"))?;
        let table = txn.open_table(STATE).map_err(self.db_err("open state table"))?;
        let value = table
            .get(KEY_SNAPSHOT_DATA)
            .map_err(self.db_err("read snapshot"))?
            .ok_or_else(|| self.corrupt("the snapshot data is missing".into()))?;
        Ok(Bytes::copy_from_slice(value.value()))
    }

    fn write(&mut self, _state: &LogState, change: Change<'_>, next: &LogState) -> Result<(), LogStoreError> {
        let mut txn = self.db.begin_write().map_err(self.db_err("begin write"))?;
        txn.set_durability(Durability::Immediate)
            .map_err(self.db_err("set durability"))?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(self.db_err("open entries table"))?;
            let mut state = txn.open_table(STATE).map_err(self.db_err("open state table"))?;
            let write_err = |e: redb::StorageError| db_error(&self.path, "write", e);
            let mut snapshot_data = None;
            match change {
                Change::Append(new) => {
                    if let Some(first) = new.first() {
                        entries.retain_in(first.index.., |_, _| false).map_err(write_err)?;
                        for e in new {
                            let bytes = EntryRecord::from_entry(e).encode_to_vec();
                            entries.insert(e.index, bytes.as_slice()).map_err(write_err)?;
                        }
                    }
                }
                Change::Compact(index) => {
                    entries.retain_in(..=index, |_, _| false).map_err(write_err)?;
                }
                Change::Replace(data) => {
                    entries.retain(|_, _| false).map_err(write_err)?;
                    snapshot_data = Some(data);
                }
                Change::SnapshotData(data) => snapshot_data = Some(data),
            }
            if let Some(data) = snapshot_data {
                state.insert(KEY_SNAPSHOT_DATA, data.as_ref()).map_err(write_err)?;
            }
            // The state is a few small records: write all of them every time.
            let records: [(&str, Vec<u8>); 4] = [
                (
                    KEY_HARD_STATE,
                    HardStateRecord::from_hard_state(&next.hard_state).encode_to_vec(),
                ),
                (
                    KEY_CONF_STATE,
                    ConfStateRecord::from_conf_state(&next.conf_state).encode_to_vec(),
                ),
                (
                    KEY_TRUNCATED,
                    TruncatedRecord {
                        index: next.truncated_index,
                        term: next.truncated_term,
                    }
                    .encode_to_vec(),
                ),
                (
                    KEY_SNAPSHOT_META,
                    SnapshotMetadataRecord::from_metadata(&next.snapshot).encode_to_vec(),
                ),
            ];
            for (key, bytes) in records {
                state.insert(key, bytes.as_slice()).map_err(write_err)?;
            }
        }
        txn.commit().map_err(self.db_err("commit"))
    }
}

// ---------------------------------------------------------------------------------------------
// Records: the eraftpb messages' protobuf encoding, through prost.

/// The encoded size raft's `max_size` counts (`compute_size` of the eraftpb `Entry`).
fn entry_size(entry: &Entry) -> u64 {
    raft_prost::Message::encoded_len(entry) as u64
}

/// `eraftpb.Entry`.
#[derive(Clone, PartialEq, prost::Message)]
struct EntryRecord {
    /// `entry_type` (tag 1): normal entry or conf change.
    #[prost(int32, tag = "1")]
    entry_type: i32,
    /// `term` (tag 2).
    #[prost(uint64, tag = "2")]
    term: u64,
    /// `index` (tag 3), also the key: checked against it when read.
    #[prost(uint64, tag = "3")]
    index: u64,
    /// `data` (tag 4): the proposed command.
    #[prost(bytes = "bytes", tag = "4")]
    data: Bytes,
    /// `sync_log` (tag 5): deprecated in raft, kept so an entry round-trips.
    #[prost(bool, tag = "5")]
    sync_log: bool,
    /// `context` (tag 6): the proposal's context.
    #[prost(bytes = "bytes", tag = "6")]
    context: Bytes,
}

impl EntryRecord {
    fn from_entry(e: &Entry) -> EntryRecord {
        EntryRecord {
            entry_type: match e.get_entry_type() {
                EntryType::EntryNormal => 0,
                EntryType::EntryConfChange => 1,
                EntryType::EntryConfChangeV2 => 2,
            },
            term: e.term,
            index: e.index,
            data: Bytes::copy_from_slice(&e.data),
            sync_log: e.sync_log,
            context: Bytes::copy_from_slice(&e.context),
        }
    }

    fn into_entry(self) -> Result<Entry, String> {
        let entry_type = match self.entry_type {
            0 => EntryType::EntryNormal,
            1 => EntryType::EntryConfChange,
            2 => EntryType::EntryConfChangeV2,
            other => return Err(format!("unknown entry type {other}")),
        };
        Ok(Entry {
            entry_type: entry_type as i32,
            term: self.term,
            index: self.index,
            data: self.data.into(),
            context: self.context.into(),
            sync_log: self.sync_log,
        })
    }
}

/// `eraftpb.HardState`.
#[derive(Clone, PartialEq, prost::Message)]
struct HardStateRecord {
    /// `term` (tag 1).
    #[prost(uint64, tag = "1")]
    term: u64,
    /// `vote` (tag 2).
    #[prost(uint64, tag = "2")]
    vote: u64,
    /// `commit` (tag 3).
    #[prost(uint64, tag = "3")]
    commit: u64,
}

impl HardStateRecord {
    fn from_hard_state(hs: &HardState) -> HardStateRecord {
        HardStateRecord {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
        }
    }

    fn into_hard_state(self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.commit,
        }
    }
}

/// `eraftpb.ConfState`.
#[derive(Clone, PartialEq, prost::Message)]
struct ConfStateRecord {
    /// `voters` (tag 1).
    #[prost(uint64, repeated, tag = "1")]
    voters: Vec<u64>,
    /// `learners` (tag 2).
    #[prost(uint64, repeated, tag = "2")]
    learners: Vec<u64>,
    /// `voters_outgoing` (tag 3): the old voters during a joint change.
    #[prost(uint64, repeated, tag = "3")]
    voters_outgoing: Vec<u64>,
    /// `learners_next` (tag 4): voters becoming learners when a joint change leaves.
    #[prost(uint64, repeated, tag = "4")]
    learners_next: Vec<u64>,
    /// `auto_leave` (tag 5): whether the joint change leaves by itself.
    #[prost(bool, tag = "5")]
    auto_leave: bool,
}

impl ConfStateRecord {
    fn from_conf_state(cs: &ConfState) -> ConfStateRecord {
        ConfStateRecord {
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            voters_outgoing: cs.voters_outgoing.clone(),
            learners_next: cs.learners_next.clone(),
            auto_leave: cs.auto_leave,
        }
    }

    fn into_conf_state(self) -> ConfState {
        ConfState {
            voters: self.voters,
            learners: self.learners,
            voters_outgoing: self.voters_outgoing,
            learners_next: self.learners_next,
            auto_leave: self.auto_leave,
        }
    }
}

/// `eraftpb.SnapshotMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotMetadataRecord {
    /// `conf_state` (tag 1): the configuration as of the snapshot.
    #[prost(message, optional, tag = "1")]
    conf_state: Option<ConfStateRecord>,
    /// `index` (tag 2).
    #[prost(uint64, tag = "2")]
    index: u64,
    /// `term` (tag 3).
    #[prost(uint64, tag = "3")]
    term: u64,
}

impl SnapshotMetadataRecord {
    fn from_metadata(meta: &SnapshotMetadata) -> SnapshotMetadataRecord {
        SnapshotMetadataRecord {
            conf_state: meta
                .has_conf_state()
                .then(|| ConfStateRecord::from_conf_state(meta.get_conf_state())),
            index: meta.index,
            term: meta.term,
        }
    }

    fn into_metadata(self) -> SnapshotMetadata {
        let mut meta = SnapshotMetadata {
            index: self.index,
            term: self.term,
            ..Default::default()
        };
        if let Some(cs) = self.conf_state {
            meta.set_conf_state(cs.into_conf_state());
        }
        meta
    }
}

/// Herald's own record: the compaction point.
#[derive(Clone, PartialEq, prost::Message)]
struct TruncatedRecord {
    /// The last index dropped from the log.
    #[prost(uint64, tag = "1")]
    index: u64,
    /// Its term.
    #[prost(uint64, tag = "2")]
    term: u64,
}

#[cfg(test)]
mod tests {
    //! One conformance suite ([`conformance`]) run against both implementations, then what only
    //! redb can show (restart, file lock, corrupt bytes), a differential run of random operations
    //! against both, and raft-rs itself driving a single voter on each.

    use std::cell::Cell;

    use raft::{RawNode, StateRole, StorageError, NO_LIMIT};
    use rand::{Rng, SeedableRng};

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("cmd {index}@{term}").into_bytes(),
            ..Default::default()
        }
    }

    /// Entries `(index, term)`.
    fn ents(pairs: &[(u64, u64)]) -> Vec<Entry> {
        pairs.iter().map(|&(i, t)| entry(i, t)).collect()
    }

    fn read<S: Storage>(s: &S, low: u64, high: u64, max_size: impl Into<Option<u64>>) -> raft::Result<Vec<Entry>> {
        s.entries(low, high, max_size, GetEntriesContext::empty(false))
    }

    fn store_err(e: StorageError) -> raft::Result<Vec<Entry>> {
        Err(raft::Error::Store(e))
    }

    fn voters(ids: &[u64]) -> ConfState {
        ConfState {
            voters: ids.to_vec(),
            ..Default::default()
        }
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit }
    }

    fn snapshot(index: u64, term: u64, conf_state: ConfState, data: &[u8]) -> Snapshot {
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(conf_state);
        let mut snap = Snapshot {
            data: data.to_vec(),
            ..Default::default()
        };
        snap.set_metadata(meta);
        snap
    }

    fn index_bounds<S: Storage>(s: &S) -> (u64, u64) {
        (s.first_index().unwrap(), s.last_index().unwrap())
    }

    /// Everything a reader can see, as text, to compare two storages or one before and after.
    fn observe<S: RaftLogStore>(s: &S) -> String {
        let (first, last) = index_bounds(s);
        let state = s.initial_state().unwrap();
        let terms: Vec<_> = (first.saturating_sub(2)..=last + 1).map(|i| s.term(i)).collect();
        format!(
            "first {first} last {last}\nhard state {:?}\nconf state {:?}\nterms {terms:?}\n\
             entries {:?}\nsnapshot {:?}",
            state.hard_state,
            state.conf_state,
            read(s, first, last + 1, None),
            s.snapshot(0, 0),
        )
    }

    // -----------------------------------------------------------------------------------------
    // The conformance suite.

    type Case<S> = (&'static str, fn(&S));

    /// Runs every case on a fresh storage from `make`.
    fn conformance<S: RaftLogStore>(mut make: impl FnMut() -> S) {
        let cases: Vec<Case<S>> = vec![
            ("empty initial state", empty_initial_state::<S>),
            ("append and read back", append_and_read_back::<S>),
            (
                "append truncates a conflicting suffix",
                append_truncates_conflicting_suffix::<S>,
            ),
            ("append refuses bad input", append_refuses_bad_input::<S>),
            ("entries honour max_size", entries_honour_max_size::<S>),
            ("compact then read", compact_then_read::<S>),
            (
                "hard state and conf state round trip",
                hard_and_conf_state_round_trip::<S>,
            ),
            ("apply_snapshot resets the log", apply_snapshot_resets_the_log::<S>),
            ("create_snapshot then snapshot()", create_snapshot_then_snapshot::<S>),
        ];
        for (name, case) in cases {
            eprintln!("conformance case: {name}");
            case(&make());
        }
    }

    fn empty_initial_state<S: RaftLogStore>(s: &S) {
        let state = s.initial_state().unwrap();
        assert_eq!(state.hard_state, HardState::default());
        assert_eq!(state.conf_state, ConfState::default());
        assert!(!state.initialized());
        assert_eq!(index_bounds(s), (1, 0));
        assert_eq!(s.term(0), Ok(0));
        assert_eq!(s.term(1), Err(raft::Error::Store(StorageError::Unavailable)));
        assert_eq!(read(s, 1, 1, None), Ok(vec![]));
        assert_eq!(read(s, 1, 2, None), store_err(StorageError::Unavailable));
        assert_eq!(
            s.snapshot(0, 2),
            Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
        );
        // Nothing to compact, nothing committed to snapshot.
        s.compact(0).unwrap();
        assert!(matches!(
            s.create_snapshot(0, voters(&[1]), vec![]),
            Err(LogStoreError::SnapshotOutOfDate { index: 0, .. })
        ));
        assert!(matches!(
            s.create_snapshot(1, voters(&[1]), vec![]),
            Err(LogStoreError::Uncommitted { index: 1, commit: 0 })
        ));
    }

    fn append_and_read_back<S: RaftLogStore>(s: &S) {
        let log = ents(&[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]);
        s.append(&log).unwrap();
        assert_eq!(index_bounds(s), (1, 5));
        assert_eq!(read(s, 1, 6, None), Ok(log.clone()));
        assert_eq!(read(s, 1, 6, NO_LIMIT), Ok(log.clone()));
        assert_eq!(read(s, 2, 4, None), Ok(log[1..3].to_vec()));
        assert_eq!(read(s, 3, 3, None), Ok(vec![]));
        assert_eq!(read(s, 1, 7, None), store_err(StorageError::Unavailable));
        assert_eq!(read(s, 0, 2, None), store_err(StorageError::Compacted));
        assert_eq!(s.term(0), Ok(0));
        for e in &log {
            assert_eq!(s.term(e.index), Ok(e.term), "term of {}", e.index);
        }
        assert_eq!(s.term(6), Err(raft::Error::Store(StorageError::Unavailable)));

        // An empty append changes nothing; the next one continues the log.
        s.append(&[]).unwrap();
        assert_eq!(index_bounds(s), (1, 5));
        let mut special = Entry {
            index: 6,
            term: 3,
            data: b"conf change".to_vec(),
            context: b"ctx".to_vec(),
            sync_log: true,
            ..Default::default()
        };
        special.set_entry_type(EntryType::EntryConfChangeV2);
        s.append(std::slice::from_ref(&special)).unwrap();
        assert_eq!(read(s, 6, 7, None), Ok(vec![special]));
        assert_eq!(index_bounds(s), (1, 6));
    }

    fn append_truncates_conflicting_suffix<S: RaftLogStore>(s: &S) {
        s.append(&ents(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)])).unwrap();
        // A new leader's entries from 3 on replace the old suffix 3..=5.
        s.append(&ents(&[(3, 2), (4, 2)])).unwrap();
        assert_eq!(index_bounds(s), (1, 4));
        assert_eq!(read(s, 1, 5, None), Ok(ents(&[(1, 1), (2, 1), (3, 2), (4, 2)])));
        assert_eq!(s.term(3), Ok(2));
        assert_eq!(s.term(5), Err(raft::Error::Store(StorageError::Unavailable)));
        // Appending what is already there is harmless.
        s.append(&ents(&[(4, 2)])).unwrap();
        s.append(&ents(&[(5, 2)])).unwrap();
        s.append(&ents(&[(4, 2), (5, 2)])).unwrap();
        assert_eq!(read(s, 1, 6, None), Ok(ents(&[(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)])));
        // Replacing the whole log.
        s.append(&ents(&[(1, 3)])).unwrap();
        assert_eq!(index_bounds(s), (1, 1));
        assert_eq!(read(s, 1, 2, None), Ok(ents(&[(1, 3)])));
    }

    fn append_refuses_bad_input<S: RaftLogStore>(s: &S) {
        s.append(&ents(&[(1, 1), (2, 1), (3, 1)])).unwrap();
        let before = observe(s);
        assert!(matches!(
            s.append(&ents(&[(5, 1)])),
            Err(LogStoreError::Gap { index: 5, last: 3 })
        ));
        assert!(matches!(
            s.append(&ents(&[(3, 1), (5, 1)])),
            Err(LogStoreError::NotConsecutive { previous: 3, index: 5 })
        ));
        assert!(matches!(
            s.append(&ents(&[(0, 1)])),
            Err(LogStoreError::Compacted { index: 0, compacted: 0 })
        ));
        // A hard state that commits past the log is refused with its entries.
        assert!(matches!(
            s.persist(&ents(&[(4, 1)]), Some(&hard_state(1, 1, 5))),
            Err(LogStoreError::CommitPastLast { commit: 5, last: 4 })
        ));
        assert!(matches!(
            s.set_commit(4),
            Err(LogStoreError::CommitPastLast { commit: 4, last: 3 })
        ));
        assert_eq!(observe(s), before, "a refused write changes nothing");
        // Committed entries are never overwritten.
        s.set_commit(2).unwrap();
        assert!(matches!(
            s.append(&ents(&[(2, 2)])),
            Err(LogStoreError::OverwritesCommitted { index: 2, commit: 2 })
        ));
        s.append(&ents(&[(3, 2)])).unwrap();
        assert_eq!(s.term(3), Ok(2));
    }

    fn entries_honour_max_size<S: RaftLogStore>(s: &S) {
        let log: Vec<Entry> = (1..=5)
            .map(|i| Entry {
                index: i,
                term: 1,
                data: vec![b'x'; 40 * i as usize],
                ..Default::default()
            })
            .collect();
        s.append(&log).unwrap();
        let size = |i: usize| entry_size(&log[i]);
        // At least one entry, however small the limit.
        assert_eq!(read(s, 1, 6, 0), Ok(log[..1].to_vec()));
        assert_eq!(read(s, 3, 6, 1), Ok(log[2..3].to_vec()));
        assert_eq!(read(s, 1, 6, size(0)), Ok(log[..1].to_vec()));
        assert_eq!(read(s, 1, 6, size(0) + size(1) - 1), Ok(log[..1].to_vec()));
        assert_eq!(read(s, 1, 6, size(0) + size(1)), Ok(log[..2].to_vec()));
        assert_eq!(read(s, 2, 6, size(1) + size(2) + size(3)), Ok(log[1..4].to_vec()));
        assert_eq!(read(s, 1, 6, None), Ok(log.clone()));
        assert_eq!(read(s, 1, 6, NO_LIMIT), Ok(log.clone()));
        assert_eq!(read(s, 1, 6, u64::MAX - 1), Ok(log));
    }

    fn compact_then_read<S: RaftLogStore>(s: &S) {
        let log = ents(&[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]);
        s.persist(&log, Some(&hard_state(3, 1, 5))).unwrap();
        // Compaction needs a snapshot covering the dropped entries.
        assert!(matches!(
            s.compact(3),
            Err(LogStoreError::NotSnapshotted { index: 3, snapshot: 0 })
        ));
        s.create_snapshot(3, voters(&[1]), b"table@3".to_vec()).unwrap();
        assert!(matches!(
            s.compact(4),
            Err(LogStoreError::NotSnapshotted { index: 4, snapshot: 3 })
        ));
        s.compact(3).unwrap();
        assert_eq!(index_bounds(s), (4, 5));
        // The compaction point keeps its term; before it, everything is compacted.
        assert_eq!(s.term(3), Ok(2));
        assert_eq!(s.term(2), Err(raft::Error::Store(StorageError::Compacted)));
        assert_eq!(s.term(1), Err(raft::Error::Store(StorageError::Compacted)));
        assert_eq!(s.term(4), Ok(2));
        assert_eq!(read(s, 3, 6, None), store_err(StorageError::Compacted));
        assert_eq!(read(s, 1, 6, None), store_err(StorageError::Compacted));
        assert_eq!(read(s, 4, 6, None), Ok(log[3..].to_vec()));
        assert_eq!(read(s, 4, 4, None), Ok(vec![]));
        // At or below the compaction point: nothing to do.
        s.compact(2).unwrap();
        s.compact(3).unwrap();
        assert_eq!(index_bounds(s), (4, 5));
        // Compacting everything leaves an empty log that still knows its last term.
        s.create_snapshot(5, voters(&[1]), b"table@5".to_vec()).unwrap();
        s.compact(5).unwrap();
        assert_eq!(index_bounds(s), (6, 5));
        assert_eq!(s.term(5), Ok(3));
        assert_eq!(read(s, 6, 6, None), Ok(vec![]));
        assert!(matches!(
            s.compact(6),
            Err(LogStoreError::Unavailable { index: 6, last: 5 })
        ));
        s.append(&ents(&[(6, 3)])).unwrap();
        assert_eq!(index_bounds(s), (6, 6));
        assert_eq!(read(s, 6, 7, None), Ok(ents(&[(6, 3)])));
        // Compaction leaves the hard and conf state alone.
        assert_eq!(s.initial_state().unwrap().hard_state, hard_state(3, 1, 5));
        assert_eq!(s.snapshot(0, 1).unwrap().get_metadata().index, 5);
    }

    fn hard_and_conf_state_round_trip<S: RaftLogStore>(s: &S) {
        let hs = hard_state(3, 2, 0);
        s.set_hardstate(hs.clone()).unwrap();
        assert_eq!(s.initial_state().unwrap().hard_state, hs);
        let cs = ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
            voters_outgoing: vec![1, 2, 5],
            learners_next: vec![5],
            auto_leave: true,
        };
        s.set_conf_state(cs.clone()).unwrap();
        let state = s.initial_state().unwrap();
        assert_eq!(state.conf_state, cs);
        assert_eq!(state.hard_state, hs, "the conf state does not touch the hard state");
        assert!(state.initialized());

        // One Ready: entries and hard state together.
        let hs = hard_state(4, 1, 2);
        s.persist(&ents(&[(1, 4), (2, 4), (3, 4)]), Some(&hs)).unwrap();
        assert_eq!(s.initial_state().unwrap().hard_state, hs);
        assert_eq!(index_bounds(s), (1, 3));
        s.append(&ents(&[(4, 4)])).unwrap();
        assert_eq!(
            s.initial_state().unwrap().hard_state,
            hs,
            "an append alone keeps the hard state"
        );
        s.set_commit(4).unwrap();
        assert_eq!(s.initial_state().unwrap().hard_state, hard_state(4, 1, 4));
        s.persist(&[], None).unwrap();
        assert_eq!(s.initial_state().unwrap().hard_state, hard_state(4, 1, 4));
        assert_eq!(s.initial_state().unwrap().conf_state, cs);
    }

    fn apply_snapshot_resets_the_log<S: RaftLogStore>(s: &S) {
        s.persist(
            &ents(&[(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]),
            Some(&hard_state(2, 1, 3)),
        )
        .unwrap();
        s.set_conf_state(voters(&[1])).unwrap();
        let snap = snapshot(10, 4, voters(&[1, 2, 3]), b"table@10");
        s.apply_snapshot(snap.clone()).unwrap();

        assert_eq!(index_bounds(s), (11, 10));
        assert_eq!(s.term(10), Ok(4));
        assert_eq!(s.term(9), Err(raft::Error::Store(StorageError::Compacted)));
        assert_eq!(s.term(11), Err(raft::Error::Store(StorageError::Unavailable)));
        assert_eq!(read(s, 11, 11, None), Ok(vec![]));
        assert_eq!(read(s, 5, 6, None), store_err(StorageError::Compacted));
        let state = s.initial_state().unwrap();
        assert_eq!(state.hard_state, hard_state(4, 1, 10));
        assert_eq!(state.conf_state, voters(&[1, 2, 3]));
        // The applied snapshot is what the storage now serves.
        assert_eq!(s.snapshot(0, 2), Ok(snap.clone()));
        assert_eq!(s.snapshot(10, 2), Ok(snap));
        assert_eq!(
            s.snapshot(11, 2),
            Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
        );
        s.append(&ents(&[(11, 4)])).unwrap();
        assert_eq!(index_bounds(s), (11, 11));

        // Older snapshots, and the empty one, are refused; raft sees SnapshotOutOfDate.
        for index in [0, 8, 10] {
            let err = s.apply_snapshot(snapshot(index, 4, voters(&[1]), b"old")).unwrap_err();
            assert!(matches!(err, LogStoreError::SnapshotOutOfDate { .. }), "{index}: {err}");
            assert_eq!(
                raft::Error::from(err),
                raft::Error::Store(StorageError::SnapshotOutOfDate)
            );
        }
        // A snapshot past the end of the log replaces it too and raises the term.
        s.apply_snapshot(snapshot(20, 5, voters(&[1, 2]), b"table@20")).unwrap();
        assert_eq!(index_bounds(s), (21, 20));
        assert_eq!(s.initial_state().unwrap().hard_state, hard_state(5, 1, 20));
    }

    fn create_snapshot_then_snapshot<S: RaftLogStore>(s: &S) {
        s.persist(
            &ents(&[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]),
            Some(&hard_state(3, 1, 4)),
        )
        .unwrap();
        assert_eq!(
            s.snapshot(0, 2),
            Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
        );
        assert!(matches!(
            s.create_snapshot(5, voters(&[1]), vec![]),
            Err(LogStoreError::Uncommitted { index: 5, commit: 4 })
        ));
        s.create_snapshot(3, voters(&[1, 2]), b"table@3".to_vec()).unwrap();
        let expected = snapshot(3, 2, voters(&[1, 2]), b"table@3");
        assert_eq!(s.snapshot(0, 2), Ok(expected.clone()));
        assert_eq!(s.snapshot(3, 2), Ok(expected));
        assert_eq!(
            s.snapshot(4, 2),
            Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
        );
        // The log is untouched, and the conf state too.
        assert_eq!(index_bounds(s), (1, 5));
        assert_eq!(s.initial_state().unwrap().conf_state, ConfState::default());
        // Older is refused; the same index or newer replaces.
        assert!(matches!(
            s.create_snapshot(2, voters(&[1]), vec![]),
            Err(LogStoreError::SnapshotOutOfDate { index: 2, current: 3 })
        ));
        s.create_snapshot(4, voters(&[1, 2, 3]), b"table@4".to_vec()).unwrap();
        assert_eq!(s.snapshot(4, 2), Ok(snapshot(4, 2, voters(&[1, 2, 3]), b"table@4")));
        s.create_snapshot(4, voters(&[1, 2, 3]), Vec::new()).unwrap();
        assert_eq!(s.snapshot(0, 2), Ok(snapshot(4, 2, voters(&[1, 2, 3]), b"")));
    }

    #[test]
    fn mem_conformance() {
        conformance(MemStorage::new);
    }

    #[test]
    fn redb_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let n = Cell::new(0);
        conformance(|| {
            n.set(n.get() + 1);
            RedbStorage::open(dir.path().join(format!("raft-{}.redb", n.get()))).unwrap()
        });
    }

    // -----------------------------------------------------------------------------------------
    // Both implementations, compared on random operations.

    /// One random write, applied to `s`; the result as text.
    fn random_write<S: RaftLogStore>(s: &S, rng: &mut impl Rng, (first, last, snap): (u64, u64, u64)) -> String {
        let term = rng.random_range(1..6);
        let cs = voters(&[1, rng.random_range(2..5)]);
        let result = match rng.random_range(0..8) {
            0..=2 => {
                let start = rng.random_range(first.saturating_sub(1)..=last + 2);
                let len = rng.random_range(0..4);
                let log: Vec<Entry> = (start..start + len).map(|i| entry(i, term)).collect();
                if rng.random_bool(0.5) {
                    let hs = hard_state(term, 1, rng.random_range(0..=last + len));
                    s.persist(&log, Some(&hs))
                } else {
                    s.append(&log)
                }
            }
            3 => s.set_commit(rng.random_range(0..=last + 1)),
            4 => s.set_conf_state(cs),
            5 => s.create_snapshot(
                rng.random_range(snap.saturating_sub(1)..=last + 1),
                cs,
                format!("table {}", rng.random::<u32>()).into_bytes(),
            ),
            6 => s.compact(rng.random_range(first.saturating_sub(2)..=last + 1)),
            _ => s.apply_snapshot(snapshot(
                rng.random_range(first.saturating_sub(1)..=last + 5),
                term,
                cs,
                b"leader table",
            )),
        };
        format!("{:?}", result.map_err(|e| e.to_string()))
    }

    #[test]
    fn mem_and_redb_agree_on_random_operations() {
        let dir = tempfile::tempdir().unwrap();
        for seed in 0..4u64 {
            let path = dir.path().join(format!("random-{seed}.redb"));
            let mem = MemStorage::new();
            let redb = RedbStorage::open(&path).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut oks = 0;
            for step in 0..120 {
                let (first, last) = index_bounds(&mem);
                let snap = mem.snapshot(0, 0).map_or(0, |s| s.get_metadata().index);
                // A copy of the generator makes the same choices for the second storage.
                let a = random_write(&mem, &mut rng.clone(), (first, last, snap));
                let b = random_write(&redb, &mut rng, (first, last, snap));
                assert_eq!(a, b, "seed {seed} step {step}: results differ");
                oks += usize::from(a.starts_with("Ok"));
                assert_eq!(
                    observe(&mem),
                    observe(&redb),
                    "seed {seed} step {step}: states differ after {a}"
                );
                // A random read with a random size limit.
                let (first, last) = index_bounds(&mem);
                let low = rng.random_range(first.saturating_sub(1)..=last + 1);
                let high = rng.random_range(low..=last + 2);
                let max = rng.random_range(0..300);
                assert_eq!(
                    read(&mem, low, high, max),
                    read(&redb, low, high, max),
                    "seed {seed} step {step}: entries({low}, {high}, {max}) differ"
                );
            }
            assert!(
                oks > 30,
                "seed {seed}: only {oks} writes succeeded; the test explores too little"
            );
            let before = observe(&redb);
            drop(redb);
            let reopened = RedbStorage::open(&path).unwrap();
            assert_eq!(observe(&reopened), before, "seed {seed}: reopen lost state");
            assert_eq!(observe(&reopened), observe(&mem));
        }
    }

    // -----------------------------------------------------------------------------------------
    // redb only.

    #[test]
    fn redb_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let s = RedbStorage::open(&path).unwrap();
        s.set_conf_state(ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
            ..Default::default()
        })
        .unwrap();
        s.persist(
            &ents(&[(1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 3)]),
            Some(&hard_state(3, 2, 5)),
        )
        .unwrap();
        s.create_snapshot(4, voters(&[1, 2]), b"table@4".to_vec()).unwrap();
        s.compact(3).unwrap();
        let before = observe(&s);
        assert_eq!(s.path(), path);
        drop(s);

        let s = RedbStorage::open(&path).unwrap();
        assert_eq!(observe(&s), before);
        assert_eq!(index_bounds(&s), (4, 6));
        assert_eq!(s.term(3), Ok(2));
        assert_eq!(s.initial_state().unwrap().hard_state, hard_state(3, 2, 5));
        assert_eq!(s.snapshot(0, 2), Ok(snapshot(4, 2, voters(&[1, 2]), b"table@4")));

        // A snapshot from the leader survives too.
        s.apply_snapshot(snapshot(9, 4, voters(&[1, 2, 3]), b"table@9"))
            .unwrap();
        let before = observe(&s);
        drop(s);
        let s = RedbStorage::open(&path).unwrap();
        assert_eq!(observe(&s), before);
        assert_eq!(index_bounds(&s), (10, 9));
    }

    #[test]
    fn redb_second_open_fails_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let first = RedbStorage::open(&path).unwrap();
        let err = RedbStorage::open(&path).err().expect("a second open must fail");
        assert!(
            matches!(&err, LogStoreError::AlreadyOpen { path: p } if *p == path),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("already open"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");

        // Any clone keeps the file; the last one dropped releases it.
        let clone = first.clone();
        drop(first);
        assert!(matches!(
            RedbStorage::open(&path),
            Err(LogStoreError::AlreadyOpen { .. })
        ));
        drop(clone);
        RedbStorage::open(&path).unwrap();
    }

    /// Writes `value` under `key` straight into the redb file, behind the storage's back.
    /// A file damaged outside redb fails to open with an error, never a panic (redb checks its
    /// page checksums at every open).
    #[test]
    fn a_log_file_damaged_outside_redb_fails_to_open_with_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let s = RedbStorage::open(&path).unwrap();
        let many: Vec<(u64, u64)> = (1..=200).map(|i| (i, 1)).collect();
        s.append(&ents(&many)).unwrap();
        drop(s);
        let (panicked, errors) = crate::types::damage_each_of(&path, 60, || {
            RedbStorage::open(&path).map(drop).map_err(|e| e.to_string())
        });
        assert_eq!(panicked, 0, "an open of a damaged file panicked");
        assert!(!errors.is_empty(), "some damage must be found");
    }

    fn tamper<K: redb::Key + 'static>(
        path: &Path,
        table: TableDefinition<K, &[u8]>,
        key: K::SelfType<'_>,
        value: Option<&[u8]>,
    ) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            match value {
                Some(v) => {
                    t.insert(key, v).unwrap();
                }
                None => {
                    t.remove(key).unwrap();
                }
            }
        }
        txn.commit().unwrap();
    }

    #[test]
    fn redb_corrupt_data_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let s = RedbStorage::open(&path).unwrap();
        s.append(&ents(&[(1, 1), (2, 1), (3, 1)])).unwrap();
        drop(s);

        // An entry that does not decode: found when read.
        tamper(&path, ENTRIES, 2, Some(&[0xff]));
        let s = RedbStorage::open(&path).unwrap();
        for result in [read(&s, 1, 4, None).map(drop), s.term(2).map(drop)] {
            let err = result.unwrap_err();
            assert!(matches!(err, raft::Error::Store(StorageError::Other(_))), "{err:?}");
            assert!(err.to_string().contains("corrupt"), "{err}");
        }
        drop(s);

        // An entry stored under the wrong index.
        let moved = EntryRecord::from_entry(&entry(7, 1)).encode_to_vec();
        tamper(&path, ENTRIES, 2, Some(&moved));
        let s = RedbStorage::open(&path).unwrap();
        let err = s.term(2).unwrap_err().to_string();
        assert!(err.contains("has index 7"), "{err}");
        drop(s);

        // A hole in the log, or a hard state that does not decode: found at open.
        tamper(&path, ENTRIES, 2, None);
        let err = RedbStorage::open(&path).err().expect("a hole must fail the open");
        assert!(matches!(err, LogStoreError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("not contiguous"), "{err}");
        let good = EntryRecord::from_entry(&entry(2, 1)).encode_to_vec();
        tamper(&path, ENTRIES, 2, Some(&good));
        RedbStorage::open(&path).unwrap();
        tamper(&path, STATE, KEY_HARD_STATE, Some(&[0xff]));
        let err = RedbStorage::open(&path)
            .err()
            .expect("a bad hard state must fail the open");
        assert!(err.to_string().contains("hard state"), "{err}");
    }

    // -----------------------------------------------------------------------------------------
    // Encoding.

    #[test]
    fn entry_size_is_rafts_compute_size() {
        let mut conf = Entry {
            index: 300,
            term: 7,
            data: vec![1; 200],
            context: b"ctx".to_vec(),
            sync_log: true,
            ..Default::default()
        };
        conf.set_entry_type(EntryType::EntryConfChange);
        assert_eq!(entry_size(&Entry::default()), 0);
        let samples = [
            entry(1, 1),
            entry(u64::MAX, u64::MAX),
            conf,
            Entry {
                data: vec![0; 70_000],
                ..entry(5, 2)
            },
        ];
        for e in samples {
            // `limit_size` keeps both copies exactly when their `compute_size`s fit in `max`.
            let twice = entry_size(&e) * 2;
            let mut fits = vec![e.clone(), e.clone()];
            raft::util::limit_size(&mut fits, Some(twice));
            let mut too_big = vec![e.clone(), e.clone()];
            raft::util::limit_size(&mut too_big, Some(twice - 1));
            assert_eq!((fits.len(), too_big.len()), (2, 1), "{e:?}");
        }
    }

    #[test]
    fn records_round_trip() {
        for t in [
            EntryType::EntryNormal,
            EntryType::EntryConfChange,
            EntryType::EntryConfChangeV2,
        ] {
            let mut e = entry(3, 2);
            e.set_entry_type(t);
            e.context = b"c".to_vec();
            let bytes = EntryRecord::from_entry(&e).encode_to_vec();
            assert_eq!(EntryRecord::decode(bytes.as_slice()).unwrap().into_entry(), Ok(e));
        }
        let unknown = EntryRecord {
            entry_type: 9,
            ..Default::default()
        };
        assert!(unknown.into_entry().is_err());

        let mut with_conf = SnapshotMetadata {
            index: 4,
            term: 2,
            ..Default::default()
        };
        let without_conf = with_conf.clone();
        with_conf.set_conf_state(voters(&[1, 2]));
        for meta in [with_conf, without_conf] {
            let bytes = SnapshotMetadataRecord::from_metadata(&meta).encode_to_vec();
            let back = SnapshotMetadataRecord::decode(bytes.as_slice())
                .unwrap()
                .into_metadata();
            assert_eq!(back, meta);
        }
    }

    #[test]
    fn errors_map_to_raft_storage_errors() {
        let cases = [
            (
                LogStoreError::Compacted { index: 1, compacted: 2 },
                StorageError::Compacted,
            ),
            (
                LogStoreError::Unavailable { index: 3, last: 2 },
                StorageError::Unavailable,
            ),
            (
                LogStoreError::SnapshotOutOfDate { index: 1, current: 2 },
                StorageError::SnapshotOutOfDate,
            ),
            (
                LogStoreError::SnapshotNotReady {
                    requested: 3,
                    latest: 2,
                },
                StorageError::SnapshotTemporarilyUnavailable,
            ),
        ];
        for (ours, theirs) in cases {
            assert_eq!(raft::Error::from(ours), raft::Error::Store(theirs));
        }
        let other = raft::Error::from(LogStoreError::Gap { index: 5, last: 3 });
        assert!(matches!(other, raft::Error::Store(StorageError::Other(_))));
        assert!(other.to_string().contains("would leave a gap"), "{other}");
    }

    // -----------------------------------------------------------------------------------------
    // raft-rs on top.

    fn new_node<S: RaftLogStore>(storage: S) -> RawNode<S> {
        let config = raft::Config {
            id: 1,
            ..Default::default()
        };
        config.validate().unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        RawNode::new(&config, storage, &logger).unwrap()
    }

    /// The driver loop of a single voter: persist each `Ready`, advance, collect what commits.
    fn drive<S: RaftLogStore>(node: &mut RawNode<S>, committed: &mut Vec<Entry>) {
        for _ in 0..100 {
            if !node.has_ready() {
                return;
            }
            let mut ready = node.ready();
            assert!(ready.messages().is_empty(), "a single voter sends nothing");
            if !ready.snapshot().is_empty() {
                node.store().apply_snapshot(ready.snapshot().clone()).unwrap();
            }
            committed.extend(ready.take_committed_entries());
            node.store().persist(ready.entries(), ready.hs()).unwrap();
            assert!(ready.persisted_messages().is_empty());
            let mut light = node.advance(ready);
            if let Some(commit) = light.commit_index() {
                node.store().set_commit(commit).unwrap();
            }
            committed.extend(light.take_committed_entries());
            node.advance_apply();
        }
        panic!("raft kept producing readies");
    }

    fn commands(entries: &[Entry]) -> Vec<&[u8]> {
        entries
            .iter()
            .filter(|e| !e.data.is_empty())
            .map(|e| e.data.as_ref())
            .collect()
    }

    const COMMANDS: [&[u8]; 3] = [b"join 2", b"join 3", b"mark-down 2"];

    /// Bootstraps a single voter on `storage`, elects it, commits [`COMMANDS`] and checks the
    /// storage holds them; returns the node.
    fn run_single_voter<S: RaftLogStore>(storage: S) -> RawNode<S> {
        storage.set_conf_state(voters(&[1])).unwrap();
        let mut node = new_node(storage);
        let mut committed = Vec::new();
        node.campaign().unwrap();
        drive(&mut node, &mut committed);
        assert_eq!(node.raft.state, StateRole::Leader);
        for cmd in COMMANDS {
            node.propose(vec![], cmd.to_vec()).unwrap();
        }
        drive(&mut node, &mut committed);

        let last = node.raft.raft_log.last_index();
        assert_eq!(last, 4, "the leader's empty entry and three commands");
        assert_eq!(node.raft.raft_log.committed, last);
        assert_eq!(commands(&committed), COMMANDS);
        let store = node.store();
        assert_eq!(store.last_index(), Ok(last));
        let hs = store.initial_state().unwrap().hard_state;
        assert_eq!((hs.term, hs.vote, hs.commit), (1, 1, last));
        let stored = read(store, 1, last + 1, None).unwrap();
        assert_eq!(commands(&stored), COMMANDS);
        assert!(stored.iter().all(|e| e.term == 1));
        node
    }

    #[test]
    fn raft_runs_on_mem_storage() {
        run_single_voter(MemStorage::new());
    }

    #[test]
    fn raft_runs_on_redb_storage_and_recovers_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let node = run_single_voter(RedbStorage::open(&path).unwrap());
        let last = node.raft.raft_log.last_index();
        let hs = node.store().initial_state().unwrap().hard_state;
        let log = read(node.store(), 1, last + 1, None).unwrap();
        drop(node);

        // Restart: the log and hard state are back, and raft picks up where it was.
        let storage = RedbStorage::open(&path).unwrap();
        assert_eq!(storage.initial_state().unwrap().hard_state, hs);
        assert_eq!(read(&storage, 1, last + 1, None), Ok(log.clone()));
        let mut node = new_node(storage);
        assert_eq!(node.raft.raft_log.last_index(), last);
        assert_eq!(node.raft.raft_log.committed, hs.commit);
        assert_eq!(node.raft.term, hs.term);
        // With `applied` 0 the committed log is handed back for replay.
        let mut replayed = Vec::new();
        drive(&mut node, &mut replayed);
        assert_eq!(replayed, log);

        // Snapshot the (pretend) membership table, compact, restart again: raft starts from
        // the snapshot's compaction point and keeps committing.
        node.store()
            .create_snapshot(last, voters(&[1]), b"membership table".to_vec())
            .unwrap();
        node.store().compact(last).unwrap();
        drop(node);
        let storage = RedbStorage::open(&path).unwrap();
        assert_eq!(index_bounds(&storage), (last + 1, last));
        let mut node = new_node(storage);
        assert_eq!(node.raft.raft_log.last_index(), last);
        assert_eq!(node.raft.raft_log.committed, last);
        let mut committed = Vec::new();
        node.campaign().unwrap();
        drive(&mut node, &mut committed);
        assert_eq!(node.raft.state, StateRole::Leader);
        node.propose(vec![], b"join 4".to_vec()).unwrap();
        drive(&mut node, &mut committed);
        assert_eq!(commands(&committed), [b"join 4".as_slice()]);
        let hs = node.store().initial_state().unwrap().hard_state;
        assert_eq!((hs.term, hs.commit), (2, last + 2));
        assert_eq!(
            node.store().snapshot(0, 2).unwrap().data,
            Bytes::from_static(b"membership table")
        );
    }
}
