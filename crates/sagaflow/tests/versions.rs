//! Deploying a changed flow while its sagas are in flight: each saga finishes
//! on the flow version it started on, a start that would strand sagas is
//! refused (or leaves them waiting, if asked), and flow data that no longer
//! decodes stops its saga stuck.

mod support;

use std::sync::{Arc, Mutex};

use sagaflow::log::{FlowVersion, NewSaga, SagaEvent, SagaLog, SagaState};
use sagaflow::{
    Error, Failure, Flow, MemoryBroker, MemorySagaLog, MissingVersion, Mode, Node, NodeError, Options, Orchestrator,
    Outcome, SagaRecord, SagaStatus, Step, VersionRole, now_ms,
};
use serde_json::{Value, json};
use support::{Scripted, calls, taken, wait_ended};

const F: &str = "Booking";

type Calls = Arc<Mutex<Vec<String>>>;

/// The flow as first deployed.
fn v1(c: &Calls) -> Flow<Vec<String>> {
    Flow::new().node(Scripted::new("A", c)).node(Scripted::new("B", c)).node(Scripted::new("C", c)).label("v1")
}

/// The flow as deployed next: `D` added, `A` and `B` swapped.
fn v2(c: &Calls) -> Flow<Vec<String>> {
    Flow::new()
        .node(Scripted::new("B", c))
        .node(Scripted::new("A", c))
        .node(Scripted::new("D", c))
        .node(Scripted::new("C", c))
        .label("v2")
}

fn v1_version() -> FlowVersion {
    v1(&calls()).version()
}

/// Writes a saga of `version` as a process that crashed would have left it:
/// `completed` steps done (each appending its node's name of v1), then, with
/// `failed`, the next step refused.
async fn in_flight(
    log: &MemorySagaLog,
    id: &str,
    mode: Mode,
    version: Option<FlowVersion>,
    completed: usize,
    failed: bool,
) -> SagaRecord {
    let names = ["A", "B", "C"];
    log.begin(NewSaga {
        request_id: id.into(),
        facade: F.into(),
        mode,
        steps: 3,
        data: json!([]),
        deadline_ms: now_ms() + 60_000,
        callback_url: None,
        owner: None,
        version,
    })
    .await
    .unwrap();
    let mut record = None;
    for index in 0..completed {
        log.append(id, SagaEvent::StepStarted { index }).await.unwrap();
        let data = json!(names[..=index]);
        record = Some(log.append(id, SagaEvent::StepCompleted { index, attempts: 1, data }).await.unwrap());
    }
    if failed {
        let failure = Failure { step: completed, node: names[completed].into(), error: "no".into(), code: Some(9) };
        let event =
            SagaEvent::StepFailed { failure, attempts: 1, compensate_failed: false, later_steps_in_doubt: false };
        record = Some(log.append(id, event).await.unwrap());
    }
    record.unwrap_or(log.get(id).await.unwrap().unwrap())
}

fn undone(c: &Calls) -> Vec<String> {
    taken(c).into_iter().filter(|call| call.starts_with("undo")).collect()
}

fn run(c: &Calls) -> Vec<String> {
    taken(c).into_iter().filter(|call| !call.starts_with("undo")).collect()
}

async fn start(
    log: &Arc<MemorySagaLog>,
    mode: Mode,
    flow: Flow<Vec<String>>,
    options: Options,
) -> Result<Orchestrator, Error> {
    let builder = Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone()).options(options);
    match mode {
        Mode::Sync => builder.sync(F, flow),
        Mode::Async => builder.asynchronous(F, flow),
        Mode::Throttling => builder.throttling(F, flow),
    }
    .start()
    .await
}

async fn sagas_in_flight_finish_on_their_version(mode: Mode) {
    let log = Arc::new(MemorySagaLog::new());
    // Compensating: B then A to undo (v2 by position would undo A then B).
    in_flight(&log, "undoing", mode, Some(v1_version()), 2, true).await;
    // Running at step 1: B then C to run (v2 by position would run A, D, C).
    in_flight(&log, "running", mode, Some(v1_version()), 1, false).await;
    let c = calls();
    let o = start(&log, mode, v2(&c).keep(v1(&c)), Options::default()).await.unwrap();

    assert_eq!(wait_ended(&o, "undoing").await.status(), SagaStatus::Compensated);
    let running = wait_ended(&o, "running").await;
    assert_eq!(running.status(), SagaStatus::Completed);
    assert_eq!(running.data, json!(["A", "B", "C"]));
    assert_eq!(undone(&c), ["undo B#1", "undo A#1"]);
    assert_eq!(run(&c), ["B#1", "C#1"]);

    // New sagas start on the current version.
    let data = match mode {
        Mode::Async => {
            o.submit(F, "new", Vec::<String>::new(), None).await.unwrap();
            let record = wait_ended(&o, "new").await;
            serde_json::from_value(record.data).unwrap()
        }
        _ => match o.run(F, "new", Vec::<String>::new()).await.unwrap() {
            Outcome::Completed(data) => data,
            other => panic!("{other:?}"),
        },
    };
    assert_eq!(data, ["B", "A", "D", "C"]);
    let new = o.saga("new").await.unwrap().unwrap();
    assert_eq!(new.version.and_then(|v| v.label).as_deref(), Some("v2"));
    let info = o.flows().remove(0);
    assert_eq!((info.version.label.as_deref(), info.kept), (Some("v2"), vec![v1_version()]));
    assert!(o.waiting_for_versions().await.unwrap().is_empty());
    o.shutdown().await;
}

