//! sagaflow's [`Broker`](sagaflow::broker::Broker) over RabbitMQ, for orchestrators
//! whose saga hops must survive a restart of the orchestrator or of the broker.
//!
//! ```no_run
//! use std::sync::Arc;
//! use sagaflow::broker::{Broker, Message, SubscribeOptions};
//! use sagaflow_rabbitmq::{RabbitMqBroker, RabbitMqOptions};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let options = RabbitMqOptions::from_url("amqp://guest:guest@127.0.0.1:5672/%2f")?;
//! let broker = Arc::new(RabbitMqBroker::connect(options).await?);
//!
//! broker.publish(Message::new("orders", "{}").header("x-request-id", "req-1")).await?;
//! let mut subscription = broker.subscribe(SubscribeOptions::new("orders", "sagaflow")).await?;
//! if let Some(delivery) = subscription.next().await {
//!     delivery.ack().await?;
//! }
//! broker.close().await;
//! # Ok(()) }
//! ```
//!
//! # Topology
//!
//! - Every topic is published to the durable **direct exchange** `sagaflow`
//!   with the topic as routing key ([`RabbitMqOptions::exchange`] renames it).
//! - Each consumer group has its own durable **quorum queue** bound with that
//!   key, so every group gets every message and the consumers of one group
//!   compete: the queue is named by the topic for the default group
//!   (`sagaflow`, see [`RabbitMqOptions::default_group`]) and
//!   `<topic>@<group>` for any other.
//! - Publishes are *mandatory*: a message no queue is bound for comes back
//!   from the broker, the driver then declares the default group's queue and
//!   sends it again. So a message published before anyone subscribed waits
//!   there, and a topic nobody consumes with the default group costs no queue.
//! - The dead letters of a topic go to the topic
//!   [`dead_letter_topic`](sagaflow::broker::dead_letter_topic)`(topic)`, like
//!   any message: to its groups' queues, or to its default-group queue,
//!   declared with the first dead letter if none is bound. Topic queues also
//!   name it as their broker-side dead-letter route (`x-dead-letter-exchange`
//!   = the exchange, `x-dead-letter-routing-key` = the dead-letter topic), for
//!   messages the broker itself would drop under a delivery-limit policy.
//! - All declarations are idempotent and made again after every reconnection.
//!   Queues live until deleted, unless [`RabbitMqOptions::queue_expiry`] lets
//!   RabbitMQ drop unused ones (for tests and per-pod topics). Each quorum
//!   queue holds about three file handles on the server (RabbitMQ 3.10): a
//!   server left at `ulimit -n 1024` stops accepting connections at around
//!   300 queues.
//!
//! # Delivery guarantees
//!
//! - Messages are persistent (`delivery_mode` 2) and a publish returns only
//!   once the broker confirmed it. A broker nack (sent again until the
//!   publish timeout: a queue without a leader just after a restart nacks
//!   too), or a return of a message that still has no queue, is
//!   `BrokerError::NotConfirmed`.
//! - A subscription has its own channel with `basic.qos` prefetch =
//!   `concurrency` (set before `basic.consume`), and manual acks only; a
//!   delivery is settled on the channel that delivered it. If that channel
//!   died, settling it fails and the broker redelivers the message: that is
//!   the at-least-once contract.
//!
//! # Delivery counting, retries and dead letters
//!
//! [`Delivery::delivery_count`](sagaflow::broker::Delivery) is 1 on the first
//! delivery and grows on every redelivery. Classic queues cannot count
//! redeliveries, so topic queues are **quorum queues**, which put the number
//! of returns in `x-delivery-count` — including the returns RabbitMQ makes when
//! a consumer or its connection died mid-message.
//!
//! - `nack(0)`: `basic.nack` with requeue; the queue counts it.
//! - `nack(delay)`: the message is republished (confirmed) to the classic
//!   durable queue `delay~<queue>` with a per-message expiration of `delay`
//!   and a header `x-sagaflow-deliveries` holding its count so far, then the
//!   original is acked. On expiry RabbitMQ dead-letters it back to `<queue>`.
//!   Nothing waits in the orchestrator's memory, and the prefetch slot is
//!   freed during the delay. Expiry happens at the head of the delay queue,
//!   so a message waits for any longer-delayed one ahead of it; sagaflow uses
//!   one delay per topic, where this does not matter.
//! - A message at its `max_deliveries`th delivery that is nacked, or one
//!   that arrives past the limit (its consumers kept dying), is
//!   dead-lettered: republished (confirmed) to the dead-letter topic with the
//!   header `x-dead-letter-reason`, then acked. `Delivery::dead_letter` does
//!   the same with the caller's reason.
//! - A delivery dropped unsettled is nacked back at once.
//!
//! A failure between the confirmed republish and the ack leaves the message
//! twice; consumers already handle duplicates by request id.
//!
//! # Outages
//!
//! One connection per broker value, watched by a supervisor task that
//! reconnects with exponential backoff (100 ms doubling to 5 s, jittered), then
//! declares the exchange again; every subscription opens a new channel, declares
//! its queues and consumes again, so its `next()` keeps yielding. A publish
//! during an outage waits for the connection up to the publish timeout (10 s)
//! and then fails with `BrokerError::Unavailable`; a publish whose confirm was
//! lost with the connection is sent again on the new one (a possible
//! duplicate, never a loss).
//!
//! A peer that vanishes without closing its sockets is noticed through AMQP
//! heartbeats; set their interval in the URL (`?heartbeat=10`) to notice it sooner.
//!
//! [`Broker::close`](sagaflow::broker::Broker::close) stops the consumers at once
//! (pending `next()` calls return `None`) and closes the connection once the
//! deliveries already handed out are settled, or after the close timeout.

mod connection;
mod error;
mod options;
mod publish;
mod subscribe;

pub use connection::RabbitMqBroker;
pub use error::{Error, Result};
pub use options::{DEFAULT_EXCHANGE, DEFAULT_GROUP, DEFAULT_URL, RabbitMqOptions};
