//! The writer's records of the sagas it is working on.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use sagaflow::SagaRecord;

/// The records of the sagas the writer is working on: an append neither reads nor decodes the
/// stored record, and a saga changed several times in one batch (a step's start and its result)
/// is encoded and stored once, at the end of the batch. Holds running sagas, and ended ones
/// only until the batch that stores them commits. When a batch fails, the records it changed
/// are dropped, since they are then ahead of the file (which drops their queued appends still
/// waiting, as a crash would); the others stay, to be stored by the next batch.
///
/// A record changed only by queued appends (a step's start, an intermediate result) is not
/// stored by the batch that takes them but by the one that takes the saga's next awaited write,
/// or after `defer` at the latest: the sync flow's record is then stored at its start and its
/// end, not once more for every commit its steps spanned. Nobody waits for a queued append, and
/// a crash may lose it either way (the engine recovers from the recorded position); readers see
/// the saga's progress up to `defer` late.
#[derive(Debug)]
pub(crate) struct Cache {
    pub(super) records: HashMap<String, Cached>,
    /// Request ids to store at the next flush, in the order first marked.
    pub(super) urgent: Vec<String>,
    /// Request ids changed by queued appends only, with when they were first left unstored.
    pub(super) deferred: VecDeque<(Instant, String)>,
    pub(super) defer: Duration,
    /// The number of the batch being taken.
    generation: u64,
}

/// One saga's record in the [`Cache`].
#[derive(Debug)]
pub(super) struct Cached {
    pub(super) record: SagaRecord,
    /// Its key in every table but `IDS`.
    pub(super) seq: u64,
    /// Changed since it was last stored.
    pub(super) unstored: bool,
    /// In `Cache::urgent`.
    pub(super) urgent: bool,
    /// The number of the batch that last loaded or changed it.
    touched: u64,
}

impl Cache {
    /// More running sagas than this and the stored ones are dropped after a commit (recovery of
    /// a large backlog, say); records are read back from the file as needed.
    const MAX_RECORDS: usize = 100_000;

    pub(crate) fn new(defer: Duration) -> Self {
        Self { records: HashMap::new(), urgent: Vec::new(), deferred: VecDeque::new(), defer, generation: 0 }
    }

    /// Starts taking a batch: what it loads or changes is told from what earlier ones did.
    pub(super) fn begin_batch(&mut self) {
        self.generation += 1;
    }

    /// Takes a record as stored.
    pub(super) fn load(&mut self, record: SagaRecord, seq: u64) {
        let cached = Cached { record, seq, unstored: false, urgent: false, touched: self.generation };
        self.records.insert(cached.record.request_id.clone(), cached);
    }

    /// Takes a new record, to be stored by this batch.
    pub(super) fn changed(&mut self, record: SagaRecord, seq: u64) {
        let id = record.request_id.clone();
        self.load(record, seq);
        self.mark(&id, true);
    }

    /// Notes that a record changed: to be stored by this batch if `urgent`, else within `defer`.
    pub(super) fn mark(&mut self, request_id: &str, urgent: bool) {
        let Some(cached) = self.records.get_mut(request_id) else { return };
        cached.touched = self.generation;
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
    pub(super) fn next_due(&mut self) -> Option<Instant> {
        while let Some((_, id)) = self.deferred.front() {
            if self.records.get(id).is_some_and(|cached| cached.unstored) {
                break;
            }
            self.deferred.pop_front();
        }
        self.deferred.front().map(|(since, _)| *since + self.defer)
    }

    /// Drops the stored records when there are too many, keeping those with unstored changes.
    pub(super) fn trim(&mut self) {
        if self.records.len() > Self::MAX_RECORDS {
            self.records.retain(|_, cached| cached.unstored);
        }
    }

    /// After the batch that stored it committed: an ended saga's record leaves the cache.
    /// Returns whether it did.
    pub(super) fn forget_if_ended(&mut self, request_id: &str) -> bool {
        let ended =
            self.records.get(request_id).is_some_and(|cached| !cached.unstored && cached.record.state.is_ended());
        if ended {
            self.records.remove(request_id);
        }
        ended
    }

    /// After a batch failed: drops the records it loaded or changed (they may hold changes no
    /// file has), and marks every other record with changes not in a file as due at the next
    /// flush, those this batch meant to store (`stored`) among them.
    pub(super) fn undo_batch<'a>(&mut self, stored: impl IntoIterator<Item = &'a str>) {
        for id in stored {
            if let Some(cached) = self.records.get_mut(id) {
                cached.unstored = true;
            }
        }
        let generation = self.generation;
        self.records.retain(|_, cached| cached.touched != generation);
        let Self { records, urgent, deferred, .. } = self;
        urgent.clear();
        deferred.clear();
        for (id, cached) in records.iter_mut() {
            cached.urgent = cached.unstored;
            if cached.unstored {
                urgent.push(id.clone());
            }
        }
    }
}
