//! Consuming: one channel per subscription, prefetch = concurrency, manual
//! acks on the delivering channel, and a fresh consumer after every reconnection.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use sagaflow::broker::{
    Acknowledger, BrokerError, DEAD_LETTER_REASON_HEADER, Delivery, Message, SubscribeOptions, Subscription,
    SubscriptionSource, dead_letter_topic,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::connection::{
    Backoff, Connector, Live, MAX_QUEUE_NAME, Unsettled, UnsettledGuard, declare_topic_queue, queue_name, set_prefetch,
};
use crate::error::{broker_error, is_connection_error};
use crate::publish::{self, DELIVERIES_HEADER, count_header, to_message, validate_topic};

/// The quorum queue header counting how often a message was returned unacked.
const QUORUM_DELIVERY_COUNT: &str = "x-delivery-count";
/// The longest wait for the broker to confirm a consumer cancel on close.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(1);

/// What a subscription consumes, fixed for its lifetime.
struct Spec {
    options: SubscribeOptions,
    queue: String,
    prefetch: u16,
}

/// Starts consuming `options.topic` for `options.group`.
pub(crate) async fn subscribe(
    connector: &Arc<Connector>,
    options: SubscribeOptions,
) -> Result<Subscription, BrokerError> {
    validate_topic(&options.topic)?;
    if options.concurrency == 0 || options.max_deliveries == 0 {
        return Err(BrokerError::Invalid(format!(
            "subscription to `{}` needs concurrency and max_deliveries above zero",
            options.topic
        )));
    }
    let queue = queue_name(&options.topic, &options.group, &connector.options.default_group);
    if queue.len() > MAX_QUEUE_NAME {
        return Err(BrokerError::Invalid(format!("queue name `{queue}` is longer than {MAX_QUEUE_NAME} bytes")));
    }
    // RabbitMQ's prefetch is 16 bits; past it the limit is the broker's.
    let prefetch = u16::try_from(options.concurrency).unwrap_or(u16::MAX);
    let spec = Arc::new(Spec { options, queue, prefetch });
    let deadline = Instant::now() + connector.options.connect_timeout;
    let first = loop {
        let live = connector.live(Some(deadline)).await?;
        match open(&live, &spec, connector).await {
            Ok(open) => break open,
            Err(e) if is_connection_error(&e) && Instant::now() < deadline => {
                connector.report_broken(&live, &e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(broker_error(&format!("subscribing to `{}`", spec.options.topic), &e)),
        }
    };
    let (tx, rx) = mpsc::channel(usize::from(spec.prefetch.max(1)));
    let (abandon, abandoned) = mpsc::unbounded_channel();
    let stop = connector.closing.child_token();
    let feed = Feed { connector: connector.clone(), spec, tx, abandon, stop: stop.clone() };
    tokio::spawn(feed.run(first, abandoned));
    Ok(Subscription::new(Source { rx, stop }))
}

/// A consumer and the channel it lives on.
struct Open {
    channel: Channel,
    consumer: Consumer,
}

/// Opens a channel, sets the prefetch, declares the queues and starts consuming.
async fn open(live: &Live, spec: &Spec, connector: &Connector) -> lapin::Result<Open> {
    let channel = live.connection.create_channel().await?;
    // Before basic.consume, or the first deliveries arrive unbounded.
    set_prefetch(&channel, spec.prefetch).await?;
    declare_topic_queue(&channel, &connector.options, &spec.options.topic, &spec.queue).await?;
    let consumer = channel
        .basic_consume(spec.queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    Ok(Open { channel, consumer })
}

/// The consumer task's side of a subscription.
struct Feed {
    connector: Arc<Connector>,
    spec: Arc<Spec>,
    tx: mpsc::Sender<Incoming>,
    /// Where dropped unsettled deliveries are sent to be handed back.
    abandon: mpsc::UnboundedSender<lapin::Acker>,
    stop: CancellationToken,
}

impl Feed {
    /// Feeds the subscription until it is dropped or the broker closed,
    /// resubscribing whenever the channel dies.
    async fn run(self, mut current: Open, mut abandoned: mpsc::UnboundedReceiver<lapin::Acker>) {
        let topic = self.spec.options.topic.as_str();
        let queue = self.spec.queue.as_str();
        let connector = &self.connector;
        loop {
            let Some(reason) = self.consume(&mut current, &mut abandoned).await else {
                // Stopped: no more deliveries. Those handed out hold the channel,
                // so they can still be settled; abandoned ones go back when it closes.
                let cancel = current.channel.basic_cancel(current.consumer.tag(), BasicCancelOptions::default());
                let _ = tokio::time::timeout(CANCEL_TIMEOUT, cancel).await;
                return;
            };
            tracing::warn!(%topic, %queue, %reason, "consumer lost its channel; resubscribing");
            let mut backoff = Backoff::new(connector.options.reconnect_min, connector.options.reconnect_max);
            current = loop {
                let reopened = tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = self.tx.closed() => return,
                    reopened = reopen(connector, &self.spec) => reopened,
                };
                match reopened {
                    Ok(open) => {
                        tracing::info!(%topic, %queue, "resubscribed");
                        break open;
                    }
                    Err(BrokerError::Closed) => return,
                    Err(error) => {
                        tracing::warn!(%topic, %queue, %error, "resubscribing failed; retrying");
                        tokio::select! {
                            _ = self.stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff.next()) => {}
                        }
                    }
                }
            };
        }
    }

    /// Hands deliveries to the subscription until stopped (`None`) or the
    /// channel dies (`Some(reason)`).
    async fn consume(
        &self,
        current: &mut Open,
        abandoned: &mut mpsc::UnboundedReceiver<lapin::Acker>,
    ) -> Option<String> {
        let spec = &self.spec;
        loop {
            let item = tokio::select! {
                // Stopping wins over handing back: a message handed back now
                // could be redelivered to this consumer just before it goes,
                // and be counted twice.
                biased;
                _ = self.stop.cancelled() => return None,
                _ = self.tx.closed() => return None,
                Some(acker) = abandoned.recv() => {
                    // The quorum queue counts the return as a delivery.
                    if let Err(error) = acker.nack(BasicNackOptions { requeue: true, multiple: false }).await {
                        tracing::debug!(%error, "could not hand back an abandoned delivery; the broker will redeliver it");
                    }
                    continue;
                }
                item = current.consumer.next() => item,
            };
            let delivery = match item {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return Some(error.to_string()),
                None => return Some("the broker cancelled the consumer".into()),
            };
            let count = delivery_count(&delivery.properties, delivery.redelivered);
            let message = to_message(&spec.options.topic, &delivery.properties, delivery.data);
            let acker = RabbitMqAcker {
                acker: delivery.acker,
                _channel: current.channel.clone(),
                connector: self.connector.clone(),
                spec: spec.clone(),
                abandon: self.abandon.clone(),
                message: message.clone(),
                count,
                settled: false,
                _unsettled: Unsettled::track(&self.connector),
            };
            if count > spec.options.max_deliveries {
                // Back past its limit: its consumers kept dying mid-message. Never hand it out again.
                let reason = format!("delivery limit reached ({} deliveries)", count - 1);
                if let Err(error) = Box::new(acker).dead_letter(&reason).await {
                    tracing::warn!(topic = %spec.options.topic, %error, "could not dead-letter a message past its delivery limit");
                }
                continue;
            }
            let incoming = Incoming { message, count, acker };
            tokio::select! {
                // Dropping the unsent delivery hands it back to the broker.
                _ = self.stop.cancelled() => return None,
                sent = self.tx.send(incoming) => if sent.is_err() { return None },
            }
        }
    }
}

async fn reopen(connector: &Connector, spec: &Spec) -> Result<Open, BrokerError> {
    let live = connector.live(None).await?;
    open(&live, spec, connector).await.map_err(|e| {
        if is_connection_error(&e) {
            connector.report_broken(&live, &e);
        }
        broker_error(&format!("subscribing to `{}`", spec.options.topic), &e)
    })
}

/// How many times this message has been delivered, this time included.
///
/// Deliveries before it was last parked in a delay queue travel in
/// [`DELIVERIES_HEADER`]; returns since then are counted by the quorum queue
/// in `x-delivery-count`. A broker that marks it redelivered without a count
/// still gets counted once.
fn delivery_count(properties: &lapin::BasicProperties, redelivered: bool) -> u32 {
    let before = count_header(properties, DELIVERIES_HEADER).unwrap_or(0);
    let returns = match count_header(properties, QUORUM_DELIVERY_COUNT) {
        Some(n) => n,
        None if redelivered => 1,
        None => 0,
    };
    before.saturating_add(returns).saturating_add(1)
}

/// A delivery on its way from the consumer task to the subscription.
struct Incoming {
    message: Message,
    count: u32,
    acker: RabbitMqAcker,
}

/// The subscription side: deliveries from the consumer task.
struct Source {
    rx: mpsc::Receiver<Incoming>,
    stop: CancellationToken,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[async_trait]
impl SubscriptionSource for Source {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            // Both branches are cancel-safe: a cancelled call loses nothing.
            let incoming = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                incoming = self.rx.recv() => incoming?,
            };
            if !incoming.acker.acker.usable() {
                // Its channel died while it waited here: the broker has already
                // requeued it, and it could not be acked anyway.
                continue;
            }
            return Some(Delivery::new(incoming.message, incoming.count, incoming.acker));
        }
    }
}

