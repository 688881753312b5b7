//! The metrics sagaflow records, through the `metrics` facade. The service
//! installs an exporter (Prometheus in the booking demo); without one,
//! recording costs next to nothing.

use std::time::Duration;

/// Sagas started, by `facade` and `mode`.
pub const SAGAS_STARTED: &str = "sagaflow_sagas_started_total";
/// Sagas ended, by `facade`, `mode` and `outcome` (completed, compensated, stuck).
pub const SAGAS_ENDED: &str = "sagaflow_sagas_ended_total";
/// Sagas started and not yet ended in this process, by `facade`.
pub const SAGAS_IN_FLIGHT: &str = "sagaflow_sagas_in_flight";
/// Duration of one node call, by `facade`, `node` and `phase` (action, compensation).
pub const STEP_SECONDS: &str = "sagaflow_step_duration_seconds";
/// Node calls retried, by `facade`, `node` and `phase`.
pub const STEP_RETRIES: &str = "sagaflow_step_retries_total";
/// Compensations run, by `facade`, `node` and `result` (ok, gave_up).
pub const COMPENSATIONS: &str = "sagaflow_compensations_total";
/// Callers waiting for a saga's end in this process.
pub const WAITING_CALLERS: &str = "sagaflow_waiting_callers";
/// Messages waiting on a topic, by `topic` (where the broker can tell).
pub const QUEUE_DEPTH: &str = "sagaflow_queue_depth";
/// Time a broker took to confirm a publish, by `broker`.
pub const PUBLISH_SECONDS: &str = "sagaflow_broker_publish_seconds";
/// Time a broker took to take an ack, by `broker`.
pub const ACK_SECONDS: &str = "sagaflow_broker_ack_seconds";
/// Messages dead-lettered by the engine, by `topic`.
pub const DEAD_LETTERED: &str = "sagaflow_dead_lettered_total";
/// Callback deliveries, by `result` (delivered, failed).
pub const CALLBACKS: &str = "sagaflow_callbacks_total";
/// Unfinished sagas picked up at start, by `facade`.
pub const RECOVERED: &str = "sagaflow_recovered_total";
/// Stale sagas resumed by the sweep (no progress for longer than their timeout), by `facade`.
pub const RESUMED_STALE: &str = "sagaflow_resumed_stale_total";
/// Sagas taken over from a replica whose lease ran out, by `facade`.
pub const TAKEN_OVER: &str = "sagaflow_taken_over_total";
/// Saga log writes retried because the log was unavailable.
pub const LOG_RETRIES: &str = "sagaflow_log_retries_total";
/// Stuck sagas retried by an operator's redrive, as it goes.
pub const REDRIVEN: &str = "sagaflow_redriven_total";

/// Every histogram above, for exporters that need explicit buckets.
pub const HISTOGRAMS: [&str; 3] = [STEP_SECONDS, PUBLISH_SECONDS, ACK_SECONDS];

/// Buckets (seconds) that suit step, publish and ack latencies: 100 µs to 30 s.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0];

/// Describes every metric once, so exporters print help lines.
pub(crate) fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(SAGAS_STARTED, "Sagas started");
    describe_counter!(SAGAS_ENDED, "Sagas ended, by outcome");
    describe_gauge!(SAGAS_IN_FLIGHT, "Sagas started and not yet ended in this process");
    describe_histogram!(STEP_SECONDS, Unit::Seconds, "Duration of one node call");
    describe_counter!(STEP_RETRIES, "Node calls retried");
    describe_counter!(COMPENSATIONS, "Compensations run, by result");
    describe_gauge!(WAITING_CALLERS, "Callers waiting for a saga's end");
    describe_gauge!(QUEUE_DEPTH, "Messages waiting on a topic");
    describe_histogram!(PUBLISH_SECONDS, Unit::Seconds, "Time to a broker's publish confirmation");
    describe_histogram!(ACK_SECONDS, Unit::Seconds, "Time for a broker to take an ack");
    describe_counter!(DEAD_LETTERED, "Messages dead-lettered");
    describe_counter!(CALLBACKS, "Callback deliveries, by result");
    describe_counter!(RECOVERED, "Unfinished sagas picked up at start");
    describe_counter!(RESUMED_STALE, "Stale sagas resumed by the sweep");
    describe_counter!(TAKEN_OVER, "Sagas taken over from replicas whose lease ran out");
    describe_counter!(LOG_RETRIES, "Saga log writes retried while the log was unavailable");
    describe_counter!(REDRIVEN, "Stuck sagas retried by a redrive, by facade");
}

pub(crate) fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}
