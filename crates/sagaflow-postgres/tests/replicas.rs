//! Two orchestrators sharing one PostgreSQL schema (and one in-memory broker):
//! a dead replica's sagas are taken over, and a caller on one replica gets the
//! outcome of a saga the other ends.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sagaflow::log::SagaLog;
use sagaflow::{Flow, MemoryBroker, Node, NodeError, Options, Orchestrator, Outcome, SagaStatus, Step};
use sagaflow_postgres::PostgresSagaLog;
use support::TestDb;

const F: &str = "Booking";
const T: &str = "Queued";

/// A step that takes `delay` and counts its calls.
struct Slow {
    name: &'static str,
    delay: Duration,
    calls: Arc<AtomicUsize>,
}

#[sagaflow::async_trait]
impl Node<Vec<String>> for Slow {
    fn name(&self) -> &str {
        self.name
    }
    async fn action(&self, _: &Step, data: &mut Vec<String>) -> Result<(), NodeError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        data.push(self.name.to_owned());
        Ok(())
    }
}

fn flow(delay: Duration, calls: &Arc<AtomicUsize>) -> Flow<Vec<String>> {
    Flow::new().node(Slow { name: "order", delay: Duration::ZERO, calls: calls.clone() }).node(Slow {
        name: "payment",
        delay,
        calls: calls.clone(),
    })
}

async fn replica(
    pod: &str,
    broker: &MemoryBroker,
    log: Arc<PostgresSagaLog>,
    delay: Duration,
    calls: &Arc<AtomicUsize>,
) -> Orchestrator {
    let options = Options {
        pod_id: pod.into(),
        lease_ttl: Duration::from_millis(800),
        lease_renew_interval: Duration::from_millis(200),
        ..Options::default()
    };
    Orchestrator::builder(Arc::new(broker.clone()), log)
        .options(options)
        .sync(F, flow(delay, calls))
        .throttling(T, flow(delay, calls))
        .start()
        .await
        .expect("replica starts")
}

async fn ended(log: &dyn SagaLog, id: &str) -> sagaflow::SagaRecord {
    for _ in 0..300 {
        if let Some(record) = log.get(id).await.unwrap()
            && record.state.is_ended()
        {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("saga {id} did not end: {:?}", log.get(id).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_sagas_are_taken_over_and_finished() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let broker = MemoryBroker::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (log_a, log_b) = (Arc::new(db.connect(&schema).await), Arc::new(db.connect(&schema).await));
    let a = replica("a", &broker, log_a.clone(), Duration::from_millis(400), &calls).await;
    let b = replica("b", &broker, log_b.clone(), Duration::from_millis(400), &calls).await;
    for i in 0..10 {
        let a1 = a.clone();
        tokio::spawn(async move { a1.run(F, &format!("sync-{i}"), Vec::<String>::new()).await });
        let a2 = a.clone();
        tokio::spawn(async move { a2.run(T, &format!("queued-{i}"), Vec::<String>::new()).await });
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Replica a dies: its connections are gone, its lease is not renewed.
    log_a.close().await;
    for i in 0..10 {
        for id in [format!("sync-{i}"), format!("queued-{i}")] {
            let record = ended(&*log_b, &id).await;
            assert_eq!(record.status(), SagaStatus::Completed, "{id}: {record:?}");
            assert_eq!(record.owner.as_deref(), Some("b"), "{id} is b's now");
        }
    }
    assert_eq!(b.stats().taken_over, 20, "every unfinished saga of a");
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_on_another_replica_gets_the_outcome_when_it_ends() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let broker = MemoryBroker::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (log_a, log_b) = (Arc::new(db.connect(&schema).await), Arc::new(db.connect(&schema).await));
    let a = replica("a", &broker, log_a, Duration::from_millis(700), &calls).await;
    let b = replica("b", &broker, log_b, Duration::from_millis(700), &calls).await;
    let first = {
        let a = a.clone();
        tokio::spawn(async move { a.run(F, "shared", Vec::<String>::new()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Retried on b while a still drives it: b waits for a's end, runs nothing.
    let retried = b.run(F, "shared", Vec::<String>::new()).await.expect("an answer, not a timeout");
    let expected = Outcome::Completed(vec!["order".to_owned(), "payment".to_owned()]);
    assert_eq!(retried, expected);
    assert_eq!(first.await.unwrap().unwrap(), expected);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one saga, run once");
    // Retried again once ended: the recorded outcome at once.
    assert_eq!(b.run(F, "shared", Vec::<String>::new()).await.unwrap(), expected);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_facade_paused_on_one_replica_is_refused_on_the_other_and_after_a_restart() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let broker = MemoryBroker::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let a = replica("a", &broker, Arc::new(db.connect(&schema).await), Duration::ZERO, &calls).await;
    let b = replica("b", &broker, Arc::new(db.connect(&schema).await), Duration::ZERO, &calls).await;
    a.pause(F, "alice").await.unwrap();
    let mut refused = false;
    for _ in 0..100 {
        match b.run(F, &format!("on-b-{}", sagaflow::now_ms()), Vec::<String>::new()).await {
            Err(sagaflow::Error::Paused { by, .. }) => {
                assert_eq!(by, "alice");
                refused = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused, "replica b never saw the pause");
    // Restarted (its shutdown closed the in-memory broker: a new one, as a new process has).
    b.shutdown().await;
    let b = replica("b", &MemoryBroker::new(), Arc::new(db.connect(&schema).await), Duration::ZERO, &calls).await;
    assert!(matches!(b.run(F, "after-restart", Vec::<String>::new()).await, Err(sagaflow::Error::Paused { .. })));
    b.resume(F, "alice").await.unwrap();
    assert!(b.run(F, "resumed", Vec::<String>::new()).await.is_ok());
    a.shutdown().await;
    b.shutdown().await;
}