#[tokio::test]
async fn a_sync_saga_of_a_reordered_flow_finishes_on_the_nodes_it_started_with() {
    sagas_in_flight_finish_on_their_version(Mode::Sync).await;
}

#[tokio::test]
async fn an_async_saga_of_a_reordered_flow_finishes_on_the_nodes_it_started_with() {
    sagas_in_flight_finish_on_their_version(Mode::Async).await;
}

#[tokio::test]
async fn a_throttled_saga_of_a_reordered_flow_finishes_on_the_nodes_it_started_with() {
    sagas_in_flight_finish_on_their_version(Mode::Throttling).await;
}

#[tokio::test]
async fn a_start_that_would_strand_sagas_is_refused_naming_their_version() {
    let log = Arc::new(MemorySagaLog::new());
    in_flight(&log, "r1", Mode::Sync, Some(v1_version()), 2, true).await;
    in_flight(&log, "r2", Mode::Sync, Some(v1_version()), 1, false).await;
    let c = calls();
    let err = start(&log, Mode::Sync, v2(&c), Options::default()).await.unwrap_err();
    let Error::MissingVersions { missing } = &err else { panic!("{err:?}") };
    assert_eq!(
        missing,
        &[MissingVersion {
            facade: F.into(),
            version: Some(v1_version()),
            sagas: 2,
            request_ids: vec!["r1".into(), "r2".into()],
        }]
    );
    let text = err.to_string();
    let named = format!("facade `{F}` version v1 ({}): 2 unfinished sagas", v1_version().fingerprint);
    assert!(text.contains(&named), "{text}");
    assert!(text.contains("Options::start_with_missing_versions"), "{text}");
    assert!(taken(&c).is_empty(), "nothing ran: {:?}", taken(&c));

    // A facade gone altogether strands its sagas just the same, versioned or not.
    let err = Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone())
        .sync("Other", v2(&c))
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&named), "{err}");
}

#[tokio::test]
async fn sagas_left_waiting_for_their_version_end_once_it_is_registered_again() {
    let log = Arc::new(MemorySagaLog::new());
    let before = in_flight(&log, "old", Mode::Sync, Some(v1_version()), 2, true).await;
    let unversioned = in_flight(&log, "older", Mode::Sync, None, 1, false).await;
    let c = calls();
    let anyway = Options { start_with_missing_versions: true, ..Options::default() };
    let o = start(&log, Mode::Sync, v2(&c), anyway).await.unwrap();
    let waiting = o.waiting_for_versions().await.unwrap();
    let per_version: Vec<_> = waiting.iter().map(|w| (w.version.clone(), w.request_ids.clone())).collect();
    // A saga that recorded no version runs on a registered version with its
    // number of steps: v2 has four, so it waits too.
    assert_eq!(per_version, [(None, vec!["older".to_owned()]), (Some(v1_version()), vec!["old".to_owned()])]);
    assert_eq!(o.saga("old").await.unwrap().unwrap(), before, "left as it was");
    assert_eq!(o.saga("older").await.unwrap().unwrap(), unversioned, "left as it was");
    // The admin view: v2 current with nothing unfinished, v1 and the unversioned saga missing.
    let uses: Vec<_> = o
        .version_use()
        .await
        .unwrap()
        .into_iter()
        .map(|u| (u.version.map(|v| v.fingerprint), u.role, u.unfinished))
        .collect();
    let v2_fingerprint = v2(&calls()).version().fingerprint;
    assert!(uses.contains(&(Some(v2_fingerprint.clone()), VersionRole::Current, 0)), "{uses:?}");
    assert!(uses.contains(&(Some(v1_version().fingerprint), VersionRole::Missing, 1)), "{uses:?}");
    assert!(uses.contains(&(None, VersionRole::Missing, 1)), "{uses:?}");
    assert_eq!(
        o.run(F, "new", Vec::<String>::new()).await.unwrap(),
        Outcome::Completed(vec!["B".into(), "A".into(), "D".into(), "C".into()])
    );
    // An operator cannot drive it either, until its version is back.
    let err = o.abort("old", "ops", "try").await.unwrap_err();
    assert!(matches!(err, Error::MissingVersions { .. }), "{err:?}");
    o.shutdown().await;

    let c = calls();
    let o = start(&log, Mode::Sync, v2(&c).keep(v1(&c)), Options::default()).await.unwrap();
    assert_eq!(wait_ended(&o, "old").await.status(), SagaStatus::Compensated);
    assert_eq!(wait_ended(&o, "older").await.status(), SagaStatus::Completed);
    // v1 kept, its sagas ended: it can be retired.
    let uses: Vec<_> = o
        .version_use()
        .await
        .unwrap()
        .into_iter()
        .map(|u| (u.version.map(|v| v.fingerprint), u.role, u.unfinished))
        .collect();
    assert_eq!(uses.len(), 2, "{uses:?}");
    assert!(uses.contains(&(Some(v1_version().fingerprint), VersionRole::Kept, 0)), "{uses:?}");
    assert_eq!(undone(&c), ["undo B#1", "undo A#1"]);
    assert_eq!(run(&c), ["B#1", "C#1"], "the unversioned saga ran on v1, the version with its three steps");
    assert!(o.waiting_for_versions().await.unwrap().is_empty());
    o.shutdown().await;
}

