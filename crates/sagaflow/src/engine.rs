//! The engine: runs a flow's steps and compensations for the three modes,
//! writing every state change to the saga log before acting on it.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::{Broker, Delivery, MESSAGE_ID_HEADER, Message, REQUEST_ID_HEADER, SubscribeOptions, Subscription};
use crate::callback::{CallbackSink, CallbackStatus, SagaCallback};
use crate::error::{Error, Result};
use crate::flow::Flow;
use crate::log::{Begin, LogError, SagaLog};
use crate::metrics as m;
use crate::node::{NodeError, Phase, Step};
use crate::orchestrator::{FlowData, FlowInfo, Options};
use crate::saga::{Failure, Mode, NewSaga, Outcome, SagaEvent, SagaRecord, SagaState, now_ms};
use crate::waiters::{Completions, Waiter};

/// gRPC's RESOURCE_EXHAUSTED: the callee refused the call for load.
const RESOURCE_EXHAUSTED: i32 = 8;

/// What the engine shares across flows.
pub(crate) struct Engine {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) log: Arc<dyn SagaLog>,
    pub(crate) options: Options,
    pub(crate) completions: Arc<Completions>,
    pub(crate) callbacks: Option<Arc<dyn CallbackSink>>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) stats: Stats,
}

/// Counters the engine keeps.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) recovered: AtomicU64,
}

/// A hop of an async or throttled saga: run step `step` with `data`.
#[derive(Debug, Serialize, Deserialize)]
struct HopMessage {
    request_id: String,
    facade: String,
    step: usize,
    data: serde_json::Value,
}

/// Rollback work: compensate the saga `request_id` per its record.
#[derive(Debug, Serialize, Deserialize)]
struct RollbackMessage {
    request_id: String,
    facade: String,
}

/// Whether a sync saga runs for its caller or is recovered after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Fresh,
    Recovered,
}

/// How one action ended after its retries.
enum ActionError {
    /// Failed for good; `uncertain` if an attempt may have taken effect.
    Failed { error: NodeError, attempts: u32, uncertain: bool },
    /// The orchestrator is shutting down; the saga stays where the log has it.
    Interrupted,
}

/// How one compensation ended after its retries.
enum CompensationError {
    GaveUp { error: NodeError, attempts: u32 },
    Interrupted,
}

/// What a registered flow offers the orchestrator, whatever its data type.
#[async_trait]
pub(crate) trait Registered: Send + Sync + 'static {
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
    fn data_type(&self) -> &'static str;
    fn info(&self) -> FlowInfo;
    fn mode(&self) -> Mode;
    async fn start_consumers(self: Arc<Self>) -> Result<()>;
    async fn recover(self: Arc<Self>, record: SagaRecord) -> Result<()>;
    async fn resume_compensation(&self, record: &SagaRecord) -> Result<()>;
}

/// A flow registered under a facade, with its topics.
pub(crate) struct FlowRuntime<D: FlowData> {
    pub(crate) facade: Arc<str>,
    pub(crate) mode: Mode,
    pub(crate) flow: Flow<D>,
    pub(crate) engine: Arc<Engine>,
    node_names: Vec<Arc<str>>,
}

impl<D: FlowData> FlowRuntime<D> {
    pub(crate) fn new(facade: &str, mode: Mode, flow: Flow<D>, engine: Arc<Engine>) -> Self {
        let node_names = flow.nodes.iter().map(|n| Arc::from(n.name())).collect();
        Self { facade: facade.into(), mode, flow, engine, node_names }
    }

    /// The topic id of step `index` (`<facade>.<node>`), as configured.
    fn hop_topic_id(&self, index: usize) -> String {
        format!("{}.{}", self.facade, self.node_names[index])
    }

    fn rollback_topic_id(&self) -> String {
        format!("{}.rollback", self.facade)
    }

    /// The broker topic for a topic id: prefixed, and pod-suffixed where the
    /// caller waits in this pod (sync and throttling).
    fn topic(&self, id: &str) -> String {
        let o = &self.engine.options;
        match self.mode {
            Mode::Async => format!("{}.{id}", o.topic_prefix),
            Mode::Sync | Mode::Throttling => format!("{}.{id}.{}", o.topic_prefix, o.pod_id),
        }
    }

    fn encode(&self, request_id: &str, data: &D) -> Result<serde_json::Value> {
        serde_json::to_value(data).map_err(|source| Error::Data { request_id: request_id.to_owned(), source })
    }

