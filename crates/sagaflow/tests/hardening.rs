//! Sagas outlive callers who give up, wait out an unavailable log, run each
//! compensation and end-of-saga effect once, and are resumed when nothing
//! drives them.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow::broker::{Broker, MESSAGE_ID_HEADER, Message, REQUEST_ID_HEADER};
use sagaflow::log::{Begin, ListFilter, LogError, NewSaga, SagaEvent, SagaLog};
use sagaflow::{
    CallbackReport, CallbackSink, Error, Flow, MemoryBroker, MemorySagaLog, Mode, Node, NodeError, Options,
    Orchestrator, Outcome, RetryPolicy, SagaCallback, SagaRecord, SagaStatus, Step,
};
use support::{Act, Scripted, calls, refused, taken, wait_ended};

const SYNC: &str = "Sync";
const ASYNC: &str = "Async";
const THROTTLED: &str = "Throttled";

fn policy() -> RetryPolicy {
    RetryPolicy::default().attempts(2).backoff(Duration::from_millis(5), Duration::from_millis(10)).jitter(0.0)
}

/// The in-memory log, with a switch that makes it unavailable, and one that makes it refuse the
/// first write of each step's result; it notes the flow data every write of a result carried.
#[derive(Default)]
struct Outage {
    inner: MemorySagaLog,
    down: AtomicBool,
    refuse_each_result_once: AtomicBool,
    refused: Mutex<Vec<usize>>,
    sent: Mutex<Vec<(usize, serde_json::Value)>>,
}

impl Outage {
    fn check(&self) -> Result<(), LogError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(LogError::unavailable("switched off by the test", std::io::Error::other("disk unplugged")));
        }
        Ok(())
    }

    fn check_write(&self, event: &SagaEvent) -> Result<(), LogError> {
        self.check()?;
        let SagaEvent::StepCompleted { index, data, .. } = event else { return Ok(()) };
        self.sent.lock().unwrap().push((*index, data.clone()));
        let mut refused = self.refused.lock().unwrap();
        if !self.refuse_each_result_once.load(Ordering::SeqCst) || refused.contains(index) {
            return Ok(());
        }
        refused.push(*index);
        Err(LogError::unavailable("refused once by the test", std::io::Error::other("hiccup")))
    }
}

#[sagaflow::async_trait]
impl SagaLog for Outage {
    async fn begin(&self, saga: NewSaga) -> Result<Begin, LogError> {
        self.check()?;
        self.inner.begin(saga).await
    }
    async fn append(&self, request_id: &str, event: SagaEvent) -> Result<SagaRecord, LogError> {
        self.check_write(&event)?;
        self.inner.append(request_id, event).await
    }
    async fn append_queued(&self, request_id: &str, event: SagaEvent) -> Result<(), LogError> {
        self.check_write(&event)?;
        self.inner.append_queued(request_id, event).await
    }
    async fn get(&self, request_id: &str) -> Result<Option<SagaRecord>, LogError> {
        self.check()?;
        self.inner.get(request_id).await
    }
    async fn unfinished(&self) -> Result<Vec<SagaRecord>, LogError> {
        self.check()?;
        self.inner.unfinished().await
    }
    async fn list(&self, filter: ListFilter) -> Result<Vec<SagaRecord>, LogError> {
        self.inner.list(filter).await
    }
    fn name(&self) -> &'static str {
        "outage"
    }
}

/// Counts callbacks per request id.
#[derive(Default)]
struct Count(Mutex<Vec<String>>);

#[sagaflow::async_trait]
impl CallbackSink for Count {
    async fn deliver(&self, _url: &str, callback: SagaCallback) -> CallbackReport {
        self.0.lock().unwrap().push(callback.request_id);
        CallbackReport { delivered: true, attempts: 1, error: None }
    }
}

