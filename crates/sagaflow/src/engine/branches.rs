//! Parallel stages run in-process: every branch at once on its own copy of the
//! flow data, each recorded as it ends, their data merged once all are done.

use futures::stream::{FuturesUnordered, StreamExt};

use super::*;

/// How a parallel stage run in-process ended.
pub(super) enum Branches {
    /// Every branch done and merged into the flow data.
    Joined,
    /// A branch failed for good; its siblings still running were cancelled.
    Failed { index: usize, error: NodeError, attempts: u32, uncertain: bool },
    /// The saga moved on without this driver (an operator's abort): follow the log.
    Moved,
}

impl<D: FlowData> FlowRuntime<D> {
    /// Runs the branches of `stage` not done yet, at once, and merges their
    /// data into `data` (the flow data before the stage) once every branch is done; `record` follows each
    /// event as it is written. A branch that fails for good cancels those
    /// still running: dropped mid-call, their effect is unknown, and the
    /// record leaves them running, so the failure compensates them as in doubt.
    pub(super) async fn run_branches(
        &self,
        id: &Arc<str>,
        record: &mut SagaRecord,
        data: &mut D,
        stage: Stage,
        deadline: Instant,
        run: Run,
    ) -> Result<Branches> {
        let todo: Vec<usize> = record.to_run(stage).collect();
        for &index in &todo {
            match self.record_start(id, index).await {
                Ok(()) => record.apply(&SagaEvent::StepStarted { index }).map_err(LogError::from)?,
                Err(Error::Log(LogError::Transition(_))) => return Ok(Branches::Moved),
                Err(e) => return Err(e),
            }
        }
        let mut running: FuturesUnordered<_> = todo
            .iter()
            .map(|&index| {
                let input = record.data.clone();
                async move {
                    let mut branch = self.decode(id, input)?;
                    let result = self.run_action(id, index, &mut branch, deadline, run == Run::Recovered).await;
                    Ok::<_, Error>((index, result, branch))
                }
            })
            .collect();
        let mut outputs: Vec<Option<D>> = (0..stage.len).map(|_| None).collect();
        while let Some(ended) = running.next().await {
            let (index, result, branch) = ended?;
            match result {
                Ok(attempts) => {
                    let event = SagaEvent::StepCompleted { index, attempts, data: self.encode(id, &branch)? };
                    match self.engine.durably(|| self.engine.log.append_queued(id, event.clone())).await {
                        Ok(()) => record.apply(&event).map_err(LogError::from)?,
                        Err(Error::Log(LogError::Transition(_))) => return Ok(Branches::Moved),
                        Err(e) => return Err(e),
                    }
                    outputs[index - stage.first] = Some(branch);
                }
                Err(ActionError::Interrupted) => return Err(Error::ShuttingDown),
                Err(ActionError::Failed { error, attempts, uncertain }) => {
                    return Ok(Branches::Failed { index, error, attempts, uncertain });
                }
            }
        }
        drop(running);
        let branches = self.branch_outputs(id, record, stage, outputs)?;
        self.flow.merge(stage, data, branches);
        if let Some(error) = self.flow.oversize(data) {
            // Every branch ran: the stage, failed at its first step, is compensated whole.
            return Ok(Branches::Failed { index: stage.first, error, attempts: 0, uncertain: true });
        }
        Ok(Branches::Joined)
    }

    /// The data of every branch of `stage`, in step order: the ones run here
    /// as they ended, the others (done before a crash) as their record has it.
    pub(super) fn branch_outputs(
        &self,
        id: &str,
        record: &SagaRecord,
        stage: Stage,
        mut here: Vec<Option<D>>,
    ) -> Result<Vec<D>> {
        stage
            .steps()
            .map(|index| match here.get_mut(index - stage.first).and_then(Option::take) {
                Some(data) => Ok(data),
                None => {
                    let output = record.step_states[index].output.clone();
                    self.decode(id, output.unwrap_or(serde_json::Value::Null))
                }
            })
            .collect()
    }

    /// The flow data a compensation reads: the record's, with the data of
    /// branches done and not merged (their stage failed) merged in.
    pub(super) fn data_to_compensate(&self, record: &SagaRecord) -> Result<D> {
        let id = &record.request_id;
        let mut data = self.decode(id, record.data.clone())?;
        if record.shape().is_none() {
            return Ok(data);
        }
        let mut index = record.completed;
        while index < record.steps {
            let stage = record.stage_of(index);
            let done: Vec<D> = stage
                .steps()
                .filter_map(|i| record.step_states[i].output.clone())
                .map(|output| self.decode(id, output))
                .collect::<Result<_>>()?;
            if !done.is_empty() {
                self.flow.merge(stage, &mut data, done);
            }
            index += stage.len;
        }
        Ok(data)
    }
}
