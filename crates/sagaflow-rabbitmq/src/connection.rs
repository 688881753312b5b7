//! The broker handle, its connection (kept up with bounded backoff) and the
//! topology it declares.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, Event, ExchangeKind};
use rand::Rng;
use sagaflow::ErrorSource;
use sagaflow::broker::{Broker, BrokerError, Message, SubscribeOptions, Subscription, dead_letter_topic};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Failure, Result};
use crate::options::RabbitMqOptions;
use crate::{publish, subscribe};

/// How often the supervisor checks that the connection is still up, besides
/// reacting at once to lapin's error events.
const STATUS_POLL: Duration = Duration::from_millis(250);
/// The longest one connection attempt may take (a silent peer never answers the handshake).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `close` waits for the graceful AMQP close handshake.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// A [`Broker`] over RabbitMQ: durable quorum queues, persistent messages,
/// publisher confirms, dead-letter queues, and a connection that heals itself.
///
/// Cheap to clone; every clone shares one connection. Dropping the last clone
/// closes the broker, like [`Broker::close`] without the grace period.
#[derive(Clone)]
pub struct RabbitMqBroker {
    inner: Arc<Handle>,
}

/// Owns the connector; dropping it stops everything the broker started.
struct Handle {
    connector: Arc<Connector>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.connector.closing.cancel();
        self.connector.shutdown.cancel();
    }
}

impl std::fmt::Debug for RabbitMqBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let connector = &self.inner.connector;
        f.debug_struct("RabbitMqBroker")
            .field("url", &connector.options.redacted_url())
            .field("connected", &self.is_connected())
            .field("closed", &connector.closing.is_cancelled())
            .finish()
    }
}

impl RabbitMqBroker {
    /// Connects to RabbitMQ, retrying with backoff for up to the connect
    /// timeout; from then on the connection is restored on its own whenever it drops.
    pub async fn connect(options: RabbitMqOptions) -> Result<Self> {
        let wait = options.connect_timeout;
        let connector = Arc::new(Connector::new(options));
        let supervisor = tokio::spawn(connector.clone().supervise());
        let broker = Self { inner: Arc::new(Handle { connector, supervisor: Mutex::new(Some(supervisor)) }) };
        let connector = &broker.inner.connector;
        match connector.live(Some(Instant::now() + wait)).await {
            Ok(_) => Ok(broker),
            Err(_) => Err(Error::Unavailable {
                endpoint: connector.options.endpoint(),
                waited: wait,
                reason: connector.last_error().reason,
                source: connector.last_error().source.map(ErrorSource::new),
            }),
        }
    }

    /// Whether the connection is up right now.
    pub fn is_connected(&self) -> bool {
        match &*self.inner.connector.link.borrow() {
            Link::Up(live) => live.connection.status().connected(),
            _ => false,
        }
    }

    /// The options this broker was connected with.
    pub fn options(&self) -> &RabbitMqOptions {
        &self.inner.connector.options
    }
}

#[async_trait]
impl Broker for RabbitMqBroker {
    async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        let connector = &self.inner.connector;
        if connector.closing.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        publish::publish(connector, &message).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BrokerError> {
        let connector = &self.inner.connector;
        if connector.closing.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        subscribe::subscribe(connector, options).await
    }

    async fn close(&self) {
        let connector = self.inner.connector.clone();
        if connector.closing.is_cancelled() {
            return;
        }
        // Consumers stop at once; the connection stays until the deliveries
        // already handed out are settled (or the grace period ends), so their
        // acks still reach the broker.
        connector.closing.cancel();
        let supervisor = lock(&self.inner.supervisor).take();
        if connector.unsettled.count() == 0 {
            connector.shutdown.cancel();
            if let Some(supervisor) = supervisor {
                let _ = tokio::time::timeout(CLOSE_HANDSHAKE + STATUS_POLL, supervisor).await;
            }
            return;
        }
        let grace = connector.options.close_timeout;
        tokio::spawn(async move {
            if !connector.unsettled.wait_zero(Instant::now() + grace).await {
                tracing::warn!(
                    unsettled = connector.unsettled.count(),
                    "closing the RabbitMQ connection with deliveries still unsettled; the broker will redeliver them"
                );
            }
            connector.shutdown.cancel();
        });
    }

    fn name(&self) -> &'static str {
        "rabbitmq"
    }
}

/// The state of the connection, as the supervisor publishes it.
#[derive(Clone)]
pub(crate) enum Link {
    /// Connecting or reconnecting.
    Down,
    /// Connected.
    Up(Arc<Live>),
    /// Shut down for good.
    Closed,
}

