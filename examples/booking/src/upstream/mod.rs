//! Mock upstream Order and Payment services the booking saga calls.
//!
//! Both keep every record keyed by the caller's `x-request-id`, are idempotent,
//! refuse a create that arrives after its cancel (anti-hanging), and can be made
//! slow, overloaded or flaky through [`MockConfig`], so the saga's retry,
//! throttling and compensation paths can be exercised and then checked through
//! the `Snapshot` call.

mod order;
mod payment;
mod server;
mod store;

pub use order::OrderMock;
pub use payment::PaymentMock;
pub use server::{serve_order, serve_payment};
pub use store::MockConfig;