/// A node over untyped flow data: a deploy whose data type reads what an
/// earlier one wrote.
struct Lenient(&'static str, Calls);

#[sagaflow::async_trait]
impl Node<Value> for Lenient {
    fn name(&self) -> &str {
        self.0
    }
    async fn action(&self, _: &Step, _: &mut Value) -> Result<(), NodeError> {
        Ok(())
    }
    async fn compensate(&self, _: &Step, _: &Value) -> Result<(), NodeError> {
        self.1.lock().unwrap().push(format!("undo {}", self.0));
        Ok(())
    }
}

async fn undecodable_data_stops_the_saga_stuck(mode: Mode) {
    let log = Arc::new(MemorySagaLog::new());
    // Written by a deploy whose data was an object; the flow now reads a list.
    log.begin(NewSaga {
        request_id: "bad".into(),
        facade: F.into(),
        mode,
        steps: 3,
        data: json!({ "items": [] }),
        deadline_ms: now_ms() + 60_000,
        callback_url: None,
        owner: None,
        version: Some(v1_version()),
    })
    .await
    .unwrap();
    log.append("bad", SagaEvent::StepStarted { index: 0 }).await.unwrap();
    let data = json!({ "items": ["A"] });
    log.append("bad", SagaEvent::StepCompleted { index: 0, attempts: 1, data }).await.unwrap();

    let c = calls();
    let o = start(&log, mode, v1(&c), Options::default()).await.unwrap();
    let stuck = wait_ended(&o, "bad").await;
    let SagaState::Stuck { reason, pending, .. } = &stuck.state else { panic!("{stuck:?}") };
    assert!(reason.contains("flow data of saga `bad` is not valid"), "{reason}");
    assert_eq!(pending, &vec![0]);
    assert!(taken(&c).is_empty(), "no node ran: {:?}", taken(&c));

    // Retried with the same type: stuck again, for the same reason.
    o.retry_stuck("bad", "ops").await.unwrap();
    let again = wait_ended(&o, "bad").await;
    assert_eq!(again.status(), SagaStatus::Stuck);
    assert_eq!(again.history.iter().filter(|h| h.event == sagaflow::HistoryEvent::Halted).count(), 2);
    o.shutdown().await;

    // Retried after a deploy that reads the data: compensated.
    let c = calls();
    let lenient: Flow<Value> = Flow::new()
        .node(Lenient("A", c.clone()))
        .node(Lenient("B", c.clone()))
        .node(Lenient("C", c.clone()))
        .label("v1-lenient");
    let builder = Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone());
    let o = match mode {
        Mode::Async => builder.asynchronous(F, lenient),
        _ => builder.sync(F, lenient),
    }
    .start()
    .await
    .unwrap();
    o.retry_stuck("bad", "ops").await.unwrap();
    assert_eq!(wait_ended(&o, "bad").await.status(), SagaStatus::Compensated);
    assert_eq!(taken(&c), ["undo A"]);
    o.shutdown().await;
}

#[tokio::test]
async fn a_sync_saga_whose_data_no_longer_decodes_ends_stuck_and_retriable() {
    undecodable_data_stops_the_saga_stuck(Mode::Sync).await;
}

#[tokio::test]
async fn an_async_saga_whose_data_no_longer_decodes_ends_stuck_and_retriable() {
    undecodable_data_stops_the_saga_stuck(Mode::Async).await;
}
