//! What a saga does next, decided from its record alone.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::{SagaRecord, SagaState, StepStatus};

/// Which of a flow's steps run in parallel: the sizes of its stages, in order.
/// A stage's steps depend on every step of the stage before and on nothing
/// else. Empty for a flow of one step after another (every stage one step),
/// so a linear flow's records and versions read as they always did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// The shape of stages of `sizes` steps each, in order (the linear shape
    /// when every stage is one step).
    pub fn of_stages(sizes: impl IntoIterator<Item = usize>) -> Self {
        let sizes: Vec<usize> = sizes.into_iter().collect();
        if sizes.iter().all(|&n| n == 1) { Self::default() } else { Self(sizes) }
    }

    /// Whether every stage is one step.
    pub fn is_linear(&self) -> bool {
        self.0.is_empty()
    }

    /// The stage step `step` belongs to.
    pub fn stage_of(&self, step: usize) -> Stage {
        let mut first = 0;
        for &len in &self.0 {
            if step < first + len {
                return Stage { first, len };
            }
            first += len;
        }
        // Linear, or past the listed stages: a stage of its own.
        Stage { first: step, len: 1 }
    }

    /// The stage sizes, in order (empty for a linear flow).
    pub fn stages(&self) -> &[usize] {
        &self.0
    }
}

/// The steps of one stage: `len` steps from `first` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stage {
    /// Its first step.
    pub first: usize,
    /// Its number of steps.
    pub len: usize,
}

impl Stage {
    /// Its steps' indexes.
    pub fn steps(&self) -> Range<usize> {
        self.first..self.first + self.len
    }

    /// Whether step `step` is one of its steps.
    pub fn contains(&self, step: usize) -> bool {
        self.steps().contains(&step)
    }

    /// Whether its steps run in parallel.
    pub fn is_parallel(&self) -> bool {
        self.len > 1
    }
}

/// What happens next to a saga (see [`SagaRecord::next`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run the actions of the stage's steps that are not done
    /// ([`SagaRecord::to_run`]); one step in a linear flow.
    Run(Stage),
    /// Every branch of the parallel stage is done: merge their results into
    /// the flow data ([`SagaEvent::BranchesJoined`](super::SagaEvent::BranchesJoined)) and go on.
    Join(Stage),
    /// Run the compensations of the stage's pending steps
    /// ([`SagaRecord::to_compensate`]), independent of each other.
    Compensate(Stage),
    /// Nothing until an operator acts (a stuck saga).
    Wait,
    /// Nothing: the saga has ended.
    End,
}

/// What a delivered hop does (see [`SagaRecord::on_hop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHop {
    /// Its step is one to run now: run it.
    Run,
    /// Its step is recorded and the saga has moved on to the stage: send the
    /// hops of the stage's steps not done, which may not have reached the broker.
    Resend(Stage),
    /// Its stage's branches are all done but not merged (the merge's writer
    /// stopped before it): merge them and go on.
    Join(Stage),
    /// Its step, a branch, is done and a sibling is not: the sibling's hop continues.
    Done,
    /// It came before step `0`, the start of the saga's current stage, was recorded: try again later.
    Early(usize),
    /// The saga is compensating: make sure its rollback is queued.
    Compensate,
    /// The saga has ended (or waits for an operator): nothing to run.
    Ended,
}

impl SagaRecord {
    /// What happens next to this saga, decided from its record alone. Every
    /// path of the engine (a sync saga's loop, a delivered hop or rollback,
    /// recovery, the sweep, a takeover) asks this and carries the answer out.
    pub fn next(&self) -> Next {
        match &self.state {
            SagaState::Running if self.completed < self.steps => {
                let stage = self.stage_of(self.completed);
                if stage.is_parallel() && self.to_run(stage).next().is_none() {
                    Next::Join(stage)
                } else {
                    Next::Run(stage)
                }
            }
            SagaState::Compensating { pending, .. } => match pending.first() {
                Some(&index) => Next::Compensate(self.stage_of(index)),
                None => Next::Wait,
            },
            SagaState::Stuck { .. } => Next::Wait,
            SagaState::Running | SagaState::Completed | SagaState::Compensated { .. } => Next::End,
        }
    }

    /// The steps of `stage` whose action is still to run (not done).
    pub fn to_run(&self, stage: Stage) -> impl Iterator<Item = usize> + '_ {
        stage.steps().filter(|&i| self.step_status(i) != StepStatus::Done)
    }

    /// The pending compensations of `stage`, latest first.
    pub fn to_compensate(&self, stage: Stage) -> impl Iterator<Item = usize> + '_ {
        self.pending().iter().copied().take_while(move |&i| stage.contains(i))
    }

    /// The next compensation to run, if compensating (the latest pending step).
    pub fn next_compensation(&self) -> Option<usize> {
        match self.next() {
            Next::Compensate(stage) => self.to_compensate(stage).next(),
            _ => None,
        }
    }

    /// What a delivered hop for step `step` does, given this record.
    pub fn on_hop(&self, step: usize) -> OnHop {
        match self.next() {
            Next::Run(stage) if stage.contains(step) => {
                if self.step_status(step) == StepStatus::Done {
                    OnHop::Done
                } else {
                    OnHop::Run
                }
            }
            // Recorded already: the hop that follows may not have reached the broker.
            Next::Run(stage) if step < stage.first => OnHop::Resend(stage),
            Next::Join(stage) if step < stage.first + stage.len => OnHop::Join(stage),
            Next::Run(stage) | Next::Join(stage) => OnHop::Early(stage.first),
            Next::Compensate(_) => OnHop::Compensate,
            Next::Wait | Next::End => OnHop::Ended,
        }
    }
}
