//! Parallel stages in a sync flow: branches at once, their data merged,
//! compensation by the graph, recovery mid-stage; refused where hops travel.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sagaflow::{
    Error, Flow, MemoryBroker, MemorySagaLog, Mode, NewSaga, Orchestrator, Outcome, Parallel, RetryPolicy, SagaEvent,
    SagaLog, SagaStatus, StepStatus,
};
use serde_json::json;
use support::{Act, Scripted, calls, taken, unavailable, wait_ended};
use tokio::time::Instant;

const F: &str = "Trip";

fn policy(attempts: u32) -> RetryPolicy {
    RetryPolicy::default().attempts(attempts).backoff(Duration::from_millis(100), Duration::from_secs(10)).jitter(0.0)
}

/// Each branch appends its name to its copy of the data; the merge keeps
/// every name once, in branch order.
fn merge(all: &mut Vec<String>, branch: Vec<String>) {
    for name in branch {
        if !all.contains(&name) {
            all.push(name);
        }
    }
}

fn trip(a: Scripted, branches: [Scripted; 3], e: Scripted) -> Flow<Vec<String>> {
    let [b, c, d] = branches;
    Flow::new()
        .node(a)
        .parallel(Parallel::new().branch(b).branch(c).branch(d).merge(merge))
        .node(e)
        .retry(policy(3))
        .compensation_retry(policy(3))
}

async fn start(log: Arc<MemorySagaLog>, flow: Flow<Vec<String>>) -> Orchestrator {
    Orchestrator::builder(Arc::new(MemoryBroker::new()), log).sync(F, flow).start().await.expect("orchestrator starts")
}

#[tokio::test(start_paused = true)]
async fn branches_run_at_once_and_the_next_step_sees_their_merged_data() {
    let c = calls();
    let slow = || Act::Sleep(Duration::from_millis(100));
    let flow = trip(
        Scripted::new("a", &c),
        [
            Scripted::new("b", &c).always(slow()),
            Scripted::new("c", &c).always(slow()),
            Scripted::new("d", &c).always(slow()),
        ],
        Scripted::new("e", &c),
    );
    let o = start(Arc::new(MemorySagaLog::new()), flow).await;
    let started = Instant::now();
    let outcome = o.run(F, "r1", Vec::<String>::new()).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(150), "three 100 ms branches took {:?}", started.elapsed());
    assert_eq!(outcome, Outcome::Completed(["a", "b", "c", "d", "e"].map(String::from).to_vec()));
    let record = o.saga("r1").await.unwrap().unwrap();
    assert_eq!(record.status(), SagaStatus::Completed);
    assert!(record.step_states.iter().all(|s| s.status == StepStatus::Done && s.output.is_none()));
    let events: Vec<_> = record.history.iter().map(|h| h.event.as_str()).collect();
    assert_eq!(events.iter().filter(|e| **e == "branches_joined").count(), 1, "{events:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_branch_cancels_its_running_sibling_and_compensates_the_graph_backwards() {
    let c = calls();
    let flow = trip(
        Scripted::new("a", &c),
        [
            Scripted::new("b", &c),
            // Fails after three attempts 100 ms apart: its effect is unknown, so it is undone too.
            Scripted::new("c", &c).always(Act::Fail(unavailable())),
            // Still running when c gives up: cancelled, in doubt.
            Scripted::new("d", &c).always(Act::Sleep(Duration::from_secs(3))),
        ],
        Scripted::new("e", &c),
    );
    let o = start(Arc::new(MemorySagaLog::new()), flow).await;
    let started = Instant::now();
    let Outcome::Compensated(failure) = o.run(F, "r1", Vec::<String>::new()).await.unwrap() else {
        panic!("not compensated")
    };
    assert!(started.elapsed() < Duration::from_secs(1), "d was not cancelled: {:?}", started.elapsed());
    assert_eq!((failure.step, failure.node.as_str()), (2, "c"));
    let calls = taken(&c);
    assert!(!calls.iter().any(|c| c.starts_with('e')), "the step after the stage never ran: {calls:?}");
    let undone: Vec<_> = calls.iter().filter(|c| c.starts_with("undo")).map(String::as_str).collect();
    assert_eq!(undone.len(), 4, "{calls:?}");
    assert_eq!(undone[3], "undo a#1", "a is undone after every branch that depends on it: {calls:?}");
    let mut branches = undone[..3].to_vec();
    branches.sort();
    assert_eq!(branches, ["undo b#1", "undo c#1", "undo d#1"]);
    let record = o.saga("r1").await.unwrap().unwrap();
    let statuses: Vec<_> = record.step_states.iter().map(|s| s.status).collect();
    use StepStatus::*;
    assert_eq!(statuses, [Compensated, Compensated, Compensated, Compensated, Pending]);
}

