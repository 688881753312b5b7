//! What can go wrong opening or using the embedded saga log.

use std::path::PathBuf;

use sagaflow::ErrorSource;
use sagaflow::log::LogError;

/// The embedded saga log's failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The data directory could not be created.
    #[error("cannot create saga log directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is already open, by this process or another one; redb allows one writer.
    #[error("saga log {path} is already open (by this or another process)")]
    AlreadyOpen {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be opened (not a redb file, unreadable, newer format).
    #[error("cannot open saga log {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// The write-ahead file could not be opened, read or written.
    #[error("saga log write-ahead file {path}: {source}")]
    Wal {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The write-ahead file holds entries after damage: the sagas they record were answered, and
    /// opening without them would lose them silently. Nothing was changed; opening with
    /// [`RedbOptions::salvage_wal`](crate::RedbOptions::salvage_wal) replays every intact entry.
    #[error(
        "saga log write-ahead file {path} is damaged at byte {offset}: {detail}. Nothing was changed; keep a copy of the file, then open the log with write-ahead salvage on (RedbOptions::salvage_wal) to replay every intact entry"
    )]
    WalDamaged {
        /// The file.
        path: PathBuf,
        /// Where the damage starts, in bytes from the start of the file.
        offset: u64,
        /// What was found there.
        detail: String,
    },
    /// The writer thread could not be started.
    #[error("cannot start the saga log writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A read or write failed in the store.
    #[error("saga log storage failed: {0}")]
    Storage(#[from] redb::Error),
    /// A stored record could not be decoded, or a record could not be encoded.
    #[error("saga log record corrupt: {0}")]
    Corrupt(String),
    /// A write failed and the file is closed until it can be opened again; the text says why.
    #[error("{0}")]
    Outage(String),
    /// The writer thread has stopped; the log is closed.
    #[error("saga log writer has stopped")]
    Closed,
    /// The checkpoint thread stopped in the middle of a checkpoint: no later checkpoint may
    /// retire that epoch's write-ahead entries, so writes that need one are refused until a
    /// restart replays them.
    #[error(
        "saga log checkpoint thread stopped during the checkpoint of write-ahead epoch {epoch}; restart to replay the write-ahead file"
    )]
    CheckpointStopped {
        /// The write-ahead epoch of that checkpoint.
        epoch: u64,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

macro_rules! from_redb {
    ($($ty:ty),*) => {$(
        impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Error::Storage(e.into())
            }
        }
    )*};
}

from_redb!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl Error {
    /// The message without the cause, and the cause (the file system's or redb's error).
    fn split(self) -> (String, Option<ErrorSource>) {
        match self {
            Error::CreateDir { path, source } => {
                (format!("cannot create saga log directory {}", path.display()), Some(ErrorSource::new(source)))
            }
            Error::Open { path, source } => {
                (format!("cannot open saga log {}", path.display()), Some(ErrorSource::new(source)))
            }
            Error::Wal { path, source } => {
                (format!("saga log write-ahead file {}", path.display()), Some(ErrorSource::new(source)))
            }
            Error::Spawn(source) => {
                ("cannot start the saga log writer thread".to_owned(), Some(ErrorSource::new(source)))
            }
            Error::Storage(source) => ("saga log storage failed".to_owned(), Some(ErrorSource::new(source))),
            other => (other.to_string(), None),
        }
    }

    /// A failed write as the saga log's error that refuses writes until the file is open again.
    pub(crate) fn into_outage(self) -> LogError {
        let (context, source) = self.split();
        LogError::Unavailable { context: format!("saga log cannot write: {context}"), source }
    }
}

impl From<Error> for LogError {
    fn from(e: Error) -> Self {
        match e {
            Error::Corrupt(what) => LogError::corrupt_msg(what),
            Error::Outage(why) => LogError::unavailable_msg(why),
            other => {
                let (context, source) = other.split();
                LogError::Unavailable { context, source }
            }
        }
    }
}
