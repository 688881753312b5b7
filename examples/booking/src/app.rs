//! Wiring: the mock upstreams (when they run in this process), the booking flows on them, and
//! the orchestrator service of [`sagaflow_server::Server`] serving the booking API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sagaflow::Orchestrator;
use sagaflow::broker::Broker;
use sagaflow_server::server::bind;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::config::Config;
use crate::facade;
use crate::handler::BookingHandler;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::pb::booking_service_server::BookingServiceServer;
use crate::upstream::{OrderMock, PaymentMock, serve_order, serve_payment};

pub use sagaflow_server::backends::LOG_SERVING_GAUGE;
pub use sagaflow_server::settings::SALVAGE_WAL_ENV;

/// The booking service, running.
pub struct Running {
    /// Where the orchestrator's gRPC API listens.
    pub grpc_addr: SocketAddr,
    /// Where the admin HTTP API listens.
    pub http_addr: SocketAddr,
    /// Where the OrderService is.
    pub order_addr: SocketAddr,
    /// Where the PaymentService is.
    pub payment_addr: SocketAddr,
    /// The orchestrator, for in-process inspection.
    pub orchestrator: Orchestrator,
    /// The broker the orchestrator uses.
    pub broker: Arc<dyn Broker>,
    /// The in-process mocks, when they run here.
    pub mocks: Option<(OrderMock, PaymentMock)>,
    service: sagaflow_server::Running,
    stop_mocks: CancellationToken,
    mock_servers: Vec<JoinHandle<anyhow::Result<()>>>,
}

fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Binds `what` to `addr` and spawns `serve` on the listener; returns the bound address.
async fn start_server<F>(
    addr: SocketAddr,
    what: &str,
    serve: impl FnOnce(TcpListener) -> F,
) -> anyhow::Result<(SocketAddr, JoinHandle<anyhow::Result<()>>)>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = bind(addr, what).await?;
    let local = listener.local_addr()?;
    Ok((local, tokio::spawn(serve(listener))))
}

/// Starts the mock OrderService on `addr` until `shutdown`.
pub async fn start_order(
    addr: SocketAddr,
    mock: OrderMock,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<anyhow::Result<()>>)> {
    start_server(addr, "order service", |l| serve_order(l, mock, shutdown.cancelled_owned())).await
}

/// Starts the mock PaymentService on `addr` until `shutdown`.
pub async fn start_payment(
    addr: SocketAddr,
    mock: PaymentMock,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<anyhow::Result<()>>)> {
    start_server(addr, "payment service", |l| serve_payment(l, mock, shutdown.cancelled_owned())).await
}

/// Starts the benchmark's do-nothing proxy ([`crate::proxy`]) on `addr`, in front of the upstreams
/// at `order` and `payment` (connected as the orchestrator connects to them), until `shutdown`.
pub async fn start_proxy(
    addr: SocketAddr,
    order: SocketAddr,
    payment: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<anyhow::Result<()>>)> {
    let proxy = crate::proxy::Proxy::new(channel(order)?, channel(payment)?);
    start_server(addr, "benchmark proxy", |l| crate::proxy::serve(l, proxy, shutdown.cancelled_owned())).await
}

/// Starts the mocks (if configured in this process) and the orchestrator serving the booking API.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let stop_mocks = CancellationToken::new();
    let mut mock_servers = Vec::new();
    let upstream = &config.app.upstream;
    let (order_addr, payment_addr, mocks) = if upstream.in_process {
        let order = OrderMock::new(upstream.order.clone());
        let payment = PaymentMock::new(upstream.payment.clone());
        let (order_addr, o) = start_order(upstream.order_addr, order.clone(), stop_mocks.clone()).await?;
        let (payment_addr, p) = start_payment(upstream.payment_addr, payment.clone(), stop_mocks.clone()).await?;
        mock_servers.extend([o, p]);
        (order_addr, payment_addr, Some((order, payment)))
    } else {
        (upstream.order_addr, upstream.payment_addr, None)
    };
    let flow =
        facade::versioned_flow(channel(order_addr)?, channel(payment_addr)?, &config.app.flow, config.app.flow_version);
    let service = sagaflow_server::Server::new(config)
        .file_descriptor_set(FILE_DESCRIPTOR_SET)
        .start(
            |orchestrator| facade::register(orchestrator, flow),
            |cx| BookingServiceServer::new(BookingHandler::new(cx.orchestrator, cx.callbacks)),
        )
        .await?;
    tracing::info!(%order_addr, %payment_addr, "booking upstreams");
    Ok(Running {
        grpc_addr: service.grpc_addr,
        http_addr: service.http_addr,
        order_addr,
        payment_addr,
        orchestrator: service.orchestrator.clone(),
        broker: service.broker.clone(),
        mocks,
        service,
        stop_mocks,
        mock_servers,
    })
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("grpc_addr", &self.grpc_addr)
            .field("order_addr", &self.order_addr)
            .field("payment_addr", &self.payment_addr)
            .field("broker", &self.broker.name())
            .finish()
    }
}

impl Running {
    /// Stops serving, lets sagas in flight reach a recorded state, and waits for the servers.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop_mocks.cancel();
        self.service.shutdown().await?;
        for server in self.mock_servers {
            server.await??;
        }
        Ok(())
    }

    /// A token cancelled when the service stops.
    pub fn stopping(&self) -> CancellationToken {
        self.service.stopping()
    }
}
