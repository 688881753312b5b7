//! Async and throttling flows on the in-memory broker: hops, callbacks, poison, panics.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow::broker::{Broker, Message, REQUEST_ID_HEADER, SubscribeOptions, dead_letter_topic};
use sagaflow::{
    CallbackReport, CallbackSink, CallbackStatus, Error, Flow, MemoryBroker, MemorySagaLog, Options, Orchestrator,
    Outcome, RetryPolicy, SagaCallback, SagaStatus,
};
use support::{Act, Scripted, calls, refused, taken};
use tokio::sync::mpsc;

const ASYNC: &str = "Async";
const THROTTLED: &str = "Throttled";

/// Collects delivered callbacks.
struct Collect(mpsc::UnboundedSender<(String, SagaCallback)>);

#[sagaflow::async_trait]
impl CallbackSink for Collect {
    async fn deliver(&self, url: &str, callback: SagaCallback) -> CallbackReport {
        let _ = self.0.send((url.to_owned(), callback));
        CallbackReport { delivered: true, attempts: 1, error: None }
    }
}

struct Setup {
    orchestrator: Orchestrator,
    broker: MemoryBroker,
    callbacks: mpsc::UnboundedReceiver<(String, SagaCallback)>,
}

async fn setup(flow: Flow<Vec<String>>, options: Options) -> Setup {
    let broker = MemoryBroker::new();
    let (tx, callbacks) = mpsc::unbounded_channel();
    let policy = RetryPolicy::default().attempts(2).backoff(Duration::from_millis(5), Duration::from_millis(10));
    let flow = flow.retry(policy).compensation_retry(policy);
    let orchestrator = Orchestrator::builder(Arc::new(broker.clone()), Arc::new(MemorySagaLog::new()))
        .options(options)
        .callbacks(Arc::new(Collect(tx)))
        .asynchronous(ASYNC, flow.clone())
        .throttling(THROTTLED, flow)
        .start()
        .await
        .unwrap();
    Setup { orchestrator, broker, callbacks }
}

async fn next_callback(rx: &mut mpsc::UnboundedReceiver<(String, SagaCallback)>) -> (String, SagaCallback) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("callback in time").expect("sink alive")
}

async fn wait_status(o: &Orchestrator, id: &str, status: SagaStatus) {
    for _ in 0..500 {
        if o.saga(id).await.unwrap().is_some_and(|r| r.status() == status) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("saga {id} never reached {status}: {:?}", o.saga(id).await.unwrap());
}

#[tokio::test]
async fn async_hops_run_in_order_and_call_back() {
    let c = calls();
    let mut s = setup(Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c)), Options::default()).await;
    s.orchestrator.submit(ASYNC, "r1", Vec::<String>::new(), Some("http://cb/1".into())).await.unwrap();
    let (url, callback) = next_callback(&mut s.callbacks).await;
    assert_eq!(url, "http://cb/1");
    assert_eq!(callback.status, CallbackStatus::Completed);
    assert_eq!(callback.data, serde_json::json!(["a", "b"]));
    assert_eq!(taken(&c), ["a#1", "b#1"]);
    // The delivery is recorded in the saga's history.
    for _ in 0..100 {
        let record = s.orchestrator.saga("r1").await.unwrap().unwrap();
        if record.history.iter().any(|h| h.event == sagaflow::HistoryEvent::CallbackDelivered) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("callback delivery not recorded: {:#?}", s.orchestrator.saga("r1").await.unwrap().unwrap().history);
}

#[tokio::test]
async fn an_async_refusal_compensates_over_the_rollback_topic() {
    let c = calls();
    let mut s = setup(
        Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c).always(Act::Fail(refused()))),
        Options::default(),
    )
    .await;
    s.orchestrator.submit(ASYNC, "r1", Vec::<String>::new(), Some("http://cb".into())).await.unwrap();
    let (_, callback) = next_callback(&mut s.callbacks).await;
    assert_eq!(callback.status, CallbackStatus::Compensated);
    assert!(callback.error.unwrap().contains("step 1 (b)"));
    assert_eq!(taken(&c), ["a#1", "b#1", "undo a#1"]);
}

