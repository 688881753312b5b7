//! Flows: nodes in order, stages of parallel branches among them, plus their policies.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::error::Error;
use crate::node::{Node, NodeError};
use crate::policy::RetryPolicy;
use crate::saga::{FlowVersion, Shape, Stage};

/// The default of [`Flow::max_data_bytes`]: 64 KiB of JSON.
pub const DEFAULT_MAX_DATA_BYTES: usize = 64 * 1024;

/// The default of [`Flow::step_timeout`].
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The default of [`Flow::deadline`].
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

/// Nodes in order, some of them parallel branches, and the policies they run under.
///
/// Each node depends on the one before; a [`Parallel`] stage's branches depend
/// on the node before the stage and run at once, each on its own copy of the
/// flow data, and the node after the stage runs on their results merged by the
/// stage's merge function.
///
/// A flow is a value: build it once, clone it, register it under as many
/// facades (and modes) as you like.
///
/// ```
/// use std::time::Duration;
/// use sagaflow::{Flow, Node, NodeError, RetryPolicy, Step};
///
/// struct Noop;
/// #[sagaflow::async_trait]
/// impl Node<u32> for Noop {
///     fn name(&self) -> &str { "Noop" }
///     async fn action(&self, _: &Step, n: &mut u32) -> Result<(), NodeError> { *n += 1; Ok(()) }
/// }
///
/// let flow: Flow<u32> = Flow::new()
///     .node(Noop)
///     .node(Noop)
///     .retry(RetryPolicy::default().attempts(3))
///     .step_timeout(Duration::from_secs(2));
/// assert_eq!(flow.len(), 2);
/// ```
pub struct Flow<D: Send + Sync + 'static> {
    pub(crate) nodes: Vec<Arc<dyn Node<D>>>,
    /// The parallel stages, in order; empty for a flow of one node after another.
    pub(crate) joins: Vec<Join<D>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) compensation_retry: RetryPolicy,
    pub(crate) step_timeout: Duration,
    pub(crate) saga_timeout: Duration,
    pub(crate) max_data_bytes: usize,
    pub(crate) label: Option<String>,
    /// Earlier versions kept beside this one for the sagas that started on them.
    pub(crate) kept: Vec<Flow<D>>,
}

impl<D: Send + Sync + 'static> Clone for Flow<D> {
    fn clone(&self) -> Self {
        Self {
            nodes: self.nodes.clone(),
            joins: self.joins.clone(),
            retry: self.retry,
            compensation_retry: self.compensation_retry,
            step_timeout: self.step_timeout,
            saga_timeout: self.saga_timeout,
            max_data_bytes: self.max_data_bytes,
            label: self.label.clone(),
            kept: self.kept.clone(),
        }
    }
}

impl<D: Send + Sync + 'static> Default for Flow<D> {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            joins: Vec::new(),
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy::compensation(),
            step_timeout: DEFAULT_STEP_TIMEOUT,
            saga_timeout: DEFAULT_DEADLINE,
            max_data_bytes: DEFAULT_MAX_DATA_BYTES,
            label: None,
            kept: Vec::new(),
        }
    }
}

impl<D: Send + Sync + 'static> fmt::Debug for Flow<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("nodes", &self.node_names())
            .field("retry", &self.retry)
            .field("compensation_retry", &self.compensation_retry)
            .field("step_timeout", &self.step_timeout)
            .field("saga_timeout", &self.saga_timeout)
            .field("max_data_bytes", &self.max_data_bytes)
            .field("version", &self.version())
            .field("kept", &self.kept.iter().map(Flow::version).collect::<Vec<_>>())
            .finish()
    }
}

