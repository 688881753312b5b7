//! `booking proxy`: a do-nothing gRPC proxy in front of the upstreams, the benchmark's second
//! ceiling.
//!
//! `HandleSyncBooking` makes the booking saga's two calls — CreateOrder, then CreatePayment, and
//! CancelOrder when a `FaultInject` payment is refused — with the caller's `x-request-id`, and
//! answers as the orchestrator would. It records nothing, retries nothing and has no deadline,
//! broker or saga log: what is left is the cost of the extra gRPC hop (a server call and two
//! client calls in one more process), the part of the orchestrator's work that no saga
//! machinery can remove. `bench/ceiling.sh` measures it beside `--direct` and the sync flow.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

use crate::handler::REQUEST_ID_HEADER;
use crate::proto::pb::booking_service_server::{BookingService, BookingServiceServer};
use crate::proto::pb::{BookingASyncResponse, BookingRequest, BookingSyncResponse};
use crate::proto::upstream::order_service_client::OrderServiceClient;
use crate::proto::upstream::payment_service_client::PaymentServiceClient;
use crate::proto::upstream::{CancelRequest, CreateOrderRequest, CreatePaymentRequest};

/// Serves `HandleSyncBooking` by calling the upstreams directly.
#[derive(Debug, Clone)]
pub struct Proxy {
    orders: OrderServiceClient<Channel>,
    payments: PaymentServiceClient<Channel>,
}

impl Proxy {
    /// A proxy calling the OrderService and PaymentService over these channels.
    pub fn new(orders: Channel, payments: Channel) -> Self {
        Self { orders: OrderServiceClient::new(orders), payments: PaymentServiceClient::new(payments) }
    }
}

/// An upstream request carrying `id` as `x-request-id`.
fn forward<T>(id: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(REQUEST_ID_HEADER, id.clone());
    request
}

#[tonic::async_trait]
impl BookingService for Proxy {
    async fn handle_sync_booking(
        &self,
        request: Request<BookingRequest>,
    ) -> Result<Response<BookingSyncResponse>, Status> {
        let id = request
            .metadata()
            .get(REQUEST_ID_HEADER)
            .cloned()
            .ok_or_else(|| Status::invalid_argument("the proxy needs an x-request-id"))?;
        let booking = request.into_inner();
        // As the booking handler reads it: a Count of 0 means 1.
        let count = booking.count.max(1);
        let amount = crate::node::amount(count)
            .ok_or_else(|| Status::invalid_argument(format!("Count {count} is too large: its price overflows")))?;
        let order = self
            .orders
            .clone()
            .create_order(forward(&id, CreateOrderRequest { product_id: booking.product_id, count }))
            .await?
            .into_inner();
        let payment = CreatePaymentRequest { order_id: order.id, amount, fault_inject: booking.fault_inject };
        match self.payments.clone().create_payment(forward(&id, payment)).await {
            Ok(payment) => Ok(Response::new(BookingSyncResponse {
                request_id: id.to_str().unwrap_or_default().to_owned(),
                order_id: order.id,
                payment_id: payment.into_inner().id,
                fault_inject: booking.fault_inject,
            })),
            Err(refused) if refused.code() == Code::FailedPrecondition => {
                self.orders.clone().cancel_order(forward(&id, CancelRequest {})).await?;
                Err(Status::aborted(format!("booking was rolled back: {}", refused.message())))
            }
            Err(status) => Err(status),
        }
    }

    async fn handle_async_booking(
        &self,
        _request: Request<BookingRequest>,
    ) -> Result<Response<BookingASyncResponse>, Status> {
        Err(Status::unimplemented("the benchmark proxy serves HandleSyncBooking only"))
    }

    async fn handle_throttling_booking(
        &self,
        _request: Request<BookingRequest>,
    ) -> Result<Response<BookingSyncResponse>, Status> {
        Err(Status::unimplemented("the benchmark proxy serves HandleSyncBooking only"))
    }
}

/// Serves the proxy on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    Server::builder()
        .add_service(BookingServiceServer::new(proxy))
        .serve_with_incoming_shutdown(sagaflow_server::server::incoming(listener), shutdown)
        .await
        .with_context(|| format!("benchmark proxy on {addr:?} failed"))
}
