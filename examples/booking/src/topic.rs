//! The booking flows' topic ids, as `message_queue.topics[].id` names them.
//!
//! sagaflow names a hop topic `<facade>.<node>` and a rollback topic
//! `<facade>.rollback`; on the broker each is prefixed with
//! `message_queue.topic_prefix`, and those of sync and throttling flows end in
//! the pod id (their callers wait in that pod).

/// Hop topic of CreateOrder in the async flow.
pub const ASYNC_CREATE_ORDER: &str = "AsyncBooking.CreateOrder";
/// Hop topic of CreatePayment in the async flow.
pub const ASYNC_CREATE_PAYMENT: &str = "AsyncBooking.CreatePayment";
/// Rollback topic of the async flow.
pub const ASYNC_ROLLBACK: &str = "AsyncBooking.rollback";
/// Hop topic of CreateOrder in the throttling flow.
pub const THROTTLING_CREATE_ORDER: &str = "ThrottlingBooking.CreateOrder";
/// Hop topic of CreatePayment in the throttling flow.
pub const THROTTLING_CREATE_PAYMENT: &str = "ThrottlingBooking.CreatePayment";
/// Rollback topic of the throttling flow.
pub const THROTTLING_ROLLBACK: &str = "ThrottlingBooking.rollback";
/// Rollback topic of the sync flow.
pub const SYNC_ROLLBACK: &str = "SyncBooking.rollback";

/// Every topic id of the booking flows.
pub const ALL: [&str; 7] = [
    ASYNC_CREATE_ORDER,
    ASYNC_CREATE_PAYMENT,
    ASYNC_ROLLBACK,
    THROTTLING_CREATE_ORDER,
    THROTTLING_CREATE_PAYMENT,
    THROTTLING_ROLLBACK,
    SYNC_ROLLBACK,
];
