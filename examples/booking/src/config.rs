//! `app.yaml` and its environment overrides.
//!
//! The file comes from `--config`, else `$OCH_PATH/app.yaml`, else the
//! built-in defaults; then `POD_ID`, `SAGAFLOW_BROKER`, `SAGAFLOW_BROKER_URL`,
//! `SAGAFLOW_LOG`, `SAGAFLOW_LOG_URL`, `SAGAFLOW_GRPC_LISTEN`, `SAGAFLOW_HTTP_LISTEN`,
//! `SAGAFLOW_ADMIN_TOKEN` and `SAGAFLOW_CALLBACK_SECRET` override it.
//! Unknown keys are an error that names the key, and so is a duration or count out of its
//! range ([`Config::validate`]).

use std::fmt::Display;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sagaflow::RetryPolicy;
use serde::Deserialize;

use crate::upstream::MockConfig;

const HOUR_MS: u64 = 3_600_000;
const WEEK_MS: u64 = 7 * 24 * HOUR_MS;
/// Most consumers of one topic in one pod.
const MAX_CONSUMERS: usize = 4_096;
/// Shortest `callbacks.secret`: an HMAC key shorter than this is guessable.
const MIN_SECRET_LEN: usize = 16;

/// `value` if it lies in `range`, else an error naming `key`, the range and the value.
fn within<T: PartialOrd + Display>(key: &str, value: T, range: RangeInclusive<T>) -> anyhow::Result<()> {
    if range.contains(&value) {
        return Ok(());
    }
    bail!("{key} must be between {} and {}, got {value}", range.start(), range.end())
}

/// The whole configuration of the booking service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This pod's id: throttled topics end in it.
    pub pod_id: String,
    /// Where the orchestrator's gRPC API listens.
    pub grpc_listen: SocketAddr,
    /// Where the admin HTTP API (health, sagas, retry) listens.
    pub http_listen: SocketAddr,
    /// Bearer token the admin API requires (mandatory off loopback).
    pub admin_token: Option<String>,
    /// Whether `/metrics` is served without the token.
    pub public_metrics: bool,
    /// OTLP/HTTP endpoint to export traces to (e.g. `http://127.0.0.1:4318/v1/traces`); off when unset.
    pub otlp_endpoint: Option<String>,
    /// Which broker carries the hops: `memory`, `rabbitmq` or `nats`.
    pub broker: BrokerKind,
    /// The broker's URL, credentials included (never logged); each driver has a local default.
    pub broker_url: Option<String>,
    /// RabbitMQ only: let the broker delete a queue idle (no consumer) this long, with its
    /// messages. Off by default; for tests and short-lived pods.
    pub broker_queue_expiry_ms: Option<u64>,
    /// Which saga log records the sagas: `embedded` (default), `postgres` or `memory`.
    pub saga_log: LogKind,
    /// The saga log's directory (embedded, default `./data`) or URL (postgres).
    pub saga_log_url: Option<String>,
    /// PostgreSQL schema of the saga tables (default: the connection's search path).
    pub saga_log_schema: Option<String>,
    /// Embedded log only: MiB of the database file's pages kept in memory (default 32).
    pub saga_log_cache_mib: usize,
    /// How long ended sagas are kept.
    pub retention: RetentionConfig,
    /// The upstream services.
    pub upstream: UpstreamConfig,
    /// Topics and consumers.
    pub message_queue: MessageQueueConfig,
    /// Retry and timeout policies of the booking flows.
    pub flow: FlowConfig,
    /// How long a sync or throttled caller waits for its saga, in ms.
    pub wait_timeout_ms: u64,
    /// The HTTP callbacks of async sagas.
    pub callbacks: CallbackConfig,
    /// Several replicas sharing the PostgreSQL saga log: leases and takeover.
    pub replicas: ReplicasConfig,
    /// Further `Host` names the admin API answers to without the token (`name` for any port,
    /// `name:port`), e.g. a reverse proxy's; its bound address always is one.
    pub admin_hosts: Vec<String>,
}

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

