//! The admin API's views of the saga log: listing with paging and filters, counts per
//! facade and status, and one saga's detail.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sagaflow::log::{ListCursor, ListFilter, SagaState};
use sagaflow::{Failure, HistoryEvent, Orchestrator, SagaRecord, SagaStatus};
use serde::{Deserialize, Serialize};

use super::{AdminState, NEXT_CURSOR_HEADER, error, json_error};

/// The routes of the saga views.
pub(super) fn routes() -> Router<AdminState> {
    Router::new().route("/api/stats", get(stats)).route("/api/sagas", get(list)).route("/api/sagas/{id}", get(saga))
}

/// Sagas per page of `GET /api/sagas` unless `limit` says otherwise.
const DEFAULT_PAGE: usize = 100;
/// Largest page of `GET /api/sagas`.
const MAX_PAGE: usize = 1_000;
/// Newest sagas that `GET /api/stats` counts.
const STATS_SCAN: usize = 10_000;
/// How long counts are reused, so many open dashboards cost one scan per interval.
const STATS_TTL: Duration = Duration::from_secs(1);

/// Query of `GET /api/sagas`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    facade: Option<String>,
    status: Option<SagaStatus>,
    /// Only sagas created at or after this Unix ms.
    since_ms: Option<u64>,
    /// Only sagas created before this Unix ms.
    until_ms: Option<u64>,
    limit: Option<usize>,
    /// Where the previous page ended (its `x-next-cursor`).
    cursor: Option<String>,
}

/// A position in the list order: newest first, then by request id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    created_ms: u64,
    request_id: String,
}

impl Cursor {
    fn of(record: &SagaRecord) -> Self {
        Self { created_ms: record.created_ms, request_id: record.request_id.clone() }
    }

    /// `<created_ms hex>.<request id hex>`: opaque, and safe in a URL as it is.
    fn encode(&self) -> String {
        let mut out = format!("{:x}.", self.created_ms);
        for byte in self.request_id.as_bytes() {
            let _ = write!(out, "{byte:02x}");
        }
        out
    }

    fn decode(text: &str) -> Option<Self> {
        let (created, id) = text.split_once('.')?;
        let created_ms = u64::from_str_radix(created, 16).ok()?;
        if id.len() % 2 != 0 || !id.is_ascii() {
            return None;
        }
        let bytes: Option<Vec<u8>> =
            (0..id.len()).step_by(2).map(|i| u8::from_str_radix(&id[i..i + 2], 16).ok()).collect();
        Some(Self { created_ms, request_id: String::from_utf8(bytes?).ok()? })
    }
}

async fn list(State(state): State<AdminState>, Query(q): Query<ListQuery>) -> Response {
    let after = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(text) => match Cursor::decode(text) {
            Some(cursor) => Some(ListCursor { created_ms: cursor.created_ms, request_id: cursor.request_id }),
            None => return json_error(StatusCode::BAD_REQUEST, format!("cursor `{text}` is not one this API gave")),
        },
        None => None,
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    // The log reads the page from where it starts (one more saga says whether a next page exists).
    let filter = ListFilter {
        facade: q.facade,
        status: q.status,
        limit: limit + 1,
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        after,
    };
    let mut sagas = match state.orchestrator.sagas(filter).await {
        Ok(sagas) => sagas,
        Err(e) => return error(e),
    };
    let next = (sagas.len() > limit).then(|| {
        sagas.truncate(limit);
        sagas.last().map(Cursor::of)
    });
    let mut response = Json(sagas.into_iter().map(shown).collect::<Vec<_>>()).into_response();
    if let Some(next) = next.flatten().and_then(|c| HeaderValue::from_str(&c.encode()).ok()) {
        response.headers_mut().insert(NEXT_CURSOR_HEADER, next);
    }
    response
}

// ---------------------------------------------------------------- counts

