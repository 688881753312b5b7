//! The writer thread: the only one that opens write transactions. It takes the queued requests
//! in batches, makes each batch durable with one write-ahead entry, and hands the entries'
//! changes to the checkpoint thread.

use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use redb::Database;
use sagaflow::log::{Begin, LogError, Retention};
use sagaflow::{NewSaga, SagaEvent, SagaRecord};

use super::cache::Cache;
use super::checkpoint::{Checkpointer, Finished, Job, commit_checkpoint, snapshot_after_checkpoint};
use super::handle::Counters;
use super::overlay::Overlay;
use super::request::{Answer, Outcome, Request, answer, settle};
use super::tables::{Snapshot, decode, encode};
use crate::error::{Error, Result};
use crate::options::RedbOptions;
use crate::prune::Pruned;
use crate::wal::{Op, Wal};

#[cfg(test)]
mod tests;

/// One batch's changes, not yet durable: its [`Op`]s in order, their encoding (the batch's
/// write-ahead entry), and which of them store a record, for the overlay.
#[derive(Debug, Default)]
pub(super) struct Staged {
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

/// What the log holds for a request id.
// Returned and taken apart at once: boxing the record would cost an allocation per lookup.
#[allow(clippy::large_enum_variant)]
enum Lookup {
    /// No saga has it.
    Unknown,
    /// A saga has it but its record is missing (only pruning an unreadable record leaves one).
    NoRecord,
    /// The saga's sequence number and its record, decoded.
    Found { seq: u64, record: Result<SagaRecord> },
}

/// The writer thread: the only one that opens write transactions.
pub(super) struct Writer {
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
    /// A writer for the file `db` opened with `options`, taking requests from `rx`; `wal` is
    /// open in a new epoch and `next_seq` is the number of the next saga to begin.
    pub(super) fn new(
        options: &RedbOptions,
        db: Arc<Database>,
        wal: Wal,
        next_seq: u64,
        rx: mpsc::Receiver<Request>,
        overlay: Overlay,
        counters: Arc<Counters>,
    ) -> Result<Self> {
        Ok(Self {
            snapshot: Snapshot::open(&db)?,
            checkpointer: Checkpointer::spawn(db.clone())?,
            db,
            rx,
            counters,
            retention: options.retention,
            prune_interval: options.prune_interval,
            prune_chunk: options.prune_chunk,
            max_batch: options.max_batch,
            linger: options.linger,
            cache: Cache::new(options.defer_queued),
            next_seq,
            wal,
            pending: Vec::new(),
            overlay,
            in_flight: None,
            must_sync: false,
            checkpoint_interval: options.checkpoint_interval,
            last_checkpoint: Instant::now(),
            checkpoint_retry: None,
        })
    }

    /// Takes requests until every sender is gone, then stores what is left and stops.
    pub(super) fn run(mut self) {
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
        let Some(Finished { outcome, ops }) = done else {
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
                    self.overlay.retire(epoch);
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

    /// What the log holds for `request_id`: from the overlay, else from the file as of the
    /// last checkpoint.
    fn lookup(&self, request_id: &str) -> Result<Lookup> {
        if let Some(fresh) = self.overlay.get(request_id) {
            return Ok(Lookup::Found { seq: fresh.seq, record: decode(&fresh.bytes) });
        }
        let Some(seq) = self.snapshot.ids.get(request_id)?.map(|seq| seq.value()) else { return Ok(Lookup::Unknown) };
        Ok(match self.snapshot.sagas.get(seq)? {
            Some(bytes) => Lookup::Found { seq, record: decode(bytes.value()) },
            None => Lookup::NoRecord,
        })
    }

    fn begin(&mut self, staged: &mut Staged, saga: NewSaga) -> Outcome<Begin> {
        if let Some(cached) = self.cache.records.get(&saga.request_id) {
            return Ok(Ok(Begin::Exists(cached.record.clone())));
        }
        match self.lookup(&saga.request_id)? {
            Lookup::Found { record, .. } => return Ok(record.map(Begin::Exists).map_err(Into::into)),
            // Only pruning of an unreadable record leaves an id without one.
            Lookup::NoRecord => {
                tracing::warn!(request_id = %saga.request_id, "request id without a record; starting anew")
            }
            Lookup::Unknown => {}
        }
        let record = SagaRecord::new(saga);
        let seq = self.next_seq;
        self.next_seq += 1;
        staged.record(Op::Begun { request_id: record.request_id.clone(), seq, created_ms: record.created_ms });
        let answer = record.clone();
        self.cache.changed(record, seq);
        Ok(Ok(Begin::Started(answer)))
    }

    /// The record after the event if `answer` (a queued append has nobody to answer).
    fn append(
        &mut self,
        staged: &mut Staged,
        request_id: &str,
        event: &SagaEvent,
        answer: bool,
    ) -> Outcome<Option<SagaRecord>> {
        if !self.cache.records.contains_key(request_id) {
            match self.lookup(request_id)? {
                Lookup::Unknown => return Ok(Err(LogError::NotFound(request_id.to_owned()))),
                Lookup::NoRecord => {
                    return Ok(Err(Error::Corrupt(format!("saga `{request_id}` has no record")).into()));
                }
                Lookup::Found { record: Err(e), .. } => return Ok(Err(e.into())),
                Lookup::Found { seq, record: Ok(record) } => self.cache.load(record, seq),
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
        let stored = staged.stored.iter().filter_map(|(request_id, at)| match staged.ops.get(*at) {
            Some(Op::Stored { seq, record }) => Some((request_id.as_str(), *seq, record.as_slice())),
            _ => None,
        });
        self.overlay.insert_all(self.wal.epoch(), stored);
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
                        self.overlay.clear();
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
