//! Consuming: a pull loop per subscription feeding [`Subscription::next`], and the
//! [`Acknowledger`] that settles each delivery.
//!
//! The pull loop asks the server for at most as many messages as the subscription has free
//! slots (`concurrency` minus deliveries held or waiting), so no more than `concurrency`
//! deliveries are ever unsettled. Messages wait in a local queue until `next()` takes them,
//! which makes `next()` cancel-safe. While a message is unsettled (queued or held), a ticker
//! sends progress acks every third of `ack_wait`, so slow steps are not redelivered. A pull
//! request the server forgot (reconnect, restart, deleted consumer) is renewed, and after a
//! reconnect or an unanswered request the stream and consumer are looked up and recreated if
//! the server lost them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::{StatusCode, Subject, Subscriber};
use async_trait::async_trait;
use futures::StreamExt;
use sagaflow::broker::{
    Acknowledger, BrokerError, DEAD_LETTER_REASON_HEADER, Delivery, Message, SubscribeOptions, Subscription,
    SubscriptionSource, dead_letter_topic,
};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::connection::{Shared, validate_subject};
use crate::publish::{from_headers, send};

/// How long past its expiry a pull request is given before it is taken as lost.
const PULL_GRACE: Duration = Duration::from_secs(2);

/// [`Broker::subscribe`](sagaflow::broker::Broker::subscribe): ensures the stream and the group's
/// durable consumer, then starts the pull loop and the progress ticker.
pub(crate) async fn subscribe(shared: &Arc<Shared>, options: SubscribeOptions) -> Result<Subscription, BrokerError> {
    if shared.closed.is_cancelled() {
        return Err(BrokerError::Closed);
    }
    if options.concurrency == 0 || options.max_deliveries == 0 {
        return Err(BrokerError::Invalid(format!(
            "subscription to `{}` needs concurrency and max_deliveries above zero",
            options.topic
        )));
    }
    if options.group.is_empty() {
        return Err(BrokerError::Invalid(format!("subscription to `{}` needs a group name", options.topic)));
    }
    validate_subject(&options.topic).map_err(BrokerError::Invalid)?;
    let consumer = shared.ensure_consumer(&options).await?;
    let inbox = Subject::from(shared.client.new_inbox());
    let replies = shared
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| BrokerError::unavailable("subscribing to a NATS inbox", e))?;
    let state = Arc::new(SubState {
        stream: shared.stream_name(&options.topic),
        options,
        queue: Mutex::new(Queue::default()),
        arrived: Notify::new(),
        freed: Notify::new(),
        dropped: CancellationToken::new(),
        consumed: AtomicBool::new(false),
    });
    tokio::spawn(pull_loop(shared.clone(), state.clone(), consumer, inbox, replies));
    tokio::spawn(keep_alive(shared.clone(), state.clone()));
    Ok(Subscription::new(NatsSource { shared: shared.clone(), state }))
}

/// What a subscription's source, pull loop, ticker and deliveries share.
struct SubState {
    options: SubscribeOptions,
    stream: String,
    queue: Mutex<Queue>,
    /// A delivery is ready, or a held one was settled (wakes `next()`).
    arrived: Notify,
    /// A slot was freed (wakes the pull loop).
    freed: Notify,
    /// The subscription was dropped: stop pulling and ticking.
    dropped: CancellationToken,
    /// A delivery was acked or terminated since the last purge.
    consumed: AtomicBool,
}

#[derive(Default)]
struct Queue {
    /// Pulled, not yet handed out.
    ready: VecDeque<Pulled>,
    /// Handed out, not yet settled.
    held: usize,
    /// Every unsettled delivery (ready or held) by id, with its ack subject for progress acks.
    unsettled: HashMap<u64, Subject>,
    next_id: u64,
}

struct Pulled {
    message: Message,
    delivery_count: u32,
    acker: NatsAcker,
}

fn lock(state: &SubState) -> MutexGuard<'_, Queue> {
    // The queue is plain data; a panic elsewhere while it was locked leaves it consistent.
    state.queue.lock().unwrap_or_else(|e| e.into_inner())
}

impl SubState {
    /// Free slots the pull loop may ask the server for.
    fn free_slots(&self) -> usize {
        let queue = lock(self);
        self.options.concurrency.saturating_sub(queue.held + queue.ready.len())
    }

