//! What piles up under overload stays bounded: callbacks being delivered to a slow receiver,
//! and the in-memory broker's queues (which slow the submitters down instead).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sagaflow::{
    CallbackReport, CallbackSink, Flow, MemoryBroker, MemorySagaLog, Options, Orchestrator, SagaCallback, SagaStatus,
};
use support::{Act, Scripted, calls, refused};
use tokio::sync::Semaphore;

/// A receiver that holds every delivery until the test lets it answer.
struct SlowReceiver {
    gate: Arc<Semaphore>,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    delivered: AtomicUsize,
}

impl SlowReceiver {
    fn new() -> Self {
        Self {
            gate: Arc::new(Semaphore::new(0)),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            delivered: AtomicUsize::new(0),
        }
    }
}

#[sagaflow::async_trait]
impl CallbackSink for SlowReceiver {
    async fn deliver(&self, _url: &str, _callback: SagaCallback) -> CallbackReport {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.gate.acquire().await.unwrap().forget();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.delivered.fetch_add(1, Ordering::SeqCst);
        CallbackReport { delivered: true, attempts: 1, error: None }
    }
}

#[tokio::test(start_paused = true)]
async fn callbacks_to_a_slow_receiver_are_delivered_a_few_at_a_time() {
    let c = calls();
    let receiver = Arc::new(SlowReceiver::new());
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .options(Options { max_callback_deliveries: 2, ..Options::default() })
        .callbacks(receiver.clone())
        .asynchronous("A", Flow::new().node(Scripted::new("step", &c)))
        .start()
        .await
        .unwrap();
    for i in 0..6 {
        o.submit("A", &format!("a-{i}"), Vec::<String>::new(), Some("http://receiver/cb".into())).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(receiver.peak.load(Ordering::SeqCst), 2, "deliveries at once");
    receiver.gate.add_permits(6);
    for _ in 0..1000 {
        if receiver.delivered.load(Ordering::SeqCst) == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(receiver.delivered.load(Ordering::SeqCst), 6);
    assert_eq!(receiver.peak.load(Ordering::SeqCst), 2);
    o.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn sagas_flow_through_broker_queues_of_two_messages() {
    let c = calls();
    let flow = Flow::new()
        .node(Scripted::new("order", &c))
        .node(Scripted::new("hold", &c).always(Act::Sleep(Duration::from_millis(20))))
        .node(
            Scripted::new("payment", &c)
                .actions((0..40).map(|i| if i % 4 == 3 { Act::Fail(refused()) } else { Act::Ok })),
        );
    let o = Orchestrator::builder(Arc::new(MemoryBroker::with_capacity(2)), Arc::new(MemorySagaLog::new()))
        .options(Options { default_concurrency: 2, ..Options::default() })
        .asynchronous("A", flow.clone())
        .throttling("T", flow)
        .start()
        .await
        .unwrap();
    let mut calls = Vec::new();
    for i in 0..20 {
        let (o1, o2) = (o.clone(), o.clone());
        calls.push(tokio::spawn(async move { o1.submit("A", &format!("a-{i}"), Vec::<String>::new(), None).await }));
        calls.push(tokio::spawn(async move { o2.run("T", &format!("t-{i}"), Vec::<String>::new()).await.map(|_| ()) }));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    for prefix in ["a", "t"] {
        for i in 0..20 {
            let id = format!("{prefix}-{i}");
            let mut status = None;
            for _ in 0..1000 {
                status = o.saga(&id).await.unwrap().map(|r| r.status());
                if matches!(status, Some(SagaStatus::Completed | SagaStatus::Compensated)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(matches!(status, Some(SagaStatus::Completed | SagaStatus::Compensated)), "{id}: {status:?}");
        }
    }
    o.shutdown().await;
}
