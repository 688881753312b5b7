//! Nodes: the reusable steps a flow is made of.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One reusable saga step: an action and an optional compensation.
///
/// Returning `Ok` moves the saga on; a [retryable](ErrorKind::is_retryable) error
/// is retried per the flow's policy; a [permanent](ErrorKind::Permanent) error,
/// or retries used up, turns the saga to compensating. A node never calls
/// "next" or "rollback" itself.
///
/// ```
/// use sagaflow::{Node, NodeError, Step};
///
/// struct Reserve;
///
/// #[sagaflow::async_trait]
/// impl Node<Vec<String>> for Reserve {
///     fn name(&self) -> &str { "Reserve" }
///     async fn action(&self, step: &Step, data: &mut Vec<String>) -> Result<(), NodeError> {
///         data.push(format!("reserved for {}", step.request_id()));
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Node<D: Send + Sync + 'static>: Send + Sync + 'static {
    /// The node's name: shown in logs and errors, and part of its topic name.
    fn name(&self) -> &str;

    /// The forward call. Changes to `data` are seen by the next node.
    async fn action(&self, step: &Step, data: &mut D) -> Result<(), NodeError>;

    /// Undoes the action, keyed by the step's request id. Must be idempotent
    /// and must succeed when the action never took effect (null compensation).
    async fn compensate(&self, step: &Step, data: &D) -> Result<(), NodeError> {
        let _ = (step, data);
        Ok(())
    }

    /// Whether the node has a compensation worth running.
    fn has_compensation(&self) -> bool {
        true
    }

    /// Re-decides whether an error of this node is retryable; the default keeps
    /// the kind the error was made with (for a gRPC status, `ErrorKind::from_grpc_code`).
    fn classify(&self, error: NodeError) -> NodeError {
        error
    }
}

#[async_trait]
impl<D: Send + Sync + 'static, N: Node<D> + ?Sized> Node<D> for Arc<N> {
    fn name(&self) -> &str {
        (**self).name()
    }
    async fn action(&self, step: &Step, data: &mut D) -> Result<(), NodeError> {
        (**self).action(step, data).await
    }
    async fn compensate(&self, step: &Step, data: &D) -> Result<(), NodeError> {
        (**self).compensate(step, data).await
    }
    fn has_compensation(&self) -> bool {
        (**self).has_compensation()
    }
    fn classify(&self, error: NodeError) -> NodeError {
        (**self).classify(error)
    }
}

/// What a node error tells the engine: whether another attempt may succeed,
/// and whether the failed call may still have taken effect (so that a step
/// that ends on it is compensated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// Transient (unavailable, a lost connection): retried per the policy.
    /// The call may have taken effect.
    Retryable,
    /// The call got no answer in time: retried per the policy. It may have
    /// taken effect.
    TimedOut,
    /// Refused before it took effect (overloaded, rate-limited): retried per
    /// the policy, and nothing of it needs compensating.
    Refused,
    /// Final (a business refusal, a bad argument): the saga compensates at
    /// once, without compensating this step.
    Permanent,
}

impl ErrorKind {
    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        self != ErrorKind::Permanent
    }

    /// Whether a call that failed so may still have taken effect upstream.
    pub fn may_have_taken_effect(self) -> bool {
        matches!(self, ErrorKind::Retryable | ErrorKind::TimedOut)
    }
}

/// An error returned by a node's action or compensation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeError {
    kind: ErrorKind,
    code: Option<i32>,
    message: String,
}

