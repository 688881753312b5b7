//! A service's whole configuration: the keys every orchestrator service reads ([`Config`]) and
//! the service's own ([`ServiceConfig`]), from a YAML file and the environment.
//!
//! The file comes from the path given, else `$OCH_PATH/app.yaml`, else the built-in defaults;
//! then `POD_ID`, `SAGAFLOW_BROKER`, `SAGAFLOW_BROKER_URL`, `SAGAFLOW_LOG`, `SAGAFLOW_LOG_URL`,
//! `SAGAFLOW_GRPC_LISTEN`, `SAGAFLOW_HTTP_LISTEN`, `SAGAFLOW_OTLP_ENDPOINT`,
//! `SAGAFLOW_ADMIN_TOKEN` and `SAGAFLOW_CALLBACK_SECRET` override it. Unknown keys are an
//! error that names the key, and so is a duration or count out of its range
//! ([`Config::validate`]). Defaults are the core's ([`sagaflow::Options`], [`sagaflow::Flow`],
//! [`sagaflow::log::Retention`]) wherever the core has one.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_norway::{Mapping, Value};

use crate::backends::{BrokerKind, BrokerSettings, LogKind, LogSettings};
use crate::config::{CallbackConfig, HOUR_MS, MessageQueueConfig, ReplicasConfig, RetentionConfig, WEEK_MS, within};

/// Most consumers of one topic in one pod.
const MAX_CONSUMERS: usize = 4_096;
/// Shortest `callbacks.secret`: an HMAC key shorter than this is guessable.
const MIN_SECRET_LEN: usize = 16;

/// Set to `1` or `true`: the embedded saga log replays the intact entries of a damaged
/// write-ahead file instead of refusing to open ([`sagaflow_redb::RedbOptions::salvage_wal`]).
pub const SALVAGE_WAL_ENV: &str = "SAGAFLOW_SALVAGE_WAL";

/// The top-level keys a service reads beside [`Config`]'s (its upstreams, its flows' policies).
pub trait ServiceConfig: DeserializeOwned + Default + Clone + Debug + Send + Sync + 'static {
    /// The top-level keys this section reads; the file's other keys are [`Config`]'s.
    const KEYS: &'static [&'static str];
    /// The topic prefix when `message_queue.topic_prefix` is unset (`None`: the core's).
    const TOPIC_PREFIX: Option<&'static str> = None;

    /// Checks what the types cannot; the error names the key.
    fn validate(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// No keys of the service's own.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoKeys {}

impl ServiceConfig for NoKeys {
    const KEYS: &'static [&'static str] = &[];
}

/// The whole configuration of an orchestrator service; the service's own keys in [`Config::app`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default, bound(deserialize = "A: Default"))]
pub struct Config<A = NoKeys> {
    /// This pod's id: throttled topics end in it.
    pub pod_id: String,
    /// Where the orchestrator's gRPC API listens.
    pub grpc_listen: SocketAddr,
    /// Where the admin HTTP API (health, sagas, retry, dashboard, metrics) listens.
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
    /// Embedded log only: MiB of the database file's pages kept in memory.
    pub saga_log_cache_mib: usize,
    /// How long ended sagas are kept.
    pub retention: RetentionConfig,
    /// Topics and consumers.
    pub message_queue: MessageQueueConfig,
    /// How long a sync or throttled caller waits for its saga, in ms.
    pub wait_timeout_ms: u64,
    /// Sync sagas run at once; callers beyond it wait for a slot.
    pub max_running_sagas: usize,
    /// Sync callers that may wait for a slot; beyond them a call is refused at once
    /// (`RESOURCE_EXHAUSTED`), which bounds the memory in hand whatever the load.
    pub max_waiting_sagas: usize,
    /// The HTTP callbacks of async sagas.
    pub callbacks: CallbackConfig,
    /// Several replicas sharing the PostgreSQL saga log: leases and takeover.
    pub replicas: ReplicasConfig,
    /// Further `Host` names the admin API answers to without the token (`name` for any port,
    /// `name:port`), e.g. a reverse proxy's; its bound address always is one.
    pub admin_hosts: Vec<String>,
    /// Start even when the log holds unfinished sagas of flow versions not registered here,
    /// leaving them waiting for their version (refused otherwise).
    pub start_with_missing_versions: bool,
    /// The service's own keys ([`ServiceConfig::KEYS`]).
    #[serde(skip)]
    pub app: A,
}