/// Retention of ended sagas, and of the tombstones that refuse their request ids once pruned.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Ended sagas older than this many seconds are dropped.
    pub max_age_secs: u64,
    /// At most this many ended sagas are kept.
    pub max_ended: usize,
    /// A dropped saga's tombstone is kept this many seconds after the drop.
    pub tombstone_age_secs: u64,
    /// At most this many tombstones are kept (0: none, a pruned request id starts anew).
    pub max_tombstones: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        let retention = sagaflow::log::Retention::default();
        Self {
            max_age_secs: retention.max_age.as_secs(),
            max_ended: retention.max_ended,
            tombstone_age_secs: retention.tombstone_age.as_secs(),
            max_tombstones: retention.max_tombstones,
        }
    }
}

/// Where the upstreams are, and how the in-process mocks behave.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Run the mock Order and Payment services inside this process.
    pub in_process: bool,
    /// Address of the OrderService (also where `booking order` listens).
    pub order_addr: SocketAddr,
    /// Address of the PaymentService (also where `booking payment` listens).
    pub payment_addr: SocketAddr,
    /// Behaviour of the mock OrderService.
    pub order: MockConfig,
    /// Behaviour of the mock PaymentService.
    pub payment: MockConfig,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            in_process: true,
            order_addr: SocketAddr::from(([127, 0, 0, 1], 10001)),
            payment_addr: SocketAddr::from(([127, 0, 0, 1], 10002)),
            order: MockConfig::default(),
            payment: MockConfig::default(),
        }
    }
}

/// Topics and their consumers, as in the original's `message_queue` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessageQueueConfig {
    /// Prefix of every topic name.
    pub topic_prefix: String,
    /// Consumers of a topic not listed below.
    pub default_concurrency: usize,
    /// Deliveries after which a message is dead-lettered.
    pub max_deliveries: u32,
    /// Per-topic settings.
    pub topics: Vec<TopicConfig>,
}

impl Default for MessageQueueConfig {
    fn default() -> Self {
        Self { topic_prefix: "booking".into(), default_concurrency: 16, max_deliveries: 5, topics: Vec::new() }
    }
}

/// One topic's consumers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// The topic id, `<facade>.<node>` or `<facade>.rollback` (see `topic.rs`).
    pub id: String,
    /// Whether the topic is a throttled one (suffixed with the pod id).
    #[serde(default)]
    pub is_throttling: bool,
    /// Consumers of this topic in this pod; required.
    pub concurrency: Option<usize>,
}

/// Retry and timeout policies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowConfig {
    /// Timeout of each upstream call, in ms.
    pub step_timeout_ms: u64,
    /// Time within which a saga's forward part must finish, in ms.
    pub deadline_ms: u64,
    /// Retries of actions.
    pub retry: RetryConfig,
    /// Retries of compensations; past them a saga is Stuck.
    pub compensation_retry: RetryConfig,
    /// Largest flow data a saga may carry, in bytes of JSON; a larger request is refused.
    pub max_data_bytes: usize,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            step_timeout_ms: 5_000,
            deadline_ms: 30_000,
            retry: RetryConfig::default(),
            compensation_retry: RetryConfig { max_attempts: 10, initial_backoff_ms: 100, ..RetryConfig::default() },
            max_data_bytes: sagaflow::DEFAULT_MAX_DATA_BYTES,
        }
    }
}

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all.
    pub max_attempts: u32,
    /// First delay, in ms.
    pub initial_backoff_ms: u64,
    /// Largest delay, in ms.
    pub max_backoff_ms: u64,
    /// Growth per attempt.
    pub multiplier: f64,
    /// Random share of each delay, 0..=1.
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { max_attempts: 5, initial_backoff_ms: 50, max_backoff_ms: 2_000, multiplier: 2.0, jitter: 0.2 }
    }
}

