//! A [`SagaLog`](sagaflow::SagaLog) over PostgreSQL, for orchestrators running as several replicas.
//!
//! Every saga is one row of `sagaflow_sagas` holding its [`SagaRecord`](sagaflow::SagaRecord)
//! as `jsonb`; the schema is created by embedded migrations when the log
//! connects. Appends to one saga lock its row, so replicas sharing the
//! database apply events one after the other and the state machine refuses
//! the loser's duplicate. Ended sagas are pruned in the background per the
//! [`Retention`](sagaflow::log::Retention), each moved to a row of `sagaflow_tombstones` that
//! refuses its request id for the retention's `tombstone_age`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use sagaflow_postgres::{PostgresOptions, PostgresSagaLog};
//!
//! # async fn open() -> Result<(), sagaflow_postgres::Error> {
//! let options = PostgresOptions::from_env()?.pool_size(32); // SAGAFLOW_LOG_URL, else the local default
//! let log: Arc<dyn sagaflow::SagaLog> = Arc::new(PostgresSagaLog::connect(options).await?);
//! # Ok(())
//! # }
//! ```

mod ends;
mod error;
mod options;
mod prune;
mod replicas;
mod store;
mod tombstones;

pub use error::{Error, Result};
pub use options::PostgresOptions;
pub use store::PostgresSagaLog;
