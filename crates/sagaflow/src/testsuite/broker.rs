//! The [`Broker`] conformance suite: the semantics of `crate::broker` every driver keeps.
//!
//! Each check opens its own connections through the [`BrokerHarness`], uses
//! topics and groups no other check uses, subscribes before it publishes, and
//! closes its connections at the end. Close semantics are the engine's: it
//! stops polling its subscriptions, lets the handlers in flight settle their
//! deliveries, and only then calls [`Broker::close`], which ends every pending
//! [`Subscription::next`] and makes later publishes fail. A delivery still
//! unsettled when its connection closes is not settled by the suite.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::{Duration, Instant};

use super::{QUIET, unique_name, within};
use crate::broker::{
    Broker, BrokerError, DEAD_LETTER_REASON_HEADER, Delivery, Message, REQUEST_ID_HEADER, SubscribeOptions,
    Subscription, dead_letter_topic,
};

/// Opens connections to the broker under test.
#[async_trait]
pub trait BrokerHarness: Send + Sync + 'static {
    /// A fresh connection (a new Broker value) to the same server; called several times per check.
    async fn connect(&self) -> Arc<dyn Broker>;
}

async fn connect(harness: &dyn BrokerHarness) -> Arc<dyn Broker> {
    within("a connection from the harness", harness.connect()).await
}

