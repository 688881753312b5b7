//! Connection options: where the broker is and how patiently to talk to it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::AMQPUri;

use crate::error::{Error, Result};

/// The URL used when none is given: the local broker's default vhost as `guest`.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The consumer group whose queue is named by the topic alone (sagaflow's default group).
pub const DEFAULT_GROUP: &str = "sagaflow";

/// The durable direct exchange every topic is published through.
pub const DEFAULT_EXCHANGE: &str = "sagaflow";

/// How to reach RabbitMQ and how long to wait for it.
///
/// Built from an `amqp://user:password@host:port/vhost` URL; the password is
/// never printed (`Debug` shows `***` in its place).
#[derive(Clone)]
pub struct RabbitMqOptions {
    pub(crate) uri: AMQPUri,
    pub(crate) connection_name: String,
    pub(crate) exchange: String,
    pub(crate) default_group: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) queue_expiry: Option<Duration>,
}

impl RabbitMqOptions {
    /// Options for the broker at `url` (`amqp://` or `amqps://`), with default timeouts.
    pub fn from_url(url: &str) -> Result<Self> {
        let uri = AMQPUri::from_str(url).map_err(|reason| {
            // The parser may quote the input; never let the password through.
            let redacted = redact_url(url);
            Error::InvalidUrl { reason: reason.replace(url, &redacted), url: redacted }
        })?;
        Ok(Self {
            uri,
            connection_name: "sagaflow".into(),
            exchange: DEFAULT_EXCHANGE.into(),
            default_group: DEFAULT_GROUP.into(),
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            close_timeout: Duration::from_secs(5),
            queue_expiry: None,
        })
    }

    /// The name shown for the connection in RabbitMQ's management UI (default `sagaflow`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// The durable direct exchange topics are routed through (default [`DEFAULT_EXCHANGE`]).
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// The consumer group whose queue is named by the topic alone and which keeps
    /// messages published before any group subscribed (default [`DEFAULT_GROUP`]).
    pub fn default_group(mut self, group: impl Into<String>) -> Self {
        self.default_group = group.into();
        self
    }

    /// How long [`RabbitMqBroker::connect`](crate::RabbitMqBroker::connect) and a
    /// subscription keep trying to reach the broker (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a publish waits for the connection and the broker's confirm
    /// before it fails with `BrokerError::Unavailable` (default 10 s).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The first and the longest pause between reconnection attempts (default 100 ms and 5 s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max.max(min);
        self
    }

    /// How long `close` lets unsettled deliveries be settled before the
    /// connection is closed under them (default 5 s).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Lets RabbitMQ delete a queue this driver declares once it has had no
    /// consumer for this long (`x-expires`), *with the messages in it*. Off by
    /// default; meant for tests and short-lived topics (e.g. per-pod ones).
    /// Queues already declared without it must be deleted before it applies.
    pub fn queue_expiry(mut self, expiry: Option<Duration>) -> Self {
        self.queue_expiry = expiry;
        self
    }

    /// The URL with its password replaced by `***`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        let info = &self.uri.authority.userinfo;
        let password = if info.password.is_empty() { "" } else { ":***" };
        let vhost = if self.uri.vhost == "/" { "%2f" } else { self.uri.vhost.as_str() };
        format!(
            "{}://{}{}@{}:{}/{}",
            self.uri.scheme, info.username, password, self.uri.authority.host, self.uri.authority.port, vhost
        )
    }

    /// `host:port`, for messages that should not carry credentials at all.
    pub(crate) fn endpoint(&self) -> String {
        format!("{}:{}", self.uri.authority.host, self.uri.authority.port)
    }
}

impl FromStr for RabbitMqOptions {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        Self::from_url(url)
    }
}

impl Default for RabbitMqOptions {
    fn default() -> Self {
        // DEFAULT_URL is a constant that parses; a test below keeps it so.
        Self::from_url(DEFAULT_URL).unwrap_or_else(|e| unreachable!("DEFAULT_URL is valid: {e}"))
    }
}

impl fmt::Debug for RabbitMqOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqOptions")
            .field("url", &self.redacted_url())
            .field("connection_name", &self.connection_name)
            .field("exchange", &self.exchange)
            .field("default_group", &self.default_group)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("close_timeout", &self.close_timeout)
            .field("queue_expiry", &self.queue_expiry)
            .finish()
    }
}

/// Replaces the password in a URL string that may not even parse.
fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // No authority to find the password in: show nothing that could be one.
        return if url.contains('@') { "<redacted>".into() } else { url.into() };
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else { return url.into() };
    let userinfo = &authority[..at];
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    let password = if userinfo.contains(':') { ":***" } else { "" };
    format!("{}{user}{password}{}", &url[..scheme_end + 3], &url[scheme_end + 3 + at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_url_parses() {
        let options = RabbitMqOptions::default();
        assert_eq!(options.endpoint(), "127.0.0.1:5672");
        assert_eq!(options.uri.vhost, "/");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let options = RabbitMqOptions::from_url("amqp://app:s3cr3t@rabbit.internal:5673/prod").unwrap();
        let shown = format!("{options:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("amqp://app:***@rabbit.internal:5673/prod"), "{shown}");
        assert_eq!(options.redacted_url(), "amqp://app:***@rabbit.internal:5673/prod");
    }

    #[test]
    fn invalid_url_error_never_shows_the_password() {
        for url in ["amqp://app:s3cr3t@host:notaport/", "ftp://app:s3cr3t@host/", "app:s3cr3t@host"] {
            let error = RabbitMqOptions::from_url(url).unwrap_err().to_string();
            assert!(!error.contains("s3cr3t"), "{error}");
            assert!(error.contains("invalid RabbitMQ URL"), "{error}");
        }
    }

    #[test]
    fn redaction_keeps_the_rest() {
        assert_eq!(redact_url("amqp://u:p@h:1/v?heartbeat=5"), "amqp://u:***@h:1/v?heartbeat=5");
        assert_eq!(redact_url("amqp://u@h/v"), "amqp://u@h/v");
        assert_eq!(redact_url("amqp://h/v"), "amqp://h/v");
        assert_eq!(redact_url("amqp://u:p@ss@h/v"), "amqp://u:***@h/v");
    }

    #[test]
    fn builders_set_values() {
        let options = RabbitMqOptions::default()
            .publish_timeout(Duration::from_secs(1))
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(10))
            .default_group("orders");
        assert_eq!(options.publish_timeout, Duration::from_secs(1));
        assert_eq!(options.reconnect_max, Duration::from_millis(50), "max is never below min");
        assert_eq!(options.default_group, "orders");
    }
}
