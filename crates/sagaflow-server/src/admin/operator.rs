//! The admin API's operator actions: abort a running saga, settle a stuck
//! compensation by hand, redrive stuck sagas in bulk, pause and resume a facade. Each names who acts
//! (the `x-sagaflow-operator` header, else `admin`), which lands in the
//! saga's history and in a log line.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Router, body::Bytes};
use sagaflow::RedriveFilter;
use serde::Deserialize;

use super::{AdminState, error, json_error};

/// The request header naming the operator.
pub(super) const OPERATOR_HEADER: &str = "x-sagaflow-operator";
/// Longest operator name and reason accepted.
const MAX_TEXT: usize = 512;
/// Redrive rate when none is asked for, sagas per second.
const DEFAULT_REDRIVE_RATE: u32 = 50;

/// The operator routes, guarded like the rest of the API.
pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/sagas/{id}/abort", post(abort))
        .route("/api/sagas/{id}/resolve", post(resolve))
        .route("/api/redrive", post(redrive))
        .route("/api/flows/{facade}/pause", post(pause))
        .route("/api/flows/{facade}/resume", post(resume))
}

/// Body of an abort.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortBody {
    reason: String,
}

/// Body of a resolve.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    step: usize,
    reason: String,
}

/// Body of a redrive: which stuck sagas, how fast, or only count them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RedriveBody {
    facade: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    failed_step: Option<usize>,
    error_contains: Option<String>,
    per_second: Option<u32>,
    dry_run: bool,
}

/// A request the API cannot take, with the reason (400).
#[derive(Debug)]
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        json_error(StatusCode::BAD_REQUEST, self.0)
    }
}

/// Who acts: the operator header, checked, or `admin`.
fn operator(headers: &HeaderMap) -> Result<String, BadRequest> {
    let Some(value) = headers.get(OPERATOR_HEADER) else { return Ok("admin".to_owned()) };
    match value.to_str() {
        Ok(name)
            if !name.trim().is_empty()
                && name.len() <= 64
                && name.chars().all(|c| c.is_ascii_graphic() || c == ' ') =>
        {
            Ok(name.trim().to_owned())
        }
        _ => Err(BadRequest(format!("{OPERATOR_HEADER} must be 1 to 64 visible ASCII characters"))),
    }
}

/// The JSON body as `T`, or what is wrong with it.
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, BadRequest> {
    serde_json::from_slice(bytes).map_err(|e| BadRequest(format!("request body: {e}")))
}

fn reason(text: &str) -> Result<&str, BadRequest> {
    let text = text.trim();
    if text.is_empty() || text.len() > MAX_TEXT {
        return Err(BadRequest(format!("reason must be 1 to {MAX_TEXT} bytes")));
    }
    Ok(text)
}

async fn abort(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Response, BadRequest> {
    let (who, body) = (operator(&headers)?, body::<AbortBody>(&raw)?);
    Ok(match state.orchestrator.abort(&id, &who, reason(&body.reason)?).await {
        Ok(record) => Json(record).into_response(),
        Err(e) => error(e),
    })
}

async fn resolve(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Response, BadRequest> {
    let (who, body) = (operator(&headers)?, body::<ResolveBody>(&raw)?);
    Ok(match state.orchestrator.resolve(&id, body.step, &who, reason(&body.reason)?).await {
        Ok(record) => Json(record).into_response(),
        Err(e) => error(e),
    })
}

async fn redrive(State(state): State<AdminState>, headers: HeaderMap, raw: Bytes) -> Result<Response, BadRequest> {
    let (who, body) = (operator(&headers)?, body::<RedriveBody>(&raw)?);
    let per_second = body.per_second.unwrap_or(DEFAULT_REDRIVE_RATE);
    if per_second == 0 {
        return Err(BadRequest("per_second must be at least 1".into()));
    }
    let filter = RedriveFilter {
        facade: body.facade,
        since_ms: body.since_ms,
        until_ms: body.until_ms,
        failed_step: body.failed_step,
        error_contains: body.error_contains,
    };
    tracing::info!(operator = %who, ?filter, dry_run = body.dry_run, per_second, "redrive asked");
    Ok(match state.orchestrator.redrive(&filter, per_second, body.dry_run).await {
        Ok(matched) => Json(serde_json::json!({ "matched": matched, "dry_run": body.dry_run })).into_response(),
        Err(e) => error(e),
    })
}

async fn pause(
    State(state): State<AdminState>,
    Path(facade): Path<String>,
    headers: HeaderMap,
) -> Result<Response, BadRequest> {
    let who = operator(&headers)?;
    Ok(match state.orchestrator.pause(&facade, &who).await {
        Ok(()) => Json(serde_json::json!({ "facade": facade, "paused": true, "by": who })).into_response(),
        Err(e) => error(e),
    })
}

async fn resume(
    State(state): State<AdminState>,
    Path(facade): Path<String>,
    headers: HeaderMap,
) -> Result<Response, BadRequest> {
    let who = operator(&headers)?;
    Ok(match state.orchestrator.resume(&facade, &who).await {
        Ok(()) => Json(serde_json::json!({ "facade": facade, "paused": false, "by": who })).into_response(),
        Err(e) => error(e),
    })
}
