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
    //! Booking's own keys; the shared keys' parsing, validation and defaults are tested in
    //! `sagaflow-server`.

    use super::*;

    #[test]
    fn the_sample_config_parses_and_validates() {
        let text = include_str!("../../../deployment/local/app.yaml");
        let config = Config::from_yaml(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.grpc_listen.port(), 10000);
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
    fn unknown_keys_in_bookings_sections_are_named() {
        let err = Config::from_yaml("upstream:\n  order:\n    latncy_ms: 3\n").unwrap_err().to_string();
        assert!(err.contains("latncy_ms"), "{err}");
    }

    #[test]
    fn mock_settings_out_of_range_are_named() {
        let yaml = "upstream:\n  payment:\n    latency_ms: 18446744073709551615\n";
        let err = Config::from_yaml(yaml).unwrap().validate().unwrap_err().to_string();
        assert_eq!(err, "upstream.payment.latency_ms must be between 0 and 600000, got 18446744073709551615");
    }
}
