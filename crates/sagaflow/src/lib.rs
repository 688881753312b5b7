//! sagaflow: a Saga orchestrator for services that speak gRPC.
//!
//! A [`Flow`] is an ordered list of reusable [`Node`]s (an action and its
//! compensation), some of them the branches of a [`Parallel`] stage that run
//! at once, registered under a facade name on an [`Orchestrator`]. A
//! flow runs in one of three [`Mode`]s: *sync* (the caller waits, nodes run
//! in order in-process), *async* (the caller is answered at once, each hop
//! travels over the [`Broker`](broker::Broker), the outcome goes to a callback) and
//! *throttling* (the caller waits, hops are queued on this pod's topics and
//! consumed with bounded concurrency). When a node fails for good, the nodes
//! that completed (or may have) are compensated in reverse dependency order,
//! keyed by the request id. Every state change goes through the
//! [`SagaLog`](log::SagaLog) before it is acted on, and what runs next is
//! decided from the saga's record alone ([`SagaRecord::next`]).
//!
//! The crate root holds what a flow author uses; what a broker or saga log
//! driver implements is in [`broker`] and [`log`].
//!
//! ```
//! use std::sync::Arc;
//! use sagaflow::{Flow, MemoryBroker, MemorySagaLog, Node, NodeError, Orchestrator, Outcome, Step};
//!
//! #[derive(Debug, serde::Serialize, serde::Deserialize)]
//! struct Booking { order_id: Option<u64> }
//!
//! struct CreateOrder;
//!
//! #[sagaflow::async_trait]
//! impl Node<Booking> for CreateOrder {
//!     fn name(&self) -> &str { "CreateOrder" }
//!     async fn action(&self, _step: &Step, booking: &mut Booking) -> Result<(), NodeError> {
//!         booking.order_id = Some(7);
//!         Ok(())
//!     }
//!     async fn compensate(&self, _step: &Step, _booking: &Booking) -> Result<(), NodeError> {
//!         Ok(()) // cancel the order, keyed by step.request_id()
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let orchestrator = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
//!     .sync("SyncBooking", Flow::new().node(CreateOrder))
//!     .start()
//!     .await?;
//! match orchestrator.run("SyncBooking", "req-1", Booking { order_id: None }).await? {
//!     Outcome::Completed(booking) => assert_eq!(booking.order_id, Some(7)),
//!     other => panic!("{other:?}"),
//! }
//! # Ok::<_, sagaflow::Error>(())
//! # }).unwrap();
//! ```

pub mod broker;
mod callback;
mod engine;
mod error;
mod flow;
pub mod log;
pub mod metrics;
mod node;
mod orchestrator;
mod policy;
mod saga;
#[cfg(feature = "testsuite")]
pub mod testsuite;
mod waiters;

pub use async_trait::async_trait;
pub use broker::MemoryBroker;
pub use callback::{CallbackReport, CallbackSink, CallbackStatus, SagaCallback};
pub use error::{Error, ErrorSource, Result};
pub use flow::{DEFAULT_DEADLINE, DEFAULT_MAX_DATA_BYTES, DEFAULT_STEP_TIMEOUT, Flow, Merge, Parallel};
pub use log::MemorySagaLog;
pub use node::{ErrorKind, Node, NodeError, Phase, SAGA_METADATA, Step};
pub use orchestrator::{
    FlowData, FlowInfo, MAX_REQUEST_ID_LEN, MissingVersion, Options, Orchestrator, OrchestratorBuilder,
    OrchestratorStats, RedriveFilter, VersionRole, VersionUse,
};
pub use policy::RetryPolicy;
pub use saga::{Failure, HistoryEntry, HistoryEvent, Mode, Outcome, SagaRecord, SagaStatus, now_ms};