/// Settles one delivery on the channel that delivered it.
struct RabbitMqAcker {
    acker: lapin::Acker,
    /// Keeps the delivering channel open until this delivery is settled.
    _channel: Channel,
    connector: Arc<Connector>,
    spec: Arc<Spec>,
    abandon: mpsc::UnboundedSender<lapin::Acker>,
    message: Message,
    count: u32,
    settled: bool,
    _unsettled: UnsettledGuard,
}

impl RabbitMqAcker {
    fn channel_gone(&self) -> BrokerError {
        BrokerError::unavailable_msg(format!(
            "the channel that delivered this `{}` message is closed; the broker will redeliver it",
            self.spec.options.topic
        ))
    }

    async fn ack_now(&mut self) -> Result<(), BrokerError> {
        self.settled = true;
        if !self.acker.usable() {
            return Err(self.channel_gone());
        }
        self.settle(self.acker.ack(BasicAckOptions::default())).await
    }

    /// Waits for an ack or nack, at most [`SETTLE_TIMEOUT`].
    async fn settle(&self, settling: impl Future<Output = lapin::Result<bool>>) -> Result<(), BrokerError> {
        match tokio::time::timeout(SETTLE_TIMEOUT, settling).await {
            // `false`: the acker was poisoned, its channel closed.
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) | Err(_) => Err(self.channel_gone()),
            Ok(Err(error)) => Err(broker_error("settling a delivery", &error)),
        }
    }
}

