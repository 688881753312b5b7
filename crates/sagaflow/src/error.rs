//! The core's error type.

use crate::broker::BrokerError;
use crate::log::{LogError, Tombstone};
use crate::orchestrator::MissingVersion;
use crate::saga::SagaStatus;

/// Everything that can go wrong when registering, starting or invoking a flow.
///
/// A saga that ends compensated or stuck is not an error: it is an
/// [`Outcome`](crate::Outcome). These are failures of the orchestrator itself
/// or of the caller's request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No flow is registered under this facade name.
    #[error("unknown facade `{0}`")]
    UnknownFacade(String),
    /// The flow under this facade carries another flow-data type.
    #[error("facade `{facade}` carries `{expected}`, not `{given}`")]
    DataType {
        /// The facade invoked.
        facade: String,
        /// The data type the flow was registered with.
        expected: &'static str,
        /// The data type the caller passed.
        given: &'static str,
    },
    /// The facade is registered for another mode than the one invoked.
    #[error("facade `{facade}` is a {registered} flow and cannot be invoked with `{called}`")]
    WrongMode {
        /// The facade invoked.
        facade: String,
        /// How the flow was registered.
        registered: crate::Mode,
        /// The method the caller used.
        called: &'static str,
    },
    /// The request id already belongs to a saga of another facade.
    #[error("request id `{request_id}` already belongs to a saga of facade `{facade}`")]
    RequestIdInUse {
        /// The request id given.
        request_id: String,
        /// The facade of the existing saga.
        facade: String,
    },
    /// The request id belongs to a saga that ended and whose record retention has since pruned:
    /// its outcome is known, its details (flow data, history) are not, and it is not run again.
    #[error(
        "request id `{request_id}` was already used by a saga of facade `{facade}` that ended {status}; \
         its record has since been pruned, so its details are gone, and it is not run again"
    )]
    Pruned {
        /// The request id given.
        request_id: String,
        /// The facade of the pruned saga.
        facade: String,
        /// How it ended.
        status: SagaStatus,
    },
    /// The request id is empty or too long to be a saga's identity.
    #[error("invalid request id: {0}")]
    InvalidRequestId(String),
    /// An operator paused the facade: new calls are refused until it is resumed.
    #[error("facade `{facade}` is paused (by {by}): new calls are refused until an operator resumes it")]
    Paused {
        /// The facade.
        facade: String,
        /// Who paused it.
        by: String,
    },
    /// The saga is not in a state the operation applies to.
    #[error("saga `{request_id}` is {status}: {operation} needs it {wanted}")]
    WrongState {
        /// The saga.
        request_id: String,
        /// Where it stands.
        status: crate::SagaStatus,
        /// What was asked.
        operation: &'static str,
        /// The state the operation needs.
        wanted: &'static str,
    },
    /// A flow or the orchestrator was configured wrongly.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A hop came before its saga could take it (another step of the saga runs
    /// here, or an earlier one is not recorded yet); the broker delivers it again.
    #[error("saga `{request_id}` cannot take the hop of step {step} yet: {why}")]
    HopNotReady {
        /// The saga.
        request_id: String,
        /// The step the hop is for.
        step: usize,
        /// What it waits for.
        why: String,
    },
    /// The caller stopped waiting before the saga ended; the saga goes on.
    #[error("saga `{0}` did not end within the wait timeout; it goes on in the background")]
    WaitTimeout(String),
    /// Flow data could not be turned into JSON or back.
    #[error("flow data of saga `{request_id}` is not valid: {source}")]
    Data {
        /// The saga's request id.
        request_id: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The flow data is larger than the flow's [`max_data_bytes`](crate::Flow::max_data_bytes);
    /// no saga was started.
    #[error("flow data of saga `{request_id}` is {size} bytes of JSON, over the limit of {limit} bytes")]
    DataTooLarge {
        /// The saga's request id.
        request_id: String,
        /// The data's size, in bytes of JSON.
        size: usize,
        /// The flow's limit.
        limit: usize,
    },
    /// The message broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The saga log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The log holds unfinished sagas of flow versions that are not registered:
    /// started, this orchestrator would leave them as they are. Register the
    /// versions (`Flow::keep`), or start anyway with
    /// [`Options::start_with_missing_versions`](crate::Options::start_with_missing_versions).
    #[error(
        "unfinished sagas need flow versions that are not registered: {}; keep those versions beside the current flow \
         (Flow::keep) or start with Options::start_with_missing_versions to leave them waiting",
        crate::orchestrator::describe_missing(missing)
    )]
    MissingVersions {
        /// Each missing version, with how many sagas need it.
        missing: Vec<MissingVersion>,
    },
    /// Too many sync sagas in hand: `running` run and `waiting` callers wait
    /// for a slot (`Options::max_running_sagas`, `Options::max_waiting_sagas`).
    /// Nothing was started; the caller may retry later, with the same request id.
    #[error("overloaded: {running} sagas are running and {waiting} callers wait for a slot; retry later")]
    Overloaded {
        /// The running sagas' bound.
        running: usize,
        /// The waiting callers' bound.
        waiting: usize,
    },
    /// The orchestrator is shutting down and takes no new sagas.
    #[error("the orchestrator is shutting down")]
    ShuttingDown,
    /// The task running the saga ended without an answer (a panic outside
    /// any node); the saga stays in the log and is resumed by the sweep.
    #[error("saga `{0}` lost its task; it is resumed from the log")]
    TaskLost(String),
}

