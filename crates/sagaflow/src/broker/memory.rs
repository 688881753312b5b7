//! The in-memory broker: the embedded default, and the reference the
//! conformance suite was written against.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{
    Acknowledger, Broker, BrokerError, DEAD_LETTER_REASON_HEADER, Delivery, Message, SubscribeOptions, Subscription,
    SubscriptionSource, dead_letter_topic,
};

/// Dead letters nobody consumes are kept up to this many per topic, oldest dropped first.
const DEAD_LETTER_BACKLOG: usize = 10_000;

/// A broker inside the process: nothing survives a restart.
///
/// Each queue holds a bounded backlog, as a real broker's disk does: a publish to a full queue
/// waits until a consumer takes a message (or the broker closes), so a caller that submits
/// faster than the consumers work is slowed down rather than filling the process's memory.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").field("closed", &self.inner.closed.load(Ordering::Relaxed)).finish()
    }
}

struct Inner {
    topics: Mutex<HashMap<String, TopicState>>,
    closed: AtomicBool,
    close_notify: Notify,
    /// Waiting messages a queue holds before publishers wait.
    capacity: usize,
    /// Publishers waiting for room; a consumer taking a message wakes them only when any wait.
    waiting: AtomicUsize,
    room: Notify,
}

#[derive(Default)]
struct TopicState {
    groups: HashMap<String, Arc<Queue>>,
    /// Messages published before any group subscribed; the first group takes them.
    unbound: VecDeque<Entry>,
}

struct Queue {
    ready: Mutex<VecDeque<Entry>>,
    notify: Notify,
}

#[derive(Clone)]
struct Entry {
    message: Message,
    deliveries: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryBroker {
    /// Waiting messages each queue holds unless set ([`with_capacity`](Self::with_capacity)).
    pub const DEFAULT_CAPACITY: usize = 10_000;

    /// A new, empty broker whose queues hold [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) messages.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, empty broker whose queues hold at most `capacity` waiting messages each (at least 1);
    /// a publish to a full queue waits for room.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                topics: Mutex::default(),
                closed: AtomicBool::new(false),
                close_notify: Notify::new(),
                capacity: capacity.max(1),
                waiting: AtomicUsize::new(0),
                room: Notify::new(),
            }),
        }
    }

    /// Messages waiting (not in flight) on `topic` for `group`.
    pub fn depth(&self, topic: &str, group: &str) -> usize {
        let topics = lock(&self.inner.topics);
        match topics.get(topic) {
            Some(t) => match t.groups.get(group) {
                Some(q) => lock(&q.ready).len(),
                None => t.unbound.len(),
            },
            None => 0,
        }
    }
}

impl Inner {
    /// Enqueues unless a queue of the topic is full; then hands the entry back.
    fn try_enqueue(&self, entry: Entry) -> Result<(), Entry> {
        let mut topics = lock(&self.topics);
        let full = match topics.get(&entry.message.topic) {
            None => false,
            Some(t) if t.groups.is_empty() => t.unbound.len() >= self.capacity,
            Some(t) => t.groups.values().any(|q| lock(&q.ready).len() >= self.capacity),
        };
        if full {
            return Err(entry);
        }
        Self::push(&mut topics, entry);
        Ok(())
    }

    /// A message left a queue: wakes publishers waiting for room, if any.
    fn made_room(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }

    /// Enqueues whatever the queues hold (dead letters are never refused).
    fn enqueue(&self, entry: Entry) {
        Self::push(&mut lock(&self.topics), entry);
    }

    fn push(topics: &mut HashMap<String, TopicState>, entry: Entry) {
        let is_dead_letter = entry.message.topic.ends_with(".dead-letter");
        let topic = topics.entry(entry.message.topic.clone()).or_default();
        if topic.groups.is_empty() {
            topic.unbound.push_back(entry);
            if is_dead_letter && topic.unbound.len() > DEAD_LETTER_BACKLOG {
                topic.unbound.pop_front();
            }
            return;
        }
        for queue in topic.groups.values() {
            lock(&queue.ready).push_back(entry.clone());
            queue.notify.notify_waiters();
        }
    }

