//! The sync flow end to end on the in-memory broker and log, with controlled time.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sagaflow::log::{Begin, ListFilter, LogError, NewSaga, SagaEvent, SagaLog, SagaState};
use sagaflow::{
    Error, Flow, MemoryBroker, MemorySagaLog, Mode, Orchestrator, Outcome, RetryPolicy, SagaRecord, SagaStatus,
};
use support::{Act, Scripted, calls, refused, taken, unavailable, wait_ended};
use tokio::time::Instant;

const F: &str = "Booking";

fn policy(attempts: u32) -> RetryPolicy {
    RetryPolicy::default().attempts(attempts).backoff(Duration::from_millis(100), Duration::from_secs(10)).jitter(0.0)
}

async fn start(flow: Flow<Vec<String>>) -> Orchestrator {
    Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .sync(F, flow.retry(policy(3)).compensation_retry(policy(3)))
        .start()
        .await
        .expect("orchestrator starts")
}

#[tokio::test(start_paused = true)]
async fn nodes_run_in_order_and_see_each_others_changes() {
    let c = calls();
    let o =
        start(Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c)).node(Scripted::new("c", &c))).await;
    let outcome = o.run(F, "r1", Vec::<String>::new()).await.unwrap();
    assert_eq!(outcome, Outcome::Completed(vec!["a".into(), "b".into(), "c".into()]));
    assert_eq!(taken(&c), ["a#1", "b#1", "c#1"]);
    let record = o.saga("r1").await.unwrap().unwrap();
    assert_eq!(record.state, SagaState::Completed);
    assert_eq!(record.completed, 3);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_compensates_completed_steps_in_reverse() {
    let c = calls();
    let o = start(
        Flow::new()
            .node(Scripted::new("a", &c))
            .node(Scripted::new("b", &c))
            .node(Scripted::new("c", &c).always(Act::Fail(refused()))),
    )
    .await;
    let Outcome::Compensated(failure) = o.run(F, "r1", Vec::<String>::new()).await.unwrap() else {
        panic!("not compensated")
    };
    assert_eq!((failure.step, failure.node.as_str(), failure.code), (2, "c", Some(9)));
    // A refusal is not retried, and the refused step itself had no effect to undo.
    assert_eq!(taken(&c), ["a#1", "b#1", "c#1", "undo b#1", "undo a#1"]);
    assert_eq!(o.saga("r1").await.unwrap().unwrap().status(), SagaStatus::Compensated);
}

#[tokio::test(start_paused = true)]
async fn retryable_errors_are_retried_with_exponential_backoff() {
    let c = calls();
    let o = start(
        Flow::new()
            .node(Scripted::new("a", &c).actions([Act::Fail(unavailable()), Act::Fail(unavailable())]))
            .node(Scripted::new("b", &c)),
    )
    .await;
    let started = Instant::now();
    let outcome = o.run(F, "r1", Vec::<String>::new()).await.unwrap();
    assert_eq!(outcome, Outcome::Completed(vec!["a".into(), "b".into()]));
    // Two retries: 100 ms, then 200 ms (jitter off).
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(taken(&c), ["a#1", "a#2", "a#3", "b#1"]);
    let record = o.saga("r1").await.unwrap().unwrap();
    let completed = record.history.iter().find(|h| h.event == sagaflow::HistoryEvent::StepCompleted).unwrap();
    assert_eq!(completed.attempts, Some(3));
}

#[tokio::test(start_paused = true)]
async fn retries_used_up_compensate_the_uncertain_step_too() {
    let c = calls();
    let o =
        start(Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c).always(Act::Fail(unavailable()))))
            .await;
    let Outcome::Compensated(failure) = o.run(F, "r1", Vec::<String>::new()).await.unwrap() else {
        panic!("not compensated")
    };
    assert_eq!(failure.step, 1);
    assert!(failure.error.contains("unavailable"), "{failure:?}");
    // Three attempts, then b (which may have taken effect) and a are undone.
    assert_eq!(taken(&c), ["a#1", "b#1", "b#2", "b#3", "undo b#1", "undo a#1"]);
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_times_out_and_is_retried() {
    let c = calls();
    let flow = Flow::new()
        .node(Scripted::new("a", &c).actions([Act::Sleep(Duration::from_secs(60))]))
        .step_timeout(Duration::from_secs(1));
    let o = start(flow).await;
    let started = Instant::now();
    assert_eq!(o.run(F, "r1", Vec::<String>::new()).await.unwrap(), Outcome::Completed(vec!["a".into()]));
    assert_eq!(started.elapsed(), Duration::from_millis(1100));
    assert_eq!(taken(&c), ["a#1", "a#2"]);
}

