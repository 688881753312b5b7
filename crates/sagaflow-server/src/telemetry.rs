//! Logs to stderr, traces to OTLP when an endpoint is configured, and the signals that stop
//! a service.

use std::io::IsTerminal;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The tracing set up by [`init`]; [`Telemetry::shutdown`] flushes the spans still batched.
#[derive(Debug)]
#[must_use = "dropping it without `shutdown` may lose the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Logs to stderr (filtered by `RUST_LOG`, default `info`), and traces to the OTLP/HTTP
/// `otlp_endpoint` under `service_name` when one is given (no exporter, no cost, otherwise).
pub fn init(service_name: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,h2=warn,tower=warn".into());
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    let provider = match otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint)
                .build()
                .context("building the OTLP trace exporter")?;
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_owned()).build();
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
        }
        None => None,
    };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("sagaflow")));
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).init();
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Flushes the spans still batched (blocking, so off the runtime's threads).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn terminated() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
