//! What an operator does to sagas by hand: abort a running one, settle a
//! stuck compensation, retry stuck ones one by one or in bulk. Everything goes
//! through the log, so it works whichever replica drives the saga.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::log::{ListCursor, ListFilter, LogError};
use crate::saga::{SagaEvent, SagaRecord, SagaState, SagaStatus};

use super::Orchestrator;

/// Which stuck sagas [`Orchestrator::redrive`] retries.
#[derive(Debug, Clone, Default)]
pub struct RedriveFilter {
    /// Only this facade.
    pub facade: Option<String>,
    /// Only sagas created at or after this Unix ms.
    pub since_ms: Option<u64>,
    /// Only sagas created before this Unix ms.
    pub until_ms: Option<u64>,
    /// Only sagas whose failed step is this one.
    pub failed_step: Option<usize>,
    /// Only sagas whose failure or give-up reason contains this text.
    pub error_contains: Option<String>,
}

impl RedriveFilter {
    fn matches(&self, record: &SagaRecord) -> bool {
        let SagaState::Stuck { failure, reason, .. } = &record.state else { return false };
        self.failed_step.is_none_or(|step| failure.step == step)
            && self.error_contains.as_deref().is_none_or(|text| failure.error.contains(text) || reason.contains(text))
    }
}

/// The key of a paused facade's switch.
const PAUSE_PREFIX: &str = "pause:";
/// How often the switches are read again from the log.
const CONTROLS_REFRESH: Duration = Duration::from_secs(1);

fn pause_key(facade: &str) -> String {
    format!("{PAUSE_PREFIX}{facade}")
}

/// Sagas read per page while redriving.
const REDRIVE_PAGE: usize = 500;

impl Orchestrator {
    /// Aborts a running saga: no further step starts (a step in flight
    /// finishes or times out, and its result is refused), and what completed
    /// (and the step in flight) is compensated; the saga ends `compensated`
    /// with "aborted by `by`: `reason`" as its failure.
    pub async fn abort(&self, request_id: &str, by: &str, reason: &str) -> Result<SagaRecord> {
        let event = SagaEvent::Aborted { by: by.to_owned(), reason: reason.to_owned() };
        let record = self.operate(request_id, event, "abort", "running").await?;
        tracing::warn!(request_id, by, reason, "saga aborted by an operator");
        Ok(record)
    }

    /// Settles the stuck saga's next pending compensation (step `index`) by
    /// hand: it counts as compensated, and the saga goes on compensating (or
    /// ends, its callback sent).
    pub async fn resolve(&self, request_id: &str, index: usize, by: &str, reason: &str) -> Result<SagaRecord> {
        let event = SagaEvent::Resolved { index, by: by.to_owned(), reason: reason.to_owned() };
        let record = self.operate(request_id, event, "resolve", "stuck at that step").await?;
        tracing::warn!(request_id, step = index, by, reason, "stuck compensation resolved by an operator");
        Ok(record)
    }

    /// Retries the compensation of a stuck saga.
    pub async fn retry_stuck(&self, request_id: &str) -> Result<SagaRecord> {
        self.operate(request_id, SagaEvent::RetryCompensation, "retry", "stuck").await
    }

    /// Retries every stuck saga matching `filter`, at most `per_second` a
    /// second (their compensations then run within each flow's concurrency),
    /// returning how many matched. `dry_run` counts them and retries none.
    pub async fn redrive(&self, filter: &RedriveFilter, per_second: u32, dry_run: bool) -> Result<usize> {
        let pause = Duration::from_secs(1) / per_second.max(1);
        let mut matched = 0;
        let mut after: Option<ListCursor> = None;
        loop {
            let page = ListFilter {
                facade: filter.facade.clone(),
                status: Some(SagaStatus::Stuck),
                limit: REDRIVE_PAGE,
                since_ms: filter.since_ms,
                until_ms: filter.until_ms,
                after: after.take(),
            };
            let sagas = self.engine.log.list(page).await?;
            let last = sagas.len() < REDRIVE_PAGE;
            after = sagas.last().map(ListCursor::of);
            for record in sagas.iter().filter(|r| filter.matches(r)) {
                matched += 1;
                if dry_run {
                    continue;
                }
                match self.retry_stuck(&record.request_id).await {
                    // Retried meanwhile by someone else: not an error of the batch.
                    Ok(_) | Err(Error::WrongState { .. }) => {}
                    Err(e) => return Err(e),
                }
                tokio::time::sleep(pause).await;
            }
            if last {
                break;
            }
        }
        tracing::info!(matched, dry_run, "redrive done");
        Ok(matched)
    }

