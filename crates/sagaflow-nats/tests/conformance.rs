//! The broker conformance suite against the NATS JetStream server at `SAGAFLOW_NATS_URL`
//! (default `nats://127.0.0.1:4222`), then what this driver adds to it: purging consumed
//! messages, dead-lettering an abandoned last delivery, deduplicating by message id.
//!
//! Streams are named with the prefix `SFTEST`: each check deletes the streams it used when it
//! ends, and every harness also sweeps `SFTEST` streams older than an hour that a killed run
//! left behind, so the shared server does not fill up.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use sagaflow::broker::Broker;
use sagaflow::broker::{
    BrokerError, DEAD_LETTER_REASON_HEADER, Delivery, Message, REQUEST_ID_HEADER, SubscribeOptions, Subscription,
    dead_letter_topic,
};
use sagaflow::testsuite::{BrokerHarness, WAIT, skip_or_fail, unique_name};
use sagaflow_nats::{MESSAGE_ID_HEADER, NatsBroker, NatsOptions};
use tokio::time::Instant;

const STREAM_PREFIX: &str = "SFTEST";

fn url() -> String {
    std::env::var("SAGAFLOW_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// `ack_wait` is shortened from its 30 s default to well within the suite's `WAIT`: a check
/// that drops a delivery together with its connection (`abandoned_delivery_redelivers`) relies
/// on the driver's nack of the abandoned delivery, which may not leave before the connection
/// closes; the server's own redelivery after `ack_wait` must then come in time. It failed once
/// in about ten CI runs with the default.
fn options() -> NatsOptions {
    NatsOptions::new(url())
        .and_then(|o| o.stream_prefix(STREAM_PREFIX))
        .and_then(|o| o.subject_prefix("sagaflow-test"))
        .and_then(|o| o.ack_wait(Duration::from_secs(5)))
        .expect("valid test options")
}

/// Opens connections to the shared server and remembers every topic its brokers touch.
struct Harness {
    options: NatsOptions,
    topics: Arc<Mutex<BTreeSet<String>>>,
}

impl Harness {
    /// A broker whose topics are deleted when the harness is dropped.
    async fn broker(&self) -> Recording {
        let broker = NatsBroker::connect(self.options.clone()).await.expect("connecting to NATS again");
        Recording { broker, topics: self.topics.clone() }
    }
}

#[sagaflow::async_trait]
impl BrokerHarness for Harness {
    async fn connect(&self) -> Arc<dyn Broker> {
        Arc::new(self.broker().await)
    }
}

impl Drop for Harness {
    /// Deletes the streams of the check's topics (their dead-letter topics included).
    fn drop(&mut self) {
        let topics = std::mem::take(&mut *self.topics.lock().unwrap_or_else(|e| e.into_inner()));
        if topics.is_empty() {
            return;
        }
        // Drop cannot await; a helper thread with its own runtime does the deleting.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                let Ok(broker) = NatsBroker::connect(options()).await else { return };
                for topic in &topics {
                    if let Err(e) = broker.delete_topic(topic).await {
                        eprintln!("cleanup: deleting the stream of `{topic}` failed: {e}");
                    }
                }
                broker.close().await;
            });
        });
        let _ = cleanup.join();
    }
}

/// A [`NatsBroker`] that records the topics it publishes to and subscribes to.
struct Recording {
    broker: NatsBroker,
    topics: Arc<Mutex<BTreeSet<String>>>,
}

impl Recording {
    fn record(&self, topic: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        topics.insert(topic.to_string());
        topics.insert(dead_letter_topic(topic));
    }
}

#[sagaflow::async_trait]
impl Broker for Recording {
    async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        self.record(&message.topic);
        self.broker.publish(message).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BrokerError> {
        self.record(&options.topic);
        self.broker.subscribe(options).await
    }

    async fn close(&self) {
        self.broker.close().await;
    }

    fn name(&self) -> &'static str {
        self.broker.name()
    }
}

/// Deletes `SFTEST` streams created more than an hour ago (left by a killed run).
async fn sweep_stale_streams() {
    let Ok(client) = async_nats::connect(url()).await else { return };
    let jetstream = async_nats::jetstream::new(client);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let mut names = jetstream.stream_names();
    let mut stale = Vec::new();
    while let Some(Ok(name)) = names.next().await {
        if !name.starts_with(&format!("{STREAM_PREFIX}_")) {
            continue;
        }
        if let Ok(mut stream) = jetstream.get_stream(&name).await
            && let Ok(info) = stream.info().await
            && now - info.created.unix_timestamp() > Duration::from_secs(3600).as_secs() as i64
        {
            stale.push(name);
        }
    }
    for name in stale {
        let _ = jetstream.delete_stream(&name).await;
    }
}