/// How long an ack or nack may take: it is one frame written to the channel, but a frame handed
/// to a connection whose I/O loop just died may never complete (the likely hang of one outage
/// test run: stuck between the node's kill and its restart, where only this ack was unbounded).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

#[async_trait]
impl Acknowledger for RabbitMqAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BrokerError> {
        self.ack_now().await
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<(), BrokerError> {
        if self.count >= self.spec.options.max_deliveries {
            let reason = format!("delivery limit reached ({} deliveries)", self.count);
            return self.dead_letter(&reason).await;
        }
        if !self.acker.usable() {
            return Err(self.channel_gone());
        }
        if delay.is_zero() {
            // Straight back to the queue; the quorum queue counts the return.
            self.settled = true;
            return self.settle(self.acker.nack(BasicNackOptions { requeue: true, multiple: false })).await;
        }
        // Park it in the delay queue (confirmed) before letting go of it; if
        // parking fails, dropping `self` hands it straight back instead.
        publish::delay(&self.connector, &self.spec.queue, &self.message, self.count, delay).await?;
        self.ack_now().await
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), BrokerError> {
        if !self.acker.usable() {
            return Err(self.channel_gone());
        }
        let topic = &self.spec.options.topic;
        tracing::warn!(%topic, request_id = self.message.request_id().unwrap_or(""), reason, "message dead-lettered");
        let mut dead = self.message.clone();
        dead.topic = dead_letter_topic(topic);
        dead.headers.insert(DEAD_LETTER_REASON_HEADER.into(), reason.into());
        // Confirmed in the dead-letter queue before the delivery itself is acked.
        publish::publish(&self.connector, &dead).await?;
        self.ack_now().await
    }
}

impl Drop for RabbitMqAcker {
    fn drop(&mut self) {
        if self.settled || !self.acker.usable() {
            return;
        }
        // Abandoned unsettled: the consumer task hands it back at once. If the
        // subscription is gone, the broker takes it back when the channel closes.
        let _ = self.abandon.send(self.acker.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::AMQPValue;

    fn with_headers(pairs: &[(&str, AMQPValue)]) -> lapin::BasicProperties {
        let mut headers = FieldTable::default();
        for (name, value) in pairs {
            headers.insert((*name).into(), value.clone());
        }
        lapin::BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn first_delivery_counts_one() {
        assert_eq!(delivery_count(&lapin::BasicProperties::default(), false), 1);
    }

    #[test]
    fn returns_and_parked_deliveries_add_up() {
        let returned = with_headers(&[(QUORUM_DELIVERY_COUNT, AMQPValue::LongLongInt(2))]);
        assert_eq!(delivery_count(&returned, true), 3);
        let parked = with_headers(&[(DELIVERIES_HEADER, AMQPValue::LongUInt(3))]);
        assert_eq!(delivery_count(&parked, false), 4);
        let both = with_headers(&[
            (DELIVERIES_HEADER, AMQPValue::LongUInt(3)),
            (QUORUM_DELIVERY_COUNT, AMQPValue::LongInt(1)),
        ]);
        assert_eq!(delivery_count(&both, true), 5);
    }

    #[test]
    fn redelivered_without_a_count_still_grows() {
        assert_eq!(delivery_count(&lapin::BasicProperties::default(), true), 2);
    }
}
