//! The operator's HTTP side on `http_listen` (default 127.0.0.1:10080): health,
//! Prometheus metrics, the dashboard at `/`, and the admin API — flows, live
//! counts, sagas by request id or filter (facade, status, time range, paging),
//! and retrying a stuck saga.
//!
//! With a token configured, everything but `/healthz`, the dashboard's static
//! files and (when `public_metrics`) `/metrics` needs `Authorization: Bearer`.
//! The dashboard page itself holds no data: it asks for the token and sends it
//! on its API calls.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sagaflow::log::ListFilter;
use sagaflow::{Error, Failure, Orchestrator, SagaRecord, SagaState, SagaStatus};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Sagas per page of `GET /api/sagas` unless `limit` says otherwise.
const DEFAULT_PAGE: usize = 100;
/// Largest page of `GET /api/sagas`.
const MAX_PAGE: usize = 1_000;
/// Newest sagas (of the facade/status asked) that paging and the time range reach back over.
const MAX_SCAN: usize = 10_000;
/// Newest sagas that `GET /api/stats` counts.
const STATS_SCAN: usize = 10_000;
/// How long counts are reused, so many open dashboards cost one scan per interval.
const STATS_TTL: Duration = Duration::from_secs(1);

/// Response header naming the cursor of the next page, when there is one.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";
/// Response header set to `true` when the scan limit cut a listing short.
pub const SCAN_TRUNCATED_HEADER: &str = "x-scan-truncated";

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");
/// The dashboard loads only its own files and talks only to this origin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Clone)]
struct AdminState {
    orchestrator: Orchestrator,
    token: Option<String>,
    stats: Arc<Mutex<Option<(Instant, Stats)>>>,
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
    let state = AdminState { orchestrator, token: token.filter(|t| !t.is_empty()), stats: Arc::new(Mutex::new(None)) };
    let metrics_route = Router::new().route("/metrics", get(|| async { prometheus().render() }));
    let (open, guarded) = if public_metrics { (metrics_route, Router::new()) } else { (Router::new(), metrics_route) };
    let api = guarded
        .route("/api/flows", get(flows))
        .route("/api/stats", get(stats))
        .route("/api/sagas", get(list))
        .route("/api/sagas/{id}", get(saga))
        .route("/api/sagas/{id}/retry", post(retry))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/dashboard/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/dashboard/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .merge(open)
        .merge(api)
        .layer(middleware::map_response(security_headers))
        .with_state(state)
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

async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|given| same(given.as_bytes(), token.as_bytes())) {
            let mut response = (StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
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
    let status = match &error {
        Error::Log(sagaflow::log::LogError::NotFound(_)) => StatusCode::NOT_FOUND,
        Error::Config(_) => StatusCode::CONFLICT,
        Error::Log(_) | Error::Broker(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_error(status, error.to_string())
}

async fn flows(State(state): State<AdminState>) -> Response {
    Json(state.orchestrator.flows()).into_response()
}

// ---------------------------------------------------------------- listing

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

    /// Whether `record` comes after this position.
    fn precedes(&self, record: &SagaRecord) -> bool {
        record.created_ms < self.created_ms
            || (record.created_ms == self.created_ms && record.request_id > self.request_id)
    }
}

fn list_order(a: &SagaRecord, b: &SagaRecord) -> Ordering {
    b.created_ms.cmp(&a.created_ms).then_with(|| a.request_id.cmp(&b.request_id))
}

/// The part of the list order a request asks for.
#[derive(Debug, Default)]
struct Window {
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    after: Option<Cursor>,
}

impl Window {
    fn contains(&self, record: &SagaRecord) -> bool {
        self.since_ms.is_none_or(|since| record.created_ms >= since)
            && self.until_ms.is_none_or(|until| record.created_ms < until)
            && self.after.as_ref().is_none_or(|after| after.precedes(record))
    }
}

/// One page cut out of a batch of the newest sagas.
#[derive(Debug)]
struct Page {
    sagas: Vec<SagaRecord>,
    next: Option<Cursor>,
    /// The batch ended before the page was known: fetch a bigger one.
    need_more: bool,
}

/// Cuts the page of `limit` sagas in `window` out of `batch`, the newest sagas
/// of the log (all of them when `exhausted`).
fn cut(mut batch: Vec<SagaRecord>, exhausted: bool, window: &Window, limit: usize) -> Page {
    batch.sort_by(list_order);
    // Without the whole log, sagas created in the batch's oldest millisecond may
    // have peers outside it, so the page stops before them — unless the time
    // range ends before that millisecond anyway.
    let boundary = batch.last().map(|r| r.created_ms).filter(|_| !exhausted);
    let boundary = boundary.filter(|b| window.since_ms.is_none_or(|since| *b >= since));
    let mut sagas = Vec::new();
    let mut more = false;
    for record in batch {
        if !window.contains(&record) {
            continue;
        }
        if sagas.len() == limit {
            // A full page, and this one comes after it: there is a next page.
            more = true;
            break;
        }
        if boundary.is_some_and(|b| record.created_ms <= b) {
            break;
        }
        sagas.push(record);
    }
    let next = if more { sagas.last().map(Cursor::of) } else { None };
    Page { sagas, next, need_more: !more && boundary.is_some() }
}

async fn list(State(state): State<AdminState>, Query(q): Query<ListQuery>) -> Response {
    let after = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(text) => match Cursor::decode(text) {
            Some(cursor) => Some(cursor),
            None => return json_error(StatusCode::BAD_REQUEST, format!("cursor `{text}` is not one this API gave")),
        },
        None => None,
    };
    let window = Window { since_ms: q.since_ms, until_ms: q.until_ms, after };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    // Grow the batch until it holds the page: cheap for the recent pages operators look at.
    let mut fetch = (limit + 1).clamp(64, MAX_SCAN);
    let (page, truncated) = loop {
        let filter = ListFilter { facade: q.facade.clone(), status: q.status, limit: fetch };
        let batch = match state.orchestrator.sagas(filter).await {
            Ok(batch) => batch,
            Err(e) => return error(e),
        };
        let exhausted = batch.len() < fetch;
        let page = cut(batch, exhausted, &window, limit);
        if !page.need_more {
            break (page, false);
        }
        if fetch >= MAX_SCAN {
            break (page, true);
        }
        fetch = (fetch * 4).min(MAX_SCAN);
    };
    let sagas: Vec<SagaRecord> = page.sagas.into_iter().map(shown).collect();
    let mut response = Json(sagas).into_response();
    let headers = response.headers_mut();
    if let Some(next) = page.next.and_then(|c| HeaderValue::from_str(&c.encode()).ok()) {
        headers.insert(NEXT_CURSOR_HEADER, next);
    }
    if truncated {
        headers.insert(SCAN_TRUNCATED_HEADER, HeaderValue::from_static("true"));
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
struct Stats {
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
    let filter = ListFilter { facade: None, status: None, limit: STATS_SCAN + 1 };
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
        match entry.event.as_str() {
            "step_started" => {
                step.action = Phase { status: "running", started_ms: Some(entry.at_ms), ..Phase::default() };
            }
            "step_completed" | "step_failed" => {
                step.action.status = if entry.event == "step_completed" { "completed" } else { "failed" };
                step.action.ended_ms = Some(entry.at_ms);
                step.action.attempts = entry.attempts;
                step.action.error.clone_from(&entry.error);
            }
            "step_compensated" | "compensation_gave_up" => {
                step.compensation = Phase {
                    status: if entry.event == "step_compensated" { "compensated" } else { "gave_up" },
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

async fn retry(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.orchestrator.retry_stuck(&id).await {
        Ok(record) => Json(shown(record)).into_response(),
        Err(e) => error(e),
    }
}

/// A record as the API shows it: the callback URL without its credentials.
fn shown(mut record: SagaRecord) -> SagaRecord {
    record.callback_url = record.callback_url.map(|url| crate::redact::url(&url));
    record
}

#[cfg(test)]
mod tests {
    use sagaflow::{Mode, NewSaga, SagaEvent};
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
        });
        record.created_ms = created_ms;
        record
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.sagas.iter().map(|s| s.request_id.as_str()).collect()
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
    fn pages_follow_each_other_without_gaps_or_repeats() {
        let all: Vec<SagaRecord> = vec![saga("a", 30), saga("b", 20), saga("c", 20), saga("d", 10), saga("e", 5)];
        let mut seen = Vec::new();
        let mut window = Window::default();
        loop {
            let page = cut(all.clone(), true, &window, 2);
            assert!(!page.need_more);
            seen.extend(ids(&page).into_iter().map(str::to_owned));
            match page.next {
                Some(next) => window.after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn the_time_range_is_since_inclusive_until_exclusive() {
        let all = vec![saga("a", 30), saga("b", 20), saga("c", 10)];
        let window = Window { since_ms: Some(10), until_ms: Some(30), after: None };
        let page = cut(all, true, &window, 10);
        assert_eq!(ids(&page), ["b", "c"]);
        assert!(page.next.is_none());
    }

    #[test]
    fn a_partial_batch_asks_for_more_rather_than_cutting_a_millisecond() {
        // The batch holds the newest three; more sagas of ms 20 may exist beyond it.
        let batch = vec![saga("a", 30), saga("b", 20), saga("c", 20)];
        let page = cut(batch.clone(), false, &Window::default(), 5);
        assert_eq!(ids(&page), ["a"]);
        assert!(page.need_more);
        // A full page before the boundary needs nothing more.
        let page = cut(batch.clone(), false, &Window::default(), 1);
        assert_eq!((ids(&page), page.need_more), (vec!["a"], false));
        assert_eq!(page.next, Some(Cursor { created_ms: 30, request_id: "a".into() }));
        // A time range that ends above the boundary is complete.
        let window = Window { since_ms: Some(25), ..Window::default() };
        let page = cut(batch, false, &window, 5);
        assert_eq!((ids(&page), page.need_more), (vec!["a"], false));
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

        record.apply(&SagaEvent::RetryCompensation).unwrap();
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

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3cre"));
        assert!(!same(b"s3cret", b"s3creT"));
    }
}
