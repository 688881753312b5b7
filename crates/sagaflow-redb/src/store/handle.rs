//! The handle callers hold: writes go to the writer thread, reads to the overlay, then the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread;

use async_trait::async_trait;
use redb::{ReadTransaction, ReadableDatabase, ReadableTable};
use sagaflow::SagaRecord;
use sagaflow::log::{Begin, ListFilter, LogError, LogHealth, NewSaga, SagaEvent, SagaLog};
use tokio::sync::oneshot;

use super::overlay::Overlay;
use super::request::{Reply, Request};
use super::shared::{Counters, Shared};
use super::tables::{BY_CREATED, IDS, SAGAS, UNFINISHED, decode};
use super::writer::Writer;
use crate::error::{Error, Result};
use crate::options::RedbOptions;

/// The embedded saga log: one redb file, durable across process and machine crashes.
///
/// Writes (`begin`, `append`) go to a single writer thread that takes everything queued as one
/// batch, makes it durable with one fsync (of its entry in the write-ahead file), then answers
/// each caller: many concurrent sagas share each fsync. The records stored wait in an overlay
/// until a checkpoint thread applies them to the database file (see `wal/mod.rs`). Dropping the log
/// commits the queued writes and a last checkpoint, stops both threads and releases the file;
/// the drop blocks for that (a few milliseconds).
///
/// When a write fails (a full disk, an I/O error), the batch it was in is refused
/// ([`LogError::Unavailable`]), and so is every write after it while the file is closed and
/// opened again, with backoff, as a restart would open it; [`SagaLog::health`] says
/// [`LogHealth::NotServing`] meanwhile. Every write answered before stays: it is in the
/// write-ahead file or the database file.
pub struct RedbSagaLog {
    shared: Arc<Shared>,
    /// The records the file does not hold yet: looked up first.
    overlay: Overlay,
    /// `None` only while dropping, so the writer sees the channel close.
    pub(super) tx: Option<mpsc::Sender<Request>>,
    writer: Option<thread::JoinHandle<()>>,
    path: PathBuf,
    /// One operator's switch written at a time.
    controls: Arc<tokio::sync::Mutex<()>>,
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
    /// Times the file was closed and opened again after a write failed.
    pub reopens: u64,
}

/// What [`SagaLog::list`] has read since the log was opened: the work a page costs, which
/// tests compare between pages near the start of the list and far into it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListReads {
    /// Entries of the creation index visited.
    pub index_entries: u64,
    /// Records read and decoded.
    pub records: u64,
}

impl WriteStats {
    /// Writes per commit: how many callers shared each fsync.
    pub fn average_batch(&self) -> f64 {
        if self.batches == 0 { 0.0 } else { self.writes as f64 / self.batches as f64 }
    }
}

