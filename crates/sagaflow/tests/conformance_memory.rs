//! The Broker and SagaLog conformance suites against the in-memory drivers.

use std::sync::{Arc, Mutex};

use sagaflow::broker::Broker;
use sagaflow::log::{Retention, SagaLog};
use sagaflow::testsuite::{BrokerHarness, LogHarness};
use sagaflow::{MemoryBroker, MemorySagaLog};

/// Every connection is a handle on one in-process broker, as clients of one server are.
struct Memory(MemoryBroker);

#[sagaflow::async_trait]
impl BrokerHarness for Memory {
    async fn connect(&self) -> Arc<dyn Broker> {
        Arc::new(self.0.clone())
    }
}

async fn broker() -> Option<Memory> {
    Some(Memory(MemoryBroker::new()))
}

sagaflow::broker_conformance_tests!(broker());

/// A new in-memory log per call; nothing survives, so there is nothing to reopen.
#[derive(Default)]
struct MemoryLog {
    last: Mutex<Option<Arc<MemorySagaLog>>>,
}

impl MemoryLog {
    fn open(&self, log: MemorySagaLog) -> Arc<dyn SagaLog> {
        let log = Arc::new(log);
        *self.last.lock().unwrap() = Some(log.clone());
        log
    }
}

#[sagaflow::async_trait]
impl LogHarness for MemoryLog {
    async fn fresh(&self) -> Arc<dyn SagaLog> {
        self.open(MemorySagaLog::new())
    }

    async fn reopen(&self) -> Option<Arc<dyn SagaLog>> {
        None
    }

    async fn fresh_with_retention(&self, retention: Retention) -> Arc<dyn SagaLog> {
        self.open(MemorySagaLog::with_retention(retention))
    }

    async fn prune(&self) {
        let log = self.last.lock().unwrap().clone().expect("prune after fresh");
        log.prune_now();
    }
}

async fn log() -> Option<MemoryLog> {
    Some(MemoryLog::default())
}

sagaflow::saga_log_conformance_tests!(log());