#[tokio::test]
async fn a_repeated_async_submit_starts_no_second_saga() {
    let c = calls();
    let mut s = setup(Flow::new().node(Scripted::new("a", &c)), Options::default()).await;
    s.orchestrator.submit(ASYNC, "r1", Vec::<String>::new(), Some("http://cb".into())).await.unwrap();
    next_callback(&mut s.callbacks).await;
    s.orchestrator.submit(ASYNC, "r1", Vec::<String>::new(), Some("http://cb".into())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(taken(&c), ["a#1"]);
}

#[tokio::test]
async fn a_panicking_node_on_a_hop_compensates_and_the_consumer_goes_on() {
    let c = calls();
    let mut s = setup(
        Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c).actions([Act::Panic])),
        Options::default(),
    )
    .await;
    s.orchestrator.submit(ASYNC, "r1", Vec::<String>::new(), Some("http://cb".into())).await.unwrap();
    let (_, callback) = next_callback(&mut s.callbacks).await;
    assert_eq!(callback.status, CallbackStatus::Compensated);
    assert!(callback.error.unwrap().contains("panicked"));
    s.orchestrator.submit(ASYNC, "r2", Vec::<String>::new(), Some("http://cb".into())).await.unwrap();
    let (_, callback) = next_callback(&mut s.callbacks).await;
    assert_eq!((callback.request_id.as_str(), callback.status), ("r2", CallbackStatus::Completed));
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_the_consumers_go_on() {
    let c = calls();
    let mut s = setup(Flow::new().node(Scripted::new("a", &c)).node(Scripted::new("b", &c)), Options::default()).await;
    let flows = s.orchestrator.flows();
    let info = flows.iter().find(|f| f.facade == ASYNC).unwrap();
    let hop0 = info.topics[0].clone();
    let poison = [
        (hop0.clone(), b"not json".to_vec()),
        (hop0.clone(), br#"{"request_id":"x","facade":"Nope","step":0,"data":[]}"#.to_vec()),
        (hop0.clone(), br#"{"request_id":"x","facade":"Async","step":7,"data":[]}"#.to_vec()),
        (hop0.clone(), br#"{"request_id":"x","facade":"Async","step":0,"data":{"not":"a list"}}"#.to_vec()),
        (hop0.clone(), br#"{"request_id":"unknown-saga","facade":"Async","step":0,"data":[]}"#.to_vec()),
        (info.topics[1].clone(), b"\xff\xfe".to_vec()),
        (info.rollback_topic.clone(), b"{}".to_vec()),
        (info.rollback_topic.clone(), br#"{"request_id":"unknown-saga","facade":"Async"}"#.to_vec()),
    ];
    let mut dead =
        s.broker.subscribe(SubscribeOptions::new(dead_letter_topic(&hop0), "test").concurrency(100)).await.unwrap();
    for (topic, payload) in &poison {
        s.broker.publish(Message::new(topic.clone(), payload.clone()).header(REQUEST_ID_HEADER, "x")).await.unwrap();
    }
    for _ in 0..500 {
        if s.orchestrator.stats().dead_lettered == poison.len() as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.orchestrator.stats().dead_lettered, poison.len() as u64);
    let first = tokio::time::timeout(Duration::from_secs(5), dead.next()).await.unwrap().unwrap();
    assert!(first.message.headers.contains_key(sagaflow::broker::DEAD_LETTER_REASON_HEADER));
    assert!(taken(&c).is_empty());
    // The consumers still serve real work.
    s.orchestrator.submit(ASYNC, "r1", Vec::<String>::new(), Some("http://cb".into())).await.unwrap();
    assert_eq!(next_callback(&mut s.callbacks).await.1.status, CallbackStatus::Completed);
}

/// A node counting how many calls run at once.
struct Gauge {
    now: Arc<Mutex<(usize, usize)>>,
}

#[sagaflow::async_trait]
impl sagaflow::Node<Vec<String>> for Gauge {
    fn name(&self) -> &str {
        "Gauge"
    }
    async fn action(&self, _: &sagaflow::Step, data: &mut Vec<String>) -> Result<(), sagaflow::NodeError> {
        {
            let mut g = self.now.lock().unwrap();
            g.0 += 1;
            g.1 = g.1.max(g.0);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.now.lock().unwrap().0 -= 1;
        data.push("gauged".into());
        Ok(())
    }
}

#[tokio::test]
async fn throttled_callers_all_succeed_with_bounded_concurrency() {
    let gauge = Arc::new(Mutex::new((0, 0)));
    let mut options = Options::default();
    options.topic_concurrency.insert(format!("{THROTTLED}.Gauge"), 4);
    let s = setup(Flow::new().node(Gauge { now: gauge.clone() }), options).await;
    let mut calls = Vec::new();
    for i in 0..200 {
        let o = s.orchestrator.clone();
        calls.push(tokio::spawn(async move { o.run(THROTTLED, &format!("t{i}"), Vec::<String>::new()).await }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), Outcome::Completed(vec!["gauged".into()]));
    }
    let (_, peak) = *gauge.lock().unwrap();
    assert!((1..=4).contains(&peak), "peak in flight {peak}");
    assert_eq!(s.orchestrator.stats().waiting, 0);
}

#[tokio::test]
async fn a_throttled_caller_that_times_out_leaves_the_saga_running_to_its_end() {
    let c = calls();
    let options = Options { wait_timeout: Duration::from_millis(100), ..Options::default() };
    let s = setup(Flow::new().node(Scripted::new("a", &c).actions([Act::Sleep(Duration::from_millis(400))])), options)
        .await;
    let started = tokio::time::Instant::now();
    let result = s.orchestrator.run(THROTTLED, "slow", Vec::<String>::new()).await;
    assert!(matches!(&result, Err(Error::WaitTimeout(id)) if id == "slow"), "{result:?}");
    assert!(started.elapsed() < Duration::from_millis(400));
    assert_eq!(s.orchestrator.stats().waiting, 0);
    wait_status(&s.orchestrator, "slow", SagaStatus::Completed).await;
    // Asking again gives the recorded outcome.
    assert_eq!(
        s.orchestrator.run(THROTTLED, "slow", Vec::<String>::new()).await.unwrap(),
        Outcome::Completed(vec!["a".into()])
    );
}

#[tokio::test]
async fn two_throttled_callers_with_one_request_id_share_one_saga() {
    let c = calls();
    let s = setup(
        Flow::new().node(Scripted::new("a", &c).actions([Act::Sleep(Duration::from_millis(100))])),
        Options::default(),
    )
    .await;
    let (x, y) = tokio::join!(
        s.orchestrator.run(THROTTLED, "same", Vec::<String>::new()),
        s.orchestrator.run(THROTTLED, "same", Vec::<String>::new())
    );
    assert_eq!(x.unwrap(), y.unwrap());
    assert_eq!(taken(&c), ["a#1"]);
}
