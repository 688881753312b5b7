//! Flows: ordered nodes plus their policies.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::node::Node;
use crate::policy::RetryPolicy;

/// An ordered list of nodes and the policies they run under.
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
    pub(crate) retry: RetryPolicy,
    pub(crate) compensation_retry: RetryPolicy,
    pub(crate) step_timeout: Duration,
    pub(crate) saga_timeout: Duration,
}

impl<D: Send + Sync + 'static> Clone for Flow<D> {
    fn clone(&self) -> Self {
        Self {
            nodes: self.nodes.clone(),
            retry: self.retry,
            compensation_retry: self.compensation_retry,
            step_timeout: self.step_timeout,
            saga_timeout: self.saga_timeout,
        }
    }
}

impl<D: Send + Sync + 'static> Default for Flow<D> {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy {
                max_attempts: 10,
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                multiplier: 2.0,
                jitter: 0.2,
            },
            step_timeout: Duration::from_secs(5),
            saga_timeout: Duration::from_secs(60),
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

    pub(crate) fn validate(&self, facade: &str) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err(format!("flow `{facade}` has no nodes"));
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
        self.retry.validate(&format!("flow `{facade}` retry"))?;
        self.compensation_retry.validate(&format!("flow `{facade}` compensation retry"))
    }
}
