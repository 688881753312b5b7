//! A saga's record and the transitions that are the only way to change it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Failure, FlowVersion, HistoryEntry, HistoryEvent, Mode, NewSaga, SagaEvent, SagaState, SagaStatus, Shape, Stage,
    TransitionError, describe, history_event, now_ms,
};

/// Where one step of a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Its action has not started.
    Pending,
    /// Its action started and has not ended (or its end was not recorded).
    Running,
    /// Its action succeeded.
    Done,
    /// Its action failed for good, with no effect to undo.
    Failed,
    /// Its compensation is due: it ran, may have run, or failed uncertainly.
    Compensating,
    /// Its compensation succeeded (or an operator settled it).
    Compensated,
}

/// One step of a saga: its status and, for a branch of a parallel stage
/// done and not yet merged, the flow data it produced. Stored as its status
/// alone (`"done"`) when it has no data, so a linear saga's record stays small.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "StoredStep")]
pub struct StepState {
    /// Where it stands.
    pub status: StepStatus,
    /// The flow data after the branch's action, until the stage's branches are merged.
    pub output: Option<Value>,
}

impl Serialize for StepState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        match &self.output {
            None => self.status.serialize(serializer),
            Some(output) => {
                let mut step = serializer.serialize_struct("StepState", 2)?;
                step.serialize_field("status", &self.status)?;
                step.serialize_field("output", output)?;
                step.end()
            }
        }
    }
}

/// A step as stored: its status alone, or with the data its branch produced.
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredStep {
    Status(StepStatus),
    WithOutput {
        status: StepStatus,
        #[serde(default)]
        output: Option<Value>,
    },
}

impl From<StoredStep> for StepState {
    fn from(stored: StoredStep) -> Self {
        match stored {
            StoredStep::Status(status) => Self { status, output: None },
            StoredStep::WithOutput { status, output } => Self { status, output },
        }
    }
}

impl StepState {
    const PENDING: Self = Self { status: StepStatus::Pending, output: None };

    fn with(status: StepStatus) -> Self {
        Self { status, output: None }
    }
}

/// Everything recorded about one saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct SagaRecord {
    /// Its identity.
    pub request_id: String,
    /// The facade it runs under.
    pub facade: String,
    /// How it runs.
    pub mode: Mode,
    /// Number of steps of its flow.
    pub steps: usize,
    /// Steps completed and merged into `data`: the first step of the current stage while running.
    pub completed: usize,
    /// Flow data after the last completed stage.
    pub data: Value,
    /// Where it stands.
    pub state: SagaState,
    /// Where each step stands, by index.
    pub step_states: Vec<StepState>,
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

/// A record as stored, written before steps had their own status or after.
#[derive(Deserialize)]
struct Stored {
    request_id: String,
    facade: String,
    mode: Mode,
    steps: usize,
    completed: usize,
    data: Value,
    state: SagaState,
    #[serde(default)]
    step_states: Vec<StepState>,
    deadline_ms: u64,
    callback_url: Option<String>,
    created_ms: u64,
    updated_ms: u64,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    version: Option<FlowVersion>,
    history: Vec<HistoryEntry>,
}