impl RetryConfig {
    /// Checks the ranges; `key` names this section in the error (`flow.retry`).
    fn validate(&self, key: &str) -> anyhow::Result<()> {
        within(&format!("{key}.max_attempts"), self.max_attempts, 1..=1_000)?;
        within(&format!("{key}.initial_backoff_ms"), self.initial_backoff_ms, 0..=HOUR_MS)?;
        within(&format!("{key}.max_backoff_ms"), self.max_backoff_ms, 0..=HOUR_MS)?;
        within(&format!("{key}.multiplier"), self.multiplier, 1.0..=100.0)?;
        within(&format!("{key}.jitter"), self.jitter, 0.0..=1.0)
    }

    /// The policy these settings describe.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            max_backoff: Duration::from_millis(self.max_backoff_ms),
            multiplier: self.multiplier,
            jitter: self.jitter,
        }
    }
}

/// HTTP callbacks of async sagas.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    /// Hosts a callback URL may name (no server-side request forgery through us): `host`
    /// for any port, `host:port` for that port only (IPv6: `::1`, `[::1]:8080`). The
    /// orchestrator's own listeners are refused whatever this allows.
    pub allow: Vec<String>,
    /// Delivery attempts per callback.
    pub attempts: u32,
    /// Timeout of one delivery attempt, in ms.
    pub timeout_ms: u64,
    /// Key of the `Sagaflow-Signature` HMAC; unsigned callbacks when unset.
    pub secret: Option<String>,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        Self {
            allow: vec!["127.0.0.1".into(), "localhost".into(), "::1".into()],
            attempts: 5,
            timeout_ms: 5_000,
            secret: None,
        }
    }
}

impl std::fmt::Debug for CallbackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackConfig")
            .field("allow", &self.allow)
            .field("attempts", &self.attempts)
            .field("timeout_ms", &self.timeout_ms)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .finish()
    }
}

/// How replicas sharing a PostgreSQL saga log watch each other.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicasConfig {
    /// How long a replica counts as alive after renewing its lease, in ms;
    /// another replica takes its sagas over once it runs out.
    pub lease_ttl_ms: u64,
    /// How often the lease is renewed and expired replicas looked for, in ms.
    pub lease_renew_ms: u64,
}

impl Default for ReplicasConfig {
    fn default() -> Self {
        let options = sagaflow::Options::default();
        Self {
            lease_ttl_ms: options.lease_ttl.as_millis() as u64,
            lease_renew_ms: options.lease_renew_interval.as_millis() as u64,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pod_id: "local".into(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 10000)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 10090)),
            admin_token: None,
            public_metrics: true,
            otlp_endpoint: None,
            broker: BrokerKind::Memory,
            broker_url: None,
            broker_queue_expiry_ms: None,
            saga_log: LogKind::Embedded,
            saga_log_url: None,
            saga_log_schema: None,
            saga_log_cache_mib: sagaflow_redb::DEFAULT_CACHE_SIZE >> 20,
            retention: RetentionConfig::default(),
            upstream: UpstreamConfig::default(),
            message_queue: MessageQueueConfig::default(),
            flow: FlowConfig::default(),
            wait_timeout_ms: 30_000,
            callbacks: CallbackConfig::default(),
            replicas: ReplicasConfig::default(),
            admin_hosts: Vec::new(),
        }
    }
}

