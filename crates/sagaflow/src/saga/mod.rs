//! A saga's recorded state, the transitions that are the only way to change
//! it, and what follows from it: [`SagaRecord::next`] decides what runs next
//! from the record alone, for every mode of the engine.

mod next;
mod record;

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use next::{Next, OnHop, Shape, Stage};
pub use record::{SagaRecord, StepState, StepStatus};

/// How a flow is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The caller waits; nodes run in-process.
    Sync,
    /// The caller is answered at once; each hop is a broker message.
    Async,
    /// The caller waits; hops are queued on this pod's topics with bounded consumers.
    Throttling,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::Throttling => "throttling",
        })
    }
}

/// Why a saga turned to compensation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Index of the step that failed.
    pub step: usize,
    /// Name of the node that failed.
    pub node: String,
    /// The error, as text.
    pub error: String,
    /// The gRPC code of the error, if it came from one.
    pub code: Option<i32>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.node.is_empty() {
            // An operator's abort names no node: the saga stopped between steps, or during one.
            return write!(f, "step {} failed: {}", self.step, self.error);
        }
        write!(f, "step {} ({}) failed: {}", self.step, self.node, self.error)
    }
}

/// Where a saga stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SagaState {
    /// Running forward; the current stage starts at step [`SagaRecord::completed`].
    Running,
    /// Undoing; `pending` are the steps still to compensate, latest first: the
    /// leading ones of one stage do not depend on each other and run at once.
    Compensating {
        /// What failed.
        failure: Failure,
        /// Steps left to compensate, in reverse dependency order.
        pending: Vec<usize>,
    },
    /// Every step succeeded.
    Completed,
    /// A step failed and every completed step was undone.
    Compensated {
        /// What failed.
        failure: Failure,
    },
    /// A compensation kept failing past its limit; an operator must look.
    Stuck {
        /// What failed first.
        failure: Failure,
        /// Why the compensation gave up.
        reason: String,
        /// Steps left to compensate, next first.
        pending: Vec<usize>,
    },
}

/// The state's name, for filters and display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// See [`SagaState::Running`].
    Running,
    /// See [`SagaState::Compensating`].
    Compensating,
    /// See [`SagaState::Completed`].
    Completed,
    /// See [`SagaState::Compensated`].
    Compensated,
    /// See [`SagaState::Stuck`].
    Stuck,
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Stuck => "stuck",
        })
    }
}

impl SagaState {
    /// The state's name.
    pub fn status(&self) -> SagaStatus {
        match self {
            SagaState::Running => SagaStatus::Running,
            SagaState::Compensating { .. } => SagaStatus::Compensating,
            SagaState::Completed => SagaStatus::Completed,
            SagaState::Compensated { .. } => SagaStatus::Compensated,
            SagaState::Stuck { .. } => SagaStatus::Stuck,
        }
    }

    /// Whether nothing more will happen without an operator.
    pub fn is_ended(&self) -> bool {
        matches!(self, SagaState::Completed | SagaState::Compensated { .. } | SagaState::Stuck { .. })
    }
}

