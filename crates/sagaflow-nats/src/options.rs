//! Connection options: where the server is and how streams and consumers are set up.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_nats::ServerAddr;

use crate::error::{Error, Result};

/// How to reach NATS and how the driver lays out streams and consumers.
///
/// Built from a server URL (`nats://user:password@host:4222`, or several separated by commas);
/// every other setting has a production default and a builder method. The URL may carry
/// credentials, so [`Debug`](fmt::Debug) shows it with the user information replaced by `***`.
#[derive(Clone)]
pub struct NatsOptions {
    url: String,
    pub(crate) connection_name: String,
    pub(crate) stream_prefix: String,
    pub(crate) subject_prefix: String,
    pub(crate) ack_wait: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) duplicate_window: Duration,
    pub(crate) max_age: Duration,
    pub(crate) pull_expires: Duration,
    pub(crate) group_max_ack_pending: usize,
    pub(crate) replicas: usize,
    pub(crate) reconnect_max_delay: Duration,
    pub(crate) purge_interval: Duration,
}

impl NatsOptions {
    /// Options for the server(s) at `url` with the defaults below; fails on a malformed URL.
    ///
    /// Defaults: stream prefix `SAGAFLOW`, subject prefix `sagaflow`, ack wait 30 s, publish
    /// timeout 10 s, request timeout 5 s, duplicate window 2 min, no age limit, pull expiry
    /// 10 s, group-wide ack-pending ceiling 1024, 1 replica, reconnect backoff capped at 2 s,
    /// consumed messages purged every 60 s.
    pub fn new(url: impl Into<String>) -> Result<Self> {
        let url = url.into();
        let mut count = 0;
        for server in url.split(',').map(str::trim) {
            ServerAddr::from_str(server).map_err(|e| Error::InvalidOptions(e.to_string()))?;
            count += 1;
        }
        if count == 0 || url.trim().is_empty() {
            return Err(Error::InvalidOptions("empty NATS server URL".into()));
        }
        Ok(Self {
            url,
            connection_name: "sagaflow".into(),
            stream_prefix: "SAGAFLOW".into(),
            subject_prefix: "sagaflow".into(),
            ack_wait: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
            pull_expires: Duration::from_secs(10),
            group_max_ack_pending: 1024,
            replicas: 1,
            reconnect_max_delay: Duration::from_secs(2),
            purge_interval: Duration::from_secs(60),
        })
    }

    /// The server URL(s), credentials included: for connecting, never for logging.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The URL with user information (user, password, token) replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        self.url.split(',').map(|server| redact(server.trim())).collect::<Vec<_>>().join(",")
    }

    /// The client name the server shows for this connection.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// The prefix of every stream name (`<prefix>_<topic>_<hash>`); letters, digits, `-` and `_`.
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(Error::InvalidOptions(format!(
                "stream prefix `{prefix}` must be non-empty letters, digits, `-` or `_`"
            )));
        }
        self.stream_prefix = prefix;
        Ok(self)
    }

    /// The subject namespace topics live in (`<prefix>.<topic>`); empty puts topics at the root.
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        if !prefix.is_empty() {
            crate::connection::validate_subject(&prefix).map_err(Error::InvalidOptions)?;
        }
        self.subject_prefix = prefix;
        Ok(self)
    }

    /// How long a delivery may stay unsettled before the server redelivers it; while a
    /// delivery is held, the driver extends it with progress acks, so this only bounds how
    /// long a crashed consumer's messages wait.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Result<Self> {
        self.ack_wait = positive("ack_wait", ack_wait)?;
        Ok(self)
    }

    /// How long a publish keeps retrying (through a reconnect) before it fails as unavailable.
    pub fn publish_timeout(mut self, timeout: Duration) -> Result<Self> {
        self.publish_timeout = positive("publish_timeout", timeout)?;
        Ok(self)
    }

    /// How long one request to the server (a JetStream API call, a confirmed ack) may take.
    pub fn request_timeout(mut self, timeout: Duration) -> Result<Self> {
        self.request_timeout = positive("request_timeout", timeout)?;
        Ok(self)
    }

    /// How long the server remembers message ids to drop re-published duplicates.
    pub fn duplicate_window(mut self, window: Duration) -> Result<Self> {
        self.duplicate_window = positive("duplicate_window", window)?;
        Ok(self)
    }

    /// Oldest message a stream keeps, consumed or not; zero (the default) keeps them all.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// How long one pull request waits on the server for messages before it is renewed.
    pub fn pull_expires(mut self, expires: Duration) -> Result<Self> {
        if expires < Duration::from_millis(100) {
            return Err(Error::InvalidOptions("pull_expires must be at least 100 ms".into()));
        }
        self.pull_expires = expires;
        Ok(self)
    }

    /// Most unacked messages a whole consumer group may hold across all its subscriptions
    /// (each subscription is held to its own `concurrency` by the driver as well).
    pub fn group_max_ack_pending(mut self, max: usize) -> Result<Self> {
        if max == 0 {
            return Err(Error::InvalidOptions("group_max_ack_pending must be above zero".into()));
        }
        self.group_max_ack_pending = max;
        Ok(self)
    }

    /// Stream replicas in a cluster (1 on a single server).
    pub fn replicas(mut self, replicas: usize) -> Result<Self> {
        if !(1..=5).contains(&replicas) {
            return Err(Error::InvalidOptions("replicas must be between 1 and 5".into()));
        }
        self.replicas = replicas;
        Ok(self)
    }

    /// The longest pause between two reconnection attempts.
    pub fn reconnect_max_delay(mut self, delay: Duration) -> Result<Self> {
        self.reconnect_max_delay = positive("reconnect_max_delay", delay)?;
        Ok(self)
    }

    /// How often a subscription that settled messages purges the messages every group of its
    /// topic has acked (streams keep messages until then); zero never purges.
    pub fn purge_interval(mut self, interval: Duration) -> Self {
        self.purge_interval = interval;
        self
    }
}

