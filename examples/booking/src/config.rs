//! `app.yaml` and its environment overrides: the keys every orchestrator service reads
//! ([`sagaflow_server::Config`]: listeners, broker, saga log, retention, topics, callbacks,
//! replicas, the environment variables) and booking's own, `upstream` and `flow`
//! ([`BookingConfig`]).

use std::net::SocketAddr;

use serde::Deserialize;

use crate::upstream::MockConfig;
pub use sagaflow_server::backends::{BrokerKind, LogKind};
pub use sagaflow_server::config::{
    CallbackConfig, FlowConfig, MessageQueueConfig, ReplicasConfig, RetentionConfig, RetryConfig, TopicConfig,
};

/// The whole configuration of the booking service.
pub type Config = sagaflow_server::Config<BookingConfig>;

/// Booking's own keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BookingConfig {
    /// The upstream services.
    pub upstream: UpstreamConfig,
    /// Retry and timeout policies of the booking flows.
    pub flow: FlowConfig,
    /// Which booking flow new sagas start on, and which are kept for sagas in flight.
    pub flow_version: FlowVariant,
}

/// The booking flow's versions, for deploying a changed flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum FlowVariant {
    /// CreateOrder → CreatePayment.
    #[default]
    #[serde(rename = "v1")]
    V1,
    /// CheckBooking → CreateOrder → CreatePayment, with v1 kept for the sagas begun on it.
    #[serde(rename = "v2")]
    V2,
    /// v2 alone: sagas begun on v1 need it kept, or the start is refused.
    #[serde(rename = "v2-only")]
    V2Only,
}

impl sagaflow_server::ServiceConfig for BookingConfig {
    const KEYS: &'static [&'static str] = &["upstream", "flow", "flow_version"];
    const TOPIC_PREFIX: Option<&'static str> = Some("booking");

    fn validate(&self) -> anyhow::Result<()> {
        self.upstream.order.validate().map_err(|e| anyhow::anyhow!("upstream.order.{e}"))?;
        self.upstream.payment.validate().map_err(|e| anyhow::anyhow!("upstream.payment.{e}"))?;
        self.flow.validate()
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
        let embedded =
            |config: &Config| sagaflow_server::backends::embedded_options(&config.log_settings(), "/tmp/unused");
        assert_eq!(embedded(&default).cache_bytes(), sagaflow_redb::DEFAULT_CACHE_SIZE);
        let config = Config::from_yaml("saga_log_cache_mib: 4\n").unwrap();
        config.validate().unwrap();
        assert_eq!(embedded(&config).cache_bytes(), 4 << 20);
        let zero = Config::from_yaml("saga_log_cache_mib: 0\n").unwrap().validate().unwrap_err();
        assert_eq!(zero.to_string(), "saga_log_cache_mib must be between 1 and 65536, got 0");
    }

    #[test]
    fn booking_topics_are_prefixed_booking_unless_configured() {
        assert_eq!(Config::default().orchestrator_options().topic_prefix, "booking");
        let config = Config::from_yaml("message_queue:\n  max_deliveries: 3\n").unwrap();
        assert_eq!(config.orchestrator_options().topic_prefix, "booking");
        let config = Config::from_yaml("message_queue:\n  topic_prefix: shop\n").unwrap();
        assert_eq!(config.orchestrator_options().topic_prefix, "shop");
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