    fn decode(&self, request_id: &str, value: serde_json::Value) -> Result<D> {
        serde_json::from_value(value).map_err(|source| Error::Data { request_id: request_id.to_owned(), source })
    }

    pub(crate) fn outcome(&self, record: &SagaRecord) -> Result<Outcome<D>> {
        match &record.state {
            SagaState::Completed => Ok(Outcome::Completed(self.decode(&record.request_id, record.data.clone())?)),
            SagaState::Compensated { failure } => Ok(Outcome::Compensated(failure.clone())),
            SagaState::Stuck { failure, reason, .. } => {
                Ok(Outcome::Stuck { failure: failure.clone(), reason: reason.clone() })
            }
            SagaState::Running | SagaState::Compensating { .. } => Err(Error::WaitTimeout(record.request_id.clone())),
        }
    }

    fn new_saga(&self, request_id: &str, data: serde_json::Value, callback_url: Option<String>) -> NewSaga {
        NewSaga {
            request_id: request_id.to_owned(),
            facade: self.facade.to_string(),
            mode: self.mode,
            steps: self.flow.len(),
            data,
            deadline_ms: now_ms() + self.flow.saga_timeout.as_millis() as u64,
            callback_url,
        }
    }

    fn span(&self, request_id: &str) -> tracing::Span {
        tracing::info_span!("saga", request_id = %request_id, facade = %self.facade)
    }

    // ---------------------------------------------------------------- entry points

    /// Sync flow: runs the saga here while the caller waits.
    pub(crate) async fn run_sync(self: &Arc<Self>, request_id: &str, data: D) -> Result<Outcome<D>> {
        let json = self.flow.encode_new(request_id, &data)?;
        let record = match self.engine.log.begin(self.new_saga(request_id, json, None)).await? {
            Begin::Exists(existing) => return self.await_existing(existing).await,
            Begin::Started(record) => record,
        };
        self.started();
        let deadline = Instant::now() + self.flow.saga_timeout;
        let id: Arc<str> = request_id.into();
        self.drive_forward(&id, data, record.completed, deadline, Run::Fresh).instrument(self.span(request_id)).await
    }

    /// Throttling flow: queues the first hop on this pod and waits for the end.
    pub(crate) async fn run_throttled(self: &Arc<Self>, request_id: &str, data: D) -> Result<Outcome<D>> {
        let json = self.flow.encode_new(request_id, &data)?;
        let mut waiter = self.engine.completions.register(request_id);
        match self.engine.log.begin(self.new_saga(request_id, json.clone(), None)).await? {
            Begin::Exists(existing) => {
                self.check_facade(&existing)?;
                let record = self.wait_end(&mut waiter, request_id).await?;
                return self.outcome(&record);
            }
            Begin::Started(_) => self.started(),
        }
        if let Err(error) = self.publish_hop(request_id, 0, json).await {
            self.fail_unsent(request_id, &error).await;
            return Err(error);
        }
        let record = self.wait_end(&mut waiter, request_id).await?;
        self.outcome(&record)
    }

    /// Async flow: records the saga and hands its first hop to the broker.
    pub(crate) async fn submit(
        self: &Arc<Self>,
        request_id: &str,
        data: D,
        callback_url: Option<String>,
    ) -> Result<()> {
        let json = self.flow.encode_new(request_id, &data)?;
        match self.engine.log.begin(self.new_saga(request_id, json.clone(), callback_url)).await? {
            Begin::Exists(existing) => return self.check_facade(&existing),
            Begin::Started(_) => self.started(),
        }
        if let Err(error) = self.publish_hop(request_id, 0, json).await {
            self.fail_unsent(request_id, &error).await;
            return Err(error);
        }
        Ok(())
    }

    /// A first hop that never reached the broker: nothing ran, so the saga
    /// ends compensated at once, and the caller gets the error.
    async fn fail_unsent(&self, request_id: &str, error: &Error) {
        let failure = Failure {
            step: 0,
            node: self.node_names[0].to_string(),
            error: format!("could not queue the first step: {error}"),
            code: Some(14),
        };
        let event =
            SagaEvent::StepFailed { failure, attempts: 0, compensate_failed: false, later_steps_in_doubt: false };
        match self.engine.log.append(request_id, event).await {
            Ok(record) => self.finish(&record).await,
            Err(e) => tracing::error!(request_id, error = %e, "could not record an unsent first hop"),
        }
    }

    fn check_facade(&self, existing: &SagaRecord) -> Result<()> {
        if existing.facade != *self.facade {
            return Err(Error::RequestIdInUse {
                request_id: existing.request_id.clone(),
                facade: existing.facade.clone(),
            });
        }
        Ok(())
    }

