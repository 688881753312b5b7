//! The forward part of a saga: each step's action with its timeouts and retries, run in-process (sync flows).

use super::*;

impl<D: FlowData> FlowRuntime<D> {
    /// Runs the saga's steps in-process (sync flow and its recovery), from
    /// where its record stands: the record is kept here as the log has it,
    /// each event applied to it as it is written, and [`SagaRecord::next`]
    /// says which step runs next.
    ///
    /// A step's start and an intermediate step's result are queued, not awaited: nothing is
    /// acked, published or answered between steps, and the awaited write that ends the saga
    /// (the last result, or a failure) is stored no earlier. A crash can therefore lose the
    /// tail of a running saga's record; its recovery ([`Run::Recovered`]) treats every step from
    /// the recorded position on as possibly run.
    pub(super) async fn drive_forward(
        &self,
        mut record: SagaRecord,
        mut data: D,
        deadline: Instant,
        run: Run,
    ) -> Result<Outcome<D>> {
        let id: &Arc<str> = &record.request_id.as_str().into();
        loop {
            let (advanced, json) = match record.next() {
                Next::Run(Stage { first: index, len: 1 }) => {
                    match self.record_start(id, index).await {
                        Ok(()) => record.apply(&SagaEvent::StepStarted { index }).map_err(LogError::from)?,
                        // Moved on without this driver (aborted by an operator): follow the log.
                        Err(Error::Log(LogError::Transition(_))) => {
                            record = self.reread(id).await?;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                    match self.run_action(id, index, &mut data, deadline, run == Run::Recovered).await {
                        Ok(attempts) => (Advanced::Step { index, attempts }, self.encode(id, &data)?),
                        Err(ActionError::Interrupted) => return Err(Error::ShuttingDown),
                        Err(ActionError::Failed { error, attempts, uncertain }) => {
                            return self.fail_forward(id, index, error, attempts, uncertain, run).await;
                        }
                    }
                }
                Next::Run(stage) | Next::Join(stage) => {
                    // Boxed: a linear saga's future stays as small as it was without stages.
                    let branches = Box::pin(self.run_branches(id, &mut record, &mut data, stage, deadline, run));
                    match branches.await? {
                        Branches::Joined => (Advanced::Stage { first: stage.first }, self.encode(id, &data)?),
                        Branches::Failed { index, error, attempts, uncertain } => {
                            return self.fail_forward(id, index, error, attempts, uncertain, run).await;
                        }
                        Branches::Moved => {
                            record = self.reread(id).await?;
                            continue;
                        }
                    }
                }
                Next::Compensate(_) | Next::Wait | Next::End => {
                    // Nothing to run here (recovered after its end, or while compensating): its outcome.
                    let mut waiter = self.engine.completions.register(id);
                    return self.outcome(&self.wait_end(&mut waiter, id).await?);
                }
            };
            // The record takes the data; each write of the event copies it from there.
            record.apply_owned(advanced.event(json)).map_err(LogError::from)?;
            let event = || advanced.event(record.data.clone());
            if !record.state.is_ended() {
                match self.engine.durably(|| self.engine.log.append_queued(id, event())).await {
                    Ok(()) => {}
                    Err(Error::Log(LogError::Transition(_))) => record = self.reread(id).await?,
                    Err(e) => return Err(e),
                }
                continue;
            }
            let stored = match self.engine.durably(|| self.engine.log.append(id, event())).await {
                Ok(stored) => stored,
                Err(Error::Log(LogError::Transition(_))) => {
                    record = self.reread(id).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if stored.state.is_ended() {
                self.finish(&stored).await;
                return Ok(Outcome::Completed(data));
            }
            record = stored;
        }
    }

    /// Records a step's final failure, queues the compensation it starts and
    /// waits for the saga's end.
    async fn fail_forward(
        &self,
        id: &Arc<str>,
        index: usize,
        error: NodeError,
        attempts: u32,
        uncertain: bool,
        run: Run,
    ) -> Result<Outcome<D>> {
        let mut waiter = self.engine.completions.register(id);
        // Recovered: steps after this one may have run before the crash, unless
        // this one was refused outright (an idempotent upstream would have
        // answered a replay of a call that took effect with its result).
        let later = run == Run::Recovered && uncertain && index + 1 < self.flow.len();
        let record = self.record_failure(id, index, error, attempts, uncertain, later).await?;
        if !record.state.is_ended()
            && let Err(e) = self.publish_rollback(&record).await
        {
            tracing::warn!(error = %e, "could not queue the compensation; compensating here");
            self.compensate_here(id, record).await?;
        }
        let record = self.wait_end(&mut waiter, id).await?;
        self.outcome(&record)
    }

    /// Records a step's start without waiting for its commit: the step's
    /// result, written next and awaited, is stored no earlier. A
    /// [`LogError::Transition`] says the saga moved on without the caller
    /// (aborted, or a duplicate delivery got further): the step must not run.
    pub(super) async fn record_start(&self, id: &str, index: usize) -> Result<()> {
        self.engine.durably(|| self.engine.log.append_queued(id, SagaEvent::StepStarted { index })).await
    }

    /// The saga as the log has it now.
    pub(super) async fn reread(&self, id: &str) -> Result<SagaRecord> {
        let record = self.engine.durably(|| self.engine.log.get(id)).await?;
        Ok(record.ok_or_else(|| LogError::NotFound(id.to_owned()))?)
    }

    pub(super) async fn record_failure(
        &self,
        id: &str,
        index: usize,
        error: NodeError,
        attempts: u32,
        uncertain: bool,
        later_steps_in_doubt: bool,
    ) -> Result<SagaRecord> {
        let node = &self.flow.nodes[index];
        tracing::warn!(step = index, node = node.name(), attempts, %error, "step failed; compensating");
        let failure = Failure {
            step: index,
            node: node.name().to_owned(),
            error: error.message().to_owned(),
            code: error.code(),
        };
        let compensate_failed = uncertain && node.has_compensation();
        let event = SagaEvent::StepFailed { failure, attempts, compensate_failed, later_steps_in_doubt };
        let record = self.engine.durably(|| self.engine.log.append(id, event.clone())).await?;
        if record.state.is_ended() {
            self.finish(&record).await;
        }
        Ok(record)
    }

    pub(super) fn step(&self, id: &Arc<str>, index: usize, attempt: u32, phase: Phase, deadline: Instant) -> Step {
        Step {
            request_id: id.clone(),
            facade: self.facade.clone(),
            node: self.node_names[index].clone(),
            index,
            attempt,
            phase,
            deadline,
            cancel: self.engine.shutdown.child_token(),
        }
    }

    /// Calls step `index`'s action with timeouts and retries; a panic is a permanent error.
    /// `in_doubt`: an earlier run (before a crash, or an earlier delivery) may have called it,
    /// so a failure without a call of its own (the deadline passed first) is uncertain.
    pub(super) async fn run_action(
        &self,
        id: &Arc<str>,
        index: usize,
        data: &mut D,
        deadline: Instant,
        in_doubt: bool,
    ) -> Result<u32, ActionError> {
        let node = &self.flow.nodes[index];
        let policy = &self.flow.retry;
        let mut uncertain = false;
        let mut attempt = 1;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let error = NodeError::permanent(format!("saga deadline passed before attempt {attempt}"));
                return Err(ActionError::Failed { error, attempts: attempt - 1, uncertain: uncertain || in_doubt });
            }
            let budget = self.flow.step_timeout.min(deadline - now);
            let step = self.step(id, index, attempt, Phase::Action, now + budget);
            let span = tracing::debug_span!("step", node = node.name(), index, attempt, phase = "action");
            let call = AssertUnwindSafe(node.action(&step, data)).catch_unwind().instrument(span);
            let result = tokio::time::timeout(budget, call).await;
            self.record_call(index, "action", now.elapsed(), attempt);
            let error = match result {
                Ok(Ok(Ok(()))) => match self.flow.oversize(data) {
                    None => return Ok(attempt),
                    Some(error) => {
                        uncertain = true;
                        error
                    }
                },
                Ok(Ok(Err(error))) => node.classify(error),
                Ok(Err(panic)) => {
                    uncertain = true;
                    NodeError::permanent(format!("node panicked: {}", panic_message(&panic)))
                }
                Err(_) => NodeError::timeout(budget),
            };
            // A transient error may hide an effect (a timeout, a lost connection), so the
            // failed step is compensated too; a refusal before the call took effect is not.
            if error.kind().may_have_taken_effect() {
                uncertain = true;
            }
            if !error.is_retryable() || attempt >= policy.max_attempts {
                return Err(ActionError::Failed { error, attempts: attempt, uncertain });
            }
            let delay = policy.delay(attempt + 1);
            if Instant::now() + delay >= deadline {
                return Err(ActionError::Failed { error, attempts: attempt, uncertain });
            }
            tracing::debug!(step = index, attempt, %error, ?delay, "retrying step");
            tokio::select! {
                _ = self.engine.shutdown.cancelled() => return Err(ActionError::Interrupted),
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }
}

/// What the forward part just did, whose event carries the flow data after it.
#[derive(Clone, Copy)]
enum Advanced {
    /// A linear step's action succeeded.
    Step { index: usize, attempts: u32 },
    /// Every branch of the parallel stage starting at `first` succeeded, and their data merged.
    Stage { first: usize },
}

impl Advanced {
    /// The event, with the flow data as it stands after it: what a linear step's result or a
    /// stage's merge leaves in the record's `data` once applied.
    fn event(self, data: serde_json::Value) -> SagaEvent {
        match self {
            Advanced::Step { index, attempts } => SagaEvent::StepCompleted { index, attempts, data },
            Advanced::Stage { first } => SagaEvent::BranchesJoined { first, data },
        }
    }
}
