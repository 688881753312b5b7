//! The writer's records of the sagas it is working on.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use sagaflow::SagaRecord;

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
    pub(super) records: HashMap<String, Cached>,
    /// Request ids to store at the next flush, in the order first marked.
    pub(super) urgent: Vec<String>,
    /// Request ids changed by queued appends only, with when they were first left unstored.
    pub(super) deferred: VecDeque<(Instant, String)>,
    pub(super) defer: Duration,
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
}

impl Cache {
    /// More running sagas than this and the stored ones are dropped after a commit (recovery of
    /// a large backlog, say); records are read back from the file as needed.
    const MAX_RECORDS: usize = 100_000;

    pub(crate) fn new(defer: Duration) -> Self {
        Self { records: HashMap::new(), urgent: Vec::new(), deferred: VecDeque::new(), defer }
    }

    pub(super) fn load(&mut self, record: SagaRecord, seq: u64) {
        self.records.insert(record.request_id.clone(), Cached { record, seq, unstored: false, urgent: false });
    }

    pub(super) fn changed(&mut self, record: SagaRecord, seq: u64) {
        let id = record.request_id.clone();
        self.load(record, seq);
        self.mark(&id, true);
    }

    /// Notes that a record changed: to be stored by this batch if `urgent`, else within `defer`.
    pub(super) fn mark(&mut self, request_id: &str, urgent: bool) {
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

    pub(super) fn clear(&mut self) {
        self.records.clear();
        self.urgent.clear();
        self.deferred.clear();
    }
}
