//! What an operator does to sagas by hand: abort a running one, settle a
//! stuck compensation, retry stuck ones one by one or in bulk. Everything goes
//! through the log, so it works whichever replica drives the saga.

use std::collections::HashMap;
use std::time::Duration;

use crate::engine::Pause;
use crate::error::{Error, Result};
use crate::log::{ListCursor, ListFilter, LogError};
use crate::metrics as m;
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
/// The key of a facade paused with its new calls held until the resume.
const HOLD_PREFIX: &str = "hold:";
/// How often the switches are read again from the log.
const CONTROLS_REFRESH: Duration = Duration::from_secs(1);

fn pause_key(facade: &str) -> String {
    format!("{PAUSE_PREFIX}{facade}")
}

fn hold_key(facade: &str) -> String {
    format!("{HOLD_PREFIX}{facade}")
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

    /// Retries the compensation of a stuck saga, as operator `by` asked.
    pub async fn retry_stuck(&self, request_id: &str, by: &str) -> Result<SagaRecord> {
        self.retry_as(request_id, by, None).await
    }

    async fn retry_as(&self, request_id: &str, by: &str, reason: Option<&str>) -> Result<SagaRecord> {
        let event = SagaEvent::RetryCompensation { by: Some(by.to_owned()), reason: reason.map(str::to_owned) };
        let record = self.operate(request_id, event, "retry", "stuck").await?;
        tracing::warn!(request_id, by, reason, "stuck saga retried by an operator");
        Ok(record)
    }

    /// Retries every stuck saga matching `filter` as operator `by`, at most
    /// `per_second` a second (their compensations then run within each flow's
    /// concurrency), returning how many matched. `dry_run` counts them and
    /// retries none.
    pub async fn redrive(&self, filter: &RedriveFilter, per_second: u32, dry_run: bool, by: &str) -> Result<usize> {
        let pause = Duration::from_secs(1) / per_second.max(1);
        let (mut matched, mut retried) = (0, 0);
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
                match self.retry_as(&record.request_id, by, Some("redrive")).await {
                    Ok(_) => {
                        retried += 1;
                        metrics::counter!(m::REDRIVEN, "facade" => record.facade.clone()).increment(1);
                    }
                    // Retried meanwhile by someone else: not an error of the batch.
                    Err(Error::WrongState { .. }) => {}
                    Err(e) => return Err(e),
                }
                tokio::time::sleep(pause).await;
            }
            if last {
                break;
            }
            if !dry_run {
                tracing::info!(matched, retried, by, "redrive under way");
            }
        }
        tracing::warn!(matched, retried, dry_run, by, "redrive by an operator done");
        Ok(matched)
    }

    /// Pauses a facade: new calls are refused ([`Error::Paused`]) on every
    /// replica (within a second) and after restarts, until it is resumed;
    /// sagas in flight go on.
    pub async fn pause(&self, facade: &str, by: &str) -> Result<()> {
        self.set_pause(facade, by, false).await
    }

    /// Pauses a facade as [`Orchestrator::pause`] does, except that a new
    /// call waits for the resume (at most [`Options::wait_timeout`](crate::Options),
    /// then [`Error::Paused`]) instead of being refused: nothing of it is
    /// recorded or sent before the resume, so nothing of it can be redelivered,
    /// recovered or taken over meanwhile.
    pub async fn pause_holding(&self, facade: &str, by: &str) -> Result<()> {
        self.set_pause(facade, by, true).await
    }

    async fn set_pause(&self, facade: &str, by: &str, hold: bool) -> Result<()> {
        self.flows.get(facade).ok_or_else(|| Error::UnknownFacade(facade.to_owned()))?;
        let (set, clear) =
            if hold { (hold_key(facade), pause_key(facade)) } else { (pause_key(facade), hold_key(facade)) };
        self.engine.log.set_control(&set, Some(by)).await?;
        self.engine.log.set_control(&clear, None).await?;
        let pause = Pause { by: by.to_owned(), hold };
        self.engine.paused.write().unwrap_or_else(|e| e.into_inner()).insert(facade.to_owned(), pause);
        self.engine.pauses_changed.notify_waiters();
        tracing::warn!(facade, by, hold, "facade paused by an operator");
        Ok(())
    }

    /// Resumes a paused facade; calls held by the pause go on.
    pub async fn resume(&self, facade: &str, by: &str) -> Result<()> {
        self.flows.get(facade).ok_or_else(|| Error::UnknownFacade(facade.to_owned()))?;
        self.engine.log.set_control(&pause_key(facade), None).await?;
        self.engine.log.set_control(&hold_key(facade), None).await?;
        self.engine.paused.write().unwrap_or_else(|e| e.into_inner()).remove(facade);
        self.engine.pauses_changed.notify_waiters();
        tracing::warn!(facade, by, "facade resumed by an operator");
        Ok(())
    }

    /// Returns once `facade` is not paused: at once, with [`Error::Paused`],
    /// under a refusing pause; at the resume under a holding one, or with
    /// [`Error::Paused`] once the caller waited [`Options::wait_timeout`](crate::Options).
    pub(super) async fn wait_unpaused(&self, facade: &str) -> Result<()> {
        let until = tokio::time::Instant::now() + self.engine.options.wait_timeout;
        loop {
            // Registered before looking, so a change between the look and the wait wakes it.
            let changed = self.engine.pauses_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let pause = self.engine.paused.read().unwrap_or_else(|e| e.into_inner()).get(facade).cloned();
            let refused = |by: String| Error::Paused { facade: facade.to_owned(), by };
            match pause {
                None => return Ok(()),
                Some(Pause { by, hold: false }) => return Err(refused(by)),
                Some(Pause { by, hold: true }) => {
                    tokio::select! {
                        () = &mut changed => {}
                        () = tokio::time::sleep_until(until) => return Err(refused(by)),
                        () = self.engine.shutdown.cancelled() => return Err(Error::ShuttingDown),
                    }
                }
            }
        }
    }

    /// Reads the switches from the log (at start: a paused facade stays paused).
    pub(super) async fn read_controls(&self) -> Result<()> {
        let mut paused = HashMap::new();
        for (key, by) in self.engine.log.controls().await? {
            if let Some(facade) = key.strip_prefix(PAUSE_PREFIX) {
                paused.insert(facade.to_owned(), Pause { by, hold: false });
            } else if let Some(facade) = key.strip_prefix(HOLD_PREFIX) {
                paused.entry(facade.to_owned()).or_insert(Pause { by, hold: true });
            }
        }
        let mut current = self.engine.paused.write().unwrap_or_else(|e| e.into_inner());
        if *current != paused {
            *current = paused;
            self.engine.pauses_changed.notify_waiters();
        }
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
