//! The booking flows, registered under their facade names.

use sagaflow::{Flow, OrchestratorBuilder};
use tonic::transport::Channel;

use crate::config::{FlowConfig, FlowVariant};
use crate::node::{Booking, CheckBooking, CreateOrder, CreatePayment};

/// CreateOrder → CreatePayment while the caller waits.
pub const SYNC_BOOKING: &str = "SyncBooking";
/// The same over the broker; the outcome goes to the caller's callback URL.
pub const ASYNC_BOOKING: &str = "AsyncBooking";
/// The same queued on this pod's topics with bounded consumers; the caller waits.
pub const THROTTLING_BOOKING: &str = "ThrottlingBooking";

/// The booking flow: one value, registered under all three facades.
pub fn booking_flow(orders: Channel, payments: Channel, policies: &FlowConfig) -> Flow<Booking> {
    versioned_flow(orders, payments, policies, FlowVariant::V1)
}

/// The booking flow of `variant`: v1, or v2 (a check before the order) with or without v1 kept.
pub fn versioned_flow(
    orders: Channel,
    payments: Channel,
    policies: &FlowConfig,
    variant: FlowVariant,
) -> Flow<Booking> {
    let v1 = || {
        policies.apply(Flow::new().node(CreateOrder::new(orders.clone())).node(CreatePayment::new(payments.clone())))
    };
    let v2 = || {
        policies.apply(
            Flow::new()
                .node(CheckBooking)
                .node(CreateOrder::new(orders.clone()))
                .node(CreatePayment::new(payments.clone())),
        )
    };
    match variant {
        FlowVariant::V1 => v1().label("v1"),
        FlowVariant::V2 => v2().label("v2").keep(v1().label("v1")),
        FlowVariant::V2Only => v2().label("v2"),
    }
}

/// Registers the three booking facades.
pub fn register(builder: OrchestratorBuilder, flow: Flow<Booking>) -> OrchestratorBuilder {
    builder
        .sync(SYNC_BOOKING, flow.clone())
        .asynchronous(ASYNC_BOOKING, flow.clone())
        .throttling(THROTTLING_BOOKING, flow)
}
