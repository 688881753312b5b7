//! What the handle and the writer thread share: the open database file, whether writes are
//! being refused, and the counts of what the writer and the readers did.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use redb::Database;
use sagaflow::log::{LogError, LogHealth};

/// The counts behind [`WriteStats`](super::WriteStats) and [`ListReads`](super::ListReads).
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) batches: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) pruned: AtomicU64,
    pub(super) stored: AtomicU64,
    pub(super) checkpoints: AtomicU64,
    pub(super) reopens: AtomicU64,
    /// Creation-index entries read by `list`.
    pub(super) listed_keys: AtomicU64,
    /// Records read by `list`.
    pub(super) listed_records: AtomicU64,
}

/// State the handle reads and the writer sets.
#[derive(Debug, Default)]
pub(super) struct Shared {
    pub(super) counters: Counters,
    /// The database file, for reads; `None` while the writer reopens it.
    db: RwLock<Option<Arc<Database>>>,
    /// Why writes are refused, while they are.
    outage: Mutex<Option<LogError>>,
}

impl Shared {
    pub(super) fn new(db: Arc<Database>) -> Self {
        Self { db: RwLock::new(Some(db)), ..Self::default() }
    }

    /// The database file, unless it is being reopened.
    pub(super) fn db(&self) -> Result<Arc<Database>, LogError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner).clone();
        db.ok_or_else(|| self.refusal())
    }

    pub(super) fn set_db(&self, db: Option<Arc<Database>>) {
        *self.db.write().unwrap_or_else(PoisonError::into_inner) = db;
    }

    /// Whether writes are accepted.
    pub(super) fn health(&self) -> LogHealth {
        match &*self.outage.lock().unwrap_or_else(PoisonError::into_inner) {
            None => LogHealth::Serving,
            // Without the error's own prefix: the health says it is not serving already.
            Some(LogError::Unavailable { context, source: Some(source) }) => {
                LogHealth::NotServing(format!("{context}: {source}"))
            }
            Some(LogError::Unavailable { context, source: None }) => LogHealth::NotServing(context.clone()),
            Some(why) => LogHealth::NotServing(why.to_string()),
        }
    }

    /// Notes why writes are refused from now on, or, with `None`, that they are accepted again.
    pub(super) fn set_outage(&self, why: Option<LogError>) {
        *self.outage.lock().unwrap_or_else(PoisonError::into_inner) = why;
    }

    /// Why writes are refused, as the health says it.
    pub(super) fn refusal_text(&self) -> String {
        match self.health() {
            LogHealth::NotServing(why) => why,
            _ => "the saga log is reopening its file".to_owned(),
        }
    }

    /// What a caller refused during an outage is told.
    pub(super) fn refusal(&self) -> LogError {
        match &*self.outage.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(why) => why.clone(),
            None => LogError::unavailable_msg("the saga log is reopening its file"),
        }
    }
}
