//! A saga's recorded state and the transitions that are the only way to change it.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// Running forward; the next step is [`SagaRecord::completed`].
    Running,
    /// Undoing; `pending` are the steps still to compensate, in the order to run them.
    Compensating {
        /// What failed.
        failure: Failure,
        /// Steps left to compensate, next first.
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

/// One state change of a saga, as written to the [`SagaLog`](crate::SagaLog).
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
/// (its shape: node names in order, which have compensations) and the label
/// its user gave it, if any.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowVersion {
    /// The fingerprint of the flow's shape; what versions are told apart by.
    pub fingerprint: String,
    /// The user's name for the version ([`Flow::label`](crate::Flow::label)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl fmt::Display for FlowVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.label {
            Some(label) => write!(f, "{label} ({})", self.fingerprint),
            None => f.write_str(&self.fingerprint),
        }
    }
}

/// One line of a saga's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Unix ms.
    pub at_ms: u64,
    /// The event, without its data.
    pub event: String,
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

/// Everything recorded about one saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaRecord {
    /// Its identity.
    pub request_id: String,
    /// The facade it runs under.
    pub facade: String,
    /// How it runs.
    pub mode: Mode,
    /// Number of steps of its flow.
    pub steps: usize,
    /// Steps completed so far (the next step's index while running).
    pub completed: usize,
    /// Flow data after the last completed step.
    pub data: Value,
    /// Where it stands.
    pub state: SagaState,
    /// Unix ms after which the forward part compensates.
    pub deadline_ms: u64,
    /// Where to POST the outcome (async flows).
    pub callback_url: Option<String>,
    /// Unix ms of its start.
    pub created_ms: u64,
    /// Unix ms of its last change.
    pub updated_ms: u64,
    /// The replica that drives it (see [`NewSaga::owner`]); `None` for any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The flow version it runs on (see [`NewSaga::version`]); `None` (a saga
    /// begun before versions were recorded) runs on its facade's current flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<FlowVersion>,
    /// Every event applied, without data.
    pub history: Vec<HistoryEntry>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl SagaRecord {
    /// The record of a saga that has just started.
    pub fn new(start: NewSaga) -> Self {
        let now = now_ms();
        Self {
            request_id: start.request_id,
            facade: start.facade,
            mode: start.mode,
            steps: start.steps,
            completed: 0,
            data: start.data,
            state: SagaState::Running,
            deadline_ms: start.deadline_ms,
            callback_url: start.callback_url,
            created_ms: now,
            updated_ms: now,
            owner: start.owner,
            version: start.version,
            history: vec![HistoryEntry {
                at_ms: now,
                event: "started".into(),
                step: None,
                attempts: None,
                error: None,
                by: None,
                reason: None,
            }],
        }
    }

    /// The state's name.
    pub fn status(&self) -> SagaStatus {
        self.state.status()
    }

    /// Applies one event; the only way a record changes.
    pub fn apply(&mut self, event: &SagaEvent) -> Result<(), TransitionError> {
        let refuse = |record: &Self| TransitionError {
            request_id: record.request_id.clone(),
            state: record.status(),
            event: describe(event),
        };
        let mut entry = HistoryEntry {
            at_ms: now_ms(),
            event: event_name(event).into(),
            step: None,
            attempts: None,
            error: None,
            by: None,
            reason: None,
        };
        match (&mut self.state, event) {
            (SagaState::Running, SagaEvent::StepStarted { index }) if *index == self.completed => {
                entry.step = Some(*index);
            }
            (SagaState::Running, SagaEvent::StepCompleted { index, attempts, data }) if *index == self.completed => {
                self.completed += 1;
                self.data = data.clone();
                if self.completed == self.steps {
                    self.state = SagaState::Completed;
                }
                entry.step = Some(*index);
                entry.attempts = Some(*attempts);
            }
            (
                SagaState::Running,
                SagaEvent::StepFailed { failure, attempts, compensate_failed, later_steps_in_doubt },
            ) if failure.step == self.completed => {
                let last = if *later_steps_in_doubt {
                    self.steps.max(failure.step + 1)
                } else if *compensate_failed {
                    failure.step + 1
                } else {
                    failure.step
                };
                let pending: Vec<usize> = (0..last).rev().collect();
                entry.step = Some(failure.step);
                entry.attempts = Some(*attempts);
                entry.error = Some(failure.error.clone());
                self.state = if pending.is_empty() {
                    SagaState::Compensated { failure: failure.clone() }
                } else {
                    SagaState::Compensating { failure: failure.clone(), pending }
                };
            }
            (SagaState::Compensating { failure, pending }, SagaEvent::StepCompensated { index, attempts })
                if pending.first() == Some(index) =>
            {
                pending.remove(0);
                entry.step = Some(*index);
                entry.attempts = Some(*attempts);
                if pending.is_empty() {
                    self.state = SagaState::Compensated { failure: failure.clone() };
                }
            }
            (
                SagaState::Compensating { failure, pending },
                SagaEvent::CompensationGaveUp { index, attempts, reason },
            ) if pending.first() == Some(index) => {
                entry.step = Some(*index);
                entry.attempts = Some(*attempts);
                entry.error = Some(reason.clone());
                self.state = SagaState::Stuck {
                    failure: failure.clone(),
                    reason: format!("compensation of step {index} gave up after {attempts} attempts: {reason}"),
                    pending: std::mem::take(pending),
                };
            }
            (state, SagaEvent::CallbackDelivered { delivered, attempts, error }) if state.is_ended() => {
                entry.attempts = Some(*attempts);
                entry.error = if *delivered { None } else { error.clone() };
            }
            (SagaState::Stuck { failure, pending, .. }, SagaEvent::RetryCompensation { by, reason }) => {
                entry.step = pending.first().copied();
                entry.by.clone_from(by);
                entry.reason.clone_from(reason);
                // Halted before anything ran: nothing to undo.
                self.state = if pending.is_empty() {
                    SagaState::Compensated { failure: failure.clone() }
                } else {
                    SagaState::Compensating { failure: failure.clone(), pending: std::mem::take(pending) }
                };
            }
            (SagaState::Running, SagaEvent::Halted { reason }) => {
                let (failure, pending) = self.stop_running(reason.clone());
                entry.step = Some(failure.step);
                entry.error = Some(reason.clone());
                self.state = SagaState::Stuck { failure, reason: reason.clone(), pending };
            }
            (SagaState::Compensating { failure, pending }, SagaEvent::Halted { reason }) => {
                entry.step = pending.first().copied();
                entry.error = Some(reason.clone());
                self.state = SagaState::Stuck {
                    failure: failure.clone(),
                    reason: reason.clone(),
                    pending: std::mem::take(pending),
                };
            }
            (SagaState::Running, SagaEvent::Aborted { by, reason }) => {
                let (failure, pending) = self.stop_running(format!("aborted by {by}: {reason}"));
                entry.step = Some(failure.step);
                entry.error = Some(failure.error.clone());
                entry.by = Some(by.clone());
                entry.reason = Some(reason.clone());
                self.state = if pending.is_empty() {
                    SagaState::Compensated { failure }
                } else {
                    SagaState::Compensating { failure, pending }
                };
            }
            (SagaState::Stuck { failure, pending, .. }, SagaEvent::Resolved { index, by, reason })
                if pending.first() == Some(index) =>
            {
                pending.remove(0);
                entry.step = Some(*index);
                entry.error = Some(format!("resolved by {by}: {reason}"));
                entry.by = Some(by.clone());
                entry.reason = Some(reason.clone());
                self.state = if pending.is_empty() {
                    SagaState::Compensated { failure: failure.clone() }
                } else {
                    SagaState::Compensating { failure: failure.clone(), pending: std::mem::take(pending) }
                };
            }
            _ => return Err(refuse(self)),
        }
        self.updated_ms = entry.at_ms;
        self.history.push(entry);
        Ok(())
    }

    /// What stopping a running saga leaves to compensate: every completed step
    /// and the one started last, which may be in flight, its effect unknown.
    fn stop_running(&self, error: String) -> (Failure, Vec<usize>) {
        let step = self.completed.min(self.steps.saturating_sub(1));
        let in_doubt = self.history.last().is_some_and(|h| h.event == "step_started" && h.step == Some(step));
        let last = if in_doubt { step + 1 } else { self.completed };
        (Failure { step, node: String::new(), error, code: None }, (0..last).rev().collect())
    }

    /// The next compensation to run, if compensating.
    pub fn next_compensation(&self) -> Option<usize> {
        match self.next() {
            Next::Compensate(index) => Some(index),
            _ => None,
        }
    }

    /// What happens next to this saga, decided from its record alone. Every
    /// path of the engine (a sync saga's loop, a delivered hop or rollback,
    /// recovery, the sweep, a takeover) asks this and carries the answer out.
    pub fn next(&self) -> Next {
        match &self.state {
            SagaState::Running if self.completed < self.steps => Next::Run(self.completed),
            SagaState::Compensating { pending, .. } => match pending.first() {
                Some(&index) => Next::Compensate(index),
                None => Next::Wait,
            },
            SagaState::Stuck { .. } => Next::Wait,
            SagaState::Running | SagaState::Completed | SagaState::Compensated { .. } => Next::End,
        }
    }

    /// What a delivered hop for step `step` does, given this record.
    pub fn on_hop(&self, step: usize) -> OnHop {
        match self.next() {
            Next::Run(index) if index == step => OnHop::Run,
            // Recorded already: the hop that follows may not have reached the broker.
            Next::Run(index) if index > step => OnHop::Resend(index),
            Next::Run(index) => OnHop::Early(index),
            Next::Compensate(_) => OnHop::Compensate,
            Next::Wait | Next::End => OnHop::Ended,
        }
    }
}

