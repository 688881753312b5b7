//! The orchestrator: flows registered under facades, and the calls that run them.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::callback::CallbackSink;
use crate::engine::{Engine, FlowRuntime, Registered, Stats};
use crate::error::{Error, Result};
use crate::flow::Flow;
use crate::log::{ListFilter, SagaLog};
use crate::saga::{FlowVersion, Mode, Outcome, SagaRecord};

mod operator;

pub use operator::RedriveFilter;
mod recovery;
mod versions;

pub(crate) use versions::describe_missing;
pub use versions::{MissingVersion, VersionRole, VersionUse};
mod replicas;

/// What flow data must be: a serde type that can cross threads.
pub trait FlowData: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> FlowData for T {}

/// How often queue depths are sampled for the metrics.
const QUEUE_DEPTH_INTERVAL: Duration = Duration::from_secs(5);

/// Longest request id accepted.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Orchestrator-wide settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Prefix of every topic name (`<prefix>.<topic id>`).
    pub topic_prefix: String,
    /// This pod's id: suffix of the topics whose callers wait in this pod.
    pub pod_id: String,
    /// Consumer group of every subscription.
    pub consumer_group: String,
    /// Consumers per topic when the topic is not configured.
    pub default_concurrency: usize,
    /// Consumers per topic id (`<facade>.<node>` or `<facade>.rollback`).
    pub topic_concurrency: HashMap<String, usize>,
    /// Deliveries after which a message is dead-lettered.
    pub max_deliveries: u32,
    /// Delay before a message whose handling failed transiently comes back.
    pub redelivery_delay: Duration,
    /// How long sync and throttling callers wait for a saga's end.
    pub wait_timeout: Duration,
    /// Sync sagas run at once in this process (fresh and recovered); callers
    /// beyond it wait for a slot.
    pub max_running_sagas: usize,
    /// Sync callers that may wait for a running slot; a call beyond them is
    /// refused at once with [`Error::Overloaded`], so that the memory of the
    /// sagas in hand is bounded by these two settings rather than by the load
    /// (each holds its request, its record and its upstream calls' buffers).
    pub max_waiting_sagas: usize,
    /// How often unfinished sagas are checked for having made no progress for
    /// longer than their timeout (and resumed if nothing here drives them).
    pub stale_sweep_interval: Duration,
    /// On a shared log: how long this replica counts as alive after each
    /// renewal. Another replica takes its sagas over once it runs out.
    pub lease_ttl: Duration,
    /// On a shared log: how often the lease is renewed and expired replicas
    /// looked for. Well under `lease_ttl`, so a slow renewal does not lose it.
    pub lease_renew_interval: Duration,
    /// Callbacks delivered at once. An ended async saga waits for a slot before its
    /// callback is sent, holding its broker delivery: a slow receiver backs work up in
    /// the broker, not in this process's tasks and sockets.
    pub max_callback_deliveries: usize,
    /// At start, the callbacks of sagas this replica ended (before a crash)
    /// no longer than this before, and whose delivery was never recorded,
    /// are sent; receivers deduplicate a second POST by its `Idempotency-Key`.
    pub callback_replay_window: Duration,
    /// Start even when the log holds unfinished sagas of flow versions not
    /// registered here (refused otherwise, [`Error::MissingVersions`]): those
    /// sagas are left as they are, listed by [`Orchestrator::waiting_for_versions`],
    /// and picked up by a start that registers their version again.
    pub start_with_missing_versions: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            topic_prefix: "sagaflow".into(),
            pod_id: "local".into(),
            consumer_group: "sagaflow".into(),
            default_concurrency: 16,
            topic_concurrency: HashMap::new(),
            max_deliveries: 5,
            redelivery_delay: Duration::from_millis(200),
            wait_timeout: Duration::from_secs(30),
            max_running_sagas: 1024,
            max_waiting_sagas: 1024,
            stale_sweep_interval: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(10),
            lease_renew_interval: Duration::from_secs(3),
            max_callback_deliveries: 256,
            callback_replay_window: Duration::from_secs(600),
            start_with_missing_versions: false,
        }
    }
}

impl Options {
    pub(crate) fn concurrency_of(&self, topic_id: &str) -> usize {
        self.topic_concurrency.get(topic_id).copied().unwrap_or(self.default_concurrency)
    }

