//! The whole `main` of an orchestrator service on `sagaflow-server`, as the README shows it:
//! the booking flows and gRPC API, against Order and Payment services running elsewhere
//! (`upstream.order_addr`, `upstream.payment_addr`). Start `booking order` and `booking payment`,
//! then `cargo run -p booking --example service`.

use booking::config::Config;
use booking::facade;
use booking::handler::BookingHandler;
use booking::proto::FILE_DESCRIPTOR_SET;
use booking::proto::pb::booking_service_server::BookingServiceServer;
use sagaflow_server::Server;
use tonic::transport::Endpoint;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `--config`-less: $OCH_PATH/app.yaml, else the defaults; then the environment.
    let config = Config::load(None)?;
    let upstream = &config.app.upstream;
    let orders = Endpoint::from_shared(format!("http://{}", upstream.order_addr))?.connect_lazy();
    let payments = Endpoint::from_shared(format!("http://{}", upstream.payment_addr))?.connect_lazy();
    let flow = facade::booking_flow(orders, payments, &config.app.flow);
    Server::new(config)
        .service_name("booking")
        .file_descriptor_set(FILE_DESCRIPTOR_SET)
        .serve(
            |orchestrator| facade::register(orchestrator, flow),
            |cx| BookingServiceServer::new(BookingHandler::new(cx.orchestrator, cx.callbacks)),
        )
        .await
}