/// What happens next to a saga (see [`SagaRecord::next`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run step `0`'s action.
    Run(usize),
    /// Run step `0`'s compensation.
    Compensate(usize),
    /// Nothing until an operator acts (a stuck saga).
    Wait,
    /// Nothing: the saga has ended.
    End,
}

/// What a delivered hop does (see [`SagaRecord::on_hop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHop {
    /// Its step is the saga's next: run it.
    Run,
    /// Its step is recorded: send the hop of step `0`, the saga's next.
    Resend(usize),
    /// It came before step `0`, the saga's next, was recorded: try again later.
    Early(usize),
    /// The saga is compensating: make sure its rollback is queued.
    Compensate,
    /// The saga has ended (or waits for an operator): nothing to run.
    Ended,
}

fn event_name(event: &SagaEvent) -> &'static str {
    match event {
        SagaEvent::StepStarted { .. } => "step_started",
        SagaEvent::StepCompleted { .. } => "step_completed",
        SagaEvent::StepFailed { .. } => "step_failed",
        SagaEvent::StepCompensated { .. } => "step_compensated",
        SagaEvent::CompensationGaveUp { .. } => "compensation_gave_up",
        SagaEvent::RetryCompensation { .. } => "retry_compensation",
        SagaEvent::Aborted { .. } => "aborted",
        SagaEvent::Resolved { .. } => "resolved",
        SagaEvent::Halted { .. } => "halted",
        SagaEvent::CallbackDelivered { delivered: true, .. } => "callback_delivered",
        SagaEvent::CallbackDelivered { delivered: false, .. } => "callback_failed",
    }
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
mod tests {
    use serde_json::json;