    /// A request id that already has a saga gets that saga's outcome.
    async fn await_existing(&self, existing: SagaRecord) -> Result<Outcome<D>> {
        self.check_facade(&existing)?;
        if existing.state.is_ended() {
            return self.outcome(&existing);
        }
        let mut waiter = self.engine.completions.register(&existing.request_id);
        let record = self.wait_end(&mut waiter, &existing.request_id).await?;
        self.outcome(&record)
    }

    /// Waits for the saga's end: the waiter is registered first, then the log
    /// is read, so an end in between is not missed.
    async fn wait_end(&self, waiter: &mut Waiter, request_id: &str) -> Result<SagaRecord> {
        if let Some(record) = self.engine.log.get(request_id).await?
            && record.state.is_ended()
        {
            return Ok(record);
        }
        match tokio::time::timeout(self.engine.options.wait_timeout, waiter.wait()).await {
            Ok(Some(record)) => Ok(record),
            Ok(None) => Err(Error::ShuttingDown),
            Err(_) => Err(Error::WaitTimeout(request_id.to_owned())),
        }
    }

    // ---------------------------------------------------------------- forward

    /// Runs steps `from..` in-process (sync flow and its recovery).
    ///
    /// A step's start and an intermediate step's result are queued, not awaited: nothing is
    /// acked, published or answered between steps, and the awaited write that ends the saga
    /// (the last result, or a failure) is stored no earlier. A crash can therefore lose the
    /// tail of a running saga's record; its recovery ([`Run::Recovered`]) treats every step from
    /// the recorded position on as possibly run.
    async fn drive_forward(
        &self,
        id: &Arc<str>,
        mut data: D,
        from: usize,
        deadline: Instant,
        run: Run,
    ) -> Result<Outcome<D>> {
        let last = self.flow.len().saturating_sub(1);
        for index in from..self.flow.len() {
            self.record_start(id, index).await?;
            match self.run_action(id, index, &mut data, deadline, run == Run::Recovered).await {
                Ok(attempts) => {
                    let json = self.encode(id, &data)?;
                    let event = SagaEvent::StepCompleted { index, attempts, data: json };
                    if index < last {
                        self.engine.log.append_queued(id, event).await?;
                        continue;
                    }
                    let record = self.engine.log.append(id, event).await?;
                    if record.state.is_ended() {
                        self.finish(&record).await;
                        return Ok(Outcome::Completed(data));
                    }
                }
                Err(ActionError::Interrupted) => return Err(Error::ShuttingDown),
                Err(ActionError::Failed { error, attempts, uncertain }) => {
                    let mut waiter = self.engine.completions.register(id);
                    // Recovered: steps after this one may have run before the crash, unless
                    // this one was refused outright (an idempotent upstream would have
                    // answered a replay of a call that took effect with its result).
                    let later = run == Run::Recovered && uncertain && index < last;
                    let record = self.record_failure(id, index, error, attempts, uncertain, later).await?;
                    if !record.state.is_ended() {
                        self.publish_rollback(&record).await?;
                    }
                    let record = self.wait_end(&mut waiter, id).await?;
                    return self.outcome(&record);
                }
            }
        }
        // Only reached when `from` was already past the last step.
        let record = self.engine.log.get(id).await?.ok_or_else(|| LogError::NotFound(id.to_string()))?;
        self.outcome(&record)
    }

