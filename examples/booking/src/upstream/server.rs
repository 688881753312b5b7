//! Serving a mock on a listener, with reflection and health alongside.

use std::future::Future;

use anyhow::Context as _;
use sagaflow_server::server::incoming;
use tokio::net::TcpListener;
use tonic::{server::NamedService, service::Routes, transport::Server};
use tonic_health::{ServingStatus, pb::health_server::HealthServer};

use super::{OrderMock, PaymentMock};
use crate::proto::{
    FILE_DESCRIPTOR_SET,
    upstream::{order_service_server::OrderServiceServer, payment_service_server::PaymentServiceServer},
};

/// Serves the Order mock on `listener` until `shutdown` resolves, with gRPC
/// reflection and the standard health service.
pub async fn serve_order(
    listener: TcpListener,
    mock: OrderMock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let name = <OrderServiceServer<OrderMock> as NamedService>::NAME;
    serve(listener, name, Routes::new(mock.into_server()), shutdown).await.context("order mock server failed")
}

/// Serves the Payment mock on `listener` until `shutdown` resolves, with gRPC
/// reflection and the standard health service.
pub async fn serve_payment(
    listener: TcpListener,
    mock: PaymentMock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let name = <PaymentServiceServer<PaymentMock> as NamedService>::NAME;
    serve(listener, name, Routes::new(mock.into_server()), shutdown).await.context("payment mock server failed")
}

/// Adds health and reflection to `routes` (which hold the service `name`) and serves them.
async fn serve(
    listener: TcpListener,
    name: &'static str,
    routes: Routes,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status(name, ServingStatus::Serving).await;
    // Advertise only what this server answers, though every message type stays resolvable.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(name)
            .with_service_name(<HealthServer<()> as NamedService>::NAME)
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let routes =
        routes.add_service(health).add_service(reflection().build_v1()?).add_service(reflection().build_v1alpha()?);
    Server::builder().add_routes(routes).serve_with_incoming_shutdown(incoming(listener), shutdown).await?;
    Ok(())
}
