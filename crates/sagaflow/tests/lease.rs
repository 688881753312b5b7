//! A replica on a shared log renews its lease on time, whatever its takeovers of
//! other replicas' sagas cost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow::log::{Begin, Lease, ListFilter, LogError, NewSaga, SagaEvent, SagaLog};
use sagaflow::{Flow, MemoryBroker, MemorySagaLog, Node, NodeError, Options, Orchestrator, SagaRecord, Step};

const RENEW: Duration = Duration::from_millis(100);
const TTL: Duration = Duration::from_secs(1);

/// A shared log on which a replica has always just expired, and whose claims are slow (a big
/// takeover, a slow database): each takes several lease renewal intervals.
struct SlowClaims {
    inner: MemorySagaLog,
    renewals: Mutex<Vec<tokio::time::Instant>>,
    claims: AtomicUsize,
}

#[sagaflow::async_trait]
impl SagaLog for SlowClaims {
    async fn begin(&self, saga: NewSaga) -> Result<Begin, LogError> {
        self.inner.begin(saga).await
    }
    async fn append(&self, request_id: &str, event: SagaEvent) -> Result<SagaRecord, LogError> {
        self.inner.append(request_id, event).await
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
        "slow-claims"
    }
    fn shared(&self) -> bool {
        true
    }
    async fn register(&self, _: &str, now_ms: u64, ttl: Duration) -> Result<Lease, LogError> {
        Ok(Lease { epoch: 1, until_ms: now_ms + ttl.as_millis() as u64 })
    }
    async fn renew(&self, _: &str, lease: Lease, now_ms: u64, ttl: Duration) -> Result<Lease, LogError> {
        self.renewals.lock().unwrap().push(tokio::time::Instant::now());
        Ok(Lease { until_ms: now_ms + ttl.as_millis() as u64, ..lease })
    }
    async fn expired(&self, _: u64) -> Result<Vec<String>, LogError> {
        Ok(vec!["gone".into()])
    }
    async fn claim(&self, _: &str, _: &str, _: u64) -> Result<Option<Vec<SagaRecord>>, LogError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(RENEW * 5).await;
        Ok(None) // another replica was first
    }
}

struct Noop;

#[sagaflow::async_trait]
impl Node<u32> for Noop {
    fn name(&self) -> &str {
        "Noop"
    }
    async fn action(&self, _: &Step, _: &mut u32) -> Result<(), NodeError> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn renewals_do_not_wait_for_takeovers() {
    let log =
        Arc::new(SlowClaims { inner: MemorySagaLog::new(), renewals: Mutex::default(), claims: AtomicUsize::new(0) });
    let options = Options { lease_ttl: TTL, lease_renew_interval: RENEW, ..Options::default() };
    let started = tokio::time::Instant::now();
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone())
        .options(options)
        .sync("F", Flow::new().node(Noop))
        .start()
        .await
        .unwrap();
    tokio::time::sleep(TTL * 2).await;
    let renewals = log.renewals.lock().unwrap().clone();
    assert!(log.claims.load(Ordering::SeqCst) >= 2, "the expired replica was claimed over and over");
    // One renewal every interval: never a gap near the lease's length.
    assert!(renewals.len() >= 15, "{} renewals in {:?}", renewals.len(), TTL * 2);
    let mut last = started;
    for at in renewals {
        assert!(at - last <= RENEW * 2, "a gap of {:?} between renewals", at - last);
        last = at;
    }
    o.shutdown().await;
}