async fn subscribe(broker: &dyn Broker, options: SubscribeOptions) -> Subscription {
    let what = format!("subscribing to `{}` in group `{}`", options.topic, options.group);
    match within(&what, broker.subscribe(options)).await {
        Ok(subscription) => subscription,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

async fn publish(broker: &dyn Broker, message: Message) {
    let what = format!("the publish of {:?} to `{}` to be confirmed", message.request_id(), message.topic);
    if let Err(e) = within(&what, broker.publish(message)).await {
        panic!("{what} failed: {e}");
    }
}

async fn next(subscription: &mut Subscription, what: &str) -> Delivery {
    match within(what, subscription.next()).await {
        Some(delivery) => delivery,
        None => panic!("the subscription ended while waiting for {what}"),
    }
}

/// Watches `subscription` for `window`; a delivery in it fails the check with `why`.
async fn nothing_within(subscription: &mut Subscription, window: Duration, why: &str) {
    if let Ok(got) = tokio::time::timeout(window, subscription.next()).await {
        panic!("{why}, but got {got:?} within {window:?}");
    }
}

async fn settle(what: &str, settling: impl Future<Output = Result<(), BrokerError>>) {
    if let Err(e) = within(what, settling).await {
        panic!("{what} failed: {e}");
    }
}

async fn close(brokers: &[&Arc<dyn Broker>]) {
    for broker in brokers {
        within("the broker to close", broker.close()).await;
    }
}

/// Message `index` of a check's run: the index is the payload, `{run}-{index}` the request id.
fn numbered(topic: &str, run: &str, index: usize) -> Message {
    Message::new(topic, index.to_string()).header(REQUEST_ID_HEADER, format!("{run}-{index}"))
}

fn index_of(delivery: &Delivery) -> usize {
    std::str::from_utf8(&delivery.message.payload)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a delivery this check did not publish: {delivery:?}"))
}

fn assert_is(delivery: &Delivery, expected: usize, count: u32, what: &str) {
    assert_eq!(index_of(delivery), expected, "{what}: got message {} instead", index_of(delivery));
    assert_eq!(delivery.delivery_count, count, "{what}: wrong delivery_count in {delivery:?}");
}

/// A message published with headers reaches a subscriber with its topic,
/// headers and payload bytes intact (binary and 64 KiB payloads), delivery count 1.
pub async fn round_trip(harness: &dyn BrokerHarness) {
    let broker = connect(harness).await;
    let topic = unique_name("conformance.round-trip");
    let mut subscription =
        subscribe(&*broker, SubscribeOptions::new(&topic, unique_name("group")).concurrency(2)).await;
    let request_id = unique_name("request");
    let binary: Vec<u8> = (0..=255u8).collect();
    let large: Vec<u8> = (0..64 * 1024usize).map(|i| (i * 7 % 251) as u8).collect();
    let sent = [
        Message::new(&topic, Bytes::from(binary))
            .header(REQUEST_ID_HEADER, &request_id)
            .header("x-conformance", "a value; with spaces=and signs"),
        Message::new(&topic, Bytes::from(large)).header(REQUEST_ID_HEADER, format!("{request_id}-large")),
    ];
    for message in &sent {
        publish(&*broker, message.clone()).await;
    }
    for message in sent {
        let delivery = next(&mut subscription, "a published message").await;
        let got = &delivery.message;
        assert_eq!(got.topic, topic, "topic changed");
        assert_eq!(got.request_id(), message.request_id(), "wrong message (or order) in {delivery:?}");
        for (name, value) in &message.headers {
            assert_eq!(got.headers.get(name), Some(value), "header `{name}` lost or changed in {delivery:?}");
        }
        assert!(got.payload == message.payload, "payload bytes changed in {delivery:?}");
        assert_eq!(delivery.delivery_count, 1, "first delivery must count 1");
        settle("an ack", delivery.ack()).await;
    }
    close(&[&broker]).await;
}

/// One consumer with concurrency 1 sees 50 messages of a topic in publish order.
pub async fn order_within_topic(harness: &dyn BrokerHarness) {
    const N: usize = 50;
    let broker = connect(harness).await;
    let topic = unique_name("conformance.order");
    let run = unique_name("m");
    let mut subscription = subscribe(&*broker, SubscribeOptions::new(&topic, unique_name("group"))).await;
    for i in 0..N {
        publish(&*broker, numbered(&topic, &run, i)).await;
    }
    for i in 0..N {
        let delivery = next(&mut subscription, &format!("message {i} of {N}")).await;
        assert_is(&delivery, i, 1, "messages must arrive in publish order");
        settle("an ack", delivery.ack()).await;
    }
    close(&[&broker]).await;
}

/// A nacked message comes back with delivery count 2; the others arrive once,
/// and nothing is left over afterwards.
pub async fn nack_redelivers(harness: &dyn BrokerHarness) {
    let broker = connect(harness).await;
    let topic = unique_name("conformance.nack");
    let run = unique_name("m");
    let mut subscription = subscribe(&*broker, SubscribeOptions::new(&topic, unique_name("group"))).await;
    for i in 0..3 {
        publish(&*broker, numbered(&topic, &run, i)).await;
    }
    let first = next(&mut subscription, "the first message").await;
    assert_is(&first, 0, 1, "the first delivery");
    settle("a nack", first.nack(Duration::ZERO)).await;
    let mut counts = BTreeMap::new();
    while counts.len() < 3 {
        let delivery = next(&mut subscription, "the nacked message and the others").await;
        let previous = counts.insert(index_of(&delivery), delivery.delivery_count);
        assert!(previous.is_none(), "message delivered twice without a nack: {delivery:?}");
        settle("an ack", delivery.ack()).await;
    }
    assert_eq!(counts, BTreeMap::from([(0, 2), (1, 1), (2, 1)]), "message -> delivery_count");
    publish(&*broker, numbered(&topic, &run, 3)).await;
    let sentinel = next(&mut subscription, "a message published after all were acked").await;
    assert_is(&sentinel, 3, 1, "acked messages must not come back");
    settle("an ack", sentinel.ack()).await;
    close(&[&broker]).await;
}

/// A delivery dropped unsettled, with its subscription and its whole
/// connection (a consumer that died mid-message), comes back to the next
/// consumer of the group with a delivery count of at least 2.
pub async fn abandoned_delivery_redelivers(harness: &dyn BrokerHarness) {
    let publisher = connect(harness).await;
    let consumer = connect(harness).await;
    let topic = unique_name("conformance.abandoned");
    let run = unique_name("m");
    let options = SubscribeOptions::new(&topic, unique_name("group"));
    let mut subscription = subscribe(&*consumer, options.clone()).await;
    publish(&*publisher, numbered(&topic, &run, 0)).await;
    let delivery = next(&mut subscription, "the message").await;
    assert_is(&delivery, 0, 1, "the first delivery");
    drop((delivery, subscription, consumer));

    let consumer = connect(harness).await;
    let mut subscription = subscribe(&*consumer, options).await;
    let again = next(&mut subscription, "the abandoned message to be delivered again").await;
    // At least 2: a broker may re-hand the message to the dying consumer before
    // it notices it gone, and that counts as a delivery too.
    assert_eq!(index_of(&again), 0, "the abandoned message: got message {} instead", index_of(&again));
    assert!(again.delivery_count >= 2, "the abandoned message must count its redelivery: {again:?}");
    settle("an ack", again.ack()).await;
    publish(&*publisher, numbered(&topic, &run, 1)).await;
    let sentinel = next(&mut subscription, "a message published after the redelivery was acked").await;
    assert_is(&sentinel, 1, 1, "an acked redelivery must not come back");
    settle("an ack", sentinel.ack()).await;
    close(&[&consumer, &publisher]).await;
}

/// A subscription with concurrency 3 holds at most 3 unsettled deliveries:
/// a 4th arrives only once one is acked; every message still arrives once.
pub async fn concurrency_limit(harness: &dyn BrokerHarness) {
    const N: usize = 10;
    let broker = connect(harness).await;
    let topic = unique_name("conformance.concurrency");
    let run = unique_name("m");
    let mut subscription =
        subscribe(&*broker, SubscribeOptions::new(&topic, unique_name("group")).concurrency(3)).await;
    for i in 0..N {
        publish(&*broker, numbered(&topic, &run, i)).await;
    }
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(next(&mut subscription, &format!("unsettled delivery {} of 3", i + 1)).await);
    }
    nothing_within(&mut subscription, QUIET, "3 deliveries are unsettled at concurrency 3, so a 4th must wait").await;
    let mut seen = Vec::new();
    let acked = held.remove(0);
    seen.push(index_of(&acked));
    settle("an ack", acked.ack()).await;
    held.push(next(&mut subscription, "a 4th delivery once one of 3 is acked").await);
    nothing_within(&mut subscription, QUIET, "3 deliveries are unsettled again, so a 5th must wait").await;
    for delivery in held {
        seen.push(index_of(&delivery));
        assert_eq!(delivery.delivery_count, 1, "a cancelled next() must not count as a delivery: {delivery:?}");
        settle("an ack", delivery.ack()).await;
    }
    while seen.len() < N {
        let delivery = next(&mut subscription, "the rest of the messages").await;
        seen.push(index_of(&delivery));
        assert_eq!(delivery.delivery_count, 1, "a cancelled next() must not count as a delivery: {delivery:?}");
        settle("an ack", delivery.ack()).await;
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..N).collect::<Vec<_>>(), "every message exactly once");
    close(&[&broker]).await;
}

