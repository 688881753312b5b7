//! The broker conformance suite against the RabbitMQ server at
//! `SAGAFLOW_RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).

use std::sync::Arc;
use std::time::Duration;

use sagaflow::broker::Broker;
use sagaflow::testsuite::{BrokerHarness, skip_or_fail};
use sagaflow_rabbitmq::{DEFAULT_URL, RabbitMqBroker, RabbitMqOptions};

/// Connects to one server; checks use unique topic names, so they share it.
struct Harness {
    options: RabbitMqOptions,
}

#[sagaflow::async_trait]
impl BrokerHarness for Harness {
    async fn connect(&self) -> Arc<dyn Broker> {
        match RabbitMqBroker::connect(self.options.clone()).await {
            Ok(broker) => Arc::new(broker),
            Err(e) => panic!("RabbitMQ answered the harness but not a check: {e}"),
        }
    }
}

async fn harness() -> Option<Harness> {
    let url = std::env::var("SAGAFLOW_RABBITMQ_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let options = match RabbitMqOptions::from_url(&url) {
        Ok(options) => options,
        Err(e) => panic!("SAGAFLOW_RABBITMQ_URL: {e}"),
    };
    // Checks leave their uniquely named queues behind, and every quorum queue
    // holds file handles on the shared server: let it drop them soon after use.
    let options = options.connect_timeout(Duration::from_secs(3)).queue_expiry(Some(Duration::from_secs(30)));
    match RabbitMqBroker::connect(options.clone()).await {
        Ok(probe) => {
            probe.close().await;
            Some(Harness { options: options.connect_timeout(Duration::from_secs(10)) })
        }
        Err(e) => skip_or_fail(&format!("RabbitMQ at {}", options.redacted_url()), e),
    }
}

sagaflow::broker_conformance_tests!(harness());

// ------------------------------------------------------------ RabbitMQ specifics

mod rabbitmq {
    use std::time::Duration;

    use sagaflow::broker::{
        Broker, DEAD_LETTER_REASON_HEADER, Delivery, Message, REQUEST_ID_HEADER, SubscribeOptions, Subscription,
        dead_letter_topic,
    };
    use sagaflow::testsuite::{WAIT, unique_name};
    use sagaflow_rabbitmq::{DEFAULT_GROUP, RabbitMqBroker};

    async fn connect() -> Option<RabbitMqBroker> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let harness = super::harness().await?;
        Some(RabbitMqBroker::connect(harness.options).await.expect("the server answered the harness"))
    }

    async fn next(subscription: &mut Subscription, what: &str) -> Delivery {
        match tokio::time::timeout(WAIT, subscription.next()).await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => panic!("the subscription ended while waiting for {what}"),
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }

    /// A message published to a topic nobody subscribed to yet waits in the
    /// default group's queue for its first subscriber.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_published_before_any_subscriber_waits_for_the_default_group() {
        let Some(broker) = connect().await else { return };
        let topic = unique_name("rabbitmq.early");
        let request_id = unique_name("request");
        broker.publish(Message::new(&topic, "early").header(REQUEST_ID_HEADER, &request_id)).await.expect("publish");
        let mut subscription =
            broker.subscribe(SubscribeOptions::new(&topic, DEFAULT_GROUP)).await.expect("subscribe after publishing");
        let delivery = next(&mut subscription, "the message published before subscribing").await;
        assert_eq!(delivery.message.request_id(), Some(request_id.as_str()));
        assert_eq!(delivery.delivery_count, 1);
        delivery.ack().await.expect("ack");
        broker.close().await;
    }

    /// A publish the broker refuses (its queue is full and rejects) is
    /// `NotConfirmed` once the publish timeout has passed, never a success.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_the_broker_refuses_is_not_confirmed() {
        use lapin::options::{QueueBindOptions, QueueDeclareOptions};
        use lapin::types::{AMQPValue, FieldTable};

        let Some(harness) = super::harness().await else { return };
        let topic = unique_name("rabbitmq.refused");
        // A queue of our own making in the topic's place: holds nothing, refuses the rest.
        let url = std::env::var("SAGAFLOW_RABBITMQ_URL").unwrap_or_else(|_| sagaflow_rabbitmq::DEFAULT_URL.into());
        let connection =
            lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.expect("connect");
        let channel = connection.create_channel().await.expect("a channel");
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        args.insert("x-expires".into(), AMQPValue::LongLongInt(30_000));
        channel.queue_declare(topic.as_str().into(), QueueDeclareOptions::default(), args).await.expect("declare");
        let broker = RabbitMqBroker::connect(harness.options.publish_timeout(Duration::from_secs(1)))
            .await
            .expect("the server answered the harness");
        channel
            .queue_bind(
                topic.as_str().into(),
                sagaflow_rabbitmq::DEFAULT_EXCHANGE.into(),
                topic.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");

        let started = std::time::Instant::now();
        let refused = broker.publish(Message::new(&topic, "refused")).await;
        assert!(matches!(refused, Err(sagaflow::broker::BrokerError::NotConfirmed { .. })), "{refused:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        broker.close().await;
        let _ = connection.close(200, "done".into()).await;
    }

    /// A consumer that dies mid-message (its connection closes, nothing is
    /// settled) counts as a delivery; past `max_deliveries` such deaths the
    /// message is dead-lettered instead of being handed out again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn consumers_dying_mid_message_count_until_the_message_is_dead_lettered() {
        let Some(publisher) = connect().await else { return };
        let topic = unique_name("rabbitmq.crashing");
        let options = SubscribeOptions::new(&topic, unique_name("group")).max_deliveries(2);
        let mut dead = publisher
            .subscribe(SubscribeOptions::new(dead_letter_topic(&topic), unique_name("dead")))
            .await
            .expect("subscribe to the dead letters");
        for count in 1..=2 {
            let consumer = connect().await.expect("a consumer connection");
            let mut subscription = consumer.subscribe(options.clone()).await.expect("subscribe");
            if count == 1 {
                publisher.publish(Message::new(&topic, "poison")).await.expect("publish");
            }
            let delivery = next(&mut subscription, &format!("delivery {count}")).await;
            assert_eq!(delivery.delivery_count, count, "{delivery:?}");
            // Die without settling: no nack, the broker only sees the connection go.
            std::mem::forget(delivery);
            drop((subscription, consumer));
        }
        let consumer = connect().await.expect("a consumer connection");
        let mut subscription = consumer.subscribe(options).await.expect("subscribe");

        let landed = next(&mut dead, "the message on the dead-letter topic").await;
        assert_eq!(&landed.message.payload[..], b"poison");
        let reason = landed.message.headers.get(DEAD_LETTER_REASON_HEADER).cloned().unwrap_or_default();
        assert!(reason.contains("delivery limit"), "{reason}");
        landed.ack().await.expect("ack the dead letter");
        if let Ok(got) = tokio::time::timeout(Duration::from_millis(500), subscription.next()).await {
            panic!("a dead-lettered message must not be delivered again, got {got:?}");
        }
        consumer.close().await;
        publisher.close().await;
    }
}
