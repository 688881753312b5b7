//! The [`SagaLog`] conformance suite: what every saga log backend keeps.
//!
//! Each check opens one log through [`LogHarness::fresh`] and uses request ids
//! and facades no other check uses; it never assumes the log is empty (a
//! shared database may hold other sagas), so it filters what it reads by the
//! ids it created. Records must round-trip exactly: what `begin` and `append`
//! return is what `get`, `unfinished` and `list` return later.
//!
//! The retention checks open their log with [`LogHarness::fresh_with_retention`] and prune it
//! only through [`LogHarness::prune`], so what is pruned when does not depend on timing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};

pub use super::replicas::{
    claim_takes_over_exactly_once, ends_are_announced, leases_expire_and_renew, restart_keeps_own_sagas,
};
pub use super::stages::parallel_branches_round_trip;
use super::{unique_name, within};
use crate::log::{Begin, ListCursor, ListFilter, LogError, Retention, SagaLog, Tombstone};
use crate::saga::{Failure, Mode, NewSaga, SagaEvent, SagaRecord, SagaState, SagaStatus, now_ms};

/// Opens the saga log under test.
#[async_trait]
pub trait LogHarness: Send + Sync + 'static {
    /// Opens the log (a fresh, empty one per call to `fresh`).
    async fn fresh(&self) -> Arc<dyn SagaLog>;

    /// Opens again the log last returned by `fresh`, as after a process
    /// restart (data must still be there). Return None if the backend is not
    /// durable. The suite drops every handle it holds to the first log before
    /// calling this. A log opened by `fresh_with_retention` is reopened with the same
    /// retention and still without background pruning.
    async fn reopen(&self) -> Option<Arc<dyn SagaLog>>;

    /// Opens a fresh, empty log that keeps ended sagas and tombstones per `retention` and
    /// prunes only when [`prune`](Self::prune) asks it to (no background pruning; a backend that
    /// also prunes when a saga ends, as the in-memory one does, may).
    async fn fresh_with_retention(&self, retention: Retention) -> Arc<dyn SagaLog>;

    /// Prunes the log last opened now, as its background pruning would, returning once done.
    async fn prune(&self);

    /// Another handle on the log last returned by `fresh`, as a second
    /// process sharing it holds (the first stays open). `None` for a log
    /// that one process owns; only [`shared`](SagaLog::shared) logs need it.
    async fn another(&self) -> Option<Arc<dyn SagaLog>> {
        None
    }
}

pub(super) async fn fresh(harness: &dyn LogHarness) -> Arc<dyn SagaLog> {
    within("a fresh log from the harness", harness.fresh()).await
}

pub(super) fn new_saga(request_id: &str, facade: &str, steps: usize) -> NewSaga {
    NewSaga {
        request_id: request_id.to_owned(),
        facade: facade.to_owned(),
        mode: Mode::Async,
        steps,
        data: json!({ "request": request_id, "count": 2 }),
        deadline_ms: now_ms() + 3_600_000,
        callback_url: Some("http://127.0.0.1:9/callback?kind=conformance".to_owned()),
        owner: None,
        version: None,
    }
}

pub(super) fn failure(step: usize) -> Failure {
    Failure { step, node: format!("Node{step}"), error: "refused: out of stock".to_owned(), code: Some(10) }
}

/// Begins a saga that must be new, checking the record is `SagaRecord::new`'s.
pub(super) async fn begin(log: &dyn SagaLog, saga: NewSaga) -> SagaRecord {
    let what = format!("begin of `{}`", saga.request_id);
    let record = match within(&what, log.begin(saga.clone())).await {
        Ok(Begin::Started(record)) => record,
        other => panic!("{what}: expected Started, got {other:?}"),
    };
    let mut expected = SagaRecord::new(saga);
    expected.created_ms = record.created_ms;
    expected.updated_ms = record.updated_ms;
    if let (Some(want), Some(got)) = (expected.history.first_mut(), record.history.first()) {
        want.at_ms = got.at_ms;
    }
    assert_eq!(record, expected, "a new saga's record");
    assert_eq!(record.updated_ms, record.created_ms, "a new saga was last changed when it started");
    record
}

/// Appends `event` to `before`'s saga, checking the result is `SagaRecord::apply`'s
/// and that `get` returns the same.
pub(super) async fn append(log: &dyn SagaLog, before: &SagaRecord, event: SagaEvent) -> SagaRecord {
    let id = &before.request_id;
    let what = format!("append of {event:?} to `{id}`");
    let after = match within(&what, log.append(id, event.clone())).await {
        Ok(record) => record,
        Err(e) => panic!("{what} failed: {e}"),
    };
    let mut expected = before.clone();
    expected.apply(&event).unwrap_or_else(|e| panic!("the check's own event does not fit: {e}"));
    let at = after.history.last().map(|h| h.at_ms);
    assert_eq!(at, Some(after.updated_ms), "the last history entry is the last change");
    assert!(after.updated_ms >= before.updated_ms, "time went backwards in {after:?}");
    expected.updated_ms = after.updated_ms;
    if let Some(last) = expected.history.last_mut() {
        last.at_ms = after.updated_ms;
    }
    assert_eq!(after, expected, "{what} must apply SagaRecord::apply");
    assert_eq!(get(log, id).await.as_ref(), Some(&after), "get after {what}");
    after
}