/// One state change of a saga, as written to the [`SagaLog`](crate::log::SagaLog).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SagaEvent {
    /// The action of step `index` is about to be called (attempt 1).
    StepStarted {
        /// The step.
        index: usize,
    },
    /// The action of step `index` succeeded; `data` is the flow data after it.
    StepCompleted {
        /// The step.
        index: usize,
        /// Attempts it took.
        attempts: u32,
        /// The flow data after the step.
        data: Value,
    },
    /// Every branch of the parallel stage that starts at step `first` is done,
    /// and `data` is the flow data with their results merged.
    BranchesJoined {
        /// The stage's first step.
        first: usize,
        /// The flow data after the merge.
        data: Value,
    },
    /// Step `failure.step` failed for good; compensation starts.
    StepFailed {
        /// What failed.
        failure: Failure,
        /// Attempts made.
        attempts: u32,
        /// Whether the failed step itself is compensated too, because an
        /// attempt may have taken effect (a timeout, a lost connection).
        compensate_failed: bool,
        /// Whether every step after the failed one is compensated too, because
        /// it may have run: a sync saga recovered after a crash records its
        /// intermediate steps' results without waiting for their commit, so the
        /// log can lag what the upstreams did. Compensations must tolerate an
        /// action that never ran (they already must, for `compensate_failed`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        later_steps_in_doubt: bool,
    },
    /// The compensation of step `index` succeeded.
    StepCompensated {
        /// The step.
        index: usize,
        /// Attempts it took.
        attempts: u32,
    },
    /// The compensation of step `index` gave up; the saga is stuck.
    CompensationGaveUp {
        /// The step.
        index: usize,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        reason: String,
    },
    /// An operator asked to retry a stuck saga's compensation.
    RetryCompensation {
        /// Who asked (absent in records written before operators were named).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        /// Why, when they said (a redrive names itself here).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An operator aborted the running saga: no further step starts, and
    /// every step that completed or may have (the one started last) is
    /// compensated.
    Aborted {
        /// Who aborted it.
        by: String,
        /// Why.
        reason: String,
    },
    /// An operator settled step `index`'s compensation by hand (the stuck
    /// saga's next pending one): it counts as compensated.
    Resolved {
        /// The step.
        index: usize,
        /// Who settled it.
        by: String,
        /// How, in their words.
        reason: String,
    },
    /// The engine cannot go on with the saga (its flow data no longer decodes
    /// into the flow's type): it is stuck until an operator retries it, which
    /// compensates what it did.
    Halted {
        /// Why, in the engine's words.
        reason: String,
    },
    /// The ended saga's callback was delivered, or given up on.
    CallbackDelivered {
        /// Whether the receiver accepted it.
        delivered: bool,
        /// Attempts made.
        attempts: u32,
        /// The last error, if not delivered.
        error: Option<String>,
    },
}

impl SagaEvent {
    /// Whether an operator wrote it (abort, resolve, retry), rather than the engine.
    pub fn is_operators(&self) -> bool {
        matches!(self, SagaEvent::Aborted { .. } | SagaEvent::Resolved { .. } | SagaEvent::RetryCompensation { .. })
    }
}

/// A transition the state machine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("saga `{request_id}` in state {state}: cannot apply {event}")]
pub struct TransitionError {
    /// The saga.
    pub request_id: String,
    /// Its state.
    pub state: SagaStatus,
    /// The refused event, described.
    pub event: String,
}

/// What a new saga starts with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewSaga {
    /// Its identity.
    pub request_id: String,
    /// The facade it runs under.
    pub facade: String,
    /// How it runs.
    pub mode: Mode,
    /// Number of steps of its flow.
    pub steps: usize,
    /// The initial flow data.
    pub data: Value,
    /// Unix ms after which the forward part compensates.
    pub deadline_ms: u64,
    /// Where to POST the outcome (async flows).
    pub callback_url: Option<String>,
    /// The replica that drives it, in a log several replicas share (sync and
    /// throttling sagas run in their replica; async hops go to any).
    pub owner: Option<String>,
    /// The version of its facade's flow it runs on; `None` for the facade's current flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<FlowVersion>,
}

/// Which version of a facade's flow a saga runs on: the flow's fingerprint
/// (its shape: node names in order, which have compensations, which run in
/// parallel), the label its user gave it, if any, and its stages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowVersion {
    /// The fingerprint of the flow's shape; what versions are told apart by.
    pub fingerprint: String,
    /// The user's name for the version ([`Flow::label`](crate::Flow::label)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Which steps run in parallel: what the saga log checks each step's
    /// transitions against. Absent for a flow of one step after another.
    #[serde(default, skip_serializing_if = "Shape::is_linear")]
    pub shape: Shape,
}

impl fmt::Display for FlowVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.label {
            Some(label) => write!(f, "{label} ({})", self.fingerprint),
            None => f.write_str(&self.fingerprint),
        }
    }
}

/// What a line of a saga's history records (stored as its snake_case name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HistoryEvent {
    /// The saga began.
    Started,
    /// A step's action started.
    StepStarted,
    /// A step's action succeeded.
    StepCompleted,
    /// The branches of a parallel stage were merged.
    BranchesJoined,
    /// A step failed for good: the rollback starts.
    StepFailed,
    /// A step's compensation succeeded (or was settled by hand).
    StepCompensated,
    /// A compensation used up its attempts: the saga is stuck.
    CompensationGaveUp,
    /// An operator retried a stuck saga's compensation.
    RetryCompensation,
    /// An operator aborted the saga.
    Aborted,
    /// An operator settled a stuck compensation by hand.
    Resolved,
    /// The saga stopped stuck before a step could run (its data no longer decodes).
    Halted,
    /// The callback was delivered.
    CallbackDelivered,
    /// The callback was not delivered.
    CallbackFailed,
}

