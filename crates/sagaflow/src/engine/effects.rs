//! What follows a saga's steps outside the log: metrics, waking waiters, the callback.

use std::sync::OnceLock;

use super::*;

/// A flow's metric handles, each taken from the recorder the first time it is used and kept: a
/// handle records straight into its series, where the macros build the key (allocating its
/// labels), hash it and look it up in the recorder's registry on every call — a few percent of
/// a sync saga's instructions. A handle is taken at first use, not up front, so that a series
/// appears when it first has something to say, as it did before. (A recorder installed after
/// a flow's first saga is therefore not seen by it: install it at start.)
#[derive(Default)]
pub(crate) struct Meters {
    started: OnceLock<metrics::Counter>,
    in_flight: OnceLock<metrics::Gauge>,
    /// By [`SagaStatus`]: only the ended ones are used.
    ended: [OnceLock<metrics::Counter>; 5],
    /// By node index, then action and compensation.
    steps: Box<[[StepMeters; 2]]>,
}

#[derive(Default)]
struct StepMeters {
    seconds: OnceLock<metrics::Histogram>,
    retries: OnceLock<metrics::Counter>,
    /// Compensations that succeeded, and those given up (compensation phase only).
    compensations: [OnceLock<metrics::Counter>; 2],
}

impl Meters {
    pub(crate) fn new(nodes: usize) -> Self {
        Self { steps: (0..nodes).map(|_| Default::default()).collect(), ..Default::default() }
    }
}

fn phase_index(phase: &'static str) -> usize {
    usize::from(phase != "action")
}

impl<D: FlowData> FlowRuntime<D> {
    pub(super) fn record_call(&self, index: usize, phase: &'static str, took: Duration, attempt: u32) {
        let step = &self.meters.steps[index][phase_index(phase)];
        let labels = || (self.facade.to_string(), self.node_names[index].to_string());
        if attempt > 1 {
            let retries = step.retries.get_or_init(|| {
                let (facade, node) = labels();
                metrics::counter!(m::STEP_RETRIES, "facade" => facade, "node" => node, "phase" => phase)
            });
            retries.increment(1);
        }
        let seconds = step.seconds.get_or_init(|| {
            let (facade, node) = labels();
            metrics::histogram!(m::STEP_SECONDS, "facade" => facade, "node" => node, "phase" => phase)
        });
        seconds.record(m::seconds(took));
    }

    pub(super) fn count_compensation(&self, index: usize, result: &'static str) {
        let slot = &self.meters.steps[index][1].compensations[usize::from(result != "ok")];
        let counter = slot.get_or_init(|| {
            let (facade, node) = (self.facade.to_string(), self.node_names[index].to_string());
            metrics::counter!(m::COMPENSATIONS, "facade" => facade, "node" => node, "result" => result)
        });
        counter.increment(1);
    }

    pub(super) fn in_flight(&self) -> &metrics::Gauge {
        self.meters.in_flight.get_or_init(|| metrics::gauge!(m::SAGAS_IN_FLIGHT, "facade" => self.facade.to_string()))
    }

    pub(super) fn started(&self) {
        let started = self.meters.started.get_or_init(|| {
            metrics::counter!(m::SAGAS_STARTED, "facade" => self.facade.to_string(), "mode" => self.mode.to_string())
        });
        started.increment(1);
        self.in_flight().increment(1.0);
    }

    /// After a saga ends: count it, wake its waiters and deliver its callback.
    pub(super) async fn finish(&self, record: &SagaRecord) {
        let status = record.status();
        tracing::debug!(%status, "saga ended");
        let ended = self.meters.ended[status as usize].get_or_init(|| {
            let (facade, mode) = (self.facade.to_string(), self.mode.to_string());
            metrics::counter!(m::SAGAS_ENDED, "facade" => facade, "mode" => mode, "outcome" => status.to_string())
        });
        ended.increment(1);
        self.in_flight().decrement(1.0);
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
