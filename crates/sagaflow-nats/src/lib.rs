//! A [`sagaflow::broker::Broker`] over NATS JetStream, for running sagaflow's asynchronous and
//! throttling flows on a NATS server or cluster instead of in memory.
//!
//! Every topic is a JetStream stream on disk, every consumer group a durable pull consumer
//! with explicit acks, so messages survive restarts of the server and of the orchestrator;
//! publishes return once JetStream has stored the message, and a publish retried after a
//! crash is dropped as a duplicate when it carries the same `x-message-id` (or
//! `Nats-Msg-Id`) header. Works with nats-server 2.9 and later.
//!
//! ```no_run
//! use sagaflow::broker::Broker;
//! use sagaflow::broker::{Message, SubscribeOptions};
//! use sagaflow_nats::{NatsBroker, NatsOptions};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = NatsBroker::connect(NatsOptions::new("nats://127.0.0.1:4222")?).await?;
//! let mut orders = broker.subscribe(SubscribeOptions::new("booking.CreateOrder", "orchestrator")).await?;
//! broker.publish(Message::new("booking.CreateOrder", r#"{"product":7}"#)).await?;
//! if let Some(delivery) = orders.next().await {
//!     println!("{:?}", delivery.message);
//!     delivery.ack().await?;
//! }
//! broker.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! Layout on the server (see [`NatsBroker`] and [`NatsOptions`]): one stream per topic named
//! `SAGAFLOW_<topic>_<hash>` on subject `sagaflow.<topic>`, one durable consumer per group.
//! Dead letters go to the topic [`sagaflow::broker::dead_letter_topic`], a stream like any other.

mod connection;
mod error;
mod options;
mod publish;
mod subscribe;

pub use connection::NatsBroker;
pub use error::{Error, Result};
pub use options::NatsOptions;
pub use publish::{MESSAGE_ID_HEADER, NATS_MSG_ID_HEADER};