    fn dead_letter(&self, mut message: Message, reason: &str) {
        tracing::warn!(topic = %message.topic, request_id = message.request_id().unwrap_or(""), reason, "message dead-lettered");
        message.topic = dead_letter_topic(&message.topic);
        message.headers.insert(DEAD_LETTER_REASON_HEADER.into(), reason.into());
        self.enqueue(Entry { message, deliveries: 0 });
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        if message.topic.is_empty() {
            return Err(BrokerError::Invalid("empty topic name".into()));
        }
        let mut entry = match self.inner.try_enqueue(Entry { message, deliveries: 0 }) {
            Ok(()) => return Ok(()),
            Err(full) => full,
        };
        // Full: wait for room. Counted as waiting and registered before looking again, so a
        // consumer taking a message after that look wakes this publisher.
        self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            let room = self.inner.room.notified();
            let closed = self.inner.close_notify.notified();
            tokio::pin!(room, closed);
            room.as_mut().enable();
            closed.as_mut().enable();
            if self.inner.closed.load(Ordering::Acquire) {
                break Err(BrokerError::Closed);
            }
            match self.inner.try_enqueue(entry) {
                Ok(()) => break Ok(()),
                Err(full) => entry = full,
            }
            tokio::select! {
                _ = room => {}
                _ = closed => {}
            }
        };
        self.inner.waiting.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        if options.concurrency == 0 || options.max_deliveries == 0 {
            return Err(BrokerError::Invalid(format!(
                "subscription to `{}` needs concurrency and max_deliveries above zero",
                options.topic
            )));
        }
        let queue = {
            let mut topics = lock(&self.inner.topics);
            let topic = topics.entry(options.topic.clone()).or_default();
            let adopt = topic.groups.is_empty();
            let queue = topic
                .groups
                .entry(options.group.clone())
                .or_insert_with(|| Arc::new(Queue { ready: Mutex::new(VecDeque::new()), notify: Notify::new() }))
                .clone();
            if adopt {
                lock(&queue.ready).extend(topic.unbound.drain(..));
            }
            queue
        };
        self.inner.made_room();
        Ok(Subscription::new(MemorySource {
            broker: self.inner.clone(),
            queue,
            slots: Arc::new(Slots { in_flight: AtomicUsize::new(0), freed: Notify::new() }),
            options,
        }))
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.close_notify.notify_waiters();
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    async fn depth(&self, topic: &str, group: &str) -> Option<u64> {
        Some(MemoryBroker::depth(self, topic, group) as u64)
    }
}

struct Slots {
    in_flight: AtomicUsize,
    freed: Notify,
}

struct MemorySource {
    broker: Arc<Inner>,
    queue: Arc<Queue>,
    slots: Arc<Slots>,
    options: SubscribeOptions,
}

#[async_trait]
impl SubscriptionSource for MemorySource {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            let arrived = self.queue.notify.notified();
            let freed = self.slots.freed.notified();
            let closed = self.broker.close_notify.notified();
            tokio::pin!(arrived, freed, closed);
            arrived.as_mut().enable();
            freed.as_mut().enable();
            closed.as_mut().enable();
            if self.broker.closed.load(Ordering::Acquire) {
                return None;
            }
            if self.slots.in_flight.load(Ordering::Acquire) < self.options.concurrency {
                let popped = lock(&self.queue.ready).pop_front();
                if let Some(mut entry) = popped {
                    self.broker.made_room();
                    entry.deliveries += 1;
                    self.slots.in_flight.fetch_add(1, Ordering::AcqRel);
                    let count = entry.deliveries;
                    let message = entry.message.clone();
                    return Some(Delivery::new(
                        message,
                        count,
                        MemoryAcker {
                            broker: self.broker.clone(),
                            queue: self.queue.clone(),
                            slots: self.slots.clone(),
                            max_deliveries: self.options.max_deliveries,
                            entry: Some(entry),
                        },
                    ));
                }
            }
            tokio::select! {
                _ = arrived => {}
                _ = freed => {}
                _ = closed => {}
            }
        }
    }
}

