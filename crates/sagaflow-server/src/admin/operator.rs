//! The admin API's operator actions: retry a stuck saga, abort a running one,
//! settle a stuck compensation by hand, redrive stuck sagas in bulk, pause and
//! resume a facade; and each saga's audit trail. Each action names who acts (the
//! `x-sagaflow-operator` header, else `admin`), which lands in the saga's
//! history and in a log line.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, body::Bytes};
use sagaflow::{HistoryEvent, RedriveFilter, SagaRecord};
use serde::{Deserialize, Serialize};

use super::sagas::shown;
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
        .route("/api/sagas/{id}/retry", post(retry))
        .route("/api/sagas/{id}/abort", post(abort))
        .route("/api/sagas/{id}/audit", get(audit))
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

async fn retry(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, BadRequest> {
    let who = operator(&headers)?;
    Ok(match state.orchestrator.retry_stuck(&id, &who).await {
        Ok(record) => Json(shown(record)).into_response(),
        Err(e) => error(e),
    })
}

async fn abort(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Response, BadRequest> {
    let (who, body) = (operator(&headers)?, body::<AbortBody>(&raw)?);
    Ok(match state.orchestrator.abort(&id, &who, reason(&body.reason)?).await {
        Ok(record) => Json(shown(record)).into_response(),
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
        Ok(record) => Json(shown(record)).into_response(),
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
    Ok(match state.orchestrator.redrive(&filter, per_second, body.dry_run, &who).await {
        Ok(matched) => Json(serde_json::json!({ "matched": matched, "dry_run": body.dry_run })).into_response(),
        Err(e) => error(e),
    })
}

/// Query of a pause: what happens to new calls while paused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PauseQuery {
    /// `refuse` (the default): new calls get `UNAVAILABLE`; `queue`: they wait for the resume
    /// (at most the wait timeout), with nothing recorded meanwhile.
    mode: Option<String>,
}

async fn pause(
    State(state): State<AdminState>,
    Path(facade): Path<String>,
    query: Result<Query<PauseQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, BadRequest> {
    let who = operator(&headers)?;
    let Query(query) = query.map_err(|e| BadRequest(format!("query: {}", e.body_text())))?;
    let queue = match query.mode.as_deref() {
        None | Some("refuse") => false,
        Some("queue") => true,
        Some(other) => return Err(BadRequest(format!("mode `{other}` is not one of: refuse, queue"))),
    };
    let paused = if queue {
        state.orchestrator.pause_holding(&facade, &who).await
    } else {
        state.orchestrator.pause(&facade, &who).await
    };
    let mode = if queue { "queue" } else { "refuse" };
    Ok(match paused {
        Ok(()) => {
            Json(serde_json::json!({ "facade": facade, "paused": true, "mode": mode, "by": who })).into_response()
        }
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

/// One operator action on a saga, as its history records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct AuditEntry {
    /// Unix ms it was recorded.
    at_ms: u64,
    /// `abort`, `resolve` or `retry` (a redrive is a retry whose reason is `redrive`).
    action: &'static str,
    /// Who acted; `None` for a retry recorded before operators were named.
    by: Option<String>,
    /// Why, in their words.
    reason: Option<String>,
    /// The step it concerned: the step in flight (abort), settled (resolve) or retried next (retry).
    step: Option<usize>,
}

/// The body of `GET /api/sagas/{id}/audit`.
#[derive(Debug, Serialize)]
struct Audit {
    request_id: String,
    facade: String,
    status: sagaflow::SagaStatus,
    /// Oldest first.
    actions: Vec<AuditEntry>,
}

/// Who did what to `record`, and when, from its history.
fn audit_of(record: &SagaRecord) -> Audit {
    let actions = record
        .history
        .iter()
        .filter_map(|entry| {
            let action = match entry.event {
                HistoryEvent::Aborted => "abort",
                HistoryEvent::Resolved => "resolve",
                HistoryEvent::RetryCompensation => "retry",
                _ => return None,
            };
            Some(AuditEntry {
                at_ms: entry.at_ms,
                action,
                by: entry.by.clone(),
                reason: entry.reason.clone(),
                step: entry.step,
            })
        })
        .collect();
    Audit { request_id: record.request_id.clone(), facade: record.facade.clone(), status: record.status(), actions }
}

async fn audit(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.orchestrator.saga(&id).await {
        Ok(Some(record)) => Json(audit_of(&record)).into_response(),
        Ok(None) => json_error(StatusCode::NOT_FOUND, format!("no saga `{id}`")),
        Err(e) => error(e),
    }
}

#[cfg(test)]
mod tests {
    use sagaflow::Mode;
    use sagaflow::log::{NewSaga, SagaEvent};
    use serde_json::json;

    use super::*;

    #[test]
    fn the_audit_trail_lists_operators_actions_only_oldest_first() {
        let mut record = SagaRecord::new(NewSaga {
            request_id: "r".into(),
            facade: "F".into(),
            mode: Mode::Async,
            steps: 2,
            data: json!(null),
            deadline_ms: u64::MAX,
            callback_url: None,
            owner: None,
            version: None,
        });
        record.apply(&SagaEvent::StepStarted { index: 0 }).unwrap();
        record.apply(&SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(null) }).unwrap();
        record.apply(&SagaEvent::StepStarted { index: 1 }).unwrap();
        record.apply(&SagaEvent::Aborted { by: "ann".into(), reason: "customer".into() }).unwrap();
        record.apply(&SagaEvent::StepCompensated { index: 1, attempts: 1 }).unwrap();
        record.apply(&SagaEvent::CompensationGaveUp { index: 0, attempts: 2, reason: "down".into() }).unwrap();
        record.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
        record.apply(&SagaEvent::CompensationGaveUp { index: 0, attempts: 2, reason: "down".into() }).unwrap();
        let redrive = SagaEvent::RetryCompensation { by: Some("bo".into()), reason: Some("redrive".into()) };
        record.apply(&redrive).unwrap();
        record.apply(&SagaEvent::CompensationGaveUp { index: 0, attempts: 2, reason: "down".into() }).unwrap();
        record.apply(&SagaEvent::Resolved { index: 0, by: "cy".into(), reason: "voided".into() }).unwrap();
        let audit = audit_of(&record);
        assert_eq!(audit.status, sagaflow::SagaStatus::Compensated);
        let seen: Vec<_> =
            audit.actions.iter().map(|a| (a.action, a.by.as_deref(), a.reason.as_deref(), a.step)).collect();
        assert_eq!(
            seen,
            [
                ("abort", Some("ann"), Some("customer"), Some(1)),
                ("retry", None, None, Some(0)),
                ("retry", Some("bo"), Some("redrive"), Some(0)),
                ("resolve", Some("cy"), Some("voided"), Some(0)),
            ]
        );
        assert!(audit.actions.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }
}
