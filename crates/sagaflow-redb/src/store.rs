//! The [`SagaLog`] over redb: reads in read transactions, every write through one writer
//! thread that group-commits whatever is queued.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, DatabaseError, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, Table,
    TableDefinition, WriteTransaction,
};
use sagaflow::log::{Begin, ListFilter, LogError, Retention};
use sagaflow::{NewSaga, SagaEvent, SagaLog, SagaRecord};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::options::RedbOptions;
use crate::prune::Pruned;
use crate::wal::{Op, Wal};

// Every saga gets a sequence number at its start, in start order, and every table but `IDS` is
// keyed by it: the sagas running at once then sit side by side at the right edge of each B-tree,
// whatever their request ids look like, and a commit rewrites a few leaves there. Keyed by
// request id, as before, random ids (UUIDv4) scattered each commit over as many leaves as it had
// sagas: 0.47x the throughput of time-ordered ids (`examples/log_load.rs`). Files written with
// the request-id keys are converted when opened ([`crate::migrate`]).

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
/// Settings of the file itself: the write-ahead epoch ([`crate::wal`]).
pub(crate) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
/// `META` key: the epoch of the write-ahead entries not yet in a durable commit.
const WAL_EPOCH: &str = "wal_epoch";
/// A checkpoint slower than this is logged as a warning (every one is, at debug level).
const SLOW_CHECKPOINT: Duration = Duration::from_secs(1);
/// `META` key: a number drawn when the file was made, in every write-ahead entry's checksum, so
/// that a write-ahead file left beside another database file is never replayed into it.
const WAL_SALT: &str = "wal_salt";

/// The embedded saga log: one redb file, durable across process and machine crashes.
///
/// Writes (`begin`, `append`) go to a single writer thread that takes everything queued as one
/// batch, makes it durable with one fsync (of its entry in the write-ahead file), then answers
/// each caller: many concurrent sagas share each fsync. The records stored wait in an overlay
/// until a checkpoint thread applies them to the database file (see `wal.rs`). Dropping the log
/// commits the queued writes and a last checkpoint, stops both threads and releases the file;
/// the drop blocks for that (a few milliseconds).
pub struct RedbSagaLog {
    db: Arc<Database>,
    /// The records the file does not hold yet: looked up first.
    overlay: Overlay,
    /// `None` only while dropping, so the writer sees the channel close.
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<thread::JoinHandle<()>>,
    counters: Arc<Counters>,
    path: PathBuf,
}

/// What the writer has done since the log was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Group commits of `begin`/`append` requests.
    pub batches: u64,
    /// `begin` and `append` requests committed (or refused) in those batches.
    pub writes: u64,
    /// Ended sagas deleted by retention.
    pub pruned: u64,
    /// Records encoded and stored: at most one per saga per commit, fewer when queued appends
    /// wait for the saga's next awaited write.
    pub stored: u64,
    /// Durable redb commits (checkpoints, prunes); the other batches were made durable by the
    /// write-ahead file.
    pub checkpoints: u64,
}

impl WriteStats {
    /// Writes per commit: how many callers shared each fsync.
    pub fn average_batch(&self) -> f64 {
        if self.batches == 0 { 0.0 } else { self.writes as f64 / self.batches as f64 }
    }
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    writes: AtomicU64,
    pruned: AtomicU64,
    stored: AtomicU64,
    checkpoints: AtomicU64,
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, LogError>>;

/// One write for the writer thread, with where to send its result.
pub(crate) enum Request {
    Begin(NewSaga, Reply<Begin>),
    Append(String, SagaEvent, Reply<SagaRecord>),
    /// Delete one chunk of ended sagas past the retention, as of this Unix ms.
    Prune(u64, Reply<Pruned>),
    /// Make the database file hold every write answered so far, for a reader that reads the
    /// file alone.
    Sync(Reply<()>),
}

impl RedbSagaLog {
    /// Opens (creating it if needed) the log in `<data_dir>/sagas.redb` and starts its writer.
    ///
    /// Fails with [`Error::AlreadyOpen`] if the file is open elsewhere, in this process or another.
    pub fn open(options: RedbOptions) -> Result<Self> {
        std::fs::create_dir_all(&options.data_dir)
            .map_err(|source| Error::CreateDir { path: options.data_dir.clone(), source })?;
        let path = options.path();
        let mut builder = Database::builder();
        if let Some(bytes) = options.cache_size {
            builder.set_cache_size(bytes);
        }
        let db = builder.create(&path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => Error::AlreadyOpen { path: path.clone() },
            source => Error::Open { path: path.clone(), source },
        })?;
        // Create every table up front so readers never meet a missing one; replay what the
        // write-ahead file holds beyond the last checkpoint, and start a new epoch.
        let txn = db.begin_write()?;
        let (next_seq, wal) = {
            let mut tables = Tables::open(&txn)?;
            crate::migrate::from_request_id_keys(&txn, &mut tables)?;
            let epoch = tables.meta.get(WAL_EPOCH)?.map_or(0, |epoch| epoch.value());
            let salt = tables.meta.get(WAL_SALT)?.map(|salt| salt.value());
            let salt = match salt {
                Some(salt) => salt,
                None => {
                    let salt = crate::wal::new_salt();
                    tables.meta.insert(WAL_SALT, salt)?;
                    salt
                }
            };
            let mut wal = Wal::open(options.wal_path(), options.wal_size, salt, epoch)?;
            // The stored epoch, whose checkpoint may have been under way, and the next.
            let mut ops = Vec::new();
            let mut batches = 0;
            for epoch in [epoch, epoch + 1] {
                let entries = wal.entries(epoch)?;
                batches += entries.len();
                for payload in &entries {
                    ops.extend(Op::decode_all(payload)?);
                }
            }
            tables.apply_all(&[&ops])?;
            if batches > 0 {
                tracing::info!(path = %wal.path().display(), batches, "saga log replayed its write-ahead file");
            }
            tables.meta.insert(WAL_EPOCH, epoch + 2)?;
            wal.restart(epoch + 2);
            (tables.sagas.last()?.map_or(0, |(seq, _)| seq.value() + 1), wal)
        };
        txn.commit()?;
        let mut wal = wal;
        wal.resize(options.wal_size)?;

        let db = Arc::new(db);
        let snapshot = Snapshot::open(&db)?;
        let overlay = Overlay::default();
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            rx,
            counters: counters.clone(),
            retention: options.retention,
            prune_interval: options.prune_interval,
            prune_chunk: options.prune_chunk,
            max_batch: options.max_batch,
            linger: options.linger,
            cache: Cache::new(options.defer_queued),
            next_seq,
            wal,
            pending: Vec::new(),
            overlay: overlay.clone(),
            snapshot,
            checkpointer: Checkpointer::spawn(db.clone())?,
            in_flight: None,
            must_sync: false,
            checkpoint_interval: options.checkpoint_interval,
            last_checkpoint: Instant::now(),
            checkpoint_retry: None,
        };
        let writer = thread::Builder::new()
            .name("sagaflow-redb-writer".into())
            .spawn(move || writer.run())
            .map_err(Error::Spawn)?;
        tracing::debug!(path = %path.display(), "saga log opened");
        Ok(Self { db, overlay, tx: Some(tx), writer: Some(writer), counters, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[cfg(test)]
    pub(crate) fn db_for_tests(&self) -> &Database {
        &self.db
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> WriteStats {
        WriteStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            writes: self.counters.writes.load(Ordering::Relaxed),
            pruned: self.counters.pruned.load(Ordering::Relaxed),
            stored: self.counters.stored.load(Ordering::Relaxed),
            checkpoints: self.counters.checkpoints.load(Ordering::Relaxed),
        }
    }

    /// Queues a write and waits until the commit that covers it.
    pub(crate) async fn call<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, LogError> {
        let closed = || LogError::from(Error::Closed);
        let (reply, answer) = oneshot::channel();
        self.tx.as_ref().ok_or_else(closed)?.send(request(reply)).map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Makes the file hold every write answered so far (a checkpoint, if any is due), for reads
    /// that scan its indexes rather than look up one saga.
    pub(crate) async fn sync(&self) -> Result<(), LogError> {
        self.call(Request::Sync).await
    }

    /// Runs `read` in a read transaction on the blocking pool; it sees the file only, without
    /// the overlay: as of the last checkpoint.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&ReadTransaction) -> Result<T> + Send + 'static,
    ) -> Result<T, LogError> {
        let db = self.db.clone();
        let task = tokio::task::spawn_blocking(move || read(&db.begin_read()?));
        task.await.map_err(|e| LogError::Unavailable(format!("saga log read task failed: {e}")))?.map_err(Into::into)
    }
}

impl fmt::Debug for RedbSagaLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbSagaLog").field("path", &self.path).field("stats", &self.stats()).finish()
    }
}

impl Drop for RedbSagaLog {
    fn drop(&mut self) {
        // Closing the channel lets the writer commit what is queued and stop; waiting for it
        // releases the file lock before `drop` returns, so the file can be opened again at once.
        drop(self.tx.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "saga log writer panicked");
        }
    }
}

#[async_trait]
impl SagaLog for RedbSagaLog {
    async fn begin(&self, saga: NewSaga) -> Result<Begin, LogError> {
        self.call(|reply| Request::Begin(saga, reply)).await
    }

    async fn append(&self, request_id: &str, event: SagaEvent) -> Result<SagaRecord, LogError> {
        self.call(|reply| Request::Append(request_id.to_owned(), event, reply)).await
    }