async fn wait_status(o: &Orchestrator, id: &str, status: SagaStatus) {
    for _ in 0..1000 {
        if o.saga(id).await.unwrap().is_some_and(|r| r.status() == status) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("saga {id} never reached {status}: {:?}", o.saga(id).await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_caller_who_gives_up_leaves_the_saga_to_run_to_its_end() {
    let c = calls();
    let flow = Flow::new()
        .node(Scripted::new("order", &c))
        .node(Scripted::new("payment", &c).always(Act::Sleep(Duration::from_millis(500))))
        .retry(policy());
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .sync(SYNC, flow)
        .start()
        .await
        .unwrap();
    for i in 0..200 {
        // A 50 ms deadline: the caller is gone long before the payment answers.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(50), o.run(SYNC, &format!("r{i}"), Vec::<String>::new())).await;
        assert!(gave_up.is_err(), "the caller was answered within 50 ms: {gave_up:?}");
    }
    for i in 0..200 {
        let id = format!("r{i}");
        assert_eq!(wait_ended(&o, &id).await.status(), SagaStatus::Completed, "{id}");
        // Asking again gets the recorded outcome; no second saga runs.
        let again = o.run(SYNC, &id, Vec::<String>::new()).await.unwrap();
        assert_eq!(again, Outcome::Completed(vec!["order".into(), "payment".into()]));
    }
    assert_eq!(taken(&c).len(), 400, "each step ran once per saga");
    assert_eq!(o.stats().working, 0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_saga_whose_caller_gives_up_at_once_is_still_queued() {
    let c = calls();
    let sink = Arc::new(Count::default());
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .callbacks(sink.clone())
        .asynchronous(ASYNC, Flow::new().node(Scripted::new("a", &c)))
        .throttling(THROTTLED, Flow::new().node(Scripted::new("t", &c)))
        .start()
        .await
        .unwrap();
    for i in 0..50 {
        let id = format!("a{i}");
        let submit = o.submit(ASYNC, &id, Vec::<String>::new(), Some("http://cb".into()));
        let _ = tokio::time::timeout(Duration::ZERO, submit).await;
        let _ = tokio::time::timeout(Duration::ZERO, o.run(THROTTLED, &format!("t{i}"), Vec::<String>::new())).await;
    }
    for i in 0..50 {
        // Either the caller left before anything was recorded, or the saga runs to its end.
        for id in [format!("a{i}"), format!("t{i}")] {
            if o.saga(&id).await.unwrap().is_some() {
                assert_eq!(wait_ended(&o, &id).await.status(), SagaStatus::Completed, "{id}");
            }
        }
    }
    assert!(o.sagas(ListFilter::default()).await.unwrap().iter().all(|r| r.state.is_ended()));
}

#[tokio::test(start_paused = true)]
async fn a_log_outage_mid_flow_delays_sagas_and_dead_letters_nothing() {
    let c = calls();
    let log = Arc::new(Outage::default());
    let flow = Flow::new()
        .node(Scripted::new("a", &c))
        .node(Scripted::new("b", &c).always(Act::Sleep(Duration::from_millis(100))))
        .node(Scripted::new("c", &c))
        .retry(policy())
        .deadline(Duration::from_secs(60));
    let options = Options { max_deliveries: 3, redelivery_delay: Duration::from_millis(10), ..Options::default() };
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone())
        .options(options)
        .callbacks(Arc::new(Count::default()))
        .asynchronous(ASYNC, flow.clone())
        .sync(SYNC, flow)
        .start()
        .await
        .unwrap();
    for i in 0..50 {
        o.submit(ASYNC, &format!("a{i}"), Vec::<String>::new(), Some("http://cb".into())).await.unwrap();
    }
    let sync: Vec<_> = (0..20)
        .map(|i| {
            let o = o.clone();
            tokio::spawn(async move { o.run(SYNC, &format!("s{i}"), Vec::<String>::new()).await })
        })
        .collect();
    // The log goes away while step b runs, for far longer than the redelivery budget lasts.
    tokio::time::sleep(Duration::from_millis(50)).await;
    log.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    log.down.store(false, Ordering::SeqCst);
    for i in 0..50 {
        assert_eq!(wait_ended(&o, &format!("a{i}")).await.status(), SagaStatus::Completed);
    }
    // Sync callers are told the log is unavailable after a moment, not kept waiting; their
    // sagas go on, and asking again gives the outcome.
    let mut told = 0;
    for (i, run) in sync.into_iter().enumerate() {
        match run.await.unwrap() {
            Ok(Outcome::Completed(_)) => {}
            Err(Error::Log(error @ LogError::Unavailable { .. })) => {
                assert!(error.to_string().contains("ask again"), "{error}");
                // The caller's error still carries the store's own failure.
                let source = std::error::Error::source(&error).expect("the store's error is kept");
                assert!(source.downcast_ref::<std::io::Error>().is_some(), "{source:?}");
                told += 1;
            }
            other => panic!("s{i}: {other:?}"),
        }
        let again = o.run(SYNC, &format!("s{i}"), Vec::<String>::new()).await.unwrap();
        assert!(matches!(again, Outcome::Completed(_)), "s{i}: {again:?}");
    }
    assert!(told > 0, "the outage outlasted the callers' patience: some were told");
    assert_eq!(o.stats().dead_lettered, 0, "an unavailable log is not the message's fault");
}

#[tokio::test(start_paused = true)]
async fn duplicate_rollback_deliveries_run_each_compensation_and_the_callback_once() {
    let c = calls();
    let broker = MemoryBroker::new();
    let sink = Arc::new(Count::default());
    let flow = Flow::new()
        .node(Scripted::new("a", &c))
        .node(Scripted::new("b", &c).compensation_always(Act::Sleep(Duration::from_millis(300))))
        .node(Scripted::new("c", &c).always(Act::Fail(refused())))
        .retry(policy())
        .compensation_retry(policy());
    let o = Orchestrator::builder(Arc::new(broker.clone()), Arc::new(MemorySagaLog::new()))
        .callbacks(sink.clone())
        .asynchronous(ASYNC, flow)
        .start()
        .await
        .unwrap();
    o.submit(ASYNC, "r1", Vec::<String>::new(), Some("http://cb".into())).await.unwrap();
    wait_status(&o, "r1", SagaStatus::Compensating).await;
    // What a restart's recovery and a broker's redelivery amount to: the same rollback
    // work delivered again while the first delivery compensates.
    let topic = o.flows()[0].rollback_topic.clone();
    for copy in 0..3 {
        let payload = serde_json::json!({ "request_id": "r1", "facade": ASYNC }).to_string();
        let message = Message::new(topic.clone(), payload)
            .header(REQUEST_ID_HEADER, "r1")
            .header(MESSAGE_ID_HEADER, format!("r1:rollback:copy{copy}"));
        broker.publish(message).await.unwrap();
    }
    assert_eq!(wait_ended(&o, "r1").await.status(), SagaStatus::Compensated);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(taken(&c), ["a#1", "b#1", "c#1", "undo b#1", "undo a#1"]);
    assert_eq!(*sink.0.lock().unwrap(), ["r1"], "one callback");
    assert_eq!(o.stats().dead_lettered, 0);
}

/// A node that counts how many of its calls run at once.
#[derive(Default)]
struct Counts {
    now: AtomicUsize,
    most: AtomicUsize,
}

struct Gauge(Arc<Counts>);

#[sagaflow::async_trait]
impl Node<Vec<String>> for Gauge {
    fn name(&self) -> &str {
        "gauge"
    }
    async fn action(&self, _: &Step, data: &mut Vec<String>) -> Result<(), NodeError> {
        let now = self.0.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.0.now.fetch_sub(1, Ordering::SeqCst);
        data.push("gauge".into());
        Ok(())
    }
}

fn unfinished_sync(id: &str, deadline_ms: u64) -> NewSaga {
    NewSaga {
        request_id: id.into(),
        facade: SYNC.into(),
        mode: Mode::Sync,
        steps: 1,
        data: serde_json::json!([]),
        deadline_ms,
        callback_url: None,
        owner: None,
        version: None,
    }
}

#[tokio::test(start_paused = true)]
async fn sagas_recovered_at_a_restart_share_the_running_slots() {
    let log = Arc::new(MemorySagaLog::new());
    for i in 0..500 {
        log.begin(unfinished_sync(&format!("r{i}"), u64::MAX)).await.unwrap();
    }
    let gauge = Arc::new(Counts::default());
    let options = Options { max_running_sagas: 8, ..Options::default() };
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log)
        .options(options)
        .sync(SYNC, Flow::new().node(Gauge(gauge.clone())))
        .start()
        .await
        .unwrap();
    for i in 0..500 {
        assert_eq!(wait_ended(&o, &format!("r{i}")).await.status(), SagaStatus::Completed);
    }
    assert_eq!(o.stats().recovered, 500);
    let most = gauge.most.load(Ordering::SeqCst);
    assert!((1..=8).contains(&most), "{most} recovered sagas ran at once");
}

// Real time: the sweep compares the records' wall-clock timestamps.
#[tokio::test]
async fn a_saga_nothing_drives_is_resumed_by_the_sweep() {
    let c = calls();
    let log = Arc::new(MemorySagaLog::new());
    let options = Options { stale_sweep_interval: Duration::from_millis(50), ..Options::default() };
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone())
        .options(options)
        .sync(SYNC, Flow::new().node(Scripted::new("a", &c)).deadline(Duration::from_millis(300)))
        .start()
        .await
        .unwrap();
    // Begun after the start's recovery, and then left: what a lost task leaves behind.
    let deadline = sagaflow::now_ms() + 300;
    log.begin(unfinished_sync("orphan", deadline)).await.unwrap();
    let record = wait_ended(&o, "orphan").await;
    // Resumed past its deadline: its step is not called, and may have run, so it is undone.
    assert_eq!(record.status(), SagaStatus::Compensated, "{record:?}");
    assert_eq!(taken(&c), ["undo a#1"]);
    assert_eq!(o.stats().resumed_stale, 1);
}

/// The in-memory broker, with publishes that fail while switched off.
#[derive(Clone, Default)]
struct Unconfirmed {
    inner: MemoryBroker,
    refuse: Arc<AtomicBool>,
}

#[sagaflow::async_trait]
impl Broker for Unconfirmed {
    async fn publish(&self, message: Message) -> Result<(), sagaflow::broker::BrokerError> {
        if self.refuse.load(Ordering::SeqCst) {
            let topic = message.topic.clone();
            return Err(sagaflow::broker::BrokerError::not_confirmed_msg(topic, "switched off"));
        }
        self.inner.publish(message).await
    }
    async fn subscribe(
        &self,
        options: sagaflow::broker::SubscribeOptions,
    ) -> Result<sagaflow::broker::Subscription, sagaflow::broker::BrokerError> {
        self.inner.subscribe(options).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
    fn name(&self) -> &'static str {
        "unconfirmed"
    }
}

#[tokio::test(start_paused = true)]
async fn a_first_hop_the_broker_did_not_confirm_ends_compensated_with_step_0_undone() {
    let c = calls();
    let broker = Unconfirmed::default();
    let o = Orchestrator::builder(Arc::new(broker.clone()), Arc::new(MemorySagaLog::new()))
        .callbacks(Arc::new(Count::default()))
        .asynchronous(ASYNC, Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c)))
        .start()
        .await
        .unwrap();
    broker.refuse.store(true, Ordering::SeqCst);
    let refused = o.submit(ASYNC, "r1", Vec::<String>::new(), Some("http://cb".into())).await;
    assert!(matches!(refused, Err(Error::Broker(_))), "{refused:?}");
    // The unconfirmed hop may have reached the broker and run step 0: it is undone.
    let record = wait_ended(&o, "r1").await;
    assert_eq!(record.status(), SagaStatus::Compensated);
    assert_eq!(taken(&c), ["undo a#1"]);
}

