//! Wiring: builds the broker, the saga log, the flows and the servers from a [`Config`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sagaflow::log::Retention;
use sagaflow::{Broker, Orchestrator, SagaLog};
use sagaflow_server::backends::{self, BrokerSettings, LogSettings};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::ServingStatus;

use crate::callback::{CallbackPolicy, HttpCallbacks};
use crate::config::{Config, RetentionConfig};
use crate::facade;
use crate::handler::BookingHandler;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::pb::booking_service_server::BookingServiceServer;
use crate::upstream::{OrderMock, PaymentMock, serve_order, serve_payment};

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
    shutdown: CancellationToken,
    servers: Vec<JoinHandle<anyhow::Result<()>>>,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the {what} to {addr}"))
}

fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Set to `1` or `true`: the embedded saga log replays the intact entries of a damaged
/// write-ahead file instead of refusing to open ([`sagaflow_redb::RedbOptions::salvage_wal`]).
pub const SALVAGE_WAL_ENV: &str = "SAGAFLOW_SALVAGE_WAL";

pub use sagaflow_server::backends::LOG_SERVING_GAUGE;

/// The broker the config names.
async fn broker(config: &Config) -> anyhow::Result<Arc<dyn Broker>> {
    backends::connect_broker(BrokerSettings {
        kind: config.broker,
        url: config.broker_url.as_deref(),
        connection_name: format!("sagaflow-{}", config.pod_id),
        queue_expiry: config.broker_queue_expiry_ms.map(Duration::from_millis),
    })
    .await
}

/// The saga log the config names.
async fn saga_log(config: &Config) -> anyhow::Result<Arc<dyn SagaLog>> {
    backends::open_saga_log(log_settings(config)).await
}

/// Where and how the config keeps the saga log.
pub fn log_settings(config: &Config) -> LogSettings<'_> {
    LogSettings {
        kind: config.saga_log,
        url: config.saga_log_url.as_deref(),
        schema: config.saga_log_schema.as_deref(),
        retention: retention(&config.retention),
        salvage_wal: std::env::var(SALVAGE_WAL_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
        cache_bytes: config.saga_log_cache_mib << 20,
    }
}

/// The retention the config describes.
fn retention(config: &RetentionConfig) -> Retention {
    Retention {
        max_age: Duration::from_secs(config.max_age_secs),
        max_ended: config.max_ended,
        tombstone_age: Duration::from_secs(config.tombstone_age_secs),
        max_tombstones: config.max_tombstones,
    }
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

/// Starts the orchestrator (and, if configured, the mocks) and serves the booking API.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    crate::admin::prometheus();
    let callbacks = CallbackPolicy::new(&config.callbacks).map_err(anyhow::Error::msg)?;
    let admin_hosts = crate::admin::AdminHosts::new(config.http_listen, &config.admin_hosts)?;
    let shutdown = CancellationToken::new();
    let mut servers = Vec::new();
    let (order_addr, payment_addr, mocks) = if config.upstream.in_process {
        let order = OrderMock::new(config.upstream.order.clone());
        let payment = PaymentMock::new(config.upstream.payment.clone());
        let (order_addr, o) = start_order(config.upstream.order_addr, order.clone(), shutdown.clone()).await?;
        let (payment_addr, p) = start_payment(config.upstream.payment_addr, payment.clone(), shutdown.clone()).await?;
        servers.extend([o, p]);
        (order_addr, payment_addr, Some((order, payment)))
    } else {
        (config.upstream.order_addr, config.upstream.payment_addr, None)
    };

    let flow = facade::booking_flow(channel(order_addr)?, channel(payment_addr)?, &config.flow);
    let broker = broker(&config).await?;
    let saga_log = saga_log(&config).await?;
    let builder = Orchestrator::builder(broker.clone(), saga_log.clone())
        .options(config.orchestrator_options())
        .callbacks(Arc::new(HttpCallbacks::new(&config.callbacks)?));
    let orchestrator = facade::register(builder, flow).start().await.context("starting the orchestrator")?;
    check_topics(&config, &orchestrator)?;

    let listener = bind(config.grpc_listen, "orchestrator gRPC API").await?;
    let grpc_addr = listener.local_addr()?;
    let admin_listener = bind(config.http_listen, "admin HTTP API").await?;
    let http_addr = admin_listener.local_addr()?;
    let callbacks = callbacks
        .deny_own(grpc_addr, "gRPC API (grpc_listen)")
        .deny_own(http_addr, "admin HTTP API (http_listen)")
        .resolve_names()
        .await;
    let handler = BookingHandler::new(orchestrator.clone(), callbacks);
    let service = BookingServiceServer::new(handler);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(<BookingServiceServer<BookingHandler> as NamedService>::NAME, ServingStatus::Serving)
        .await;
    reporter.set_service_status("", ServingStatus::Serving).await;
    let service_name = <BookingServiceServer<BookingHandler> as NamedService>::NAME;
    servers.push(backends::watch_log_health(saga_log, reporter, vec![service_name], shutdown.clone()));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection().build_v1()?;
    let v1alpha = reflection().build_v1alpha()?;
    let stop = shutdown.clone();
    servers.push(tokio::spawn(async move {
        Server::builder()
            .add_service(service)
            .add_service(health)
            .add_service(v1)
            .add_service(v1alpha)
            .serve_with_incoming_shutdown(crate::upstream::incoming(listener), async move { stop.cancelled().await })
            .await
            .context("orchestrator gRPC server failed")
    }));
    servers.push(tokio::spawn(crate::admin::serve(
        admin_listener,
        orchestrator.clone(),
        config.admin_token.clone(),
        config.public_metrics,
        admin_hosts.bound_to(http_addr),
        shutdown.clone(),
    )));
    tracing::info!(%grpc_addr, %http_addr, %order_addr, %payment_addr, pod_id = %config.pod_id, "booking orchestrator serving");
    Ok(Running { grpc_addr, http_addr, order_addr, payment_addr, orchestrator, broker, mocks, shutdown, servers })
}

/// Every configured topic id must name a topic of a registered flow.
fn check_topics(config: &Config, orchestrator: &Orchestrator) -> anyhow::Result<()> {
    let prefix = &config.message_queue.topic_prefix;
    let known: Vec<String> = orchestrator
        .flows()
        .iter()
        .flat_map(|f| f.nodes.iter().map(|n| format!("{}.{n}", f.facade)).chain([format!("{}.rollback", f.facade)]))
        .collect();
    for (i, topic) in config.message_queue.topics.iter().enumerate() {
        if !known.contains(&topic.id) {
            anyhow::bail!(
                "message_queue.topics[{i}]: unknown topic id `{}` (known: {}; on the broker they are prefixed with `{prefix}.`)",
                topic.id,
                known.join(", ")
            );
        }
    }
    Ok(())
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
        self.shutdown.cancel();
        self.orchestrator.shutdown().await;
        for server in self.servers {
            server.await??;
        }
        Ok(())
    }

    /// A token cancelled when the service stops.
    pub fn stopping(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
