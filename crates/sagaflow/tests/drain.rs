//! Shutdown does not wait on callers: a caller waiting for a saga whose remaining work is
//! queued (a throttled hop, a sync saga's rollback) is told the orchestrator is shutting down
//! at once, instead of holding the shutdown up until its wait times out.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sagaflow::{Error, Flow, MemoryBroker, MemorySagaLog, Options, Orchestrator, SagaStatus};
use support::{Act, Scripted, calls, refused, taken};

/// Longer than any wait here: the shutdown must not wait it out.
const SLOW: Duration = Duration::from_secs(600);

fn options() -> Options {
    Options { wait_timeout: Duration::from_secs(30), ..Options::default() }
}

async fn wait_for_call(calls: &Arc<std::sync::Mutex<Vec<String>>>, call: &str) {
    for _ in 0..1000 {
        if taken(calls).iter().any(|c| c == call) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{call} never ran: {:?}", taken(calls));
}

#[tokio::test(start_paused = true)]
async fn a_throttled_caller_is_released_by_shutdown() {
    let c = calls();
    let flow = Flow::new().node(Scripted::new("slow", &c).always(Act::Sleep(SLOW)));
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .options(options())
        .throttling("T", flow)
        .start()
        .await
        .unwrap();
    let caller = tokio::spawn({
        let o = o.clone();
        async move { o.run("T", "t-1", Vec::<String>::new()).await }
    });
    wait_for_call(&c, "slow#1").await;
    let shutdown = tokio::spawn({
        let o = o.clone();
        async move { o.shutdown().await }
    });
    // Told at once, not after its 30 s wait (the step in flight takes longer than that).
    let answer = caller.await.unwrap();
    assert!(matches!(answer, Err(Error::ShuttingDown)), "{answer:?}");
    shutdown.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_sync_caller_waiting_for_its_rollback_is_released_by_shutdown() {
    let c = calls();
    let flow = Flow::new()
        .node(Scripted::new("order", &c).compensation_always(Act::Sleep(SLOW)))
        .node(Scripted::new("payment", &c).always(Act::Fail(refused())));
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .options(options())
        .sync("S", flow)
        .start()
        .await
        .unwrap();
    let caller = tokio::spawn({
        let o = o.clone();
        async move { o.run("S", "s-1", Vec::<String>::new()).await }
    });
    wait_for_call(&c, "undo order#1").await;
    let shutdown = tokio::spawn({
        let o = o.clone();
        async move { o.shutdown().await }
    });
    let answer = caller.await.unwrap();
    assert!(matches!(answer, Err(Error::ShuttingDown)), "{answer:?}");
    shutdown.await.unwrap();
    // The saga is left for the next start, recorded as compensating.
    assert_eq!(o.saga("s-1").await.unwrap().unwrap().status(), SagaStatus::Compensating);
}