/// Two consumers of one group (on two connections) share the messages, each
/// message going to one of them; another group gets every message too.
pub async fn competing_consumers_and_groups(harness: &dyn BrokerHarness) {
    const N: usize = 20;
    let publisher = connect(harness).await;
    let first = connect(harness).await;
    let second = connect(harness).await;
    let topic = unique_name("conformance.groups");
    let run = unique_name("m");
    let shared = SubscribeOptions::new(&topic, unique_name("shared"));
    let mut a = subscribe(&*first, shared.clone()).await;
    let mut b = subscribe(&*second, shared).await;
    let mut other = subscribe(&*second, SubscribeOptions::new(&topic, unique_name("other"))).await;
    for i in 0..N {
        publish(&*publisher, numbered(&topic, &run, i)).await;
    }

    // `a` holds its delivery unsettled (concurrency 1), so the group must hand the next one to `b`.
    let held_a = next(&mut a, "a delivery to the first consumer of the group").await;
    let held_b = next(&mut b, "a delivery to the second consumer while the first is busy").await;
    let mut shared_seen = vec![index_of(&held_a), index_of(&held_b)];
    settle("an ack", held_a.ack()).await;
    settle("an ack", held_b.ack()).await;
    while shared_seen.len() < N {
        let delivery = within("the rest of the messages in the shared group", async {
            tokio::select! {
                Some(d) = a.next() => d,
                Some(d) = b.next() => d,
                else => panic!("both subscriptions of the shared group ended"),
            }
        })
        .await;
        shared_seen.push(index_of(&delivery));
        settle("an ack", delivery.ack()).await;
    }
    shared_seen.sort_unstable();
    assert_eq!(shared_seen, (0..N).collect::<Vec<_>>(), "the shared group: every message to exactly one consumer");

    let mut other_seen = Vec::new();
    while other_seen.len() < N {
        let delivery = next(&mut other, "every message in the second group").await;
        other_seen.push(index_of(&delivery));
        settle("an ack", delivery.ack()).await;
    }
    other_seen.sort_unstable();
    assert_eq!(other_seen, (0..N).collect::<Vec<_>>(), "the second group: every message");
    close(&[&first, &second, &publisher]).await;
}