async fn harness() -> Option<Harness> {
    match NatsBroker::connect(options()).await {
        Ok(probe) => {
            probe.close().await;
            sweep_stale_streams().await;
            Some(Harness { options: options(), topics: Arc::default() })
        }
        Err(e) => skip_or_fail(&format!("NATS JetStream at {}", options().redacted_url()), e),
    }
}

sagaflow::broker_conformance_tests!(harness());

fn numbered(topic: &str, index: usize) -> Message {
    Message::new(topic, index.to_string()).header(REQUEST_ID_HEADER, format!("m-{index}"))
}

async fn next(subscription: &mut Subscription, what: &str) -> Delivery {
    match tokio::time::timeout(WAIT, subscription.next()).await {
        Ok(Some(delivery)) => delivery,
        Ok(None) => panic!("the subscription ended while waiting for {what}"),
        Err(_) => panic!("no delivery within {WAIT:?} while waiting for {what}"),
    }
}

async fn stored_messages(broker: &NatsBroker, topic: &str) -> u64 {
    let client = async_nats::connect(url()).await.expect("a NATS connection");
    let mut stream =
        async_nats::jetstream::new(client).get_stream(broker.stream_name(topic)).await.expect("the stream");
    stream.info().await.expect("stream info").state.messages
}

/// Messages every group has acked are purged from the stream, and only those: the purge
/// follows the slowest group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_messages_are_purged_after_the_slowest_group() {
    let Some(mut harness) = harness().await else { return };
    harness.options = options().purge_interval(Duration::from_millis(200));
    let broker = harness.broker().await;
    let topic = unique_name("nats.purge");
    let mut fast = broker.subscribe(SubscribeOptions::new(&topic, "fast").concurrency(4)).await.unwrap();
    let mut slow = broker.subscribe(SubscribeOptions::new(&topic, "slow")).await.unwrap();
    for i in 0..4 {
        broker.publish(numbered(&topic, i)).await.unwrap();
    }
    for i in 0..4 {
        next(&mut fast, &format!("message {i} in the fast group")).await.ack().await.unwrap();
    }
    for i in 0..2 {
        next(&mut slow, &format!("message {i} in the slow group")).await.ack().await.unwrap();
    }
    // The slow group has acked 2 of 4: the purge may remove those 2 and must keep the others.
    wait_for_stored(&broker.broker, &topic, 2).await;
    for i in 2..4 {
        next(&mut slow, &format!("message {i} in the slow group")).await.ack().await.unwrap();
    }
    wait_for_stored(&broker.broker, &topic, 0).await;
    broker.close().await;
}

/// Polls until the stream of `topic` holds exactly `expected` messages.
async fn wait_for_stored(broker: &NatsBroker, topic: &str, expected: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let stored = stored_messages(broker, topic).await;
        if stored == expected {
            return;
        }
        assert!(Instant::now() < deadline, "the stream still holds {stored} messages, not {expected}, after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A consumer that dies holding the last allowed delivery: the message is dead-lettered
/// (JetStream alone would just stop delivering it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_last_delivery_is_dead_lettered() {
    let Some(harness) = harness().await else { return };
    let broker = harness.broker().await;
    let topic = unique_name("nats.last-delivery");
    let mut subscription = broker.subscribe(SubscribeOptions::new(&topic, "workers").max_deliveries(1)).await.unwrap();
    let mut dead = broker.subscribe(SubscribeOptions::new(dead_letter_topic(&topic), "ops")).await.unwrap();
    broker.publish(numbered(&topic, 0)).await.unwrap();
    let delivery = next(&mut subscription, "the only allowed delivery").await;
    assert_eq!(delivery.delivery_count, 1);
    drop(delivery);
    let landed = next(&mut dead, "the abandoned message on the dead-letter topic").await;
    assert_eq!(landed.message.payload, numbered(&topic, 0).payload);
    assert_eq!(landed.message.request_id(), Some("m-0"));
    let reason = landed.message.headers.get(DEAD_LETTER_REASON_HEADER).cloned().unwrap_or_default();
    assert!(reason.contains("delivery limit"), "reason: {reason:?}");
    landed.ack().await.unwrap();
    broker.publish(numbered(&topic, 1)).await.unwrap();
    let sentinel = next(&mut subscription, "a later message").await;
    assert_eq!(sentinel.message, numbered(&topic, 1), "the dead-lettered message must not come back");
    sentinel.ack().await.unwrap();
    broker.close().await;
}

/// A message re-published with the same `x-message-id` (a hop retried after a crash) is
/// stored once; the id header reaches the consumer, the driver's `Nats-Msg-Id` does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republished_message_id_is_deduplicated() {
    let Some(harness) = harness().await else { return };
    let broker = harness.broker().await;
    let topic = unique_name("nats.dedup");
    let mut subscription = broker.subscribe(SubscribeOptions::new(&topic, "workers")).await.unwrap();
    let id = unique_name("request-step-action");
    let hop = numbered(&topic, 0).header(MESSAGE_ID_HEADER, &id);
    broker.publish(hop.clone()).await.unwrap();
    broker.publish(hop.clone()).await.unwrap();
    broker.publish(numbered(&topic, 1)).await.unwrap();
    let first = next(&mut subscription, "the hop").await;
    assert_eq!(first.message, hop, "delivered exactly as published, without transport headers");
    first.ack().await.unwrap();
    let second = next(&mut subscription, "the message after the hop").await;
    assert_eq!(second.message, numbered(&topic, 1), "the re-published hop must have been dropped");
    second.ack().await.unwrap();
    broker.close().await;
}