/// Sagas per status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
struct Counts {
    running: u64,
    compensating: u64,
    completed: u64,
    compensated: u64,
    stuck: u64,
}

impl Counts {
    fn add(&mut self, status: SagaStatus) {
        let slot = match status {
            SagaStatus::Running => &mut self.running,
            SagaStatus::Compensating => &mut self.compensating,
            SagaStatus::Completed => &mut self.completed,
            SagaStatus::Compensated => &mut self.compensated,
            SagaStatus::Stuck => &mut self.stuck,
        };
        *slot += 1;
    }
}

/// The body of `GET /api/stats`.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Stats {
    /// Unix ms the counts were taken.
    at_ms: u64,
    /// Sagas counted: the newest of the saga log, at most `scan_limit`.
    counted: usize,
    /// The most this endpoint counts.
    scan_limit: usize,
    /// Whether older sagas exist that were not counted.
    truncated: bool,
    /// Creation time of the oldest saga counted.
    oldest_ms: Option<u64>,
    /// Every facade's sagas together.
    total: Counts,
    /// Per registered facade (a facade without sagas counts zeros).
    facades: BTreeMap<String, Counts>,
    /// This process's engine counters.
    engine: EngineCounts,
}

#[derive(Debug, Clone, Serialize)]
struct EngineCounts {
    dead_lettered: u64,
    recovered: u64,
    waiting_callers: usize,
}

fn count(orchestrator: &Orchestrator, sagas: &[SagaRecord], truncated: bool) -> Stats {
    let mut facades: BTreeMap<String, Counts> =
        orchestrator.flows().into_iter().map(|f| (f.facade, Counts::default())).collect();
    let mut total = Counts::default();
    for saga in sagas {
        total.add(saga.status());
        facades.entry(saga.facade.clone()).or_default().add(saga.status());
    }
    let engine = orchestrator.stats();
    Stats {
        at_ms: sagaflow::now_ms(),
        counted: sagas.len(),
        scan_limit: STATS_SCAN,
        truncated,
        oldest_ms: sagas.iter().map(|s| s.created_ms).min(),
        total,
        facades,
        engine: EngineCounts {
            dead_lettered: engine.dead_lettered,
            recovered: engine.recovered,
            waiting_callers: engine.waiting,
        },
    }
}

async fn stats(State(state): State<AdminState>) -> Response {
    // One scan at a time; the others wait for it and reuse it.
    let mut cached = state.stats.lock().await;
    if let Some((at, stats)) = cached.as_ref()
        && at.elapsed() < STATS_TTL
    {
        return Json(stats.clone()).into_response();
    }
    let filter = ListFilter { facade: None, status: None, limit: STATS_SCAN + 1, ..ListFilter::default() };
    let mut sagas = match state.orchestrator.sagas(filter).await {
        Ok(sagas) => sagas,
        Err(e) => return error(e),
    };
    let truncated = sagas.len() > STATS_SCAN;
    sagas.truncate(STATS_SCAN);
    let stats = count(&state.orchestrator, &sagas, truncated);
    *cached = Some((Instant::now(), stats.clone()));
    Json(stats).into_response()
}

// ---------------------------------------------------------------- one saga

/// One phase (action or compensation) of a step, as the history tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
struct Phase {
    /// action: `not_run`, `running`, `completed`, `failed`;
    /// compensation: `not_needed`, `pending`, `compensated`, `gave_up`.
    status: &'static str,
    /// Unix ms the phase started (actions only: compensations record no start).
    started_ms: Option<u64>,
    /// Unix ms the phase ended.
    ended_ms: Option<u64>,
    /// Attempts it took.
    attempts: Option<u32>,
    /// The last error, if it failed.
    error: Option<String>,
}

/// One step of a saga: its node, its action and its compensation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct StepView {
    index: usize,
    /// The node's name, when the saga's flow is registered here.
    node: Option<String>,
    /// Whether the node has a compensation.
    compensable: Option<bool>,
    action: Phase,
    compensation: Phase,
}

