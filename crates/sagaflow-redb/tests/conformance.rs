//! The shared SagaLog conformance suite, run against the embedded log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow::log::{Retention, SagaLog};
use sagaflow::testsuite::LogHarness;
use sagaflow_redb::{RedbOptions, RedbSagaLog};
use tempfile::TempDir;

/// Each `fresh` log lives in its own temporary directory, removed with the harness.
struct Harness {
    last: Mutex<Option<Last>>,
}

struct Last {
    dir: TempDir,
    /// The retention it was opened with, without background pruning; `None`: the defaults.
    retention: Option<Retention>,
    /// Held so `reopen` can close the log (its writer joined, its file unlocked) before opening it again.
    log: Option<Arc<RedbSagaLog>>,
}

#[sagaflow::async_trait]
impl LogHarness for Harness {
    async fn fresh(&self) -> Arc<dyn SagaLog> {
        self.open_fresh(None)
    }

    async fn fresh_with_retention(&self, retention: Retention) -> Arc<dyn SagaLog> {
        self.open_fresh(Some(retention))
    }

    async fn prune(&self) {
        let log = self.last.lock().unwrap().as_ref().and_then(|last| last.log.clone()).expect("prune after fresh");
        log.prune_now().await.expect("pruning");
    }

    async fn reopen(&self) -> Option<Arc<dyn SagaLog>> {
        let mut last = self.last.lock().unwrap();
        let last = last.as_mut().expect("reopen after fresh");
        if let Some(log) = last.log.take() {
            // The suite has dropped its handles: this is the last one, and dropping it closes the file.
            assert_eq!(Arc::strong_count(&log), 1, "a handle to the first log is still alive");
            drop(log);
        }
        let log = Arc::new(RedbSagaLog::open(options(last.dir.path(), last.retention)).expect("the saga log reopened"));
        last.log = Some(log.clone());
        Some(log)
    }
}

impl Harness {
    fn open_fresh(&self, retention: Option<Retention>) -> Arc<dyn SagaLog> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = Arc::new(RedbSagaLog::open(options(dir.path(), retention)).expect("a fresh saga log"));
        *self.last.lock().unwrap() = Some(Last { dir, retention, log: Some(log.clone()) });
        log
    }
}

fn options(dir: &std::path::Path, retention: Option<Retention>) -> RedbOptions {
    match retention {
        Some(retention) => RedbOptions::new(dir).retention(retention).prune_interval(Duration::MAX),
        None => RedbOptions::new(dir),
    }
}

async fn harness() -> Option<Harness> {
    Some(Harness { last: Mutex::new(None) })
}

sagaflow::saga_log_conformance_tests!(harness());
