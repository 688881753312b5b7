//! The operator's HTTP API on `http_listen` (default 127.0.0.1:10080): health,
//! Prometheus metrics, flows, sagas by request id or filter, and retrying a stuck saga.

use std::net::SocketAddr;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sagaflow::log::ListFilter;
use sagaflow::{Error, Orchestrator, SagaStatus};
use serde::Deserialize;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct AdminState {
    orchestrator: Orchestrator,
    token: Option<String>,
}

/// The process's Prometheus recorder, installed on first use (one per process).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Explicit buckets for every histogram; they are non-empty, so this cannot fail.
            let builder = PrometheusBuilder::new()
                .set_buckets(&sagaflow::metrics::LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); then ours only renders nothing new.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Refuses a non-loopback bind without a token: the API can retry sagas.
pub fn check_access(listen: SocketAddr, token: Option<&str>) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() && token.is_none_or(str::is_empty) {
        anyhow::bail!(
            "http_listen {listen} is not a loopback address: set admin_token (or SAGAFLOW_ADMIN_TOKEN) so the admin API is not open to the network"
        );
    }
    Ok(())
}

/// The admin router; `/metrics` stays open without a token when `public_metrics`.
pub fn router(orchestrator: Orchestrator, token: Option<String>, public_metrics: bool) -> Router {
    let state = AdminState { orchestrator, token: token.filter(|t| !t.is_empty()) };
    let metrics_route = Router::new().route("/metrics", get(|| async { prometheus().render() }));
    let (open, guarded) = if public_metrics { (metrics_route, Router::new()) } else { (Router::new(), metrics_route) };
    let api = guarded
        .route("/api/flows", get(flows))
        .route("/api/sagas", get(list))
        .route("/api/sagas/{id}", get(saga))
        .route("/api/sagas/{id}/retry", post(retry))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new().route("/healthz", get(|| async { "ok" })).merge(open).merge(api).with_state(state)
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    orchestrator: Orchestrator,
    token: Option<String>,
    public_metrics: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router(orchestrator, token, public_metrics))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response();
        }
    }
    next.run(request).await
}

fn error(error: Error) -> Response {
    let status = match &error {
        Error::Log(sagaflow::log::LogError::NotFound(_)) => StatusCode::NOT_FOUND,
        Error::Config(_) => StatusCode::CONFLICT,
        Error::Log(_) | Error::Broker(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, Json(serde_json::json!({ "error": error.to_string() }))).into_response()
}

async fn flows(State(state): State<AdminState>) -> Response {
    Json(state.orchestrator.flows()).into_response()
}

/// Query of `GET /api/sagas`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    facade: Option<String>,
    status: Option<SagaStatus>,
    limit: Option<usize>,
}

async fn list(State(state): State<AdminState>, Query(q): Query<ListQuery>) -> Response {
    let filter = ListFilter { facade: q.facade, status: q.status, limit: q.limit.unwrap_or(100).min(10_000) };
    match state.orchestrator.sagas(filter).await {
        Ok(sagas) => Json(sagas).into_response(),
        Err(e) => error(e),
    }
}

async fn saga(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.orchestrator.saga(&id).await {
        Ok(Some(record)) => Json(record).into_response(),
        Ok(None) => {
            (StatusCode::NOT_FOUND, Json(serde_json::json!({ "error": format!("no saga `{id}`") }))).into_response()
        }
        Err(e) => error(e),
    }
}

async fn retry(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.orchestrator.retry_stuck(&id).await {
        Ok(record) => Json(record).into_response(),
        Err(e) => error(e),
    }
}