/// Keeps one connection up and hands it to whoever needs it.
pub(crate) struct Connector {
    pub(crate) options: RabbitMqOptions,
    link: watch::Sender<Link>,
    /// Cancelled by `close`: stop consumers, refuse new publishes and subscriptions.
    pub(crate) closing: CancellationToken,
    /// Cancelled once the connection itself must go.
    shutdown: CancellationToken,
    last_error: Mutex<Failure>,
    pub(crate) unsettled: Unsettled,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Short critical sections over plain data: a panic elsewhere leaves nothing half-done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Connector {
    fn new(options: RabbitMqOptions) -> Self {
        Self {
            options,
            link: watch::Sender::new(Link::Down),
            closing: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            last_error: Mutex::new(Failure::msg("not connected yet")),
            unsettled: Unsettled::default(),
        }
    }

    fn last_error(&self) -> Failure {
        lock(&self.last_error).clone()
    }

    fn set_last_error(&self, error: Failure) {
        *lock(&self.last_error) = error;
    }

    /// The live connection, waiting for one until `deadline` (forever if `None`).
    pub(crate) async fn live(&self, deadline: Option<Instant>) -> Result<Arc<Live>, BrokerError> {
        let started = Instant::now();
        let mut link = self.link.subscribe();
        loop {
            let current = link.borrow_and_update().clone();
            match current {
                Link::Up(live) if live.connection.status().connected() => return Ok(live),
                // The supervisor has not noticed yet: nudge it.
                Link::Up(live) => live.broken.notify_one(),
                Link::Closed => return Err(BrokerError::Closed),
                Link::Down => {}
            }
            let changed = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, link.changed()).await {
                    Ok(changed) => changed,
                    Err(_) => {
                        let last = self.last_error();
                        return Err(BrokerError::Unavailable {
                            context: format!(
                                "RabbitMQ at {} unreachable for {:?}: {}",
                                self.options.endpoint(),
                                started.elapsed(),
                                last.reason
                            ),
                            source: last.source.map(ErrorSource::new),
                        });
                    }
                },
                None => link.changed().await,
            };
            if changed.is_err() {
                return Err(BrokerError::Closed);
            }
        }
    }

    /// Tells the supervisor that `live` failed an operation, so it checks it now.
    pub(crate) fn report_broken(&self, live: &Live, error: &lapin::Error) {
        if !live.connection.status().connected() {
            self.set_last_error(Failure::of("connection failed", error.clone()));
        }
        live.broken.notify_one();
    }

    /// Connects, watches, reconnects with bounded backoff, until shutdown.
    async fn supervise(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.options.reconnect_min, self.options.reconnect_max);
        let mut generation = 0u64;
        let mut failures = 0u32;
        let endpoint = self.options.endpoint();
        loop {
            let attempt = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                attempt = self.open() => attempt,
            };
            match attempt {
                Ok(live) => {
                    generation += 1;
                    if generation > 1 {
                        tracing::info!(%endpoint, generation, "reconnected to RabbitMQ");
                    }
                    backoff.reset();
                    failures = 0;
                    self.link.send_replace(Link::Up(live.clone()));
                    let lost = self.watch(&live).await;
                    self.link.send_replace(Link::Down);
                    match lost {
                        Some(reason) => {
                            tracing::warn!(%endpoint, %reason, "lost the RabbitMQ connection; reconnecting");
                            self.set_last_error(reason);
                        }
                        None => {
                            close_connection(&live.connection).await;
                            break;
                        }
                    }
                }
                Err(error) => {
                    failures += 1;
                    let delay = backoff.next();
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(%endpoint, %error, attempt = failures, ?delay, "cannot connect to RabbitMQ; retrying");
                    } else {
                        tracing::debug!(%endpoint, %error, attempt = failures, ?delay, "cannot connect to RabbitMQ; retrying");
                    }
                    self.set_last_error(error);
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.link.send_replace(Link::Closed);
    }

    /// One connection attempt: connect, then declare the exchange.
    async fn open(&self) -> Result<Arc<Live>, Failure> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.options.connection_name.as_str()));
        let connect = Connection::connect_uri(self.options.uri.clone(), properties);
        let connection = match tokio::time::timeout(ATTEMPT_TIMEOUT, connect).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => return Err(Failure::of("connecting", e)),
            Err(_) => return Err(Failure::msg(format!("no answer within {ATTEMPT_TIMEOUT:?}"))),
        };
        let live = Arc::new(Live {
            connection,
            publisher: tokio::sync::Mutex::new(None),
            topology: tokio::sync::Mutex::new(None),
            declared: Mutex::new(HashSet::new()),
            broken: Notify::new(),
        });
        let declare = live.ensure_exchange(&self.options.exchange);
        match tokio::time::timeout(ATTEMPT_TIMEOUT, declare).await {
            Ok(Ok(())) => Ok(live),
            Ok(Err(e)) => {
                close_connection(&live.connection).await;
                Err(Failure::of(format!("declaring exchange `{}`", self.options.exchange), e))
            }
            Err(_) => Err(Failure::msg(format!(
                "declaring exchange `{}`: no answer within {ATTEMPT_TIMEOUT:?}",
                self.options.exchange
            ))),
        }
    }

    /// Waits until `live` fails (`Some(reason)`) or shutdown (`None`).
    async fn watch(&self, live: &Live) -> Option<Failure> {
        let mut events = live.connection.events_listener();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                event = events.next() => {
                    if let Some(Event::Error(error)) = event {
                        return Some(Failure::of("connection error", error));
                    }
                }
                _ = live.broken.notified() => {}
                _ = tokio::time::sleep(STATUS_POLL) => {}
            }
            let status = live.connection.status();
            if !status.connected() {
                let state = if status.errored() {
                    "failed"
                } else if status.closed() || status.closing() {
                    "closed by the broker"
                } else {
                    "not connected"
                };
                return Some(Failure::msg(format!("connection {state}")));
            }
        }
    }
}

