//! The redb tables of the log, the record encoding, and the changes a batch makes to them.

use std::collections::{HashMap, HashSet};

use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use sagaflow::SagaRecord;

use crate::error::{Error, Result};
use crate::wal::Op;

// Every saga gets a sequence number at its start, in start order, and every table but `IDS` is
// keyed by it: the sagas running at once then sit side by side at the right edge of each B-tree,
// whatever their request ids look like, and a commit rewrites a few leaves there. Keyed by
// random request ids (UUIDv4), a commit would touch as many leaves as it has sagas: 0.47x the
// throughput of time-ordered keys (`examples/log_load.rs`). Files whose tables are keyed by
// request id are converted when opened ([`crate::migrate`]).

/// request id → sequence number: the only table written at a random place, once per saga.
pub(crate) const IDS: TableDefinition<'static, &str, u64> = TableDefinition::new("ids");
/// sequence number → the record, as JSON.
pub(crate) const SAGAS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("records");
/// sequence numbers of the sagas not ended, for recovery.
pub(crate) const UNFINISHED: TableDefinition<'static, u64, ()> = TableDefinition::new("running");
/// (created ms, sequence number), for newest-first listing.
pub(crate) const BY_CREATED: TableDefinition<'static, (u64, u64), ()> = TableDefinition::new("created");
/// (ended ms, sequence number), oldest first, for pruning.
pub(crate) const ENDED: TableDefinition<'static, (u64, u64), ()> = TableDefinition::new("ended_seq");
/// sequence number → ended ms, to find a saga's `ENDED` key when a retry revives it.
pub(crate) const ENDED_AT: TableDefinition<'static, u64, u64> = TableDefinition::new("ended_at_seq");
/// request id → what is left of a pruned saga ([`sagaflow::log::Tombstone`], as JSON).
pub(crate) const TOMBSTONES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("tombstones");
/// (pruned ms, request id), oldest first, for pruning the tombstones in their turn.
pub(crate) const TOMBSTONES_BY_PRUNED: TableDefinition<'static, (u64, &str), ()> =
    TableDefinition::new("tombstones_by_pruned");
/// Settings of the file itself: the write-ahead epoch ([`crate::wal`]).
pub(crate) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
/// `META` key: the epoch of the write-ahead entries not yet in a durable commit.
pub(crate) const WAL_EPOCH: &str = "wal_epoch";
/// `META` key: a number drawn when the file was made, in every write-ahead entry's checksum, so
/// that a write-ahead file left beside another database file is never replayed into it.
pub(crate) const WAL_SALT: &str = "wal_salt";
/// `META` key: the size the write-ahead file is written in, which places its halves; the file
/// is never shorter than this.
pub(crate) const WAL_SIZE: &str = "wal_size";

/// A stored record, decoded.
pub(crate) fn decode(bytes: &[u8]) -> Result<SagaRecord> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(e.to_string()))
}

/// A record, encoded for storing, in `out` (emptied first).
pub(crate) fn encode(record: &SagaRecord, out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    serde_json::to_writer(&mut *out, record)
        .map_err(|e| Error::Corrupt(format!("cannot encode saga `{}`: {e}", record.request_id)))
}

/// Every table, open in one write transaction: a checkpoint, a replay, a prune.
pub(crate) struct Tables<'txn> {
    pub(crate) ids: Table<'txn, &'static str, u64>,
    pub(crate) sagas: Table<'txn, u64, &'static [u8]>,
    pub(crate) unfinished: Table<'txn, u64, ()>,
    pub(crate) by_created: Table<'txn, (u64, u64), ()>,
    pub(crate) ended: Table<'txn, (u64, u64), ()>,
    pub(crate) ended_at: Table<'txn, u64, u64>,
    pub(crate) tombstones: Table<'txn, &'static str, &'static [u8]>,
    pub(crate) tombstones_by_pruned: Table<'txn, (u64, &'static str), ()>,
    pub(crate) meta: Table<'txn, &'static str, u64>,
}

impl<'txn> Tables<'txn> {
    pub(crate) fn open(txn: &'txn WriteTransaction) -> Result<Self> {
        Ok(Self {
            ids: txn.open_table(IDS)?,
            sagas: txn.open_table(SAGAS)?,
            unfinished: txn.open_table(UNFINISHED)?,
            by_created: txn.open_table(BY_CREATED)?,
            ended: txn.open_table(ENDED)?,
            ended_at: txn.open_table(ENDED_AT)?,
            tombstones: txn.open_table(TOMBSTONES)?,
            tombstones_by_pruned: txn.open_table(TOMBSTONES_BY_PRUNED)?,
            meta: txn.open_table(META)?,
        })
    }

