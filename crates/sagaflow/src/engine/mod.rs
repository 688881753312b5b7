//! The engine: runs a flow's steps and compensations for the three modes,
//! writing every state change to the saga log before acting on it.

use std::any::Any;
use std::collections::HashMap;
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
use crate::saga::{
    Failure, FlowVersion, HistoryEvent, Mode, NewSaga, Next, OnHop, Outcome, SagaEvent, SagaRecord, SagaState, Stage,
    StepStatus, now_ms,
};
use crate::waiters::{Completions, Waiter};

use branches::Branches;
pub(crate) use claims::{Claim, Claims, Work};

mod branches;
mod claims;
mod compensation;
mod effects;
mod forward;
mod hops;

/// A facade's pause: who set it, and whether new calls wait for the resume instead of being
/// refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pause {
    pub(crate) by: String,
    pub(crate) hold: bool,
}

/// How often a caller waiting for a saga on a shared log re-reads it.
const REREAD: Duration = Duration::from_secs(1);

/// What the engine shares across flows.
pub(crate) struct Engine {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) log: Arc<dyn SagaLog>,
    pub(crate) options: Options,
    pub(crate) completions: Arc<Completions>,
    /// The sagas this process works on right now.
    pub(crate) claims: Arc<Claims>,
    /// Facades an operator paused, as the log last said.
    pub(crate) paused: std::sync::RwLock<HashMap<String, Pause>>,
    /// Woken whenever the pauses may have changed, for the calls a holding pause keeps waiting.
    pub(crate) pauses_changed: tokio::sync::Notify,
    /// Slots for sync sagas running here (see `Options::max_running_sagas`).
    pub(crate) running: Arc<tokio::sync::Semaphore>,
    /// Sync sagas taken in: running or waiting for a slot (see `Options::max_waiting_sagas`).
    pub(crate) admitted: Arc<tokio::sync::Semaphore>,
    /// Slots for callbacks being delivered (see `Options::max_callback_deliveries`).
    pub(crate) callback_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) callbacks: Option<Arc<dyn CallbackSink>>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) stats: Stats,
}

/// Counters the engine keeps, and its per-hop metric handles (taken at first use, see
/// [`effects::Meters`]).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) recovered: AtomicU64,
    pub(crate) resumed_stale: AtomicU64,
    pub(crate) taken_over: AtomicU64,
    publish_seconds: std::sync::OnceLock<metrics::Histogram>,
    ack_seconds: std::sync::OnceLock<metrics::Histogram>,
}

/// A hop of an async or throttled saga: run step `step` of flow version
/// `version` (a fingerprint; none from a sender that predates versions: the
/// current flow) with `data`.
#[derive(Debug, Serialize, Deserialize)]
struct HopMessage {
    request_id: String,
    facade: String,
    step: usize,
    data: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
}

/// Rollback work: compensate the saga `request_id` per its record, on flow
/// version `version` (as in [`HopMessage`]).
#[derive(Debug, Serialize, Deserialize)]
struct RollbackMessage {
    request_id: String,
    facade: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
}

/// Whether a sync saga runs for its caller or is recovered after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Fresh,
    Recovered,
}

/// Why an unfinished saga is picked up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// At start: the process that drove it is gone.
    Restart,
    /// By the sweep: it made no progress for longer than its timeout and
    /// nothing in this process works on it.
    Stale,
    /// Taken over from a replica whose lease ran out.
    Takeover,
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
    /// The registered version of the facade's flow that runs this saga: the one it
    /// started on. A saga that recorded none (begun before versions were recorded)
    /// runs on the current flow, or the first kept one, of one step after another
    /// with as many steps as it has.
    fn resolve(self: Arc<Self>, record: &SagaRecord) -> Option<Arc<dyn Registered>>;
    async fn start_consumers(self: Arc<Self>) -> Result<()>;
    async fn recover(self: Arc<Self>, record: SagaRecord, why: Resume) -> Result<()>;
    /// Carries out what an operator's event left to do: the end's effects if
    /// it ended the saga (this writer ended it), its compensation if pending.
    async fn carry_on(&self, record: &SagaRecord) -> Result<()>;
    /// Consumes the per-pod topics of replica `pod` (gone; its sagas taken
    /// over here), so nothing waits there for a pod that never comes back,
    /// until `drain` is stopped: by the first message of a saga that `pod`
    /// owns again (it came back), or by shutdown.
    async fn drain(self: Arc<Self>, drain: Arc<Drain>) -> Result<()>;
}

