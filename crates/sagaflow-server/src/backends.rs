//! The broker and the saga log a service runs on, chosen by kind or by URL scheme
//! (`memory:`, `amqp://`, `nats://`; `memory:`, `redb:PATH`, `postgres://`), and the saga
//! log's health followed on the gRPC health service.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sagaflow::broker::Broker;
use sagaflow::log::{LogHealth, Retention, SagaLog};
use sagaflow::{MemoryBroker, MemorySagaLog};
use sagaflow_nats::{NatsBroker, NatsOptions};
use sagaflow_postgres::{PostgresOptions, PostgresSagaLog};
use sagaflow_rabbitmq::{RabbitMqBroker, RabbitMqOptions};
use sagaflow_redb::{RedbOptions, RedbSagaLog};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The broker drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// In the process; nothing survives a restart.
    Memory,
    /// RabbitMQ (durable quorum queues, publisher confirms).
    Rabbitmq,
    /// NATS JetStream (file-backed streams, durable consumers).
    Nats,
}

/// The saga log backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogKind {
    /// In the process, bounded by the retention; nothing survives a restart.
    Memory,
    /// One redb file under a data directory; survives process and machine crashes.
    Embedded,
    /// PostgreSQL, for several replicas sharing one log.
    Postgres,
}

/// The scheme of `url` in lower case, if it has one (`nats` of `nats://host`).
fn scheme(url: &str) -> Option<String> {
    let (scheme, _) = url.split_once(':')?;
    let valid = !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then(|| scheme.to_ascii_lowercase())
}

impl BrokerKind {
    /// The broker a URL names by its scheme: `memory:`, `amqp://`/`amqps://`, `nats://`/`tls://`.
    pub fn of_url(url: &str) -> Option<Self> {
        match scheme(url)?.as_str() {
            "memory" => Some(Self::Memory),
            "amqp" | "amqps" => Some(Self::Rabbitmq),
            "nats" | "tls" => Some(Self::Nats),
            _ => None,
        }
    }

    /// The kind to run: `configured`, unless it is the in-memory default and `url` names
    /// another; an error when both are given and disagree.
    pub fn resolve(configured: Self, url: Option<&str>) -> anyhow::Result<Self> {
        match (configured, url.and_then(Self::of_url)) {
            (kind, None) => Ok(kind),
            (Self::Memory, Some(by_url)) => Ok(by_url),
            (kind, Some(by_url)) if kind == by_url => Ok(kind),
            (kind, Some(by_url)) => bail!("broker is {kind:?} but broker_url names a {by_url:?} broker"),
        }
    }
}

impl LogKind {
    /// The saga log a URL names by its scheme: `memory:`, `redb:PATH`, `postgres://`/`postgresql://`.
    pub fn of_url(url: &str) -> Option<Self> {
        match scheme(url)?.as_str() {
            "memory" => Some(Self::Memory),
            "redb" => Some(Self::Embedded),
            "postgres" | "postgresql" => Some(Self::Postgres),
            _ => None,
        }
    }

    /// The kind to run: `configured`, unless it is a default (embedded or memory) and `url`
    /// names another; an error when `url` names a log that `configured` cannot be.
    pub fn resolve(configured: Self, url: Option<&str>) -> anyhow::Result<Self> {
        match (configured, url.and_then(Self::of_url)) {
            (kind, None) => Ok(kind),
            (kind, Some(by_url)) if kind == by_url => Ok(kind),
            (Self::Embedded | Self::Memory, Some(by_url)) => Ok(by_url),
            (kind, Some(by_url)) => bail!("saga_log is {kind:?} but saga_log_url names a {by_url:?} log"),
        }
    }
}

/// Where and how to reach the broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings<'a> {
    /// Which driver (see [`BrokerKind::resolve`]).
    pub kind: BrokerKind,
    /// Its URL, credentials included (never logged); each driver has a local default.
    pub url: Option<&'a str>,
    /// The connection's name on the server.
    pub connection_name: String,
    /// RabbitMQ only: queues idle this long are deleted with their messages.
    pub queue_expiry: Option<Duration>,
}

