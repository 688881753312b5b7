//! What only a shared database adds to the conformance suite's tombstone checks: a begin
//! racing the prune of its request id, and pruning many rows into tombstones and out again.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sagaflow::log::{Begin, NewSaga, Retention, SagaEvent, SagaLog};
use sagaflow::{Mode, SagaStatus};
use sagaflow_postgres::PostgresSagaLog;
use serde_json::json;
use support::TestDb;

fn new_saga(id: &str) -> NewSaga {
    NewSaga {
        request_id: id.into(),
        facade: "F".into(),
        mode: Mode::Sync,
        steps: 1,
        data: json!({ "id": id }),
        deadline_ms: u64::MAX,
        callback_url: None,
        owner: None,
        version: None,
    }
}

async fn run_to_end(log: &PostgresSagaLog, id: &str) {
    assert!(matches!(log.begin(new_saga(id)).await.unwrap(), Begin::Started(_)), "{id} is new");
    log.append(id, SagaEvent::StepStarted { index: 0 }).await.unwrap();
    let r = log.append(id, SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
    assert_eq!(r.status(), SagaStatus::Completed);
}

async fn tombstones(log: &PostgresSagaLog) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sagaflow_tombstones").fetch_one(log.pool()).await.unwrap()
}

/// A begin that arrives while a prune is moving its request id's saga to a tombstone (the
/// prune's statement has deleted the row, not committed yet) waits for the prune, then answers
/// `Pruned`: it must not insert the saga anew once the row is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_racing_the_prune_of_its_request_id_is_refused() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let log = Arc::new(db.connect(&schema).await);
    run_to_end(&log, "paid").await;

    // The prune's move, held open in a transaction of its own.
    let mut prune = log.pool().begin().await.unwrap();
    let prune_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *prune).await.unwrap();
    let moved = sqlx::query(
        "WITH gone AS (DELETE FROM sagaflow_sagas WHERE request_id = $1 \
           RETURNING request_id, facade, status, ended_at) \
         INSERT INTO sagaflow_tombstones (request_id, facade, status, ended_at, pruned_at) \
         SELECT request_id, facade, status, ended_at, now() FROM gone",
    )
    .bind("paid")
    .execute(&mut *prune)
    .await
    .unwrap();
    assert_eq!(moved.rows_affected(), 1);

    let retry = tokio::spawn({
        let log = log.clone();
        async move { log.begin(new_saga("paid")).await }
    });
    // Until the retry's statement waits for the prune's transaction (bounded: a begin that did
    // not wait has finished, and the loop sees that instead).
    let waiting = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let blocked: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                    .bind(prune_pid)
                    .fetch_one(log.pool())
                    .await
                    .unwrap();
            if blocked > 0 || retry.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waiting.is_ok(), "the retried begin neither waited for the prune nor finished within 20 s");
    prune.commit().await.unwrap();

    match retry.await.unwrap().unwrap() {
        Begin::Pruned(tombstone) => {
            assert_eq!((tombstone.request_id.as_str(), tombstone.status), ("paid", SagaStatus::Completed));
        }
        other => panic!("a begin racing the prune of its request id must be Pruned, got {other:?}"),
    }
    assert_eq!(log.get("paid").await.unwrap(), None, "no second saga was started");
}

/// Pruning thousands of rows moves every one into a tombstone, chunk after chunk, by age and
/// by count; the tombstones go in chunks too, by their age and their count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_moves_many_rows_to_tombstones_and_prunes_those_in_chunks() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let retention = Retention { max_age: Duration::from_secs(24 * 3600), max_ended: 100, ..Retention::default() };
    let log = db.connect_with_retention(&schema, retention).await;
    // 2 500 ended rows, `bulk-1` the newest; 300 of them past the age.
    sqlx::query(
        "INSERT INTO sagaflow_sagas (request_id, facade, mode, status, record, created_at, updated_at, ended_at) \
         SELECT 'bulk-' || g, 'F', 'sync', CASE WHEN g % 2 = 0 THEN 'completed' ELSE 'compensated' END, \
                '{}'::jsonb, now(), now(), \
                now() - make_interval(secs => CASE WHEN g > 2200 THEN 2 * 86400 + g ELSE g END) \
         FROM generate_series(1, 2500) AS g",
    )
    .execute(log.pool())
    .await
    .unwrap();
    assert_eq!(log.prune_now().await.unwrap(), 2400);
    assert_eq!(tombstones(&log).await, 2400, "every pruned saga left a tombstone");
    for (id, status) in [("bulk-2500", SagaStatus::Completed), ("bulk-101", SagaStatus::Compensated)] {
        match log.begin(new_saga(id)).await.unwrap() {
            Begin::Pruned(tombstone) => assert_eq!(tombstone.status, status, "{id}"),
            other => panic!("{id} was pruned: {other:?}"),
        }
    }
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sagaflow_sagas WHERE request_id IN ('bulk-1', 'bulk-100')")
            .fetch_one(log.pool())
            .await
            .unwrap();
    assert_eq!(kept, 2, "the newest ended sagas are kept, without tombstones");
    drop(log);

    // By count: the 1 500 left the longest ago go.
    let by_count = Retention { max_tombstones: 900, ..retention };
    let log = db.connect_with_retention(&schema, by_count).await;
    sqlx::query("UPDATE sagaflow_tombstones SET pruned_at = now() - make_interval(secs => substr(request_id, 6)::int)")
        .execute(log.pool())
        .await
        .unwrap();
    assert_eq!(log.prune_now().await.unwrap(), 0, "no saga is due");
    assert_eq!(tombstones(&log).await, 900);
    assert!(matches!(log.begin(new_saga("bulk-101")).await.unwrap(), Begin::Pruned(_)), "among the newest");
    assert!(matches!(log.begin(new_saga("bulk-1001")).await.unwrap(), Begin::Started(_)), "its tombstone went");
    drop(log);

    // By age: all of them.
    let by_age = Retention { tombstone_age: Duration::from_secs(60), ..retention };
    let log = db.connect_with_retention(&schema, by_age).await;
    sqlx::query("UPDATE sagaflow_tombstones SET pruned_at = now() - interval '1 hour'")
        .execute(log.pool())
        .await
        .unwrap();
    log.prune_now().await.unwrap();
    assert_eq!(tombstones(&log).await, 0);
    assert!(matches!(log.begin(new_saga("bulk-101")).await.unwrap(), Begin::Started(_)));
}
