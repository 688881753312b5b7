//! A [`SagaLog`](sagaflow::log::SagaLog) over PostgreSQL, for orchestrators running as several replicas.
//!
//! Every saga is one row of `sagaflow_sagas` holding its [`SagaRecord`](sagaflow::SagaRecord)
//! as `jsonb`; the schema is created by embedded migrations when the log
//! connects. Begins and appends are written by a group-commit writer, many
//! sagas' in one statement and one commit; each event is applied to the saga's
//! current record (a write made against a row another replica changed meanwhile
//! is made again on the row as it is), so replicas sharing the database apply
//! events one after the other and the state machine refuses the loser's duplicate. Ended sagas are pruned in the background per the
//! [`Retention`](sagaflow::log::Retention), each moved to a row of `sagaflow_tombstones` that
//! refuses its request id for the retention's `tombstone_age`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use sagaflow_postgres::{PostgresOptions, PostgresSagaLog};
//!
//! # async fn open() -> Result<(), sagaflow_postgres::Error> {
//! let options = PostgresOptions::from_env()?.pool_size(32); // SAGAFLOW_LOG_URL, else the local default
//! let log: Arc<dyn sagaflow::log::SagaLog> = Arc::new(PostgresSagaLog::connect(options).await?);
//! # Ok(())
//! # }
//! ```

mod ends;
mod error;
mod options;
mod prune;
mod replicas;
mod sql;
mod store;
mod tombstones;
mod writer;

pub use error::{Error, Result};
pub use options::PostgresOptions;
pub use store::PostgresSagaLog;
