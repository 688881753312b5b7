//! The runtime of an orchestrator service: [`Server::serve`] takes the configuration, the
//! flows to register and the service's gRPC API (more services beside it with
//! [`Server::grpc_service`]), and runs them on the broker and saga log the
//! configuration names, beside the admin HTTP API, the dashboard, Prometheus metrics, the
//! gRPC health and reflection services and the HTTP callback sink, until SIGINT or SIGTERM;
//! then it drains the sagas in flight.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use sagaflow::broker::Broker;
use sagaflow::{Orchestrator, OrchestratorBuilder};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::Request;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
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
pub struct Server<A = crate::settings::NoKeys> {
    config: Config<A>,
    service_name: String,
    descriptors: Vec<&'static [u8]>,
    /// The services added beside the API, by name.
    services: Vec<(&'static str, AddService)>,
}

/// Builds one more gRPC service from the started orchestrator and adds it to the routes.
type AddService = Box<dyn FnOnce(&Context, &mut RoutesBuilder) + Send>;

/// The services the server adds itself; a user's service of the same name is refused.
const OWN_SERVICES: [&str; 3] =
    ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

impl<A: std::fmt::Debug> std::fmt::Debug for Server<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("service_name", &self.service_name)
            .field("descriptors", &self.descriptors.len())
            .field("grpc_services", &self.services.len())
            .finish()
    }
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
        Self { config, service_name: "sagaflow".into(), descriptors: Vec::new(), services: Vec::new() }
    }

    /// Serves one more gRPC service on the gRPC port, beside the API given to
    /// [`serve`](Self::serve); `build` makes it from the started orchestrator. Call it once per
    /// service. Each is reported healthy while the saga log is, like the API. Two services of
    /// one name are refused at start.
    ///
    /// ```rust,ignore
    /// Server::new(config)
    ///     .grpc_service(|cx| OperatorServiceServer::new(Operator::new(cx.orchestrator.clone())))
    ///     .serve(register, |cx| BookingServiceServer::new(BookingHandler::new(cx.orchestrator, cx.callbacks)))
    ///     .await
    /// ```
    pub fn grpc_service<G, S>(mut self, build: G) -> Self
    where
        G: FnOnce(&Context) -> S + Send + 'static,
        S: Service<Request<Body>, Error = Infallible> + NamedService + Clone + Send + Sync + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        let add: AddService = Box::new(move |context, routes| {
            routes.add_service(build(context));
        });
        self.services.push((S::NAME, add));
        self
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
    /// `register` adds, and serves the gRPC API `grpc` builds, the services added with
    /// [`grpc_service`](Self::grpc_service), health and reflection, and the admin HTTP API.
    /// Logs and traces are the caller's to set up ([`telemetry::init`]).
    pub async fn start<R, G, S>(self, register: R, grpc: G) -> anyhow::Result<Running>
    where
        R: FnOnce(OrchestratorBuilder) -> OrchestratorBuilder,
        G: FnOnce(Context) -> S,
        S: Service<Request<Body>, Error = Infallible> + NamedService + Clone + Send + Sync + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        let config = self.config;
        let services: Vec<&'static str> =
            [S::NAME].into_iter().chain(self.services.iter().map(|(name, _)| *name)).collect();
        names(&services)?;
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
        let context = Context { orchestrator: orchestrator.clone(), callbacks };
        let mut routes = RoutesBuilder::default();
        for (_, add) in self.services {
            add(&context, &mut routes);
        }
        routes.add_service(grpc(context));
        let (reporter, health) = tonic_health::server::health_reporter();
        for name in &services {
            reporter.set_service_status(*name, ServingStatus::Serving).await;
        }
        reporter.set_service_status("", ServingStatus::Serving).await;
        servers.push(backends::watch_log_health(saga_log, reporter, services.clone(), shutdown.clone()));
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
                .add_routes(routes.routes())
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
        tracing::info!(%grpc_addr, %http_addr, pod_id = %config.pod_id, services = ?services, "orchestrator serving");
        Ok(Running { grpc_addr, http_addr, orchestrator, broker, shutdown, servers })
    }
}

/// Refuses two gRPC services of one name (their routes would clash), by name.
fn names(services: &[&'static str]) -> anyhow::Result<()> {
    for (i, name) in services.iter().enumerate() {
        if OWN_SERVICES.contains(name) {
            anyhow::bail!("gRPC service `{name}` is served by sagaflow-server itself; it cannot be added again");
        }
        if services[..i].contains(name) {
            anyhow::bail!("gRPC service `{name}` is added twice; each service can be served once");
        }
    }
    Ok(())
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
