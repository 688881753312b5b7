//! What an operator does by hand: abort a running saga in each mode, settle a
//! stuck compensation, redrive stuck sagas in bulk.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow::{
    CallbackReport, CallbackSink, CallbackStatus, Error, Flow, MemoryBroker, MemorySagaLog, Node, NodeError, Options,
    Orchestrator, Outcome, RedriveFilter, RetryPolicy, SagaCallback, SagaRecord, SagaStatus, Step,
};
use support::{Act, Scripted, calls, refused, taken};

const SYNC: &str = "Sync";
const ASYNC: &str = "Async";
const THROTTLED: &str = "Throttled";

fn policy(attempts: u32) -> RetryPolicy {
    RetryPolicy::default().attempts(attempts).backoff(Duration::from_millis(5), Duration::from_millis(10)).jitter(0.0)
}

#[derive(Default)]
struct Count(Mutex<Vec<SagaCallback>>);

#[sagaflow::async_trait]
impl CallbackSink for Count {
    async fn deliver(&self, _url: &str, callback: SagaCallback) -> CallbackReport {
        self.0.lock().unwrap().push(callback);
        CallbackReport { delivered: true, attempts: 1, error: None }
    }
}

async fn status_is(o: &Orchestrator, id: &str, status: SagaStatus) -> SagaRecord {
    for _ in 0..2000 {
        if let Some(record) = o.saga(id).await.unwrap()
            && record.status() == status
        {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("saga {id} never became {status}: {:?}", o.saga(id).await.unwrap());
}

/// Waits until `step` of the saga was started.
async fn started(o: &Orchestrator, id: &str, step: usize) {
    for _ in 0..2000 {
        if o.saga(id).await.unwrap().is_some_and(|r| {
            r.history.iter().any(|h| h.event == sagaflow::HistoryEvent::StepStarted && h.step == Some(step))
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("step {step} of {id} never started");
}

fn slow_flow(c: &Arc<Mutex<Vec<String>>>) -> Flow<Vec<String>> {
    Flow::new()
        .node(Scripted::new("a", c))
        .node(Scripted::new("b", c).always(Act::Sleep(Duration::from_millis(300))))
        .node(Scripted::new("c", c))
        .retry(policy(2))
        .compensation_retry(policy(2))
}

#[tokio::test(start_paused = true)]
async fn an_aborted_saga_stops_at_the_next_step_and_compensates_once_in_every_mode() {
    for mode in [SYNC, ASYNC, THROTTLED] {
        let c = calls();
        let sink = Arc::new(Count::default());
        let builder = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
            .callbacks(sink.clone());
        let o = match mode {
            SYNC => builder.sync(SYNC, slow_flow(&c)),
            ASYNC => builder.asynchronous(ASYNC, slow_flow(&c)),
            _ => builder.throttling(THROTTLED, slow_flow(&c)),
        }
        .start()
        .await
        .unwrap();
        let caller = {
            let o = o.clone();
            tokio::spawn(async move {
                match mode {
                    ASYNC => o.submit(ASYNC, "r1", Vec::<String>::new(), Some("http://cb".into())).await.map(|_| None),
                    _ => o.run(mode, "r1", Vec::<String>::new()).await.map(Some),
                }
            })
        };
        started(&o, "r1", 1).await;
        let aborted = o.abort("r1", "ops", "the customer cancelled").await.unwrap();
        assert_eq!(aborted.status(), SagaStatus::Compensating, "{mode}");
        let record = status_is(&o, "r1", SagaStatus::Compensated).await;
        let SagaStatus::Compensated = record.status() else { unreachable!() };
        assert!(
            record.history.iter().any(|h| h.event == sagaflow::HistoryEvent::Aborted),
            "{mode}: {:?}",
            record.history
        );
        // Step b was in flight: undone too; step c never started.
        assert_eq!(taken(&c), ["a#1", "b#1", "undo b#1", "undo a#1"], "{mode}");
        match caller.await.unwrap() {
            Ok(Some(Outcome::Compensated(failure))) => {
                assert!(failure.error.contains("aborted by ops: the customer cancelled"), "{failure:?}")
            }
            Ok(None) => {
                let delivered = sink.0.lock().unwrap().clone();
                assert_eq!(delivered.len(), 1, "one callback");
                assert!(delivered[0].error.as_deref().unwrap_or("").contains("aborted by ops"));
            }
            other => panic!("{mode}: {other:?}"),
        }
        assert!(matches!(
            o.abort("r1", "ops", "again").await,
            Err(Error::WrongState { status: SagaStatus::Compensated, .. })
        ));
        o.shutdown().await;
    }
}

/// A compensation that fails until switched to succeed.
struct Fixable {
    fixed: Arc<AtomicBool>,
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    undone: Arc<Mutex<HashMap<String, usize>>>,
}

#[sagaflow::async_trait]
impl Node<Vec<String>> for Fixable {
    fn name(&self) -> &str {
        "pay"
    }
    async fn action(&self, _: &Step, _: &mut Vec<String>) -> Result<(), NodeError> {
        Ok(())
    }
    async fn compensate(&self, step: &Step, _: &Vec<String>) -> Result<(), NodeError> {
        if !self.fixed.load(Ordering::SeqCst) {
            return Err(NodeError::retryable("the payment service is down"));
        }
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        *self.undone.lock().unwrap().entry(step.request_id().to_owned()).or_default() += 1;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn stuck_sagas_are_resolved_by_hand_or_redriven_in_bulk_within_the_flows_concurrency() {
    let c = calls();
    let fixable = Fixable {
        fixed: Arc::new(AtomicBool::new(false)),
        now: Arc::default(),
        most: Arc::default(),
        undone: Arc::default(),
    };
    let (fixed, most, undone) = (fixable.fixed.clone(), fixable.most.clone(), fixable.undone.clone());
    let flow = Flow::new()
        .node(Scripted::new("order", &c))
        .node(fixable)
        .node(Scripted::new("ship", &c).always(Act::Fail(refused())))
        .retry(policy(2))
        .compensation_retry(policy(2));
    let sink = Arc::new(Count::default());
    let options = Options { topic_concurrency: [(format!("{ASYNC}.rollback"), 3)].into(), ..Options::default() };
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .options(options)
        .callbacks(sink.clone())
        .asynchronous(ASYNC, flow)
        .start()
        .await
        .unwrap();
    for i in 0..40 {
        o.submit(ASYNC, &format!("r{i}"), Vec::<String>::new(), Some("http://cb".into())).await.unwrap();
    }
    for i in 0..40 {
        status_is(&o, &format!("r{i}"), SagaStatus::Stuck).await;
    }

    // One settled by hand: the payment was refunded outside; the order is still cancelled.
    assert!(matches!(o.resolve("r0", 0, "ops", "wrong step").await, Err(Error::WrongState { .. })));
    let resolved = o.resolve("r0", 1, "ops", "refunded by hand in the payment console").await.unwrap();
    assert_eq!(resolved.status(), SagaStatus::Compensating);
    let r0 = status_is(&o, "r0", SagaStatus::Compensated).await;
    let entry =
        r0.history.iter().find(|h| h.event == sagaflow::HistoryEvent::Resolved).expect("the resolve is recorded");
    assert_eq!((entry.by.as_deref(), entry.step), (Some("ops"), Some(1)));
    assert_eq!(entry.reason.as_deref(), Some("refunded by hand in the payment console"));

    // The rest redriven once the payment service is fixed.
    let all = RedriveFilter { facade: Some(ASYNC.into()), ..RedriveFilter::default() };
    let only_ship = RedriveFilter { failed_step: Some(2), error_contains: Some("refused".into()), ..all.clone() };
    assert_eq!(o.redrive(&all, 1000, true, "ops").await.unwrap(), 39, "dry run counts");
    assert_eq!(o.redrive(&only_ship, 1000, true, "ops").await.unwrap(), 39, "by failed step and error text");
    let other_step = RedriveFilter { failed_step: Some(1), ..all.clone() };
    assert_eq!(o.redrive(&other_step, 1000, true, "ops").await.unwrap(), 0);
    fixed.store(true, Ordering::SeqCst);
    assert_eq!(o.redrive(&all, 1000, false, "ops").await.unwrap(), 39);
    for i in 1..40 {
        let record = status_is(&o, &format!("r{i}"), SagaStatus::Compensated).await;
        let retry = record
            .history
            .iter()
            .find(|h| h.event == sagaflow::HistoryEvent::RetryCompensation)
            .expect("the retry is recorded");
        assert_eq!((retry.by.as_deref(), retry.reason.as_deref()), (Some("ops"), Some("redrive")));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let most = most.load(Ordering::SeqCst);
    assert!((1..=3).contains(&most), "{most} compensations at once, the rollback topic allows 3");
    assert!(undone.lock().unwrap().values().all(|&n| n == 1), "each payment refunded once");
    assert_eq!(undone.lock().unwrap().len(), 39);
    // Each saga was called back once when it got stuck and once when it ended.
    let callbacks = sink.0.lock().unwrap();
    for status in [CallbackStatus::Stuck, CallbackStatus::Compensated] {
        let mut ids: Vec<&str> =
            callbacks.iter().filter(|cb| cb.status == status).map(|cb| cb.request_id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!((ids.len(), callbacks.iter().filter(|cb| cb.status == status).count()), (40, 40), "{status:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_holding_pause_keeps_new_calls_waiting_until_the_resume_and_a_refusing_one_refuses() {
    let c = calls();
    let options = Options { wait_timeout: Duration::from_secs(10), ..Options::default() };
    let orchestrator = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .options(options)
        .sync(SYNC, Flow::new().node(Scripted::new("a", &c)))
        .asynchronous(ASYNC, Flow::new().node(Scripted::new("a", &c)))
        .start()
        .await
        .unwrap();

    // Refusing: at once, naming who paused it; nothing runs.
    orchestrator.pause(SYNC, "erin").await.unwrap();
    let refused_now = orchestrator.run(SYNC, "r1", Vec::<String>::new()).await.unwrap_err();
    assert!(matches!(&refused_now, Error::Paused { by, .. } if by == "erin"), "{refused_now:?}");
    assert!(orchestrator.saga("r1").await.unwrap().is_none(), "a refused call records nothing");

    // Holding: the calls wait, recording nothing, until the resume; then they run.
    orchestrator.pause_holding(SYNC, "erin").await.unwrap();
    orchestrator.pause_holding(ASYNC, "erin").await.unwrap();
    let held = tokio::spawn({
        let o = orchestrator.clone();
        async move { o.run(SYNC, "h1", Vec::<String>::new()).await }
    });
    let submitted = tokio::spawn({
        let o = orchestrator.clone();
        async move { o.submit(ASYNC, "h2", Vec::<String>::new(), None).await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!held.is_finished() && !submitted.is_finished(), "held calls wait for the resume");
    assert!(orchestrator.saga("h1").await.unwrap().is_none() && orchestrator.saga("h2").await.unwrap().is_none());
    assert!(taken(&c).is_empty(), "nothing ran while held: {:?}", taken(&c));
    orchestrator.resume(SYNC, "erin").await.unwrap();
    orchestrator.resume(ASYNC, "erin").await.unwrap();
    assert!(matches!(held.await.unwrap().unwrap(), Outcome::Completed(_)));
    submitted.await.unwrap().unwrap();
    status_is(&orchestrator, "h2", SagaStatus::Completed).await;

    // A held call waits at most the wait timeout, then is refused as paused.
    orchestrator.pause_holding(SYNC, "erin").await.unwrap();
    let waited = tokio::time::Instant::now();
    let timed_out = orchestrator.run(SYNC, "h3", Vec::<String>::new()).await.unwrap_err();
    assert!(matches!(timed_out, Error::Paused { .. }), "{timed_out:?}");
    assert!(waited.elapsed() >= Duration::from_secs(10));
    assert!(orchestrator.saga("h3").await.unwrap().is_none());
    orchestrator.shutdown().await;
}