impl<D: Send + Sync + 'static> Flow<D> {
    /// An empty flow with the default policies.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a node; nodes run in the order they are added.
    pub fn node(mut self, node: impl Node<D>) -> Self {
        self.nodes.push(Arc::new(node));
        self
    }

    /// Appends a node shared with other flows.
    pub fn shared_node(mut self, node: Arc<dyn Node<D>>) -> Self {
        self.nodes.push(node);
        self
    }

    /// Appends a stage of branches that run at once, after the nodes before
    /// it and before the nodes after it.
    ///
    /// ```
    /// use sagaflow::{Flow, Node, NodeError, Parallel, Step};
    ///
    /// #[derive(Default, serde::Serialize, serde::Deserialize)]
    /// struct Trip { flight: Option<u64>, hotel: Option<u64> }
    ///
    /// struct Flight;
    /// #[sagaflow::async_trait]
    /// impl Node<Trip> for Flight {
    ///     fn name(&self) -> &str { "Flight" }
    ///     async fn action(&self, _: &Step, t: &mut Trip) -> Result<(), NodeError> { t.flight = Some(1); Ok(()) }
    /// }
    /// struct Hotel;
    /// #[sagaflow::async_trait]
    /// impl Node<Trip> for Hotel {
    ///     fn name(&self) -> &str { "Hotel" }
    ///     async fn action(&self, _: &Step, t: &mut Trip) -> Result<(), NodeError> { t.hotel = Some(2); Ok(()) }
    /// }
    ///
    /// let flow: Flow<Trip> = Flow::new().parallel(
    ///     Parallel::new().branch(Flight).branch(Hotel).merge(|trip: &mut Trip, branch: Trip| {
    ///         trip.flight = trip.flight.or(branch.flight);
    ///         trip.hotel = trip.hotel.or(branch.hotel);
    ///     }),
    /// );
    /// assert_eq!(flow.len(), 2);
    /// ```
    pub fn parallel(mut self, parallel: Parallel<D>) -> Self {
        let stage = Stage { first: self.nodes.len(), len: parallel.branches.len() };
        self.nodes.extend(parallel.branches);
        self.joins.push(Join { stage, merge: parallel.merge });
        self
    }
}

/// How a parallel stage's branch results come together.
pub type Merge<D> = Arc<dyn Fn(&mut D, D) + Send + Sync>;

/// A stage of a flow whose branches run at once (see [`Flow::parallel`]).
///
/// Each branch's action gets its own copy of the flow data as it was before
/// the stage; once every branch is done, the merge function folds each
/// branch's data into that data, in the order the branches were added.
pub struct Parallel<D: Send + Sync + 'static> {
    branches: Vec<Arc<dyn Node<D>>>,
    merge: Option<Merge<D>>,
}

impl<D: Send + Sync + 'static> Default for Parallel<D> {
    fn default() -> Self {
        Self { branches: Vec::new(), merge: None }
    }
}

impl<D: Send + Sync + 'static> Parallel<D> {
    /// A stage with no branches yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a branch.
    pub fn branch(mut self, node: impl Node<D>) -> Self {
        self.branches.push(Arc::new(node));
        self
    }

    /// Adds a branch shared with other flows.
    pub fn shared_branch(mut self, node: Arc<dyn Node<D>>) -> Self {
        self.branches.push(node);
        self
    }

    /// Sets how a branch's data (the second argument) is folded into the
    /// saga's (the first); required, so no branch's result is dropped unseen.
    pub fn merge(mut self, merge: impl Fn(&mut D, D) + Send + Sync + 'static) -> Self {
        self.merge = Some(Arc::new(merge));
        self
    }
}

/// A parallel stage of a flow: its steps and how their data merge.
pub(crate) struct Join<D> {
    pub(crate) stage: Stage,
    pub(crate) merge: Option<Merge<D>>,
}

impl<D> Clone for Join<D> {
    fn clone(&self) -> Self {
        Self { stage: self.stage, merge: self.merge.clone() }
    }
}

impl<D: Send + Sync + 'static> Flow<D> {
    /// The stages of the flow, in order: each step alone, or a parallel stage.
    pub(crate) fn stages(&self) -> impl Iterator<Item = Stage> + '_ {
        let mut next = 0;
        let mut joins = self.joins.iter().peekable();
        std::iter::from_fn(move || {
            if next >= self.nodes.len() {
                return None;
            }
            let stage = match joins.next_if(|j| j.stage.first == next) {
                Some(join) => join.stage,
                None => Stage { first: next, len: 1 },
            };
            next += stage.len;
            Some(stage)
        })
    }

    /// Which steps run in parallel.
    pub fn shape(&self) -> Shape {
        if self.joins.is_empty() {
            return Shape::default();
        }
        Shape::of_stages(self.stages().map(|s| s.len))
    }

    /// The parallel stage that starts at step `first`, if one does.
    pub(crate) fn join_at(&self, first: usize) -> Option<&Join<D>> {
        self.joins.iter().find(|j| j.stage.first == first)
    }

    /// Folds the data the branches of `stage` produced (in step order) into
    /// `data`, with the stage's merge.
    pub(crate) fn merge(&self, stage: Stage, data: &mut D, branches: impl IntoIterator<Item = D>) {
        if let Some(merge) = self.join_at(stage.first).and_then(|j| j.merge.as_ref()) {
            for branch in branches {
                merge(data, branch);
            }
        }
    }
}

