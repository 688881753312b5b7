//! The driver's error type.

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
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// The server is unreachable or did not answer in time.
    #[error("NATS unavailable: {0}")]
    Unavailable(String),
    /// A JetStream API call (stream or consumer management) was refused.
    #[error("NATS JetStream refused a request: {0}")]
    JetStream(String),
    /// A topic, group or header cannot be used with NATS.
    #[error("invalid request for NATS: {0}")]
    Invalid(String),
    /// The broker was closed.
    #[error("NATS broker closed")]
    Closed,
}

/// The driver's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for BrokerError {
    fn from(error: Error) -> Self {
        match error {
            Error::Connect(_) | Error::Unavailable(_) => BrokerError::Unavailable(error.to_string()),
            Error::InvalidOptions(_) | Error::Invalid(_) => BrokerError::Invalid(error.to_string()),
            Error::Closed => BrokerError::Closed,
            Error::JetStream(_) => BrokerError::Other(error.to_string()),
        }
    }
}