/// Connects to the broker; URLs are never logged (they may hold credentials).
pub async fn connect_broker(settings: BrokerSettings<'_>) -> anyhow::Result<Arc<dyn Broker>> {
    let url = settings.url.filter(|u| BrokerKind::of_url(u) != Some(BrokerKind::Memory));
    Ok(match BrokerKind::resolve(settings.kind, settings.url)? {
        BrokerKind::Memory => Arc::new(MemoryBroker::new()),
        BrokerKind::Rabbitmq => {
            let options = RabbitMqOptions::from_url(url.unwrap_or("amqp://guest:guest@127.0.0.1:5672/%2f"))?
                .connection_name(settings.connection_name)
                .queue_expiry(settings.queue_expiry);
            tracing::info!(url = %options.redacted_url(), "connecting to RabbitMQ");
            Arc::new(RabbitMqBroker::connect(options).await.context("connecting to RabbitMQ")?)
        }
        BrokerKind::Nats => {
            let options =
                NatsOptions::new(url.unwrap_or("nats://127.0.0.1:4222"))?.connection_name(settings.connection_name);
            tracing::info!(url = %options.redacted_url(), "connecting to NATS");
            Arc::new(NatsBroker::connect(options).await.context("connecting to NATS JetStream")?)
        }
    })
}

/// Where and how to keep the saga log.
#[derive(Debug, Clone)]
pub struct LogSettings<'a> {
    /// Which backend (see [`LogKind::resolve`]).
    pub kind: LogKind,
    /// The embedded log's directory (or `redb:DIR`), default `./data`; PostgreSQL's URL.
    pub url: Option<&'a str>,
    /// PostgreSQL schema of the saga tables (default: the connection's search path).
    pub schema: Option<&'a str>,
    /// How long ended sagas and their tombstones are kept.
    pub retention: Retention,
    /// The embedded log replays the intact entries of a damaged write-ahead file instead of
    /// refusing to open.
    pub salvage_wal: bool,
    /// The embedded log's cache of database pages, in bytes.
    pub cache_bytes: usize,
}

/// The embedded log's options for `dir` under these settings.
pub fn embedded_options(settings: &LogSettings<'_>, dir: &str) -> RedbOptions {
    RedbOptions::new(dir)
        .retention(settings.retention)
        .cache_size(settings.cache_bytes)
        .salvage_wal(settings.salvage_wal)
}

/// Opens (or connects to) the saga log.
pub async fn open_saga_log(settings: LogSettings<'_>) -> anyhow::Result<Arc<dyn SagaLog>> {
    Ok(match LogKind::resolve(settings.kind, settings.url)? {
        LogKind::Memory => Arc::new(MemorySagaLog::with_retention(settings.retention)),
        LogKind::Embedded => {
            let dir = match settings.url {
                Some(url) if LogKind::of_url(url) == Some(LogKind::Embedded) => {
                    url.split_once(':').map_or(url, |(_, path)| path.strip_prefix("//").unwrap_or(path))
                }
                Some(dir) if LogKind::of_url(dir).is_none() => dir,
                _ => "./data",
            };
            let cache_mib = settings.cache_bytes >> 20;
            tracing::info!(dir, salvage = settings.salvage_wal, cache_mib, "opening the embedded saga log");
            Arc::new(RedbSagaLog::open(embedded_options(&settings, dir)).context("opening the embedded saga log")?)
        }
        LogKind::Postgres => {
            let url = settings.url.unwrap_or("postgres://postgres@127.0.0.1:5432/test");
            let mut options = PostgresOptions::from_url(url)?.retention(settings.retention);
            if let Some(schema) = settings.schema {
                options = options.schema(schema.to_owned());
            }
            tracing::info!(target = %options.target(), "connecting to the PostgreSQL saga log");
            Arc::new(PostgresSagaLog::connect(options).await.context("connecting to the PostgreSQL saga log")?)
        }
    })
}

/// Gauge, by `log`: 1 while the saga log takes writes, 0 while it refuses them.
pub const LOG_SERVING_GAUGE: &str = "sagaflow_saga_log_serving";