impl Config {
    /// Reads the configuration: `explicit`, else `$OCH_PATH/app.yaml`, else
    /// the defaults; then the environment; then checks it.
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<Self> {
        let path = match explicit {
            Some(path) => Some(path.to_owned()),
            None => std::env::var_os("OCH_PATH").map(|dir| PathBuf::from(dir).join("app.yaml")).filter(|p| p.exists()),
        };
        let mut config = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                Self::from_yaml(&text).with_context(|| format!("in {}", path.display()))?
            }
            None => Self::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Parses yaml; unknown keys are errors naming the key.
    pub fn from_yaml(text: &str) -> anyhow::Result<Self> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        Ok(serde_norway::from_str(text)?)
    }

    /// Applies the environment overrides, read through `var`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        if let Some(pod) = var("POD_ID").filter(|v| !v.is_empty()) {
            self.pod_id = pod;
        }
        if let Some(kind) = var("SAGAFLOW_BROKER").filter(|v| !v.is_empty()) {
            self.broker = serde_norway::from_str(&kind)
                .map_err(|_| anyhow::anyhow!("SAGAFLOW_BROKER=`{kind}`: expected one of memory, rabbitmq, nats"))?;
        }
        if let Some(url) = var("SAGAFLOW_BROKER_URL").filter(|v| !v.is_empty()) {
            self.broker_url = Some(url);
        }
        if let Some(kind) = var("SAGAFLOW_LOG").filter(|v| !v.is_empty()) {
            self.saga_log = serde_norway::from_str(&kind)
                .map_err(|_| anyhow::anyhow!("SAGAFLOW_LOG=`{kind}`: expected one of embedded, postgres, memory"))?;
        }
        if let Some(url) = var("SAGAFLOW_LOG_URL").filter(|v| !v.is_empty()) {
            self.saga_log_url = Some(url);
        }
        if let Some(endpoint) = var("SAGAFLOW_OTLP_ENDPOINT").filter(|v| !v.is_empty()) {
            self.otlp_endpoint = Some(endpoint);
        }
        if let Some(token) = var("SAGAFLOW_ADMIN_TOKEN").filter(|v| !v.is_empty()) {
            self.admin_token = Some(token);
        }
        if let Some(secret) = var("SAGAFLOW_CALLBACK_SECRET").filter(|v| !v.is_empty()) {
            self.callbacks.secret = Some(secret);
        }
        if let Some(addr) = var("SAGAFLOW_HTTP_LISTEN").filter(|v| !v.is_empty()) {
            self.http_listen = addr.parse().with_context(|| format!("SAGAFLOW_HTTP_LISTEN=`{addr}`"))?;
        }
        if let Some(addr) = var("SAGAFLOW_GRPC_LISTEN").filter(|v| !v.is_empty()) {
            self.grpc_listen = addr.parse().with_context(|| format!("SAGAFLOW_GRPC_LISTEN=`{addr}`"))?;
        }
        Ok(())
    }

    /// Checks what the types cannot: every duration and count lies in its range (the error
    /// names the key: `callbacks.timeout_ms must be between 1 and 600000, got 0`).
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.pod_id.is_empty() || !self.pod_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("pod_id `{}` must be ASCII letters, digits, `-` or `_`", self.pod_id);
        }
        if let Some(ms) = self.broker_queue_expiry_ms {
            within("broker_queue_expiry_ms", ms, 1_000..=WEEK_MS)?;
        }
        within("saga_log_cache_mib", self.saga_log_cache_mib, 1..=64 << 10)?;
        within("retention.max_age_secs", self.retention.max_age_secs, 1..=10 * 365 * 24 * 3600)?;
        within("retention.max_ended", self.retention.max_ended, 0..=100_000_000)?;
        within("message_queue.default_concurrency", self.message_queue.default_concurrency, 1..=MAX_CONSUMERS)?;
        within("message_queue.max_deliveries", self.message_queue.max_deliveries, 1..=1_000)?;
        for (i, topic) in self.message_queue.topics.iter().enumerate() {
            match topic.concurrency {
                None => bail!("message_queue.topics[{i}] (`{}`): `concurrency` is required", topic.id),
                Some(n) => within(&format!("message_queue.topics[{i}].concurrency"), n, 1..=MAX_CONSUMERS)?,
            }
        }
        self.upstream.order.validate().map_err(|e| anyhow::anyhow!("upstream.order.{e}"))?;
        self.upstream.payment.validate().map_err(|e| anyhow::anyhow!("upstream.payment.{e}"))?;
        within("flow.step_timeout_ms", self.flow.step_timeout_ms, 1..=HOUR_MS)?;
        within("flow.deadline_ms", self.flow.deadline_ms, 1..=WEEK_MS)?;
        within("flow.max_data_bytes", self.flow.max_data_bytes, 64..=16 << 20)?;
        self.flow.retry.validate("flow.retry")?;
        self.flow.compensation_retry.validate("flow.compensation_retry")?;
        within("wait_timeout_ms", self.wait_timeout_ms, 1..=HOUR_MS)?;
        crate::admin::check_access(self.http_listen, self.admin_token.as_deref())?;
        within("callbacks.attempts", self.callbacks.attempts, 1..=20)?;
        within("callbacks.timeout_ms", self.callbacks.timeout_ms, 1..=600_000)?;
        if let Some(secret) = &self.callbacks.secret
            && secret.len() < MIN_SECRET_LEN
        {
            bail!("callbacks.secret must be at least {MIN_SECRET_LEN} bytes, got {}", secret.len());
        }
        let r = &self.replicas;
        if !(100..=3_600_000).contains(&r.lease_ttl_ms) || r.lease_renew_ms == 0 || r.lease_renew_ms >= r.lease_ttl_ms {
            bail!(
                "replicas.lease_ttl_ms must be between 100 and 3600000 and replicas.lease_renew_ms between 1 and below it \
                 (got {} and {})",
                r.lease_ttl_ms,
                r.lease_renew_ms
            );
        }
        Ok(())
    }

    /// The orchestrator options these settings describe.
    pub fn orchestrator_options(&self) -> sagaflow::Options {
        sagaflow::Options {
            topic_prefix: self.message_queue.topic_prefix.clone(),
            pod_id: self.pod_id.clone(),
            default_concurrency: self.message_queue.default_concurrency,
            topic_concurrency: self
                .message_queue
                .topics
                .iter()
                .filter_map(|t| t.concurrency.map(|c| (t.id.clone(), c)))
                .collect(),
            max_deliveries: self.message_queue.max_deliveries,
            wait_timeout: Duration::from_millis(self.wait_timeout_ms),
            lease_ttl: Duration::from_millis(self.replicas.lease_ttl_ms),
            lease_renew_interval: Duration::from_millis(self.replicas.lease_renew_ms),
            ..sagaflow::Options::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_config_parses_and_validates() {
        let text = include_str!("../../../deployment/local/app.yaml");
        let config = Config::from_yaml(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.grpc_listen.port(), 10000);
    }

    #[test]
    fn the_embedded_log_cache_size_reaches_its_options() {
        let default = Config::default();
        let options = crate::app::embedded_options(&default, "/tmp/unused", false);
        assert_eq!(options.cache_bytes(), sagaflow_redb::DEFAULT_CACHE_SIZE);
        let config = Config::from_yaml("saga_log_cache_mib: 4\n").unwrap();
        config.validate().unwrap();
        assert_eq!(crate::app::embedded_options(&config, "/tmp/unused", false).cache_bytes(), 4 << 20);
        let zero = Config::from_yaml("saga_log_cache_mib: 0\n").unwrap().validate().unwrap_err();
        assert_eq!(zero.to_string(), "saga_log_cache_mib must be between 1 and 65536, got 0");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_yaml("pod_id: a\nbrokr: memory\n").unwrap_err().to_string();
        assert!(err.contains("brokr"), "{err}");
        let err = Config::from_yaml("upstream:\n  order:\n    latncy_ms: 3\n").unwrap_err().to_string();
        assert!(err.contains("latncy_ms"), "{err}");
    }

    #[test]
    fn a_topic_without_concurrency_is_an_error() {
        let config = Config::from_yaml(
            "message_queue:\n  topics:\n    - id: ThrottlingBooking.CreateOrder\n      is_throttling: true\n",
        )
        .unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("concurrency") && err.contains("ThrottlingBooking.CreateOrder"), "{err}");
    }

    fn invalid(yaml: &str) -> String {
        Config::from_yaml(yaml).unwrap().validate().unwrap_err().to_string()
    }

    #[test]
    fn durations_and_counts_out_of_range_are_named() {
        let cases = [
            ("callbacks:\n  timeout_ms: 0\n", "callbacks.timeout_ms must be between 1 and 600000, got 0"),
            ("callbacks:\n  attempts: 0\n", "callbacks.attempts must be between 1 and 20, got 0"),
            (
                "flow:\n  deadline_ms: 18446744073709551615\n",
                "flow.deadline_ms must be between 1 and 604800000, got 18446744073709551615",
            ),
            ("flow:\n  step_timeout_ms: 0\n", "flow.step_timeout_ms must be between 1 and 3600000, got 0"),
            ("flow:\n  max_data_bytes: 10\n", "flow.max_data_bytes must be between 64 and 16777216, got 10"),
            ("flow:\n  retry:\n    max_attempts: 0\n", "flow.retry.max_attempts must be between 1 and 1000, got 0"),
            (
                "flow:\n  compensation_retry:\n    max_backoff_ms: 99999999999\n",
                "flow.compensation_retry.max_backoff_ms must be between 0 and 3600000, got 99999999999",
            ),
            ("flow:\n  retry:\n    multiplier: .nan\n", "flow.retry.multiplier must be between 1 and 100, got NaN"),
            ("flow:\n  retry:\n    jitter: 2\n", "flow.retry.jitter must be between 0 and 1, got 2"),
            ("wait_timeout_ms: 0\n", "wait_timeout_ms must be between 1 and 3600000, got 0"),
            ("broker_queue_expiry_ms: 5\n", "broker_queue_expiry_ms must be between 1000 and 604800000, got 5"),
            ("retention:\n  max_age_secs: 0\n", "retention.max_age_secs must be between 1 and 315360000, got 0"),
            (
                "retention:\n  max_ended: 100000001\n",
                "retention.max_ended must be between 0 and 100000000, got 100000001",
            ),
            (
                "message_queue:\n  default_concurrency: 100000\n",
                "message_queue.default_concurrency must be between 1 and 4096, got 100000",
            ),
            ("message_queue:\n  max_deliveries: 0\n", "message_queue.max_deliveries must be between 1 and 1000, got 0"),
            (
                "message_queue:\n  topics:\n    - {id: AsyncBooking.rollback, concurrency: 0}\n",
                "message_queue.topics[0].concurrency must be between 1 and 4096, got 0",
            ),
            (
                "upstream:\n  payment:\n    latency_ms: 18446744073709551615\n",
                "upstream.payment.latency_ms must be between 0 and 600000, got 18446744073709551615",
            ),
            ("callbacks:\n  secret: short\n", "callbacks.secret must be at least 16 bytes, got 5"),
        ];
        for (yaml, expected) in cases {
            assert_eq!(invalid(yaml), expected, "for {yaml:?}");
        }
    }

    #[test]
    fn the_callback_secret_comes_from_the_environment_and_is_not_shown() {
        let mut config = Config::default();
        config
            .apply_env(|name| (name == "SAGAFLOW_CALLBACK_SECRET").then(|| "0123456789abcdef-secret".into()))
            .unwrap();
        assert_eq!(config.callbacks.secret.as_deref(), Some("0123456789abcdef-secret"));
        config.validate().unwrap();
        assert!(!format!("{config:?}").contains("0123456789abcdef-secret"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut config = Config::default();
        config
            .apply_env(|name| match name {
                "POD_ID" => Some("pod-7".into()),
                "SAGAFLOW_BROKER" => Some("memory".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.pod_id, "pod-7");
        let err = config.apply_env(|name| (name == "SAGAFLOW_BROKER").then(|| "kafka".into())).unwrap_err();
        assert!(err.to_string().contains("kafka"));
    }
}
