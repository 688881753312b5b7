//! The driver's error type, and how lapin's errors become `BrokerError`s.

use std::fmt;
use std::time::Duration;

use lapin::ErrorKind;
use sagaflow::ErrorSource;
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
    #[error("RabbitMQ at {endpoint} unreachable for {waited:?}: {}", Described(reason, source.as_deref()))]
    Unavailable {
        /// `host:port`.
        endpoint: String,
        /// How long the driver kept trying.
        waited: Duration,
        /// The last failure.
        reason: String,
        /// lapin's error behind the last failure, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for BrokerError {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidUrl { .. } => BrokerError::Invalid(error.to_string()),
            Error::Unavailable { endpoint, waited, reason, source } => BrokerError::Unavailable {
                context: format!("RabbitMQ at {endpoint} unreachable for {waited:?}: {reason}"),
                source,
            },
        }
    }
}

/// Why a connection attempt failed or a connection was lost, and lapin's error behind it.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) reason: String,
    pub(crate) source: Option<lapin::Error>,
}

impl Failure {
    /// A failure the driver found itself.
    pub(crate) fn msg(reason: impl Into<String>) -> Self {
        Failure { reason: reason.into(), source: None }
    }

    /// `reason`, because of lapin's `error`.
    pub(crate) fn of(reason: impl Into<String>, error: lapin::Error) -> Self {
        Failure { reason: reason.into(), source: Some(error) }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Described(&self.reason, self.source.as_ref().map(|e| e as &(dyn std::error::Error + Send + Sync))).fmt(f)
    }
}

/// A reason followed by lapin's error, so a log line holds the cause.
struct Described<'a>(&'a str, Option<&'a (dyn std::error::Error + Send + Sync)>);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(source) => write!(f, "{}: {source}", self.0),
            None => f.write_str(self.0),
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
        BrokerError::unavailable(what, error.clone())
    } else {
        BrokerError::other(what, error.clone())
    }
}