    async fn append_queued(&self, request_id: &str, event: SagaEvent) -> Result<(), LogError> {
        // The writer takes requests in order and stores a saga's record whenever it commits an
        // awaited write of that saga, so the saga's next awaited write covers this one.
        let (reply, _ignored) = oneshot::channel();
        let closed = || LogError::from(Error::Closed);
        self.tx
            .as_ref()
            .ok_or_else(closed)?
            .send(Request::Append(request_id.to_owned(), event, reply))
            .map_err(|_| closed())
    }

    async fn get(&self, request_id: &str) -> Result<Option<SagaRecord>, LogError> {
        // Cleared only once the file holds its records: a miss here finds them there.
        let fresh = lock(&self.overlay).get(request_id).map(|(_, bytes, _)| bytes.clone());
        if let Some(bytes) = fresh {
            return Ok(Some(decode(&bytes)?));
        }
        let id = request_id.to_owned();
        self.read(move |txn| {
            let Some(seq) = txn.open_table(IDS)?.get(id.as_str())?.map(|seq| seq.value()) else {
                return Ok(None);
            };
            let found = txn.open_table(SAGAS)?.get(seq)?;
            found.map(|bytes| decode(bytes.value())).transpose()
        })
        .await
    }

    async fn unfinished(&self) -> Result<Vec<SagaRecord>, LogError> {
        self.sync().await?;
        self.read(|txn| {
            let sagas = txn.open_table(SAGAS)?;
            let mut out = Vec::new();
            for entry in txn.open_table(UNFINISHED)?.iter()? {
                let (seq, _) = entry?;
                let seq = seq.value();
                let Some(bytes) = sagas.get(seq)? else {
                    return Err(Error::Corrupt(format!("unfinished saga number {seq} has no record")));
                };
                out.push(decode(bytes.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<SagaRecord>, LogError> {
        self.sync().await?;
        self.read(move |txn| list(txn, &filter)).await
    }

    fn name(&self) -> &'static str {
        "redb"
    }
}

/// Newest first, ties by request id ascending (as [`sagaflow::MemorySagaLog`] orders them).
fn list(txn: &ReadTransaction, filter: &ListFilter) -> Result<Vec<SagaRecord>> {
    let sagas = txn.open_table(SAGAS)?;
    let limit = if filter.limit == 0 { usize::MAX } else { filter.limit };
    let mut out = Vec::new();
    // Ties are ordered by request id, which the index does not hold: read each
    // same-millisecond group's records, then take them in request id order.
    let mut group: Vec<u64> = Vec::new();
    let mut group_ms = None;
    let take_group = |group: &mut Vec<u64>, out: &mut Vec<SagaRecord>| -> Result<()> {
        let mut records = Vec::with_capacity(group.len());
        for seq in group.drain(..) {
            let Some(bytes) = sagas.get(seq)? else { continue };
            let record = decode(bytes.value())?;
            if filter.facade.as_deref().is_none_or(|f| record.facade == f)
                && filter.status.is_none_or(|s| record.status() == s)
            {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.request_id.cmp(&b.request_id));
        out.extend(records.into_iter().take(limit.saturating_sub(out.len())));
        Ok(())
    };
    for entry in txn.open_table(BY_CREATED)?.iter()?.rev() {
        let (key, _) = entry?;
        let (ms, seq) = key.value();
        if group_ms != Some(ms) {
            take_group(&mut group, &mut out)?;
            if out.len() >= limit {
                return Ok(out);
            }
            group_ms = Some(ms);
        }
        group.push(seq);
    }
    take_group(&mut group, &mut out)?;
    Ok(out)
}

pub(crate) fn decode(bytes: &[u8]) -> Result<SagaRecord> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(e.to_string()))
}

fn encode(record: &SagaRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|e| Error::Corrupt(format!("cannot encode saga `{}`: {e}", record.request_id)))
}

/// Every table, open in one write transaction: a checkpoint, a replay, a prune.
pub(crate) struct Tables<'txn> {
    pub(crate) ids: Table<'txn, &'static str, u64>,
    pub(crate) sagas: Table<'txn, u64, &'static [u8]>,
    pub(crate) unfinished: Table<'txn, u64, ()>,
    pub(crate) by_created: Table<'txn, (u64, u64), ()>,
    pub(crate) ended: Table<'txn, (u64, u64), ()>,
    pub(crate) ended_at: Table<'txn, u64, u64>,
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
            }
        }
        Ok(())
    }
}

/// One batch's changes, not yet durable: its [`Op`]s in order, their encoding (the batch's
/// write-ahead entry), and which of them store a record, for the overlay.
#[derive(Debug, Default)]
struct Staged {
    ops: Vec<Op>,
    redo: Vec<u8>,
    /// (request id, index in `ops` of a `Stored` op).
    stored: Vec<(String, usize)>,
}

impl Staged {
    fn record(&mut self, op: Op) {
        op.encode(&mut self.redo);
        self.ops.push(op);
    }

    fn store(&mut self, request_id: String, seq: u64, record: Vec<u8>) {
        self.stored.push((request_id, self.ops.len()));
        self.record(Op::Stored { seq, record });
    }

    fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The records stored since the last checkpoint, by request id, with their sequence numbers
/// and the write-ahead epoch of the entry that stored them: the write-ahead file holds them, the
/// database file not yet. The writer and the readers look here before the file; the writer adds
/// a batch's records once its entry is durable and drops them once a checkpoint has put their
/// epoch in the file.
type Overlay = Arc<Mutex<Fresh>>;
type Fresh = HashMap<String, (u64, Arc<[u8]>, u64)>;

fn lock(overlay: &Overlay) -> MutexGuard<'_, Fresh> {
    // Nothing panics while holding it; if something did, the map is still whole.
    overlay.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The database file as of the last checkpoint, for the writer's lookups (with the overlay in
/// front, the whole log as answered so far).
struct Snapshot {
    ids: ReadOnlyTable<&'static str, u64>,
    sagas: ReadOnlyTable<u64, &'static [u8]>,
}

impl Snapshot {
    fn open(db: &Database) -> Result<Self> {
        let txn = db.begin_read()?;
        Ok(Self { ids: txn.open_table(IDS)?, sagas: txn.open_table(SAGAS)? })
    }
}

/// The ops of one epoch's write-ahead entries (or of several, after a failed checkpoint), to
/// apply in a checkpoint that stores `stamp` as the next epoch to replay.
struct Job {
    ops: Vec<Op>,
    stamp: u64,
}

/// What became of a [`Job`]: the file as of it (`None` if it could not be read after the
/// commit), or why it failed; with its ops back either way. The writer allocated them and frees
/// them: blocks freed on another thread cost the allocator more (mimalloc hands them back to the
/// allocating thread's pages, which it must then collect).
type Done = (std::result::Result<Option<Snapshot>, Error>, Vec<Op>);

/// The thread that makes checkpoints while the writer goes on writing the next epoch.
struct Checkpointer {
    /// `None` once stopping.
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn spawn(db: Arc<Database>) -> Result<Self> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("sagaflow-redb-checkpoint".into())
            .spawn(move || {
                for job in inbox {
                    let started = Instant::now();
                    let outcome = checkpoint_job(&db, &job);
                    let took = started.elapsed();
                    let (took_ms, ops) = (took.as_millis() as u64, job.ops.len());
                    if took >= SLOW_CHECKPOINT {
                        tracing::warn!(took_ms, ops, "slow saga log checkpoint");
                    } else {
                        tracing::debug!(took_ms, ops, "saga log checkpoint");
                    }
                    if outbox.send((outcome, job.ops)).is_err() {
                        break;
                    }
                }
            })
            .map_err(Error::Spawn)?;
        Ok(Self { jobs: Some(jobs), done, thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("saga log checkpoint thread panicked");
        }
    }
}

/// Applies a job in one durable commit; then reads the file as of it.
fn checkpoint_job(db: &Database, job: &Job) -> Result<Option<Snapshot>> {
    commit_checkpoint(db, &[&job.ops], job.stamp, |_| Ok(()))?;
    Ok(snapshot_after_checkpoint(db))
}

/// A checkpoint's transaction: applies `runs`, then `more` (pruning), and commits durably with
/// `epoch` stored as the first write-ahead epoch to replay, so that the entries of the epochs
/// before it are never replayed.
fn commit_checkpoint<T>(
    db: &Database,
    runs: &[&[Op]],
    epoch: u64,
    more: impl FnOnce(&mut Tables<'_>) -> Result<T>,
) -> Result<T> {
    let mut txn = db.begin_write()?;
    let done = {
        let mut tables = Tables::open(&txn)?;
        tables.apply_all(runs)?;
        tables.meta.insert(WAL_EPOCH, epoch)?;
        more(&mut tables)?
    };
    txn.set_durability(Durability::Immediate)
        .map_err(|e| Error::Corrupt(format!("cannot make a durable commit: {e}")))?;
    txn.commit()?;
    Ok(done)
}

/// The file as a checkpoint left it; `None` (logged) if it cannot be read, in which case the
/// caller keeps its overlay, which still covers everything since its snapshot.
fn snapshot_after_checkpoint(db: &Database) -> Option<Snapshot> {
    Snapshot::open(db)
        .inspect_err(|e| tracing::warn!(error = %e, "saga log could not read its file after a checkpoint"))
        .ok()
}

/// The records of the sagas the writer is working on: an append neither reads nor decodes the
/// stored record, and a saga changed several times in one batch (a step's start and its result)
/// is encoded and stored once, at the end of the batch. Holds running sagas, and ended ones
/// only until the flush that stores them; cleared when a batch fails, since the records in it
/// may then be ahead of the file (which drops queued appends still waiting, as a crash would).
///
/// A record changed only by queued appends (a step's start, an intermediate result) is not
/// stored by the batch that takes them but by the one that takes the saga's next awaited write,
/// or after `defer` at the latest: the sync flow's record is then stored at its start and its
/// end, not once more for every commit its steps spanned. Nobody waits for a queued append, and
/// a crash may lose it either way (the engine recovers from the recorded position); readers see
/// the saga's progress up to `defer` late.
#[derive(Debug)]
pub(crate) struct Cache {
    records: HashMap<String, Cached>,
    /// Request ids to store at the next flush, in the order first marked.
    urgent: Vec<String>,
    /// Request ids changed by queued appends only, with when they were first left unstored.
    deferred: VecDeque<(Instant, String)>,
    defer: Duration,
}

#[derive(Debug)]
struct Cached {
    record: SagaRecord,
    /// Its key in every table but `IDS`.
    seq: u64,
    /// Changed since it was last stored.
    unstored: bool,
    /// In `Cache::urgent`.
    urgent: bool,
}

impl Cache {
    /// More running sagas than this and the stored ones are dropped after a commit (recovery of
    /// a large backlog, say); records are read back from the file as needed.
    const MAX_RECORDS: usize = 100_000;

    pub(crate) fn new(defer: Duration) -> Self {
        Self { records: HashMap::new(), urgent: Vec::new(), deferred: VecDeque::new(), defer }
    }

    fn load(&mut self, record: SagaRecord, seq: u64) {
        self.records.insert(record.request_id.clone(), Cached { record, seq, unstored: false, urgent: false });
    }

    fn changed(&mut self, record: SagaRecord, seq: u64) {
        let id = record.request_id.clone();
        self.load(record, seq);
        self.mark(&id, true);
    }

    /// Notes that a record changed: to be stored by this batch if `urgent`, else within `defer`.
    fn mark(&mut self, request_id: &str, urgent: bool) {
        let Some(cached) = self.records.get_mut(request_id) else { return };
        let urgent = urgent || self.defer.is_zero();
        if urgent && !cached.urgent {
            cached.urgent = true;
            self.urgent.push(request_id.to_owned());
        }
        if !cached.unstored {
            cached.unstored = true;
            if !urgent {
                self.deferred.push_back((Instant::now(), request_id.to_owned()));
            }
        }
    }

    /// When the oldest deferred record falls due. Entries whose record was stored since (by the
    /// saga's awaited write) are dropped first, so they never cost a commit of their own.
    fn next_due(&mut self) -> Option<Instant> {
        while let Some((_, id)) = self.deferred.front() {
            if self.records.get(id).is_some_and(|cached| cached.unstored) {
                break;
            }
            self.deferred.pop_front();
        }
        self.deferred.front().map(|(since, _)| *since + self.defer)
    }

    /// Drops the stored records when there are too many, keeping those with unstored changes.
    fn trim(&mut self) {
        if self.records.len() > Self::MAX_RECORDS {
            self.records.retain(|_, cached| cached.unstored);
        }
    }

    fn clear(&mut self) {
        self.records.clear();
        self.urgent.clear();
        self.deferred.clear();
    }
}

/// A request's result, held until its batch commits.
enum Answer {
    Begin(Reply<Begin>, Result<Begin, LogError>),
    Append(Reply<SagaRecord>, Result<Option<SagaRecord>, LogError>),
}

fn answer<T>(reply: Reply<T>, result: Result<T, LogError>, failed: Option<&str>) {
    let result = match failed {
        Some(why) => Err(LogError::Unavailable(why.to_owned())),
        None => result,
    };
    // The caller may have given up waiting; its write stands regardless.
    let _ = reply.send(result);
}

impl Answer {
    /// Sends the result, or `failed` if the batch did not commit.
    fn send(self, failed: Option<&str>) {
        match self {
            Answer::Begin(reply, result) => answer(reply, result, failed),
            // No record: a queued append, whose caller does not wait for an answer.
            Answer::Append(reply, result) => match result.transpose() {
                Some(result) => answer(reply, result, failed),
                None => drop(reply),
            },
        }
    }
}

impl Request {
    /// Whether a caller waits for this request's commit (a queued append's caller does not).
    fn is_awaited(&self) -> bool {
        match self {
            Request::Begin(_, reply) => !reply.is_closed(),
            Request::Append(_, _, reply) => !reply.is_closed(),
            Request::Prune(..) | Request::Sync(_) => false,
        }
    }

    fn fail(self, why: &str) {
        match self {
            Request::Begin(_, reply) => answer(reply, Err(Error::Closed.into()), Some(why)),
            Request::Append(_, _, reply) => answer(reply, Err(Error::Closed.into()), Some(why)),
            Request::Prune(_, reply) => answer(reply, Err(Error::Closed.into()), Some(why)),
            Request::Sync(reply) => answer(reply, Err(Error::Closed.into()), Some(why)),
        }
    }
}

/// Turns one request's outcome into its answer; a store failure is recorded in `fatal`.
fn settle<R, T>(
    reply: R,
    outcome: Result<Result<T, LogError>>,
    fatal: &mut Option<Error>,
    wrap: fn(R, Result<T, LogError>) -> Answer,
) -> Answer {
    match outcome {
        Ok(result) => wrap(reply, result),
        Err(e) => {
            let result = Err(LogError::Unavailable(e.to_string()));
            *fatal = Some(e);
            wrap(reply, result)
        }
    }
}

/// The writer thread: the only one that opens write transactions.
struct Writer {
    db: Arc<Database>,
    rx: mpsc::Receiver<Request>,
    counters: Arc<Counters>,
    retention: Retention,
    prune_interval: Duration,
    prune_chunk: usize,
    max_batch: usize,
    linger: Duration,
    cache: Cache,
    /// The sequence number of the next saga to begin.
    next_seq: u64,
    wal: Wal,
    /// The ops of the write-ahead entries since the last checkpoint, in order: what the next
    /// checkpoint applies.
    pending: Vec<Op>,
    overlay: Overlay,
    snapshot: Snapshot,
    checkpointer: Checkpointer,
    /// The epoch whose checkpoint the checkpointer is making.
    in_flight: Option<u64>,
    /// A checkpoint failed: the next one is made by the writer, of every epoch not in the file,
    /// before a new epoch starts (which would overwrite the failed one's entries).
    must_sync: bool,
    checkpoint_interval: Duration,
    last_checkpoint: Instant,
    /// After a checkpoint failed: not tried again before this.
    checkpoint_retry: Option<Instant>,
}

impl Writer {
    fn run(mut self) {
        // Prune once at start (the process may have been down a while), then every interval.
        let mut last_awaited = 0;
        let schedulable = Instant::now().checked_add(self.prune_interval).is_some();
        let mut next_prune = schedulable.then(Instant::now);
        loop {
            // While a checkpoint is being made, look for its end every millisecond.
            let alive = self.checkpointer.jobs.is_some();
            let poll =
                self.in_flight.filter(|_| alive).and_then(|_| Instant::now().checked_add(Duration::from_millis(1)));
            let wake = [next_prune, self.cache.next_due(), self.checkpoint_at(), poll].into_iter().flatten().min();
            let first = match wake {
                Some(at) => match self.rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(request) => Some(request),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match self.rx.recv() {
                    Ok(request) => Some(request),
                    Err(mpsc::RecvError) => break,
                },
            };
            if let Some(first) = first {
                let mut batch = Vec::with_capacity(self.max_batch.min(64));
                batch.push(first);
                while batch.len() < self.max_batch {
                    match self.rx.try_recv() {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
                // Under load, the callers answered by the last commit are still on their way
                // back: wait a moment for them so they share this commit instead of the next.
                // Counted in awaited writes: the queued appends a lone caller sends along with
                // its awaited one must not make it wait for callers that do not exist.
                // Asleep, not blocked on the channel: a blocked receiver is woken by every send
                // (a futex call for the caller, a context switch for the writer), a sleeping one
                // by none.
                let mut awaited = batch.iter().filter(|request| request.is_awaited()).count();
                if awaited < last_awaited && batch.len() < self.max_batch && !self.linger.is_zero() {
                    thread::sleep(self.linger);
                    while batch.len() < self.max_batch {
                        match self.rx.try_recv() {
                            Ok(request) => {
                                awaited += usize::from(request.is_awaited());
                                batch.push(request);
                            }
                            Err(_) => break,
                        }
                    }
                }
                last_awaited = awaited;
                self.commit(batch, false);
            } else if self.cache.next_due().is_some_and(|due| Instant::now() >= due) {
                // Idle, with records of queued appends falling due: store them alone.
                self.commit(Vec::new(), false);
            }
            self.collect(false);
            if self.checkpoint_at().is_some_and(|at| Instant::now() >= at) {
                self.start_checkpoint();
            }
            // Checked after every batch too, so a busy writer still prunes; one chunk at a
            // time, so queued writes wait for at most one chunk.
            if next_prune.is_some_and(|at| Instant::now() >= at) {
                let more = match self.prune_once() {
                    Ok(pruned) => pruned.more,
                    Err(e) => {
                        tracing::warn!(error = %e, "saga log pruning failed");
                        false
                    }
                };
                next_prune = if more { Some(Instant::now()) } else { Instant::now().checked_add(self.prune_interval) };
            }
        }
        // Closing: store what queued appends left unstored, in a checkpoint, so that nothing is
        // left to replay.
        if self.cache.next_due().is_some() || !self.pending.is_empty() || self.in_flight.is_some() {
            self.commit(Vec::new(), true);
        }
        tracing::debug!("saga log writer stopped");
    }

    /// When the batches written since the last checkpoint are due to be applied to the file in
    /// a checkpoint: at the interval, or at once when half of the epoch's room is used; after a
    /// failed checkpoint, not before its retry time; never while one is being made.
    fn checkpoint_at(&self) -> Option<Instant> {
        if self.in_flight.is_some() || self.pending.is_empty() {
            return None;
        }
        let at = if self.wal.used() >= self.wal.room() / 2 {
            self.last_checkpoint
        } else {
            self.last_checkpoint.checked_add(self.checkpoint_interval)?
        };
        Some(self.checkpoint_retry.map_or(at, |retry| retry.max(at)))
    }

    /// Hands the current epoch's batches to the checkpointer and starts the next epoch, in the
    /// other half of the write-ahead file; after a failed checkpoint, makes one here instead.
    fn start_checkpoint(&mut self) {
        let epoch = self.wal.epoch();
        let sent = match (&self.checkpointer.jobs, self.must_sync) {
            (Some(jobs), false) => jobs.send(Job { ops: std::mem::take(&mut self.pending), stamp: epoch + 1 }),
            _ => {
                if let Err(e) = self.checkpoint(&Staged::default(), &[]) {
                    tracing::warn!(error = %e, "saga log checkpoint failed; the write-ahead file keeps the batches meanwhile");
                }
                return;
            }
        };
        match sent {
            Ok(()) => {
                self.wal.restart(epoch + 1);
                self.in_flight = Some(epoch);
                self.last_checkpoint = Instant::now();
            }
            Err(mpsc::SendError(job)) => {
                tracing::error!("saga log checkpoint thread is gone; the writer makes checkpoints itself");
                self.pending = job.ops;
                self.checkpointer.jobs = None;
            }
        }
    }

    /// Takes the outcome of the checkpoint being made, if it is over (or, if `block`, once it
    /// is): the file as of it replaces the snapshot, and the overlay drops the records of its
    /// epoch. A failed one gives its ops back, ahead of those written since. If the thread is
    /// gone, the checkpoint stays in flight for good: its ops went with the thread, and only a
    /// restart, replaying the write-ahead file, may retire its entries.
    fn collect(&mut self, block: bool) {
        let Some(epoch) = self.in_flight else { return };
        let done = if block {
            self.checkpointer.done.recv().ok()
        } else {
            match self.checkpointer.done.try_recv() {
                Ok(done) => Some(done),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => None,
            }
        };
        let Some((outcome, ops)) = done else {
            if self.checkpointer.jobs.take().is_some() {
                tracing::error!("{}", Error::CheckpointStopped { epoch });
            }
            return;
        };
        self.in_flight = None;
        match outcome {
            Ok(snapshot) => {
                if let Some(snapshot) = snapshot {
                    self.snapshot = snapshot;
                    lock(&self.overlay).retain(|_, (_, _, stored_in)| *stored_in > epoch);
                }
                self.checkpoint_retry = None;
                self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
                drop(ops);
            }
            Err(e) => {
                tracing::warn!(error = %e, "saga log checkpoint failed; the write-ahead file keeps the batches meanwhile");
                let mut ops = ops;
                ops.append(&mut self.pending);
                self.pending = ops;
                self.must_sync = true;
                self.checkpoint_retry = Instant::now().checked_add(Duration::from_millis(100));
            }
        }
    }

    /// The record of `request_id`, if it has one, and its sequence number: from the overlay,
    /// else from the file as of the last checkpoint. `None` for the record of a request id
    /// whose record is missing.
    fn lookup(&self, request_id: &str) -> Result<Option<(u64, Option<Result<SagaRecord>>)>> {
        let fresh = lock(&self.overlay).get(request_id).map(|(seq, bytes, _)| (*seq, bytes.clone()));
        if let Some((seq, bytes)) = fresh {
            return Ok(Some((seq, Some(decode(&bytes)))));
        }
        let Some(seq) = self.snapshot.ids.get(request_id)?.map(|seq| seq.value()) else { return Ok(None) };
        let record = self.snapshot.sagas.get(seq)?.map(|bytes| decode(bytes.value()));
        Ok(Some((seq, record)))
    }

    /// The outer error aborts the whole batch; the inner one is this request's own answer.
    fn begin(&mut self, staged: &mut Staged, saga: NewSaga) -> Result<Result<Begin, LogError>> {
        if let Some(cached) = self.cache.records.get(&saga.request_id) {
            return Ok(Ok(Begin::Exists(cached.record.clone())));
        }
        match self.lookup(&saga.request_id)? {
            Some((_, Some(record))) => return Ok(record.map(Begin::Exists).map_err(Into::into)),
            // Only pruning of an unreadable record leaves an id without one.
            Some((_, None)) => {
                tracing::warn!(request_id = %saga.request_id, "request id without a record; starting anew")
            }
            None => {}
        }
        let record = SagaRecord::new(saga);
        let seq = self.next_seq;
        self.next_seq += 1;
        staged.record(Op::Begun { request_id: record.request_id.clone(), seq, created_ms: record.created_ms });
        let answer = record.clone();
        self.cache.changed(record, seq);
        Ok(Ok(Begin::Started(answer)))
    }

    /// The outer error aborts the whole batch; the inner one is this request's own answer, the
    /// record after the event if `answer` (a queued append has nobody to answer).
    fn append(
        &mut self,
        staged: &mut Staged,
        request_id: &str,
        event: &SagaEvent,
        answer: bool,
    ) -> Result<Result<Option<SagaRecord>, LogError>> {
        if !self.cache.records.contains_key(request_id) {
            match self.lookup(request_id)? {
                None => return Ok(Err(LogError::NotFound(request_id.to_owned()))),
                Some((_, None)) => {
                    return Ok(Err(Error::Corrupt(format!("saga `{request_id}` has no record")).into()));
                }
                Some((_, Some(Err(e)))) => return Ok(Err(e.into())),
                Some((seq, Some(Ok(record)))) => self.cache.load(record, seq),
            }
        }
        let Some(cached) = self.cache.records.get_mut(request_id) else {
            return Ok(Err(LogError::NotFound(request_id.to_owned())));
        };
        let (record, seq) = (&mut cached.record, cached.seq);
        let was_ended = record.state.is_ended();
        if let Err(refused) = record.apply(event) {
            // An ended saga stays cached only until the flush that stores it.
            if was_ended && !cached.unstored {
                self.cache.records.remove(request_id);
            }
            return Ok(Err(refused.into()));
        }
        let (now_ended, ended_ms) = (record.state.is_ended(), record.updated_ms);
        match (was_ended, now_ended) {
            (false, true) => staged.record(Op::Ended { seq, ended_ms }),
            // A stuck saga retried: running again, so out of retention's reach.
            (true, false) => staged.record(Op::Revived { seq }),
            _ => {}
        }
        // A queued append that neither ends nor revives the saga (a step's start, the record of a
        // callback's delivery) may wait for the saga's next awaited write or the delay; an
        // awaited one, or one that moves the saga between indexes, is stored by this batch.
        let urgent = answer || was_ended != now_ended;
        let answer = answer.then(|| record.clone());
        self.cache.mark(request_id, urgent);
        Ok(Ok(answer))
    }

    /// Stores every record changed since the last flush, once each, and forgets the ended ones;
    /// a record changed only by queued appends waits (see [`Cache`]) unless `force`.
    /// Returns how many records it stored.
    fn flush(&mut self, staged: &mut Staged, force: bool) -> Result<u64> {
        let cache = &mut self.cache;
        let now = Instant::now();
        let mut stored = 0;
        let mut due = std::mem::take(&mut cache.urgent);
        while let Some((since, _)) = cache.deferred.front()
            && (force || now.saturating_duration_since(*since) >= cache.defer)
        {
            if let Some((_, id)) = cache.deferred.pop_front() {
                due.push(id);
            }
        }
        for id in due {
            let Some(cached) = cache.records.get_mut(&id) else { continue };
            cached.urgent = false;
            if !cached.unstored {
                continue;
            }
            cached.unstored = false;
            staged.store(id.clone(), cached.seq, encode(&cached.record)?);
            stored += 1;
            if cached.record.state.is_ended() {
                cache.records.remove(&id);
            }
        }
        Ok(stored)
    }

    /// Takes the batch's requests in order, makes their changes durable with one fsync, then
    /// answers every request. The fsync is that of the batch's entry in the write-ahead file,
    /// or, for a batch that prunes, syncs or is `force`d (every changed record stored, deferred
    /// or not), or whose entry does not fit, that of a checkpoint that applies it too.
    fn commit(&mut self, batch: Vec<Request>, force: bool) {
        let mut staged = Staged::default();
        let mut answers = Vec::with_capacity(batch.len());
        let mut prunes = Vec::new();
        let mut syncs = Vec::new();
        let mut fatal = None;
        let mut requests = batch.into_iter();
        let mut writes = 0u64;
        for request in requests.by_ref() {
            let answer = match request {
                Request::Begin(saga, reply) => {
                    writes += 1;
                    let outcome = self.begin(&mut staged, saga);
                    settle(reply, outcome, &mut fatal, Answer::Begin)
                }
                Request::Append(id, event, reply) => {
                    writes += 1;
                    let outcome = self.append(&mut staged, &id, &event, !reply.is_closed());
                    settle(reply, outcome, &mut fatal, Answer::Append)
                }
                Request::Prune(now, reply) => {
                    prunes.push((now, reply));
                    continue;
                }
                Request::Sync(reply) => {
                    syncs.push(reply);
                    continue;
                }
            };
            answers.push(answer);
            if fatal.is_some() {
                break;
            }
        }
        // Pruning reads the stored records: every change is stored first, so none is stored
        // after pruning deleted its saga.
        let force = force || !prunes.is_empty();
        let mut stored = 0;
        if fatal.is_none() {
            match self.flush(&mut staged, force) {
                Ok(flushed) => stored = flushed,
                Err(e) => fatal = Some(e),
            }
        }
        let mut checkpoint = force || !syncs.is_empty();
        // Whether the batch's entry may be in the write-ahead file (also when writing it failed:
        // it may have reached the disk).
        let mut appended = false;
        if fatal.is_none() && !checkpoint && !staged.is_empty() {
            match self.wal.append(&staged.redo) {
                Ok(fits) => {
                    appended = fits;
                    checkpoint = !fits;
                    if !fits {
                        // The callers of this batch wait for a checkpoint: the last one is slower
                        // than the epoch's half of the write-ahead file takes to fill.
                        tracing::warn!(
                            epoch = self.wal.epoch(),
                            "write-ahead half full; checkpointing on the callers' path"
                        );
                    }
                }
                Err(e) => {
                    appended = true;
                    fatal = Some(e);
                }
            }
        }
        let mut pruned = Vec::new();
        if fatal.is_none() && checkpoint && (!staged.is_empty() || !self.pending.is_empty() || !prunes.is_empty()) {
            let nows: Vec<u64> = prunes.iter().map(|(now, _)| *now).collect();
            match self.checkpoint(&staged, &nows) {
                Ok(done) => pruned = done,
                Err(e) => fatal = Some(e),
            }
        }
        match fatal {
            None => {
                if appended {
                    self.publish(staged);
                }
                self.cache.trim();
                if writes > 0 && (appended || checkpoint) {
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                }
                self.counters.writes.fetch_add(writes, Ordering::Relaxed);
                self.counters.stored.fetch_add(stored, Ordering::Relaxed);
                let removed: usize = pruned.iter().map(|p| p.removed).sum();
                self.counters.pruned.fetch_add(removed as u64, Ordering::Relaxed);
                answers.into_iter().for_each(|a| a.send(None));
                for ((_, reply), done) in prunes.into_iter().zip(pruned) {
                    answer(reply, Ok(done), None);
                }
                for reply in syncs {
                    answer(reply, Ok(()), None);
                }
            }
            Some(e) => {
                // The cached records may hold this batch's changes, which no file does.
                self.cache.clear();
                tracing::error!(error = %e, "saga log batch failed; every write in it is refused");
                if appended {
                    // Its write-ahead entry must not be replayed after a crash: retire it.
                    self.retire_wal();
                }
                let why = e.to_string();
                answers.into_iter().for_each(|a| a.send(Some(&why)));
                prunes.into_iter().for_each(|(now, reply)| Request::Prune(now, reply).fail(&why));
                syncs.into_iter().for_each(|reply| Request::Sync(reply).fail(&why));
                requests.for_each(|request| request.fail(&why));
            }
        }
    }

    /// After the batch's entry is durable: its ops wait for the next checkpoint, its records
    /// are found in the overlay meanwhile.
    fn publish(&mut self, staged: Staged) {
        self.add_to_overlay(&staged);
        self.pending.extend(staged.ops);
    }

    /// Puts the records `staged` stores in the overlay, as of the current epoch.
    fn add_to_overlay(&self, staged: &Staged) {
        let epoch = self.wal.epoch();
        let mut overlay = lock(&self.overlay);
        for (request_id, at) in &staged.stored {
            if let Some(Op::Stored { seq, record }) = staged.ops.get(*at) {
                overlay.insert(request_id.clone(), (*seq, Arc::from(record.as_slice()), epoch));
            }
        }
    }

    /// A checkpoint made here, for callers that wait for it: once the checkpointer's is over,
    /// one durable commit that applies every batch not in the file yet, then `staged`, then
    /// prunes one chunk as of each of `prunes`; it raises the write-ahead epoch past the current
    /// one, so that none of those batches is replayed after a crash. Returns what each chunk
    /// pruned. On failure nothing changed: the batches stay in the write-ahead file and `pending`.
    fn checkpoint(&mut self, staged: &Staged, prunes: &[u64]) -> Result<Vec<Pruned>> {
        self.collect(true);
        if let Some(epoch) = self.in_flight {
            return Err(Error::CheckpointStopped { epoch });
        }
        if self.pending.is_empty() && staged.is_empty() && prunes.is_empty() {
            return Ok(Vec::new());
        }
        let (retention, chunk) = (&self.retention, self.prune_chunk);
        let result = commit_checkpoint(&self.db, &[&self.pending, &staged.ops], self.wal.epoch() + 1, |tables| {
            prunes.iter().map(|&now| tables.prune(retention, now, chunk)).collect::<Result<Vec<_>>>()
        });
        match &result {
            Ok(_) => {
                self.pending.clear();
                self.checkpointed();
                // The file now holds the overlay's records; the writer's lookups and readers go
                // there once the new snapshot is open. Until then, the overlay stays (and gets
                // this batch's records), so no lookup misses an answered write.
                match snapshot_after_checkpoint(&self.db) {
                    Some(snapshot) => {
                        self.snapshot = snapshot;
                        lock(&self.overlay).clear();
                    }
                    None => self.add_to_overlay(staged),
                }
            }
            Err(_) => self.checkpoint_retry = Instant::now().checked_add(Duration::from_millis(100)),
        }
        result
    }

    /// One chunk of retention, in a checkpoint of its own.
    fn prune_once(&mut self) -> Result<Pruned> {
        let mut staged = Staged::default();
        let done = self.flush(&mut staged, true).and_then(|stored| {
            let pruned = self.checkpoint(&staged, &[sagaflow::now_ms()])?;
            Ok((pruned, stored))
        });
        let (pruned, stored) = match done {
            Ok((pruned, stored)) => (pruned.into_iter().next().unwrap_or(Pruned { removed: 0, more: false }), stored),
            Err(e) => {
                // The cached records may be marked stored by the flush that did not commit.
                self.cache.clear();
                return Err(e);
            }
        };
        self.counters.stored.fetch_add(stored, Ordering::Relaxed);
        self.counters.pruned.fetch_add(pruned.removed as u64, Ordering::Relaxed);
        if pruned.removed > 0 {
            tracing::debug!(removed = pruned.removed, "saga log pruned ended sagas");
        }
        Ok(pruned)
    }

    /// After a checkpoint's commit here: new entries go to the next epoch.
    fn checkpointed(&mut self) {
        self.wal.restart(self.wal.epoch() + 1);
        self.last_checkpoint = Instant::now();
        self.checkpoint_retry = None;
        self.must_sync = false;
        self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
    }

    /// After a batch failed with its write-ahead entry maybe on disk: a checkpoint of the
    /// batches before it retires the entry (its epoch is left behind), so a crash cannot replay
    /// it.
    fn retire_wal(&mut self) {
        if let Err(e) = self.checkpoint(&Staged::default(), &[]) {
            tracing::error!(
                error = %e,
                "saga log could not retire the write-ahead entry of a failed batch; a crash before the next checkpoint would replay it"
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use redb::ReadableTableMetadata;
    use sagaflow::{Failure, Mode, SagaState, SagaStatus};
    use serde_json::json;
    use tempfile::TempDir;

    use super::*;

    pub(crate) fn new_saga(id: &str) -> NewSaga {
        NewSaga {
            request_id: id.into(),
            facade: "F".into(),
            mode: Mode::Sync,
            steps: 1,
            data: json!(null),
            deadline_ms: u64::MAX,
            callback_url: None,
        }
    }

    /// A log in a fresh directory that only prunes when asked.
    pub(crate) fn open(retention: Retention) -> (TempDir, RedbSagaLog) {
        let dir = tempfile::tempdir().unwrap();
        let options = RedbOptions::new(dir.path()).retention(retention).prune_interval(Duration::MAX);
        let log = RedbSagaLog::open(options).unwrap();
        (dir, log)
    }

    pub(crate) async fn run_to_end(log: &RedbSagaLog, id: &str) -> SagaRecord {
        log.begin(new_saga(id)).await.unwrap();
        log.append(id, SagaEvent::StepStarted { index: 0 }).await.unwrap();
        let r = log.append(id, SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
        assert_eq!(r.status(), SagaStatus::Completed);
        r
    }

    /// Ends `id` stuck: its only step failed uncertainly and its compensation gave up.
    pub(crate) async fn run_to_stuck(log: &RedbSagaLog, id: &str) {
        log.begin(new_saga(id)).await.unwrap();
        let failure = Failure { step: 0, node: "N".into(), error: "timeout".into(), code: None };
        log.append(
            id,
            SagaEvent::StepFailed { failure, attempts: 1, compensate_failed: true, later_steps_in_doubt: false },
        )
        .await
        .unwrap();
        let r = log
            .append(id, SagaEvent::CompensationGaveUp { index: 0, attempts: 3, reason: "down".into() })
            .await
            .unwrap();
        assert_eq!(r.status(), SagaStatus::Stuck);
    }

    /// A writer that is not running, so a test can hand it one exact batch.
    fn idle_writer(dir: &Path) -> Writer {
        let db = Database::create(dir.join(crate::FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        Tables::open(&txn).unwrap().meta.insert(WAL_SALT, 1).unwrap();
        txn.commit().unwrap();
        let (_tx, rx) = mpsc::channel();
        let snapshot = Snapshot::open(&db).unwrap();
        let db = Arc::new(db);
        Writer {
            checkpointer: Checkpointer::spawn(db.clone()).unwrap(),
            in_flight: None,
            must_sync: false,
            db,
            rx,
            counters: Arc::default(),
            retention: Retention::default(),
            prune_interval: Duration::MAX,
            prune_chunk: 512,
            max_batch: 256,
            linger: Duration::ZERO,
            cache: Cache::new(Duration::from_millis(100)),
            next_seq: 0,
            wal: Wal::open(dir.join(crate::WAL_FILE_NAME), 1 << 20, 1, 0).unwrap(),
            pending: Vec::new(),
            overlay: Overlay::default(),
            snapshot,
            checkpoint_interval: Duration::from_millis(100),
            last_checkpoint: Instant::now(),
            checkpoint_retry: None,
        }
    }

    /// What a crash leaves of `from`'s log: its two files as they are on disk now, copied while
    /// it is open and idle (redb's file still holds only its last durable commit).
    fn crash_image(from: &Path, with_wal: bool) -> TempDir {
        let to = tempfile::tempdir().unwrap();
        std::fs::copy(from.join(crate::FILE_NAME), to.path().join(crate::FILE_NAME)).unwrap();
        if with_wal {
            std::fs::copy(from.join(crate::WAL_FILE_NAME), to.path().join(crate::WAL_FILE_NAME)).unwrap();
        }
        to
    }

    #[tokio::test]
    async fn a_crash_between_checkpoints_loses_no_answered_write() {
        let dir = tempfile::tempdir().unwrap();
        let options = |dir: &Path| {
            RedbOptions::new(dir).prune_interval(Duration::MAX).checkpoint_interval(Duration::from_secs(3600))
        };
        let log = RedbSagaLog::open(options(dir.path())).unwrap();
        run_to_end(&log, "done").await;
        run_to_stuck(&log, "stuck").await;
        log.begin(new_saga("running")).await.unwrap();
        log.append("running", SagaEvent::StepStarted { index: 0 }).await.unwrap();
        // A stuck saga retried moves back to the running ones.
        log.begin(new_saga("retried")).await.unwrap();
        run_to_stuck(&log, "retried-stuck").await;
        log.append("retried-stuck", SagaEvent::RetryCompensation).await.unwrap();
        let stats = log.stats();
        assert_eq!(stats.checkpoints, 0, "every batch went to the write-ahead file: {stats:?}");

        // Without the write-ahead file, the crash image has none of it: the test below is not
        // passing on redb's own durability.
        let bare = crash_image(dir.path(), false);
        let reopened = RedbSagaLog::open(options(bare.path())).unwrap();
        assert_eq!(reopened.get("done").await.unwrap(), None);
        drop(reopened);

        let image = crash_image(dir.path(), true);
        let reopened = RedbSagaLog::open(options(image.path())).unwrap();
        for id in ["done", "stuck", "running", "retried", "retried-stuck"] {
            assert_eq!(reopened.get(id).await.unwrap(), log.get(id).await.unwrap(), "{id}");
        }
        let mut running: Vec<String> = reopened.unfinished().await.unwrap().into_iter().map(|r| r.request_id).collect();
        running.sort();
        assert_eq!(running, ["retried", "retried-stuck", "running"]);
        let listed = reopened.list(ListFilter::default()).await.unwrap();
        assert_eq!(listed.len(), 5);
        // The replay ended in a checkpoint: a second crash right away replays nothing twice.
        assert_eq!(reopened.stats().checkpoints, 0);
        let again = crash_image(image.path(), true);
        let twice = RedbSagaLog::open(options(again.path())).unwrap();
        assert_eq!(twice.get("done").await.unwrap(), log.get("done").await.unwrap());
        assert_eq!(twice.unfinished().await.unwrap().len(), 3);
        // New sagas after a replay get numbers of their own.
        twice.begin(new_saga("after")).await.unwrap();
        assert_eq!(twice.get("running").await.unwrap(), log.get("running").await.unwrap());
        assert_eq!(twice.list(ListFilter::default()).await.unwrap().len(), 6);
    }

    #[tokio::test]
    async fn checkpoints_retire_the_write_ahead_entries() {
        let dir = tempfile::tempdir().unwrap();
        let options = RedbOptions::new(dir.path()).prune_interval(Duration::MAX).checkpoint_interval(Duration::ZERO);
        let log = RedbSagaLog::open(options.clone()).unwrap();
        for i in 0..5 {
            run_to_end(&log, &format!("r{i}")).await;
        }
        // Checkpoints run on their own thread and are counted when the writer collects them:
        // wait (bounded) for the writer to get there rather than assume it has.
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.stats().checkpoints < 2 {
            assert!(Instant::now() < deadline, "no checkpoints by themselves: {:?}", log.stats());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut expected = Vec::new();
        for i in 0..5 {
            expected.push(log.get(&format!("r{i}")).await.unwrap().unwrap());
        }
        // Closing ends in a checkpoint: the redb file alone holds every saga.
        drop(log);
        std::fs::remove_file(dir.path().join(crate::WAL_FILE_NAME)).unwrap();
        let reopened = RedbSagaLog::open(options).unwrap();
        for record in expected {
            assert_eq!(reopened.get(&record.request_id).await.unwrap().as_ref(), Some(&record));
        }
    }

    /// The record the writer finds for `id` (in its overlay or the file), and its number.
    fn found(writer: &Writer, id: &str) -> (u64, SagaRecord) {
        let (seq, record) = writer.lookup(id).unwrap().unwrap();
        (seq, record.unwrap().unwrap())
    }

    /// Applies what the writer holds in its write-ahead file alone to the database file.
    fn checkpoint(writer: &mut Writer) {
        writer.checkpoint(&Staged::default(), &[]).unwrap();
        assert!(writer.pending.is_empty() && lock(&writer.overlay).is_empty());
    }

    /// The record stored for `id` in the file, and its sequence number.
    pub(crate) fn stored(txn: &ReadTransaction, id: &str) -> Option<(u64, SagaRecord)> {
        let seq = txn.open_table(IDS).unwrap().get(id).unwrap()?.value();
        let record = decode(txn.open_table(SAGAS).unwrap().get(seq).unwrap().unwrap().value()).unwrap();
        Some((seq, record))
    }

    fn request<T>(make: impl FnOnce(Reply<T>) -> Request) -> (Request, oneshot::Receiver<Result<T, LogError>>) {
        let (reply, rx) = oneshot::channel();
        (make(reply), rx)
    }

    #[test]
    fn one_batch_answers_each_request_on_its_own_and_sees_its_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = idle_writer(dir.path());
        let (begin, mut begin_rx) = request(|r| Request::Begin(new_saga("a"), r));
        let (again, mut again_rx) = request(|r| Request::Begin(new_saga("a"), r));
        let (start, mut start_rx) = request(|r| Request::Append("a".into(), SagaEvent::StepStarted { index: 0 }, r));
        let (skip, mut skip_rx) = request(|r| Request::Append("a".into(), SagaEvent::StepStarted { index: 3 }, r));
        let (nope, mut nope_rx) = request(|r| Request::Append("nope".into(), SagaEvent::StepStarted { index: 0 }, r));
        let done = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!({ "ok": true }) };
        let (complete, mut complete_rx) = request(|r| Request::Append("a".into(), done, r));

        writer.commit(vec![begin, again, start, skip, nope, complete], false);

        assert!(matches!(begin_rx.try_recv().unwrap(), Ok(Begin::Started(_))));
        match again_rx.try_recv().unwrap() {
            Ok(Begin::Exists(r)) => assert_eq!(r.status(), SagaStatus::Running),
            other => panic!("second begin: {other:?}"),
        }
        assert_eq!(start_rx.try_recv().unwrap().unwrap().history.len(), 2);
        assert!(matches!(skip_rx.try_recv().unwrap(), Err(LogError::Transition(_))));
        assert!(matches!(nope_rx.try_recv().unwrap(), Err(LogError::NotFound(_))));
        let completed = complete_rx.try_recv().unwrap().unwrap();
        assert_eq!(completed.state, SagaState::Completed);
        assert_eq!(completed.history.len(), 3, "the refused event left no trace");

        assert_eq!(writer.counters.batches.load(Ordering::Relaxed), 1);
        assert_eq!(writer.counters.writes.load(Ordering::Relaxed), 6);
        // What was committed is what was answered, and the indexes follow the state.
        assert_eq!(found(&writer, "a").1, completed, "found before a checkpoint");
        assert!(writer.db.begin_read().unwrap().open_table(IDS).unwrap().get("a").unwrap().is_none());
        checkpoint(&mut writer);
        let txn = writer.db.begin_read().unwrap();
        let (seq, stored) = stored(&txn, "a").unwrap();
        assert_eq!(stored, completed);
        assert!(txn.open_table(UNFINISHED).unwrap().get(seq).unwrap().is_none());
        assert_eq!(txn.open_table(ENDED_AT).unwrap().get(seq).unwrap().unwrap().value(), completed.updated_ms);
        assert!(writer.cache.records.is_empty(), "an ended saga leaves the cache");

        // Loaded for an event its state refuses, an ended saga does not stay cached either.
        let (late, mut late_rx) = request(|r| Request::Append("a".into(), SagaEvent::StepStarted { index: 0 }, r));
        writer.commit(vec![late], false);
        assert!(matches!(late_rx.try_recv().unwrap(), Err(LogError::Transition(_))));
        assert!(writer.cache.records.is_empty());
    }

    #[test]
    fn a_running_saga_is_cached_as_stored_and_queued_appends_get_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = idle_writer(dir.path());
        let mut saga = new_saga("r");
        saga.steps = 2;
        let (begin, _begin_rx) = request(|r| Request::Begin(saga, r));
        writer.commit(vec![begin], false);
        // A queued append: its receiver is gone before the writer sees it.
        let (queued, queued_rx) = request(|r| Request::Append("r".into(), SagaEvent::StepStarted { index: 0 }, r));
        drop(queued_rx);
        let done = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(7) };
        let (complete, mut complete_rx) = request(|r| Request::Append("r".into(), done, r));
        writer.commit(vec![queued, complete], false);

        let after = complete_rx.try_recv().unwrap().unwrap();
        assert_eq!(after.completed, 1);
        assert_eq!(after.history.len(), 3, "the queued start was applied first");
        assert_eq!(found(&writer, "r").1, after);
        assert_eq!(writer.cache.records.get("r").map(|c| &c.record), Some(&after));
        assert!(writer.cache.records.get("r").is_some_and(|c| !c.unstored), "nothing left to store");
        assert_eq!(writer.counters.stored.load(Ordering::Relaxed), 2, "once per commit");
    }

    /// Begins a two-step saga in a commit of its own.
    fn begin_two_steps(writer: &mut Writer, id: &str) {
        let mut saga = new_saga(id);
        saga.steps = 2;
        let (begin, _rx) = request(|r| Request::Begin(saga, r));
        writer.commit(vec![begin], false);
    }

    fn queued(id: &str, event: SagaEvent) -> Request {
        request(|r| Request::Append(id.into(), event, r)).0
    }

    fn stored_history(writer: &Writer, id: &str) -> usize {
        found(writer, id).1.history.len()
    }

    #[test]
    fn queued_appends_wait_for_the_sagas_next_awaited_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = idle_writer(dir.path());
        begin_two_steps(&mut writer, "q");
        assert_eq!(stored_history(&writer, "q"), 1);

        writer.commit(vec![queued("q", SagaEvent::StepStarted { index: 0 })], false);
        let result = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) };
        writer.commit(vec![queued("q", result)], false);
        assert_eq!(stored_history(&writer, "q"), 1, "queued appends alone are not stored yet");
        assert_eq!(writer.counters.stored.load(Ordering::Relaxed), 1);
        assert_eq!(writer.counters.batches.load(Ordering::Relaxed), 1, "nor committed: no fsync for them");

        // Another saga's awaited write does not store them either: only this saga's does.
        begin_two_steps(&mut writer, "other");
        assert_eq!(stored_history(&writer, "q"), 1);
        let (start, mut start_rx) = request(|r| Request::Append("q".into(), SagaEvent::StepStarted { index: 1 }, r));
        writer.commit(vec![start], false);
        let answered = start_rx.try_recv().unwrap().unwrap();
        assert_eq!(answered.history.len(), 4);
        assert_eq!(found(&writer, "q").1, answered);
        assert_eq!(writer.counters.stored.load(Ordering::Relaxed), 3, "q once more, other once");
    }

    #[test]
    fn a_checkpoint_applies_the_batches_since_the_last_one_with_each_saga_stored_as_last_answered() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = idle_writer(dir.path());
        begin_two_steps(&mut writer, "spans");
        checkpoint(&mut writer);
        // Between two checkpoints: "passing" begins and ends, "spans" ends, "left" begins.
        let mut answered = HashMap::new();
        let mut awaited = |writer: &mut Writer, id: &str, event: SagaEvent| {
            let (append, mut rx) = request(|r| Request::Append(id.into(), event, r));
            writer.commit(vec![append], false);
            answered.insert(id.to_owned(), rx.try_recv().unwrap().unwrap());
        };
        writer.commit(vec![request(|r| Request::Begin(new_saga("passing"), r)).0], false);
        awaited(&mut writer, "passing", SagaEvent::StepStarted { index: 0 });
        awaited(&mut writer, "passing", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) });
        for index in 0..2 {
            awaited(&mut writer, "spans", SagaEvent::StepStarted { index });
            awaited(&mut writer, "spans", SagaEvent::StepCompleted { index, attempts: 1, data: json!(index) });
        }
        begin_two_steps(&mut writer, "left");
        let stores = writer.pending.iter().filter(|op| matches!(op, Op::Stored { .. })).count();
        assert_eq!(stores, 8, "each answer stored its record in the write-ahead file");
        assert_eq!(found(&writer, "spans").1, answered["spans"], "found in the overlay meanwhile");

        checkpoint(&mut writer);
        let txn = writer.db.begin_read().unwrap();
        for id in ["passing", "spans"] {
            let (_, record) = stored(&txn, id).unwrap();
            assert_eq!(record, answered[id], "{id}: the last record answered is the one stored");
            assert!(record.state.is_ended());
        }
        let (left, _) = stored(&txn, "left").unwrap();
        let running: Vec<u64> =
            txn.open_table(UNFINISHED).unwrap().iter().unwrap().map(|e| e.unwrap().0.value()).collect();
        assert_eq!(running, [left], "only the saga still running is indexed as running");
        assert_eq!(txn.open_table(ENDED).unwrap().len().unwrap(), 2);
        assert_eq!(txn.open_table(BY_CREATED).unwrap().len().unwrap(), 3);
        assert_eq!(found(&writer, "spans").1, answered["spans"], "and found in the file after");
    }

    #[tokio::test]
    async fn a_checkpoint_runs_beside_the_writer_and_a_crash_during_it_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = idle_writer(dir.path());
        let begin = |id: &str| request(|r| Request::Begin(new_saga(id), r)).0;
        writer.commit(vec![begin("a"), begin("b")], false);
        // The file as it is before the checkpoint of epoch 0 gets in.
        let before = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join(crate::FILE_NAME), before.path().join(crate::FILE_NAME)).unwrap();