impl HistoryEvent {
    /// Its stored name, e.g. `step_completed`.
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryEvent::Started => "started",
            HistoryEvent::StepStarted => "step_started",
            HistoryEvent::StepCompleted => "step_completed",
            HistoryEvent::BranchesJoined => "branches_joined",
            HistoryEvent::StepFailed => "step_failed",
            HistoryEvent::StepCompensated => "step_compensated",
            HistoryEvent::CompensationGaveUp => "compensation_gave_up",
            HistoryEvent::RetryCompensation => "retry_compensation",
            HistoryEvent::Aborted => "aborted",
            HistoryEvent::Resolved => "resolved",
            HistoryEvent::Halted => "halted",
            HistoryEvent::CallbackDelivered => "callback_delivered",
            HistoryEvent::CallbackFailed => "callback_failed",
        }
    }
}

impl fmt::Display for HistoryEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of a saga's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Unix ms.
    pub at_ms: u64,
    /// The event, without its data.
    pub event: HistoryEvent,
    /// The step it concerns.
    pub step: Option<usize>,
    /// Attempts made, when known.
    pub attempts: Option<u32>,
    /// Error text, when any.
    pub error: Option<String>,
    /// The operator who caused it (abort, resolve, retry), when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The operator's reason, when they gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn history_event(event: &SagaEvent) -> HistoryEvent {
    match event {
        SagaEvent::StepStarted { .. } => HistoryEvent::StepStarted,
        SagaEvent::StepCompleted { .. } => HistoryEvent::StepCompleted,
        SagaEvent::BranchesJoined { .. } => HistoryEvent::BranchesJoined,
        SagaEvent::StepFailed { .. } => HistoryEvent::StepFailed,
        SagaEvent::StepCompensated { .. } => HistoryEvent::StepCompensated,
        SagaEvent::CompensationGaveUp { .. } => HistoryEvent::CompensationGaveUp,
        SagaEvent::RetryCompensation { .. } => HistoryEvent::RetryCompensation,
        SagaEvent::Aborted { .. } => HistoryEvent::Aborted,
        SagaEvent::Resolved { .. } => HistoryEvent::Resolved,
        SagaEvent::Halted { .. } => HistoryEvent::Halted,
        SagaEvent::CallbackDelivered { delivered: true, .. } => HistoryEvent::CallbackDelivered,
        SagaEvent::CallbackDelivered { delivered: false, .. } => HistoryEvent::CallbackFailed,
    }
}

fn event_name(event: &SagaEvent) -> &'static str {
    history_event(event).as_str()
}

fn describe(event: &SagaEvent) -> String {
    match event {
        SagaEvent::StepStarted { index } | SagaEvent::StepCompleted { index, .. } => {
            format!("{} of step {index}", event_name(event))
        }
        SagaEvent::StepCompensated { index, .. }
        | SagaEvent::CompensationGaveUp { index, .. }
        | SagaEvent::Resolved { index, .. } => {
            format!("{} of step {index}", event_name(event))
        }
        SagaEvent::BranchesJoined { first, .. } => format!("branches_joined of the stage at step {first}"),
        SagaEvent::StepFailed { failure, .. } => format!("step_failed of step {}", failure.step),
        SagaEvent::RetryCompensation { .. }
        | SagaEvent::CallbackDelivered { .. }
        | SagaEvent::Aborted { .. }
        | SagaEvent::Halted { .. } => event_name(event).into(),
    }
}

/// How a saga ended, with its flow data typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<D> {
    /// Every step succeeded; the final flow data.
    Completed(D),
    /// A step failed and every completed step was undone.
    Compensated(Failure),
    /// A compensation gave up; the saga waits for an operator.
    Stuck {
        /// What failed first.
        failure: Failure,
        /// Why the compensation gave up.
        reason: String,
    },
}

#[cfg(test)]
mod tests;