#[tokio::test(start_paused = true)]
async fn the_saga_deadline_stops_retries_and_compensates() {
    let c = calls();
    let flow = Flow::new()
        .node(Scripted::new("a", &c))
        .node(Scripted::new("b", &c).always(Act::Sleep(Duration::from_secs(60))))
        .step_timeout(Duration::from_secs(1))
        .deadline(Duration::from_millis(1500));
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .sync(F, flow.retry(policy(100)).compensation_retry(policy(3)))
        .start()
        .await
        .unwrap();
    let started = Instant::now();
    let Outcome::Compensated(failure) = o.run(F, "r1", Vec::<String>::new()).await.unwrap() else {
        panic!("not compensated")
    };
    // 1 s timeout, 100 ms backoff, then only 400 ms are left for attempt 2, which is cut at the deadline.
    assert_eq!(started.elapsed(), Duration::from_millis(1500));
    assert_eq!(failure.step, 1);
    assert_eq!(taken(&c), ["a#1", "b#1", "b#2", "undo b#1", "undo a#1"]);
}

#[tokio::test(start_paused = true)]
async fn a_compensation_that_keeps_failing_leaves_the_saga_stuck_and_retriable() {
    let c = calls();
    let a = Scripted::new("a", &c).compensations([
        Act::Fail(unavailable()),
        Act::Fail(unavailable()),
        Act::Fail(unavailable()),
    ]);
    let o = start(Flow::new().node(a).node(Scripted::new("b", &c).always(Act::Fail(refused())))).await;
    let started = Instant::now();
    let outcome = o.run(F, "r1", Vec::<String>::new()).await.unwrap();
    let Outcome::Stuck { failure, reason } = outcome else { panic!("not stuck: {outcome:?}") };
    assert_eq!(failure.step, 1);
    assert!(reason.contains("step 0") && reason.contains("3 attempts"), "{reason}");
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(taken(&c), ["a#1", "b#1", "undo a#1", "undo a#2", "undo a#3"]);

    // The upstream heals; an operator retries the compensation.
    o.retry_stuck("r1", "ops").await.unwrap();
    for _ in 0..100 {
        if o.saga("r1").await.unwrap().unwrap().status() == SagaStatus::Compensated {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(o.saga("r1").await.unwrap().unwrap().status(), SagaStatus::Compensated);
    assert_eq!(taken(&c).last().unwrap(), "undo a#1");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_node_compensates_and_the_orchestrator_goes_on() {
    let c = calls();
    let o = start(Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c).actions([Act::Panic]))).await;
    let Outcome::Compensated(failure) = o.run(F, "r1", Vec::<String>::new()).await.unwrap() else {
        panic!("not compensated")
    };
    assert!(failure.error.contains("panicked"), "{failure:?}");
    assert_eq!(taken(&c), ["a#1", "b#1", "undo b#1", "undo a#1"]);
    assert_eq!(o.run(F, "r2", Vec::<String>::new()).await.unwrap(), Outcome::Completed(vec!["a".into(), "b".into()]));
}

#[tokio::test(start_paused = true)]
async fn a_repeated_request_id_gets_the_first_outcome_without_a_second_saga() {
    let c = calls();
    let o = start(Flow::new().node(Scripted::new("a", &c))).await;
    let first = o.run(F, "r1", Vec::<String>::new()).await.unwrap();
    let second = o.run(F, "r1", vec!["other input".into()]).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(taken(&c), ["a#1"]);
}

#[tokio::test(start_paused = true)]
async fn concurrent_duplicates_share_one_saga() {
    let c = calls();
    let o = start(Flow::new().node(Scripted::new("a", &c).actions([Act::Sleep(Duration::from_millis(500))]))).await;
    let (x, y) = tokio::join!(o.run(F, "r1", Vec::<String>::new()), o.run(F, "r1", Vec::<String>::new()));
    assert_eq!(x.unwrap(), y.unwrap());
    assert_eq!(taken(&c), ["a#1"]);
    assert_eq!(o.stats().waiting, 0);
}

#[tokio::test(start_paused = true)]
async fn bad_calls_are_clear_errors() {
    let c = calls();
    let o = start(Flow::new().node(Scripted::new("a", &c))).await;
    assert!(matches!(o.run(F, "", Vec::<String>::new()).await, Err(Error::InvalidRequestId(_))));
    assert!(matches!(o.run(F, "a b", Vec::<String>::new()).await, Err(Error::InvalidRequestId(_))));
    assert!(matches!(o.run("Nope", "r", Vec::<String>::new()).await, Err(Error::UnknownFacade(f)) if f == "Nope"));
    assert!(matches!(o.run(F, "r", 5u32).await, Err(Error::DataType { .. })));
    assert!(matches!(o.submit(F, "r", Vec::<String>::new(), None).await, Err(Error::WrongMode { .. })));
    assert!(taken(&c).is_empty());
}

#[tokio::test]
async fn invalid_flows_are_refused_at_start() {
    let c = calls();
    let empty = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .sync(F, Flow::<Vec<String>>::new())
        .start()
        .await;
    assert!(matches!(empty, Err(Error::Config(m)) if m.contains("no nodes")));
    let twice = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .sync(F, Flow::new().node(Scripted::new("a", &c)))
        .sync(F, Flow::new().node(Scripted::new("a", &c)))
        .start()
        .await;
    assert!(matches!(twice, Err(Error::Config(m)) if m.contains("twice")));
}

#[tokio::test(start_paused = true)]
async fn an_overload_refusal_is_retried_and_not_compensated_itself() {
    let c = calls();
    let overloaded = sagaflow::NodeError::refused("over capacity");
    let o = start(Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c).always(Act::Fail(overloaded))))
        .await;
    let Outcome::Compensated(failure) = o.run(F, "r1", Vec::<String>::new()).await.unwrap() else {
        panic!("not compensated")
    };
    assert_eq!((failure.node.as_str(), failure.error.as_str(), failure.code), ("b", "over capacity", None));
    // Retried three times; b refused every call for load, so only a is undone.
    assert_eq!(taken(&c), ["a#1", "b#1", "b#2", "b#3", "undo a#1"]);
}

