//! The writer thread: the only one that opens write transactions. It takes the queued requests
//! in batches, makes each batch durable with one write-ahead entry, and hands the entries'
//! changes to the checkpoint thread.

use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use redb::Database;
use sagaflow::SagaRecord;
use sagaflow::log::{Begin, LogError, NewSaga, Retention, SagaEvent};

use super::cache::Cache;
use super::checkpoint::{Checkpointer, Finished, Job, commit_checkpoint, snapshot_after_checkpoint};
use super::overlay::Overlay;
use super::request::{Answer, Outcome, Request, answer, settle};
use super::shared::Shared;
use super::tables::{Snapshot, decode, encode};
use crate::error::{Error, Result};
use crate::options::RedbOptions;
use crate::prune::Pruned;
use crate::wal::{KEPT_ROOM, Op, Wal};

mod outage;
#[cfg(test)]
mod tests;

use outage::Outage;

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

    /// Empties it for the next batch, keeping its buffers' room (up to [`KEPT_ROOM`]).
    fn clear(&mut self) {
        self.ops.clear();
        self.redo.clear();
        self.redo.shrink_to(KEPT_ROOM);
        self.stored.clear();
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

/// The database file, open, with what reads it.
struct Store {
    db: Arc<Database>,
    /// The file as of the last checkpoint, for the writer's lookups.
    snapshot: Snapshot,
    checkpointer: Checkpointer,
}

impl Store {
    fn open(db: Arc<Database>) -> Result<Self> {
        Ok(Self { snapshot: Snapshot::open(&db)?, checkpointer: Checkpointer::spawn(db.clone())?, db })
    }
}

/// The writer thread: the only one that opens write transactions.
pub(super) struct Writer {
    /// How the file was opened, to open it again after a failure.
    options: RedbOptions,
    /// `None` while the file is closed after a failure.
    store: Option<Store>,
    rx: mpsc::Receiver<Request>,
    shared: Arc<Shared>,
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
    /// The epoch whose checkpoint the checkpointer is making.
    in_flight: Option<u64>,
    checkpoint_interval: Duration,
    last_checkpoint: Instant,
    /// Set while writes fail: they are refused until the file is open again.
    outage: Option<Outage>,
    /// Ended sagas in the file after the last prune, and sagas stored as ended since (an
    /// overestimate: a saga stored ended twice counts twice). Once they exceed the retention's
    /// count by a chunk, a prune is due at once, whatever the interval (unless pruning is off):
    /// the ended sagas kept stay within `max_ended` and a chunk (and a batch) however fast they
    /// arrive.
    ended_held: usize,
    ended_since_prune: usize,
    /// The buffers of the last batch, emptied, for the next one: a batch's entry grows to tens
    /// of KiB, and grown anew each time it cost a reallocation and a copy per doubling.
    spare: Staged,
    /// Where records are encoded before their exact-size copy is stored.
    encoding: Vec<u8>,
}

impl Writer {
    /// A writer for the file `db` opened with `options`, taking requests from `rx`; `wal` is
    /// open in a new epoch and `next_seq` is the number of the next saga to begin.
    pub(super) fn new(
        options: RedbOptions,
        db: Arc<Database>,
        wal: Wal,
        next_seq: u64,
        rx: mpsc::Receiver<Request>,
        overlay: Overlay,
        shared: Arc<Shared>,
    ) -> Result<Self> {
        Ok(Self {
            store: Some(Store::open(db)?),
            rx,
            shared,
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
            checkpoint_interval: options.checkpoint_interval,
            last_checkpoint: Instant::now(),
            outage: None,
            ended_held: 0,
            ended_since_prune: 0,
            spare: Staged::default(),
            encoding: Vec::new(),
            options,
        })
    }

    /// The open file; an error while it is closed after a failure.
    fn store(&self) -> Result<&Store> {
        self.store.as_ref().ok_or_else(|| Error::Outage(self.shared.refusal_text()))
    }

    /// Takes requests until every sender is gone, then stores what is left and stops.
    pub(super) fn run(mut self) {
        // Prune once at start (the process may have been down a while), then every interval.
        let mut last_awaited = 0;
        let schedulable = Instant::now().checked_add(self.prune_interval).is_some();
        let mut next_prune = schedulable.then(Instant::now);
        let mut batch = Vec::new();
        loop {
            if self.outage.is_some() {
                if self.wait_out_outage() {
                    continue;
                }
                break;
            }
            // While a checkpoint is being made, look for its end every millisecond.
            let poll = self.in_flight.and_then(|_| Instant::now().checked_add(Duration::from_millis(1)));
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
                self.commit(&mut batch, false);
                if schedulable && self.over_retention_count() {
                    next_prune = Some(Instant::now());
                }
            } else if self.cache.next_due().is_some_and(|due| Instant::now() >= due) {
                // Idle, with records of queued appends falling due: store them alone.
                self.commit(&mut Vec::new(), false);
            }
            if self.outage.is_some() {
                continue;
            }
            let checkpointed = self.collect(false).and_then(|()| {
                if self.checkpoint_at().is_some_and(|at| Instant::now() >= at) {
                    self.start_checkpoint()?;
                }
                Ok(())
            });
            if let Err(e) = checkpointed {
                let _ = self.enter_outage(e);
                continue;
            }
            // Checked after every batch too, so a busy writer still prunes; one chunk at a
            // time, so queued writes wait for at most one chunk.
            if next_prune.is_some_and(|at| Instant::now() >= at) {
                match self.prune_once() {
                    Ok(pruned) => {
                        next_prune = if pruned.more {
                            Some(Instant::now())
                        } else {
                            Instant::now().checked_add(self.prune_interval)
                        }
                    }
                    Err(e) => {
                        let _ = self.enter_outage(e);
                    }
                }
            }
        }
        // Closing: store what queued appends left unstored, in a checkpoint, so that nothing is
        // left to replay. After a failure, once more try to open the file for that; if that
        // fails too, the write-ahead file still holds every write answered.
        if self.outage.is_some() && !self.reopen() {
            tracing::warn!("saga log closed while it could not write; the next open replays every write answered");
            return;
        }
        if self.cache.next_due().is_some() || !self.pending.is_empty() || self.in_flight.is_some() {
            self.commit(&mut Vec::new(), true);
        }
        tracing::debug!("saga log writer stopped");
    }

    /// Whether the ended sagas held may exceed the retention's count by a prune chunk.
    fn over_retention_count(&self) -> bool {
        let bound = self.retention.max_ended.saturating_add(self.prune_chunk);
        self.ended_held.saturating_add(self.ended_since_prune) >= bound
    }

    /// After a prune: what it left.
    fn pruned(&mut self, pruned: &Pruned) {
        self.ended_held = pruned.ended_left;
        self.ended_since_prune = 0;
    }

    /// When the batches written since the last checkpoint are due to be applied to the file in
    /// a checkpoint: at the interval, or at once when half of the epoch's room is used; never
    /// while one is being made.
    fn checkpoint_at(&self) -> Option<Instant> {
        if self.in_flight.is_some() || self.pending.is_empty() {
            return None;
        }
        if self.wal.used() >= self.wal.room() / 2 {
            return Some(self.last_checkpoint);
        }
        self.last_checkpoint.checked_add(self.checkpoint_interval)
    }

    /// Hands the current epoch's batches to the checkpointer and starts the next epoch, in the
    /// other half of the write-ahead file.
    fn start_checkpoint(&mut self) -> Result<()> {
        let epoch = self.wal.epoch();
        let job = Job { ops: std::mem::take(&mut self.pending), stamp: epoch + 1 };
        let sent = match &self.store()?.checkpointer.jobs {
            Some(jobs) => jobs.send(job),
            None => Err(mpsc::SendError(job)),
        };
        if let Err(mpsc::SendError(job)) = sent {
            self.pending = job.ops;
            return Err(Error::CheckpointStopped { epoch });
        }
        self.wal.restart(epoch + 1);
        self.in_flight = Some(epoch);
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Takes the outcome of the checkpoint being made, if it is over (or, if `block`, once it
    /// is): the file as of it replaces the snapshot, and the overlay drops the records of its
    /// epoch. A failed checkpoint, or a checkpoint thread gone, is an error: the write-ahead
    /// file still holds its batches, for the file opened again to replay.
    fn collect(&mut self, block: bool) -> Result<()> {
        let Some(epoch) = self.in_flight else { return Ok(()) };
        let store = self.store()?;
        let done = if block {
            store.checkpointer.done.recv().ok()
        } else {
            match store.checkpointer.done.try_recv() {
                Ok(done) => Some(done),
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => None,
            }
        };
        self.in_flight = None;
        let Some(Finished { outcome, ops }) = done else { return Err(Error::CheckpointStopped { epoch }) };
        let snapshot = outcome?;
        if let Some(snapshot) = snapshot
            && let Some(store) = &mut self.store
        {
            store.snapshot = snapshot;
            self.overlay.retire(epoch);
        }
        self.shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        drop(ops);
        Ok(())
    }

    /// What the log holds for `request_id`: from the overlay, else from the file as of the
    /// last checkpoint.
    fn lookup(&self, request_id: &str) -> Result<Lookup> {
        if let Some(fresh) = self.overlay.get(request_id) {
            return Ok(Lookup::Found { seq: fresh.seq, record: decode(&fresh.bytes) });
        }
        let snapshot = &self.store()?.snapshot;
        let Some(seq) = snapshot.ids.get(request_id)?.map(|seq| seq.value()) else { return Ok(Lookup::Unknown) };
        Ok(match snapshot.sagas.get(seq)? {
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
            Lookup::Unknown => {
                if let Some(bytes) = self.store()?.snapshot.tombstones.get(saga.request_id.as_str())? {
                    // An unreadable tombstone refuses the request id too: better than running it twice.
                    let tombstone = crate::tombstones::decode(&saga.request_id, bytes.value());
                    return Ok(tombstone.map(Begin::Pruned).map_err(Into::into));
                }
            }
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
        event: SagaEvent,
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
        if let Err(refused) = record.apply_owned(event) {
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

    /// Stores every record changed since the last flush, once each; a record changed only by
    /// queued appends waits (see [`Cache`]) unless `force`. Returns how many records it stored.
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
            encode(&cached.record, &mut self.encoding)?;
            staged.store(id.clone(), cached.seq, self.encoding.clone());
            self.encoding.shrink_to(KEPT_ROOM);
            stored += 1;
        }
        Ok(stored)
    }

    /// Takes the batch's requests in order, makes their changes durable with one fsync, then
    /// answers every request. The fsync is that of the batch's entry in the write-ahead file,
    /// or, for a batch that prunes, syncs or is `force`d (every changed record stored, deferred
    /// or not), or whose entry does not fit, that of a checkpoint that applies it too.
    /// `batch` is left empty, its room kept.
    fn commit(&mut self, batch: &mut Vec<Request>, force: bool) {
        self.cache.begin_batch();
        let mut staged = std::mem::take(&mut self.spare);
        let mut answers = Vec::with_capacity(batch.len());
        let mut prunes = Vec::new();
        let mut syncs = Vec::new();
        let mut fatal = None;
        let mut requests = batch.drain(..);
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
                    let outcome = self.append(&mut staged, &id, event, !reply.is_closed());
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
                    // Whatever it left in the file is not replayed by this process; a crash
                    // before the next open is not to replay it either.
                    self.wal.scrub_refused();
                    fatal = Some(e);
                }
            }
        }
        let mut pruned = Vec::new();
        // A checkpoint in flight may hold writes answered before a sync: it is waited for too.
        let unstored = !staged.is_empty() || !self.pending.is_empty() || self.in_flight.is_some();
        if fatal.is_none() && checkpoint && (unstored || !prunes.is_empty()) {
            let nows: Vec<u64> = prunes.iter().map(|(now, _)| *now).collect();
            match self.checkpoint(&staged, &nows) {
                Ok(done) => pruned = done,
                Err(e) => fatal = Some(e),
            }
        }
        let Some(e) = fatal else {
            if appended {
                self.publish(&mut staged);
            } else {
                self.forget_ended(&staged);
            }
            staged.clear();
            self.spare = staged;
            self.cache.trim();
            let counters = &self.shared.counters;
            if writes > 0 && (appended || checkpoint) {
                counters.batches.fetch_add(1, Ordering::Relaxed);
            }
            counters.writes.fetch_add(writes, Ordering::Relaxed);
            counters.stored.fetch_add(stored, Ordering::Relaxed);
            let removed: usize = pruned.iter().map(|p| p.removed).sum();
            counters.pruned.fetch_add(removed as u64, Ordering::Relaxed);
            if let Some(last) = pruned.last() {
                self.pruned(last);
            }
            answers.into_iter().for_each(|a| a.send(None));
            for ((_, reply), done) in prunes.into_iter().zip(pruned) {
                answer(reply, Ok(done), None);
            }
            for reply in syncs {
                answer(reply, Ok(()), None);
            }
            return;
        };
        // The records this batch changed hold changes no file has.
        self.cache.undo_batch(staged.stored.iter().map(|(id, _)| id.as_str()));
        // Refusing from now on, before anyone hears of this batch.
        let why = self.enter_outage(e);
        answers.into_iter().for_each(|a| a.send(Some(&why)));
        prunes.into_iter().for_each(|(now, reply)| Request::Prune(now, reply).fail(&why));
        syncs.into_iter().for_each(|reply| Request::Sync(reply).fail(&why));
        requests.for_each(|request| self.refuse_or_hold(request));
        staged.clear();
        self.spare = staged;
    }

    /// After a batch that stored records committed: the ended sagas' leave the cache.
    fn forget_ended(&mut self, staged: &Staged) {
        for (request_id, _) in &staged.stored {
            if self.cache.forget_if_ended(request_id) {
                self.ended_since_prune += 1;
            }
        }
    }

    /// After the batch's entry is durable: its ops wait for the next checkpoint, its records
    /// are found in the overlay meanwhile.
    fn publish(&mut self, staged: &mut Staged) {
        self.add_to_overlay(staged);
        self.forget_ended(staged);
        self.pending.append(&mut staged.ops);
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
    /// pruned. On failure nothing changed: the batches stay in the write-ahead file.
    fn checkpoint(&mut self, staged: &Staged, prunes: &[u64]) -> Result<Vec<Pruned>> {
        self.collect(true)?;
        if self.pending.is_empty() && staged.is_empty() && prunes.is_empty() {
            return Ok(Vec::new());
        }
        let (retention, chunk) = (&self.retention, self.prune_chunk);
        let db = &self.store()?.db;
        let pruned = commit_checkpoint(db, &[&self.pending, &staged.ops], self.wal.epoch() + 1, |tables| {
            prunes.iter().map(|&now| tables.prune(retention, now, chunk)).collect::<Result<Vec<_>>>()
        })?;
        let snapshot = snapshot_after_checkpoint(db);
        self.pending.clear();
        self.checkpointed();
        // The file now holds the overlay's records; the writer's lookups and readers go there
        // once the new snapshot is open. Until then, the overlay stays (and gets this batch's
        // records), so no lookup misses an answered write.
        match (snapshot, &mut self.store) {
            (Some(snapshot), Some(store)) => {
                store.snapshot = snapshot;
                self.overlay.clear();
            }
            _ => self.add_to_overlay(staged),
        }
        Ok(pruned)
    }

    /// One chunk of retention, in a checkpoint of its own.
    fn prune_once(&mut self) -> Result<Pruned> {
        self.cache.begin_batch();
        let mut staged = Staged::default();
        let done = self.flush(&mut staged, true).and_then(|stored| {
            let pruned = self.checkpoint(&staged, &[sagaflow::now_ms()])?;
            Ok((pruned, stored))
        });
        let (pruned, stored) = match done {
            Ok((pruned, stored)) => {
                let none = Pruned { removed: 0, expired: 0, more: false, ended_left: self.ended_held };
                (pruned.into_iter().next().unwrap_or(none), stored)
            }
            Err(e) => {
                // The flush marked records stored that no file holds.
                self.cache.undo_batch(staged.stored.iter().map(|(id, _)| id.as_str()));
                return Err(e);
            }
        };
        self.forget_ended(&staged);
        self.pruned(&pruned);
        self.shared.counters.stored.fetch_add(stored, Ordering::Relaxed);
        self.shared.counters.pruned.fetch_add(pruned.removed as u64, Ordering::Relaxed);
        if pruned.removed > 0 || pruned.expired > 0 {
            tracing::debug!(
                removed = pruned.removed,
                expired = pruned.expired,
                "saga log pruned ended sagas and tombstones"
            );
        }
        Ok(pruned)
    }

    /// After a checkpoint's commit here: new entries go to the next epoch.
    fn checkpointed(&mut self) {
        self.wal.restart(self.wal.epoch() + 1);
        self.last_checkpoint = Instant::now();
        self.shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
    }
}