    use super::*;

    fn record(steps: usize) -> SagaRecord {
        SagaRecord::new(NewSaga {
            request_id: "r1".into(),
            facade: "F".into(),
            mode: Mode::Sync,
            steps,
            data: json!({}),
            deadline_ms: u64::MAX,
            callback_url: None,
            owner: None,
            version: None,
        })
    }

    fn failure(step: usize) -> Failure {
        Failure { step, node: format!("N{step}"), error: "no".into(), code: Some(9) }
    }

    fn complete(r: &mut SagaRecord, index: usize) {
        r.apply(&SagaEvent::StepStarted { index }).unwrap();
        r.apply(&SagaEvent::StepCompleted { index, attempts: 1, data: json!({ "step": index }) }).unwrap();
    }

    #[test]
    fn running_to_completed_in_order() {
        let mut r = record(2);
        complete(&mut r, 0);
        assert_eq!(r.status(), SagaStatus::Running);
        assert_eq!(r.completed, 1);
        complete(&mut r, 1);
        assert_eq!(r.state, SagaState::Completed);
        assert_eq!(r.data, json!({ "step": 1 }));
        assert_eq!(r.history.len(), 5);
    }

    #[test]
    fn next_follows_the_record_through_every_state() {
        let mut r = record(3);
        assert_eq!(r.next(), Next::Run(0));
        complete(&mut r, 0);
        complete(&mut r, 1);
        assert_eq!(r.next(), Next::Run(2));
        assert_eq!((r.on_hop(2), r.on_hop(1), r.on_hop(0)), (OnHop::Run, OnHop::Resend(2), OnHop::Resend(2)));
        r.apply(&SagaEvent::StepStarted { index: 2 }).unwrap();
        let failed = SagaEvent::StepFailed {
            failure: failure(2),
            attempts: 1,
            compensate_failed: false,
            later_steps_in_doubt: false,
        };
        r.apply(&failed).unwrap();
        assert_eq!(r.next(), Next::Compensate(1));
        assert_eq!(r.on_hop(2), OnHop::Compensate);
        r.apply(&SagaEvent::CompensationGaveUp { index: 1, attempts: 3, reason: "down".into() }).unwrap();
        assert_eq!((r.next(), r.on_hop(2)), (Next::Wait, OnHop::Ended));
        r.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
        r.apply(&SagaEvent::StepCompensated { index: 1, attempts: 1 }).unwrap();
        assert_eq!(r.next(), Next::Compensate(0));
        r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 1 }).unwrap();
        assert_eq!((r.next(), r.on_hop(0)), (Next::End, OnHop::Ended));
        let fresh = record(2);
        assert_eq!(fresh.on_hop(1), OnHop::Early(0), "a hop ahead of the record waits");
    }

    #[test]
    fn steps_cannot_be_skipped_or_repeated() {
        let mut r = record(3);
        assert!(r.apply(&SagaEvent::StepStarted { index: 1 }).is_err());
        complete(&mut r, 0);
        let err = r.apply(&SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(null) }).unwrap_err();
        assert_eq!(err.state, SagaStatus::Running);
    }

    #[test]
    fn failure_compensates_completed_steps_in_reverse() {
        let mut r = record(3);
        complete(&mut r, 0);
        complete(&mut r, 1);
        r.apply(&SagaEvent::StepFailed {
            failure: failure(2),
            attempts: 1,
            compensate_failed: false,
            later_steps_in_doubt: false,
        })
        .unwrap();
        assert_eq!(r.state, SagaState::Compensating { failure: failure(2), pending: vec![1, 0] });
        // Out of order is refused: step 0 cannot be undone before step 1.
        assert!(r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 1 }).is_err());
        r.apply(&SagaEvent::StepCompensated { index: 1, attempts: 1 }).unwrap();
        assert_eq!(r.next_compensation(), Some(0));
        r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 2 }).unwrap();
        assert_eq!(r.state, SagaState::Compensated { failure: failure(2) });
    }

    #[test]
    fn an_uncertain_failed_step_is_compensated_too() {
        let mut r = record(2);
        complete(&mut r, 0);
        r.apply(&SagaEvent::StepFailed {
            failure: failure(1),
            attempts: 5,
            compensate_failed: true,
            later_steps_in_doubt: false,
        })
        .unwrap();
        assert_eq!(r.next_compensation(), Some(1));
    }

    #[test]
    fn a_first_step_refusal_ends_compensated_at_once() {
        let mut r = record(2);
        r.apply(&SagaEvent::StepFailed {
            failure: failure(0),
            attempts: 1,
            compensate_failed: false,
            later_steps_in_doubt: false,
        })
        .unwrap();
        assert_eq!(r.state, SagaState::Compensated { failure: failure(0) });
    }

    #[test]
    fn compensation_giving_up_is_stuck_and_retriable() {
        let mut r = record(2);
        complete(&mut r, 0);
        r.apply(&SagaEvent::StepFailed {
            failure: failure(1),
            attempts: 1,
            compensate_failed: false,
            later_steps_in_doubt: false,
        })
        .unwrap();
        r.apply(&SagaEvent::CompensationGaveUp { index: 0, attempts: 10, reason: "down".into() }).unwrap();
        match &r.state {
            SagaState::Stuck { reason, pending, .. } => {
                assert!(reason.contains("down"), "{reason}");
                assert_eq!(pending, &vec![0]);
            }
            other => panic!("not stuck: {other:?}"),
        }
        assert!(r.state.is_ended());
        r.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
        assert_eq!(r.next_compensation(), Some(0));
        r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 1 }).unwrap();
        assert_eq!(r.status(), SagaStatus::Compensated);
    }

    #[test]
    fn operators_are_named_in_the_history_and_older_retries_still_read() {
        let old: SagaEvent = serde_json::from_value(json!({ "event": "retry_compensation" })).unwrap();
        assert_eq!(old, SagaEvent::RetryCompensation { by: None, reason: None });
        let mut r = record(2);
        complete(&mut r, 0);
        r.apply(&SagaEvent::StepStarted { index: 1 }).unwrap();
        r.apply(&SagaEvent::Aborted { by: "ann".into(), reason: "asked to".into() }).unwrap();
        if let SagaState::Compensating { failure, .. } = &r.state {
            assert_eq!(failure.to_string(), "step 1 failed: aborted by ann: asked to");
        }
        let aborted = r.history.last().unwrap();
        assert_eq!((aborted.by.as_deref(), aborted.reason.as_deref()), (Some("ann"), Some("asked to")));
        r.apply(&SagaEvent::StepCompensated { index: 1, attempts: 1 }).unwrap();
        r.apply(&SagaEvent::CompensationGaveUp { index: 0, attempts: 2, reason: "down".into() }).unwrap();
        let retry = SagaEvent::RetryCompensation { by: Some("bo".into()), reason: Some("redrive".into()) };
        r.apply(&retry).unwrap();
        let retried = r.history.last().unwrap();
        assert_eq!(
            (retried.by.as_deref(), retried.reason.as_deref(), retried.step),
            (Some("bo"), Some("redrive"), Some(0))
        );
        // Entries without an operator keep their old shape.
        let started = serde_json::to_value(&r.history[1]).unwrap();
        assert!(started.get("by").is_none() && started.get("reason").is_none(), "{started}");
    }

    #[test]
    fn ended_sagas_refuse_every_event() {
        let mut r = record(1);
        complete(&mut r, 0);
        assert!(r.apply(&SagaEvent::StepStarted { index: 1 }).is_err());
        assert!(r.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).is_err());
        assert!(
            r.apply(&SagaEvent::StepFailed {
                failure: failure(0),
                attempts: 1,
                compensate_failed: false,
                later_steps_in_doubt: false
            })
            .is_err()
        );
    }

    #[test]
    fn a_halted_saga_is_stuck_and_a_retry_compensates_what_it_did() {
        let mut r = record(3);
        complete(&mut r, 0);
        r.apply(&SagaEvent::StepStarted { index: 1 }).unwrap();
        r.apply(&SagaEvent::Halted { reason: "does not decode".into() }).unwrap();
        match &r.state {
            SagaState::Stuck { reason, pending, failure } => {
                assert_eq!(reason, "does not decode");
                assert_eq!(pending, &vec![1, 0], "the step started last is in doubt");
                assert_eq!(failure.step, 1);
            }
            other => panic!("not stuck: {other:?}"),
        }
        assert_eq!(r.next(), Next::Wait);
        r.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
        assert_eq!(r.next(), Next::Compensate(1));
        r.apply(&SagaEvent::Halted { reason: "still".into() }).unwrap();
        assert!(matches!(&r.state, SagaState::Stuck { pending, .. } if pending == &vec![1, 0]));

        let mut fresh = record(2);
        fresh.apply(&SagaEvent::Halted { reason: "no".into() }).unwrap();
        fresh.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
        assert_eq!(fresh.status(), SagaStatus::Compensated, "nothing ran: nothing to undo");
        assert!(fresh.apply(&SagaEvent::Halted { reason: "no".into() }).is_err(), "an ended saga stays ended");
    }

    #[test]
    fn a_record_without_a_version_still_reads_and_one_with_it_round_trips() {
        let mut old = serde_json::to_value(record(1)).unwrap();
        assert!(old.get("version").is_none(), "no version, no field");
        old.as_object_mut().unwrap().remove("version");
        let read: SagaRecord = serde_json::from_value(old).unwrap();
        assert_eq!(read.version, None);
        let mut versioned = record(1);
        versioned.version = Some(FlowVersion { fingerprint: "00ff".into(), label: Some("v1".into()) });
        let json = serde_json::to_value(&versioned).unwrap();
        assert_eq!(json["version"], json!({ "fingerprint": "00ff", "label": "v1" }));
        assert_eq!(serde_json::from_value::<SagaRecord>(json).unwrap(), versioned);
        assert_eq!(versioned.version.unwrap().to_string(), "v1 (00ff)");
    }
}