/// A log that counts the writes the engine waits for and the ones it only queues.
struct Counting {
    inner: MemorySagaLog,
    awaited: AtomicUsize,
    queued: AtomicUsize,
}

#[sagaflow::async_trait]
impl SagaLog for Counting {
    async fn begin(&self, saga: NewSaga) -> Result<Begin, LogError> {
        self.awaited.fetch_add(1, Ordering::SeqCst);
        self.inner.begin(saga).await
    }
    async fn append(&self, request_id: &str, event: SagaEvent) -> Result<SagaRecord, LogError> {
        self.awaited.fetch_add(1, Ordering::SeqCst);
        self.inner.append(request_id, event).await
    }
    async fn append_queued(&self, request_id: &str, event: SagaEvent) -> Result<(), LogError> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.inner.append_queued(request_id, event).await
    }
    async fn get(&self, request_id: &str) -> Result<Option<SagaRecord>, LogError> {
        self.inner.get(request_id).await
    }
    async fn unfinished(&self) -> Result<Vec<SagaRecord>, LogError> {
        self.inner.unfinished().await
    }
    async fn list(&self, filter: ListFilter) -> Result<Vec<SagaRecord>, LogError> {
        self.inner.list(filter).await
    }
    fn name(&self) -> &'static str {
        "counting"
    }
}

#[tokio::test(start_paused = true)]
async fn a_sync_saga_waits_for_its_start_and_its_end_only() {
    let c = calls();
    let log =
        Arc::new(Counting { inner: MemorySagaLog::new(), awaited: AtomicUsize::new(0), queued: AtomicUsize::new(0) });
    let flow = Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c)).node(Scripted::new("c", &c));
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone()).sync(F, flow).start().await.unwrap();
    assert!(matches!(o.run(F, "r1", Vec::<String>::new()).await.unwrap(), Outcome::Completed(_)));
    // begin and the last result are awaited; three starts and two intermediate results are queued
    // (nothing is acked, published or answered between steps, and the awaited end covers them).
    assert_eq!(log.awaited.load(Ordering::SeqCst), 2);
    assert_eq!(log.queued.load(Ordering::SeqCst), 5);
    let record = o.saga("r1").await.unwrap().unwrap();
    assert_eq!(record.history.len(), 7, "every event is in the record");
}

/// A sync saga as a crash may leave it: begun, step 0 started, nothing after recorded (steps 0
/// and 1 may have run: their results were queued and lost with the process).
async fn crashed_saga(log: &MemorySagaLog, deadline_ms: u64) {
    let saga = NewSaga {
        request_id: "r1".into(),
        facade: F.into(),
        mode: Mode::Sync,
        steps: 3,
        data: serde_json::json!([]),
        deadline_ms,
        callback_url: None,
        owner: None,
        version: None,
    };
    log.begin(saga).await.unwrap();
    log.append("r1", SagaEvent::StepStarted { index: 0 }).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_recovered_saga_replays_from_its_recorded_step() {
    let c = calls();
    let log = Arc::new(MemorySagaLog::new());
    crashed_saga(&log, u64::MAX).await;
    let flow = Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c)).node(Scripted::new("c", &c));
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log).sync(F, flow).start().await.unwrap();
    let record = wait_ended(&o, "r1").await;
    assert_eq!(record.state, SagaState::Completed);
    // Upstreams are idempotent per request id: replaying step 0 is safe.
    assert_eq!(taken(&c), ["a#1", "b#1", "c#1"]);
}

#[tokio::test(start_paused = true)]
async fn a_recovered_saga_that_cannot_go_on_compensates_every_step_that_may_have_run() {
    let c = calls();
    let log = Arc::new(MemorySagaLog::new());
    // Its deadline passed while the orchestrator was down: step 0 is not called again.
    crashed_saga(&log, 1).await;
    let flow = Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c)).node(Scripted::new("c", &c));
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log).sync(F, flow).start().await.unwrap();
    let record = wait_ended(&o, "r1").await;
    assert_eq!(record.status(), SagaStatus::Compensated);
    // Steps 1 and 2 may have run before the crash with their results lost, so they are
    // compensated too, last first; compensations tolerate an action that never ran.
    assert_eq!(taken(&c), ["undo c#1", "undo b#1", "undo a#1"]);
}
