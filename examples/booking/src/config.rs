//! `app.yaml` and its environment overrides.
//!
//! The file comes from `--config`, else `$OCH_PATH/app.yaml`, else the
//! built-in defaults; then `POD_ID`, `SAGAFLOW_BROKER`, `SAGAFLOW_BROKER_URL`,
//! `SAGAFLOW_LOG`, `SAGAFLOW_LOG_URL`, `SAGAFLOW_GRPC_LISTEN`, `SAGAFLOW_HTTP_LISTEN`,
//! `SAGAFLOW_ADMIN_TOKEN` and `SAGAFLOW_CALLBACK_SECRET` override it.
//! Unknown keys are an error that names the key, and so is a duration or count out of its
//! range ([`Config::validate`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sagaflow_server::config::{HOUR_MS, WEEK_MS, within};
use serde::Deserialize;

use crate::upstream::MockConfig;
pub use sagaflow_server::backends::{BrokerKind, LogKind};
pub use sagaflow_server::config::{
    CallbackConfig, FlowConfig, MessageQueueConfig, ReplicasConfig, RetentionConfig, RetryConfig, TopicConfig,
};
/// Most consumers of one topic in one pod.
const MAX_CONSUMERS: usize = 4_096;
/// Shortest `callbacks.secret`: an HMAC key shorter than this is guessable.
const MIN_SECRET_LEN: usize = 16;

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
    /// Which broker carries the hops: `memory`, `rabbitmq` or `nats`; left at `memory`, the
    /// scheme of `broker_url` (`amqp://`, `nats://`) chooses.
    pub broker: BrokerKind,
    /// The broker's URL, credentials included (never logged); each driver has a local default.
    pub broker_url: Option<String>,
    /// RabbitMQ only: let the broker delete a queue idle (no consumer) this long, with its
    /// messages. Off by default; for tests and short-lived pods.
    pub broker_queue_expiry_ms: Option<u64>,
    /// Which saga log records the sagas: `embedded` (default), `postgres` or `memory`; left at
    /// `embedded` or `memory`, the scheme of `saga_log_url` (`postgres://`, `redb:DIR`,
    /// `memory:`) chooses.
    pub saga_log: LogKind,
    /// The saga log's directory (embedded, default `./data`, also as `redb:DIR`) or URL (postgres).
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
        BrokerKind::resolve(self.broker, self.broker_url.as_deref())?;
        LogKind::resolve(self.saga_log, self.saga_log_url.as_deref())?;
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
        self.flow.validate()?;
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
        let embedded = |config: &Config| {
            sagaflow_server::backends::embedded_options(&crate::app::log_settings(config), "/tmp/unused")
        };
        assert_eq!(embedded(&default).cache_bytes(), sagaflow_redb::DEFAULT_CACHE_SIZE);
        let config = Config::from_yaml("saga_log_cache_mib: 4\n").unwrap();
        config.validate().unwrap();
        assert_eq!(embedded(&config).cache_bytes(), 4 << 20);
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

    #[test]
    fn a_url_chooses_the_backend_unless_the_kind_named_says_otherwise() {
        let config = Config::from_yaml("saga_log_url: postgres://u@127.0.0.1/db\nbroker_url: nats://127.0.0.1:4222\n");
        config.unwrap().validate().unwrap();
        assert_eq!(
            invalid("broker: rabbitmq\nbroker_url: nats://127.0.0.1:4222\n"),
            "broker is Rabbitmq but broker_url names a Nats broker"
        );
        assert_eq!(
            invalid("saga_log: postgres\nsaga_log_url: redb:./data\n"),
            "saga_log is Postgres but saga_log_url names a Embedded log"
        );
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