/// The per-pod topics of a replica whose sagas were taken over here, consumed
/// for it until it comes back under its pod id.
#[derive(Debug)]
pub(crate) struct Drain {
    /// The replica whose topics these are.
    pub(crate) pod: String,
    /// Stops the drain's consumers.
    pub(crate) stop: CancellationToken,
}

impl Drain {
    pub(crate) fn new(pod: &str, shutdown: &CancellationToken) -> Self {
        Self { pod: pod.to_owned(), stop: shutdown.child_token() }
    }

    /// Whether a message of these topics belongs to the replica itself: a saga it
    /// owns that has not ended can only be one it began after coming back (the
    /// takeover moved every unfinished saga it had). Then the drain stops, and the
    /// message must be left to the broker to hand to the replica, not acked here.
    pub(crate) fn hand_back(&self, record: &SagaRecord) -> bool {
        if record.owner.as_deref() != Some(self.pod.as_str()) || record.state.is_ended() {
            return false;
        }
        if !self.stop.is_cancelled() {
            tracing::info!(replica = %self.pod, "replica is back: its topics are its own again");
            self.stop.cancel();
        }
        true
    }
}

/// One version of a flow registered under a facade, with its topics. The
/// facade's current version also holds the versions kept beside it, and its
/// consumers hand each message to the version it names.
pub(crate) struct FlowRuntime<D: FlowData> {
    pub(crate) facade: Arc<str>,
    pub(crate) mode: Mode,
    pub(crate) flow: Flow<D>,
    pub(crate) engine: Arc<Engine>,
    node_names: Vec<Arc<str>>,
    version: FlowVersion,
    kept: Vec<Arc<FlowRuntime<D>>>,
    meters: effects::Meters,
}

impl<D: FlowData> FlowRuntime<D> {
    pub(crate) fn new(facade: &str, mode: Mode, mut flow: Flow<D>, engine: Arc<Engine>) -> Self {
        let kept = std::mem::take(&mut flow.kept)
            .into_iter()
            .map(|old| Arc::new(Self::new(facade, mode, old, engine.clone())))
            .collect();
        let node_names = flow.nodes.iter().map(|n| Arc::from(n.name())).collect();
        let version = flow.version();
        let meters = effects::Meters::new(flow.nodes.len());
        Self { facade: facade.into(), mode, flow, engine, node_names, version, kept, meters }
    }

    /// The version whose fingerprint is `fingerprint` (`None`: this, the current one).
    fn runtime_for(self: &Arc<Self>, fingerprint: Option<&str>) -> Option<Arc<Self>> {
        match fingerprint {
            None => Some(self.clone()),
            Some(f) if f == self.version.fingerprint => Some(self.clone()),
            Some(f) => self.kept.iter().find(|k| k.version.fingerprint == f).cloned(),
        }
    }

