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

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sagaflow::SagaRecord;
use sagaflow::log::{Begin, LogError, LogHealth, SagaEvent};
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
    pub(crate) fn spawn(connect: Connect, count: usize, defer: Duration) -> Self {
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
                deferred: Deferred::new(defer),
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
        LogError::unavailable_msg(format!("PostgreSQL at {}: the saga log is closed", self.target))
    }

    async fn call<T>(&self, request_id: &str, make: impl FnOnce(request::Reply<T>) -> Request) -> Result<T, LogError> {
        let (reply, answer) = oneshot::channel();
        self.sender(request_id).send(make(reply)).await.map_err(|_| self.closed())?;
        answer.await.map_err(|_| self.closed())?
    }

    pub(crate) async fn begin(&self, record: SagaRecord) -> Result<Begin, LogError> {
        let id = record.request_id.clone();
        self.call(&id, |reply| Request::Begin { record: Box::new(record), reply }).await
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
    connect_failed: Option<(Instant, LogError)>,
    cache: Cache,
    /// Requests for the next batch, before any new one: those after a saga's begin in its
    /// batch, and the queued appends of a batch that failed.
    held: VecDeque<Request>,
    deferred: Deferred,
    health: Arc<Health>,
}

/// Queued appends of sagas that had no awaited write in their batch: they wait, up to `delay`,
/// for the saga's next batch, so that one row write takes them all.
pub(crate) struct Deferred {
    delay: Duration,
    /// By request id: since when, and the appends in order.
    sagas: HashMap<String, (Instant, Vec<Request>)>,
    /// Request ids in the order they were deferred (a saga written since is skipped).
    order: VecDeque<(Instant, String)>,
}

impl Deferred {
    pub(crate) fn new(delay: Duration) -> Self {
        Self { delay, sagas: HashMap::new(), order: VecDeque::new() }
    }

    /// When the oldest deferred appends are due.
    fn next_due(&self) -> Option<Instant> {
        self.order.front().map(|(since, _)| *since + self.delay)
    }

    /// Takes the saga's deferred appends, with since when they wait.
    fn take(&mut self, request_id: &str) -> Option<(Instant, Vec<Request>)> {
        self.sagas.remove(request_id)
    }

    /// Defers a saga's queued appends, waiting since `since` (`None`: new ones, from now);
    /// `false`, with nothing deferred, when deferring is off or they are due.
    fn defer(&mut self, request_id: &str, since: Option<Instant>, requests: &mut Vec<Request>) -> bool {
        let now = Instant::now();
        let at = since.unwrap_or(now);
        if self.delay.is_zero() || now >= at + self.delay {
            return false;
        }
        // Appends deferred before are in `order` already, under the time they wait since.
        if since.is_none() {
            self.order.push_back((at, request_id.to_owned()));
        }
        self.sagas.insert(request_id.to_owned(), (at, std::mem::take(requests)));
        true
    }

    /// The sagas whose appends are due (all of them if `all`), each with its appends.
    fn due(&mut self, all: bool) -> Vec<(String, Vec<Request>)> {
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some((since, _)) = self.order.front()
            && (all || now >= *since + self.delay)
        {
            let Some((since, id)) = self.order.pop_front() else { break };
            if self.sagas.get(&id).is_some_and(|(at, _)| *at == since)
                && let Some((_, requests)) = self.sagas.remove(&id)
            {
                due.push((id, requests));
            }
        }
        due
    }

    fn is_empty(&self) -> bool {
        self.sagas.is_empty()
    }
}

impl Writer {
    async fn run(mut self) {
        let mut close = None;
        loop {
            if self.held.is_empty() || self.is_down() {
                // Idle, or waiting out a failure: the next request, or a time to connect again,
                // or the time deferred appends are due.
                let down = self.is_down();
                let wake = if down { Some(Instant::now() + RECONNECT_EVERY) } else { self.deferred.next_due() };
                let next = match wake {
                    Some(at) => {
                        match tokio::time::timeout_at(tokio::time::Instant::from_std(at), self.rx.recv()).await {
                            Ok(next) => next.map(Some),
                            Err(_) => Some(None),
                        }
                    }
                    None => self.rx.recv().await.map(Some),
                };
                match next {
                    None => break,
                    Some(Some(Request::Close(reply))) => {
                        close = Some(reply);
                        break;
                    }
                    // After a failure, a caller who waits has the writer connect again at once;
                    // while the database stays out of reach, it is told so (it retries, and a
                    // sync caller hears of the outage). A queued append waits here, in order.
                    Some(Some(request)) if down && request.is_awaited() => match self.connection().await {
                        Ok(conn) => {
                            self.conn = Some(conn);
                            self.held.push_back(request);
                        }
                        Err(why) => request.fail(&why),
                    },
                    Some(Some(request)) => self.held.push_back(request),
                    Some(None) if down => {
                        let connected = self.connection().await.map(|conn| self.conn = Some(conn)).is_ok();
                        let due = self.deferred.next_due().is_some_and(|at| at <= Instant::now());
                        if !connected || (self.held.is_empty() && !due) {
                            continue;
                        }
                    }
                    // Deferred appends are due: a batch for them.
                    Some(None) => {}
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
            self.commit(batch, false).await;
            if close.is_some() {
                break;
            }
        }
        // Closing, or every sender gone: what is held (a saga's requests after its begin,
        // queued appends) or deferred was sent before; store it.
        for _ in 0..3 {
            if self.held.is_empty() && self.deferred.is_empty() {
                break;
            }
            let batch: Vec<Request> = self.held.drain(..self.held.len().min(MAX_BATCH)).collect();
            self.commit(batch, true).await;
        }
        self.held.extend(self.deferred.due(true).into_iter().flat_map(|(_, requests)| requests));
        let unstored = self.held.iter().filter(|r| r.request_id().is_some()).count();
        if unstored > 0 {
            tracing::warn!(target = %self.connect.target, unstored, "saga log closed with writes it could not store");
        }
        let why = LogError::unavailable_msg(format!("PostgreSQL at {}: the saga log is closed", self.connect.target));
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
    async fn connection(&mut self) -> Result<PgConnection, LogError> {
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
        let context = format!("PostgreSQL at {}: cannot connect", self.connect.target);
        let why = match connected.await {
            Ok(Ok(conn)) => {
                self.connect_failed = None;
                self.health.set(None);
                self.last_used = Instant::now();
                return Ok(conn);
            }
            Ok(Err(e)) => LogError::unavailable(context, e),
            Err(_) => LogError::unavailable_msg(format!("{context}: no connection within {:?}", self.connect.timeout)),
        };
        self.connect_failed = Some((Instant::now(), why.clone()));
        self.health.set(Some(why.to_string()));
        Err(why)
    }

    /// After a failed batch: the connection is gone (the next batch makes a new one) and the
    /// log reports why until then.
    fn failed(&mut self, why: &LogError) {
        self.conn = None;
        self.health.set(Some(why.to_string()));
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