impl<D: Send + Sync + 'static> Flow<D> {
    /// Sets the retry policy of the actions.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets the retry policy of the compensations; past its last attempt a saga is Stuck.
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// Sets the timeout of each node call.
    pub fn step_timeout(mut self, timeout: Duration) -> Self {
        self.step_timeout = timeout;
        self
    }

    /// Sets the time within which the forward part of a saga must finish;
    /// past it the saga compensates.
    pub fn deadline(mut self, timeout: Duration) -> Self {
        self.saga_timeout = timeout;
        self
    }

    /// Sets the largest flow data a saga may carry, in bytes of JSON (default
    /// [`DEFAULT_MAX_DATA_BYTES`]): the data is stored with every step and travels in every
    /// hop. Larger data is refused when the saga starts ([`Error::DataTooLarge`]); a node
    /// whose action grows it past the limit fails for good, and the saga compensates.
    pub fn max_data_bytes(mut self, limit: usize) -> Self {
        self.max_data_bytes = limit;
        self
    }

    /// Names this version of the flow (shown beside its fingerprint, recorded
    /// with every saga that starts on it).
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Keeps an earlier version of this flow beside it: sagas that started on
    /// `previous` (before a deploy changed the flow) finish on its nodes,
    /// while new sagas start on this one. Versions `previous` keeps are kept too.
    ///
    /// ```
    /// # use sagaflow::{Flow, Node, NodeError, Step};
    /// # struct N(&'static str);
    /// # #[sagaflow::async_trait]
    /// # impl Node<u32> for N {
    /// #     fn name(&self) -> &str { self.0 }
    /// #     async fn action(&self, _: &Step, _: &mut u32) -> Result<(), NodeError> { Ok(()) }
    /// # }
    /// let v1: Flow<u32> = Flow::new().node(N("Reserve")).node(N("Charge")).label("v1");
    /// let v2 = Flow::new().node(N("Charge")).node(N("Reserve")).node(N("Notify")).label("v2");
    /// let flow = v2.keep(v1);
    /// assert_eq!(flow.versions().len(), 2);
    /// ```
    pub fn keep(mut self, mut previous: Flow<D>) -> Self {
        let older = std::mem::take(&mut previous.kept);
        self.kept.push(previous);
        self.kept.extend(older);
        self
    }

    /// This flow's version: its fingerprint and label.
    pub fn version(&self) -> FlowVersion {
        FlowVersion { fingerprint: self.fingerprint(), label: self.label.clone(), shape: self.shape() }
    }

    /// Every version registered with this flow: this one first, then the kept ones.
    pub fn versions(&self) -> Vec<FlowVersion> {
        std::iter::once(self.version()).chain(self.kept.iter().map(Flow::version)).collect()
    }

    /// The fingerprint of the flow's shape: its node names in order, which
    /// of them have a compensation and which run in parallel. The same shape has
    /// the same fingerprint in every process and build (FNV-1a over a canonical
    /// text, as 16 hex digits): `A+c/B` for two nodes, `A/(B+c|C)/D` with a stage
    /// of two branches.
    pub fn fingerprint(&self) -> String {
        let name = |n: &Arc<dyn Node<D>>| format!("{}{}", n.name(), if n.has_compensation() { "+c" } else { "" });
        let shape: Vec<String> = self
            .stages()
            .map(|stage| {
                let names: Vec<String> = self.nodes[stage.steps()].iter().map(name).collect();
                if stage.is_parallel() { format!("({})", names.join("|")) } else { names.join("") }
            })
            .collect();
        fingerprint_of(&shape.join("/"))
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the flow has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node names, in order.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name().to_owned()).collect()
    }

    /// Checks this flow and every kept version; two versions of one shape are refused.
    pub(crate) fn validate_versions(&self, facade: &str) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for flow in std::iter::once(self).chain(&self.kept) {
            let version = flow.version();
            flow.validate(&format!("{facade}` version `{version}"))?;
            if !seen.insert(version.fingerprint.clone()) {
                return Err(format!(
                    "flow `{facade}` keeps two versions of the same shape (fingerprint {})",
                    version.fingerprint
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn validate(&self, facade: &str) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err(format!("flow `{facade}` has no nodes"));
        }
        for join in &self.joins {
            if join.stage.len < 2 {
                return Err(format!(
                    "flow `{facade}`: a parallel stage at step {} needs two branches or more",
                    join.stage.first
                ));
            }
            if join.merge.is_none() {
                return Err(format!(
                    "flow `{facade}`: the parallel stage at step {} has no merge, so its branches' results would be lost",
                    join.stage.first
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for node in &self.nodes {
            let name = node.name();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(format!(
                    "flow `{facade}`: node name `{name}` must be non-empty ASCII letters, digits, `_` or `-` (it names a topic)"
                ));
            }
            if !names.insert(name) {
                return Err(format!("flow `{facade}` has node `{name}` twice"));
            }
        }
        if self.step_timeout.is_zero() || self.saga_timeout.is_zero() {
            return Err(format!("flow `{facade}`: timeouts must be above zero"));
        }
        if self.max_data_bytes == 0 {
            return Err(format!("flow `{facade}`: max_data_bytes must be above zero"));
        }
        self.retry.validate(&format!("flow `{facade}` retry"))?;
        self.compensation_retry.validate(&format!("flow `{facade}` compensation retry"))
    }
}

impl<D: Serialize + Send + Sync + 'static> Flow<D> {
    /// The data a saga starts with, as stored; refused when over [`Flow::max_data_bytes`].
    pub(crate) fn encode_new(&self, request_id: &str, data: &D) -> Result<serde_json::Value, Error> {
        let data_error = |source| Error::Data { request_id: request_id.to_owned(), source };
        let size = json_size(data).map_err(data_error)?;
        if size > self.max_data_bytes {
            return Err(Error::DataTooLarge { request_id: request_id.to_owned(), size, limit: self.max_data_bytes });
        }
        serde_json::to_value(data).map_err(data_error)
    }

    /// Why the data a node left behind cannot be stored (too large), if it cannot.
    pub(crate) fn oversize(&self, data: &D) -> Option<NodeError> {
        match json_size(data) {
            Ok(size) if size <= self.max_data_bytes => None,
            Ok(size) => Some(NodeError::permanent(format!(
                "the action grew the flow data to {size} bytes of JSON, over the flow's limit of {} bytes",
                self.max_data_bytes
            ))),
            // Not serializable: the engine's own encoding reports it.
            Err(_) => None,
        }
    }
}

/// FNV-1a (64 bits) of `text`, as 16 hex digits: fixed, so it is the same in every process.
fn fingerprint_of(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The length of `value` as JSON, counted without building the text.
fn json_size<T: Serialize + ?Sized>(value: &T) -> Result<usize, serde_json::Error> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value)?;
    Ok(count.0)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::node::Step;
    use crate::{MemoryBroker, MemorySagaLog, Orchestrator, Outcome, SagaStatus};

    /// A node named `.0` that appends `.1` bytes of text to the data.
    struct Grow(&'static str, usize);

    #[async_trait::async_trait]
    impl Node<Vec<String>> for Grow {
        fn name(&self) -> &str {
            self.0
        }
        async fn action(&self, _: &Step, data: &mut Vec<String>) -> Result<(), NodeError> {
            data.push("x".repeat(self.1));
            Ok(())
        }
    }

    async fn orchestrator(flow: Flow<Vec<String>>) -> Orchestrator {
        Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
            .sync("Sync", flow.clone())
            .asynchronous("Async", flow)
            .start()
            .await
            .expect("orchestrator starts")
    }

    #[tokio::test]
    async fn data_over_the_limit_is_refused_before_a_saga_starts() {
        let o = orchestrator(Flow::new().node(Grow("a", 1)).max_data_bytes(100)).await;
        let big = vec!["y".repeat(200)];
        let err = o.run("Sync", "r1", big.clone()).await.unwrap_err();
        assert!(matches!(err, Error::DataTooLarge { size: 204, limit: 100, .. }), "{err:?}");
        assert_eq!(err.to_string(), "flow data of saga `r1` is 204 bytes of JSON, over the limit of 100 bytes");
        let err = o.submit("Async", "r2", big, None).await.unwrap_err();
        assert!(matches!(err, Error::DataTooLarge { .. }), "{err:?}");
        assert!(o.saga("r1").await.unwrap().is_none() && o.saga("r2").await.unwrap().is_none());
        // Exactly at the limit (`["` + 96 + `"]`) starts.
        assert!(o.run("Sync", "r3", vec!["y".repeat(96)]).await.is_ok());
        assert!(o.saga("r3").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_node_growing_the_data_past_the_limit_fails_and_compensates() {
        let o = orchestrator(Flow::new().node(Grow("small", 10)).node(Grow("big", 500)).max_data_bytes(256)).await;
        let Outcome::Compensated(failure) = o.run("Sync", "r1", Vec::<String>::new()).await.unwrap() else {
            panic!("not compensated")
        };
        assert_eq!(failure.node, "big");
        assert!(failure.error.contains("over the flow's limit of 256 bytes"), "{failure}");
        let record = o.saga("r1").await.unwrap().unwrap();
        assert_eq!(record.status(), SagaStatus::Compensated);
        assert!(serde_json::to_vec(&record.data).unwrap().len() <= 256);
    }

    /// A node named `.0`, with a compensation if `.1`.
    struct Shape(&'static str, bool);

    #[async_trait::async_trait]
    impl Node<u32> for Shape {
        fn name(&self) -> &str {
            self.0
        }
        async fn action(&self, _: &Step, _: &mut u32) -> Result<(), NodeError> {
            Ok(())
        }
        fn has_compensation(&self) -> bool {
            self.1
        }
    }

    fn shape(nodes: &[(&'static str, bool)]) -> Flow<u32> {
        nodes.iter().fold(Flow::new(), |flow, &(name, compensated)| flow.node(Shape(name, compensated)))
    }

    #[test]
    fn the_fingerprint_is_the_shape_and_the_same_in_every_process() {
        let v1 = shape(&[("A", true), ("B", false)]);
        // Fixed: FNV-1a of `A+c/B`, whatever the build or process.
        assert_eq!(v1.fingerprint(), fingerprint_of("A+c/B"));
        assert_eq!(fingerprint_of(""), "cbf29ce484222325");
        assert_eq!(fingerprint_of("a"), "af63dc4c8601ec8c");
        assert_eq!(v1.fingerprint(), shape(&[("A", true), ("B", false)]).fingerprint());
        assert_eq!(v1.fingerprint(), v1.clone().label("v1").retry(RetryPolicy::default().attempts(2)).fingerprint());
        let others = [
            shape(&[("B", false), ("A", true)]),
            shape(&[("A", true), ("B", true)]),
            shape(&[("A", true), ("B", false), ("C", false)]),
            shape(&[("A", true)]),
        ];
        for other in others {
            assert_ne!(v1.fingerprint(), other.fingerprint(), "{other:?}");
        }
    }

    #[test]
    fn a_parallel_stage_is_part_of_the_shape() {
        let branches = || Parallel::new().branch(Shape("B", true)).branch(Shape("C", false)).merge(|_, _| {});
        let flow = Flow::new().node(Shape("A", false)).parallel(branches()).node(Shape("D", false));
        assert_eq!(flow.fingerprint(), fingerprint_of("A/(B+c|C)/D"));
        assert_ne!(flow.fingerprint(), shape(&[("A", false), ("B", true), ("C", false), ("D", false)]).fingerprint());
        assert_eq!(flow.shape().stages(), [1, 2, 1]);
        assert_eq!(flow.version().shape, flow.shape());
        assert!(shape(&[("A", false), ("B", true)]).shape().is_linear());
        let stages: Vec<_> = flow.stages().map(|s| (s.first, s.len)).collect();
        assert_eq!(stages, [(0, 1), (1, 2), (3, 1)]);
    }

    #[test]
    fn kept_versions_are_listed_after_the_current_one_and_distinct() {
        let v1 = shape(&[("A", true), ("B", true)]).label("v1");
        let v2 = shape(&[("B", true), ("A", true)]).label("v2");
        let v3 = shape(&[("B", true), ("A", true), ("C", true)]).label("v3");
        let flow = v3.keep(v2.keep(v1.clone()));
        let labels: Vec<_> = flow.versions().into_iter().map(|v| v.label.unwrap()).collect();
        assert_eq!(labels, ["v3", "v2", "v1"]);
        assert_eq!(flow.versions()[2], v1.version());
        assert!(flow.validate_versions("F").is_ok());
        let twice = shape(&[("A", true), ("B", true)]).keep(v1.clone());
        let err = twice.validate_versions("F").unwrap_err();
        assert!(err.contains("two versions of the same shape"), "{err}");
        let broken = shape(&[("A", true)]).keep(Flow::new().label("empty"));
        let err = broken.validate_versions("F").unwrap_err();
        assert!(err.contains("version `empty"), "{err}");
    }
}
