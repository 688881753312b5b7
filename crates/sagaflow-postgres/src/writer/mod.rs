//! Group commit: the writer tasks that make every `begin` and `append`. Each takes all the
//! requests queued while it was busy, applies them to the sagas' records, writes the batch in
//! one statement (one round trip, one commit, one WAL flush) and answers every caller.
//!
//! The sagas are shared among the writers by request id, so a saga's requests are applied in the
//! order they were made. A request whose transition is refused fails alone; a failure of the
//! database fails the requests of the batch not yet committed, keeps its queued appends for the
//! next batch, and the writer connects again for that one.

mod cache;
mod commit;
mod plan;
mod request;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sagaflow::log::{Begin, LogError, LogHealth};
use sagaflow::{SagaEvent, SagaRecord};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::{mpsc, oneshot};

use cache::Cache;
use request::Request;

/// Requests one writer takes into a batch at most.
const MAX_BATCH: usize = 1024;
/// Requests waiting for a writer before callers wait to send theirs.
const QUEUE: usize = 4096;
/// Running sagas whose records a writer keeps, to write them without reading them first.
const CACHE: usize = 16_384;
/// Queued appends kept for the next batch after a failed one, at most (older ones are dropped).
const MAX_HELD: usize = 65_536;
/// A connection idle this long is pinged before a batch (a dead one is replaced, not failed).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);
/// After a failed connect, batches fail at once for this long rather than trying again each.
const CONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// While disconnected and idle, how often a writer tries to connect again (for its health).
const RECONNECT_EVERY: Duration = Duration::from_millis(500);

/// How a writer reaches the database.
#[derive(Clone)]
pub(crate) struct Connect {
    pub(crate) options: PgConnectOptions,
    pub(crate) timeout: Duration,
    /// Where, for messages, without the password.
    pub(crate) target: String,
}

/// The callers' side: where requests go, and the writers' health.
#[derive(Debug)]
pub(crate) struct Writers {
    senders: Vec<mpsc::Sender<Request>>,
    health: Vec<Arc<Health>>,
    target: String,
}

/// Why a writer cannot write now, if it cannot.
#[derive(Debug, Default)]
struct Health(Mutex<Option<String>>);

impl Health {
    fn set(&self, down: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = down;
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Writers {
    /// Starts `count` writers, each with a connection of its own (made on its first batch).
    pub(crate) fn spawn(connect: Connect, count: usize) -> Self {
        let count = count.max(1);
        let mut senders = Vec::with_capacity(count);
        let mut health = Vec::with_capacity(count);
        for _ in 0..count {
            let (tx, rx) = mpsc::channel(QUEUE);
            let shared = Arc::new(Health::default());
            let writer = Writer {
                rx,
                connect: connect.clone(),
                conn: None,
                last_used: Instant::now(),
                connect_failed: None,
                cache: Cache::new(CACHE),
                held: VecDeque::new(),
                health: shared.clone(),
            };
            tokio::spawn(writer.run());
            senders.push(tx);
            health.push(shared);
        }
        Self { senders, health, target: connect.target }
    }

    /// The writer of a saga: always the same one, so its requests keep their order.
    fn sender(&self, request_id: &str) -> &mpsc::Sender<Request> {
        let index = if self.senders.len() == 1 {
            0
        } else {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            request_id.hash(&mut hasher);
            (hasher.finish() % self.senders.len() as u64) as usize
        };
        &self.senders[index]
    }

    fn closed(&self) -> LogError {
        LogError::Unavailable(format!("PostgreSQL at {}: the saga log is closed", self.target))
    }

    async fn call<T>(&self, request_id: &str, make: impl FnOnce(request::Reply<T>) -> Request) -> Result<T, LogError> {
        let (reply, answer) = oneshot::channel();
        self.sender(request_id).send(make(reply)).await.map_err(|_| self.closed())?;
        answer.await.map_err(|_| self.closed())?
    }

    pub(crate) async fn begin(&self, record: SagaRecord) -> Result<Begin, LogError> {
        let id = record.request_id.clone();
        self.call(&id, |reply| Request::Begin { record, reply }).await
    }

    pub(crate) async fn append(
        &self,
        request_id: &str,
        event: SagaEvent,
        writer: Option<Arc<str>>,
    ) -> Result<SagaRecord, LogError> {
        self.call(request_id, |reply| Request::Append {
            request_id: request_id.to_owned(),
            event,
            writer,
            reply: Some(reply),
        })
        .await
    }

    /// Sends the append without waiting for its commit: the writer takes requests in order, so
    /// the saga's next awaited write is committed with it or after it.
    pub(crate) async fn append_queued(
        &self,
        request_id: &str,
        event: SagaEvent,
        writer: Option<Arc<str>>,
    ) -> Result<(), LogError> {
        let request = Request::Append { request_id: request_id.to_owned(), event, writer, reply: None };
        self.sender(request_id).send(request).await.map_err(|_| self.closed())
    }

    /// Stores what was sent so far, then stops every writer.
    pub(crate) async fn close(&self) {
        for sender in &self.senders {
            let (reply, done) = oneshot::channel();
            if sender.send(Request::Close(reply)).await.is_ok() {
                let _ = done.await;
            }
        }
    }

    pub(crate) fn health(&self) -> LogHealth {
        if self.senders.iter().any(|s| s.is_closed()) {
            return LogHealth::NotServing(format!("PostgreSQL at {}: the saga log is closed", self.target));
        }
        match self.health.iter().find_map(|h| h.get()) {
            Some(why) => LogHealth::NotServing(why),
            None => LogHealth::Serving,
        }
    }
}

/// One writer task.
struct Writer {
    rx: mpsc::Receiver<Request>,
    connect: Connect,
    /// `None` until the first batch, and after a failure until the next.
    conn: Option<PgConnection>,
    last_used: Instant,
    /// When a connect last failed, and why.
    connect_failed: Option<(Instant, String)>,
    cache: Cache,
    /// Requests for the next batch, before any new one: those after a saga's begin in its
    /// batch, and the queued appends of a batch that failed.
    held: VecDeque<Request>,
    health: Arc<Health>,
}

impl Writer {
    async fn run(mut self) {
        let mut close = None;
        loop {
            if self.held.is_empty() || self.is_down() {
                // Idle, or waiting out a failure: the next request, or a time to connect again.
                let next = if self.is_down() {
                    match tokio::time::timeout(RECONNECT_EVERY, self.rx.recv()).await {
                        Ok(next) => next.map(Some),
                        Err(_) => Some(None),
                    }
                } else {
                    self.rx.recv().await.map(Some)
                };
                match next {
                    None => break,
                    Some(Some(Request::Close(reply))) => {
                        close = Some(reply);
                        break;
                    }
                    Some(Some(request)) => self.held.push_back(request),
                    Some(None) => {
                        let connected = self.connection().await.map(|conn| self.conn = Some(conn)).is_ok();
                        if !connected || self.held.is_empty() {
                            continue;
                        }
                    }
                }
            }
            while self.held.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(Request::Close(reply)) => {
                        close = Some(reply);
                        break;
                    }
                    Ok(request) => self.held.push_back(request),
                    Err(_) => break,
                }
            }
            let batch: Vec<Request> = self.held.drain(..self.held.len().min(MAX_BATCH)).collect();
            self.commit(batch).await;
            if close.is_some() {
                break;
            }
        }
        // Closing, or every sender gone: what is held (a saga's requests after its begin,
        // queued appends) was sent before; store it.
        for _ in 0..3 {
            if self.held.is_empty() {
                break;
            }
            let batch: Vec<Request> = self.held.drain(..self.held.len().min(MAX_BATCH)).collect();
            self.commit(batch).await;
        }
        let unstored = self.held.iter().filter(|r| r.request_id().is_some()).count();
        if unstored > 0 {
            tracing::warn!(target = %self.connect.target, unstored, "saga log closed with writes it could not store");
        }
        let why = format!("PostgreSQL at {}: the saga log is closed", self.connect.target);
        self.held.drain(..).for_each(|r| r.fail(&why));
        self.rx.close();
        while let Ok(request) = self.rx.try_recv() {
            request.fail(&why);
        }
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
        if let Some(reply) = close {
            let _ = reply.send(());
        }
        tracing::debug!(target = %self.connect.target, "saga log writer stopped");
    }