impl NodeError {
    /// A transient failure worth retrying; the call may have taken effect.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Retryable, message)
    }

    /// A call refused before it took effect (overloaded): retried, not compensated.
    pub fn refused(message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Refused, message)
    }

    /// A final refusal: the saga compensates without retrying this step.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Permanent, message)
    }

    /// An error of `kind`.
    pub fn of_kind(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, code: None, message: message.into() }
    }

    /// The same error carrying the upstream's status code, kept in the saga's
    /// failure record and shown beside the message.
    pub fn with_code(mut self, code: i32) -> Self {
        self.code = Some(code);
        self
    }

    /// The same error with another kind (for [`Node::classify`]).
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    /// What the error tells the engine.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// The upstream's status code it came from, if any.
    pub fn code(&self) -> Option<i32> {
        self.code
    }

    /// The error's message.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn timeout(after: Duration) -> Self {
        Self::of_kind(ErrorKind::TimedOut, format!("timed out after {after:?}"))
    }
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{} (code {code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for NodeError {}

/// gRPC status codes as node errors: the one place they are classified.
#[cfg(feature = "tonic")]
mod grpc {
    use super::{ErrorKind, NodeError};

    impl ErrorKind {
        /// The kind of a gRPC status code.
        ///
        /// `UNAVAILABLE`, `UNKNOWN` and `INTERNAL` (what a crashed connection
        /// looks like) are retryable, `DEADLINE_EXCEEDED` timed out,
        /// `RESOURCE_EXHAUSTED` refused before it took effect; everything else
        /// is permanent, `ABORTED` included: DTM and our mocks use it for a
        /// business refusal.
        pub fn from_grpc_code(code: tonic::Code) -> Self {
            use tonic::Code;
            match code {
                Code::Unavailable | Code::Unknown | Code::Internal => ErrorKind::Retryable,
                Code::DeadlineExceeded => ErrorKind::TimedOut,
                Code::ResourceExhausted => ErrorKind::Refused,
                _ => ErrorKind::Permanent,
            }
        }
    }

    impl From<tonic::Status> for NodeError {
        fn from(status: tonic::Status) -> Self {
            NodeError::of_kind(ErrorKind::from_grpc_code(status.code()), status.message())
                .with_code(status.code() as i32)
        }
    }
}

/// Which half of a node a [`Step`] is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The forward action.
    Action,
    /// The compensation.
    Compensation,
}

/// What a node call knows about the saga it serves.
#[derive(Debug, Clone)]
pub struct Step {
    pub(crate) request_id: Arc<str>,
    pub(crate) facade: Arc<str>,
    pub(crate) node: Arc<str>,
    pub(crate) index: usize,
    pub(crate) attempt: u32,
    pub(crate) phase: Phase,
    pub(crate) deadline: Instant,
    pub(crate) cancel: CancellationToken,
}

impl Step {
    /// A step context for calling a node outside a flow (tests, tools).
    pub fn detached(request_id: &str, node: &str, timeout: Duration) -> Self {
        Self {
            request_id: request_id.into(),
            facade: "".into(),
            node: node.into(),
            index: 0,
            attempt: 1,
            phase: Phase::Action,
            deadline: Instant::now() + timeout,
            cancel: CancellationToken::new(),
        }
    }

    /// The saga's request id: the idempotency key for every upstream call.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The facade the saga runs under.
    pub fn facade(&self) -> &str {
        &self.facade
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The step's position in the flow, from 0.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Which attempt this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether this is the action or the compensation.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When this call must have finished (the earlier of the call timeout and
    /// the saga's deadline).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left until the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Cancelled when the orchestrator shuts down; long calls should stop.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// A W3C `traceparent` for this call: the trace id is derived from the
    /// request id, so every hop of a saga, on any replica, shares one trace;
    /// the span id is this step, attempt and phase.
    pub fn traceparent(&self) -> String {
        String::from_utf8_lossy(&self.traceparent_bytes()).into_owned()
    }

    /// [`traceparent`](Self::traceparent) as the 55 ASCII bytes of the header, built without
    /// formatting machinery: it is made for every upstream call.
    fn traceparent_bytes(&self) -> [u8; 55] {
        let id = self.request_id.as_bytes();
        let trace = fnv1a(0xcbf2_9ce4_8422_2325, id);
        let trace_hi = fnv1a(trace ^ 0x9e37_79b9_7f4a_7c15, id);
        let phase = match self.phase {
            Phase::Action => b'a',
            Phase::Compensation => b'c',
        };
        // The span id hashes the request id, then the step, attempt and phase.
        let span = fnv1a(fnv1a(0x8422_2325_cbf2_9ce4, id), &(self.index as u64).to_le_bytes());
        let span = fnv1a(fnv1a(span, &self.attempt.to_le_bytes()), &[phase]);
        let mut header = *b"00-00000000000000000000000000000000-0000000000000000-01";
        // All-zero ids are invalid in W3C trace context.
        for (at, value) in [(3, trace_hi | 1), (19, trace), (36, span | 1)] {
            for (i, digit) in header[at..at + 16].iter_mut().enumerate() {
                *digit = b"0123456789abcdef"[((value >> (60 - 4 * i)) & 0xf) as usize];
            }
        }
        header
    }
}

/// The gRPC metadata every upstream call of a saga carries, so the
/// upstream's logs say what a call is for: the saga's request id (the key
/// upstreams deduplicate on), facade, node, phase and attempt, and the W3C
/// trace context.
pub const SAGA_METADATA: [&str; 6] =
    ["x-request-id", "x-saga-facade", "x-saga-node", "x-saga-phase", "x-saga-attempt", "traceparent"];

#[cfg(feature = "tonic")]
impl Step {
    /// A gRPC request for this step's upstream call: `message` with the
    /// [`SAGA_METADATA`] and the step's deadline as the call's timeout (whole
    /// milliseconds, rounded down, above a second).
    ///
    /// The request id and `traceparent`, new on every call, are sent as HPACK
    /// never-indexed literals: indexed, each call's would push the connection's
    /// header table round, evicting the values that repeat (the facade, node,
    /// phase, content type), so every header of every call was encoded, sent and
    /// decoded in full. The timeout is rounded for the same reason: to the
    /// microsecond, it too was new on every call.
    pub fn grpc_request<T>(&self, message: T) -> Result<tonic::Request<T>, NodeError> {
        use std::sync::LazyLock;

        use tonic::metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue};
        // Checked once: `from_static` validates the name on every call.
        static KEYS: LazyLock<[MetadataKey<Ascii>; 6]> = LazyLock::new(|| SAGA_METADATA.map(MetadataKey::from_static));
        let [request_id, facade, node, ..] = SAGA_METADATA;
        let [id_key, facade_key, node_key, phase_key, attempt_key, trace_key] = KEYS.clone();
        let text = |name: &str, value: &str| {
            MetadataValue::try_from(value)
                .map_err(|_| NodeError::permanent(format!("{name} `{value}` is not valid gRPC metadata")))
        };
        let mut metadata = MetadataMap::with_capacity(SAGA_METADATA.len() + 1);
        let mut id_value = text(request_id, self.request_id())?;
        id_value.set_sensitive(true);
        metadata.insert(id_key, id_value);
        metadata.insert(facade_key, text(facade, self.facade())?);
        metadata.insert(node_key, text(node, self.node())?);
        let phase_value = match self.phase {
            Phase::Action => MetadataValue::from_static("forward"),
            Phase::Compensation => MetadataValue::from_static("compensation"),
        };
        metadata.insert(phase_key, phase_value);
        metadata.insert(attempt_key, MetadataValue::from(self.attempt));
        let mut trace = MetadataValue::try_from(&self.traceparent_bytes()[..])
            .map_err(|_| NodeError::permanent("traceparent is not valid gRPC metadata"))?;
        trace.set_sensitive(true);
        metadata.insert(trace_key, trace);
        let mut request = tonic::Request::from_parts(metadata, Default::default(), message);
        request.set_timeout(timeout_to_send(self.remaining()));
        Ok(request)
    }
}

#[cfg(feature = "tonic")]
/// The timeout an upstream call carries: `remaining` in whole milliseconds, rounded down, when
/// over a second (so that consecutive calls send the same `grpc-timeout`), else as it is.
fn timeout_to_send(remaining: Duration) -> Duration {
    if remaining > Duration::from_secs(1) { Duration::from_millis(remaining.as_millis() as u64) } else { remaining }
}

/// 64-bit FNV-1a: stable across processes and versions, unlike std's hasher.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_says_whether_to_retry_and_whether_the_call_may_have_taken_effect() {
        let cases = [
            (NodeError::retryable("connection reset"), true, true),
            (NodeError::timeout(Duration::from_millis(300)), true, true),
            (NodeError::refused("over capacity"), true, false),
            (NodeError::permanent("out of stock"), false, false),
        ];
        for (error, retry, in_doubt) in cases {
            assert_eq!((error.is_retryable(), error.kind().may_have_taken_effect()), (retry, in_doubt), "{error:?}");
        }
        assert_eq!(NodeError::timeout(Duration::from_millis(300)).to_string(), "timed out after 300ms");
        assert_eq!(NodeError::permanent("no").with_code(9).to_string(), "no (code 9)");
    }

    #[cfg(feature = "tonic")]
    #[test]
    fn grpc_statuses_map_to_kinds_and_keep_their_code() {
        use tonic::{Code, Status};
        let cases = [
            (Code::Unavailable, ErrorKind::Retryable),
            (Code::Unknown, ErrorKind::Retryable),
            (Code::Internal, ErrorKind::Retryable),
            (Code::DeadlineExceeded, ErrorKind::TimedOut),
            (Code::ResourceExhausted, ErrorKind::Refused),
            (Code::Aborted, ErrorKind::Permanent),
            (Code::InvalidArgument, ErrorKind::Permanent),
            (Code::FailedPrecondition, ErrorKind::Permanent),
        ];
        for (code, kind) in cases {
            let error = NodeError::from(Status::new(code, "upstream says so"));
            assert_eq!((error.kind(), error.code(), error.message()), (kind, Some(code as i32), "upstream says so"));
        }
    }

    #[cfg(feature = "tonic")]
    #[test]
    fn a_grpc_request_carries_the_saga_metadata() {
        let step = Step {
            request_id: "req-1".into(),
            facade: "CreateBooking".into(),
            node: "CreatePayment".into(),
            index: 1,
            attempt: 3,
            phase: Phase::Compensation,
            deadline: Instant::now() + Duration::from_secs(2),
            cancel: CancellationToken::new(),
        };
        let request = step.grpc_request(()).unwrap();
        let get = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert_eq!(
            [get("x-request-id"), get("x-saga-facade"), get("x-saga-node"), get("x-saga-phase"), get("x-saga-attempt")],
            ["req-1", "CreateBooking", "CreatePayment", "compensation", "3"]
        );
        assert_eq!(get("traceparent"), step.traceparent());
        // Pinned: replicas of different versions must derive the same trace for a saga.
        assert_eq!(get("traceparent"), "00-fe71351046001ab7fddbeef2b6ce4891-a1bbd496f1331655-01");
        // Within the deadline, in whole milliseconds (1999000u: the same on consecutive calls).
        let timeout = get("grpc-timeout");
        assert!(timeout.ends_with("000u") && timeout.len() == 8 && timeout.as_str() <= "2000000u", "{timeout}");
        // New on every call, so never indexed by HPACK; the rest repeat and are.
        let sensitive = |name: &str| request.metadata().get(name).is_some_and(|v| v.is_sensitive());
        assert!(sensitive("x-request-id") && sensitive("traceparent"));
        assert!(!sensitive("x-saga-facade") && !sensitive("x-saga-node"));
        let bad = Step::detached("line\nbreak", "N", Duration::from_secs(1));
        assert!(bad.grpc_request(()).unwrap_err().to_string().contains("x-request-id"));
    }

    #[test]
    fn traceparent_is_w3c_shaped_and_shared_by_the_saga() {
        let a = Step::detached("req-1", "A", Duration::from_secs(1));
        let mut b = a.clone();
        b.index = 1;
        let (ta, tb) = (a.traceparent(), b.traceparent());
        assert_eq!(ta.len(), 55, "{ta}");
        assert!(ta.starts_with("00-") && ta.ends_with("-01"));
        assert_eq!(ta[3..35], tb[3..35], "one trace per saga");
        assert_ne!(ta[36..52], tb[36..52], "one span per step");
        assert_ne!(Step::detached("req-2", "A", Duration::from_secs(1)).traceparent()[3..35], ta[3..35]);
    }
}
