//! The message broker abstraction that every driver implements.
//!
//! Semantics every driver must keep (the conformance suite checks them):
//! at-least-once delivery with manual ack; a nacked or abandoned delivery
//! (dropped without settling) comes back; a subscription never holds more
//! than `concurrency` unsettled deliveries; a message delivered
//! `max_deliveries` times without an ack is dead-lettered to
//! [`dead_letter_topic`]; within a topic, one consumer with concurrency 1 sees
//! messages in publish order.

mod memory;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use memory::MemoryBroker;

use crate::error::{ErrorSource, WithSource};

/// The header that carries a message's request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The header carrying a message's id, stable across re-publishes of the
/// same work, for brokers that deduplicate (NATS `Nats-Msg-Id`).
pub const MESSAGE_ID_HEADER: &str = "x-message-id";
/// The header a dead-lettered message carries its reason in.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-dead-letter-reason";

/// The topic poison and undeliverable messages of `topic` go to.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dead-letter")
}

/// One message: a topic, string headers and an opaque payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// Where it goes.
    pub topic: String,
    /// Headers, such as [`REQUEST_ID_HEADER`].
    pub headers: BTreeMap<String, String>,
    /// The body (JSON for sagaflow's own messages).
    pub payload: Bytes,
}

impl Message {
    /// A message with no headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self { topic: topic.into(), headers: BTreeMap::new(), payload: payload.into() }
    }

    /// The same message with one more header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The request id header, if any.
    pub fn request_id(&self) -> Option<&str> {
        self.headers.get(REQUEST_ID_HEADER).map(String::as_str)
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic)
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// How to consume a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// The topic.
    pub topic: String,
    /// Consumers of one group share the messages; each group sees all of them.
    pub group: String,
    /// Most unsettled deliveries this subscription may hold (the prefetch).
    pub concurrency: usize,
    /// Deliveries after which an unacked message is dead-lettered.
    pub max_deliveries: u32,
}

impl SubscribeOptions {
    /// Options with concurrency 1 and 5 deliveries.
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        Self { topic: topic.into(), group: group.into(), concurrency: 1, max_deliveries: 5 }
    }

    /// The same options with another concurrency.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// The same options with another delivery limit.
    pub fn max_deliveries(mut self, max_deliveries: u32) -> Self {
        self.max_deliveries = max_deliveries;
        self
    }
}

/// A broker driver's failure.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker could not be reached, or dropped the connection.
    #[error("broker unavailable: {}", WithSource(context, source))]
    Unavailable {
        /// What failed, where (never with a password).
        context: String,
        /// The broker client's own error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// The broker refused or did not confirm a publish.
    #[error("publish to `{topic}` not confirmed: {}", WithSource(reason, source))]
    NotConfirmed {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
        /// The broker client's own error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// The broker was closed.
    #[error("broker closed")]
    Closed,
    /// Invalid options or topic name.
    #[error("invalid broker request: {0}")]
    Invalid(String),
    /// Anything else the driver reports.
    #[error("broker error: {}", WithSource(context, source))]
    Other {
        /// What failed.
        context: String,
        /// The broker client's own error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
}

impl BrokerError {
    /// The broker could not be reached doing `context`, because of `source`.
    pub fn unavailable(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        BrokerError::Unavailable { context: context.into(), source: Some(ErrorSource::new(source)) }
    }

    /// The broker is unavailable, as the driver itself found, with no underlying error.
    pub fn unavailable_msg(context: impl Into<String>) -> Self {
        BrokerError::Unavailable { context: context.into(), source: None }
    }

    /// A publish to `topic` was refused or not confirmed, because of `source`.
    pub fn not_confirmed(
        topic: impl Into<String>,
        reason: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BrokerError::NotConfirmed { topic: topic.into(), reason: reason.into(), source: Some(ErrorSource::new(source)) }
    }

    /// A publish to `topic` was refused or not confirmed, as the driver itself found.
    pub fn not_confirmed_msg(topic: impl Into<String>, reason: impl Into<String>) -> Self {
        BrokerError::NotConfirmed { topic: topic.into(), reason: reason.into(), source: None }
    }

    /// Another failure of the driver doing `context`, because of `source`.
    pub fn other(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        BrokerError::Other { context: context.into(), source: Some(ErrorSource::new(source)) }
    }

    /// Another failure the driver itself found, with no underlying error.
    pub fn other_msg(context: impl Into<String>) -> Self {
        BrokerError::Other { context: context.into(), source: None }
    }
}

/// A message broker driver.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes durably; returns once the broker has confirmed it.
    async fn publish(&self, message: Message) -> Result<(), BrokerError>;

    /// Starts consuming a topic.
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BrokerError>;

    /// Stops handing out deliveries; unsettled ones may still be settled.
    async fn close(&self);

    /// The driver's name, for logs.
    fn name(&self) -> &'static str;

    /// Messages waiting on `topic` for `group` (not in flight), where the
    /// broker can tell cheaply; `None` otherwise.
    async fn depth(&self, topic: &str, group: &str) -> Option<u64> {
        let _ = (topic, group);
        None
    }
}

/// The driver side of a subscription.
#[async_trait]
pub trait SubscriptionSource: Send {
    /// The next delivery; `None` once the subscription or broker is closed.
    /// Must be cancel-safe: a cancelled call loses no message.
    async fn next(&mut self) -> Option<Delivery>;
}

/// A stream of deliveries from one topic.
pub struct Subscription {
    source: Box<dyn SubscriptionSource>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subscription")
    }
}

impl Subscription {
    /// Wraps a driver's source.
    pub fn new(source: impl SubscriptionSource + 'static) -> Self {
        Self { source: Box::new(source) }
    }

    /// The next delivery; `None` once closed. Cancel-safe.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.source.next().await
    }
}

/// How a driver settles one delivery.
#[async_trait]
pub trait Acknowledger: Send + Sync {
    /// Done: the broker forgets the message.
    async fn ack(self: Box<Self>) -> Result<(), BrokerError>;
    /// Not done: deliver it again after `delay` (or dead-letter it past the limit).
    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), BrokerError>;
    /// Never deliverable: move it to the dead-letter topic with `reason`.
    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), BrokerError>;
}

/// One message handed to a consumer, to be settled exactly once.
///
/// A delivery dropped without being settled is delivered again.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// How many times it has been delivered, this time included (from 1).
    pub delivery_count: u32,
    acker: Box<dyn Acknowledger>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("delivery_count", &self.delivery_count)
            .finish()
    }
}

impl Delivery {
    /// A delivery settled through `acker`.
    pub fn new(message: Message, delivery_count: u32, acker: impl Acknowledger + 'static) -> Self {
        Self { message, delivery_count, acker: Box::new(acker) }
    }

    /// Done: the broker forgets it.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.acker.ack().await
    }

    /// Deliver again after `delay`.
    pub async fn nack(self, delay: Duration) -> Result<(), BrokerError> {
        self.acker.nack(delay).await
    }

    /// Move to the dead-letter topic.
    pub async fn dead_letter(self, reason: &str) -> Result<(), BrokerError> {
        self.acker.dead_letter(reason).await
    }
}
