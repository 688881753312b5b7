//! The driver's error type.

use std::fmt;

use sagaflow::ErrorSource;
use sagaflow::broker::BrokerError;

/// What can go wrong talking to NATS JetStream.
///
/// Messages never contain the server URL, so credentials in it cannot leak into logs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The options are unusable (a malformed URL, a zero duration, an invalid name prefix).
    #[error("invalid NATS options: {0}")]
    InvalidOptions(String),
    /// The first connection to the server failed.
    #[error("cannot connect to NATS: {}", WithSource(context, source))]
    Connect {
        /// Where (without credentials).
        context: String,
        /// The client's error.
        #[source]
        source: Option<ErrorSource>,
    },
    /// The server is unreachable or did not answer in time.
    #[error("NATS unavailable: {}", WithSource(context, source))]
    Unavailable {
        /// What was being done.
        context: String,
        /// The client's error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// A JetStream API call (stream or consumer management) was refused.
    #[error("NATS JetStream refused a request: {}", WithSource(context, source))]
    JetStream {
        /// What was asked.
        context: String,
        /// The client's error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// A topic, group or header cannot be used with NATS.
    #[error("invalid request for NATS: {0}")]
    Invalid(String),
    /// The broker was closed.
    #[error("NATS broker closed")]
    Closed,
}

/// A context followed by its cause's message, so a log line holds the cause.
struct WithSource<'a>(&'a str, &'a Option<ErrorSource>);

impl fmt::Display for WithSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(source) => write!(f, "{}: {source}", self.0),
            None => f.write_str(self.0),
        }
    }
}

/// The driver's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for BrokerError {
    fn from(error: Error) -> Self {
        match error {
            Error::Connect { context, source } => {
                BrokerError::Unavailable { context: format!("cannot connect to NATS: {context}"), source }
            }
            Error::Unavailable { context, source } => {
                BrokerError::Unavailable { context: format!("NATS: {context}"), source }
            }
            Error::InvalidOptions(_) | Error::Invalid(_) => BrokerError::Invalid(error.to_string()),
            Error::Closed => BrokerError::Closed,
            Error::JetStream { context, source } => {
                BrokerError::Other { context: format!("NATS JetStream refused a request: {context}"), source }
            }
        }
    }
}