    /// Pauses a facade: new calls are refused ([`Error::Paused`]) on every
    /// replica (within a second) and after restarts, until it is resumed;
    /// sagas in flight go on.
    pub async fn pause(&self, facade: &str, by: &str) -> Result<()> {
        self.flows.get(facade).ok_or_else(|| Error::UnknownFacade(facade.to_owned()))?;
        self.engine.log.set_control(&pause_key(facade), Some(by)).await?;
        self.engine.paused.write().unwrap_or_else(|e| e.into_inner()).insert(facade.to_owned(), by.to_owned());
        tracing::warn!(facade, by, "facade paused by an operator");
        Ok(())
    }

    /// Resumes a paused facade.
    pub async fn resume(&self, facade: &str, by: &str) -> Result<()> {
        self.flows.get(facade).ok_or_else(|| Error::UnknownFacade(facade.to_owned()))?;
        self.engine.log.set_control(&pause_key(facade), None).await?;
        self.engine.paused.write().unwrap_or_else(|e| e.into_inner()).remove(facade);
        tracing::warn!(facade, by, "facade resumed by an operator");
        Ok(())
    }

    pub(super) fn check_paused(&self, facade: &str) -> Result<()> {
        match self.engine.paused.read().unwrap_or_else(|e| e.into_inner()).get(facade) {
            Some(by) => Err(Error::Paused { facade: facade.to_owned(), by: by.clone() }),
            None => Ok(()),
        }
    }

    /// Reads the switches from the log (at start: a paused facade stays paused).
    pub(super) async fn read_controls(&self) -> Result<()> {
        let paused = self
            .engine
            .log
            .controls()
            .await?
            .into_iter()
            .filter_map(|(key, by)| key.strip_prefix(PAUSE_PREFIX).map(|facade| (facade.to_owned(), by)))
            .collect();
        *self.engine.paused.write().unwrap_or_else(|e| e.into_inner()) = paused;
        Ok(())
    }

    /// Reads the switches again every [`CONTROLS_REFRESH`], so what an
    /// operator set through another replica holds here too.
    pub(super) fn follow_controls(&self) {
        let this = self.clone();
        self.engine.tasks.spawn(async move {
            let mut tick = tokio::time::interval(CONTROLS_REFRESH);
            loop {
                tokio::select! {
                    _ = this.engine.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = this.read_controls().await {
                    tracing::debug!(error = %e, "could not read the operators' switches; next round retries");
                }
            }
        });
    }

    /// Appends an operator's event and carries out what follows: the end's
    /// effects if it ended the saga, its compensation if it left one to run.
    async fn operate(
        &self,
        request_id: &str,
        event: SagaEvent,
        operation: &'static str,
        wanted: &'static str,
    ) -> Result<SagaRecord> {
        let before = self.engine.log.get(request_id).await?.ok_or_else(|| LogError::NotFound(request_id.to_owned()))?;
        let flow = self.flow_of(&before).ok_or_else(|| Error::MissingVersions {
            missing: vec![super::MissingVersion {
                facade: before.facade.clone(),
                version: before.version.clone(),
                sagas: 1,
                request_ids: vec![before.request_id.clone()],
            }],
        })?;
        let record = match self.engine.log.append(request_id, event).await {
            Ok(record) => record,
            Err(LogError::Transition(e)) => {
                return Err(Error::WrongState {
                    request_id: request_id.to_owned(),
                    status: e.state,
                    operation,
                    wanted,
                });
            }
            Err(e) => return Err(e.into()),
        };
        flow.carry_on(&record).await?;
        Ok(record)
    }
}
