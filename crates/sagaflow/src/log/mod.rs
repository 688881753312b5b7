//! The saga log abstraction: every state change of a saga goes through it.

mod memory;
mod replicas;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use memory::MemorySagaLog;
pub use replicas::{Lease, check_owner};

use crate::error::{ErrorSource, WithSource};
pub use crate::saga::{
    FlowVersion, NewSaga, Next, OnHop, SagaEvent, SagaState, Shape, Stage, StepState, StepStatus, TransitionError,
};
use crate::saga::{SagaRecord, SagaStatus};

/// A saga log backend's failure.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// No saga with this request id.
    #[error("no saga with request id `{0}`")]
    NotFound(String),
    /// The event does not fit the saga's state.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// The store could not be reached or failed to write.
    #[error("saga log unavailable: {}", WithSource(context, source))]
    Unavailable {
        /// What failed, where (never with a password).
        context: String,
        /// The store's own error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// A stored record could not be read back.
    #[error("saga log record corrupt: {}", WithSource(context, source))]
    Corrupt {
        /// Which record, and what is wrong with it.
        context: String,
        /// The decoder's or store's error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// The saga belongs to another replica now (it was taken over while this
    /// one's lease had expired): this replica must stop driving it.
    #[error("saga `{request_id}` is driven by replica `{owner}` now")]
    NotOwner {
        /// The saga.
        request_id: String,
        /// Its owner.
        owner: String,
    },
    /// This replica's lease expired and its sagas were taken over.
    #[error("replica `{0}` lost its lease; its sagas were taken over")]
    LeaseLost(String),
}

impl LogError {
    /// The store failed doing `context`, because of `source`.
    pub fn unavailable(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        LogError::Unavailable { context: context.into(), source: Some(ErrorSource::new(source)) }
    }

    /// The store is unavailable for a reason of the log's own, with no underlying error.
    pub fn unavailable_msg(context: impl Into<String>) -> Self {
        LogError::Unavailable { context: context.into(), source: None }
    }

    /// A stored record described by `context` could not be decoded, because of `source`.
    pub fn corrupt(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        LogError::Corrupt { context: context.into(), source: Some(ErrorSource::new(source)) }
    }

    /// A stored record is corrupt, as the log itself found, with no underlying error.
    pub fn corrupt_msg(context: impl Into<String>) -> Self {
        LogError::Corrupt { context: context.into(), source: None }
    }
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

/// Which sagas [`SagaLog::list`] returns, in the list order: newest first
/// (by creation), ties by request id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this facade.
    pub facade: Option<String>,
    /// Only this status.
    pub status: Option<SagaStatus>,
    /// At most this many (0: no limit).
    pub limit: usize,
    /// Only sagas created at or after this Unix ms.
    pub since_ms: Option<u64>,
    /// Only sagas created before this Unix ms.
    pub until_ms: Option<u64>,
    /// Only sagas after this position: the last saga of the previous page.
    /// A backend reads from there on (an index range, a keyset query), so a
    /// page costs the same wherever it is.
    pub after: Option<ListCursor>,
}

/// A position in the list order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    /// The creation time of the saga at the position.
    pub created_ms: u64,
    /// Its request id.
    pub request_id: String,
}

impl ListCursor {
    /// The position of `record`.
    pub fn of(record: &SagaRecord) -> Self {
        Self { created_ms: record.created_ms, request_id: record.request_id.clone() }
    }

    /// Whether a saga created at `created_ms` with `request_id` comes after this position.
    pub fn precedes(&self, created_ms: u64, request_id: &str) -> bool {
        created_ms < self.created_ms || (created_ms == self.created_ms && request_id > self.request_id.as_str())
    }
}

impl ListFilter {
    /// Whether `record` is one this filter asks for (the limit aside).
    pub fn matches(&self, record: &SagaRecord) -> bool {
        self.in_window(record.created_ms, &record.request_id)
            && self.facade.as_deref().is_none_or(|f| record.facade == f)
            && self.status.is_none_or(|s| record.status() == s)
    }