    /// Hands out the next ready delivery if a slot is free.
    fn take_ready(&self) -> Option<Delivery> {
        let mut queue = lock(self);
        if queue.held >= self.options.concurrency {
            return None;
        }
        let mut pulled = queue.ready.pop_front()?;
        queue.held += 1;
        if let Some(pending) = pulled.acker.pending.as_mut() {
            pending.handed_out = true;
        }
        Some(Delivery::new(pulled.message, pulled.delivery_count, pulled.acker))
    }

    /// Returns every delivery not handed out yet (each is nacked as its acker drops).
    fn drain_ready(&self) {
        let ready = std::mem::take(&mut lock(self).ready);
        drop(ready);
    }
}

/// The [`SubscriptionSource`] behind a NATS [`Subscription`].
struct NatsSource {
    shared: Arc<Shared>,
    state: Arc<SubState>,
}

#[async_trait]
impl SubscriptionSource for NatsSource {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if self.shared.closed.is_cancelled() {
                return None;
            }
            if let Some(delivery) = self.state.take_ready() {
                return Some(delivery);
            }
            // `notify_one` keeps a permit, so a delivery pushed between the check and here is not missed.
            tokio::select! {
                () = self.state.arrived.notified() => {}
                () = self.shared.closed.cancelled() => return None,
            }
        }
    }
}

impl Drop for NatsSource {
    fn drop(&mut self) {
        self.state.dropped.cancel();
        self.state.drain_ready();
    }
}

/// Pulls messages into the subscription's queue until the subscription is dropped or the broker closed.
async fn pull_loop(
    shared: Arc<Shared>,
    state: Arc<SubState>,
    mut consumer: PullConsumer,
    inbox: Subject,
    mut replies: Subscriber,
) {
    let mut connections = shared.connections.clone();
    connections.borrow_and_update();
    let stop = || shared.closed.is_cancelled() || state.dropped.is_cancelled();
    let mut failures = 0u32;
    'pulling: while !stop() {
        let want = loop {
            let free = state.free_slots();
            if free > 0 {
                break free;
            }
            tokio::select! {
                () = state.freed.notified() => {}
                () = shared.closed.cancelled() => break 'pulling,
                () = state.dropped.cancelled() => break 'pulling,
            }
        };
        let request = BatchConfig { batch: want, expires: Some(shared.options.pull_expires), ..Default::default() };
        if let Err(e) = consumer.request_batch(request, inbox.clone()).await {
            tracing::warn!(stream = %state.stream, error = %e, "pull request failed");
            failures += 1;
            pause(&shared, &state, failures).await;
            continue;
        }
        let deadline = Instant::now() + shared.options.pull_expires + PULL_GRACE;
        let mut outstanding = want;
        let mut recreate = false;
        while outstanding > 0 {
            tokio::select! {
                () = shared.closed.cancelled() => break 'pulling,
                () = state.dropped.cancelled() => break 'pulling,
                changed = connections.changed() => {
                    if changed.is_err() {
                        break 'pulling;
                    }
                    // The server may have restarted without its store: check the consumer too.
                    tracing::debug!(stream = %state.stream, "reconnected; renewing the pull request");
                    recreate = true;
                    break;
                }
                // The server did not even end the request: it may have lost the consumer, since
                // JetStream ignores pulls for a consumer it does not have.
                () = tokio::time::sleep_until(deadline) => {
                    recreate = true;
                    break;
                }
                reply = replies.next() => {
                    let Some(reply) = reply else { break 'pulling };
                    match reply.status {
                        None | Some(StatusCode::OK) => {
                            outstanding -= 1;
                            failures = 0;
                            accept(&shared, &state, reply);
                        }
                        Some(StatusCode::IDLE_HEARTBEAT) => {}
                        // The request expired, or (no-wait) found nothing: ask again.
                        Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => break,
                        Some(StatusCode::NO_RESPONDERS) => {
                            tracing::warn!(stream = %state.stream, "no consumer answers pull requests; recreating it");
                            recreate = true;
                            break;
                        }
                        Some(status) => {
                            let description = reply.description.unwrap_or_default();
                            tracing::warn!(stream = %state.stream, %status, %description, "pull request ended by the server");
                            recreate = description.to_ascii_lowercase().contains("deleted");
                            failures += 1;
                            pause(&shared, &state, failures).await;
                            break;
                        }
                    }
                }
            }
        }
        // Gets the consumer, or recreates it (and its stream) if the server lost them.
        while recreate && !stop() {
            shared.forget_stream(&state.options.topic);
            match shared.ensure_consumer(&state.options).await {
                Ok(recreated) => {
                    consumer = recreated;
                    recreate = false;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(stream = %state.stream, error = %e, "recreating the consumer failed; retrying");
                    pause(&shared, &state, failures).await;
                }
            }
        }
    }
    // Pulled but never handed out: return them to the server now rather than after ack_wait.
    state.drain_ready();
}

