//! The driver's error type, and how lapin's errors become `BrokerError`s.

use std::time::Duration;

use lapin::ErrorKind;
use sagaflow::broker::BrokerError;

/// What can go wrong when setting up the RabbitMQ driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL does not parse (shown with its password redacted).
    #[error("invalid RabbitMQ URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL, password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The broker could not be reached within the connect timeout.
    #[error("RabbitMQ at {endpoint} unreachable for {waited:?}: {reason}")]
    Unavailable {
        /// `host:port`.
        endpoint: String,
        /// How long the driver kept trying.
        waited: Duration,
        /// The last failure.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for BrokerError {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidUrl { .. } => BrokerError::Invalid(error.to_string()),
            Error::Unavailable { .. } => BrokerError::Unavailable(error.to_string()),
        }
    }
}

/// Whether an error means the connection (not the request) is at fault, so a
/// new connection may succeed where this one failed.
pub(crate) fn is_connection_error(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::RuntimeShutdownError(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::ChannelsLimitReached
        | ErrorKind::ParsingError(_) => true,
        ErrorKind::ProtocolError(_) => error.is_amqp_hard_error(),
        _ => false,
    }
}

/// A lapin error as the trait's error, `what` saying what was being done.
pub(crate) fn broker_error(what: &str, error: &lapin::Error) -> BrokerError {
    if is_connection_error(error) {
        BrokerError::Unavailable(format!("{what}: {error}"))
    } else {
        BrokerError::Other(format!("{what}: {error}"))
    }
}