    /// Disconnected after a failure.
    fn is_down(&self) -> bool {
        self.conn.is_none() && self.health.get().is_some()
    }

    /// The connection for a batch, taken out of the writer: connected now if need be, pinged
    /// first if it was idle a while. An error says why there is none.
    async fn connection(&mut self) -> Result<PgConnection, String> {
        if let Some(mut conn) = self.conn.take() {
            if self.last_used.elapsed() < PING_WHEN_IDLE_FOR || conn.ping().await.is_ok() {
                return Ok(conn);
            }
            tracing::debug!(target = %self.connect.target, "saga log connection went stale while idle; connecting again");
        }
        if let Some((at, why)) = &self.connect_failed
            && at.elapsed() < CONNECT_BACKOFF
        {
            return Err(why.clone());
        }
        let connected = tokio::time::timeout(self.connect.timeout, PgConnection::connect_with(&self.connect.options));
        let error = match connected.await {
            Ok(Ok(conn)) => {
                self.connect_failed = None;
                self.health.set(None);
                self.last_used = Instant::now();
                return Ok(conn);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no connection within {:?}", self.connect.timeout),
        };
        let why = format!("PostgreSQL at {}: cannot connect: {error}", self.connect.target);
        self.connect_failed = Some((Instant::now(), why.clone()));
        self.health.set(Some(why.clone()));
        Err(why)
    }

    /// After a failed batch: the connection is gone (the next batch makes a new one) and the
    /// log reports why until then.
    fn failed(&mut self, why: &str) {
        self.conn = None;
        self.health.set(Some(why.to_owned()));
        tracing::warn!(target = %self.connect.target, error = %why, "saga log batch failed; connecting again for the next");
    }

    /// Keeps a failed batch's queued appends for the next batch, in order, before the requests
    /// already held (which came after them); the oldest go beyond [`MAX_HELD`].
    fn hold_queued(&mut self, queued: Vec<Request>) {
        for request in queued.into_iter().rev() {
            self.held.push_front(request);
        }
        while self.held.len() > MAX_HELD {
            if let Some(dropped) = self.held.pop_front() {
                tracing::warn!(request_id = ?dropped.request_id(), "dropping a queued append held since a failed batch");
            }
        }
    }
}