/// `dead_letter(reason)` moves a message to [`dead_letter_topic`] with the
/// reason in [`DEAD_LETTER_REASON_HEADER`]; a message nacked `max_deliveries`
/// (2) times lands there too, and is not delivered a third time.
pub async fn dead_letter(harness: &dyn BrokerHarness) {
    let broker = connect(harness).await;
    let topic = unique_name("conformance.dead-letter");
    let dead_topic = dead_letter_topic(&topic);
    let run = unique_name("m");
    let mut subscription =
        subscribe(&*broker, SubscribeOptions::new(&topic, unique_name("group")).max_deliveries(2)).await;
    let mut dead = subscribe(&*broker, SubscribeOptions::new(&dead_topic, unique_name("dead"))).await;

    let poison = numbered(&topic, &run, 0).header("x-conformance", "kept");
    publish(&*broker, poison.clone()).await;
    let delivery = next(&mut subscription, "the poison message").await;
    let reason = "conformance: not a message this consumer understands";
    settle("a dead_letter", delivery.dead_letter(reason)).await;
    let landed = next(&mut dead, "the poison message on the dead-letter topic").await;
    assert_eq!(landed.message.topic, dead_topic, "dead letters travel on the dead-letter topic");
    assert_eq!(landed.message.request_id(), poison.request_id(), "the request id header survives dead-lettering");
    assert_eq!(landed.message.headers.get("x-conformance").map(String::as_str), Some("kept"));
    assert_eq!(landed.message.headers.get(DEAD_LETTER_REASON_HEADER).map(String::as_str), Some(reason));
    assert!(landed.message.payload == poison.payload, "payload changed by dead-lettering");
    settle("an ack", landed.ack()).await;

    publish(&*broker, numbered(&topic, &run, 1)).await;
    for count in 1..=2 {
        let delivery = next(&mut subscription, &format!("delivery {count} of a message that keeps failing")).await;
        assert_is(&delivery, 1, count, "a message that keeps failing");
        settle("a nack", delivery.nack(Duration::from_millis(50))).await;
    }
    let landed = next(&mut dead, "the message nacked max_deliveries times on the dead-letter topic").await;
    assert_eq!(index_of(&landed), 1, "the message nacked max_deliveries times");
    assert_eq!(landed.message.request_id(), Some(format!("{run}-1").as_str()));
    let why = landed.message.headers.get(DEAD_LETTER_REASON_HEADER);
    assert!(why.is_some_and(|r| !r.is_empty()), "a dead letter says why: {landed:?}");
    settle("an ack", landed.ack()).await;

    publish(&*broker, numbered(&topic, &run, 2)).await;
    let sentinel = next(&mut subscription, "a message published after the dead-lettering").await;
    assert_is(&sentinel, 2, 1, "a dead-lettered message must not be delivered again");
    settle("an ack", sentinel.ack()).await;
    close(&[&broker]).await;
}