    /// Whether a saga created at `created_ms` falls in the time range and after the cursor.
    pub fn in_window(&self, created_ms: u64, request_id: &str) -> bool {
        self.since_ms.is_none_or(|since| created_ms >= since)
            && self.until_ms.is_none_or(|until| created_ms < until)
            && self.after.as_ref().is_none_or(|after| after.precedes(created_ms, request_id))
    }
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
    /// 200 000): 300 000 request ids remembered, 50 minutes of traffic at 100 sagas/s.
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_ended: 100_000,
            tombstone_age: Duration::from_secs(7 * 24 * 3600),
            max_tombstones: 200_000,
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

    /// Whether several orchestrator processes can share this log. The
    /// embedded and in-memory logs belong to one process; the methods below
    /// are then no-ops that make that process the owner of everything.
    fn shared(&self) -> bool {
        false
    }

    /// Registers `replica` as alive until `now_ms + ttl` under a new epoch.
    /// A restarted replica (same id) keeps the unfinished sagas it still owns.
    /// From then on this log instance writes as `replica`: appends to a saga
    /// another replica owns fail with [`LogError::NotOwner`].
    async fn register(&self, replica: &str, now_ms: u64, ttl: Duration) -> Result<Lease, LogError> {
        let _ = (replica, now_ms, ttl);
        Ok(Lease { epoch: 1, until_ms: u64::MAX })
    }

    /// Extends the lease of `replica` taken under `lease.epoch`;
    /// [`LogError::LeaseLost`] if its sagas were taken over since.
    async fn renew(&self, replica: &str, lease: Lease, now_ms: u64, ttl: Duration) -> Result<Lease, LogError> {
        let _ = (replica, now_ms, ttl);
        Ok(lease)
    }

    /// Replicas whose lease ran out before `now_ms` and whose sagas nobody
    /// has taken over yet.
    async fn expired(&self, now_ms: u64) -> Result<Vec<String>, LogError> {
        let _ = now_ms;
        Ok(Vec::new())
    }

    /// Takes over unfinished sagas of the expired replica `dead` for `by`:
    /// `Some` with the sagas now owned by `by`, `None` for a replica that
    /// renewed in the meantime or was taken over already. Each saga moves to
    /// exactly one claimer. A log may hand them over in several rounds (the
    /// sagas a writer holds at the moment stay with `dead` until the next
    /// claim), so several claimers may each get a share; the replica counts as
    /// taken over once none is left.
    async fn claim(&self, dead: &str, by: &str, now_ms: u64) -> Result<Option<Vec<SagaRecord>>, LogError> {
        let _ = (dead, by, now_ms);
        Ok(None)
    }

    /// The unfinished sagas `replica` drives: its own and the unowned ones.
    async fn unfinished_of(&self, replica: &str) -> Result<Vec<SagaRecord>, LogError> {
        let mut records = self.unfinished().await?;
        records.retain(|r| r.owner.as_deref().is_none_or(|o| o == replica));
        Ok(records)
    }

    /// The operators' switches kept in the log (a paused facade is
    /// `pause:<facade>`), so that every replica obeys them and they survive
    /// restarts. A log without storage of its own for them keeps them in memory.
    async fn controls(&self) -> Result<Vec<(String, String)>, LogError> {
        Ok(Vec::new())
    }

    /// Sets (`Some`) or clears (`None`) an operator's switch.
    async fn set_control(&self, key: &str, value: Option<&str>) -> Result<(), LogError> {
        let _ = (key, value);
        Err(LogError::unavailable_msg(format!("the {} saga log keeps no operator switches", self.name())))
    }

    /// Request ids of sagas that ended, written by any process sharing the
    /// log, as they end (best effort: a missed one is found by re-reading).
    /// `None` when the log has no such feed.
    fn ends(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }
}
