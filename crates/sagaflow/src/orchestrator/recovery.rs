//! Picking up unfinished sagas: at start, and when they stall.

use crate::engine::Resume;
use crate::error::Result;
use crate::log::{ListCursor, ListFilter};
use crate::saga::{SagaStatus, now_ms};

use super::Orchestrator;

impl Orchestrator {
    /// Every `stale_sweep_interval`, resumes the unfinished sagas that made no
    /// progress for longer than their timeout and that nothing in this process
    /// works on: a sync saga whose task was lost, a hop or a rollback that left
    /// the broker without effect. Resuming is safe twice over: every step and
    /// compensation is checked against the log before it runs.
    pub(super) fn sweep_stale(&self) {
        let this = self.clone();
        self.engine.tasks.spawn(async move {
            let mut tick = tokio::time::interval(this.engine.options.stale_sweep_interval);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = this.engine.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let unfinished = match this.engine.log.unfinished_of(&this.engine.options.pod_id).await {
                    Ok(unfinished) => unfinished,
                    Err(e) => {
                        tracing::warn!(error = %e, "stale-saga sweep could not read the log; next round retries");
                        continue;
                    }
                };
                let now = now_ms();
                for record in unfinished {
                    let timeout = record.deadline_ms.saturating_sub(record.created_ms);
                    if now < record.updated_ms.saturating_add(timeout) || this.engine.claims.is_claimed(&record.request_id)
                    {
                        continue;
                    }
                    let Some(flow) = this.flow_of(&record) else { continue }; // waits for its version
                    let id = record.request_id.clone();
                    tracing::warn!(request_id = %id, status = %record.status(), "saga made no progress; resuming it");
                    if let Err(e) = flow.clone().recover(record, Resume::Stale).await {
                        tracing::warn!(request_id = %id, error = %e, "could not resume a stale saga; next round retries");
                    }
                }
            }
        });
    }

    /// Picks up the unfinished sagas this replica answers for: all of them on
    /// a log of its own; on a shared log those it owns (a restart under the
    /// same `pod_id`), not the ones other live replicas drive.
    pub(super) async fn recover(&self) -> Result<()> {
        let me = self.engine.options.pod_id.as_str();
        let started_ms = now_ms();
        let mut unfinished = self.engine.log.unfinished_of(me).await?;
        if self.engine.log.shared() {
            unfinished.retain(|r| r.owner.as_deref() == Some(me));
        }
        if !unfinished.is_empty() {
            tracing::info!(count = unfinished.len(), "recovering unfinished sagas");
        }
        for record in unfinished {
            match self.flow_of(&record) {
                Some(flow) => {
                    let id = record.request_id.clone();
                    if let Err(e) = flow.recover(record, Resume::Restart).await {
                        tracing::error!(request_id = %id, error = %e, "could not recover saga; it stays unfinished");
                    }
                }
                None => tracing::warn!(
                    request_id = %record.request_id,
                    facade = %record.facade,
                    version = ?record.version,
                    "unfinished saga of a flow version not registered here; it waits for it"
                ),
            }
        }
        self.resend_callbacks(started_ms).await
    }

    /// Sends the callbacks that a crash cut off: of sagas this replica ended
    /// by `started_ms`, within `callback_replay_window`, whose history
    /// ends without a callback delivery (the end is recorded before its POST).
    async fn resend_callbacks(&self, started_ms: u64) -> Result<()> {
        const PAGE: usize = 1_000;
        if self.engine.callbacks.is_none() {
            return Ok(());
        }
        let me = self.engine.options.pod_id.as_str();
        let since = started_ms.saturating_sub(self.engine.options.callback_replay_window.as_millis() as u64);
        let mut sent = 0;
        for status in [SagaStatus::Completed, SagaStatus::Compensated, SagaStatus::Stuck] {
            let mut after = None;
            loop {
                let filter = ListFilter {
                    status: Some(status),
                    since_ms: Some(since),
                    limit: PAGE,
                    after,
                    ..ListFilter::default()
                };
                let page = self.engine.log.list(filter).await?;
                for record in &page {
                    let mine = !self.engine.log.shared() || record.owner.as_deref() == Some(me);
                    if mine && record.updated_ms <= started_ms && record.callback_pending() {
                        tracing::info!(request_id = %record.request_id, "sending a callback a crash cut off");
                        self.engine.send_callback(record).await;
                        sent += 1;
                    }
                }
                if page.len() < PAGE {
                    break;
                }
                after = page.last().map(ListCursor::of);
            }
        }
        if sent > 0 {
            tracing::info!(count = sent, "sent callbacks a crash had cut off");
        }
        Ok(())
    }
}