/// A saga whose end was recorded but whose callback never went out (the process died between
/// the two) is called back by the next start, once; one whose delivery was recorded is not.
#[tokio::test]
async fn a_start_sends_the_callbacks_a_crash_cut_off_and_only_those() {
    let c = calls();
    let flow = || Flow::new().node(Scripted::new("a", &c));
    let log = Arc::new(MemorySagaLog::new());
    for (id, delivered) in [("cut-off", false), ("delivered", true)] {
        let saga = NewSaga {
            request_id: id.into(),
            facade: ASYNC.into(),
            mode: Mode::Async,
            steps: 1,
            data: serde_json::json!([]),
            deadline_ms: sagaflow::now_ms() + 60_000,
            callback_url: Some("http://receiver.test/cb".into()),
            owner: None,
            version: Some(flow().version()),
        };
        assert!(matches!(log.begin(saga).await.unwrap(), Begin::Started(_)));
        log.append(id, SagaEvent::StepStarted { index: 0 }).await.unwrap();
        let data = serde_json::json!(["a"]);
        let record = log.append(id, SagaEvent::StepCompleted { index: 0, attempts: 1, data }).await.unwrap();
        assert_eq!(record.status(), SagaStatus::Completed);
        if delivered {
            log.append(id, SagaEvent::CallbackDelivered { delivered: true, attempts: 1, error: None }).await.unwrap();
        }
    }

    let start = |sink: Arc<Count>| {
        Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone())
            .callbacks(sink)
            .asynchronous(ASYNC, flow())
            .start()
    };
    let sink = Arc::new(Count::default());
    let o = start(sink.clone()).await.unwrap();
    for _ in 0..500 {
        let recorded = o.saga("cut-off").await.unwrap().unwrap().history.last().unwrap().event;
        if recorded == sagaflow::HistoryEvent::CallbackDelivered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*sink.0.lock().unwrap(), ["cut-off"]);
    assert_eq!(
        o.saga("cut-off").await.unwrap().unwrap().history.last().unwrap().event,
        sagaflow::HistoryEvent::CallbackDelivered
    );
    o.shutdown().await;

    // The delivery is recorded now: the next start sends nothing.
    let again = Arc::new(Count::default());
    let o = start(again.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(again.0.lock().unwrap().is_empty(), "{:?}", again.0.lock().unwrap());
    assert!(taken(&c).is_empty(), "no step ran again: {:?}", taken(&c));
    o.shutdown().await;
}