/// Backs off after a failure (100 ms doubling up to 2 s), or returns early on stop.
async fn pause(shared: &Shared, state: &SubState, failures: u32) {
    let delay = Duration::from_millis(100u64 << failures.min(5)).min(Duration::from_secs(2));
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = shared.closed.cancelled() => {}
        () = state.dropped.cancelled() => {}
    }
}

/// Queues one pulled message, or dead-letters it when it is past the delivery limit.
fn accept(shared: &Arc<Shared>, state: &Arc<SubState>, reply: async_nats::Message) {
    let Some(ack_subject) = reply.reply.clone() else {
        tracing::warn!(stream = %state.stream, "a pulled message without an ack subject; ignored");
        return;
    };
    let headers = from_headers(reply.headers.as_ref());
    let jetstream_message = async_nats::jetstream::Message { message: reply, context: shared.jetstream.clone() };
    let (delivered, stream_sequence) = match jetstream_message.info() {
        Ok(info) => (u32::try_from(info.delivered).unwrap_or(u32::MAX), info.stream_sequence),
        Err(e) => {
            tracing::warn!(stream = %state.stream, error = %e, "a pulled message without JetStream metadata; ignored");
            return;
        }
    };
    let message =
        Message { topic: state.options.topic.clone(), headers, payload: jetstream_message.message.payload.clone() };
    let id = {
        let mut queue = lock(state);
        queue.next_id += 1;
        let id = queue.next_id;
        queue.unsettled.insert(id, ack_subject.clone());
        id
    };
    let pending = Pending {
        shared: shared.clone(),
        state: state.clone(),
        id,
        ack_subject,
        message: message.clone(),
        delivered,
        stream_sequence,
        handed_out: false,
    };
    if delivered > state.options.max_deliveries {
        // The server's extra delivery (see `ensure_consumer`): the last allowed one was
        // abandoned or its nack could not dead-letter it. Dead-letter it now.
        tokio::spawn(async move {
            let reason = format!("delivery limit reached ({} deliveries)", pending.delivered - 1);
            if let Err(e) = pending.dead_letter(&reason).await {
                tracing::warn!(error = %e, "dead-lettering a message past its delivery limit failed; it will be retried");
            }
        });
        return;
    }
    lock(state).ready.push_back(Pulled {
        message,
        delivery_count: delivered,
        acker: NatsAcker { pending: Some(pending) },
    });
    state.arrived.notify_one();
    if shared.closed.is_cancelled() || state.dropped.is_cancelled() {
        state.drain_ready();
    }
}

/// Sends progress acks for every unsettled delivery of the subscription, a few times per
/// `ack_wait`, and purges what every group has consumed every `purge_interval`.
async fn keep_alive(shared: Arc<Shared>, state: Arc<SubState>) {
    let period = (shared.options.ack_wait / 3).max(Duration::from_millis(100));
    let mut progress = tokio::time::interval_at(Instant::now() + period, period);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let purge_period = shared.options.purge_interval;
    // An interval cannot be zero: a disabled purge ticks yearly and does nothing.
    let mut purge = tokio::time::interval_at(
        Instant::now() + purge_period,
        if purge_period.is_zero() { Duration::from_secs(365 * 24 * 3600) } else { purge_period },
    );
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = progress.tick() => {
                let subjects: Vec<Subject> = lock(&state).unsettled.values().cloned().collect();
                for subject in subjects {
                    if let Err(e) = shared.client.publish(subject, AckKind::Progress.into()).await {
                        tracing::debug!(error = %e, "a progress ack was not sent");
                    }
                }
            }
            _ = purge.tick(), if !purge_period.is_zero() => {
                if state.consumed.swap(false, Ordering::AcqRel) {
                    match shared.purge_consumed(&state.options.topic).await {
                        Ok(0) => {}
                        Ok(purged) => tracing::debug!(stream = %state.stream, purged, "purged consumed messages"),
                        Err(e) => {
                            state.consumed.store(true, Ordering::Release);
                            tracing::debug!(stream = %state.stream, error = %e, "purging consumed messages failed");
                        }
                    }
                }
            }
            () = state.dropped.cancelled() => return,
        }
    }
}