/// The body of `GET /api/sagas/{id}`: the record, and what an operator reads off it.
#[derive(Debug, Serialize)]
struct SagaDetail {
    #[serde(flatten)]
    record: SagaRecord,
    /// The state's name.
    status: SagaStatus,
    /// Why the saga rolled back (the failed node and its error), if it did.
    rollback_reason: Option<String>,
    /// Why the compensation gave up, while stuck.
    stuck_reason: Option<String>,
    /// From start to last change, in ms.
    duration_ms: u64,
    /// Each step's node, attempts, timings and errors (`steps` is the record's step count).
    step_details: Vec<StepView>,
}

fn rollback_reason(failure: &Failure) -> String {
    match failure.code {
        Some(code) => format!("{failure} (gRPC {:?})", tonic::Code::from_i32(code)),
        None => failure.to_string(),
    }
}

fn detail(record: SagaRecord, nodes: Option<(&[String], &[bool])>) -> SagaDetail {
    let mut steps: Vec<StepView> = (0..record.steps)
        .map(|index| StepView {
            index,
            node: nodes.and_then(|(names, _)| names.get(index).cloned()),
            compensable: nodes.and_then(|(_, comps)| comps.get(index).copied()),
            action: Phase { status: "not_run", ..Phase::default() },
            compensation: Phase { status: "not_needed", ..Phase::default() },
        })
        .collect();
    for entry in &record.history {
        let Some(step) = entry.step.and_then(|i| steps.get_mut(i)) else { continue };
        match entry.event {
            HistoryEvent::StepStarted => {
                step.action = Phase { status: "running", started_ms: Some(entry.at_ms), ..Phase::default() };
            }
            HistoryEvent::StepCompleted | HistoryEvent::StepFailed => {
                step.action.status = if entry.event == HistoryEvent::StepCompleted { "completed" } else { "failed" };
                step.action.ended_ms = Some(entry.at_ms);
                step.action.attempts = entry.attempts;
                step.action.error.clone_from(&entry.error);
            }
            HistoryEvent::StepCompensated | HistoryEvent::CompensationGaveUp => {
                step.compensation = Phase {
                    status: if entry.event == HistoryEvent::StepCompensated { "compensated" } else { "gave_up" },
                    started_ms: None,
                    ended_ms: Some(entry.at_ms),
                    attempts: entry.attempts,
                    error: entry.error.clone(),
                };
            }
            _ => {}
        }
    }
    let (failure, stuck_reason, pending, stuck) = match &record.state {
        SagaState::Compensating { failure, pending } => (Some(failure), None, pending.as_slice(), false),
        SagaState::Compensated { failure } => (Some(failure), None, &[][..], false),
        SagaState::Stuck { failure, reason, pending } => {
            (Some(failure), Some(reason.clone()), pending.as_slice(), true)
        }
        SagaState::Running | SagaState::Completed => (None, None, &[][..], false),
    };
    for (n, index) in pending.iter().enumerate() {
        // While stuck, the first pending step is the one that gave up.
        if let Some(step) = steps.get_mut(*index)
            && !(stuck && n == 0)
        {
            step.compensation.status = "pending";
        }
    }
    SagaDetail {
        status: record.status(),
        rollback_reason: failure.map(rollback_reason),
        stuck_reason,
        duration_ms: record.updated_ms.saturating_sub(record.created_ms),
        step_details: steps,
        record,
    }
}

async fn saga(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.orchestrator.saga(&id).await {
        Ok(Some(record)) => {
            let flow = state.orchestrator.flows().into_iter().find(|f| f.facade == record.facade);
            let nodes = flow.as_ref().map(|f| (f.nodes.as_slice(), f.compensations.as_slice()));
            Json(detail(shown(record), nodes)).into_response()
        }
        Ok(None) => json_error(StatusCode::NOT_FOUND, format!("no saga `{id}`")),
        Err(e) => error(e),
    }
}