/// Topics that are not literal NATS subjects are refused up front, never half-published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topics_are_refused() {
    let Some(harness) = harness().await else { return };
    let broker = harness.broker().await;
    for topic in ["", "a..b", "a.*", "a.>", "has space"] {
        let published = broker.publish(Message::new(topic, "x")).await;
        assert!(matches!(published, Err(BrokerError::Invalid(_))), "publish to {topic:?}: {published:?}");
        let subscribed = broker.subscribe(SubscribeOptions::new(topic, "g")).await;
        assert!(matches!(subscribed, Err(BrokerError::Invalid(_))), "subscribe to {topic:?}");
    }
    broker.close().await;
}

/// A delivery held longer than `ack_wait` is kept alive by progress acks, not redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_delivery_outlives_ack_wait() {
    let Some(mut harness) = harness().await else { return };
    let ack_wait = Duration::from_secs(1);
    harness.options = options().ack_wait(ack_wait).expect("a valid ack_wait");
    let broker = harness.broker().await;
    let topic = unique_name("nats.progress");
    let mut subscription = broker.subscribe(SubscribeOptions::new(&topic, "workers").concurrency(2)).await.unwrap();
    broker.publish(numbered(&topic, 0)).await.unwrap();
    let held = next(&mut subscription, "the message").await;
    let window = ack_wait * 3;
    if let Ok(again) = tokio::time::timeout(window, subscription.next()).await {
        panic!("a delivery held for {window:?} with ack_wait {ack_wait:?} came back: {again:?}");
    }
    held.ack().await.expect("an ack after holding past ack_wait");
    broker.publish(numbered(&topic, 1)).await.unwrap();
    let sentinel = next(&mut subscription, "a later message").await;
    assert_eq!(sentinel.message, numbered(&topic, 1), "the held message must not come back after its ack");
    sentinel.ack().await.unwrap();
    broker.close().await;
}

/// Subscribing again with other settings updates the group's durable consumer on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_settings_update_the_consumer() {
    let Some(harness) = harness().await else { return };
    let broker = harness.broker().await;
    let topic = unique_name("nats.update");
    let first = broker.subscribe(SubscribeOptions::new(&topic, "workers").max_deliveries(5)).await.unwrap();
    drop(first);
    let _second = broker.subscribe(SubscribeOptions::new(&topic, "workers").max_deliveries(2)).await.unwrap();
    let client = async_nats::connect(url()).await.expect("a NATS connection");
    let stream =
        async_nats::jetstream::new(client).get_stream(broker.broker.stream_name(&topic)).await.expect("the stream");
    let consumers: Vec<_> = stream.consumers().collect().await;
    assert_eq!(consumers.len(), 1, "one durable consumer per group: {consumers:?}");
    let info = consumers.into_iter().next().and_then(Result::ok).expect("consumer info");
    assert_eq!(info.config.max_deliver, 3, "max_deliveries 2 plus the driver's dead-lettering delivery");
    broker.close().await;
}
