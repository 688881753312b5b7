//! The operator's HTTP side on `http_listen` (default 127.0.0.1:10090): health,
//! Prometheus metrics, the dashboard at `/`, and the admin API — flows, live
//! counts, sagas by request id or filter (facade, status, time range, paging),
//! and retrying a stuck saga.
//!
//! With a token configured, everything but `/healthz`, the dashboard's static
//! files and (when `public_metrics`) `/metrics` needs `Authorization: Bearer`.
//! The dashboard page itself holds no data: it asks for the token and sends it
//! on its API calls.
//!
//! A request without the right token, token or not configured, must also be
//! same-origin ([`AdminHosts`]): its `Host` one this server answers to and its
//! `Origin`, if any, that host; else `403`. Only `/healthz` is exempt.

mod hosts;
mod operator;
mod prometheus;
mod sagas;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
pub use hosts::AdminHosts;
pub use prometheus::prometheus;
use sagaflow::{Error, Orchestrator};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Response header naming the cursor of the next page, when there is one.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

const INDEX_HTML: &str = include_str!("../dashboard/index.html");
const APP_JS: &str = include_str!("../dashboard/app.js");
const STYLE_CSS: &str = include_str!("../dashboard/style.css");
/// The dashboard loads only its own files and talks only to this origin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Clone)]
struct AdminState {
    orchestrator: Orchestrator,
    token: Option<String>,
    hosts: AdminHosts,
    stats: Arc<Mutex<Option<(Instant, sagas::Stats)>>>,
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

/// The admin router for a server answering to `hosts`; `/metrics` stays open without a
/// token when `public_metrics`.
pub fn router(orchestrator: Orchestrator, token: Option<String>, public_metrics: bool, hosts: AdminHosts) -> Router {
    let state =
        AdminState { orchestrator, token: token.filter(|t| !t.is_empty()), hosts, stats: Arc::new(Mutex::new(None)) };
    let metrics_route = Router::new().route("/metrics", get(|| async { prometheus().render() }));
    let (open, guarded) = if public_metrics { (metrics_route, Router::new()) } else { (Router::new(), metrics_route) };
    let api = guarded
        .route("/api/flows", get(flows))
        .route("/api/versions", get(versions))
        .merge(sagas::routes())
        .merge(operator::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/dashboard/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/dashboard/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .merge(open)
        .merge(api)
        .route_layer(middleware::from_fn_with_state(state.clone(), same_origin))
        // Probes reach the pod by whatever name; the answer is a constant.
        .route("/healthz", get(|| async { "ok" }))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// Serves the admin API on `listener`, answering to `hosts`, until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    orchestrator: Orchestrator,
    token: Option<String>,
    public_metrics: bool,
    hosts: AdminHosts,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router(orchestrator, token, public_metrics, hosts))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files change with the binary; revalidating them is cheap.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    response
}

/// Whether `request` carries the configured token (never, when none is configured).
fn has_token(state: &AdminState, request: &Request) -> bool {
    let Some(token) = &state.token else { return false };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|given| same(given.as_bytes(), token.as_bytes()))
}

async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if state.token.is_some() && !has_token(&state, &request) {
        let mut response = (StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    next.run(request).await
}

/// Refuses a request without the token unless it is same-origin: no cross-site form or
/// script, and no DNS-rebound name, can use the API of a browser's machine.
async fn same_origin(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if !has_token(&state, &request)
        && let Err(why) = state.hosts.check(request.headers(), request.uri())
    {
        return json_error(StatusCode::FORBIDDEN, why);
    }
    next.run(request).await
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn error(error: Error) -> Response {
    json_error(http_status(&error), error.to_string())
}

/// The HTTP status for an orchestrator error: what the operator asked for does not exist (404),
/// does not fit the saga's state (409), or was malformed (400); the log or broker is out of
/// reach (503); anything else is the server's own failure (500).
fn http_status(error: &Error) -> StatusCode {
    use sagaflow::log::LogError;
    match error {
        Error::Log(LogError::NotFound(_)) | Error::UnknownFacade(_) => StatusCode::NOT_FOUND,
        Error::WrongState { .. } | Error::Log(LogError::Transition(_)) | Error::MissingVersions { .. } => {
            StatusCode::CONFLICT
        }
        Error::InvalidRequestId(_) => StatusCode::BAD_REQUEST,
        Error::Log(LogError::Corrupt { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
        Error::Log(_) | Error::Broker(_) | Error::ShuttingDown | Error::Overloaded { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn flows(State(state): State<AdminState>) -> Response {
    Json(state.orchestrator.flows()).into_response()
}

/// Each flow version with its unfinished sagas, and the versions unfinished sagas wait for.
async fn versions(State(state): State<AdminState>) -> Response {
    match state.orchestrator.version_use().await {
        Ok(uses) => Json(uses).into_response(),
        Err(e) => error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_what_the_operator_can_act_on() {
        use sagaflow::log::LogError;
        let not_stuck = Error::WrongState {
            request_id: "a".into(),
            status: sagaflow::SagaStatus::Completed,
            operation: "retry",
            wanted: "stuck",
        };
        assert_eq!(http_status(&not_stuck), StatusCode::CONFLICT);
        assert_eq!(http_status(&Error::Log(LogError::NotFound("a".into()))), StatusCode::NOT_FOUND);
        assert_eq!(http_status(&Error::InvalidRequestId("empty".into())), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(&Error::Log(LogError::unavailable_msg("down"))), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(&Error::Log(LogError::corrupt_msg("saga `a`"))), StatusCode::INTERNAL_SERVER_ERROR);
        // Invalid configuration is the server's own fault, never the operator's request.
        assert_eq!(http_status(&Error::Config("bad".into())), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3cre"));
        assert!(!same(b"s3cret", b"s3creT"));
    }
}