/// Settles one NATS delivery; dropped unsettled, it nacks the delivery so it comes back at once.
struct NatsAcker {
    /// `None` once settled.
    pending: Option<Pending>,
}

/// An unsettled delivery; dropping it frees its slot.
struct Pending {
    shared: Arc<Shared>,
    state: Arc<SubState>,
    id: u64,
    ack_subject: Subject,
    /// Kept to copy it to the dead-letter topic.
    message: Message,
    delivered: u32,
    stream_sequence: u64,
    handed_out: bool,
}

impl Pending {
    /// Sends `kind` and waits for the server to confirm it.
    async fn settle(&self, kind: AckKind) -> Result<(), BrokerError> {
        match self.shared.client.request(self.ack_subject.clone(), kind.into()).await {
            Ok(_) => {
                if matches!(kind, AckKind::Ack | AckKind::Term) {
                    self.state.consumed.store(true, Ordering::Release);
                }
                Ok(())
            }
            Err(e) => Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => BrokerError::other(
                    format!(
                        "settling a delivery from stream `{}`: its consumer no longer exists; it will be redelivered",
                        self.state.stream
                    ),
                    e,
                ),
                _ => BrokerError::unavailable(
                    format!(
                        "settling a delivery from stream `{}` not confirmed, it will be redelivered",
                        self.state.stream
                    ),
                    e,
                ),
            }),
        }
    }

    /// Copies the message to the dead-letter topic with `reason`, then terminates the delivery.
    /// If the copy fails, the delivery is nacked so the message is not lost.
    async fn dead_letter(self, reason: &str) -> Result<(), BrokerError> {
        let mut copy = self.message.clone();
        copy.topic = dead_letter_topic(&copy.topic);
        copy.headers.insert(DEAD_LETTER_REASON_HEADER.into(), reason.into());
        // Dead-lettering the same stream message twice (two paths, a retry) stores one copy.
        let id = format!("dead-letter-{}-{}", self.state.stream, self.stream_sequence);
        if let Err(e) = send(&self.shared, copy, Some(id)).await {
            if let Err(nak) = self.settle(AckKind::Nak(None)).await {
                tracing::warn!(error = %nak, "nack after a failed dead-letter failed too");
            }
            return Err(e);
        }
        tracing::warn!(topic = %self.message.topic, request_id = self.message.request_id().unwrap_or(""), reason, "message dead-lettered");
        self.settle(AckKind::Term).await
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        {
            let mut queue = lock(&self.state);
            queue.unsettled.remove(&self.id);
            if self.handed_out {
                queue.held -= 1;
            }
        }
        self.state.freed.notify_one();
        self.state.arrived.notify_one();
    }
}

#[async_trait]
impl Acknowledger for NatsAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BrokerError> {
        match self.pending.take() {
            Some(pending) => pending.settle(AckKind::Ack).await,
            None => Ok(()),
        }
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<(), BrokerError> {
        let Some(pending) = self.pending.take() else { return Ok(()) };
        if pending.delivered >= pending.state.options.max_deliveries {
            let reason = format!("delivery limit reached ({} deliveries)", pending.delivered);
            return match pending.dead_letter(&reason).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    // It was nacked instead: its extra delivery will be dead-lettered.
                    tracing::warn!(error = %e, "dead-lettering at the delivery limit failed; retrying later");
                    Ok(())
                }
            };
        }
        let kind = if delay.is_zero() { AckKind::Nak(None) } else { AckKind::Nak(Some(delay)) };
        pending.settle(kind).await
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), BrokerError> {
        match self.pending.take() {
            Some(pending) => pending.dead_letter(reason).await,
            None => Ok(()),
        }
    }
}

impl Drop for NatsAcker {
    fn drop(&mut self) {
        let Some(pending) = self.pending.take() else { return };
        // Abandoned (the consumer died mid-message): nack it so it comes back now, not after
        // ack_wait. Without a runtime the server still redelivers it after ack_wait.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = pending.settle(AckKind::Nak(None)).await {
                    tracing::debug!(error = %e, "nack of an abandoned delivery failed; the server redelivers it after ack_wait");
                }
            });
        }
    }
}