/// How often the saga log's health is looked at.
const LOG_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Follows the saga log's health on the gRPC health service (`services` and "") and on
/// [`LOG_SERVING_GAUGE`], until `stop`: NOT_SERVING while the log refuses writes.
pub fn watch_log_health(
    log: Arc<dyn SagaLog>,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    stop: CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    metrics::describe_gauge!(LOG_SERVING_GAUGE, "1 while the saga log takes writes, 0 while it refuses them");
    tokio::spawn(async move {
        let mut serving = true;
        let mut tick = tokio::time::interval(LOG_HEALTH_INTERVAL);
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let health = log.health();
            metrics::gauge!(LOG_SERVING_GAUGE, "log" => log.name()).set(if health.is_serving() { 1.0 } else { 0.0 });
            if health.is_serving() == serving {
                continue;
            }
            serving = health.is_serving();
            let status = match &health {
                LogHealth::NotServing(why) => {
                    tracing::error!(why = %why, "the saga log refuses writes; health NOT_SERVING");
                    ServingStatus::NotServing
                }
                _ => {
                    tracing::info!("the saga log takes writes again; health SERVING");
                    ServingStatus::Serving
                }
            };
            for service in services.iter().copied().chain([""]) {
                reporter.set_service_status(service, status).await;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_its_broker_by_scheme() {
        assert_eq!(BrokerKind::of_url("nats://127.0.0.1:4222"), Some(BrokerKind::Nats));
        assert_eq!(BrokerKind::of_url("AMQPS://user:pw@host/%2f"), Some(BrokerKind::Rabbitmq));
        assert_eq!(BrokerKind::of_url("memory:"), Some(BrokerKind::Memory));
        assert_eq!(BrokerKind::of_url("127.0.0.1:4222"), None);
        assert_eq!(BrokerKind::of_url("kafka://host"), None);
    }

    #[test]
    fn the_default_broker_gives_way_to_its_url_and_a_contradiction_is_named() {
        assert_eq!(BrokerKind::resolve(BrokerKind::Memory, Some("nats://h")).unwrap(), BrokerKind::Nats);
        assert_eq!(BrokerKind::resolve(BrokerKind::Rabbitmq, None).unwrap(), BrokerKind::Rabbitmq);
        assert_eq!(BrokerKind::resolve(BrokerKind::Nats, Some("nats://h")).unwrap(), BrokerKind::Nats);
        let error = BrokerKind::resolve(BrokerKind::Rabbitmq, Some("nats://h")).unwrap_err().to_string();
        assert_eq!(error, "broker is Rabbitmq but broker_url names a Nats broker");
    }

    #[test]
    fn a_url_names_its_saga_log_by_scheme() {
        assert_eq!(LogKind::of_url("postgres://u@h/db"), Some(LogKind::Postgres));
        assert_eq!(LogKind::of_url("postgresql://u@h/db"), Some(LogKind::Postgres));
        assert_eq!(LogKind::of_url("redb:/var/lib/sagaflow"), Some(LogKind::Embedded));
        assert_eq!(LogKind::of_url("memory:"), Some(LogKind::Memory));
        assert_eq!(LogKind::of_url("./data"), None);
        assert_eq!(LogKind::of_url("/var/lib/sagaflow"), None);
    }

    #[test]
    fn the_default_log_gives_way_to_its_url_and_a_contradiction_is_named() {
        assert_eq!(LogKind::resolve(LogKind::Embedded, Some("postgres://h/db")).unwrap(), LogKind::Postgres);
        assert_eq!(LogKind::resolve(LogKind::Embedded, Some("./data")).unwrap(), LogKind::Embedded);
        assert_eq!(LogKind::resolve(LogKind::Memory, Some("redb:./d")).unwrap(), LogKind::Embedded);
        let error = LogKind::resolve(LogKind::Postgres, Some("redb:./d")).unwrap_err().to_string();
        assert_eq!(error, "saga_log is Postgres but saga_log_url names a Embedded log");
    }

    #[tokio::test]
    async fn an_embedded_log_opens_where_its_redb_url_points() {
        let dir = std::env::temp_dir().join(format!("sagaflow-server-redb-{}", std::process::id()));
        let url = format!("redb:{}", dir.display());
        let settings = LogSettings {
            kind: LogKind::Embedded,
            url: Some(&url),
            schema: None,
            retention: Retention::default(),
            salvage_wal: false,
            cache_bytes: sagaflow_redb::DEFAULT_CACHE_SIZE,
        };
        let log = open_saga_log(settings).await.unwrap();
        assert_eq!(log.name(), "redb");
        assert!(dir.is_dir(), "the log's files are under {}", dir.display());
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
