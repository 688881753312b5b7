//! The booking saga's steps: each node calls one upstream service.

use sagaflow::{Node, NodeError, Step};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::proto::upstream::{
    CancelRequest, CreateOrderRequest, CreatePaymentRequest, order_service_client::OrderServiceClient,
    payment_service_client::PaymentServiceClient,
};

/// Price of one item, for the payment's amount.
pub const UNIT_PRICE: i64 = 100;

/// What `count` items cost, or `None` when that does not fit an `i64`.
pub fn amount(count: i64) -> Option<i64> {
    count.checked_mul(UNIT_PRICE)
}

/// The flow data of a booking: the request, and what each node adds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booking {
    /// What is booked.
    pub product_id: i64,
    /// How many.
    pub count: i64,
    /// Makes the payment fail (to see compensation).
    pub fault_inject: bool,
    /// Set by CreateOrder.
    pub order_id: i64,
    /// Set by CreatePayment.
    pub payment_id: i64,
}

/// Builds an upstream request carrying the saga's metadata
/// ([`sagaflow::SAGA_METADATA`]: request id, facade, node, phase, attempt,
/// `traceparent`) and the step's deadline.
pub(crate) fn request<T>(step: &Step, message: T) -> Result<tonic::Request<T>, NodeError> {
    step.grpc_request(message)
}

/// Creates the order; its compensation cancels it.
#[derive(Debug, Clone)]
pub struct CreateOrder {
    orders: OrderServiceClient<Channel>,
}

impl CreateOrder {
    /// A node calling the OrderService over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self { orders: OrderServiceClient::new(channel) }
    }
}

#[sagaflow::async_trait]
impl Node<Booking> for CreateOrder {
    fn name(&self) -> &str {
        "CreateOrder"
    }

    async fn action(&self, step: &Step, booking: &mut Booking) -> Result<(), NodeError> {
        let message = CreateOrderRequest { product_id: booking.product_id, count: booking.count };
        let order = self.orders.clone().create_order(request(step, message)?).await?.into_inner();
        booking.order_id = order.id;
        Ok(())
    }

    async fn compensate(&self, step: &Step, _booking: &Booking) -> Result<(), NodeError> {
        self.orders.clone().cancel_order(request(step, CancelRequest {})?).await?;
        Ok(())
    }
}

/// Takes the payment; its compensation refunds it.
#[derive(Debug, Clone)]
pub struct CreatePayment {
    payments: PaymentServiceClient<Channel>,
}

impl CreatePayment {
    /// A node calling the PaymentService over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self { payments: PaymentServiceClient::new(channel) }
    }
}

#[sagaflow::async_trait]
impl Node<Booking> for CreatePayment {
    fn name(&self) -> &str {
        "CreatePayment"
    }

    async fn action(&self, step: &Step, booking: &mut Booking) -> Result<(), NodeError> {
        // The handler refuses such a count; data from elsewhere (a replayed hop) is checked too.
        let amount = amount(booking.count)
            .ok_or_else(|| NodeError::permanent(format!("the price of {} items overflows", booking.count)))?;
        let message = CreatePaymentRequest { order_id: booking.order_id, amount, fault_inject: booking.fault_inject };
        let payment = self.payments.clone().create_payment(request(step, message)?).await?.into_inner();
        booking.payment_id = payment.id;
        Ok(())
    }

    async fn compensate(&self, step: &Step, _booking: &Booking) -> Result<(), NodeError> {
        self.payments.clone().cancel_payment(request(step, CancelRequest {})?).await?;
        Ok(())
    }
}

/// Checks a booking before any upstream is called (the first step of flow v2): a count whose
/// price overflows is refused here, with nothing to undo.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckBooking;

#[sagaflow::async_trait]
impl Node<Booking> for CheckBooking {
    fn name(&self) -> &str {
        "CheckBooking"
    }

    async fn action(&self, _step: &Step, booking: &mut Booking) -> Result<(), NodeError> {
        match amount(booking.count) {
            Some(_) => Ok(()),
            None => Err(NodeError::permanent(format!("the price of {} items overflows", booking.count))),
        }
    }

    fn has_compensation(&self) -> bool {
        false
    }
}
