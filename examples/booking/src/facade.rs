//! The booking flows, registered under their facade names.

use sagaflow::{Flow, OrchestratorBuilder};
use tonic::transport::Channel;

use crate::config::FlowConfig;
use crate::node::{Booking, CreateOrder, CreatePayment};

/// CreateOrder → CreatePayment while the caller waits.
pub const SYNC_BOOKING: &str = "SyncBooking";
/// The same over the broker; the outcome goes to the caller's callback URL.
pub const ASYNC_BOOKING: &str = "AsyncBooking";
/// The same queued on this pod's topics with bounded consumers; the caller waits.
pub const THROTTLING_BOOKING: &str = "ThrottlingBooking";

/// The booking flow: one value, registered under all three facades.
pub fn booking_flow(orders: Channel, payments: Channel, policies: &FlowConfig) -> Flow<Booking> {
    policies.apply(Flow::new().node(CreateOrder::new(orders)).node(CreatePayment::new(payments)))
}

/// Registers the three booking facades.
pub fn register(builder: OrchestratorBuilder, flow: Flow<Booking>) -> OrchestratorBuilder {
    builder
        .sync(SYNC_BOOKING, flow.clone())
        .asynchronous(ASYNC_BOOKING, flow.clone())
        .throttling(THROTTLING_BOOKING, flow)
}
