//! What can go wrong opening or pruning the log.

use sagaflow::log::LogError;

/// A failure of the PostgreSQL saga log outside the [`SagaLog`](sagaflow::log::SagaLog) calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The options are not usable (bad URL, bad schema name).
    #[error("{0}")]
    Options(String),
    /// The database could not be reached.
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        /// Where, without the password.
        target: String,
        /// Why.
        source: sqlx::Error,
    },
    /// The schema could not be created or migrated.
    #[error("cannot migrate the saga log at {target}: {source}")]
    Migrate {
        /// Where, without the password.
        target: String,
        /// Why.
        source: sqlx::migrate::MigrateError,
    },
    /// A statement failed.
    #[error("PostgreSQL at {target}: {what} failed: {source}")]
    Database {
        /// Where, without the password.
        target: String,
        /// Which statement.
        what: &'static str,
        /// Why.
        source: sqlx::Error,
    },
}

/// The result of this crate's calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for LogError {
    fn from(error: Error) -> Self {
        // The context is this error's message without its cause, which stays the source.
        match error {
            Error::Options(why) => LogError::unavailable_msg(why),
            Error::Connect { target, source } => {
                LogError::unavailable(format!("cannot connect to PostgreSQL at {target}"), source)
            }
            Error::Migrate { target, source } => {
                LogError::unavailable(format!("cannot migrate the saga log at {target}"), source)
            }
            Error::Database { target, what, source } => {
                LogError::unavailable(format!("PostgreSQL at {target}: {what} failed"), source)
            }
        }
    }
}
