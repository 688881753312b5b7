//! Configuration sections every orchestrator service shares, with their defaults (the core's,
//! where the core has one) and their ranges ([`within`]).

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::bail;
use sagaflow::RetryPolicy;
use serde::Deserialize;

/// An hour, in ms: the longest timeout or backoff a section takes.
pub const HOUR_MS: u64 = 3_600_000;
/// A week, in ms: the longest saga deadline.
pub const WEEK_MS: u64 = 7 * 24 * HOUR_MS;

/// `value` if it lies in `range`, else an error naming `key`, the range and the value.
pub fn within<T: PartialOrd + Display>(key: &str, value: T, range: RangeInclusive<T>) -> anyhow::Result<()> {
    if range.contains(&value) {
        return Ok(());
    }
    bail!("{key} must be between {} and {}, got {value}", range.start(), range.end())
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

/// Topics and their consumers (the `message_queue` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessageQueueConfig {
    /// Prefix of every topic name; unset, the service's own default
    /// ([`crate::settings::ServiceConfig::TOPIC_PREFIX`]), else the core's.
    pub topic_prefix: Option<String>,
    /// Consumers of a topic not listed below.
    pub default_concurrency: usize,
    /// Deliveries after which a message is dead-lettered.
    pub max_deliveries: u32,
    /// Per-topic settings.
    pub topics: Vec<TopicConfig>,
}

impl Default for MessageQueueConfig {
    fn default() -> Self {
        let options = sagaflow::Options::default();
        Self {
            topic_prefix: None,
            default_concurrency: options.default_concurrency,
            max_deliveries: options.max_deliveries,
            topics: Vec::new(),
        }
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

/// The core's defaults ([`sagaflow::Flow`]), so a service and a flow built in code agree.
impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            step_timeout_ms: sagaflow::DEFAULT_STEP_TIMEOUT.as_millis() as u64,
            deadline_ms: sagaflow::DEFAULT_DEADLINE.as_millis() as u64,
            retry: RetryPolicy::default().into(),
            compensation_retry: RetryPolicy::compensation().into(),
            max_data_bytes: sagaflow::DEFAULT_MAX_DATA_BYTES,
        }
    }
}

impl FlowConfig {
    /// Checks the ranges; the error names the key under `flow.`.
    pub fn validate(&self) -> anyhow::Result<()> {
        within("flow.step_timeout_ms", self.step_timeout_ms, 1..=HOUR_MS)?;
        within("flow.deadline_ms", self.deadline_ms, 1..=WEEK_MS)?;
        within("flow.max_data_bytes", self.max_data_bytes, 64..=16 << 20)?;
        self.retry.validate("flow.retry")?;
        self.compensation_retry.validate("flow.compensation_retry")
    }

    /// The flow with these policies.
    pub fn apply<D: Send + Sync + 'static>(&self, flow: sagaflow::Flow<D>) -> sagaflow::Flow<D> {
        flow.retry(self.retry.policy())
            .compensation_retry(self.compensation_retry.policy())
            .step_timeout(Duration::from_millis(self.step_timeout_ms))
            .deadline(Duration::from_millis(self.deadline_ms))
            .max_data_bytes(self.max_data_bytes)
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
        RetryPolicy::default().into()
    }
}

impl From<RetryPolicy> for RetryConfig {
    fn from(policy: RetryPolicy) -> Self {
        Self {
            max_attempts: policy.max_attempts,
            initial_backoff_ms: policy.initial_backoff.as_millis() as u64,
            max_backoff_ms: policy.max_backoff.as_millis() as u64,
            multiplier: policy.multiplier,
            jitter: policy.jitter,
        }
    }
}

impl RetryConfig {
    /// Checks the ranges; `key` names this section in the error (`flow.retry`).
    pub fn validate(&self, key: &str) -> anyhow::Result<()> {
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