impl FromStr for NatsOptions {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        Self::new(url)
    }
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsOptions")
            .field("url", &self.redacted_url())
            .field("connection_name", &self.connection_name)
            .field("stream_prefix", &self.stream_prefix)
            .field("subject_prefix", &self.subject_prefix)
            .field("ack_wait", &self.ack_wait)
            .field("publish_timeout", &self.publish_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("duplicate_window", &self.duplicate_window)
            .field("max_age", &self.max_age)
            .field("pull_expires", &self.pull_expires)
            .field("group_max_ack_pending", &self.group_max_ack_pending)
            .field("replicas", &self.replicas)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("purge_interval", &self.purge_interval)
            .finish()
    }
}

fn positive(name: &str, value: Duration) -> Result<Duration> {
    if value.is_zero() {
        return Err(Error::InvalidOptions(format!("{name} must be above zero")));
    }
    Ok(value)
}

/// `scheme://user:pass@host:port/...` → `scheme://***@host:port/...`.
fn redact(server: &str) -> String {
    let (scheme, rest) = match server.find("://") {
        Some(i) => server.split_at(i + 3),
        None => ("", server),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => format!("{scheme}***{}{tail}", &authority[at..]),
        None => server.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_credentials() {
        let options = NatsOptions::new("nats://alice:s3cret@127.0.0.1:4222, tls://token@[::1]:4443").unwrap();
        let shown = format!("{options:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("alice") && !shown.contains("token"), "{shown}");
        assert!(shown.contains("nats://***@127.0.0.1:4222,tls://***@[::1]:4443"), "{shown}");
        assert_eq!(options.url(), "nats://alice:s3cret@127.0.0.1:4222, tls://token@[::1]:4443");
    }

    #[test]
    fn url_without_credentials_is_shown_as_is() {
        let options: NatsOptions = "nats://127.0.0.1:4222".parse().unwrap();
        assert_eq!(options.redacted_url(), "nats://127.0.0.1:4222");
        assert_eq!(NatsOptions::new("localhost").unwrap().redacted_url(), "localhost");
    }

    #[test]
    fn malformed_options_are_refused_without_echoing_the_url() {
        let err = NatsOptions::new("nats://bob:pw@host:notaport").unwrap_err();
        assert!(matches!(err, Error::InvalidOptions(_)), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
        assert!(NatsOptions::new("").is_err());
        let options = NatsOptions::new("nats://127.0.0.1").unwrap();
        assert!(options.clone().stream_prefix("a.b").is_err());
        assert!(options.clone().subject_prefix("a..b").is_err());
        assert!(options.clone().ack_wait(Duration::ZERO).is_err());
        assert!(options.clone().pull_expires(Duration::from_millis(10)).is_err());
        assert!(options.replicas(0).is_err());
    }
}