impl From<Stored> for SagaRecord {
    fn from(s: Stored) -> Self {
        let mut record = SagaRecord {
            request_id: s.request_id,
            facade: s.facade,
            mode: s.mode,
            steps: s.steps,
            completed: s.completed,
            data: s.data,
            state: s.state,
            step_states: s.step_states,
            deadline_ms: s.deadline_ms,
            callback_url: s.callback_url,
            created_ms: s.created_ms,
            updated_ms: s.updated_ms,
            owner: s.owner,
            version: s.version,
            history: s.history,
        };
        if record.step_states.len() != record.steps {
            record.step_states = record.legacy_step_states();
        }
        record
    }
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
            step_states: vec![StepState::PENDING; start.steps],
            deadline_ms: start.deadline_ms,
            callback_url: start.callback_url,
            created_ms: now,
            updated_ms: now,
            owner: start.owner,
            version: start.version,
            history: vec![HistoryEntry {
                at_ms: now,
                event: HistoryEvent::Started,
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

    /// Whether it has a callback URL and its history does not end with a delivery (or a
    /// failed one) of it: for an ended saga, a callback still to be sent or recorded.
    pub fn callback_pending(&self) -> bool {
        self.callback_url.is_some()
            && self.history.last().is_some_and(|entry| {
                !matches!(entry.event, HistoryEvent::CallbackDelivered | HistoryEvent::CallbackFailed)
            })
    }

    /// Where step `index` stands (pending past the flow's end).
    pub fn step_status(&self, index: usize) -> StepStatus {
        self.step_states.get(index).map_or(StepStatus::Pending, |s| s.status)
    }

    /// Which of the saga's steps run in parallel, as its flow version recorded it.
    pub fn shape(&self) -> Option<&Shape> {
        self.version.as_ref().map(|v| &v.shape).filter(|s| !s.is_linear())
    }

    /// The stage step `step` belongs to.
    pub fn stage_of(&self, step: usize) -> Stage {
        match self.shape() {
            Some(shape) => shape.stage_of(step),
            None => Stage { first: step, len: 1 },
        }
    }

    /// The steps left to compensate, latest first (empty unless compensating or stuck).
    pub fn pending(&self) -> &[usize] {
        match &self.state {
            SagaState::Compensating { pending, .. } | SagaState::Stuck { pending, .. } => pending,
            _ => &[],
        }
    }

    /// Whether step `index` is one of the pending compensations that may run now:
    /// those of the latest stage with any.
    fn compensable(&self, index: usize) -> bool {
        self.pending().first().is_some_and(|&next| self.stage_of(next).contains(index))
            && self.pending().contains(&index)
    }

    /// Whether `stage` is a parallel stage whose branches are all done and not
    /// merged: its merge may still fail (the merged data too large), which
    /// fails the stage at its first step.
    fn merge_due(&self, stage: Stage) -> bool {
        stage.is_parallel()
            && stage.first == self.completed
            && stage.steps().all(|i| self.step_states[i].status == StepStatus::Done)
    }

    /// The step statuses of a record stored before steps had their own.
    fn legacy_step_states(&self) -> Vec<StepState> {
        let mut states = vec![StepState::PENDING; self.steps];
        for state in states.iter_mut().take(self.completed) {
            state.status = StepStatus::Done;
        }
        let running = self.history.last().filter(|h| h.event == HistoryEvent::StepStarted).and_then(|h| h.step);
        match &self.state {
            SagaState::Running => {
                if let Some(state) = running.and_then(|i| states.get_mut(i)) {
                    state.status = StepStatus::Running;
                }
            }
            SagaState::Completed => {}
            SagaState::Compensating { failure, pending } | SagaState::Stuck { failure, pending, .. } => {
                mark_compensation(&mut states, Some(failure.step), pending)
            }
            SagaState::Compensated { failure } => mark_compensation(&mut states, Some(failure.step), &[]),
        }
        states
    }

    /// Applies one event; the only way a record changes.
    pub fn apply(&mut self, event: &SagaEvent) -> Result<(), TransitionError> {
        self.transition(event, None)
    }

    /// [`apply`](Self::apply) for an event the caller is done with: its flow data is moved into
    /// the record, not copied (a log's copy of the record, say, applying the event it was sent).
    pub fn apply_owned(&mut self, mut event: SagaEvent) -> Result<(), TransitionError> {
        let data = match &mut event {
            SagaEvent::StepCompleted { data, .. } | SagaEvent::BranchesJoined { data, .. } => {
                Some(std::mem::take(data))
            }
            _ => None,
        };
        self.transition(&event, data)
    }

    /// Applies `event`, whose flow data is `taken` when it was moved out of it.
    fn transition(&mut self, event: &SagaEvent, mut taken: Option<serde_json::Value>) -> Result<(), TransitionError> {
        let mut data_of = |data: &serde_json::Value| taken.take().unwrap_or_else(|| data.clone());
        let refuse = |record: &Self| TransitionError {
            request_id: record.request_id.clone(),
            state: record.status(),
            event: describe(event),
        };
        let mut entry = HistoryEntry {
            at_ms: now_ms(),
            event: history_event(event),
            step: None,
            attempts: None,
            error: None,
            by: None,
            reason: None,
        };
        let current = self.stage_of(self.completed);
        match (&self.state, event) {
            (SagaState::Running, SagaEvent::StepStarted { index })
                if current.contains(*index) && self.step_status(*index) != StepStatus::Done =>
            {
                self.step_states[*index].status = StepStatus::Running;
                entry.step = Some(*index);
            }
            (SagaState::Running, SagaEvent::StepCompleted { index, attempts, data })
                if current.contains(*index) && self.step_status(*index) != StepStatus::Done =>
            {
                let step = &mut self.step_states[*index];
                step.status = StepStatus::Done;
                if current.is_parallel() {
                    step.output = Some(data_of(data));
                } else {
                    self.completed += 1;
                    self.data = data_of(data);
                    if self.completed == self.steps {
                        self.state = SagaState::Completed;
                    }
                }
                entry.step = Some(*index);
                entry.attempts = Some(*attempts);
            }
            (SagaState::Running, SagaEvent::BranchesJoined { first, data })
                if *first == self.completed
                    && current.is_parallel()
                    && current.steps().all(|i| self.step_states[i].status == StepStatus::Done) =>
            {
                for step in &mut self.step_states[current.steps()] {
                    step.output = None;
                }
                self.completed += current.len;
                self.data = data_of(data);
                if self.completed == self.steps {
                    self.state = SagaState::Completed;
                }
                entry.step = Some(*first);
            }
            (
                SagaState::Running,
                SagaEvent::StepFailed { failure, attempts, compensate_failed, later_steps_in_doubt },
            ) if current.contains(failure.step)
                && (self.step_status(failure.step) != StepStatus::Done || self.merge_due(current)) =>
            {
                let failed = failure.step;
                // Done steps, and running siblings (cancelled, in doubt), are undone; the failed
                // step if an attempt may have taken effect; every step from its stage on if the
                // log may lag what ran.
                let pending: Vec<usize> = (0..self.steps)
                    .rev()
                    .filter(|&i| {
                        let status = self.step_states[i].status;
                        (*later_steps_in_doubt && i >= current.first)
                            || if i == failed {
                                *compensate_failed
                            } else {
                                matches!(status, StepStatus::Done | StepStatus::Running)
                            }
                    })
                    .collect();
                mark_compensation(&mut self.step_states, Some(failed), &pending);
                entry.step = Some(failed);
                entry.attempts = Some(*attempts);
                entry.error = Some(failure.error.clone());
                self.state = if pending.is_empty() {
                    SagaState::Compensated { failure: failure.clone() }
                } else {
                    SagaState::Compensating { failure: failure.clone(), pending }
                };
            }
            (SagaState::Compensating { .. }, SagaEvent::StepCompensated { index, attempts })
                if self.compensable(*index) =>
            {
                let SagaState::Compensating { failure, pending } = &mut self.state else { unreachable!() };
                pending.retain(|i| i != index);
                self.step_states[*index].status = StepStatus::Compensated;
                entry.step = Some(*index);
                entry.attempts = Some(*attempts);
                if pending.is_empty() {
                    self.state = SagaState::Compensated { failure: failure.clone() };
                }
            }
            // A sibling's compensation ending after another one of its stage gave up.
            (SagaState::Stuck { .. }, SagaEvent::StepCompensated { index, attempts })
                if self.compensable(*index) && self.to_compensate(self.stage_of(*index)).count() > 1 =>
            {
                let SagaState::Stuck { pending, .. } = &mut self.state else { unreachable!() };
                pending.retain(|i| i != index);
                self.step_states[*index].status = StepStatus::Compensated;
                entry.step = Some(*index);
                entry.attempts = Some(*attempts);
            }
            (SagaState::Compensating { .. }, SagaEvent::CompensationGaveUp { index, attempts, reason })
                if self.compensable(*index) =>
            {
                let SagaState::Compensating { failure, pending } = &mut self.state else { unreachable!() };
                entry.step = Some(*index);
                entry.attempts = Some(*attempts);
                entry.error = Some(reason.clone());
                self.state = SagaState::Stuck {
                    failure: failure.clone(),
                    reason: format!("compensation of step {index} gave up after {attempts} attempts: {reason}"),
                    pending: pending.clone(),
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
                    SagaState::Compensating { failure: failure.clone(), pending: pending.clone() }
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
                self.state =
                    SagaState::Stuck { failure: failure.clone(), reason: reason.clone(), pending: pending.clone() };
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
            (SagaState::Stuck { .. }, SagaEvent::Resolved { index, by, reason }) if self.compensable(*index) => {
                let SagaState::Stuck { failure, pending, .. } = &mut self.state else { unreachable!() };
                pending.retain(|i| i != index);
                self.step_states[*index].status = StepStatus::Compensated;
                entry.step = Some(*index);
                entry.error = Some(format!("resolved by {by}: {reason}"));
                entry.by = Some(by.clone());
                entry.reason = Some(reason.clone());
                self.state = if pending.is_empty() {
                    SagaState::Compensated { failure: failure.clone() }
                } else {
                    SagaState::Compensating { failure: failure.clone(), pending: pending.clone() }
                };
            }
            _ => return Err(refuse(self)),
        }
        self.updated_ms = entry.at_ms;
        self.history.push(entry);
        Ok(())
    }

    /// What stopping a running saga leaves to compensate: every step done and
    /// every step started and not ended, which may be in flight, its effect unknown.
    fn stop_running(&mut self, error: String) -> (Failure, Vec<usize>) {
        let step = self.completed.min(self.steps.saturating_sub(1));
        let pending: Vec<usize> = (0..self.steps)
            .rev()
            .filter(|&i| matches!(self.step_states[i].status, StepStatus::Done | StepStatus::Running))
            .collect();
        mark_compensation(&mut self.step_states, None, &pending);
        (Failure { step, node: String::new(), error, code: None }, pending)
    }
}

/// Marks the steps of a saga turning to compensation: `pending` are due,
/// the failed step is failed unless it is one of them, the others keep their status.
fn mark_compensation(states: &mut [StepState], failed: Option<usize>, pending: &[usize]) {
    for (i, state) in states.iter_mut().enumerate() {
        if pending.contains(&i) {
            // A branch's unmerged output stays: its compensation reads it.
            state.status = StepStatus::Compensating;
        } else if Some(i) == failed {
            *state = StepState::with(StepStatus::Failed);
        } else if state.status == StepStatus::Done {
            // Done and not pending: compensated already (only in a record stored
            // before steps had their own status; a new failure makes every done step pending).
            state.status = StepStatus::Compensated;
        }
    }
}