    /// Records a step's start without waiting for its commit: the step's
    /// result, written next and awaited, is stored no earlier. A duplicate
    /// delivery that finds the saga moved on is not an error here.
    async fn record_start(&self, id: &str, index: usize) -> Result<()> {
        match self.engine.log.append_queued(id, SagaEvent::StepStarted { index }).await {
            Ok(()) | Err(LogError::Transition(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn record_failure(
        &self,
        id: &str,
        index: usize,
        error: NodeError,
        attempts: u32,
        uncertain: bool,
        later_steps_in_doubt: bool,
    ) -> Result<SagaRecord> {
        let node = &self.flow.nodes[index];
        tracing::warn!(step = index, node = node.name(), attempts, %error, "step failed; compensating");
        let failure = Failure {
            step: index,
            node: node.name().to_owned(),
            error: error.message().to_owned(),
            code: error.code(),
        };
        let compensate_failed = uncertain && node.has_compensation();
        let event = SagaEvent::StepFailed { failure, attempts, compensate_failed, later_steps_in_doubt };
        let record = self.engine.log.append(id, event).await?;
        if record.state.is_ended() {
            self.finish(&record).await;
        }
        Ok(record)
    }

    fn step(&self, id: &Arc<str>, index: usize, attempt: u32, phase: Phase, deadline: Instant) -> Step {
        Step {
            request_id: id.clone(),
            facade: self.facade.clone(),
            node: self.node_names[index].clone(),
            index,
            attempt,
            phase,
            deadline,
            cancel: self.engine.shutdown.child_token(),
        }
    }

    /// Calls step `index`'s action with timeouts and retries; a panic is a permanent error.
    /// `in_doubt`: an earlier run (before a crash, or an earlier delivery) may have called it,
    /// so a failure without a call of its own (the deadline passed first) is uncertain.
    async fn run_action(
        &self,
        id: &Arc<str>,
        index: usize,
        data: &mut D,
        deadline: Instant,
        in_doubt: bool,
    ) -> Result<u32, ActionError> {
        let node = &self.flow.nodes[index];
        let policy = &self.flow.retry;
        let mut uncertain = false;
        let mut attempt = 1;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let error = NodeError::permanent(format!("saga deadline passed before attempt {attempt}"));
                return Err(ActionError::Failed { error, attempts: attempt - 1, uncertain: uncertain || in_doubt });
            }
            let budget = self.flow.step_timeout.min(deadline - now);
            let step = self.step(id, index, attempt, Phase::Action, now + budget);
            let span = tracing::debug_span!("step", node = node.name(), index, attempt, phase = "action");
            let call = AssertUnwindSafe(node.action(&step, data)).catch_unwind().instrument(span);
            let result = tokio::time::timeout(budget, call).await;
            self.record_call(index, "action", now.elapsed(), attempt);
            let error = match result {
                Ok(Ok(Ok(()))) => match self.flow.oversize(data) {
                    None => return Ok(attempt),
                    Some(error) => {
                        uncertain = true;
                        error
                    }
                },
                Ok(Ok(Err(error))) => node.classify(error),
                Ok(Err(panic)) => {
                    uncertain = true;
                    NodeError::permanent(format!("node panicked: {}", panic_message(&panic)))
                }
                Err(_) => NodeError::timeout(budget),
            };
            // A transient error may hide an effect (a timeout, a lost connection), so the
            // failed step is compensated too; an explicit overload refusal
            // (RESOURCE_EXHAUSTED) says the call was not taken, so it is not.
            if error.is_retryable() && error.code() != Some(RESOURCE_EXHAUSTED) {
                uncertain = true;
            }
            if !error.is_retryable() || attempt >= policy.max_attempts {
                return Err(ActionError::Failed { error, attempts: attempt, uncertain });
            }
            let delay = policy.delay(attempt + 1);
            if Instant::now() + delay >= deadline {
                return Err(ActionError::Failed { error, attempts: attempt, uncertain });
            }
            tracing::debug!(step = index, attempt, %error, ?delay, "retrying step");
            tokio::select! {
                _ = self.engine.shutdown.cancelled() => return Err(ActionError::Interrupted),
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    // ---------------------------------------------------------------- compensation

    /// Calls step `index`'s compensation until it succeeds or the policy gives up.
    async fn run_compensation(&self, id: &Arc<str>, index: usize, data: &D) -> Result<u32, CompensationError> {
        let node = &self.flow.nodes[index];
        let policy = &self.flow.compensation_retry;
        let mut attempt = 1;
        loop {
            let budget = self.flow.step_timeout;
            let started = Instant::now();
            let step = self.step(id, index, attempt, Phase::Compensation, started + budget);
            let span = tracing::debug_span!("step", node = node.name(), index, attempt, phase = "compensation");
            let call = AssertUnwindSafe(node.compensate(&step, data)).catch_unwind().instrument(span);
            let result = tokio::time::timeout(budget, call).await;
            self.record_call(index, "compensation", started.elapsed(), attempt);
            let error = match result {
                Ok(Ok(Ok(()))) => {
                    self.count_compensation(index, "ok");
                    return Ok(attempt);
                }
                Ok(Ok(Err(error))) => node.classify(error),
                Ok(Err(panic)) => NodeError::permanent(format!("compensation panicked: {}", panic_message(&panic))),
                Err(_) => NodeError::timeout(budget),
            };
            if attempt >= policy.max_attempts {
                self.count_compensation(index, "gave_up");
                return Err(CompensationError::GaveUp { error, attempts: attempt });
            }
            let delay = policy.delay(attempt + 1);
            tracing::debug!(step = index, attempt, %error, ?delay, "retrying compensation");
            tokio::select! {
                _ = self.engine.shutdown.cancelled() => return Err(CompensationError::Interrupted),
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    /// Runs every pending compensation of the saga, recording each; returns
    /// the record once ended, or `None` if interrupted by shutdown.
    async fn compensate(&self, mut record: SagaRecord) -> Result<Option<SagaRecord>> {
        let id: Arc<str> = record.request_id.as_str().into();
        let data = self.decode(&id, record.data.clone())?;
        while let Some(index) = record.next_compensation() {
            if !self.flow.nodes[index].has_compensation() {
                record = self.append_or_reload(&id, SagaEvent::StepCompensated { index, attempts: 0 }).await?;
                continue;
            }
            let event = match self.run_compensation(&id, index, &data).await {
                Ok(attempts) => SagaEvent::StepCompensated { index, attempts },
                Err(CompensationError::Interrupted) => return Ok(None),
                Err(CompensationError::GaveUp { error, attempts }) => {
                    tracing::error!(step = index, attempts, %error, "compensation gave up; saga is stuck");
                    SagaEvent::CompensationGaveUp { index, attempts, reason: error.to_string() }
                }
            };
            record = self.append_or_reload(&id, event).await?;
        }
        Ok(Some(record))
    }

    /// Appends; if another delivery of the same work got there first, reads
    /// the record as it now is instead.
    async fn append_or_reload(&self, id: &str, event: SagaEvent) -> Result<SagaRecord> {
        match self.engine.log.append(id, event).await {
            Ok(record) => Ok(record),
            Err(LogError::Transition(e)) => {
                tracing::debug!(error = %e, "another delivery moved the saga on");
                Ok(self.engine.log.get(id).await?.ok_or_else(|| LogError::NotFound(id.to_owned()))?)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn record_call(&self, index: usize, phase: &'static str, took: Duration, attempt: u32) {
        let (facade, node) = (self.facade.to_string(), self.node_names[index].to_string());
        if attempt > 1 {
            metrics::counter!(m::STEP_RETRIES, "facade" => facade.clone(), "node" => node.clone(), "phase" => phase)
                .increment(1);
        }
        metrics::histogram!(m::STEP_SECONDS, "facade" => facade, "node" => node, "phase" => phase)
            .record(m::seconds(took));
    }

    fn count_compensation(&self, index: usize, result: &'static str) {
        let (facade, node) = (self.facade.to_string(), self.node_names[index].to_string());
        metrics::counter!(m::COMPENSATIONS, "facade" => facade, "node" => node, "result" => result).increment(1);
    }

    fn started(&self) {
        let mode = self.mode.to_string();
        metrics::counter!(m::SAGAS_STARTED, "facade" => self.facade.to_string(), "mode" => mode).increment(1);
        metrics::gauge!(m::SAGAS_IN_FLIGHT, "facade" => self.facade.to_string()).increment(1.0);
    }

    /// After a saga ends: count it, wake its waiters and deliver its callback.
    async fn finish(&self, record: &SagaRecord) {
        let status = record.status();
        tracing::debug!(%status, "saga ended");
        let (facade, mode) = (self.facade.to_string(), self.mode.to_string());
        metrics::counter!(m::SAGAS_ENDED, "facade" => facade.clone(), "mode" => mode, "outcome" => status.to_string())
            .increment(1);
        metrics::gauge!(m::SAGAS_IN_FLIGHT, "facade" => facade).decrement(1.0);
        self.engine.completions.complete(record);
        if let (Some(url), Some(sink)) = (&record.callback_url, &self.engine.callbacks) {
            let callback = SagaCallback {
                request_id: record.request_id.clone(),
                facade: record.facade.clone(),
                status: match &record.state {
                    SagaState::Completed => CallbackStatus::Completed,
                    SagaState::Compensated { .. } => CallbackStatus::Compensated,
                    _ => CallbackStatus::Stuck,
                },
                data: record.data.clone(),
                error: match &record.state {
                    SagaState::Compensated { failure } => Some(failure.to_string()),
                    SagaState::Stuck { reason, .. } => Some(reason.clone()),
                    _ => None,
                },
            };
            let sink = sink.clone();
            let url = url.clone();
            let log = self.engine.log.clone();
            let id = record.request_id.clone();
            let deliver = async move {
                let report = sink.deliver(&url, callback).await;
                let result = if report.delivered { "delivered" } else { "failed" };
                metrics::counter!(m::CALLBACKS, "result" => result).increment(1);
                if report.delivered {
                    tracing::debug!(attempts = report.attempts, "callback delivered");
                } else {
                    tracing::warn!(attempts = report.attempts, error = ?report.error, "callback not delivered");
                }
                let event = SagaEvent::CallbackDelivered {
                    delivered: report.delivered,
                    attempts: report.attempts,
                    error: report.error,
                };
                // Queued: nothing waits on this record, and a callback is not re-sent after a
                // crash either way, so it shares the commit of other sagas' writes.
                if let Err(e) = log.append_queued(&id, event).await {
                    tracing::warn!(error = %e, "could not record the callback delivery");
                }
            };
            self.engine.tasks.spawn(deliver.instrument(tracing::Span::current()));
        }
    }

    // ---------------------------------------------------------------- broker side

    async fn publish_hop(&self, request_id: &str, step: usize, data: serde_json::Value) -> Result<()> {
        let hop = HopMessage { request_id: request_id.to_owned(), facade: self.facade.to_string(), step, data };
        let payload =
            serde_json::to_vec(&hop).map_err(|source| Error::Data { request_id: request_id.into(), source })?;
        let message = Message::new(self.topic(&self.hop_topic_id(step)), payload)
            .header(REQUEST_ID_HEADER, request_id)
            .header(MESSAGE_ID_HEADER, format!("{request_id}:step:{step}"));
        self.publish(message).await
    }

    /// Publishes rollback work for the saga. Its message id is the same for
    /// every re-publish of one compensation round (so a broker that
    /// deduplicates drops the copies) and new after an operator's retry.
    async fn publish_rollback(&self, record: &SagaRecord) -> Result<()> {
        let request_id = record.request_id.as_str();
        let round = record.history.iter().filter(|h| h.event == "retry_compensation").count();
        let msg = RollbackMessage { request_id: request_id.to_owned(), facade: self.facade.to_string() };
        let payload =
            serde_json::to_vec(&msg).map_err(|source| Error::Data { request_id: request_id.into(), source })?;
        let message = Message::new(self.topic(&self.rollback_topic_id()), payload)
            .header(REQUEST_ID_HEADER, request_id)
            .header(MESSAGE_ID_HEADER, format!("{request_id}:rollback:{round}"));
        self.publish(message).await
    }

    async fn publish(&self, message: Message) -> Result<()> {
        let started = Instant::now();
        self.engine.broker.publish(message).await?;
        metrics::histogram!(m::PUBLISH_SECONDS, "broker" => self.engine.broker.name())
            .record(m::seconds(started.elapsed()));
        Ok(())
    }

    fn subscribe_options(&self, topic_id: &str) -> SubscribeOptions {
        let o = &self.engine.options;
        SubscribeOptions {
            topic: self.topic(topic_id),
            group: o.consumer_group.clone(),
            concurrency: o.concurrency_of(topic_id),
            max_deliveries: o.max_deliveries,
        }
    }

    async fn dead_letter(&self, delivery: Delivery, reason: String) {
        self.engine.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::DEAD_LETTERED, "topic" => delivery.message.topic.clone()).increment(1);
        tracing::warn!(topic = %delivery.message.topic, %reason, "poison message dead-lettered");
        if let Err(e) = delivery.dead_letter(&reason).await {
            tracing::error!(error = %e, "could not dead-letter a message");
        }
    }

    /// Settles a delivery whose handling failed for a transient reason.
    async fn retry_later(&self, delivery: Delivery, error: &Error) {
        tracing::warn!(topic = %delivery.message.topic, %error, "handling failed; message will be redelivered");
        if let Err(e) = delivery.nack(self.engine.options.redelivery_delay).await {
            tracing::error!(error = %e, "could not nack a message");
        }
    }

    async fn ack(&self, delivery: Delivery) {
        let started = Instant::now();
        let acked = delivery.ack().await;
        metrics::histogram!(m::ACK_SECONDS, "broker" => self.engine.broker.name())
            .record(m::seconds(started.elapsed()));
        if let Err(e) = acked {
            tracing::warn!(error = %e, "ack failed; the message may be redelivered (handled idempotently)");
        }
    }

    /// Handles one rollback message: compensates the saga per its record.
    async fn on_rollback(self: Arc<Self>, delivery: Delivery) {
        let msg: RollbackMessage = match serde_json::from_slice(&delivery.message.payload) {
            Ok(msg) => msg,
            Err(e) => return self.dead_letter(delivery, format!("not a rollback message: {e}")).await,
        };
        if msg.facade != *self.facade {
            let reason = format!("rollback for facade `{}` on the topic of `{}`", msg.facade, self.facade);
            return self.dead_letter(delivery, reason).await;
        }
        let span = self.span(&msg.request_id);
        async {
            let record = match self.engine.log.get(&msg.request_id).await {
                Ok(Some(record)) => record,
                Ok(None) => return self.dead_letter(delivery, format!("no saga `{}`", msg.request_id)).await,
                Err(e) => return self.retry_later(delivery, &e.into()).await,
            };
            if record.state.is_ended() {
                // A duplicate of work already done: wake any waiter, nothing more.
                self.engine.completions.complete(&record);
                return self.ack(delivery).await;
            }
            if !matches!(record.state, SagaState::Compensating { .. }) {
                let reason = format!("saga `{}` is {} and has nothing to compensate", msg.request_id, record.status());
                return self.dead_letter(delivery, reason).await;
            }
            match self.compensate(record).await {
                Ok(Some(record)) => {
                    self.finish(&record).await;
                    self.ack(delivery).await;
                }
                Ok(None) => drop(delivery), // shutting down: redelivered later
                Err(e @ Error::Data { .. }) => self.dead_letter(delivery, e.to_string()).await,
                Err(e) => self.retry_later(delivery, &e).await,
            }
        }
        .instrument(span)
        .await
    }

    /// Handles one hop: runs step `index`, records it, publishes what follows, then acks.
    async fn on_hop(self: Arc<Self>, index: usize, delivery: Delivery) {
        let hop: HopMessage = match serde_json::from_slice(&delivery.message.payload) {
            Ok(hop) => hop,
            Err(e) => return self.dead_letter(delivery, format!("not a hop message: {e}")).await,
        };
        if hop.facade != *self.facade {
            let reason = format!("hop for facade `{}` on a topic of `{}`", hop.facade, self.facade);
            return self.dead_letter(delivery, reason).await;
        }
        if hop.step != index {
            let reason = format!("hop for step {} on the topic of step {index} of `{}`", hop.step, self.facade);
            return self.dead_letter(delivery, reason).await;
        }
        let data: D = match serde_json::from_value(hop.data) {
            Ok(data) => data,
            Err(e) => {
                return self.dead_letter(delivery, format!("flow data does not fit `{}`: {e}", self.facade)).await;
            }
        };
        let span = self.span(&hop.request_id);
        let id: Arc<str> = hop.request_id.into();
        async {
            match self.run_hop(&id, index, data).await {
                Ok(true) => self.ack(delivery).await,
                Ok(false) => drop(delivery), // shutting down: redelivered later
                Err(e @ (Error::Data { .. } | Error::Log(LogError::NotFound(_)))) => {
                    self.dead_letter(delivery, e.to_string()).await
                }
                Err(e) => self.retry_later(delivery, &e).await,
            }
        }
        .instrument(span)
        .await
    }

    /// Returns `Ok(true)` when the delivery can be acked, `Ok(false)` when
    /// interrupted by shutdown.
    async fn run_hop(&self, id: &Arc<str>, index: usize, mut data: D) -> Result<bool> {
        let record = self.engine.log.get(id).await?.ok_or_else(|| LogError::NotFound(id.to_string()))?;
        match &record.state {
            SagaState::Running if record.completed == index => {}
            SagaState::Running if record.completed > index => {
                // A redelivery after the step was recorded: the next hop may
                // not have reached the broker, so send it again (the next
                // consumer ignores it if it did).
                self.publish_hop(id, record.completed, record.data.clone()).await?;
                return Ok(true);
            }
            SagaState::Running => {
                return Err(Error::Config(format!(
                    "hop for step {index} arrived while saga is at step {}",
                    record.completed
                )));
            }
            SagaState::Compensating { .. } => {
                self.publish_rollback(&record).await?;
                return Ok(true);
            }
            _ => {
                self.engine.completions.complete(&record);
                return Ok(true);
            }
        }
        let deadline = Instant::now() + Duration::from_millis(record.deadline_ms.saturating_sub(now_ms()));
        self.record_start(id, index).await?;
        // A hop may be a redelivery whose first delivery called the action.
        match self.run_action(id, index, &mut data, deadline, true).await {
            Ok(attempts) => {
                let json = self.encode(id, &data)?;
                let event = SagaEvent::StepCompleted { index, attempts, data: json.clone() };
                let record = match self.engine.log.append(id, event).await {
                    Ok(record) => record,
                    Err(LogError::Transition(_)) => return Ok(true), // a duplicate delivery recorded it first
                    Err(e) => return Err(e.into()),
                };
                if record.state.is_ended() {
                    self.finish(&record).await;
                } else {
                    self.publish_hop(id, index + 1, json).await?;
                }
                Ok(true)
            }
            Err(ActionError::Interrupted) => Ok(false),
            Err(ActionError::Failed { error, attempts, uncertain }) => {
                let record = match self.record_failure(id, index, error, attempts, uncertain, false).await {
                    Ok(record) => record,
                    Err(Error::Log(LogError::Transition(_))) => return Ok(true),
                    Err(e) => return Err(e),
                };
                if !record.state.is_ended() {
                    self.publish_rollback(&record).await?;
                }
                Ok(true)
            }
        }
    }
}

#[async_trait]
impl<D: FlowData> Registered for FlowRuntime<D> {
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }

    fn data_type(&self) -> &'static str {
        std::any::type_name::<D>()
    }

    fn info(&self) -> FlowInfo {
        FlowInfo {
            facade: self.facade.to_string(),
            mode: self.mode,
            nodes: self.flow.node_names(),
            compensations: self.flow.nodes.iter().map(|n| n.has_compensation()).collect(),
            topics: match self.mode {
                Mode::Sync => Vec::new(),
                _ => (0..self.flow.len()).map(|i| self.topic(&self.hop_topic_id(i))).collect(),
            },
            rollback_topic: self.topic(&self.rollback_topic_id()),
        }
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    async fn start_consumers(self: Arc<Self>) -> Result<()> {
        let rollback = self.engine.broker.subscribe(self.subscribe_options(&self.rollback_topic_id())).await?;
        let this = self.clone();
        spawn_consumer(
            &self.engine,
            rollback,
            self.engine.options.concurrency_of(&self.rollback_topic_id()),
            move |d| this.clone().on_rollback(d),
        );
        if self.mode == Mode::Sync {
            return Ok(());
        }
        for index in 0..self.flow.len() {
            let topic_id = self.hop_topic_id(index);
            let subscription = self.engine.broker.subscribe(self.subscribe_options(&topic_id)).await?;
            let this = self.clone();
            spawn_consumer(&self.engine, subscription, self.engine.options.concurrency_of(&topic_id), move |d| {
                this.clone().on_hop(index, d)
            });
        }
        Ok(())
    }

    async fn recover(self: Arc<Self>, record: SagaRecord) -> Result<()> {
        let id: Arc<str> = record.request_id.as_str().into();
        match (&record.state, self.mode) {
            (SagaState::Running, Mode::Sync) => {
                let data = self.decode(&id, record.data.clone())?;
                let deadline = Instant::now() + Duration::from_millis(record.deadline_ms.saturating_sub(now_ms()));
                let this = self.clone();
                let span = self.span(&id);
                self.engine.tasks.spawn(
                    async move {
                        let run = this.drive_forward(&id, data, record.completed, deadline, Run::Recovered);
                        if let Err(e) = run.await {
                            tracing::error!(error = %e, "recovered saga failed to run");
                        }
                    }
                    .instrument(span),
                );
            }
            (SagaState::Running, _) => self.publish_hop(&id, record.completed, record.data.clone()).await?,
            (SagaState::Compensating { .. }, _) => self.publish_rollback(&record).await?,
            _ => return Ok(()),
        }
        self.engine.stats.recovered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::RECOVERED, "facade" => self.facade.to_string()).increment(1);
        metrics::gauge!(m::SAGAS_IN_FLIGHT, "facade" => self.facade.to_string()).increment(1.0);
        Ok(())
    }

    async fn resume_compensation(&self, record: &SagaRecord) -> Result<()> {
        self.publish_rollback(record).await
    }
}

/// Consumes a subscription with at most `concurrency` handlers at once,
/// until shutdown; then lets the handlers in flight finish.
fn spawn_consumer<F, Fut>(engine: &Arc<Engine>, mut subscription: Subscription, concurrency: usize, handler: F)
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let shutdown = engine.shutdown.clone();
    let tasks = engine.tasks.clone();
    engine.tasks.spawn(async move {
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            };
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => break,
                delivery = subscription.next() => match delivery { Some(d) => d, None => break },
            };
            let work = handler(delivery);
            tasks.spawn(async move {
                // A panic outside a node (nodes' panics are caught where they run)
                // ends this task only; the unsettled delivery comes back.
                let _permit = permit;
                work.await;
            });
        }
    });
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