/// Graceful close as the engine does it: deliveries are acked after the
/// subscription stops being polled and while a `next()` is pending, and then
/// `close()` ends the pending `next()` (and every later one) with `None`.
pub async fn graceful_close(harness: &dyn BrokerHarness) {
    let broker = connect(harness).await;
    let topic = unique_name("conformance.close");
    let run = unique_name("m");
    let mut subscription = subscribe(&*broker, SubscribeOptions::new(&topic, unique_name("group"))).await;
    publish(&*broker, numbered(&topic, &run, 0)).await;
    let in_flight = next(&mut subscription, "the first message").await;
    // The consumer loop has stopped polling; the handler finishes and acks.
    settle("an ack while the subscription is not polled", in_flight.ack()).await;

    publish(&*broker, numbered(&topic, &run, 1)).await;
    let in_flight = next(&mut subscription, "the second message").await;
    assert_is(&in_flight, 1, 1, "an acked message must not come back");
    let mut pending = tokio::spawn(async move {
        let got = subscription.next().await;
        (subscription, got)
    });
    settle("an ack while a next() is pending", in_flight.ack()).await;
    if let Ok(early) = tokio::time::timeout(QUIET, &mut pending).await {
        let got = early.map(|(_, got)| got);
        panic!("next() returned {got:?} with nothing published and the broker open");
    }
    within("the broker to close", broker.close()).await;
    let (mut subscription, got) = match within("a pending next() to end after close()", pending).await {
        Ok(ended) => ended,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    assert!(got.is_none(), "a pending next() must end with None on close, got {got:?}");
    let after = within("next() after close()", subscription.next()).await;
    assert!(after.is_none(), "next() after close() must be None, got {after:?}");
}

/// After `close()`, publish and subscribe fail with an error; a publish is
/// never silently dropped.
pub async fn publish_after_close_fails(harness: &dyn BrokerHarness) {
    let broker = connect(harness).await;
    let topic = unique_name("conformance.closed");
    let run = unique_name("m");
    let options = SubscribeOptions::new(&topic, unique_name("group"));
    let subscription = subscribe(&*broker, options.clone()).await;
    publish(&*broker, numbered(&topic, &run, 0)).await;
    within("the broker to close", broker.close()).await;
    match within("a publish after close()", broker.publish(numbered(&topic, &run, 1))).await {
        Err(e) => println!("publish after close failed as it must: {e}"),
        Ok(()) => panic!("publish after close() reported success: the message would be lost"),
    }
    match within("a subscribe after close()", broker.subscribe(options)).await {
        Err(e) => println!("subscribe after close failed as it must: {e}"),
        Ok(_) => panic!("subscribe after close() succeeded"),
    }
    drop(subscription);
}

/// A message nacked with a 500 ms delay comes back, not before 500 ms since
/// the nack was asked for; the nack settles at once, so a message published
/// meanwhile is delivered first.
///
/// The delay is checked on the clock when the message arrives rather than with
/// a quiet window, so a starved test process (timers firing late together)
/// cannot fail a correct driver.
pub async fn nack_delay(harness: &dyn BrokerHarness) {
    let delay = Duration::from_millis(500);
    let broker = connect(harness).await;
    let topic = unique_name("conformance.nack-delay");
    let run = unique_name("m");
    let mut subscription = subscribe(&*broker, SubscribeOptions::new(&topic, unique_name("group"))).await;
    publish(&*broker, numbered(&topic, &run, 0)).await;
    let delivery = next(&mut subscription, "the message").await;
    let nacked_at = Instant::now();
    settle("a nack with a delay", delivery.nack(delay)).await;

    publish(&*broker, numbered(&topic, &run, 1)).await;
    let published_after = nacked_at.elapsed();
    let mut nacked_back = false;
    for _ in 0..2 {
        let delivery = next(&mut subscription, "the message published during the delay, and the nacked one").await;
        if index_of(&delivery) == 0 {
            let waited = nacked_at.elapsed();
            assert!(waited >= delay, "the nacked message came back after {waited:?}, before its {delay:?} delay");
            assert_eq!(delivery.delivery_count, 2, "the delayed message: {delivery:?}");
            nacked_back = true;
        } else {
            assert_is(&delivery, 1, 1, "the message published during the delay");
            // Only a publish confirmed after the delay ran out may lose the race to the nacked message.
            let blocked = nacked_back && published_after < delay;
            assert!(!blocked, "a delayed nack must settle at once, not hold the slot until the delay is over");
        }
        settle("an ack", delivery.ack()).await;
    }
    assert!(nacked_back, "the nacked message came back");
    close(&[&broker]).await;
}

/// The engine's hops over this broker for a flow with a parallel stage: each
/// branch travels as a hop of its own, two orchestrators consume them, and
/// every saga merges its branches once and continues once after the last.
pub async fn parallel_stage_hops(harness: &dyn BrokerHarness) {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::{Flow, MemorySagaLog, Node, NodeError, Options, Orchestrator, Parallel, SagaStatus, Step};

    /// Appends its name to the data, counting its calls.
    struct Mark(&'static str, Arc<AtomicUsize>);

    #[async_trait]
    impl Node<Vec<String>> for Mark {
        fn name(&self) -> &str {
            self.0
        }
        async fn action(&self, _: &Step, data: &mut Vec<String>) -> Result<(), NodeError> {
            self.1.fetch_add(1, Ordering::Relaxed);
            data.push(self.0.to_owned());
            Ok(())
        }
    }

    const SAGAS: usize = 10;
    let (branches, last) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let flow = || {
        let merge = |all: &mut Vec<String>, branch: Vec<String>| {
            for name in branch {
                if !all.contains(&name) {
                    all.push(name);
                }
            }
        };
        let stage = ["b", "c", "d"]
            .into_iter()
            .fold(Parallel::new(), |stage, name| stage.branch(Mark(name, branches.clone())))
            .merge(merge);
        Flow::new().node(Mark("a", Arc::default())).parallel(stage).node(Mark("e", last.clone()))
    };
    let options = Options { topic_prefix: unique_name("conformance-parallel"), ..Options::default() };
    let log = Arc::new(MemorySagaLog::new());
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let start = Orchestrator::builder(connect(harness).await, log.clone())
            .options(options.clone())
            .asynchronous("Parallel", flow())
            .start();
        replicas.push(within("an orchestrator starting", start).await.expect("an orchestrator starts"));
    }
    for n in 0..SAGAS {
        let id = format!("saga-{n}");
        let submit = replicas[n % 2].submit("Parallel", &id, Vec::<String>::new(), None);
        within("a saga's submit", submit).await.expect("the first hop is queued");
    }
    let records = within("every saga's end", async {
        loop {
            let mut ended = Vec::new();
            for n in 0..SAGAS {
                match replicas[0].saga(&format!("saga-{n}")).await.expect("the log answers") {
                    Some(record) if record.state.is_ended() => ended.push(record),
                    _ => break,
                }
            }
            if ended.len() == SAGAS {
                return ended;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for record in &records {
        assert_eq!(record.status(), SagaStatus::Completed, "{record:?}");
        assert_eq!(record.data, serde_json::json!(["a", "b", "c", "d", "e"]), "{}", record.request_id);
        let merges = record.history.iter().filter(|h| h.event == crate::saga::HistoryEvent::BranchesJoined).count();
        assert_eq!(merges, 1, "{}: one merge", record.request_id);
    }
    assert_eq!(last.load(Ordering::Relaxed), SAGAS, "the step after the stage ran once per saga");
    assert!(branches.load(Ordering::Relaxed) >= 3 * SAGAS, "every branch ran");
    for replica in replicas {
        within("an orchestrator's shutdown", replica.shutdown()).await;
    }
}
