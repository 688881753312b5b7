//! The core's SagaLog conformance suite against PostgreSQL: one schema per `fresh`.

mod support;

use std::sync::{Arc, Mutex};

use sagaflow::log::{Retention, SagaLog};
use sagaflow::testsuite::LogHarness;
use sagaflow_postgres::PostgresSagaLog;
use support::TestDb;

/// Opens logs in throw-away schemas of the test database (none prunes in the background).
struct Harness {
    db: TestDb,
    last: Mutex<Option<Last>>,
}

#[derive(Clone)]
struct Last {
    schema: String,
    /// `None`: the defaults.
    retention: Option<Retention>,
    log: Arc<PostgresSagaLog>,
}

impl Harness {
    async fn open(&self, schema: String, retention: Option<Retention>) -> Arc<dyn SagaLog> {
        let log = Arc::new(match retention {
            Some(retention) => self.db.connect_with_retention(&schema, retention).await,
            None => self.db.connect(&schema).await,
        });
        *self.last.lock().unwrap() = Some(Last { schema, retention, log: log.clone() });
        log
    }

    fn last(&self) -> Last {
        self.last.lock().unwrap().clone().expect("a log opened first")
    }
}

#[sagaflow::async_trait]
impl LogHarness for Harness {
    async fn fresh(&self) -> Arc<dyn SagaLog> {
        self.open(self.db.new_schema(), None).await
    }

    async fn reopen(&self) -> Option<Arc<dyn SagaLog>> {
        let Last { schema, retention, log } = self.last();
        // The suite dropped its handles; this one's pool closes too, as a stopped process's would.
        log.close().await;
        Some(self.open(schema, retention).await)
    }

    async fn fresh_with_retention(&self, retention: Retention) -> Arc<dyn SagaLog> {
        self.open(self.db.new_schema(), Some(retention)).await
    }

    async fn prune(&self) {
        self.last().log.prune_now().await.expect("pruning");
    }

    async fn another(&self) -> Option<Arc<dyn SagaLog>> {
        let Last { schema, retention, .. } = self.last();
        Some(self.open(schema, retention).await)
    }
}

async fn harness() -> Option<Harness> {
    Some(Harness { db: TestDb::open().await?, last: Mutex::new(None) })
}

sagaflow::saga_log_conformance_tests!(harness());