impl From<Tombstone> for Error {
    fn from(tombstone: Tombstone) -> Self {
        Error::Pruned { request_id: tombstone.request_id, facade: tombstone.facade, status: tombstone.status }
    }
}

/// The underlying failure a driver error keeps as its [`source`](std::error::Error::source):
/// the database's, file system's or broker client's own error. Shared, so that one failure
/// can answer several waiters (a group commit) and be passed on without losing it.
///
/// It derefs to the error itself, so `source()` of the error that holds it gives the driver's
/// error (which `downcast_ref` finds), not this wrapper.
#[derive(Clone)]
pub struct ErrorSource(std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>);

impl ErrorSource {
    /// Keeps `error` as a cause.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        ErrorSource(std::sync::Arc::new(error))
    }
}

impl From<Box<dyn std::error::Error + Send + Sync + 'static>> for ErrorSource {
    fn from(error: Box<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        ErrorSource(error.into())
    }
}

impl std::ops::Deref for ErrorSource {
    type Target = dyn std::error::Error + Send + Sync + 'static;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl std::fmt::Debug for ErrorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for ErrorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

/// Shows a driver error's context followed by its source's message, so a log line holds the cause.
pub(crate) struct WithSource<'a>(pub(crate) &'a str, pub(crate) &'a Option<ErrorSource>);

impl std::fmt::Display for WithSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Some(source) => write!(f, "{}: {source}", self.0),
            None => f.write_str(self.0),
        }
    }
}

/// `Result` with the core's [`Error`] as its default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::io;

    use super::*;

    fn io_source(error: &dyn std::error::Error) -> &io::Error {
        error.source().expect("the cause is kept").downcast_ref::<io::Error>().expect("the cause is the io::Error")
    }

    #[test]
    fn a_wrapped_io_error_is_the_log_errors_source() {
        let error = LogError::unavailable("writing saga `a`", io::Error::new(io::ErrorKind::StorageFull, "disk full"));
        assert_eq!(io_source(&error).kind(), io::ErrorKind::StorageFull);
        assert_eq!(error.to_string(), "saga log unavailable: writing saga `a`: disk full");
        // Through the core's error as well: `Error::Log` is transparent.
        let error = Error::from(error);
        assert_eq!(io_source(&error).kind(), io::ErrorKind::StorageFull);

        let corrupt = LogError::corrupt("saga `b`", io::Error::other("bad json"));
        assert_eq!(io_source(&corrupt).to_string(), "bad json");
        let plain = LogError::unavailable_msg("closing");
        assert!(plain.source().is_none());
        assert_eq!(plain.to_string(), "saga log unavailable: closing");
    }

    #[test]
    fn a_wrapped_io_error_is_the_broker_errors_source() {
        let refused = || io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        for error in [
            BrokerError::unavailable("connecting to 127.0.0.1:1", refused()),
            BrokerError::not_confirmed("orders", "nacked", refused()),
            BrokerError::other("declaring a queue", refused()),
        ] {
            assert_eq!(io_source(&error).kind(), io::ErrorKind::ConnectionRefused, "{error}");
            assert!(error.to_string().ends_with(": refused"), "{error}");
            assert_eq!(io_source(&Error::from(error)).kind(), io::ErrorKind::ConnectionRefused);
        }
        assert!(BrokerError::unavailable_msg("gone").source().is_none());
        assert_eq!(
            BrokerError::not_confirmed_msg("orders", "nacked").to_string(),
            "publish to `orders` not confirmed: nacked"
        );
    }
}