struct MemoryAcker {
    broker: Arc<Inner>,
    queue: Arc<Queue>,
    slots: Arc<Slots>,
    max_deliveries: u32,
    /// `None` once settled.
    entry: Option<Entry>,
}

impl MemoryAcker {
    fn release_slot(&self) {
        self.slots.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.slots.freed.notify_waiters();
    }

    fn requeue(&mut self, delay: Duration) {
        let Some(entry) = self.entry.take() else { return };
        self.release_slot();
        if entry.deliveries >= self.max_deliveries {
            let reason = format!("delivery limit reached ({} deliveries)", entry.deliveries);
            self.broker.dead_letter(entry.message, &reason);
            return;
        }
        if delay.is_zero() {
            lock(&self.queue.ready).push_front(entry);
            self.queue.notify.notify_waiters();
        } else {
            let queue = self.queue.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                lock(&queue.ready).push_back(entry);
                queue.notify.notify_waiters();
            });
        }
    }
}

#[async_trait]
impl Acknowledger for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BrokerError> {
        if self.entry.take().is_some() {
            self.release_slot();
        }
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<(), BrokerError> {
        self.requeue(delay);
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), BrokerError> {
        if let Some(entry) = self.entry.take() {
            self.release_slot();
            self.broker.dead_letter(entry.message, reason);
        }
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        // Abandoned without settling (the consumer died mid-message): deliver again.
        self.requeue(Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn depth_counts_waiting_messages_not_those_in_flight() {
        let broker = MemoryBroker::new();
        let mut sub = broker.subscribe(SubscribeOptions::new("t", "g").concurrency(1)).await.unwrap();
        for i in 0..3u8 {
            broker.publish(Message::new("t", vec![i])).await.unwrap();
        }
        assert_eq!(Broker::depth(&broker, "t", "g").await, Some(3));
        let delivery = sub.next().await.unwrap();
        assert_eq!(Broker::depth(&broker, "t", "g").await, Some(2));
        delivery.ack().await.unwrap();
        assert_eq!(Broker::depth(&broker, "other", "g").await, Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_makes_publishers_wait_until_a_message_is_taken() {
        let broker = MemoryBroker::with_capacity(2);
        let mut sub = broker.subscribe(SubscribeOptions::new("t", "g").concurrency(1)).await.unwrap();
        broker.publish(Message::new("t", vec![0])).await.unwrap();
        broker.publish(Message::new("t", vec![1])).await.unwrap();
        let third = tokio::spawn({
            let broker = broker.clone();
            async move { broker.publish(Message::new("t", vec![2])).await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!third.is_finished(), "a publish to a full queue went through");
        assert_eq!(broker.depth("t", "g"), 2);
        let first = sub.next().await.unwrap();
        third.await.unwrap().unwrap();
        assert_eq!(broker.depth("t", "g"), 2);
        first.ack().await.unwrap();
        for expected in 1..=2u8 {
            let delivery = sub.next().await.unwrap();
            assert_eq!(delivery.message.payload.as_ref(), &[expected]);
            delivery.ack().await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closing_releases_a_publisher_waiting_for_room() {
        let broker = MemoryBroker::with_capacity(1);
        broker.publish(Message::new("nobody-listens", vec![0])).await.unwrap();
        let waiting = tokio::spawn({
            let broker = broker.clone();
            async move { broker.publish(Message::new("nobody-listens", vec![1])).await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished());
        broker.close().await;
        assert!(matches!(waiting.await.unwrap(), Err(BrokerError::Closed)));
    }
}