impl<A: Default> Default for Config<A> {
    fn default() -> Self {
        let options = sagaflow::Options::default();
        Self {
            pod_id: options.pod_id,
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
            message_queue: MessageQueueConfig::default(),
            wait_timeout_ms: options.wait_timeout.as_millis() as u64,
            max_running_sagas: options.max_running_sagas,
            max_waiting_sagas: options.max_waiting_sagas,
            callbacks: CallbackConfig::default(),
            replicas: ReplicasConfig::default(),
            admin_hosts: Vec::new(),
            start_with_missing_versions: options.start_with_missing_versions,
            app: A::default(),
        }
    }
}

impl<A: ServiceConfig> Config<A> {
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

    /// Parses yaml: [`ServiceConfig::KEYS`] into [`Config::app`], the rest into the shared
    /// keys; an unknown key is an error naming it.
    pub fn from_yaml(text: &str) -> anyhow::Result<Self> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let mut shared = match serde_norway::from_str(text)? {
            Value::Mapping(keys) => keys,
            Value::Null => Mapping::new(),
            _ => bail!("the configuration must be a mapping of keys to values"),
        };
        let mut own = Mapping::new();
        for &key in A::KEYS {
            if let Some(value) = shared.remove(key) {
                own.insert(key.into(), value);
            }
        }
        let mut config: Self = serde_norway::from_value(Value::Mapping(shared))?;
        config.app = serde_norway::from_value(Value::Mapping(own))?;
        Ok(config)
    }

    /// Applies the environment overrides, read through `var`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        if let Some(pod) = var("POD_ID") {
            self.pod_id = pod;
        }
        if let Some(kind) = var("SAGAFLOW_BROKER") {
            self.broker = serde_norway::from_str(&kind)
                .map_err(|_| anyhow::anyhow!("SAGAFLOW_BROKER=`{kind}`: expected one of memory, rabbitmq, nats"))?;
        }
        if let Some(url) = var("SAGAFLOW_BROKER_URL") {
            self.broker_url = Some(url);
        }
        if let Some(kind) = var("SAGAFLOW_LOG") {
            self.saga_log = serde_norway::from_str(&kind)
                .map_err(|_| anyhow::anyhow!("SAGAFLOW_LOG=`{kind}`: expected one of embedded, postgres, memory"))?;
        }
        if let Some(url) = var("SAGAFLOW_LOG_URL") {
            self.saga_log_url = Some(url);
        }
        if let Some(endpoint) = var("SAGAFLOW_OTLP_ENDPOINT") {
            self.otlp_endpoint = Some(endpoint);
        }
        if let Some(token) = var("SAGAFLOW_ADMIN_TOKEN") {
            self.admin_token = Some(token);
        }
        if let Some(secret) = var("SAGAFLOW_CALLBACK_SECRET") {
            self.callbacks.secret = Some(secret);
        }
        if let Some(addr) = var("SAGAFLOW_HTTP_LISTEN") {
            self.http_listen = addr.parse().with_context(|| format!("SAGAFLOW_HTTP_LISTEN=`{addr}`"))?;
        }
        if let Some(addr) = var("SAGAFLOW_GRPC_LISTEN") {
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
        self.app.validate()?;
        within("wait_timeout_ms", self.wait_timeout_ms, 1..=HOUR_MS)?;
        within("max_running_sagas", self.max_running_sagas, 1..=1 << 20)?;
        within("max_waiting_sagas", self.max_waiting_sagas, 0..=1 << 20)?;
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

    /// The prefix of every topic: `message_queue.topic_prefix`, else the service's, else the core's.
    pub fn topic_prefix(&self) -> String {
        match (&self.message_queue.topic_prefix, A::TOPIC_PREFIX) {
            (Some(prefix), _) => prefix.clone(),
            (None, Some(prefix)) => prefix.to_owned(),
            (None, None) => sagaflow::Options::default().topic_prefix,
        }
    }

    /// The orchestrator options these settings describe.
    pub fn orchestrator_options(&self) -> sagaflow::Options {
        sagaflow::Options {
            topic_prefix: self.topic_prefix(),
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
            max_running_sagas: self.max_running_sagas,
            max_waiting_sagas: self.max_waiting_sagas,
            lease_ttl: Duration::from_millis(self.replicas.lease_ttl_ms),
            lease_renew_interval: Duration::from_millis(self.replicas.lease_renew_ms),
            start_with_missing_versions: self.start_with_missing_versions,
            ..sagaflow::Options::default()
        }
    }

    /// The broker these settings name.
    pub fn broker_settings(&self) -> BrokerSettings<'_> {
        BrokerSettings {
            kind: self.broker,
            url: self.broker_url.as_deref(),
            connection_name: format!("sagaflow-{}", self.pod_id),
            queue_expiry: self.broker_queue_expiry_ms.map(Duration::from_millis),
        }
    }

    /// Where and how these settings keep the saga log ([`SALVAGE_WAL_ENV`] read from the environment).
    pub fn log_settings(&self) -> LogSettings<'_> {
        let r = &self.retention;
        LogSettings {
            kind: self.saga_log,
            url: self.saga_log_url.as_deref(),
            schema: self.saga_log_schema.as_deref(),
            retention: sagaflow::log::Retention {
                max_age: Duration::from_secs(r.max_age_secs),
                max_ended: r.max_ended,
                tombstone_age: Duration::from_secs(r.tombstone_age_secs),
                max_tombstones: r.max_tombstones,
            },
            salvage_wal: std::env::var(SALVAGE_WAL_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
            cache_bytes: self.saga_log_cache_mib << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Shop {
        warehouse: String,
        flow: crate::config::FlowConfig,
    }

    impl Default for Shop {
        fn default() -> Self {
            Self { warehouse: "north".into(), flow: Default::default() }
        }
    }

    impl ServiceConfig for Shop {
        const KEYS: &'static [&'static str] = &["warehouse", "flow"];
        const TOPIC_PREFIX: Option<&'static str> = Some("shop");

        fn validate(&self) -> anyhow::Result<()> {
            if self.warehouse.is_empty() {
                bail!("warehouse must not be empty");
            }
            self.flow.validate()
        }
    }

    fn invalid(yaml: &str) -> String {
        Config::<Shop>::from_yaml(yaml).unwrap().validate().unwrap_err().to_string()
    }

    #[test]
    fn the_defaults_are_the_cores() {
        let config = Config::<NoKeys>::default();
        let options = sagaflow::Options::default();
        let ours = config.orchestrator_options();
        assert_eq!(ours.topic_prefix, options.topic_prefix);
        assert_eq!(ours.wait_timeout, options.wait_timeout);
        assert_eq!(ours.default_concurrency, options.default_concurrency);
        assert_eq!(ours.max_deliveries, options.max_deliveries);
        assert_eq!(ours.lease_ttl, options.lease_ttl);
        assert_eq!(ours.lease_renew_interval, options.lease_renew_interval);
        assert_eq!(config.log_settings().retention, sagaflow::log::Retention::default());
        assert_eq!(config.http_listen.port(), 10090);
    }

    #[test]
    fn the_services_keys_go_to_its_section_and_the_rest_are_shared() {
        let config = Config::<Shop>::from_yaml("pod_id: a\nwarehouse: south\nwait_timeout_ms: 7\n").unwrap();
        assert_eq!((config.pod_id.as_str(), config.app.warehouse.as_str(), config.wait_timeout_ms), ("a", "south", 7));
        assert_eq!(Config::<Shop>::from_yaml("pod_id: a\n").unwrap().app.warehouse, "north");
        let err = Config::<Shop>::from_yaml("warehous: south\n").unwrap_err().to_string();
        assert!(err.contains("warehous"), "{err}");
        let err = Config::<NoKeys>::from_yaml("warehouse: south\n").unwrap_err().to_string();
        assert!(err.contains("warehouse"), "{err}");
        let err = Config::<Shop>::from_yaml("warehouse: ''\n").unwrap().validate().unwrap_err().to_string();
        assert_eq!(err, "warehouse must not be empty");
    }

    #[test]
    fn the_topic_prefix_is_the_configured_one_else_the_services_else_the_cores() {
        assert_eq!(Config::<Shop>::default().topic_prefix(), "shop");
        assert_eq!(Config::<NoKeys>::default().topic_prefix(), sagaflow::Options::default().topic_prefix);
        let config = Config::<Shop>::from_yaml("message_queue:\n  topic_prefix: e2e\n").unwrap();
        assert_eq!(config.orchestrator_options().topic_prefix, "e2e");
        let config = Config::<Shop>::from_yaml("message_queue:\n  default_concurrency: 2\n").unwrap();
        assert_eq!(config.orchestrator_options().topic_prefix, "shop");
    }

    #[test]
    fn the_embedded_log_cache_size_reaches_its_options() {
        let default = Config::<NoKeys>::default();
        let embedded =
            |config: &Config<NoKeys>| crate::backends::embedded_options(&config.log_settings(), "/tmp/unused");
        assert_eq!(embedded(&default).cache_bytes(), sagaflow_redb::DEFAULT_CACHE_SIZE);
        let config = Config::<NoKeys>::from_yaml("saga_log_cache_mib: 4\n").unwrap();
        config.validate().unwrap();
        assert_eq!(embedded(&config).cache_bytes(), 4 << 20);
        let zero = Config::<NoKeys>::from_yaml("saga_log_cache_mib: 0\n").unwrap().validate().unwrap_err();
        assert_eq!(zero.to_string(), "saga_log_cache_mib must be between 1 and 65536, got 0");
    }

    #[test]
    fn unknown_shared_keys_are_named() {
        let err = Config::<Shop>::from_yaml("pod_id: a\nbrokr: memory\n").unwrap_err().to_string();
        assert!(err.contains("brokr"), "{err}");
        let err = Config::<Shop>::from_yaml("flow:\n  retry:\n    max_atempts: 3\n").unwrap_err().to_string();
        assert!(err.contains("max_atempts"), "{err}");
    }

    #[test]
    fn a_topic_without_concurrency_is_an_error() {
        let config = Config::<Shop>::from_yaml(
            "message_queue:\n  topics:\n    - id: Checkout.Reserve\n      is_throttling: true\n",
        )
        .unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("concurrency") && err.contains("Checkout.Reserve"), "{err}");
    }

    #[test]
    fn a_url_chooses_the_backend_unless_the_kind_named_says_otherwise() {
        let config =
            Config::<Shop>::from_yaml("saga_log_url: postgres://u@127.0.0.1/db\nbroker_url: nats://127.0.0.1:4222\n");
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
                "message_queue:\n  topics:\n    - {id: Checkout.rollback, concurrency: 0}\n",
                "message_queue.topics[0].concurrency must be between 1 and 4096, got 0",
            ),
            ("callbacks:\n  secret: short\n", "callbacks.secret must be at least 16 bytes, got 5"),
        ];
        for (yaml, expected) in cases {
            assert_eq!(invalid(yaml), expected, "for {yaml:?}");
        }
    }

    #[test]
    fn the_callback_secret_comes_from_the_environment_and_is_not_shown() {
        let mut config = Config::<NoKeys>::default();
        config
            .apply_env(|name| (name == "SAGAFLOW_CALLBACK_SECRET").then(|| "0123456789abcdef-secret".into()))
            .unwrap();
        assert_eq!(config.callbacks.secret.as_deref(), Some("0123456789abcdef-secret"));
        config.validate().unwrap();
        assert!(!format!("{config:?}").contains("0123456789abcdef-secret"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut config = Config::<NoKeys>::default();
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

    #[test]
    fn an_otlp_endpoint_comes_from_the_environment() {
        let mut config = Config::<NoKeys>::default();
        config.apply_env(|name| (name == "SAGAFLOW_OTLP_ENDPOINT").then(|| "http://collector:4318".into())).unwrap();
        assert_eq!(config.otlp_endpoint.as_deref(), Some("http://collector:4318"));
    }
}