    /// The node names of every version, each once, the current version's first:
    /// a hop topic is per node name, shared by the versions that have the node.
    fn all_node_names(&self) -> Vec<Arc<str>> {
        let mut names = self.node_names.clone();
        for kept in &self.kept {
            for name in &kept.node_names {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        names
    }

    /// The topic id of node `node` (`<facade>.<node>`), as configured.
    fn node_topic_id(&self, node: &str) -> String {
        format!("{}.{node}", self.facade)
    }

    /// The topic id of step `index` (`<facade>.<node>`), as configured.
    fn hop_topic_id(&self, index: usize) -> String {
        self.node_topic_id(&self.node_names[index])
    }

    fn rollback_topic_id(&self) -> String {
        format!("{}.rollback", self.facade)
    }

    /// The broker topic for a topic id: prefixed, and pod-suffixed where the
    /// caller waits in this pod (sync and throttling).
    fn topic(&self, id: &str) -> String {
        self.topic_of(id, &self.engine.options.pod_id)
    }

    /// The broker topic for a topic id in pod `pod`.
    fn topic_of(&self, id: &str, pod: &str) -> String {
        let prefix = &self.engine.options.topic_prefix;
        match self.mode {
            Mode::Async => format!("{prefix}.{id}"),
            Mode::Sync | Mode::Throttling => format!("{prefix}.{id}.{pod}"),
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
        // On a shared log a saga belongs to the replica that began it: a sync or
        // throttling saga's steps run there (its hops wait on that pod's topics); an
        // async saga's hops go to any replica, and its owner answers for its recovery.
        let owner = self.engine.log.shared().then(|| self.engine.options.pod_id.clone());
        NewSaga {
            request_id: request_id.to_owned(),
            facade: self.facade.to_string(),
            mode: self.mode,
            steps: self.flow.len(),
            data,
            deadline_ms: now_ms() + self.flow.saga_timeout.as_millis() as u64,
            callback_url,
            owner,
            version: Some(self.version.clone()),
        }
    }

    fn span(&self, request_id: &str) -> tracing::Span {
        tracing::info_span!("saga", request_id = %request_id, facade = %self.facade)
    }

    // ---------------------------------------------------------------- entry points

    /// Sync flow: runs the saga in a task of its own, so that a caller who
    /// gives up (a cancelled call, a passed deadline) does not cut it short;
    /// the caller only waits for its outcome.
    pub(crate) async fn run_sync(self: &Arc<Self>, request_id: &str, data: D) -> Result<Outcome<D>> {
        let json = self.flow.encode_new(request_id, &data)?;
        // Beyond the sagas running and the callers waiting for a slot, a call is refused
        // rather than queued: the memory in hand stays bounded whatever the load.
        let admitted = self.engine.admitted.clone().try_acquire_owned().map_err(|e| match e {
            tokio::sync::TryAcquireError::Closed => Error::ShuttingDown,
            tokio::sync::TryAcquireError::NoPermits => Error::Overloaded {
                running: self.engine.options.max_running_sagas,
                waiting: self.engine.options.max_waiting_sagas,
            },
        })?;
        // The slot is taken while the caller still waits: one who gives up
        // before a slot is free has started nothing.
        let slot = self.engine.running.clone().acquire_owned().await.map_err(|_| Error::ShuttingDown)?;
        let this = self.clone();
        let id: Arc<str> = request_id.into();
        let span = self.span(request_id);
        // Boxed once here: the saga's future is several KiB, and every wrapper below (task
        // local, span, tracker, the task's cell and its output slot) would move it again.
        let saga = Box::pin(async move {
            let _slot = (slot, admitted);
            let record = match this.engine.log.begin(this.new_saga(&id, json, None)).await? {
                Begin::Exists(existing) => return Ok(Err(existing)),
                Begin::Pruned(tombstone) => return Err(tombstone.into()),
                Begin::Started(record) => record,
            };
            this.started();
            let Ok(_claim) = this.engine.claims.claim(&id, Work::Forward(0)) else {
                return Ok(Err(record));
            };
            let deadline = Instant::now() + this.flow.saga_timeout;
            this.drive_forward(record, data, deadline, Run::Fresh).await.map(Ok)
        });
        // A caller is not kept waiting on an outage of the log: told after a
        // moment, it may ask again with the same request id; the saga goes on.
        let (outage, mut told) = tokio::sync::watch::channel(None);
        let saga = claims::OUTAGE.scope(outage, saga.instrument(span));
        let answer = tokio::select! {
            answer = self.detached(request_id, saga) => answer,
            Ok(reason) = told.wait_for(Option::is_some) => {
                let (context, source) = reason.clone().unwrap_or_default();
                return Err(Error::Log(LogError::Unavailable {
                    context: format!(
                        "saga `{request_id}` goes on once the log is back, ask again with the same request id; {context}"
                    ),
                    source,
                }));
            }
        };
        match answer {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(existing)) => self.await_existing(existing).await,
            // Taken over by another replica while this one was cut off: it ends there.
            Err(Error::Log(LogError::NotOwner { .. })) => {
                let record = self.engine.log.get(request_id).await?;
                self.await_existing(record.ok_or_else(|| LogError::NotFound(request_id.to_owned()))?).await
            }
            Err(e) => Err(e),
        }
    }

    /// Throttling flow: queues the first hop on this pod and waits for the end.
    pub(crate) async fn run_throttled(self: &Arc<Self>, request_id: &str, data: D) -> Result<Outcome<D>> {
        let json = self.flow.encode_new(request_id, &data)?;
        let mut waiter = self.engine.completions.register(request_id);
        if let Some(existing) = self.start_queued(request_id, json, None).await? {
            self.check_facade(&existing)?;
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
        match self.start_queued(request_id, json, callback_url).await? {
            Some(existing) => self.check_facade(&existing),
            None => Ok(()),
        }
    }

    /// Records a throttling or async saga and publishes its first hop, in a
    /// task of its own so that a caller who gives up halfway leaves no saga
    /// recorded but never queued. `Some` with the saga that already has the id.
    async fn start_queued(
        self: &Arc<Self>,
        request_id: &str,
        json: serde_json::Value,
        callback_url: Option<String>,
    ) -> Result<Option<SagaRecord>> {
        let this = self.clone();
        let id = request_id.to_owned();
        let start = async move {
            let record = match this.engine.log.begin(this.new_saga(&id, json, callback_url)).await? {
                Begin::Exists(existing) => return Ok(Some(existing)),
                Begin::Pruned(tombstone) => return Err(tombstone.into()),
                Begin::Started(record) => record,
            };
            this.started();
            if let Err(error) = this.publish_next(&record).await {
                this.fail_unsent(&id, &error).await;
                return Err(error);
            }
            Ok(None)
        };
        self.detached(request_id, start).await
    }

    /// Runs `work` as a task the orchestrator tracks (shutdown waits for it)
    /// and waits for its result, at most `wait_timeout`. A caller who stops
    /// waiting leaves the task running.
    async fn detached<T: Send + 'static>(
        &self,
        request_id: &str,
        work: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let task = self.engine.tasks.spawn(work);
        match tokio::time::timeout(self.engine.options.wait_timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => {
                tracing::error!(request_id, error = %e, "a saga's task ended without an answer");
                Err(Error::TaskLost(request_id.to_owned()))
            }
            Err(_) => Err(Error::WaitTimeout(request_id.to_owned())),
        }
    }

    /// A first hop the broker did not confirm: the saga ends compensated at
    /// once, and the caller gets the error. The hop may still have reached the
    /// broker (a lost confirm), so step 0 counts as possibly run and is
    /// compensated (with its siblings, whose hops may have gone out, when the
    /// flow starts with parallel branches); a hop delivered after this finds
    /// the saga ended.
    async fn fail_unsent(&self, request_id: &str, error: &Error) {
        let failure = Failure {
            step: 0,
            node: self.node_names[0].to_string(),
            error: format!("could not queue the first step: {error}"),
            code: None,
        };
        let compensate_failed = self.flow.nodes[0].has_compensation();
        let later_steps_in_doubt = self.version.shape.stage_of(0).is_parallel();
        let event = SagaEvent::StepFailed { failure, attempts: 0, compensate_failed, later_steps_in_doubt };
        let id: Arc<str> = request_id.into();
        match self.engine.durably(|| self.engine.log.append(request_id, event.clone())).await {
            Ok(record) if record.state.is_ended() => self.finish(&record).await,
            Ok(record) => {
                if let Err(e) = self.compensate_here(&id, record).await {
                    tracing::error!(request_id, error = %e, "could not compensate a saga whose first hop was lost");
                }
            }
            Err(e) => tracing::error!(request_id, error = %e, "could not record an unsent first hop"),
        }
    }

    /// Whether the saga belongs to another replica of a shared log (taken
    /// over from this one): this replica must leave it alone.
    fn foreign(&self, record: &SagaRecord) -> bool {
        self.engine.log.shared()
            && record.mode != Mode::Async
            && record.owner.as_deref().is_some_and(|o| o != self.engine.options.pod_id)
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
    /// is read, so an end in between is not missed. On a log that replicas
    /// share, the saga may end in another replica: its announcement wakes the
    /// waiter, and the log is re-read every [`REREAD`] in case one is missed.
    /// Stops waiting when the orchestrator shuts down: the work left (a queued
    /// hop or rollback) is the next start's, and a caller held until its
    /// timeout would hold the shutdown up as long.
    async fn wait_end(&self, waiter: &mut Waiter, request_id: &str) -> Result<SagaRecord> {
        let until = Instant::now() + self.engine.options.wait_timeout;
        let shared = self.engine.log.shared();
        loop {
            if let Some(record) = self.engine.log.get(request_id).await?
                && record.state.is_ended()
            {
                return Ok(record);
            }
            let now = Instant::now();
            if now >= until {
                return Err(Error::WaitTimeout(request_id.to_owned()));
            }
            let wait = if shared { REREAD.min(until - now) } else { until - now };
            let ended = tokio::select! {
                _ = self.engine.shutdown.cancelled() => return Err(Error::ShuttingDown),
                ended = tokio::time::timeout(wait, waiter.wait()) => ended,
            };
            match ended {
                Ok(Some(record)) => return Ok(record),
                Ok(None) => return Err(Error::ShuttingDown),
                Err(_) => {}
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
            paused: self.engine.paused.read().unwrap_or_else(|e| e.into_inner()).contains_key(&*self.facade),
            version: self.version.clone(),
            kept: self.kept.iter().map(|k| k.version.clone()).collect(),
        }
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    fn resolve(self: Arc<Self>, record: &SagaRecord) -> Option<Arc<dyn Registered>> {
        let runtime = match &record.version {
            Some(version) => self.runtime_for(Some(&version.fingerprint)),
            // Begun before versions were recorded, so before parallel stages: a linear flow.
            None => std::iter::once(&self)
                .chain(&self.kept)
                .find(|r| r.flow.len() == record.steps && r.version.shape.is_linear())
                .cloned(),
        };
        runtime.map(|r| r as Arc<dyn Registered>)
    }

    async fn start_consumers(self: Arc<Self>) -> Result<()> {
        let rollback = self.engine.broker.subscribe(self.subscribe_options(&self.rollback_topic_id())).await?;
        let this = self.clone();
        spawn_consumer(
            &self.engine,
            rollback,
            self.engine.options.concurrency_of(&self.rollback_topic_id()),
            self.engine.shutdown.clone(),
            move |d| this.clone().dispatch_rollback(d, None),
        );
        if self.mode == Mode::Sync {
            return Ok(());
        }
        for node in self.all_node_names() {
            let topic_id = self.node_topic_id(&node);
            let subscription = self.engine.broker.subscribe(self.subscribe_options(&topic_id)).await?;
            let this = self.clone();
            let concurrency = self.engine.options.concurrency_of(&topic_id);
            spawn_consumer(&self.engine, subscription, concurrency, self.engine.shutdown.clone(), move |d| {
                this.clone().dispatch_hop(node.clone(), d, None)
            });
        }
        Ok(())
    }

    async fn recover(self: Arc<Self>, record: SagaRecord, why: Resume) -> Result<()> {
        let id: Arc<str> = record.request_id.as_str().into();
        match (record.next(), self.mode) {
            (Next::Run(Stage { first: index, .. }) | Next::Join(Stage { first: index, .. }), Mode::Sync) => {
                let data = match self.decode(&id, record.data.clone()) {
                    Ok(data) => data,
                    Err(error) => return self.halt(&id, &error).await.map(drop),
                };
                let this = self.clone();
                let span = self.span(&id);
                self.engine.tasks.spawn(
                    async move {
                        // Recovered sagas share the slots of fresh ones: ten thousand
                        // unfinished at a restart do not all run at once.
                        let Ok(_slot) = this.engine.running.clone().acquire_owned().await else { return };
                        let Ok(_claim) = this.engine.claims.claim(&id, Work::Forward(index)) else {
                            return; // already driven here
                        };
                        let left = Duration::from_millis(record.deadline_ms.saturating_sub(now_ms()));
                        let run = this.drive_forward(record, data, Instant::now() + left, Run::Recovered);
                        if let Err(e) = run.await {
                            tracing::error!(error = %e, "recovered saga failed to run");
                        }
                    }
                    .instrument(span),
                );
            }
            (Next::Run(_), _) => self.publish_next(&record).await?,
            (Next::Join(stage), _) => self.join_hops(&id, &record, stage).await?,
            (Next::Compensate(_), _) => {
                if let Err(e) = self.publish_rollback(&record).await {
                    tracing::warn!(request_id = %id, error = %e, "could not queue a compensation; compensating here");
                    let this = self.clone();
                    self.engine.tasks.spawn(async move {
                        if let Err(e) = this.compensate_here(&id, record).await {
                            tracing::error!(request_id = %id, error = %e, "compensation failed; the sweep retries it");
                        }
                    });
                }
            }
            _ => return Ok(()),
        }
        let facade = self.facade.to_string();
        match why {
            Resume::Restart => {
                self.engine.stats.recovered.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::RECOVERED, "facade" => facade).increment(1);
                self.in_flight().increment(1.0);
            }
            Resume::Stale => {
                self.engine.stats.resumed_stale.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::RESUMED_STALE, "facade" => facade).increment(1);
            }
            Resume::Takeover => {
                self.engine.stats.taken_over.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::TAKEN_OVER, "facade" => facade).increment(1);
                self.in_flight().increment(1.0);
            }
        }
        Ok(())
    }

    async fn carry_on(&self, record: &SagaRecord) -> Result<()> {
        match record.next() {
            Next::Compensate(_) => self.publish_rollback(record).await,
            Next::End => {
                self.finish(record).await;
                Ok(())
            }
            Next::Run(_) | Next::Join(_) | Next::Wait => Ok(()),
        }
    }

    async fn drain(self: Arc<Self>, drain: Arc<Drain>) -> Result<()> {
        if self.mode == Mode::Async {
            return Ok(()); // async topics are shared by every replica
        }
        // (topic id, node) of each per-pod topic; no node: the rollback topic.
        let mut topics = vec![(self.rollback_topic_id(), None)];
        if self.mode == Mode::Throttling {
            topics.extend(self.all_node_names().into_iter().map(|n| (self.node_topic_id(&n), Some(n))));
        }
        for (topic_id, node) in topics {
            let mut options = self.subscribe_options(&topic_id);
            options.topic = self.topic_of(&topic_id, &drain.pod);
            let subscription = self.engine.broker.subscribe(options).await?;
            let (this, from) = (self.clone(), drain.clone());
            let concurrency = self.engine.options.concurrency_of(&topic_id);
            let stop = drain.stop.clone();
            match node {
                Some(node) => spawn_consumer(&self.engine, subscription, concurrency, stop, move |d| {
                    this.clone().dispatch_hop(node.clone(), d, Some(from.clone()))
                }),
                None => spawn_consumer(&self.engine, subscription, concurrency, stop, move |d| {
                    this.clone().dispatch_rollback(d, Some(from.clone()))
                }),
            }
        }
        Ok(())
    }
}

/// Consumes a subscription with at most `concurrency` handlers at once,
/// until `shutdown` (the engine's, or a child of it); then lets the handlers in
/// flight finish, and drops the subscription (what it holds goes back to the broker).
fn spawn_consumer<F, Fut>(
    engine: &Arc<Engine>,
    mut subscription: Subscription,
    concurrency: usize,
    shutdown: CancellationToken,
    handler: F,
) where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
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