/// A record as the API shows it: the callback URL without its credentials.
pub(super) fn shown(mut record: SagaRecord) -> SagaRecord {
    record.callback_url = record.callback_url.map(|url| crate::redact::url(&url));
    record
}

#[cfg(test)]
mod tests {
    use sagaflow::Mode;
    use sagaflow::log::{NewSaga, SagaEvent};
    use serde_json::{Value, json};

    use super::*;

    fn saga(id: &str, created_ms: u64) -> SagaRecord {
        let mut record = SagaRecord::new(NewSaga {
            request_id: id.into(),
            facade: "F".into(),
            mode: Mode::Sync,
            steps: 2,
            data: json!(null),
            deadline_ms: u64::MAX,
            callback_url: None,
            owner: None,
            version: None,
        });
        record.created_ms = created_ms;
        record
    }

    #[test]
    fn cursors_round_trip_any_request_id() {
        for id in ["a", "with.dots and spaces", "ünïcode/?&=", ""] {
            let cursor = Cursor { created_ms: 1_700_000_000_123, request_id: id.into() };
            let text = cursor.encode();
            assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'), "{text}");
            assert_eq!(Cursor::decode(&text), Some(cursor));
        }
        for bad in ["", "zz.00", "10.0", "10.zz", "10"] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn detail_names_nodes_and_tells_each_phase() {
        let mut record = saga("r", 1);
        let data = json!(null);
        record.apply(&SagaEvent::StepStarted { index: 0 }).unwrap();
        record.apply(&SagaEvent::StepCompleted { index: 0, attempts: 2, data }).unwrap();
        record.apply(&SagaEvent::StepStarted { index: 1 }).unwrap();
        let failure = Failure { step: 1, node: "Pay".into(), error: "refused".into(), code: Some(9) };
        record
            .apply(&SagaEvent::StepFailed {
                failure,
                attempts: 1,
                compensate_failed: false,
                later_steps_in_doubt: false,
            })
            .unwrap();
        record.apply(&SagaEvent::CompensationGaveUp { index: 0, attempts: 3, reason: "down".into() }).unwrap();
        let names = ["Order".to_owned(), "Pay".to_owned()];
        let view = detail(record.clone(), Some((&names, &[true, true])));
        assert_eq!(view.status, SagaStatus::Stuck);
        assert_eq!(view.rollback_reason.as_deref(), Some("step 1 (Pay) failed: refused (gRPC FailedPrecondition)"));
        assert!(view.stuck_reason.as_deref().is_some_and(|r| r.contains("down")));
        assert_eq!(view.step_details[0].node.as_deref(), Some("Order"));
        assert_eq!((view.step_details[0].action.status, view.step_details[0].action.attempts), ("completed", Some(2)));
        assert_eq!(view.step_details[0].compensation.status, "gave_up");
        assert_eq!(view.step_details[1].action.status, "failed");
        assert_eq!(view.step_details[1].action.error.as_deref(), Some("refused"));
        assert_eq!(view.step_details[1].compensation.status, "not_needed");

        record.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
        assert_eq!(detail(record.clone(), None).step_details[0].compensation.status, "pending");
        record.apply(&SagaEvent::StepCompensated { index: 0, attempts: 1 }).unwrap();
        let view = detail(record, None);
        assert_eq!(view.status, SagaStatus::Compensated);
        assert_eq!(view.step_details[0].compensation.status, "compensated");
        assert_eq!(view.step_details[0].compensation.error, None);
        assert_eq!(view.step_details[0].node, None);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["state"]["status"], "compensated");
        assert_eq!(json["status"], "compensated");
        assert_eq!(json["steps"], 2);
        assert_eq!(json["step_details"][0]["node"], Value::Null);
        assert!(json["history"].as_array().is_some_and(|h| h.len() == 8));
    }
}
