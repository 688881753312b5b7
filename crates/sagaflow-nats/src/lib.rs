//! Broker over NATS JetStream (async-nats): file-backed streams, durable consumers, deduplicated publishes.