#[tokio::test(start_paused = true)]
async fn a_saga_recovered_mid_stage_runs_only_the_branches_not_done_and_merges_all() {
    let c = calls();
    let flow = || {
        trip(
            Scripted::new("a", &c),
            [Scripted::new("b", &c), Scripted::new("c", &c), Scripted::new("d", &c)],
            Scripted::new("e", &c),
        )
    };
    // As a crash left it: a done, b done with its data, c started.
    let log = Arc::new(MemorySagaLog::new());
    let saga = NewSaga {
        request_id: "r1".into(),
        facade: F.into(),
        mode: Mode::Sync,
        steps: 5,
        data: json!([]),
        deadline_ms: sagaflow::now_ms() + 60_000,
        callback_url: None,
        owner: None,
        version: Some(flow().version()),
    };
    log.begin(saga).await.unwrap();
    for event in [
        SagaEvent::StepStarted { index: 0 },
        SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(["a"]) },
        SagaEvent::StepStarted { index: 1 },
        SagaEvent::StepStarted { index: 2 },
        SagaEvent::StepCompleted { index: 1, attempts: 1, data: json!(["a", "b"]) },
    ] {
        log.append("r1", event).await.unwrap();
    }
    let o = start(log, flow()).await;
    let record = wait_ended(&o, "r1").await;
    assert_eq!(record.status(), SagaStatus::Completed);
    assert_eq!(record.data, json!(["a", "b", "c", "d", "e"]), "b's recorded data is merged");
    let mut ran = taken(&c);
    ran.sort();
    assert_eq!(ran, ["c#1", "d#1", "e#1"], "b is not run again");
}

#[tokio::test]
async fn a_parallel_flow_is_refused_where_hops_travel_over_the_broker() {
    let c = calls();
    for mode in [Mode::Async, Mode::Throttling] {
        let flow = trip(
            Scripted::new("a", &c),
            [Scripted::new("b", &c), Scripted::new("c", &c), Scripted::new("d", &c)],
            Scripted::new("e", &c),
        );
        let builder = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()));
        let builder = match mode {
            Mode::Async => builder.asynchronous(F, flow),
            _ => builder.throttling(F, flow),
        };
        let Err(Error::Config(reason)) = builder.start().await else { panic!("{mode} started a parallel flow") };
        assert!(reason.contains("parallel stages, which run in sync flows only"), "{reason}");
    }
}

#[tokio::test]
async fn a_parallel_stage_without_a_merge_or_with_one_branch_is_refused() {
    let c = calls();
    let no_merge = Flow::new().parallel(Parallel::new().branch(Scripted::new("b", &c)).branch(Scripted::new("c", &c)));
    let one = Flow::new().parallel(Parallel::new().branch(Scripted::new("b", &c)).merge(merge));
    for (flow, why) in [(no_merge, "has no merge"), (one, "needs two branches")] {
        let builder = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()));
        let Err(Error::Config(reason)) = builder.sync(F, flow).start().await else { panic!("started") };
        assert!(reason.contains(why), "{reason}");
    }
}