/// A node that waits until the test opens its gate.
struct Gated(Arc<tokio::sync::Semaphore>);

#[sagaflow::async_trait]
impl Node<Vec<String>> for Gated {
    fn name(&self) -> &str {
        "gated"
    }
    async fn action(&self, _: &Step, data: &mut Vec<String>) -> Result<(), NodeError> {
        self.0.acquire().await.expect("gate open").forget();
        data.push("gated".into());
        Ok(())
    }
}

#[tokio::test]
async fn a_call_beyond_the_running_and_waiting_sagas_is_refused_and_starts_nothing() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let log = Arc::new(MemorySagaLog::new());
    let options = Options { max_running_sagas: 2, max_waiting_sagas: 1, ..Options::default() };
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone())
        .options(options)
        .sync(SYNC, Flow::new().node(Gated(gate.clone())))
        .start()
        .await
        .unwrap();
    // Two run (held at the gate), one waits for a slot.
    let held: Vec<_> = (0..3)
        .map(|i| {
            let o = o.clone();
            tokio::spawn(async move { o.run(SYNC, &format!("held-{i}"), Vec::<String>::new()).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log.list(ListFilter::default()).await.unwrap().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "two sagas never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    match o.run(SYNC, "one-too-many", Vec::<String>::new()).await {
        Err(Error::Overloaded { running: 2, waiting: 1 }) => {}
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert!(log.get("one-too-many").await.unwrap().is_none(), "a refused call starts nothing");
    gate.add_permits(3);
    for task in held {
        assert!(matches!(task.await.unwrap(), Ok(Outcome::Completed(_))));
    }
    // Room again: the refused request id is taken now.
    gate.add_permits(1);
    assert!(matches!(o.run(SYNC, "one-too-many", Vec::<String>::new()).await, Ok(Outcome::Completed(_))));
}

#[tokio::test(start_paused = true)]
async fn a_step_result_written_again_after_the_log_refused_it_carries_the_same_data() {
    let c = calls();
    let log = Arc::new(Outage::default());
    log.refuse_each_result_once.store(true, Ordering::SeqCst);
    let flow = Flow::new()
        .node(Scripted::new("a", &c))
        .node(Scripted::new("b", &c))
        .node(Scripted::new("c", &c))
        .retry(policy());
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone()).sync(SYNC, flow).start().await.unwrap();
    let outcome = o.run(SYNC, "r1", Vec::<String>::new()).await.unwrap();
    let names = |n: usize| -> Vec<String> { ["a", "b", "c"][..n].iter().map(|s| s.to_string()).collect() };
    assert_eq!(outcome, Outcome::Completed(names(3)));
    // The intermediate results are queued writes, the last one awaited: each was refused once
    // and written again with the data the step left.
    let sent = log.sent.lock().unwrap().clone();
    for index in 0..3 {
        let writes: Vec<_> = sent.iter().filter(|(i, _)| *i == index).map(|(_, data)| data.clone()).collect();
        let expected = serde_json::to_value(names(index + 1)).unwrap();
        assert_eq!(writes, vec![expected.clone(), expected], "step {index}: {sent:?}");
    }
    let record = o.saga("r1").await.unwrap().unwrap();
    assert_eq!(record.data, serde_json::to_value(names(3)).unwrap());
    assert_eq!(taken(&c).len(), 3, "each step ran once: {:?}", taken(&c));
}