    fn validate(&self) -> Result<()> {
        let name_ok =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok(&self.topic_prefix) {
            return Err(Error::Config(format!(
                "topic prefix `{}` must be ASCII letters, digits, `-`, `_`, `.`",
                self.topic_prefix
            )));
        }
        if !name_ok(&self.pod_id) || self.pod_id.contains('.') {
            return Err(Error::Config(format!("pod id `{}` must be ASCII letters, digits, `-` or `_`", self.pod_id)));
        }
        if self.default_concurrency == 0 || self.topic_concurrency.values().any(|&c| c == 0) {
            return Err(Error::Config("topic concurrency must be at least 1".into()));
        }
        if self.max_running_sagas == 0 {
            return Err(Error::Config("max_running_sagas must be at least 1".into()));
        }
        if self.max_callback_deliveries == 0 {
            return Err(Error::Config("max_callback_deliveries must be at least 1".into()));
        }
        if self.stale_sweep_interval.is_zero() {
            return Err(Error::Config("stale_sweep_interval must be positive".into()));
        }
        if self.lease_renew_interval.is_zero() || self.lease_renew_interval >= self.lease_ttl {
            return Err(Error::Config(format!(
                "lease_renew_interval ({:?}) must be positive and shorter than lease_ttl ({:?})",
                self.lease_renew_interval, self.lease_ttl
            )));
        }
        if self.max_deliveries == 0 {
            return Err(Error::Config("max_deliveries must be at least 1".into()));
        }
        Ok(())
    }
}

/// A registered flow, as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowInfo {
    /// Its facade.
    pub facade: String,
    /// How it runs.
    pub mode: Mode,
    /// Its nodes, in order.
    pub nodes: Vec<String>,
    /// Whether each node has a compensation.
    pub compensations: Vec<bool>,
    /// Its hop topics, one per node (async and throttling flows).
    pub topics: Vec<String>,
    /// Its rollback topic.
    pub rollback_topic: String,
    /// Whether an operator paused it (new calls refused).
    pub paused: bool,
    /// The version new sagas start on.
    pub version: FlowVersion,
    /// Earlier versions kept for the sagas that started on them.
    pub kept: Vec<FlowVersion>,
}

/// Engine counters, for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrchestratorStats {
    /// Poison messages dead-lettered.
    pub dead_lettered: u64,
    /// Unfinished sagas picked up at start.
    pub recovered: u64,
    /// Stale sagas resumed by the sweep.
    pub resumed_stale: u64,
    /// Sagas taken over from replicas whose lease ran out.
    pub taken_over: u64,
    /// Sagas (steps or compensations) some task of this process works on right now.
    pub working: usize,
    /// Request ids callers wait for right now.
    pub waiting: usize,
}

type Registration = Box<dyn FnOnce(Arc<Engine>) -> Arc<dyn Registered> + Send>;

/// Registers flows, then starts the orchestrator.
pub struct OrchestratorBuilder {
    broker: Arc<dyn Broker>,
    log: Arc<dyn SagaLog>,
    options: Options,
    callbacks: Option<Arc<dyn CallbackSink>>,
    flows: Vec<(String, Registration)>,
    errors: Vec<String>,
}

impl fmt::Debug for OrchestratorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrchestratorBuilder")
            .field("broker", &self.broker.name())
            .field("log", &self.log.name())
            .field("options", &self.options)
            .field("flows", &self.flows.iter().map(|(f, _)| f).collect::<Vec<_>>())
            .finish()
    }
}

impl OrchestratorBuilder {
    /// Sets the orchestrator-wide options.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// Sets where async sagas' outcomes are delivered.
    pub fn callbacks(mut self, sink: Arc<dyn CallbackSink>) -> Self {
        self.callbacks = Some(sink);
        self
    }

