//! The process's Prometheus recorder, and the upkeep that keeps its memory bounded.
//!
//! The recorder keeps every histogram sample in a pending buffer until `run_upkeep` (or a
//! render) folds it into the histogram's buckets. Nothing else calls it when `/metrics` is not
//! scraped, so without the upkeep thread a process at 3,000 sagas/s grew by about 6 MiB a
//! minute for as long as it ran (two step durations per saga).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// How often pending histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder, installed on first use (one per process), with a thread
/// that folds its pending histogram samples every [`UPKEEP_INTERVAL`].
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Explicit buckets for every histogram; they are non-empty, so this cannot fail.
            let builder = PrometheusBuilder::new()
                .set_buckets(&sagaflow::metrics::LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); then ours only renders nothing new.
            let _ = metrics::set_global_recorder(recorder);
            spawn_upkeep(handle.clone(), UPKEEP_INTERVAL);
            handle
        })
        .clone()
}

/// Runs `handle`'s upkeep every `interval` on a thread of its own for the rest of the process
/// (a thread, not a task: the recorder may be first used outside a runtime, and outlives any).
fn spawn_upkeep(handle: PrometheusHandle, interval: Duration) {
    let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
        loop {
            std::thread::sleep(interval);
            handle.run_upkeep();
        }
    });
    if let Err(err) = spawned {
        // Metrics still work; their histograms' pending samples are then folded only by scrapes.
        tracing::warn!(error = %err, "could not start the metrics upkeep thread");
    }
}
