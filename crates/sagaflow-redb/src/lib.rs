//! The embedded [`SagaLog`](sagaflow::log::SagaLog): one redb file on local disk, durable across
//! process and machine crashes, with group-committed writes.
//!
//! Every `begin` and `append` is queued to one writer thread, which takes everything waiting
//! as one batch and makes it durable with a single fsync, that of one entry appended to a
//! write-ahead file beside the database (`sagas.wal`); each caller's call returns once the batch
//! covering it is on disk. Many concurrent sagas thus share each fsync. The records a batch
//! stores are kept in memory, where lookups find them, until a checkpoint thread applies the
//! batches of the last 100 ms to redb in one durable commit; opening the log replays the
//! entries written since the last checkpoint (the source of `wal/mod.rs` has the details). A queued
//! append ([`SagaLog::append_queued`](sagaflow::log::SagaLog::append_queued)) is not waited for: the
//! saga's record is stored with its next awaited write, or within
//! [`RedbOptions::defer_queued`] (100 ms). Ended sagas are pruned in the background after their
//! [`Retention`](sagaflow::log::Retention), each leaving a tombstone that refuses its request id
//! for the retention's `tombstone_age`.
//!
//! ```
//! use sagaflow::log::Begin;
//! use sagaflow::{Mode, SagaStatus};
//! use sagaflow::log::{NewSaga, SagaEvent, SagaLog};
//! use sagaflow_redb::{RedbOptions, RedbSagaLog};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let log = RedbSagaLog::open(RedbOptions::new(dir.path()))?;
//! let saga = NewSaga {
//!     request_id: "req-1".into(),
//!     facade: "SyncBooking".into(),
//!     mode: Mode::Sync,
//!     steps: 1,
//!     data: serde_json::json!({}),
//!     deadline_ms: u64::MAX,
//!     callback_url: None,
//!     owner: None,
//!     version: None,
//! };
//! assert!(matches!(log.begin(saga).await?, Begin::Started(_)));
//! log.append("req-1", SagaEvent::StepStarted { index: 0 }).await?;
//! let done = log.append("req-1", SagaEvent::StepCompleted { index: 0, attempts: 1, data: serde_json::json!({}) }).await?;
//! assert_eq!(done.status(), SagaStatus::Completed);
//! # Ok(())
//! # }
//! ```

mod controls;
mod error;
#[cfg(test)]
mod faults;
mod migrate;
mod options;
mod prune;
mod store;
mod tombstones;
mod wal;

pub use error::{Error, Result};
pub use options::{DEFAULT_CACHE_SIZE, FILE_NAME, RedbOptions};
#[doc(hidden)]
pub use store::ListReads;
pub use store::{RedbSagaLog, WriteStats};
pub use wal::WAL_FILE_NAME;
