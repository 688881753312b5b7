//! The core's SagaLog conformance suite against PostgreSQL: one schema per `fresh`.

mod support;

use std::sync::{Arc, Mutex};

use sagaflow::SagaLog;
use sagaflow::testsuite::LogHarness;
use support::TestDb;

/// Opens logs in throw-away schemas of the test database.
struct Harness {
    db: TestDb,
    last: Mutex<Option<String>>,
}

#[sagaflow::async_trait]
impl LogHarness for Harness {
    async fn fresh(&self) -> Arc<dyn SagaLog> {
        let schema = self.db.new_schema();
        *self.last.lock().unwrap() = Some(schema.clone());
        Arc::new(self.db.connect(&schema).await)
    }

    async fn reopen(&self) -> Option<Arc<dyn SagaLog>> {
        let schema = self.last.lock().unwrap().clone().expect("reopen after fresh");
        Some(Arc::new(self.db.connect(&schema).await))
    }
}

async fn harness() -> Option<Harness> {
    Some(Harness { db: TestDb::open().await?, last: Mutex::new(None) })
}

sagaflow::saga_log_conformance_tests!(harness());
