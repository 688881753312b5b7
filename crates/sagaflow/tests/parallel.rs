//! Parallel stages: branches at once (in-process, or one hop each), their
//! data merged once, compensation by the graph, recovery mid-stage.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sagaflow::broker::{Broker, Message, REQUEST_ID_HEADER};
use sagaflow::log::{NewSaga, SagaEvent, SagaLog, StepStatus};
use sagaflow::{
    Error, Flow, MemoryBroker, MemorySagaLog, Mode, Options, Orchestrator, Outcome, Parallel, RetryPolicy, SagaStatus,
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

/// A compensation that takes 100 ms.
fn undo() -> Act {
    Act::Sleep(Duration::from_millis(100))
}

#[tokio::test(start_paused = true)]
async fn a_failed_branch_cancels_its_running_sibling_and_compensates_the_graph_backwards() {
    let c = calls();
    let flow = trip(
        Scripted::new("a", &c),
        [
            Scripted::new("b", &c).compensation_always(undo()),
            // Fails after three attempts 100 and 200 ms apart: its effect is unknown, so it is undone too.
            Scripted::new("c", &c).always(Act::Fail(unavailable())).compensation_always(undo()),
            // Still running when c gives up: cancelled, in doubt.
            Scripted::new("d", &c).always(Act::Sleep(Duration::from_secs(3))).compensation_always(undo()),
        ],
        Scripted::new("e", &c),
    );
    let o = start(Arc::new(MemorySagaLog::new()), flow).await;
    let started = Instant::now();
    let Outcome::Compensated(failure) = o.run(F, "r1", Vec::<String>::new()).await.unwrap() else {
        panic!("not compensated")
    };
    // 300 ms of attempts, then the three branches' 100 ms compensations at once (not 300 ms in turn).
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
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

/// A branch that takes `ms` milliseconds.
fn branch(name: &'static str, c: &support::Calls, ms: u64) -> Scripted {
    Scripted::new(name, c).always(Act::Sleep(Duration::from_millis(ms)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hops_run_each_branch_and_exactly_one_continues_after_the_last_despite_duplicates() {
    const SAGAS: usize = 20;
    let c = calls();
    let flow = || {
        trip(
            Scripted::new("a", &c),
            [branch("b", &c, 3), branch("c", &c, 1), branch("d", &c, 2)],
            Scripted::new("e", &c),
        )
    };
    let (broker, log) = (MemoryBroker::new(), Arc::new(MemorySagaLog::new()));
    let options = Options { default_concurrency: 8, ..Options::default() };
    // Two orchestrators on one broker and log: competing consumers of every hop topic.
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let o = Orchestrator::builder(Arc::new(broker.clone()), log.clone())
            .options(options.clone())
            .asynchronous(F, flow())
            .start()
            .await
            .expect("orchestrator starts");
        replicas.push(o);
    }
    let info = replicas[0].flows().into_iter().find(|f| f.facade == F).unwrap();
    let fingerprint = flow().version().fingerprint;
    for n in 0..SAGAS {
        let id = format!("r{n}");
        replicas[n % 2].submit(F, &id, Vec::<String>::new(), None).await.unwrap();
        // A copy of every branch's hop, as a broker redelivers one.
        for step in 1..4 {
            let hop = json!({ "request_id": id, "facade": F, "step": step, "data": ["a"], "version": fingerprint });
            let message = Message::new(info.topics[step].clone(), serde_json::to_vec(&hop).unwrap())
                .header(REQUEST_ID_HEADER, id.as_str());
            broker.publish(message).await.unwrap();
        }
    }
    for n in 0..SAGAS {
        let record = wait_ended(&replicas[0], &format!("r{n}")).await;
        assert_eq!(record.status(), SagaStatus::Completed, "{record:?}");
        assert_eq!(record.data, json!(["a", "b", "c", "d", "e"]));
        let joins = record.history.iter().filter(|h| h.event == sagaflow::HistoryEvent::BranchesJoined).count();
        assert_eq!(joins, 1, "one merge recorded for r{n}");
    }
    let after = taken(&c);
    assert_eq!(after.iter().filter(|c| c.starts_with("e#")).count(), SAGAS, "one continuation per saga: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_parallel_flow_answers_its_caller_and_compensates_a_failed_branch() {
    let c = calls();
    let flow = trip(
        Scripted::new("a", &c),
        [branch("b", &c, 1), Scripted::new("c", &c).always(Act::Fail(support::refused())), branch("d", &c, 1)],
        Scripted::new("e", &c),
    );
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .throttling(F, flow)
        .start()
        .await
        .expect("orchestrator starts");
    let Outcome::Compensated(failure) = o.run(F, "r1", Vec::<String>::new()).await.unwrap() else {
        panic!("not compensated")
    };
    assert_eq!(failure.node, "c");
    let record = wait_ended(&o, "r1").await;
    assert_eq!(record.step_status(2), StepStatus::Failed);
    assert_eq!(record.step_status(0), StepStatus::Compensated);
    let calls = taken(&c);
    assert_eq!(calls.last().map(String::as_str), Some("undo a#1"), "a is undone last: {calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("e#")), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_sagas_recovered_mid_stage_send_the_hops_not_done_or_merge_what_is() {
    let c = calls();
    let flow = || {
        trip(
            Scripted::new("a", &c),
            [Scripted::new("b", &c), Scripted::new("c", &c), Scripted::new("d", &c)],
            Scripted::new("e", &c),
        )
    };
    // As a crash left it, its hops lost with the process: b done, c started, d not.
    let log = Arc::new(MemorySagaLog::new());
    let saga = NewSaga {
        request_id: "r1".into(),
        facade: F.into(),
        mode: Mode::Async,
        steps: 5,
        data: json!([]),
        deadline_ms: sagaflow::now_ms() + 60_000,
        callback_url: None,
        owner: None,
        version: Some(flow().version()),
    };
    log.begin(saga.clone()).await.unwrap();
    for event in [
        SagaEvent::StepStarted { index: 0 },
        SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(["a"]) },
        SagaEvent::StepStarted { index: 1 },
        SagaEvent::StepStarted { index: 2 },
        SagaEvent::StepCompleted { index: 1, attempts: 1, data: json!(["a", "b"]) },
    ] {
        log.append("r1", event).await.unwrap();
    }
    // And one whose every branch was recorded, the merge not.
    log.begin(NewSaga { request_id: "r2".into(), ..saga }).await.unwrap();
    log.append("r2", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(["a"]) }).await.unwrap();
    for (index, name) in [(3, "d"), (1, "b"), (2, "c")] {
        let data = json!(["a", name]);
        log.append("r2", SagaEvent::StepCompleted { index, attempts: 1, data }).await.unwrap();
    }
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log)
        .asynchronous(F, flow())
        .start()
        .await
        .expect("orchestrator starts");
    for id in ["r1", "r2"] {
        let record = wait_ended(&o, id).await;
        assert_eq!(record.status(), SagaStatus::Completed, "{id}");
        assert_eq!(record.data, json!(["a", "b", "c", "d", "e"]), "{id}: merged in branch order");
    }
    let mut ran = taken(&c);
    ran.sort();
    assert_eq!(ran, ["c#1", "d#1", "e#1", "e#1"], "no branch recorded done is run again");
}

#[tokio::test]
async fn a_saga_begun_before_versions_is_never_run_on_a_parallel_flow_of_its_length() {
    let c = calls();
    let log = Arc::new(MemorySagaLog::new());
    let saga = NewSaga {
        request_id: "old".into(),
        facade: F.into(),
        mode: Mode::Sync,
        steps: 5,
        data: json!([]),
        deadline_ms: sagaflow::now_ms() + 60_000,
        callback_url: None,
        owner: None,
        version: None,
    };
    log.begin(saga).await.unwrap();
    let flow = trip(
        Scripted::new("a", &c),
        [Scripted::new("b", &c), Scripted::new("c", &c), Scripted::new("d", &c)],
        Scripted::new("e", &c),
    );
    let started = Orchestrator::builder(Arc::new(MemoryBroker::new()), log).sync(F, flow).start().await;
    let Err(Error::MissingVersions { missing }) = started else { panic!("started on a flow of another shape") };
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(taken(&c).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_data_over_the_limit_fails_the_stage_and_compensates_every_branch() {
    for mode in [Mode::Sync, Mode::Throttling] {
        let c = calls();
        // Each branch's data (`["a","b"]`, 9 bytes) fits; the merge's (`["a","b","c","d"]`, 17) does not.
        let flow = trip(
            Scripted::new("a", &c),
            [Scripted::new("b", &c), Scripted::new("c", &c), Scripted::new("d", &c)],
            Scripted::new("e", &c),
        )
        .max_data_bytes(12);
        let builder = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()));
        let builder = if mode == Mode::Sync { builder.sync(F, flow) } else { builder.throttling(F, flow) };
        let o = builder.start().await.expect("orchestrator starts");
        let Outcome::Compensated(failure) = o.run(F, "r1", Vec::<String>::new()).await.unwrap() else {
            panic!("{mode}: not compensated")
        };
        assert_eq!((failure.step, failure.node.as_str()), (1, "b"), "{mode}");
        assert!(failure.error.contains("over the flow's limit of 12 bytes"), "{mode}: {failure}");
        let calls = taken(&c);
        assert_eq!(calls.last().map(String::as_str), Some("undo a#1"), "{mode}: {calls:?}");
        let undone = calls.iter().filter(|c| c.starts_with("undo")).count();
        assert_eq!(undone, 4, "{mode}: every branch ran, so every branch is undone: {calls:?}");
        assert!(!calls.iter().any(|c| c.starts_with("e#")), "{mode}: {calls:?}");
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
