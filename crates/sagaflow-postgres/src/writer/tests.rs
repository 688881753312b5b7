//! The writer's batches, made by hand so that what shares a batch is certain, against the test
//! database (skipped, with the reason printed, when it is absent and not required).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use sagaflow::log::{Begin, LogError, NewSaga, SagaEvent, SagaLog};
use sagaflow::{Mode, SagaRecord, SagaStatus};
use serde_json::json;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::sync::{mpsc, oneshot};

use super::cache::Cache;
use super::request::Request;
use super::{Connect, Health, Writer};
use crate::{PostgresOptions, PostgresSagaLog};

/// A log in a schema of its own (dropped at the end) and a writer on it driven by hand.
struct Bench {
    log: PostgresSagaLog,
    writer: Writer,
    schema: String,
    url: String,
}

impl Bench {
    async fn open() -> Option<Self> {
        let url = std::env::var("SAGAFLOW_POSTGRES_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| PostgresOptions::DEFAULT_URL.into());
        let schema = format!("sagaflow_test_{}_{:016x}", sagaflow::now_ms() / 1000, rand::random::<u64>());
        let options = PostgresOptions::from_url(&url).ok()?.schema(&schema).prune_interval(None).pool_size(2);
        let log = match PostgresSagaLog::connect(options.clone()).await {
            Ok(log) => log,
            Err(e) => return sagaflow::testsuite::skip_or_fail("PostgreSQL for the writer's tests", e),
        };
        let connect = Connect {
            options: options.connect.clone().options([("search_path", schema.as_str())]),
            timeout: options.acquire_timeout,
            target: options.target(),
        };
        let (_tx, rx) = mpsc::channel(1);
        let writer = Writer {
            deferred: super::Deferred::new(std::time::Duration::ZERO),
            rx,
            connect,
            conn: None,
            last_used: Instant::now(),
            connect_failed: None,
            cache: Cache::new(64),
            held: VecDeque::new(),
            health: Arc::new(Health::default()),
        };
        Some(Self { log, writer, schema, url })
    }

    /// Commits `requests` as one batch.
    async fn batch(&mut self, requests: Vec<Request>) {
        self.writer.commit(requests, false).await;
    }

    /// Commits what the last batch held for the next one, alone.
    async fn held(&mut self) {
        let held: Vec<Request> = self.writer.held.drain(..).collect();
        self.writer.commit(held, false).await;
    }

    async fn drop_schema(self) {
        self.log.close().await;
        if let Ok(mut conn) = PgConnection::connect(&self.url).await {
            let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema)))
                .execute(&mut conn)
                .await;
        }
    }
}

fn saga(id: &str, steps: usize) -> SagaRecord {
    SagaRecord::new(NewSaga {
        request_id: id.into(),
        facade: "F".into(),
        mode: Mode::Sync,
        steps,
        data: json!({ "id": id }),
        deadline_ms: u64::MAX,
        callback_url: None,
        owner: None,
        version: None,
    })
}

fn begin(record: SagaRecord) -> (Request, oneshot::Receiver<Result<Begin, LogError>>) {
    let (reply, answer) = oneshot::channel();
    (Request::Begin { record: Box::new(record), reply }, answer)
}

fn append(id: &str, event: SagaEvent) -> (Request, oneshot::Receiver<Result<SagaRecord, LogError>>) {
    let (reply, answer) = oneshot::channel();
    (Request::Append { request_id: id.into(), event, writer: None, reply: Some(reply) }, answer)
}

fn queued(id: &str, event: SagaEvent) -> Request {
    Request::Append { request_id: id.into(), event, writer: None, reply: None }
}