impl RedbSagaLog {
    /// Opens (creating it if needed) the log in `<data_dir>/sagas.redb` and starts its writer.
    ///
    /// Fails with [`Error::AlreadyOpen`] if the file is open elsewhere, in this process or another.
    pub fn open(options: RedbOptions) -> Result<Self> {
        std::fs::create_dir_all(&options.data_dir)
            .map_err(|source| Error::CreateDir { path: options.data_dir.clone(), source })?;
        let path = options.path();
        let opened = super::replay::open(&options, None)?;
        let db = Arc::new(opened.db);
        let overlay = Overlay::default();
        let shared = Arc::new(Shared::new(db.clone()));
        let (tx, rx) = mpsc::channel();
        let writer = Writer::new(options, db, opened.wal, opened.next_seq, rx, overlay.clone(), shared.clone())?;
        let writer = thread::Builder::new()
            .name("sagaflow-redb-writer".into())
            .spawn(move || writer.run())
            .map_err(Error::Spawn)?;
        tracing::debug!(path = %path.display(), "saga log opened");
        Ok(Self { shared, overlay, tx: Some(tx), writer: Some(writer), path, controls: Arc::default() })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[cfg(test)]
    pub(crate) fn db_for_tests(&self) -> Arc<redb::Database> {
        self.shared.db().expect("the database file is open")
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> WriteStats {
        let counters = &self.shared.counters;
        WriteStats {
            batches: counters.batches.load(Ordering::Relaxed),
            writes: counters.writes.load(Ordering::Relaxed),
            pruned: counters.pruned.load(Ordering::Relaxed),
            stored: counters.stored.load(Ordering::Relaxed),
            checkpoints: counters.checkpoints.load(Ordering::Relaxed),
            reopens: counters.reopens.load(Ordering::Relaxed),
        }
    }

    /// What `list` has read so far.
    #[doc(hidden)]
    pub fn list_reads(&self) -> ListReads {
        let counters = &self.shared.counters;
        ListReads {
            index_entries: counters.listed_keys.load(Ordering::Relaxed),
            records: counters.listed_records.load(Ordering::Relaxed),
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
        let db = self.shared.db()?;
        let task = tokio::task::spawn_blocking(move || read(&db.begin_read()?));
        task.await.map_err(|e| LogError::unavailable("saga log read task failed", e))?.map_err(Into::into)
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
        if let Some(fresh) = self.overlay.get(request_id) {
            return Ok(Some(decode(&fresh.bytes)?));
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
        let shared = self.shared.clone();
        self.read(move |txn| list(txn, &filter, &shared.counters)).await
    }

    fn name(&self) -> &'static str {
        "redb"
    }

    async fn controls(&self) -> Result<Vec<(String, String)>, LogError> {
        let file = crate::controls::path(&self.path);
        let read = tokio::task::spawn_blocking(move || crate::controls::read(&file));
        let controls = read.await.map_err(|e| LogError::unavailable("reading switches failed", e))??;
        Ok(controls.into_iter().collect())
    }

    async fn set_control(&self, key: &str, value: Option<&str>) -> Result<(), LogError> {
        let _one_at_a_time = self.controls.lock().await;
        let (file, key, value) = (crate::controls::path(&self.path), key.to_owned(), value.map(str::to_owned));
        let write = tokio::task::spawn_blocking(move || crate::controls::set(&file, &key, value.as_deref()));
        write.await.map_err(|e| LogError::unavailable("writing a switch failed", e))?
    }

    fn health(&self) -> LogHealth {
        self.shared.health()
    }
}

/// Newest first, ties by request id ascending (as [`sagaflow::MemorySagaLog`] orders them),
/// read from the creation index where the filter's window starts: a page deep in the list
/// costs what the first one does.
fn list(txn: &ReadTransaction, filter: &ListFilter, counters: &Counters) -> Result<Vec<SagaRecord>> {
    let sagas = txn.open_table(SAGAS)?;
    let limit = if filter.limit == 0 { usize::MAX } else { filter.limit };
    let mut out = Vec::new();
    // The window in milliseconds, both ends inclusive.
    let newest = match (filter.until_ms, &filter.after) {
        (Some(0), _) => return Ok(out),
        (until, after) => until.map_or(u64::MAX, |u| u - 1).min(after.as_ref().map_or(u64::MAX, |a| a.created_ms)),
    };
    let oldest = filter.since_ms.unwrap_or(0);
    if oldest > newest {
        return Ok(out);
    }
    // Ties are ordered by request id, which the index does not hold: read each
    // same-millisecond group's records, then take them in request id order.
    let mut group: Vec<u64> = Vec::new();
    let mut group_ms = None;
    let take_group = |group: &mut Vec<u64>, out: &mut Vec<SagaRecord>| -> Result<()> {
        let mut records = Vec::with_capacity(group.len());
        counters.listed_records.fetch_add(group.len() as u64, Ordering::Relaxed);
        for seq in group.drain(..) {
            let Some(bytes) = sagas.get(seq)? else { continue };
            let record = decode(bytes.value())?;
            if filter.matches(&record) {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.request_id.cmp(&b.request_id));
        out.extend(records.into_iter().take(limit.saturating_sub(out.len())));
        Ok(())
    };
    for entry in txn.open_table(BY_CREATED)?.range((oldest, 0)..=(newest, u64::MAX))?.rev() {
        let (key, _) = entry?;
        counters.listed_keys.fetch_add(1, Ordering::Relaxed);
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