pub(super) async fn get(log: &dyn SagaLog, request_id: &str) -> Option<SagaRecord> {
    let what = format!("get of `{request_id}`");
    match within(&what, log.get(request_id)).await {
        Ok(record) => record,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

async fn list(log: &dyn SagaLog, filter: ListFilter) -> Vec<SagaRecord> {
    let what = format!("list {filter:?}");
    match within(&what, log.list(filter)).await {
        Ok(records) => records,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

/// The unfinished sagas among `ours`, by request id.
async fn unfinished_of(log: &dyn SagaLog, ours: &BTreeSet<String>) -> BTreeMap<String, SagaRecord> {
    match within("unfinished()", log.unfinished()).await {
        Ok(records) => {
            records.into_iter().filter(|r| ours.contains(&r.request_id)).map(|r| (r.request_id.clone(), r)).collect()
        }
        Err(e) => panic!("unfinished() failed: {e}"),
    }
}

/// Runs the steps of `record` from its next one to `until` (excluded), each started and completed.
pub(super) async fn complete_steps(log: &dyn SagaLog, mut record: SagaRecord, until: usize) -> SagaRecord {
    for index in record.completed..until {
        record = append(log, &record, SagaEvent::StepStarted { index }).await;
        let data = json!({ "request": record.request_id, "step": index });
        record = append(log, &record, SagaEvent::StepCompleted { index, attempts: 1, data }).await;
    }
    record
}

/// A saga of `steps` steps run to the end.
async fn completed(log: &dyn SagaLog, id: &str, facade: &str, steps: usize) -> SagaRecord {
    let record = begin(log, new_saga(id, facade, steps)).await;
    let record = complete_steps(log, record, steps).await;
    assert_eq!(record.status(), SagaStatus::Completed);
    record
}

/// A 3-step saga whose step 2 failed after 2 completed: compensating, steps 1 and 0 pending.
async fn compensating(log: &dyn SagaLog, id: &str, facade: &str) -> SagaRecord {
    let record = begin(log, new_saga(id, facade, 3)).await;
    let record = complete_steps(log, record, 2).await;
    let event = SagaEvent::StepFailed {
        failure: failure(2),
        attempts: 3,
        compensate_failed: false,
        later_steps_in_doubt: false,
    };
    let record = append(log, &record, event).await;
    assert_eq!(record.status(), SagaStatus::Compensating);
    record
}

/// Waits until the clock has moved past `ms`, so the next saga starts strictly later.
async fn past(ms: u64) {
    within("the clock to move on by a millisecond", async {
        while now_ms() <= ms {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    })
    .await;
}

fn ids(records: &[SagaRecord]) -> Vec<&str> {
    records.iter().map(|r| r.request_id.as_str()).collect()
}

/// Paging: following [`ListCursor`]s page by page yields the whole list in
/// order, each saga once, also across sagas created in the same millisecond;
/// a time range keeps exactly the sagas created in it.
pub async fn list_pages_by_cursor_and_time(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let facade = unique_name("Paged");
    for _ in 0..4 {
        let mut last = 0;
        for _ in 0..3 {
            last = begin(&*log, new_saga(&unique_name("p"), &facade, 1)).await.created_ms;
        }
        past(last).await;
    }
    let of = |limit: usize| ListFilter { facade: Some(facade.clone()), limit, ..ListFilter::default() };
    let full = list(&*log, of(0)).await;
    assert_eq!(full.len(), 12);
    let mut paged: Vec<SagaRecord> = Vec::new();
    loop {
        let filter = ListFilter { after: paged.last().map(ListCursor::of), ..of(5) };
        let page = list(&*log, filter).await;
        assert!(page.len() <= 5);
        let done = page.len() < 5;
        paged.extend(page);
        if done {
            break;
        }
    }
    assert_eq!(ids(&paged), ids(&full), "pages in order, each saga once");
    let middle = full[5].created_ms;
    let window = ListFilter { since_ms: Some(middle), until_ms: Some(middle + 1), ..of(0) };
    let expected: Vec<&SagaRecord> = full.iter().filter(|r| r.created_ms == middle).collect();
    let got = list(&*log, window).await;
    assert_eq!(ids(&got), expected.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>());
    let newer = list(&*log, ListFilter { since_ms: Some(middle + 1), ..of(0) }).await;
    assert!(newer.iter().all(|r| r.created_ms > middle) && !newer.is_empty());
}

/// Operators' switches are set, cleared and read back, and a durable log
/// keeps them across a restart.
pub async fn controls_are_kept(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let (a, b) = (unique_name("pause:A"), unique_name("pause:B"));
    within("set_control", log.set_control(&a, Some("alice"))).await.expect("set a switch");
    within("set_control", log.set_control(&b, Some("bob"))).await.expect("set a switch");
    within("set_control", log.set_control(&a, Some("carol"))).await.expect("set it again");
    within("set_control", log.set_control(&b, None)).await.expect("clear a switch");
    let ours = |controls: Vec<(String, String)>| -> Vec<(String, String)> {
        controls.into_iter().filter(|(k, _)| *k == a || *k == b).collect()
    };
    let expected = vec![(a.clone(), "carol".to_owned())];
    assert_eq!(ours(within("controls", log.controls()).await.expect("controls")), expected);
    drop(log);
    if let Some(log) = within("reopen", harness.reopen()).await {
        assert_eq!(ours(within("controls", log.controls()).await.expect("controls")), expected, "after a restart");
    }
}

/// `begin` records a new saga once: a second `begin` with the same request id
/// (even with other data) returns `Exists` with the stored record, also after
/// appends and when 8 tasks begin the same saga at once.
pub async fn begin_is_idempotent(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let id = unique_name("saga");
    let facade = unique_name("Facade");
    let started = begin(&*log, new_saga(&id, &facade, 2)).await;
    let mut other = new_saga(&id, &facade, 5);
    other.data = json!("other data");
    match within("a second begin", log.begin(other.clone())).await {
        Ok(Begin::Exists(record)) => assert_eq!(record, started, "Exists carries the stored record"),
        got => panic!("a second begin of `{id}` must be Exists, got {got:?}"),
    }
    let moved = append(&*log, &started, SagaEvent::StepStarted { index: 0 }).await;
    match within("a begin after an append", log.begin(other)).await {
        Ok(Begin::Exists(record)) => assert_eq!(record, moved, "Exists carries the current record"),
        got => panic!("a begin of `{id}` after an append must be Exists, got {got:?}"),
    }

    let id = unique_name("saga-raced");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (log, saga) = (log.clone(), new_saga(&id, &facade, 2));
        tasks.spawn(async move { log.begin(saga).await });
    }
    let (mut started, mut existed) = (Vec::new(), Vec::new());
    while let Some(joined) = within("8 concurrent begins", tasks.join_next()).await {
        match joined {
            Ok(Ok(Begin::Started(record))) => started.push(record),
            Ok(Ok(Begin::Exists(record))) => existed.push(record),
            Ok(Ok(other)) => panic!("a concurrent begin of a new request id: {other:?}"),
            Ok(Err(e)) => panic!("a concurrent begin failed: {e}"),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    assert_eq!(started.len(), 1, "exactly one of 8 concurrent begins starts the saga");
    assert!(existed.iter().all(|r| *r == started[0]), "the others see the stored record");
    assert_eq!(get(&*log, &id).await.as_ref(), started.first());
}

/// `append` applies [`SagaRecord::apply`] and returns the record after it:
/// steps started and completed with their data, then the callback outcome.
pub async fn append_applies_transitions(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let facade = unique_name("Facade");
    let record = begin(&*log, new_saga(&unique_name("saga"), &facade, 2)).await;
    let record = append(&*log, &record, SagaEvent::StepStarted { index: 0 }).await;
    assert_eq!((record.completed, record.status()), (0, SagaStatus::Running));
    let data = json!({ "order_id": 41, "items": ["a", "b"] });
    let record = append(&*log, &record, SagaEvent::StepCompleted { index: 0, attempts: 2, data: data.clone() }).await;
    assert_eq!((record.completed, &record.data), (1, &data));
    let record = append(&*log, &record, SagaEvent::StepStarted { index: 1 }).await;
    let data = json!({ "order_id": 41, "payment_id": 7 });
    let record = append(&*log, &record, SagaEvent::StepCompleted { index: 1, attempts: 1, data: data.clone() }).await;
    assert_eq!((record.completed, record.status(), &record.data), (2, SagaStatus::Completed, &data));
    let event = SagaEvent::CallbackDelivered { delivered: true, attempts: 1, error: None };
    let record = append(&*log, &record, event).await;
    assert_eq!(record.history.len(), 6, "every event is in the history: {:?}", record.history);
}

/// A transition the state machine refuses is `LogError::Transition` (naming
/// the saga and its state) and leaves the stored record unchanged, for a
/// running and for an ended saga.
pub async fn refused_transition_leaves_record(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let facade = unique_name("Facade");
    let id = unique_name("saga");
    let record = begin(&*log, new_saga(&id, &facade, 2)).await;
    let record = complete_steps(&*log, record, 1).await;
    let refused_while_running = [
        SagaEvent::StepStarted { index: 0 },
        SagaEvent::StepCompleted { index: 2, attempts: 1, data: json!("skipped ahead") },
        SagaEvent::StepCompensated { index: 0, attempts: 1 },
        SagaEvent::RetryCompensation { by: None, reason: None },
        SagaEvent::CallbackDelivered { delivered: true, attempts: 1, error: None },
    ];
    for event in refused_while_running {
        refused(&*log, &record, event, SagaStatus::Running).await;
    }
    let record = complete_steps(&*log, record, 2).await;
    let failed = SagaEvent::StepFailed {
        failure: failure(1),
        attempts: 1,
        compensate_failed: false,
        later_steps_in_doubt: false,
    };
    for event in [SagaEvent::StepStarted { index: 2 }, failed, SagaEvent::RetryCompensation { by: None, reason: None }]
    {
        refused(&*log, &record, event, SagaStatus::Completed).await;
    }
}

pub(super) async fn refused(log: &dyn SagaLog, current: &SagaRecord, event: SagaEvent, state: SagaStatus) {
    let id = &current.request_id;
    let what = format!("append of {event:?} to `{id}` in state {state}");
    match within(&what, log.append(id, event)).await {
        Err(LogError::Transition(e)) => {
            assert_eq!((&e.request_id, e.state), (id, state), "the refusal names the saga and its state");
        }
        got => panic!("{what} must be refused with LogError::Transition, got {got:?}"),
    }
    assert_eq!(get(log, id).await.as_ref(), Some(current), "a refused {what} changed the record");
}

/// `append` to a request id never begun is `LogError::NotFound` naming it, and creates nothing.
pub async fn append_to_unknown_saga(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let id = unique_name("never-begun");
    match within("an append to an unknown saga", log.append(&id, SagaEvent::StepStarted { index: 0 })).await {
        Err(LogError::NotFound(named)) => assert_eq!(named, id, "NotFound names the request id"),
        got => panic!("append to unknown `{id}` must be NotFound, got {got:?}"),
    }
    assert_eq!(get(&*log, &id).await, None, "a failed append must not create the saga");
}

/// `get` returns exactly the record `begin` and each `append` returned, and
/// `None` for an unknown request id.
pub async fn get_returns_the_record(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let facade = unique_name("Facade");
    let id = unique_name("saga");
    assert_eq!(get(&*log, &id).await, None, "a saga not begun yet");
    let record = begin(&*log, new_saga(&id, &facade, 3)).await;
    assert_eq!(get(&*log, &id).await.as_ref(), Some(&record), "get after begin");
    let record = complete_steps(&*log, record, 2).await;
    assert_eq!(get(&*log, &id).await.as_ref(), Some(&record), "get after appends");
    let other = begin(&*log, new_saga(&unique_name("saga"), &facade, 1)).await;
    assert_eq!(get(&*log, &other.request_id).await.as_ref(), Some(&other), "another saga");
    assert_eq!(get(&*log, &id).await.as_ref(), Some(&record), "get is per request id");
}

/// `unfinished` returns the running and compensating sagas (a stuck saga
/// retried included), exactly as stored, and none that ended: completed,
/// compensated, stuck.
pub async fn unfinished_is_running_and_compensating(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let facade = unique_name("Facade");
    let mut ours = BTreeSet::new();
    let mut name = |what: &str| {
        let id = unique_name(what);
        ours.insert(id.clone());
        id
    };
    let (running_id, compensating_id, retried_id) = (name("running"), name("compensating"), name("retried"));
    let (completed_id, compensated_id, stuck_id) = (name("completed"), name("compensated"), name("stuck"));

    let running = begin(&*log, new_saga(&running_id, &facade, 3)).await;
    let running = complete_steps(&*log, running, 1).await;
    let compensating_record = compensating(&*log, &compensating_id, &facade).await;
    completed(&*log, &completed_id, &facade, 2).await;
    let record = compensating(&*log, &compensated_id, &facade).await;
    let record = append(&*log, &record, SagaEvent::StepCompensated { index: 1, attempts: 1 }).await;
    let record = append(&*log, &record, SagaEvent::StepCompensated { index: 0, attempts: 1 }).await;
    assert_eq!(record.status(), SagaStatus::Compensated);
    let record = compensating(&*log, &stuck_id, &facade).await;
    let gave_up = SagaEvent::CompensationGaveUp { index: 1, attempts: 10, reason: "unavailable".into() };
    let record = append(&*log, &record, gave_up.clone()).await;
    assert_eq!(record.status(), SagaStatus::Stuck);
    let record = compensating(&*log, &retried_id, &facade).await;
    let record = append(&*log, &record, gave_up).await;
    let retried = append(&*log, &record, SagaEvent::RetryCompensation { by: None, reason: None }).await;

    let found = unfinished_of(&*log, &ours).await;
    let expected: BTreeMap<String, SagaRecord> =
        [running, compensating_record, retried].into_iter().map(|r| (r.request_id.clone(), r)).collect();
    assert_eq!(
        found.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "unfinished: running, compensating and retried; not completed, compensated or stuck"
    );
    assert_eq!(found, expected, "unfinished returns the records as stored");
}

/// `list` filters by facade and status, returns newest (by `created_ms`)
/// first, honours `limit`, and takes `limit` 0 as no limit.
pub async fn list_filters_newest_first(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let facade = unique_name("Facade");
    let other_facade = unique_name("Other");
    let a = begin(&*log, new_saga(&unique_name("a"), &facade, 2)).await;
    past(a.created_ms).await;
    let b = completed(&*log, &unique_name("b"), &facade, 1).await;
    past(b.created_ms).await;
    let c = begin(&*log, new_saga(&unique_name("c"), &facade, 2)).await;
    past(c.created_ms).await;
    let d = begin(&*log, new_saga(&unique_name("d"), &facade, 1)).await;
    let failed = SagaEvent::StepFailed {
        failure: failure(0),
        attempts: 1,
        compensate_failed: false,
        later_steps_in_doubt: false,
    };
    let d = append(&*log, &d, failed).await;
    assert_eq!(d.status(), SagaStatus::Compensated);
    let e = begin(&*log, new_saga(&unique_name("e"), &other_facade, 1)).await;
    let by = |facade: &str, status: Option<SagaStatus>, limit: usize| ListFilter {
        facade: Some(facade.to_owned()),
        status,
        limit,
        ..ListFilter::default()
    };

    let all = list(&*log, by(&facade, None, 100)).await;
    assert_eq!(ids(&all), ids(&[d.clone(), c.clone(), b.clone(), a.clone()]), "one facade, newest first");
    assert_eq!(all, vec![d.clone(), c.clone(), b.clone(), a.clone()], "list returns the records as stored");
    let running = list(&*log, by(&facade, Some(SagaStatus::Running), 100)).await;
    assert_eq!(ids(&running), ids(&[c.clone(), a.clone()]), "facade and status");
    let limited = list(&*log, by(&facade, None, 2)).await;
    assert_eq!(ids(&limited), ids(&[d.clone(), c.clone()]), "the 2 newest");
    let done = list(&*log, by(&facade, Some(SagaStatus::Completed), 0)).await;
    assert_eq!(ids(&done), ids(&[b]), "limit 0 is no limit");
    let other = list(&*log, by(&other_facade, None, 10)).await;
    assert_eq!(other, vec![e], "the other facade");
    let filter = ListFilter { facade: None, status: Some(SagaStatus::Compensated), limit: 0, ..ListFilter::default() };
    let compensated = list(&*log, filter).await;
    assert!(compensated.contains(&d), "a status filter without a facade finds {}", d.request_id);
    assert!(compensated.iter().all(|r| r.status() == SagaStatus::Compensated), "only compensated sagas");
    let newest_first = compensated.windows(2).all(|w| w[0].created_ms >= w[1].created_ms);
    assert!(newest_first, "newest first across facades");
}

/// 50 sagas begun and run to the end by 50 concurrent tasks all land, each
/// with its full history and final data.
pub async fn concurrent_appends(harness: &dyn LogHarness) {
    const SAGAS: usize = 50;
    const STEPS: usize = 3;
    let log = fresh(harness).await;
    let facade = unique_name("Facade");
    let run = unique_name("saga");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..SAGAS {
        let (log, id, facade) = (log.clone(), format!("{run}-{i}"), facade.clone());
        tasks.spawn(async move {
            log.begin(new_saga(&id, &facade, STEPS)).await?;
            for index in 0..STEPS {
                log.append(&id, SagaEvent::StepStarted { index }).await?;
                tokio::task::yield_now().await;
                let data = json!({ "saga": i, "step": index });
                log.append(&id, SagaEvent::StepCompleted { index, attempts: 1, data }).await?;
            }
            Ok::<_, LogError>(())
        });
    }
    while let Some(joined) = within("50 sagas written concurrently", tasks.join_next()).await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("a concurrent write failed: {e}"),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    let mut ours = BTreeSet::new();
    for i in 0..SAGAS {
        let id = format!("{run}-{i}");
        let record = get(&*log, &id).await.unwrap_or_else(|| panic!("saga `{id}` was lost"));
        assert_eq!(record.status(), SagaStatus::Completed, "saga `{id}`");
        assert_eq!(record.completed, STEPS, "saga `{id}`");
        assert_eq!(record.history.len(), 1 + 2 * STEPS, "saga `{id}`: {:?}", record.history);
        assert_eq!(record.data, json!({ "saga": i, "step": STEPS - 1 }), "saga `{id}`");
        ours.insert(id);
    }
    assert!(unfinished_of(&*log, &ours).await.is_empty(), "every concurrent saga ended");
    let listed =
        list(&*log, ListFilter { facade: Some(facade), status: None, limit: 1000, ..ListFilter::default() }).await;
    assert_eq!(listed.len(), SAGAS, "list sees every concurrent saga");
}

/// Full forward and compensation histories round-trip exactly: history
/// entries, flow data JSON (large integers, unicode, nesting), failure with
/// and without a code, pending compensations, stuck and retried.
pub async fn histories_round_trip(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let facade = unique_name("Facade");

    // Forward, with awkward JSON and a sync saga without callback.
    let mut saga = new_saga(&unique_name("forward"), &facade, 2);
    saga.mode = Mode::Sync;
    saga.callback_url = None;
    saga.data = rich_data(0);
    let record = begin(&*log, saga).await;
    let record = append(&*log, &record, SagaEvent::StepStarted { index: 0 }).await;
    let record = append(&*log, &record, SagaEvent::StepCompleted { index: 0, attempts: 3, data: rich_data(1) }).await;
    let record = append(&*log, &record, SagaEvent::StepStarted { index: 1 }).await;
    let record = append(&*log, &record, SagaEvent::StepCompleted { index: 1, attempts: 1, data: rich_data(2) }).await;
    let error = Some("callback answered 503 — «service unavailable»".to_owned());
    let forward = append(&*log, &record, SagaEvent::CallbackDelivered { delivered: false, attempts: 5, error }).await;
    assert_eq!(
        events(&forward),
        ["started", "step_started", "step_completed", "step_started", "step_completed", "callback_failed"]
    );
    assert_eq!(forward.data, rich_data(2));

    // Compensation, through stuck and retried, of a throttling saga.
    let mut saga = new_saga(&unique_name("backward"), &facade, 4);
    saga.mode = Mode::Throttling;
    let record = begin(&*log, saga).await;
    let record = complete_steps(&*log, record, 2).await;
    let record = append(&*log, &record, SagaEvent::StepStarted { index: 2 }).await;
    let failure = Failure { step: 2, node: "CreatePayment".into(), error: "deadline exceeded ⏱".into(), code: None };
    let failed = SagaEvent::StepFailed {
        failure: failure.clone(),
        attempts: 4,
        compensate_failed: true,
        later_steps_in_doubt: false,
    };
    let record = append(&*log, &record, failed).await;
    assert_eq!(record.state, SagaState::Compensating { failure: failure.clone(), pending: vec![2, 1, 0] });
    let record = append(&*log, &record, SagaEvent::StepCompensated { index: 2, attempts: 1 }).await;
    let gave_up = SagaEvent::CompensationGaveUp { index: 1, attempts: 20, reason: "order service: unavailable".into() };
    let record = append(&*log, &record, gave_up).await;
    match &record.state {
        SagaState::Stuck { failure: f, pending, reason } => {
            assert_eq!((f, pending), (&failure, &vec![1, 0]));
            assert!(reason.contains("unavailable"), "{reason}");
        }
        other => panic!("not stuck: {other:?}"),
    }
    let record = append(&*log, &record, SagaEvent::RetryCompensation { by: None, reason: None }).await;
    assert_eq!(record.state, SagaState::Compensating { failure: failure.clone(), pending: vec![1, 0] });
    let record = append(&*log, &record, SagaEvent::StepCompensated { index: 1, attempts: 2 }).await;
    let record = append(&*log, &record, SagaEvent::StepCompensated { index: 0, attempts: 1 }).await;
    let delivered = SagaEvent::CallbackDelivered { delivered: true, attempts: 1, error: None };
    let backward = append(&*log, &record, delivered).await;
    assert_eq!(backward.state, SagaState::Compensated { failure });
    assert_eq!(
        events(&backward),
        [
            "started",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "step_started",
            "step_failed",
            "step_compensated",
            "compensation_gave_up",
            "retry_compensation",
            "step_compensated",
            "step_compensated",
            "callback_delivered",
        ]
    );
    for saga in [forward, backward] {
        assert_eq!(get(&*log, &saga.request_id).await, Some(saga), "the whole record round-trips");
    }
}

fn rich_data(step: u64) -> Value {
    json!({
        "step": step,
        "order_id": 9_007_199_254_740_993u64,
        "negative": -42,
        "price": 12.5,
        "name": "Zoë ✓ \"quoted\" \\ back\nslash",
        "nested": { "list": [1, null, true, "x", { "deep": [] }], "empty": {} },
        "absent": null,
    })
}

fn events(record: &SagaRecord) -> Vec<&str> {
    record.history.iter().map(|h| h.event.as_str()).collect()
}

/// Records outlive the process: after [`LogHarness::reopen`] every record is
/// there unchanged, unfinished ones are still unfinished and can carry on.
/// A backend that is not durable (reopen gives `None`) is checked up to the reopen.
pub async fn durable_across_reopen(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let facade = unique_name("Facade");
    let running = begin(&*log, new_saga(&unique_name("running"), &facade, 2)).await;
    let running = complete_steps(&*log, running, 1).await;
    let compensating = compensating(&*log, &unique_name("compensating"), &facade).await;
    let done = completed(&*log, &unique_name("completed"), &facade, 2).await;
    let stuck = compensating_then_stuck(&*log, &unique_name("stuck"), &facade).await;
    let before = [running.clone(), compensating.clone(), done, stuck];
    let ours: BTreeSet<String> = before.iter().map(|r| r.request_id.clone()).collect();
    for record in &before {
        assert_eq!(get(&*log, &record.request_id).await.as_ref(), Some(record), "before reopening");
    }
    drop(log);

    let Some(log) = within("the harness to reopen the log", harness.reopen()).await else {
        println!("the saga log under test is not durable: reopen skipped");
        return;
    };
    for record in &before {
        assert_eq!(get(&*log, &record.request_id).await.as_ref(), Some(record), "after reopening");
    }
    let unfinished = unfinished_of(&*log, &ours).await;
    let expected: BTreeMap<String, SagaRecord> =
        [&running, &compensating].into_iter().map(|r| (r.request_id.clone(), r.clone())).collect();
    assert_eq!(unfinished, expected, "unfinished after reopening: the running and the compensating saga");
    let listed =
        list(&*log, ListFilter { facade: Some(facade), status: None, limit: 10, ..ListFilter::default() }).await;
    assert_eq!(listed.len(), before.len(), "list after reopening");

    // Recovery carries on where the previous process stopped.
    let running = complete_steps(&*log, running, 2).await;
    assert_eq!(running.status(), SagaStatus::Completed);
    let compensating = append(&*log, &compensating, SagaEvent::StepCompensated { index: 1, attempts: 1 }).await;
    assert_eq!(compensating.next_compensation(), Some(0));
}

async fn compensating_then_stuck(log: &dyn SagaLog, id: &str, facade: &str) -> SagaRecord {
    let record = compensating(log, id, facade).await;
    let gave_up = SagaEvent::CompensationGaveUp { index: 1, attempts: 3, reason: "down".into() };
    append(log, &record, gave_up).await
}

/// Retention that prunes every ended saga at the next prune and keeps tombstones for an hour,
/// at most `max_tombstones` of them.
fn prune_all(max_tombstones: usize) -> Retention {
    Retention {
        max_age: std::time::Duration::from_secs(3600),
        max_ended: 0,
        tombstone_age: std::time::Duration::from_secs(3600),
        max_tombstones,
    }
}

/// A saga run to `status` (completed, compensated or stuck). The last append is checked by its
/// answer alone: a backend may prune the saga as it ends.
async fn ended(log: &dyn SagaLog, id: &str, facade: &str, status: SagaStatus) -> SagaRecord {
    let (before, last) = match status {
        SagaStatus::Completed => {
            let record = begin(log, new_saga(id, facade, 1)).await;
            let record = append(log, &record, SagaEvent::StepStarted { index: 0 }).await;
            (record, SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!({ "done": id }) })
        }
        SagaStatus::Compensated => {
            let record = compensating(log, id, facade).await;
            let record = append(log, &record, SagaEvent::StepCompensated { index: 1, attempts: 1 }).await;
            (record, SagaEvent::StepCompensated { index: 0, attempts: 1 })
        }
        SagaStatus::Stuck => {
            let record = compensating(log, id, facade).await;
            (record, SagaEvent::CompensationGaveUp { index: 1, attempts: 3, reason: "down".into() })
        }
        other => panic!("the check asked for a saga ended {other}"),
    };
    let what = format!("the append that ends `{id}`");
    let after = match within(&what, log.append(id, last.clone())).await {
        Ok(record) => record,
        Err(e) => panic!("{what} failed: {e}"),
    };
    let mut expected = before.clone();
    expected.apply(&last).unwrap_or_else(|e| panic!("the check's own event does not fit: {e}"));
    expected.updated_ms = after.updated_ms;
    if let Some(entry) = expected.history.last_mut() {
        entry.at_ms = after.updated_ms;
    }
    assert_eq!(after, expected, "{what} must apply SagaRecord::apply");
    assert_eq!(after.status(), status, "{what}");
    after
}

async fn prune(harness: &dyn LogHarness) {
    within("the harness to prune the log", harness.prune()).await;
}

/// Begins a saga whose request id must have been pruned, returning its tombstone.
async fn begin_pruned(log: &dyn SagaLog, saga: NewSaga) -> Tombstone {
    let what = format!("begin of the pruned `{}`", saga.request_id);
    match within(&what, log.begin(saga)).await {
        Ok(Begin::Pruned(tombstone)) => tombstone,
        other => panic!("{what}: expected Pruned, got {other:?}"),
    }
}

/// Checks `tombstone` is what pruning `record` (ended) at or before `pruned_by` leaves.
fn assert_tombstone_of(tombstone: &Tombstone, record: &SagaRecord, pruned_by: u64) {
    let expected = Tombstone {
        request_id: record.request_id.clone(),
        facade: record.facade.clone(),
        status: record.status(),
        ended_ms: record.updated_ms,
        pruned_ms: tombstone.pruned_ms,
    };
    assert_eq!(tombstone, &expected, "the tombstone of `{}`", record.request_id);
    assert!(
        (record.updated_ms..=pruned_by).contains(&tombstone.pruned_ms),
        "pruned at {} ms, after the saga ended ({} ms) and before the prune returned ({pruned_by} ms)",
        tombstone.pruned_ms,
        record.updated_ms
    );
}

/// A pruned saga leaves a tombstone: `begin` of its request id (with any data) answers
/// `Pruned` with the request id, facade, outcome (completed, compensated, stuck) and end time,
/// and starts nothing, however often asked; `get` answers `None`. Running sagas are not pruned
/// and new request ids still start.
pub async fn pruned_request_id_is_refused(harness: &dyn LogHarness) {
    let log = within("a log with retention from the harness", harness.fresh_with_retention(prune_all(1000))).await;
    let facade = unique_name("Facade");
    let done = ended(&*log, &unique_name("completed"), &facade, SagaStatus::Completed).await;
    let compensated = ended(&*log, &unique_name("compensated"), &facade, SagaStatus::Compensated).await;
    let stuck = ended(&*log, &unique_name("stuck"), &facade, SagaStatus::Stuck).await;
    let running = begin(&*log, new_saga(&unique_name("running"), &facade, 2)).await;
    prune(harness).await;
    let pruned_by = now_ms();

    for ended in [&done, &compensated, &stuck] {
        let id = &ended.request_id;
        assert_eq!(get(&*log, id).await, None, "get of the pruned `{id}`");
        let tombstone = begin_pruned(&*log, new_saga(id, &facade, 2)).await;
        assert_tombstone_of(&tombstone, ended, pruned_by);
        let mut retried = new_saga(id, &unique_name("OtherFacade"), 1);
        retried.data = json!("a retry with other data");
        assert_eq!(begin_pruned(&*log, retried).await, tombstone, "a second retry of `{id}`");
        assert_eq!(get(&*log, id).await, None, "no saga started for the pruned `{id}`");
    }
    let ours: BTreeSet<String> = [&done, &compensated, &stuck, &running].map(|r| r.request_id.clone()).into();
    let unfinished = unfinished_of(&*log, &ours).await;
    assert_eq!(unfinished.keys().collect::<Vec<_>>(), [&running.request_id], "only the running saga is unfinished");
    let listed =
        list(&*log, ListFilter { facade: Some(facade.clone()), status: None, limit: 0, ..ListFilter::default() }).await;
    assert_eq!(listed, vec![running.clone()], "a listing holds no pruned saga");
    match within("begin of the running saga", log.begin(new_saga(&running.request_id, &facade, 2))).await {
        Ok(Begin::Exists(record)) => assert_eq!(record, running, "a running saga is never pruned"),
        other => panic!("begin of the running `{}` must be Exists, got {other:?}", running.request_id),
    }
    begin(&*log, new_saga(&unique_name("new"), &facade, 1)).await;
}

/// Tombstones are pruned in their turn: past `tombstone_age` after their record's pruning, or
/// oldest first beyond `max_tombstones`; the request id of a tombstone gone starts a new saga.
/// With `max_tombstones` 0, pruning leaves none.
pub async fn tombstones_age_out(harness: &dyn LogHarness) {
    let retention = Retention { tombstone_age: std::time::Duration::ZERO, ..prune_all(1000) };
    let log = within("a log with retention from the harness", harness.fresh_with_retention(retention)).await;
    let facade = unique_name("Facade");
    let id = unique_name("aged");
    let done = ended(&*log, &id, &facade, SagaStatus::Completed).await;
    prune(harness).await;
    let tombstone = begin_pruned(&*log, new_saga(&id, &facade, 1)).await;
    assert_tombstone_of(&tombstone, &done, now_ms());
    // An age of zero: gone at the first prune a millisecond after its own.
    past(tombstone.pruned_ms).await;
    prune(harness).await;
    let again = begin(&*log, new_saga(&id, &facade, 1)).await;
    assert_eq!(get(&*log, &id).await, Some(again), "the request id starts a new saga once its tombstone is gone");
    drop(log);

    // At most two: the oldest goes first.
    let log = within("a log with retention from the harness", harness.fresh_with_retention(prune_all(2))).await;
    let mut sagas = Vec::new();
    for name in ["first", "second", "third"] {
        let record = ended(&*log, &unique_name(name), &facade, SagaStatus::Completed).await;
        prune(harness).await;
        let tombstone = begin_pruned(&*log, new_saga(&record.request_id, &facade, 1)).await;
        past(tombstone.pruned_ms).await;
        sagas.push(record);
    }
    prune(harness).await;
    begin(&*log, new_saga(&sagas[0].request_id, &facade, 1)).await;
    for kept in &sagas[1..] {
        let tombstone = begin_pruned(&*log, new_saga(&kept.request_id, &facade, 1)).await;
        assert_tombstone_of(&tombstone, kept, now_ms());
    }
    drop(log);

    // None at all.
    let log = within("a log with retention from the harness", harness.fresh_with_retention(prune_all(0))).await;
    let id = unique_name("untombed");
    ended(&*log, &id, &facade, SagaStatus::Compensated).await;
    prune(harness).await;
    assert_eq!(get(&*log, &id).await, None, "the saga was pruned");
    begin(&*log, new_saga(&id, &facade, 1)).await;
}

/// Tombstones outlive the process: after [`LogHarness::reopen`] a pruned request id is still
/// refused with the same tombstone. A backend that is not durable is checked up to the reopen.
pub async fn tombstones_survive_reopen(harness: &dyn LogHarness) {
    let log = within("a log with retention from the harness", harness.fresh_with_retention(prune_all(1000))).await;
    let facade = unique_name("Facade");
    let done = ended(&*log, &unique_name("completed"), &facade, SagaStatus::Completed).await;
    let stuck = ended(&*log, &unique_name("stuck"), &facade, SagaStatus::Stuck).await;
    prune(harness).await;
    let pruned_by = now_ms();
    let mut tombstones = Vec::new();
    for ended in [&done, &stuck] {
        let tombstone = begin_pruned(&*log, new_saga(&ended.request_id, &facade, 1)).await;
        assert_tombstone_of(&tombstone, ended, pruned_by);
        tombstones.push(tombstone);
    }
    drop(log);

    let Some(log) = within("the harness to reopen the log", harness.reopen()).await else {
        println!("the saga log under test is not durable: reopen skipped");
        return;
    };
    for tombstone in tombstones {
        let id = tombstone.request_id.clone();
        assert_eq!(begin_pruned(&*log, new_saga(&id, &facade, 1)).await, tombstone, "after reopening");
        assert_eq!(get(&*log, &id).await, None, "no saga started for `{id}` after reopening");
    }
}
