//! The Broker and SagaLog conformance suites against the in-memory drivers.

use std::sync::Arc;

use sagaflow::testsuite::{BrokerHarness, LogHarness};
use sagaflow::{Broker, MemoryBroker, MemorySagaLog, SagaLog};

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
struct MemoryLog;

#[sagaflow::async_trait]
impl LogHarness for MemoryLog {
    async fn fresh(&self) -> Arc<dyn SagaLog> {
        Arc::new(MemorySagaLog::new())
    }

    async fn reopen(&self) -> Option<Arc<dyn SagaLog>> {
        None
    }
}

async fn log() -> Option<MemoryLog> {
    Some(MemoryLog)
}

sagaflow::saga_log_conformance_tests!(log());
