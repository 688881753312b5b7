//! `booking`: the whole demo in one process, or one of its parts.

use std::path::PathBuf;

use anyhow::Context as _;
use booking::app;
use booking::config::Config;
use booking::upstream::{OrderMock, PaymentMock};
use clap::{Parser, Subcommand};
use sagaflow_server::telemetry::{self, terminated};
use tokio_util::sync::CancellationToken;

/// The sagaflow booking demo.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (default: $OCH_PATH/app.yaml, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    part: Option<Part>,
}

#[derive(Debug, Subcommand)]
enum Part {
    /// Orchestrator and mock upstreams in one process (the default).
    All,
    /// The orchestrator only; the upstreams run elsewhere (`upstream.*_addr`).
    Orchestrator,
    /// The mock OrderService only, on `upstream.order_addr`.
    Order(MockArgs),
    /// The mock PaymentService only, on `upstream.payment_addr`.
    Payment(MockArgs),
    /// A do-nothing gRPC proxy serving HandleSyncBooking with the two upstream calls and
    /// nothing else: the benchmark's ceiling for one extra hop (`bench/ceiling.sh`).
    Proxy(ProxyArgs),
}

/// Where the benchmark proxy listens and what it calls.
#[derive(Debug, clap::Args)]
struct ProxyArgs {
    /// Address to listen on (default: `grpc_listen`).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The OrderService (default: `upstream.order_addr`).
    #[arg(long)]
    order: Option<std::net::SocketAddr>,
    /// The PaymentService (default: `upstream.payment_addr`).
    #[arg(long)]
    payment: Option<std::net::SocketAddr>,
}

/// Overrides of a mock's config.
#[derive(Debug, clap::Args)]
struct MockArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Latency of each call, in ms.
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Further latency of each cancel (a slow compensation), in ms.
    #[arg(long)]
    cancel_latency_ms: Option<u64>,
    /// Most calls in flight (0 = unlimited); above it RESOURCE_EXHAUSTED.
    #[arg(long)]
    capacity: Option<usize>,
    /// Share of calls failing with UNAVAILABLE.
    #[arg(long)]
    failure_rate: Option<f64>,
    /// Most records remembered, the oldest forgotten first.
    #[arg(long)]
    max_records: Option<usize>,
}

impl MockArgs {
    fn apply(&self, mock: &mut booking::upstream::MockConfig) -> anyhow::Result<()> {
        if let Some(ms) = self.latency_ms {
            mock.latency = std::time::Duration::from_millis(ms);
        }
        if let Some(ms) = self.cancel_latency_ms {
            mock.cancel_latency = std::time::Duration::from_millis(ms);
        }
        if let Some(capacity) = self.capacity {
            mock.capacity = capacity;
        }
        if let Some(rate) = self.failure_rate {
            mock.failure_rate = rate;
        }
        if let Some(records) = self.max_records {
            mock.max_records = records;
        }
        mock.validate().map_err(anyhow::Error::msg)
    }
}

/// mimalloc rather than glibc's malloc: the orchestrator's hot path (HTTP/2 frames, protobuf
/// and JSON buffers, saga records) allocates and frees small blocks on two worker threads, and
/// glibc's allocator takes about a quarter of its CPU there (`bench/profile.sh` shows it). The `system-alloc`
/// feature keeps the system allocator, so that valgrind's tools see every allocation
/// (`bench/cost.sh`).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    let telemetry = telemetry::init("sagaflow-booking", config.otlp_endpoint.as_deref())?;
    let result = run(cli, config).await;
    telemetry.shutdown().await;
    result
}

async fn run(cli: Cli, mut config: Config) -> anyhow::Result<()> {
    match cli.part.unwrap_or(Part::All) {
        Part::All => run_orchestrator(config).await,
        Part::Orchestrator => {
            config.app.upstream.in_process = false;
            run_orchestrator(config).await
        }
        Part::Order(args) => {
            args.apply(&mut config.app.upstream.order)?;
            let addr = args.listen.unwrap_or(config.app.upstream.order_addr);
            let stop = CancellationToken::new();
            let (addr, server) =
                app::start_order(addr, OrderMock::new(config.app.upstream.order), stop.clone()).await?;
            tracing::info!(%addr, "order service serving");
            terminated().await;
            stop.cancel();
            server.await.context("order service task")?
        }
        Part::Payment(args) => {
            args.apply(&mut config.app.upstream.payment)?;
            let addr = args.listen.unwrap_or(config.app.upstream.payment_addr);
            let stop = CancellationToken::new();
            let (addr, server) =
                app::start_payment(addr, PaymentMock::new(config.app.upstream.payment), stop.clone()).await?;
            tracing::info!(%addr, "payment service serving");
            terminated().await;
            stop.cancel();
            server.await.context("payment service task")?
        }
        Part::Proxy(args) => {
            let stop = CancellationToken::new();
            let (addr, server) = app::start_proxy(
                args.listen.unwrap_or(config.grpc_listen),
                args.order.unwrap_or(config.app.upstream.order_addr),
                args.payment.unwrap_or(config.app.upstream.payment_addr),
                stop.clone(),
            )
            .await?;
            tracing::info!(%addr, "benchmark proxy serving");
            terminated().await;
            stop.cancel();
            server.await.context("benchmark proxy task")?
        }
    }
}

async fn run_orchestrator(config: Config) -> anyhow::Result<()> {
    let running = app::start(config).await?;
    terminated().await;
    tracing::info!("shutting down");
    running.shutdown().await
}
