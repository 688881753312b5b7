//! The trip flow and the facades it is registered under.

use std::sync::Arc;

use sagaflow::{Flow, MemoryBroker, MemorySagaLog, Orchestrator, Parallel};

use crate::Trip;
use crate::node::{Reserve, TakePayment};
use crate::service::Services;

/// The facade that runs a trip while the caller waits.
pub const SYNC_TRIP: &str = "SyncTrip";
/// The facade that runs a trip over the broker, one hop per booking.
pub const ASYNC_TRIP: &str = "AsyncTrip";

/// Flight, hotel and car at once, then the payment.
pub fn trip_flow(services: &Services) -> Flow<Trip> {
    Flow::new()
        .parallel(
            Parallel::new()
                .branch(Reserve::flight(services.flights.clone()))
                .branch(Reserve::hotel(services.hotels.clone()))
                .branch(Reserve::car(services.cars.clone()))
                .merge(Trip::merge),
        )
        .node(TakePayment(services.payments.clone()))
}

/// An orchestrator on the in-memory broker and log with both facades registered.
pub async fn orchestrator(services: &Services) -> sagaflow::Result<Orchestrator> {
    Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .sync(SYNC_TRIP, trip_flow(services))
        .asynchronous(ASYNC_TRIP, trip_flow(services))
        .start()
        .await
}