fn completed(index: usize) -> SagaEvent {
    SagaEvent::StepCompleted { index, attempts: 1, data: json!({ "step": index }) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transition_fails_alone_in_its_batch() {
    let Some(mut bench) = Bench::open().await else { return };
    let (a, b, c) = (begin(saga("a", 2)), begin(saga("b", 2)), begin(saga("c", 2)));
    bench.batch(vec![a.0, b.0, c.0]).await;
    for answer in [a.1, b.1, c.1] {
        assert!(matches!(answer.await.unwrap(), Ok(Begin::Started(_))));
    }
    let a1 = append("a", SagaEvent::StepStarted { index: 0 });
    let b1 = append("b", completed(1)); // step 1 of b before step 0: refused
    let c1 = append("c", SagaEvent::StepStarted { index: 0 });
    let a2 = append("a", completed(0));
    let b2 = append("b", SagaEvent::StepStarted { index: 0 });
    bench.batch(vec![a1.0, b1.0, c1.0, a2.0, b2.0]).await;
    assert!(a1.1.await.unwrap().is_ok());
    assert!(matches!(b1.1.await.unwrap(), Err(LogError::Transition(e)) if e.request_id == "b"));
    assert!(c1.1.await.unwrap().is_ok());
    let a = a2.1.await.unwrap().unwrap();
    assert_eq!(a.completed, 1, "a's two events, in order");
    let b = b2.1.await.unwrap().unwrap();
    assert_eq!(b.history.len(), 2, "b's refused event left no trace: {:?}", b.history);
    assert_eq!(bench.log.get("a").await.unwrap().as_ref(), Some(&a));
    assert_eq!(bench.log.get("b").await.unwrap().as_ref(), Some(&b));
    assert_eq!(bench.log.get("c").await.unwrap().unwrap().history.len(), 2);
    bench.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_begins_of_one_id_in_a_batch_start_it_once() {
    let Some(mut bench) = Bench::open().await else { return };
    let first = begin(saga("twice", 1));
    let mut other = saga("twice", 3);
    other.data = json!("other data");
    let second = begin(other);
    let started = append("twice", SagaEvent::StepStarted { index: 0 });
    bench.batch(vec![first.0, second.0, started.0]).await;
    let Ok(Begin::Started(record)) = first.1.await.unwrap() else { panic!("the first begin starts the saga") };
    // What came after the begin waits for the next batch, when the row exists.
    assert_eq!(bench.writer.held.len(), 2);
    bench.held().await;
    assert_eq!(second.1.await.unwrap().unwrap(), Begin::Exists(record.clone()));
    let after = started.1.await.unwrap().unwrap();
    assert_eq!((after.steps, after.history.len()), (1, 2));
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sagaflow_sagas").fetch_one(bench.log.pool()).await.unwrap();
    assert_eq!(rows, 1);
    bench.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_record_changed_by_another_process_is_read_again() {
    let Some(mut bench) = Bench::open().await else { return };
    let x = begin(saga("x", 2));
    bench.batch(vec![x.0]).await;
    assert!(matches!(x.1.await.unwrap(), Ok(Begin::Started(_))));
    // Another process (the log's own pool stands for one) starts step 0 behind the writer's back.
    let other = PostgresSagaLog::connect(
        PostgresOptions::from_url(&bench.url).unwrap().schema(&bench.schema).prune_interval(None).pool_size(1),
    )
    .await
    .unwrap();
    other.append("x", SagaEvent::StepStarted { index: 0 }).await.unwrap();
    other.append("x", completed(0)).await.unwrap();
    other.close().await;
    // The writer's cached record has step 0 not started: its start of step 0 is refused by the
    // row as it is, and the start of step 1 is applied to it.
    let again = append("x", SagaEvent::StepStarted { index: 0 });
    let next = append("x", SagaEvent::StepStarted { index: 1 });
    bench.batch(vec![again.0, next.0]).await;
    let again = again.1.await.unwrap();
    assert!(matches!(again, Err(LogError::Transition(_))), "{again:?}");
    let record = next.1.await.unwrap().unwrap();
    let events: Vec<&str> = record.history.iter().map(|h| h.event.as_str()).collect();
    assert_eq!(events, ["started", "step_started", "step_completed", "step_started"]);
    assert_eq!(bench.log.get("x").await.unwrap(), Some(record));
    // A duplicate begin answered from the cache is confirmed against the row, too.
    sqlx::query("UPDATE sagaflow_sagas SET record = jsonb_set(record, '{data}', '\"changed\"') WHERE request_id = 'x'")
        .execute(bench.log.pool())
        .await
        .unwrap();
    let dup = begin(saga("x", 2));
    bench.batch(vec![dup.0]).await;
    let Ok(Begin::Exists(existing)) = dup.1.await.unwrap() else { panic!("a second begin finds the saga") };
    assert_eq!(existing.data, json!("changed"), "Exists carries the row as it is, not the cached record");
    bench.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_its_callers_and_keeps_its_queued_appends() {
    let Some(mut bench) = Bench::open().await else { return };
    let (y, z) = (begin(saga("y", 2)), begin(saga("z", 1)));
    bench.batch(vec![y.0, z.0]).await;
    assert!(matches!(y.1.await.unwrap(), Ok(Begin::Started(_))));
    let conn = bench.writer.conn.as_mut().expect("the writer connected for its first batch");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await.unwrap();
    let killed: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(bench.log.pool()).await.unwrap();
    assert!(killed);
    bench.writer.last_used = Instant::now(); // not idle: no ping finds it dead before the batch
    let z1 = append("z", SagaEvent::StepStarted { index: 0 });
    bench.batch(vec![queued("y", SagaEvent::StepStarted { index: 0 }), z1.0]).await;
    let failed = z1.1.await.unwrap().unwrap_err();
    assert!(matches!(&failed, LogError::Unavailable { .. }) && failed.to_string().contains("127.0.0.1"), "{failed}");
    assert!(!bench.writer.health.get().unwrap_or_default().is_empty(), "the writer reports why it is down");
    assert_eq!(bench.writer.held.len(), 1, "the queued append waits for the next batch");
    // The next batch connects again, stores the queued append first, then what came after it.
    let y2 = append("y", completed(0));
    bench.writer.held.push_back(y2.0);
    bench.held().await;
    let y = y2.1.await.unwrap().unwrap();
    assert_eq!((y.completed, y.status()), (1, SagaStatus::Running));
    assert!(bench.writer.health.get().is_none(), "serving again");
    assert_eq!(bench.log.get("y").await.unwrap(), Some(y));
    bench.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_appends_wait_for_their_sagas_next_awaited_write() {
    let Some(mut bench) = Bench::open().await else { return };
    bench.writer.deferred = super::Deferred::new(std::time::Duration::from_secs(3600));
    let w = begin(saga("w", 2));
    bench.batch(vec![w.0]).await;
    assert!(matches!(w.1.await.unwrap(), Ok(Begin::Started(_))));
    bench.batch(vec![queued("w", SagaEvent::StepStarted { index: 0 })]).await;
    assert_eq!(bench.log.get("w").await.unwrap().unwrap().history.len(), 1, "not written yet");
    assert!(!bench.writer.deferred.is_empty());
    // The saga's awaited write takes the deferred append along, in order, in one row write.
    let done = append("w", completed(0));
    bench.batch(vec![done.0]).await;
    let record = done.1.await.unwrap().unwrap();
    let events: Vec<&str> = record.history.iter().map(|h| h.event.as_str()).collect();
    assert_eq!(events, ["started", "step_started", "step_completed"]);
    assert_eq!(bench.log.get("w").await.unwrap(), Some(record));
    // Closing writes what is still deferred.
    bench.batch(vec![queued("w", SagaEvent::StepStarted { index: 1 })]).await;
    assert!(!bench.writer.deferred.is_empty());
    bench.writer.commit(Vec::new(), true).await;
    assert!(bench.writer.deferred.is_empty());
    assert_eq!(bench.log.get("w").await.unwrap().unwrap().history.len(), 4);
    bench.drop_schema().await;
}