async fn close_connection(connection: &Connection) {
    if connection.status().connected() {
        let close = connection.close(200, "sagaflow broker closed".into());
        if let Ok(Err(e)) = tokio::time::timeout(CLOSE_HANDSHAKE, close).await {
            tracing::debug!(error = %e, "closing the RabbitMQ connection");
        }
    }
}

/// One established connection and what was declared on it.
pub(crate) struct Live {
    pub(crate) connection: Connection,
    /// The confirm-mode channel publishes go through.
    publisher: tokio::sync::Mutex<Option<Channel>>,
    /// The channel declarations go through (an error there closes only it).
    topology: tokio::sync::Mutex<Option<Channel>>,
    /// Exchanges and delay queues already declared on this connection.
    declared: Mutex<HashSet<String>>,
    broken: Notify,
}

impl Live {
    /// The publishing channel, opened (in confirm mode) if it is not open.
    pub(crate) async fn publisher(&self) -> lapin::Result<Channel> {
        let mut slot = self.publisher.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    async fn topology(&self) -> lapin::Result<Channel> {
        let mut slot = self.topology.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.connection.create_channel().await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    fn is_declared(&self, name: &str) -> bool {
        lock(&self.declared).contains(name)
    }

    fn mark_declared(&self, name: &str) {
        lock(&self.declared).insert(name.to_owned());
    }

    /// Forgets a declaration the broker seems to have lost, so it is made again.
    pub(crate) fn forget(&self, name: &str) {
        lock(&self.declared).remove(name);
    }

    /// Forgets every declaration, after an error that may mean any of them is gone.
    pub(crate) fn forget_all(&self) {
        lock(&self.declared).clear();
    }

    /// Declares the durable direct exchange topics go through (once per connection).
    pub(crate) async fn ensure_exchange(&self, exchange: &str) -> lapin::Result<()> {
        let key = format!("exchange:{exchange}");
        if self.is_declared(&key) {
            return Ok(());
        }
        let channel = self.topology().await?;
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        self.mark_declared(&key);
        Ok(())
    }

    /// Declares the queue of `topic` for the default group, so a message
    /// published before anyone subscribed has somewhere to wait.
    pub(crate) async fn declare_holding_queue(&self, options: &RabbitMqOptions, topic: &str) -> lapin::Result<()> {
        self.ensure_exchange(&options.exchange).await?;
        let channel = self.topology().await?;
        declare_topic_queue(&channel, options, topic, topic).await
    }

    /// Declares the delay queue in front of `queue` (once per connection).
    pub(crate) async fn ensure_delay_queue(&self, options: &RabbitMqOptions, queue: &str) -> lapin::Result<()> {
        let name = delay_queue_name(queue);
        if self.is_declared(&name) {
            return Ok(());
        }
        let channel = self.topology().await?;
        let mut args = FieldTable::default();
        // Expired messages go back, through the default exchange, to the queue they came from.
        args.insert("x-dead-letter-exchange".into(), string_value(""));
        args.insert("x-dead-letter-routing-key".into(), string_value(queue));
        expiry_arg(&mut args, options);
        channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
            .await?;
        self.mark_declared(&name);
        Ok(())
    }
}

// ------------------------------------------------------------------ topology

/// The queue a group consumes `topic` from: the topic itself for the default
/// group, `<topic>@<group>` for any other.
pub(crate) fn queue_name(topic: &str, group: &str, default_group: &str) -> String {
    if group == default_group { topic.to_owned() } else { format!("{topic}@{group}") }
}

/// The queue where messages nacked with a delay from `queue` wait.
pub(crate) fn delay_queue_name(queue: &str) -> String {
    format!("delay~{queue}")
}

/// The longest queue name we form, so every derived name stays within AMQP's 255 bytes.
pub(crate) const MAX_QUEUE_NAME: usize = 255 - "delay~".len();

fn string_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Declares (idempotently) the durable quorum queue `queue` that receives
/// `topic`, binds it to the exchange, and points its broker-side dead-lettering
/// at the topic's dead-letter queue.
pub(crate) async fn declare_topic_queue(
    channel: &Channel,
    options: &RabbitMqOptions,
    topic: &str,
    queue: &str,
) -> lapin::Result<()> {
    let exchange = options.exchange.as_str();
    let mut args = FieldTable::default();
    // Quorum queues count deliveries (x-delivery-count), including returns
    // after a consumer died mid-message; classic queues do not.
    args.insert("x-queue-type".into(), string_value("quorum"));
    if !topic.ends_with(".dead-letter") {
        // Only used if the broker itself drops a message (a delivery limit set by policy).
        args.insert("x-dead-letter-exchange".into(), string_value(exchange));
        args.insert("x-dead-letter-routing-key".into(), string_value(&dead_letter_topic(topic)));
    }
    expiry_arg(&mut args, options);
    channel.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args).await?;
    channel
        .queue_bind(queue.into(), exchange.into(), topic.into(), QueueBindOptions::default(), FieldTable::default())
        .await
}

fn expiry_arg(args: &mut FieldTable, options: &RabbitMqOptions) {
    if let Some(expiry) = options.queue_expiry {
        let millis = i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX).max(1);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
    }
}