    fn register<D: FlowData>(mut self, facade: &str, mode: Mode, flow: Flow<D>) -> Self {
        if let Err(e) = flow.validate_versions(facade) {
            self.errors.push(e);
        }
        if facade.is_empty() || !facade.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            self.errors.push(format!("facade `{facade}` must be ASCII letters, digits, `_` or `-`"));
        }
        if self.flows.iter().any(|(f, _)| f == facade) {
            self.errors.push(format!("facade `{facade}` registered twice"));
        }
        let owned = facade.to_owned();
        self.flows.push((
            facade.to_owned(),
            Box::new(move |engine| Arc::new(FlowRuntime::new(&owned, mode, flow, engine)) as Arc<dyn Registered>),
        ));
        self
    }

    /// Registers a flow run while the caller waits.
    pub fn sync<D: FlowData>(self, facade: &str, flow: Flow<D>) -> Self {
        self.register(facade, Mode::Sync, flow)
    }

    /// Registers a flow whose hops travel over the broker; the caller is answered at once.
    pub fn asynchronous<D: FlowData>(self, facade: &str, flow: Flow<D>) -> Self {
        self.register(facade, Mode::Async, flow)
    }

    /// Registers a flow queued on this pod's topics with bounded consumers; the caller waits.
    pub fn throttling<D: FlowData>(self, facade: &str, flow: Flow<D>) -> Self {
        self.register(facade, Mode::Throttling, flow)
    }

    /// Checks the registrations, starts every consumer, and picks up the
    /// sagas the log holds unfinished.
    pub async fn start(self) -> Result<Orchestrator> {
        if !self.errors.is_empty() {
            return Err(Error::Config(self.errors.join("; ")));
        }
        self.options.validate()?;
        crate::metrics::describe();
        let engine = Arc::new(Engine {
            broker: self.broker,
            log: self.log,
            completions: Arc::default(),
            claims: Arc::default(),
            paused: Default::default(),
            pauses_changed: tokio::sync::Notify::new(),
            running: Arc::new(tokio::sync::Semaphore::new(self.options.max_running_sagas)),
            admitted: Arc::new(tokio::sync::Semaphore::new(
                self.options.max_running_sagas.saturating_add(self.options.max_waiting_sagas),
            )),
            callback_slots: Arc::new(tokio::sync::Semaphore::new(self.options.max_callback_deliveries)),
            options: self.options,
            callbacks: self.callbacks,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            stats: Stats::default(),
        });
        let mut flows = HashMap::new();
        for (facade, make) in self.flows {
            flows.insert(facade, make(engine.clone()));
        }
        let orchestrator = Orchestrator { engine, flows: Arc::new(flows) };
        orchestrator.check_versions().await?;
        for flow in orchestrator.flows.values() {
            flow.clone().start_consumers().await?;
        }
        orchestrator.read_controls().await?;
        let lease = orchestrator.join_replicas().await?;
        orchestrator.recover().await?;
        orchestrator.sample_queue_depths();
        orchestrator.sweep_stale();
        orchestrator.keep_lease(lease);
        orchestrator.relay_ends();
        orchestrator.follow_controls();
        Ok(orchestrator)
    }
}

/// Runs registered flows. Build it once at start-up and share it (it is a
/// cheap clone).
///
/// ```
/// use std::sync::Arc;
/// use sagaflow::{Flow, MemoryBroker, MemorySagaLog, Node, NodeError, Orchestrator, Outcome, Step};
///
/// struct Double;
/// #[sagaflow::async_trait]
/// impl Node<u64> for Double {
///     fn name(&self) -> &str { "Double" }
///     async fn action(&self, _: &Step, n: &mut u64) -> Result<(), NodeError> { *n *= 2; Ok(()) }
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let orchestrator = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
///     .sync("Double", Flow::new().node(Double))
///     .start()
///     .await?;
/// assert_eq!(orchestrator.run("Double", "request-1", 3u64).await?, Outcome::Completed(6));
/// # Ok::<_, sagaflow::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Orchestrator {
    engine: Arc<Engine>,
    flows: Arc<HashMap<String, Arc<dyn Registered>>>,
}