    /// Makes the table changes of `runs`, in order: what a checkpoint does with the batches
    /// written since the last one, and what opening the log does with the write-ahead entries
    /// a crash left. A record stored again later in `runs` is stored only then, and a saga that
    /// begins and ends in them (the common case: a sync saga lasts milliseconds, a checkpoint
    /// comes every 100 ms) never enters `UNFINISHED`.
    pub(crate) fn apply_all(&mut self, runs: &[&[Op]]) -> Result<()> {
        let ops = || runs.iter().flat_map(|run| run.iter());
        let mut last_stored: HashMap<u64, usize> = HashMap::new();
        let (mut begun, mut revived, mut ended) = (HashSet::new(), HashSet::new(), HashSet::new());
        for (at, op) in ops().enumerate() {
            match *op {
                Op::Stored { seq, .. } => {
                    last_stored.insert(seq, at);
                }
                Op::Begun { seq, .. } => {
                    begun.insert(seq);
                }
                Op::Ended { seq, .. } => {
                    ended.insert(seq);
                }
                Op::Revived { seq } => {
                    revived.insert(seq);
                }
                Op::Sealed { .. } => {}
            }
        }
        let passing = |seq: &u64| begun.contains(seq) && ended.contains(seq) && !revived.contains(seq);
        for (at, op) in ops().enumerate() {
            match *op {
                Op::Begun { ref request_id, seq, created_ms } => {
                    self.ids.insert(request_id.as_str(), seq)?;
                    if !passing(&seq) {
                        self.unfinished.insert(seq, ())?;
                    }
                    self.by_created.insert((created_ms, seq), ())?;
                }
                Op::Ended { seq, ended_ms } => {
                    if !passing(&seq) {
                        self.unfinished.remove(seq)?;
                    }
                    self.ended.insert((ended_ms, seq), ())?;
                    self.ended_at.insert(seq, ended_ms)?;
                }
                Op::Revived { seq } => {
                    let at = self.ended_at.remove(seq)?.map(|at| at.value());
                    if let Some(at) = at {
                        self.ended.remove((at, seq))?;
                    }
                    self.unfinished.insert(seq, ())?;
                }
                Op::Stored { seq, ref record } => {
                    if last_stored.get(&seq) == Some(&at) {
                        self.sagas.insert(seq, record.as_slice())?;
                    }
                }
                Op::Sealed { .. } => {}
            }
        }
        Ok(())
    }

    /// Makes the index entries of every saga `ops` store agree with its record as stored now:
    /// after a salvage, the ops of a damaged entry (a saga's start, its end) are missing while
    /// later records of the same sagas are there. Returns how many sagas it went over.
    pub(crate) fn reindex(&mut self, ops: &[Op]) -> Result<usize> {
        let seqs: HashSet<u64> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Stored { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        for &seq in &seqs {
            let record = match self.sagas.get(seq)?.map(|bytes| decode(bytes.value())) {
                Some(Ok(record)) => record,
                Some(Err(e)) => {
                    tracing::warn!(seq, error = %e, "salvaged saga record cannot be read; its indexes are left as they are");
                    continue;
                }
                None => continue,
            };
            self.ids.insert(record.request_id.as_str(), seq)?;
            self.by_created.insert((record.created_ms, seq), ())?;
            let ended_at = self.ended_at.get(seq)?.map(|at| at.value());
            if record.state.is_ended() {
                self.unfinished.remove(seq)?;
                if ended_at.is_none() {
                    self.ended.insert((record.updated_ms, seq), ())?;
                    self.ended_at.insert(seq, record.updated_ms)?;
                }
            } else {
                self.unfinished.insert(seq, ())?;
                if let Some(at) = ended_at {
                    self.ended.remove((at, seq))?;
                    self.ended_at.remove(seq)?;
                }
            }
        }
        Ok(seqs.len())
    }
}

/// The database file as of the last checkpoint, for the writer's lookups (with the overlay in
/// front, the whole log as answered so far).
pub(crate) struct Snapshot {
    pub(crate) ids: ReadOnlyTable<&'static str, u64>,
    pub(crate) sagas: ReadOnlyTable<u64, &'static [u8]>,
    /// Only pruning writes them, in a checkpoint of the writer's own: never in the overlay.
    pub(crate) tombstones: ReadOnlyTable<&'static str, &'static [u8]>,
}

impl Snapshot {
    pub(crate) fn open(db: &Database) -> Result<Self> {
        let txn = db.begin_read()?;
        Ok(Self { ids: txn.open_table(IDS)?, sagas: txn.open_table(SAGAS)?, tombstones: txn.open_table(TOMBSTONES)? })
    }
}