        writer.start_checkpoint();
        assert_eq!((writer.in_flight, writer.wal.epoch()), (Some(0), 1), "the writer went on in the next epoch");
        let done = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) };
        let (end_a, mut end_a_rx) = request(|r| Request::Append("a".into(), done, r));
        writer.commit(vec![end_a, begin("c")], false);
        let a = end_a_rx.try_recv().unwrap().unwrap();
        // A crash now, with the checkpoint not in the file yet: both epochs are replayed.
        let mid = crash_image(dir.path(), true);
        std::fs::copy(before.path().join(crate::FILE_NAME), mid.path().join(crate::FILE_NAME)).unwrap();

        writer.collect(true);
        assert_eq!(writer.in_flight, None);
        let mut fresh: Vec<String> = lock(&writer.overlay).keys().cloned().collect();
        fresh.sort();
        assert_eq!(fresh, ["a", "c"], "the overlay keeps only what epoch 1 stored");
        assert_eq!(found(&writer, "b").1.request_id, "b", "found in the file now");
        // A crash after the checkpoint: epoch 1 is replayed on top of it.
        let after = crash_image(dir.path(), true);

        // (The idle writer's file is 1 MiB, the log's default larger: the replay reads it with
        // the halves it was written in, and only then is it resized.)
        for image in [mid, after] {
            let log = RedbSagaLog::open(RedbOptions::new(image.path()).prune_interval(Duration::MAX)).unwrap();
            assert_eq!(log.get("a").await.unwrap(), Some(a.clone()));
            let mut running: Vec<String> = log.unfinished().await.unwrap().into_iter().map(|r| r.request_id).collect();
            running.sort();
            assert_eq!(running, ["b", "c"]);
        }
    }

    #[tokio::test]
    async fn a_checkpoint_thread_lost_mid_checkpoint_retires_nothing_and_refuses_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = idle_writer(dir.path());
        writer.commit(vec![request(|r| Request::Begin(new_saga("a"), r)).0], false);
        writer.start_checkpoint();
        // The thread is gone with the job, as far as the writer can tell.
        let (jobs, _) = mpsc::channel();
        let (_, done) = mpsc::channel();
        drop(std::mem::replace(&mut writer.checkpointer, Checkpointer { jobs: Some(jobs), done, thread: None }));
        writer.collect(false);
        assert_eq!(writer.in_flight, Some(0), "still in flight: nothing may retire epoch 0");
        assert!(writer.checkpointer.jobs.is_none());

        // Batches still go to the write-ahead file; a checkpoint is refused, with why.
        let (begin, mut begin_rx) = request(|r| Request::Begin(new_saga("b"), r));
        writer.commit(vec![begin], false);
        assert!(matches!(begin_rx.try_recv().unwrap(), Ok(Begin::Started(_))));
        match writer.checkpoint(&Staged::default(), &[]) {
            Err(e @ Error::CheckpointStopped { epoch: 0 }) => assert!(e.to_string().contains("restart"), "{e}"),
            other => panic!("checkpoint: {other:?}"),
        }
        let (sync, mut sync_rx) = request(Request::Sync);
        writer.commit(vec![sync], false);
        assert!(matches!(sync_rx.try_recv().unwrap(), Err(LogError::Unavailable(_))));

        // A restart replays both epochs.
        let image = crash_image(dir.path(), true);
        let log = RedbSagaLog::open(RedbOptions::new(image.path()).prune_interval(Duration::MAX)).unwrap();
        let mut running: Vec<String> = log.unfinished().await.unwrap().into_iter().map(|r| r.request_id).collect();
        running.sort();
        assert_eq!(running, ["a", "b"]);
    }

    #[test]
    fn a_deferred_record_is_stored_once_due_or_when_forced() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = idle_writer(dir.path());
        writer.cache = Cache::new(Duration::from_millis(30));
        begin_two_steps(&mut writer, "d");
        writer.commit(vec![queued("d", SagaEvent::StepStarted { index: 0 })], false);
        let due = writer.cache.next_due().unwrap();
        writer.commit(Vec::new(), false);
        assert_eq!(stored_history(&writer, "d"), 1, "not due yet");
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        writer.commit(Vec::new(), false);
        assert_eq!(stored_history(&writer, "d"), 2, "stored once due");
        assert!(writer.cache.next_due().is_none());

        writer.commit(vec![queued("d", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) })], false);
        assert_eq!(stored_history(&writer, "d"), 2);
        writer.commit(Vec::new(), true);
        assert_eq!(stored_history(&writer, "d"), 3, "forced");
    }

    #[test]
    fn a_queued_append_that_ends_the_saga_is_stored_by_its_own_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = idle_writer(dir.path());
        writer.commit(vec![request(|r| Request::Begin(new_saga("e"), r)).0], false);
        writer.commit(vec![queued("e", SagaEvent::StepStarted { index: 0 })], false);
        writer.commit(vec![queued("e", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) })], false);
        checkpoint(&mut writer);
        let txn = writer.db.begin_read().unwrap();
        let (seq, record) = stored(&txn, "e").unwrap();
        assert_eq!(record.state, SagaState::Completed);
        assert!(txn.open_table(UNFINISHED).unwrap().get(seq).unwrap().is_none(), "record and index agree");
        assert!(writer.cache.records.is_empty());
    }

    #[test]
    fn a_queued_event_on_an_ended_saga_waits_and_pruning_stores_it_before_deleting_the_saga() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = idle_writer(dir.path());
        writer.cache = Cache::new(Duration::from_secs(10));
        writer.commit(vec![request(|r| Request::Begin(new_saga("p"), r)).0], false);
        let done = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) };
        writer.commit(vec![request(|r| Request::Append("p".into(), done, r)).0], false);
        let delivered = SagaEvent::CallbackDelivered { delivered: true, attempts: 1, error: None };
        writer.commit(vec![queued("p", delivered)], false);
        assert_eq!(stored_history(&writer, "p"), 2, "the delivery waits");
        assert!(writer.cache.next_due().is_some());

        // Pruning this very saga: its waiting change is stored first, then deleted with it,
        // never written back after.
        writer.retention = Retention { max_age: Duration::from_secs(3600), max_ended: 0 };
        assert_eq!(writer.prune_once().unwrap().removed, 1);
        assert!(writer.cache.next_due().is_none() && writer.cache.records.is_empty());
        writer.commit(Vec::new(), true);
        let txn = writer.db.begin_read().unwrap();
        assert_eq!(txn.open_table(SAGAS).unwrap().len().unwrap(), 0, "no record left behind");
        assert_eq!(txn.open_table(IDS).unwrap().len().unwrap(), 0);
        assert_eq!(writer.counters.stored.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn closing_the_log_stores_what_queued_appends_left_and_readers_see_it_within_the_delay() {
        let dir = tempfile::tempdir().unwrap();
        let options = || RedbOptions::new(dir.path()).prune_interval(Duration::MAX);
        let log = RedbSagaLog::open(options().defer_queued(Duration::from_secs(10))).unwrap();
        let mut saga = new_saga("c");
        saga.steps = 2;
        log.begin(saga).await.unwrap();
        log.append_queued("c", SagaEvent::StepStarted { index: 0 }).await.unwrap();
        drop(log);
        let log = RedbSagaLog::open(options()).unwrap();
        assert_eq!(log.get("c").await.unwrap().unwrap().history.len(), 2, "stored on close");

        // With a short delay, a reader sees a lone queued append without any awaited write.
        drop(log);
        let log = RedbSagaLog::open(options().defer_queued(Duration::from_millis(20))).unwrap();
        log.append_queued("c", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
        let seen = async {
            while log.get("c").await.unwrap().unwrap().history.len() < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), seen).await.expect("stored within the delay, by an idle writer");
    }

    #[tokio::test]
    async fn concurrent_begins_of_one_request_id_start_it_once() {
        let (_dir, log) = open(Retention::default());
        let log = Arc::new(log);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let log = log.clone();
                tokio::spawn(async move { log.begin(new_saga("same")).await.unwrap() })
            })
            .collect();
        let mut started = 0;
        let mut records = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Begin::Started(r) => {
                    started += 1;
                    records.push(r);
                }
                Begin::Exists(r) => records.push(r),
            }
        }
        assert_eq!(started, 1);
        assert!(records.windows(2).all(|w| w[0] == w[1]), "every caller sees the one record");
        assert_eq!(log.unfinished().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_writers_share_commits() {
        let (_dir, log) = open(Retention::default());
        let log = Arc::new(log);
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { run_to_end(&log, &format!("s{i}")).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let stats = log.stats();
        assert_eq!(stats.writes, 32 * 3);
        assert!(stats.batches <= stats.writes);
        assert_eq!(log.list(ListFilter::default()).await.unwrap().len(), 32);
        assert!(log.unfinished().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_retried_stuck_saga_is_unfinished_again() {
        let (_dir, log) = open(Retention::default());
        run_to_stuck(&log, "s").await;
        assert!(log.unfinished().await.unwrap().is_empty());
        let r = log.append("s", SagaEvent::RetryCompensation).await.unwrap();
        assert_eq!(r.next_compensation(), Some(0));
        let unfinished = log.unfinished().await.unwrap();
        assert_eq!(unfinished, vec![r]);
        let r = log.append("s", SagaEvent::StepCompensated { index: 0, attempts: 1 }).await.unwrap();
        assert_eq!(r.status(), SagaStatus::Compensated);
        assert!(log.unfinished().await.unwrap().is_empty());
        // Exactly one `ended` entry, at the second ending.
        let txn = log.db.begin_read().unwrap();
        let ended = txn.open_table(ENDED).unwrap();
        let keys: Vec<_> = ended.iter().unwrap().map(|e| e.unwrap().0.value().0).collect();
        assert_eq!(keys, vec![r.updated_ms]);
    }

    #[tokio::test]
    async fn list_is_newest_first_with_ties_by_request_id_and_filters() {
        let (_dir, log) = open(Retention::default());
        // Sagas begun together mostly share a millisecond: the tie order must be stable.
        let ids = ["c", "a", "b", "e", "d"];
        for id in ids {
            log.begin(new_saga(id)).await.unwrap();
        }
        let mut other = new_saga("x");
        other.facade = "G".into();
        log.begin(other).await.unwrap();
        run_to_end(&log, "done").await;

        let all = log.list(ListFilter::default()).await.unwrap();
        assert_eq!(all.len(), 7);
        for w in all.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            assert!(
                a.created_ms > b.created_ms || (a.created_ms == b.created_ms && a.request_id < b.request_id),
                "{} then {}",
                a.request_id,
                b.request_id
            );
        }
        let first_two = log.list(ListFilter { limit: 2, ..ListFilter::default() }).await.unwrap();
        assert_eq!(first_two, all[..2]);
        let g = log.list(ListFilter { facade: Some("G".into()), ..ListFilter::default() }).await.unwrap();
        assert_eq!(g.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), ["x"]);
        let done = ListFilter { status: Some(SagaStatus::Completed), ..ListFilter::default() };
        assert_eq!(log.list(done).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn unknown_sagas_and_bad_transitions_are_errors() {
        let (_dir, log) = open(Retention::default());
        assert!(matches!(log.append("nope", SagaEvent::StepStarted { index: 0 }).await, Err(LogError::NotFound(_))));
        log.begin(new_saga("a")).await.unwrap();
        assert!(matches!(log.append("a", SagaEvent::StepStarted { index: 3 }).await, Err(LogError::Transition(_))));
        assert_eq!(log.get("a").await.unwrap().unwrap().history.len(), 1);
        assert_eq!(log.get("nope").await.unwrap(), None);
    }

    #[tokio::test]
    async fn the_file_is_locked_while_open_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let log = RedbSagaLog::open(RedbOptions::new(dir.path().join("nested"))).unwrap();
        run_to_end(&log, "kept").await;
        log.begin(new_saga("running")).await.unwrap();
        match RedbSagaLog::open(RedbOptions::new(dir.path().join("nested"))) {
            Err(e @ Error::AlreadyOpen { .. }) => assert!(e.to_string().contains("already open"), "{e}"),
            other => panic!("second open: {other:?}"),
        }
        drop(log);
        let log = RedbSagaLog::open(RedbOptions::new(dir.path().join("nested"))).unwrap();
        assert_eq!(log.get("kept").await.unwrap().unwrap().status(), SagaStatus::Completed);
        let unfinished = log.unfinished().await.unwrap();
        assert_eq!(unfinished.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), ["running"]);
    }

    #[tokio::test]
    async fn writes_queued_at_drop_are_committed() {
        let dir = tempfile::tempdir().unwrap();
        let log = RedbSagaLog::open(RedbOptions::new(dir.path())).unwrap();
        let mut answers = Vec::new();
        for i in 0..50 {
            let (reply, rx) = oneshot::channel();
            log.tx.as_ref().unwrap().send(Request::Begin(new_saga(&format!("q{i}")), reply)).unwrap();
            answers.push(rx);
        }
        drop(log);
        for rx in answers {
            assert!(matches!(rx.await.unwrap(), Ok(Begin::Started(_))));
        }
        let log = RedbSagaLog::open(RedbOptions::new(dir.path())).unwrap();
        assert_eq!(log.unfinished().await.unwrap().len(), 50);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(crate::FILE_NAME), b"not a redb file, not at all, no").unwrap();
        match RedbSagaLog::open(RedbOptions::new(dir.path())) {
            Err(e @ Error::Open { .. }) => assert!(e.to_string().contains("sagas.redb"), "{e}"),
            other => panic!("open: {other:?}"),
        }
    }
}