impl fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Orchestrator")
            .field("broker", &self.engine.broker.name())
            .field("log", &self.engine.log.name())
            .field("flows", &self.flows.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Orchestrator {
    /// Starts registering flows over a broker and a saga log.
    pub fn builder(broker: Arc<dyn Broker>, log: Arc<dyn SagaLog>) -> OrchestratorBuilder {
        OrchestratorBuilder {
            broker,
            log,
            options: Options::default(),
            callbacks: None,
            flows: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn flow<D: FlowData>(&self, facade: &str) -> Result<(Arc<FlowRuntime<D>>, Mode)> {
        let registered = self.flows.get(facade).ok_or_else(|| Error::UnknownFacade(facade.to_owned()))?;
        let mode = registered.mode();
        let expected = registered.data_type();
        let typed = registered.clone().into_any().downcast::<FlowRuntime<D>>().map_err(|_| Error::DataType {
            facade: facade.to_owned(),
            expected,
            given: std::any::type_name::<D>(),
        })?;
        Ok((typed, mode))
    }

    fn check_request_id(request_id: &str) -> Result<()> {
        if request_id.is_empty() {
            return Err(Error::InvalidRequestId("empty".into()));
        }
        if request_id.len() > MAX_REQUEST_ID_LEN {
            return Err(Error::InvalidRequestId(format!("longer than {MAX_REQUEST_ID_LEN} bytes")));
        }
        if !request_id.chars().all(|c| c.is_ascii_graphic()) {
            return Err(Error::InvalidRequestId("only visible ASCII characters are allowed".into()));
        }
        Ok(())
    }

    /// The flow a new call may start a saga of: a valid request id, an
    /// orchestrator not shutting down, a registered facade (see also
    /// [`Orchestrator::wait_unpaused`]).
    fn admit<D: FlowData>(&self, facade: &str, request_id: &str) -> Result<(Arc<FlowRuntime<D>>, Mode)> {
        Self::check_request_id(request_id)?;
        if self.engine.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        self.flow::<D>(facade)
    }

    /// Runs a sync or throttling flow and waits for its outcome. A request id
    /// that already has a saga gets that saga's outcome; no second saga starts.
    pub async fn run<D: FlowData>(&self, facade: &str, request_id: &str, data: D) -> Result<Outcome<D>> {
        let (flow, mode) = self.admit::<D>(facade, request_id)?;
        match mode {
            Mode::Sync => {
                self.wait_unpaused(facade).await?;
                flow.run_sync(request_id, data).await
            }
            Mode::Throttling => {
                self.wait_unpaused(facade).await?;
                flow.run_throttled(request_id, data).await
            }
            Mode::Async => Err(Error::WrongMode { facade: facade.to_owned(), registered: mode, called: "run" }),
        }
    }

    /// Starts an async flow; returns once its first hop is on the broker.
    /// The outcome goes to `callback_url` (through the [`CallbackSink`]).
    pub async fn submit<D: FlowData>(
        &self,
        facade: &str,
        request_id: &str,
        data: D,
        callback_url: Option<String>,
    ) -> Result<()> {
        let (flow, mode) = self.admit::<D>(facade, request_id)?;
        match mode {
            Mode::Async => {
                self.wait_unpaused(facade).await?;
                flow.submit(request_id, data, callback_url).await
            }
            _ => Err(Error::WrongMode { facade: facade.to_owned(), registered: mode, called: "submit" }),
        }
    }

    /// The saga with this request id, as recorded.
    pub async fn saga(&self, request_id: &str) -> Result<Option<SagaRecord>> {
        Ok(self.engine.log.get(request_id).await?)
    }

    /// Sagas matching the filter, newest first.
    pub async fn sagas(&self, filter: ListFilter) -> Result<Vec<SagaRecord>> {
        Ok(self.engine.log.list(filter).await?)
    }

    /// Every registered flow.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let mut flows: Vec<FlowInfo> = self.flows.values().map(|f| f.info()).collect();
        flows.sort_by(|a, b| a.facade.cmp(&b.facade));
        flows
    }

    /// Engine counters.
    pub fn stats(&self) -> OrchestratorStats {
        OrchestratorStats {
            dead_lettered: self.engine.stats.dead_lettered.load(Ordering::Relaxed),
            recovered: self.engine.stats.recovered.load(Ordering::Relaxed),
            resumed_stale: self.engine.stats.resumed_stale.load(Ordering::Relaxed),
            taken_over: self.engine.stats.taken_over.load(Ordering::Relaxed),
            working: self.engine.claims.len(),
            waiting: self.engine.completions.len(),
        }
    }

    /// Every few seconds, records how many messages wait on each of this
    /// orchestrator's topics (where the broker can tell).
    fn sample_queue_depths(&self) {
        let topics: Vec<String> =
            self.flows().into_iter().flat_map(|f| f.topics.into_iter().chain([f.rollback_topic])).collect();
        let engine = self.engine.clone();
        self.engine.tasks.spawn(async move {
            let mut tick = tokio::time::interval(QUEUE_DEPTH_INTERVAL);
            loop {
                tokio::select! {
                    _ = engine.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                for topic in &topics {
                    if let Some(depth) = engine.broker.depth(topic, &engine.options.consumer_group).await {
                        metrics::gauge!(crate::metrics::QUEUE_DEPTH, "topic" => topic.clone()).set(depth as f64);
                    }
                }
            }
        });
    }

    /// Stops taking work, lets the handlers in flight finish, and closes the broker.
    /// Sagas cut short stay unfinished in the log and are recovered at the next start.
    pub async fn shutdown(&self) {
        self.engine.shutdown.cancel();
        // Callers waiting for a slot start nothing more.
        self.engine.running.close();
        self.engine.tasks.close();
        self.engine.tasks.wait().await;
        self.engine.broker.close().await;
    }
}
