//! What follows a saga's steps outside the log: metrics, waking waiters, the callback.

use super::*;

impl<D: FlowData> FlowRuntime<D> {
    pub(super) fn record_call(&self, index: usize, phase: &'static str, took: Duration, attempt: u32) {
        let (facade, node) = (self.facade.to_string(), self.node_names[index].to_string());
        if attempt > 1 {
            metrics::counter!(m::STEP_RETRIES, "facade" => facade.clone(), "node" => node.clone(), "phase" => phase)
                .increment(1);
        }
        metrics::histogram!(m::STEP_SECONDS, "facade" => facade, "node" => node, "phase" => phase)
            .record(m::seconds(took));
    }

    pub(super) fn count_compensation(&self, index: usize, result: &'static str) {
        let (facade, node) = (self.facade.to_string(), self.node_names[index].to_string());
        metrics::counter!(m::COMPENSATIONS, "facade" => facade, "node" => node, "result" => result).increment(1);
    }

    pub(super) fn started(&self) {
        let mode = self.mode.to_string();
        metrics::counter!(m::SAGAS_STARTED, "facade" => self.facade.to_string(), "mode" => mode).increment(1);
        metrics::gauge!(m::SAGAS_IN_FLIGHT, "facade" => self.facade.to_string()).increment(1.0);
    }

    /// After a saga ends: count it, wake its waiters and deliver its callback.
    pub(super) async fn finish(&self, record: &SagaRecord) {
        let status = record.status();
        tracing::debug!(%status, "saga ended");
        let (facade, mode) = (self.facade.to_string(), self.mode.to_string());
        metrics::counter!(m::SAGAS_ENDED, "facade" => facade.clone(), "mode" => mode, "outcome" => status.to_string())
            .increment(1);
        metrics::gauge!(m::SAGAS_IN_FLIGHT, "facade" => facade).decrement(1.0);
        self.engine.completions.complete(record);
        self.engine.send_callback(record).await;
    }
}

impl Engine {
    /// Sends the callback of the ended saga `record`, if it has one, and records
    /// the delivery (or its failure) in its history once the receiver answered.
    pub(crate) async fn send_callback(&self, record: &SagaRecord) {
        let (Some(url), Some(sink)) = (&record.callback_url, &self.callbacks) else { return };
        // Never closed, so always a slot in the end.
        let Ok(slot) = self.callback_slots.clone().acquire_owned().await else { return };
        let callback = SagaCallback {
            request_id: record.request_id.clone(),
            facade: record.facade.clone(),
            status: match &record.state {
                SagaState::Completed => CallbackStatus::Completed,
                SagaState::Compensated { .. } => CallbackStatus::Compensated,
                _ => CallbackStatus::Stuck,
            },
            data: record.data.clone(),
            error: match &record.state {
                SagaState::Compensated { failure } => Some(failure.to_string()),
                SagaState::Stuck { reason, .. } => Some(reason.clone()),
                _ => None,
            },
        };
        let sink = sink.clone();
        let url = url.clone();
        let log = self.log.clone();
        let id = record.request_id.clone();
        let deliver = async move {
            let _slot = slot;
            let report = sink.deliver(&url, callback).await;
            let result = if report.delivered { "delivered" } else { "failed" };
            metrics::counter!(m::CALLBACKS, "result" => result).increment(1);
            if report.delivered {
                tracing::debug!(attempts = report.attempts, "callback delivered");
            } else {
                tracing::warn!(attempts = report.attempts, error = ?report.error, "callback not delivered");
            }
            let event = SagaEvent::CallbackDelivered {
                delivered: report.delivered,
                attempts: report.attempts,
                error: report.error,
            };
            // Awaited, so that a crash right after leaves little room for a second POST: a
            // start sends the callbacks of sagas that ended without one recorded.
            if let Err(e) = log.append(&id, event).await {
                tracing::warn!(error = %e, "could not record the callback delivery");
            }
        };
        self.tasks.spawn(deliver.instrument(tracing::Span::current()));
    }
}
