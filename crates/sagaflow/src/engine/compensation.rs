//! Compensations: each completed step undone in reverse dependency order, with retries, recorded one by one.

use futures::stream::{FuturesUnordered, StreamExt};

use super::*;

impl<D: FlowData> FlowRuntime<D> {
    /// Calls step `index`'s compensation until it succeeds or the policy gives up.
    pub(super) async fn run_compensation(
        &self,
        id: &Arc<str>,
        index: usize,
        data: &D,
    ) -> Result<u32, CompensationError> {
        let node = &self.flow.nodes[index];
        let policy = &self.flow.compensation_retry;
        let mut attempt = 1;
        loop {
            let budget = self.flow.step_timeout;
            let started = Instant::now();
            let step = self.step(id, index, attempt, Phase::Compensation, started + budget);
            let span = tracing::debug_span!("step", node = node.name(), index, attempt, phase = "compensation");
            let call = AssertUnwindSafe(node.compensate(&step, data)).catch_unwind().instrument(span);
            let result = tokio::time::timeout(budget, call).await;
            self.record_call(index, "compensation", started.elapsed(), attempt);
            let error = match result {
                Ok(Ok(Ok(()))) => {
                    self.count_compensation(index, "ok");
                    return Ok(attempt);
                }
                Ok(Ok(Err(error))) => node.classify(error),
                Ok(Err(panic)) => NodeError::permanent(format!("compensation panicked: {}", panic_message(&panic))),
                Err(_) => NodeError::timeout(budget),
            };
            if attempt >= policy.max_attempts {
                self.count_compensation(index, "gave_up");
                return Err(CompensationError::GaveUp { error, attempts: attempt });
            }
            let delay = policy.delay(attempt + 1);
            tracing::debug!(step = index, attempt, %error, ?delay, "retrying compensation");
            tokio::select! {
                _ = self.engine.shutdown.cancelled() => return Err(CompensationError::Interrupted),
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    /// Runs every pending compensation of the saga, recording each as it
    /// ends: latest stage first, the steps of a stage (independent of each
    /// other) at once. Returns the record once ended, or `None` if interrupted
    /// by shutdown.
    pub(super) async fn compensate(&self, mut record: SagaRecord) -> Result<Option<Ended>> {
        let id: Arc<str> = record.request_id.as_str().into();
        let data = match self.data_to_compensate(&record) {
            Ok(data) => data,
            Err(error) => {
                // The stop's end effects ran in `halt`.
                let (record, _) = self.halt(&id, &error).await?;
                return Ok(Some(Ended { wrote_end: false, record }));
            }
        };
        let mut wrote_end = false;
        while let Next::Compensate(stage) = record.next() {
            let mut calls: FuturesUnordered<_> =
                record.to_compensate(stage).map(|index| self.compensation_of(&id, index, &data)).collect();
            while let Some(event) = calls.next().await {
                let Some(event) = event else { return Ok(None) };
                (record, wrote_end) = self.append_or_reload(&id, event).await?;
            }
        }
        Ok(Some(Ended { wrote_end: wrote_end && record.state.is_ended(), record }))
    }

    /// Runs step `index`'s compensation (none to run: done at once) and
    /// returns the event that records how it ended; `None` if interrupted.
    async fn compensation_of(&self, id: &Arc<str>, index: usize, data: &D) -> Option<SagaEvent> {
        if !self.flow.nodes[index].has_compensation() {
            return Some(SagaEvent::StepCompensated { index, attempts: 0 });
        }
        match self.run_compensation(id, index, data).await {
            Ok(attempts) => Some(SagaEvent::StepCompensated { index, attempts }),
            Err(CompensationError::Interrupted) => None,
            Err(CompensationError::GaveUp { error, attempts }) => {
                tracing::error!(step = index, attempts, %error, "compensation gave up; saga is stuck");
                Some(SagaEvent::CompensationGaveUp { index, attempts, reason: error.to_string() })
            }
        }
    }

    /// Compensates the saga in this task (its rollback could not be queued)
    /// and, if this run ended it, runs its end.
    pub(super) async fn compensate_here(&self, id: &Arc<str>, record: SagaRecord) -> Result<()> {
        let Ok(_claim) = self.engine.claims.claim(id, Work::Compensation) else {
            return Ok(()); // another task of this process compensates it
        };
        if let Some(ended) = self.compensate(record).await?
            && ended.wrote_end
        {
            self.finish(&ended.record).await;
        }
        Ok(())
    }

    /// Stops a saga whose flow data no longer decodes into the flow's type: it
    /// ends stuck, the error its reason, until an operator retries it (once a
    /// deploy reads the data again). Returns the record and whether this call
    /// wrote the stop; a saga that ended meanwhile is left as it is.
    pub(super) async fn halt(&self, id: &str, error: &Error) -> Result<(SagaRecord, bool)> {
        tracing::error!(request_id = id, %error, "flow data does not decode; the saga is stuck until retried");
        let reason = error.to_string();
        let (record, wrote) = self.append_or_reload(id, SagaEvent::Halted { reason }).await?;
        if wrote && record.state.is_ended() {
            self.finish(&record).await;
        }
        Ok((record, wrote))
    }

    /// Appends (waiting out an unavailable log); if another delivery of the
    /// same work got there first, reads the record as it now is instead. The
    /// flag says whether this append is the one that was recorded.
    pub(super) async fn append_or_reload(&self, id: &str, event: SagaEvent) -> Result<(SagaRecord, bool)> {
        match self.engine.durably(|| self.engine.log.append(id, event.clone())).await {
            Ok(record) => Ok((record, true)),
            Err(Error::Log(LogError::Transition(e))) => {
                tracing::debug!(error = %e, "another delivery moved the saga on");
                let record = self.engine.durably(|| self.engine.log.get(id)).await?;
                Ok((record.ok_or_else(|| LogError::NotFound(id.to_owned()))?, false))
            }
            Err(e) => Err(e),
        }
    }
}

/// A compensation run that reached the saga's end.
pub(super) struct Ended {
    /// The saga as it ended.
    pub(super) record: SagaRecord,
    /// Whether this run wrote the end: only the writer of the terminal record
    /// runs end-of-saga effects (waiters, metrics, the callback), so a
    /// duplicate delivery or a recovery racing a redelivery runs them once.
    pub(super) wrote_end: bool,
}
