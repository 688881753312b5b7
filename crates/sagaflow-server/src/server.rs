//! The runtime of an orchestrator service: [`Server::serve`] takes the configuration, the
//! flows to register and the service's gRPC API, and runs them on the broker and saga log the
//! configuration names, beside the admin HTTP API, the dashboard, Prometheus metrics, the
//! gRPC health and reflection services and the HTTP callback sink, until SIGINT or SIGTERM;
//! then it drains the sagas in flight.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use sagaflow::{Broker, Orchestrator, OrchestratorBuilder};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::Request;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::callback::{CallbackPolicy, HttpCallbacks};
use crate::settings::{Config, ServiceConfig};
use crate::{admin, backends, telemetry};

/// What the service's gRPC API is built from.
#[derive(Debug)]
pub struct Context {
    /// The orchestrator, started, with the flows registered.
    pub orchestrator: Orchestrator,
    /// The callback URLs an async request may name (the service's own listeners refused).
    pub callbacks: CallbackPolicy,
}

/// An orchestrator service about to run.
#[derive(Debug)]
pub struct Server<A = crate::settings::NoKeys> {
    config: Config<A>,
    service_name: String,
    descriptors: Vec<&'static [u8]>,
}

/// An orchestrator service, running.
pub struct Running {
    /// Where the gRPC API listens.
    pub grpc_addr: SocketAddr,
    /// Where the admin HTTP API listens.
    pub http_addr: SocketAddr,
    /// The orchestrator, for in-process inspection.
    pub orchestrator: Orchestrator,
    /// The broker the orchestrator uses.
    pub broker: Arc<dyn Broker>,
    shutdown: CancellationToken,
    servers: Vec<JoinHandle<anyhow::Result<()>>>,
}

/// Binds `what` to `addr`.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the {what} to {addr}"))
}

/// Accepted connections with Nagle's algorithm off. A gRPC answer is several small writes
/// (headers, message, trailers); with Nagle on, the last waits for the peer's delayed ACK, and
/// answers stalled for 40 ms every few hundred milliseconds under load.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

impl<A: ServiceConfig> Server<A> {
    /// A service run as `config` says; its traces are exported as `sagaflow`.
    pub fn new(config: Config<A>) -> Self {
        Self { config, service_name: "sagaflow".into(), descriptors: Vec::new() }
    }

    /// The service name its traces are exported under.
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = name.into();
        self
    }

    /// An encoded protobuf file descriptor set the reflection service shows (the gRPC API's).
    pub fn file_descriptor_set(mut self, set: &'static [u8]) -> Self {
        self.descriptors.push(set);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &Config<A> {
        &self.config
    }

    /// Sets up logs and traces, [`Server::start`]s, runs until SIGINT or SIGTERM, then drains
    /// ([`Running::shutdown`]) and flushes the last spans.
    pub async fn serve<R, G, S>(self, register: R, grpc: G) -> anyhow::Result<()>
    where
        R: FnOnce(OrchestratorBuilder) -> OrchestratorBuilder,
        G: FnOnce(Context) -> S,
        S: Service<Request<Body>, Error = Infallible> + NamedService + Clone + Send + Sync + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        let telemetry = telemetry::init(&self.service_name, self.config.otlp_endpoint.as_deref())?;
        let result = async {
            let running = self.start(register, grpc).await?;
            telemetry::terminated().await;
            tracing::info!("shutting down");
            running.shutdown().await
        }
        .await;
        telemetry.shutdown().await;
        result
    }

    /// Connects to the broker and opens the saga log, starts an orchestrator with the flows
    /// `register` adds, and serves the gRPC API `grpc` builds (with health and reflection) and
    /// the admin HTTP API. Logs and traces are the caller's to set up ([`telemetry::init`]).
    pub async fn start<R, G, S>(self, register: R, grpc: G) -> anyhow::Result<Running>
    where
        R: FnOnce(OrchestratorBuilder) -> OrchestratorBuilder,
        G: FnOnce(Context) -> S,
        S: Service<Request<Body>, Error = Infallible> + NamedService + Clone + Send + Sync + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        let config = self.config;
        admin::prometheus();
        let callbacks = CallbackPolicy::new(&config.callbacks).map_err(anyhow::Error::msg)?;
        let admin_hosts = admin::AdminHosts::new(config.http_listen, &config.admin_hosts)?;
        let shutdown = CancellationToken::new();
        let mut servers = Vec::new();

        let broker = backends::connect_broker(config.broker_settings()).await?;
        let saga_log = backends::open_saga_log(config.log_settings()).await?;
        let builder = Orchestrator::builder(broker.clone(), saga_log.clone())
            .options(config.orchestrator_options())
            .callbacks(Arc::new(HttpCallbacks::new(&config.callbacks)?));
        let orchestrator = register(builder).start().await.context("starting the orchestrator")?;
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
        let service = grpc(Context { orchestrator: orchestrator.clone(), callbacks });
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status(S::NAME, ServingStatus::Serving).await;
        reporter.set_service_status("", ServingStatus::Serving).await;
        servers.push(backends::watch_log_health(saga_log, reporter, vec![S::NAME], shutdown.clone()));
        let reflection = || {
            let builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
            self.descriptors.iter().fold(builder, |b, set| b.register_encoded_file_descriptor_set(set))
        };
        let v1 = reflection().build_v1()?;
        let v1alpha = reflection().build_v1alpha()?;
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .add_service(health)
                .add_service(v1)
                .add_service(v1alpha)
                .serve_with_incoming_shutdown(incoming(listener), async move { stop.cancelled().await })
                .await
                .context("orchestrator gRPC server failed")
        }));
        servers.push(tokio::spawn(admin::serve(
            admin_listener,
            orchestrator.clone(),
            config.admin_token.clone(),
            config.public_metrics,
            admin_hosts.bound_to(http_addr),
            shutdown.clone(),
        )));
        tracing::info!(%grpc_addr, %http_addr, pod_id = %config.pod_id, service = S::NAME, "orchestrator serving");
        Ok(Running { grpc_addr, http_addr, orchestrator, broker, shutdown, servers })
    }
}

/// Every configured topic id must name a topic of a registered flow.
fn check_topics<A: ServiceConfig>(config: &Config<A>, orchestrator: &Orchestrator) -> anyhow::Result<()> {
    let known: Vec<String> = orchestrator
        .flows()
        .iter()
        .flat_map(|f| f.nodes.iter().map(|n| format!("{}.{n}", f.facade)).chain([format!("{}.rollback", f.facade)]))
        .collect();
    for (i, topic) in config.message_queue.topics.iter().enumerate() {
        if !known.contains(&topic.id) {
            anyhow::bail!(
                "message_queue.topics[{i}]: unknown topic id `{}` (known: {}; on the broker they are prefixed with `{}.`)",
                topic.id,
                known.join(", "),
                config.topic_prefix()
            );
        }
    }
    Ok(())
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
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
