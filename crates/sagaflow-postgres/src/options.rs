//! Where the saga log lives and how it is kept.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sagaflow::log::Retention;
use sqlx::postgres::PgConnectOptions;

use crate::error::{Error, Result};

/// How to reach the database and how to keep the log: from a URL, then builder methods.
///
/// `Debug` and every error show the URL's target without its password.
#[derive(Clone)]
pub struct PostgresOptions {
    pub(crate) connect: PgConnectOptions,
    pub(crate) schema: Option<String>,
    pub(crate) pool_size: u32,
    pub(crate) acquire_timeout: Duration,
    pub(crate) retention: Retention,
    pub(crate) prune_interval: Option<Duration>,
    pub(crate) writers: usize,
    pub(crate) defer_queued: Duration,
}

impl PostgresOptions {
    /// The URL used when none is configured.
    pub const DEFAULT_URL: &'static str = "postgres://postgres@127.0.0.1:5432/test";
    /// The environment variable the service reads the URL from.
    pub const URL_ENV: &'static str = "SAGAFLOW_LOG_URL";
    /// Connections in the pool unless set.
    pub const DEFAULT_POOL_SIZE: u32 = 16;
    /// How long a call waits for a connection unless set.
    pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
    /// How long queued appends may wait for their saga's next awaited write unless set.
    pub const DEFAULT_DEFER_QUEUED: Duration = Duration::from_millis(100);
    /// Group-commit writers unless set.
    pub const DEFAULT_WRITERS: usize = 1;
    /// How often ended sagas are pruned unless set.
    pub const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

    /// Options for the database at `url` (`postgres://user[:password]@host[:port]/db`).
    pub fn from_url(url: &str) -> Result<Self> {
        // sqlx's parse errors name the part that is wrong, never the URL itself.
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Options(format!("invalid PostgreSQL URL: {e}")))?
            .application_name("sagaflow");
        Ok(Self {
            connect,
            schema: None,
            pool_size: Self::DEFAULT_POOL_SIZE,
            acquire_timeout: Self::DEFAULT_ACQUIRE_TIMEOUT,
            retention: Retention::default(),
            prune_interval: Some(Self::DEFAULT_PRUNE_INTERVAL),
            writers: Self::DEFAULT_WRITERS,
            defer_queued: Self::DEFAULT_DEFER_QUEUED,
        })
    }

    /// Options from [`URL_ENV`](Self::URL_ENV), else [`DEFAULT_URL`](Self::DEFAULT_URL).
    pub fn from_env() -> Result<Self> {
        match std::env::var(Self::URL_ENV) {
            Ok(url) if !url.trim().is_empty() => Self::from_url(url.trim()),
            _ => Self::from_url(Self::DEFAULT_URL),
        }
    }

    /// Keeps the table in this schema (created if missing) instead of the user's default.
    ///
    /// The name must be a plain lower-case identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// How many group-commit writers share the sagas (default 1), each with a connection of
    /// its own beside the pool; a saga is always written by the same one.
    pub fn writers(mut self, writers: usize) -> Self {
        self.writers = writers.max(1);
        self
    }

    /// How long a saga's queued appends may wait to be written when no awaited write of the
    /// saga comes (default 100 ms; zero writes them with the batch that takes them, at most 10
    /// s). The saga's next awaited write takes them along in its row, so a saga whose steps'
    /// starts and intermediate results are queued is written twice (begin, end) rather than at
    /// each step; until then readers see its progress this much late, and a crash loses those
    /// appends, as it may any queued append.
    pub fn defer_queued(mut self, delay: Duration) -> Self {
        self.defer_queued = delay.min(Duration::from_secs(10));
        self
    }

    /// Most connections the pool opens for reads and pruning (default 16); the writers keep
    /// theirs beside it.
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// How long a call waits for a free connection before failing as unavailable (default 5 s).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long ended sagas are kept (default 7 days, at most 100 000).
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// The name the log's connections show in `pg_stat_activity` (default `sagaflow`), to tell
    /// replicas apart there.
    pub fn application_name(mut self, name: &str) -> Self {
        self.connect = self.connect.application_name(name);
        self
    }

    /// How often the background task prunes ended sagas; `None` runs none (default 60 s).
    pub fn prune_interval(mut self, interval: Option<Duration>) -> Self {
        self.prune_interval = interval;
        self
    }

    /// The schema set with [`schema`](Self::schema).
    pub fn get_schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The pool size.
    pub fn get_pool_size(&self) -> u32 {
        self.pool_size
    }

    /// The retention of ended sagas.
    pub fn get_retention(&self) -> Retention {
        self.retention
    }

    /// Where the log lives, for messages: `user@host:port/db[ schema]`, never the password.
    pub fn target(&self) -> String {
        let c = &self.connect;
        let mut out = format!("{}@{}:{}", c.get_username(), c.get_host(), c.get_port());
        if let Some(db) = c.get_database() {
            out.push('/');
            out.push_str(db);
        }
        if let Some(schema) = &self.schema {
            out.push_str(" schema ");
            out.push_str(schema);
        }
        out
    }

    /// The schema name, checked so that it can be spliced into SQL unquoted.
    pub(crate) fn checked_schema(&self) -> Result<Option<&str>> {
        let Some(name) = self.schema.as_deref() else { return Ok(None) };
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if first_ok && rest_ok && name.len() <= 63 {
            Ok(Some(name))
        } else {
            Err(Error::Options(format!(
                "invalid schema name `{name}`: use lower-case letters, digits and `_`, at most 63, not starting with a digit"
            )))
        }
    }
}

impl FromStr for PostgresOptions {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        Self::from_url(url)
    }
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not derived: PgConnectOptions' Debug prints the password.
        f.debug_struct("PostgresOptions")
            .field("target", &self.target())
            .field("pool_size", &self.pool_size)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("retention", &self.retention)
            .field("prune_interval", &self.prune_interval)
            .field("writers", &self.writers)
            .field("defer_queued", &self.defer_queued)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_target_hide_the_password() {
        let options = PostgresOptions::from_url("postgres://alice:s3cret@db.local:6543/app").unwrap().schema("s1");
        let debug = format!("{options:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("alice@db.local:6543/app schema s1"), "{debug}");
        assert!(!options.target().contains("s3cret"));
    }

    #[test]
    fn defaults() {
        let options = PostgresOptions::from_url(PostgresOptions::DEFAULT_URL).unwrap();
        assert_eq!(options.get_pool_size(), 16);
        assert_eq!(options.get_retention(), Retention::default());
        assert_eq!(options.prune_interval, Some(Duration::from_secs(60)));
        assert_eq!(options.target(), "postgres@127.0.0.1:5432/test");
    }

    #[test]
    fn bad_urls_and_schemas_are_refused_without_echoing_secrets() {
        let err = PostgresOptions::from_url("postgres://bob:hunter2@host:notaport/db").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let options = PostgresOptions::from_url(PostgresOptions::DEFAULT_URL).unwrap();
        for bad in ["", "1abc", "Abc", "a-b", "a;drop", &"a".repeat(64)] {
            assert!(options.clone().schema(bad).checked_schema().is_err(), "{bad}");
        }
        assert_eq!(options.clone().schema("sagaflow_t_1").checked_schema().unwrap(), Some("sagaflow_t_1"));
        assert_eq!(options.checked_schema().unwrap(), None);
    }
}
