//! The saga log abstraction: every state change of a saga goes through it.

mod memory;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use memory::MemorySagaLog;

use crate::saga::{NewSaga, SagaEvent, SagaRecord, SagaStatus, TransitionError};

/// A saga log backend's failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// No saga with this request id.
    #[error("no saga with request id `{0}`")]
    NotFound(String),
    /// The event does not fit the saga's state.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// The store could not be reached or failed to write.
    #[error("saga log unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be read back.
    #[error("saga log record corrupt: {0}")]
    Corrupt(String),
}

/// What [`SagaLog::begin`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// The saga is new and now recorded.
    Started(SagaRecord),
    /// A saga with this request id already exists; here it is.
    Exists(SagaRecord),
    /// A saga with this request id ended and its record was pruned; its tombstone says how it
    /// ended. No saga was started: the request id stays used until the tombstone ages out.
    Pruned(Tombstone),
}

/// What is left of an ended saga once retention has pruned its record: enough to refuse its
/// request id, for [`Retention::tombstone_age`] after the pruning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The pruned saga's request id.
    pub request_id: String,
    /// The facade it ran under.
    pub facade: String,
    /// How it ended: completed, compensated or stuck.
    pub status: SagaStatus,
    /// Unix ms of its end.
    pub ended_ms: u64,
    /// Unix ms of its record's pruning, from which the tombstone's age counts.
    pub pruned_ms: u64,
}

/// Which sagas [`SagaLog::list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this facade.
    pub facade: Option<String>,
    /// Only this status.
    pub status: Option<SagaStatus>,
    /// At most this many, newest first (0: no limit).
    pub limit: usize,
}

/// How long ended sagas are kept, and their tombstones after them.
///
/// A pruned saga leaves a [`Tombstone`] (its request id, facade, outcome and times, about a
/// hundred bytes), so that its request id is refused ([`Begin::Pruned`]) rather than started
/// again: a retried payment must not run twice because its first run's record was pruned.
/// The request id is thus known for `max_age` (or until `max_ended` pushes it out) with its
/// whole record, then for `tombstone_age` (or until `max_tombstones` pushes it out) by its
/// tombstone; after that it starts a new saga.
///
/// Build it from [`Retention::default`] to stay compatible with fields added later:
/// `Retention { max_ended: 1000, ..Retention::default() }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Ended sagas older than this are dropped.
    pub max_age: Duration,
    /// At most this many ended sagas are kept (oldest dropped first).
    pub max_ended: usize,
    /// Tombstones older than this (counted from the pruning of their record) are dropped.
    pub tombstone_age: Duration,
    /// At most this many tombstones are kept (oldest dropped first); 0 keeps none, so a pruned
    /// request id starts a new saga at once.
    pub max_tombstones: usize,
}

impl Retention {
    /// Whether pruning a record leaves a tombstone.
    pub fn keeps_tombstones(&self) -> bool {
        self.max_tombstones > 0
    }

    /// Unix ms before which a saga that ended is too old to keep, as of `now_ms`.
    pub fn ended_cutoff_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(u64::try_from(self.max_age.as_millis()).unwrap_or(u64::MAX))
    }

    /// Unix ms before which a record pruned is too old to keep its tombstone, as of `now_ms`.
    pub fn tombstone_cutoff_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(u64::try_from(self.tombstone_age.as_millis()).unwrap_or(u64::MAX))
    }
}

impl Default for Retention {
    /// Ended sagas for 7 days (at most 100 000), then their tombstones for 7 more (at most
    /// 1 000 000).
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_ended: 100_000,
            tombstone_age: Duration::from_secs(7 * 24 * 3600),
            max_tombstones: 1_000_000,
        }
    }
}

/// Whether a saga log can take writes right now.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogHealth {
    /// Writes are being accepted.
    Serving,
    /// Writes fail until the backend recovers; the text says why (disk full, database gone).
    NotServing(String),
}

impl LogHealth {
    /// Whether writes are being accepted.
    pub fn is_serving(&self) -> bool {
        matches!(self, LogHealth::Serving)
    }
}

/// Durable record of each saga's state.
///
/// `begin` and `append` return only once the change is stored as durably as
/// the backend can; the orchestrator acks, publishes and answers after them.
#[async_trait]
pub trait SagaLog: Send + Sync + 'static {
    /// Records a new saga, unless one with the same request id exists ([`Begin::Exists`]) or
    /// ended and was pruned, leaving a tombstone ([`Begin::Pruned`]): a request id starts at
    /// most one saga within the [`Retention`]'s window.
    async fn begin(&self, saga: NewSaga) -> Result<Begin, LogError>;

    /// Applies one event to a saga (refusing transitions its state forbids)
    /// and returns the record after it.
    async fn append(&self, request_id: &str, event: SagaEvent) -> Result<SagaRecord, LogError>;

    /// Queues an event whose durability may wait for the saga's next awaited
    /// write: the backend must store it no later than that write (or any
    /// later write of the same saga), and readers may see it late.
    /// The engine uses it for a step's start, which must be recorded before
    /// the step's result, not before the call, and for the record of a
    /// callback's delivery, which nothing waits on. The default awaits the
    /// append.
    async fn append_queued(&self, request_id: &str, event: SagaEvent) -> Result<(), LogError> {
        self.append(request_id, event).await.map(|_| ())
    }

    /// The saga with this request id; `None` also for a saga whose record was pruned, even
    /// while its tombstone makes [`begin`](Self::begin) answer [`Begin::Pruned`].
    async fn get(&self, request_id: &str) -> Result<Option<SagaRecord>, LogError>;

    /// Every saga that has not ended (running or compensating), for recovery.
    async fn unfinished(&self) -> Result<Vec<SagaRecord>, LogError>;

    /// Sagas matching the filter, newest first.
    async fn list(&self, filter: ListFilter) -> Result<Vec<SagaRecord>, LogError>;

    /// The backend's name, for logs.
    fn name(&self) -> &'static str;

    /// Whether the log can take writes now, for health checks and metrics. Backends that
    /// recover from a failed store on their own (reopening, reconnecting) report
    /// [`LogHealth::NotServing`] until they have.
    fn health(&self) -> LogHealth {
        LogHealth::Serving
    }
}