/// Sets the prefetch of the consumers that will be started on `channel`.
pub(crate) async fn set_prefetch(channel: &Channel, prefetch: u16) -> lapin::Result<()> {
    channel.basic_qos(prefetch, BasicQosOptions { global: false }).await
}

// ------------------------------------------------------------------ bookkeeping

/// Counts deliveries handed out and not yet settled, so `close` can wait for them.
#[derive(Default)]
pub(crate) struct Unsettled {
    count: AtomicUsize,
    zero: Notify,
}

impl Unsettled {
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Counts one more; the guard counts it off when dropped.
    pub(crate) fn track(connector: &Arc<Connector>) -> UnsettledGuard {
        connector.unsettled.count.fetch_add(1, Ordering::AcqRel);
        UnsettledGuard(connector.clone())
    }

    /// Whether the count reached zero before `deadline`.
    async fn wait_zero(&self, deadline: Instant) -> bool {
        loop {
            let zero = self.zero.notified();
            tokio::pin!(zero);
            zero.as_mut().enable();
            if self.count() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, zero).await.is_err() {
                return self.count() == 0;
            }
        }
    }
}

/// One unsettled delivery, counted off on drop.
pub(crate) struct UnsettledGuard(Arc<Connector>);

impl Drop for UnsettledGuard {
    fn drop(&mut self) {
        let unsettled = &self.0.unsettled;
        if unsettled.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            unsettled.zero.notify_waiters();
        }
    }
}

/// Exponential backoff between `min` and `max`, with ±20 % jitter so many
/// clients do not reconnect in lockstep.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min }
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }

    pub(crate) fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.max);
        let jitter = rand::rng().random_range(0.8..=1.2);
        base.mul_f64(jitter).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names() {
        assert_eq!(queue_name("orders", "sagaflow", "sagaflow"), "orders");
        assert_eq!(queue_name("orders", "audit", "sagaflow"), "orders@audit");
        assert_eq!(delay_queue_name("orders@audit"), "delay~orders@audit");
    }

    #[test]
    fn backoff_grows_to_its_bound_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<_> = (0..10).map(|_| backoff.next()).collect();
        assert!(delays[0] >= Duration::from_millis(80) && delays[0] <= Duration::from_millis(120));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(5)));
        assert!(delays[9] >= Duration::from_secs(4), "{delays:?}");
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(120));
    }
}
