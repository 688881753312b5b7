//! What only a shared database adds to the conformance suite: replicas racing,
//! pruning, migrations, failures.

mod support;

use std::time::Duration;

use sagaflow::log::{Begin, LogError, NewSaga, Retention, SagaEvent, SagaLog, StepStatus};
use sagaflow::{Mode, SagaStatus};
use sagaflow_postgres::{Error, PostgresOptions, PostgresSagaLog};
use serde_json::json;
use support::TestDb;

fn new_saga(id: &str, steps: usize) -> NewSaga {
    NewSaga {
        request_id: id.into(),
        facade: "F".into(),
        mode: Mode::Sync,
        steps,
        data: json!({ "id": id }),
        deadline_ms: u64::MAX,
        callback_url: None,
        owner: None,
        version: None,
    }
}

async fn run_to_end(log: &PostgresSagaLog, id: &str) {
    log.begin(new_saga(id, 1)).await.unwrap();
    log.append(id, SagaEvent::StepStarted { index: 0 }).await.unwrap();
    let r = log.append(id, SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
    assert_eq!(r.status(), SagaStatus::Completed);
}

/// Moves a saga's end back in time, as if it had ended `secs` ago.
async fn backdate_end(log: &PostgresSagaLog, id: &str, secs: i64) {
    let done =
        sqlx::query("UPDATE sagaflow_sagas SET ended_at = now() - make_interval(secs => $2) WHERE request_id = $1")
            .bind(id)
            .bind(secs as f64)
            .execute(log.pool())
            .await
            .unwrap();
    assert_eq!(done.rows_affected(), 1, "{id}");
}

async fn count(log: &PostgresSagaLog) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sagaflow_sagas").fetch_one(log.pool()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_on_one_saga_record_each_step_once() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let a = db.connect(&schema).await;
    let b = db.connect(&schema).await;
    const STEPS: usize = 20;
    let id = "race";
    a.begin(new_saga(id, STEPS)).await.unwrap();
    assert!(matches!(b.begin(new_saga(id, STEPS)).await.unwrap(), Begin::Exists(_)));
    for index in 0..STEPS {
        a.append(id, SagaEvent::StepStarted { index }).await.unwrap();
        let (ra, rb) = tokio::join!(
            a.append(id, SagaEvent::StepCompleted { index, attempts: 1, data: json!({ "by": "a", "index": index }) }),
            b.append(id, SagaEvent::StepCompleted { index, attempts: 1, data: json!({ "by": "b", "index": index }) }),
        );
        match (&ra, &rb) {
            (Ok(_), Err(LogError::Transition(_))) | (Err(LogError::Transition(_)), Ok(_)) => {}
            other => panic!("step {index}: expected exactly one winner and one refusal, got {other:?}"),
        }
    }
    let record = a.get(id).await.unwrap().unwrap();
    assert_eq!(record.status(), SagaStatus::Completed);
    assert_eq!(record.completed, STEPS);
    let completions: Vec<_> =
        record.history.iter().filter(|h| h.event == sagaflow::HistoryEvent::StepCompleted).collect();
    assert_eq!(completions.len(), STEPS);
    for (index, entry) in completions.iter().enumerate() {
        assert_eq!(entry.step, Some(index));
    }
    assert_eq!(record.data["index"], json!(STEPS - 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_on_two_pools_lose_no_update() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let a = std::sync::Arc::new(db.connect(&schema).await);
    let b = std::sync::Arc::new(db.connect(&schema).await);
    const STEPS: usize = 10;
    const WRITERS: usize = 8;
    let id = "many";
    a.begin(new_saga(id, STEPS)).await.unwrap();
    // Every writer tries every step in order; whoever is first records it,
    // the others are refused and move on. Nothing may be lost or doubled.
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let log = if w % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move {
            let mut won = 0;
            for index in 0..STEPS {
                let _ = log.append(id, SagaEvent::StepStarted { index }).await;
                loop {
                    match log.append(id, SagaEvent::StepCompleted { index, attempts: 1, data: json!(w) }).await {
                        Ok(_) => {
                            won += 1;
                            break;
                        }
                        Err(LogError::Transition(_)) => {
                            let r = log.get(id).await.unwrap().unwrap();
                            if r.completed > index {
                                break;
                            }
                            // Not started yet by anyone: start it ourselves.
                            let _ = log.append(id, SagaEvent::StepStarted { index }).await;
                        }
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
            }
            won
        });
    }
    let won: usize = tasks.join_all().await.into_iter().sum();
    assert_eq!(won, STEPS, "each step is recorded by exactly one writer");
    let record = b.get(id).await.unwrap().unwrap();
    assert_eq!(record.status(), SagaStatus::Completed);
    assert_eq!(record.history.iter().filter(|h| h.event == sagaflow::HistoryEvent::StepCompleted).count(), STEPS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_by_age_keeps_running_and_recent_sagas() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let retention = Retention { max_age: Duration::from_secs(3600), max_ended: 1000, ..Retention::default() };
    let log = db.connect_with_retention(&schema, retention).await;
    log.begin(new_saga("running", 2)).await.unwrap();
    run_to_end(&log, "old").await;
    run_to_end(&log, "recent").await;
    backdate_end(&log, "old", 2 * 3600).await;
    assert_eq!(log.prune_now().await.unwrap(), 1);
    assert!(log.get("old").await.unwrap().is_none());
    assert!(log.get("recent").await.unwrap().is_some());
    assert!(log.get("running").await.unwrap().is_some());
    assert_eq!(log.prune_now().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_by_count_drops_the_oldest_ended_only() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let retention = Retention { max_age: Duration::from_secs(3600), max_ended: 3, ..Retention::default() };
    let log = db.connect_with_retention(&schema, retention).await;
    log.begin(new_saga("running-1", 2)).await.unwrap();
    for i in 0..10 {
        let id = format!("s{i}");
        run_to_end(&log, &id).await;
        backdate_end(&log, &id, 100 - i).await; // s9 ended last
    }
    log.begin(new_saga("running-2", 2)).await.unwrap();
    assert_eq!(log.prune_now().await.unwrap(), 7);
    assert_eq!(count(&log).await, 5);
    for id in ["running-1", "running-2", "s7", "s8", "s9"] {
        assert!(log.get(id).await.unwrap().is_some(), "{id} was pruned");
    }
    assert_eq!(log.unfinished().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_goes_in_chunks_through_many_rows() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let retention = Retention { max_age: Duration::from_secs(24 * 3600), max_ended: 100, ..Retention::default() };
    let log = db.connect_with_retention(&schema, retention).await;
    log.begin(new_saga("running", 2)).await.unwrap();
    // 2 500 ended rows (more than two chunks), `bulk-1` the newest; 300 of them past the age.
    sqlx::query(
        "INSERT INTO sagaflow_sagas (request_id, facade, mode, status, record, created_at, updated_at, ended_at) \
         SELECT 'bulk-' || g, 'F', 'sync', 'completed', '{}'::jsonb, now(), now(), \
                now() - make_interval(secs => CASE WHEN g > 2200 THEN 2 * 86400 + g ELSE g END) \
         FROM generate_series(1, 2500) AS g",
    )
    .execute(log.pool())
    .await
    .unwrap();
    assert_eq!(log.prune_now().await.unwrap(), 2400);
    assert_eq!(count(&log).await, 101);
    let newest_gone: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sagaflow_sagas WHERE request_id IN ('bulk-1', 'bulk-100')")
            .fetch_one(log.pool())
            .await
            .unwrap();
    assert_eq!(newest_gone, 2, "the newest ended sagas are the ones kept");
    assert!(log.get("running").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_stuck_saga_is_not_pruned_while_it_runs_again() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let retention = Retention { max_age: Duration::from_secs(60), max_ended: 0, ..Retention::default() };
    let log = db.connect_with_retention(&schema, retention).await;
    let id = "stuck";
    log.begin(new_saga(id, 2)).await.unwrap();
    log.append(id, SagaEvent::StepStarted { index: 0 }).await.unwrap();
    log.append(id, SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(0) }).await.unwrap();
    let failure = sagaflow::Failure { step: 1, node: "N1".into(), error: "no".into(), code: None };
    log.append(
        id,
        SagaEvent::StepFailed { failure, attempts: 1, compensate_failed: false, later_steps_in_doubt: false },
    )
    .await
    .unwrap();
    let r = log.append(id, SagaEvent::CompensationGaveUp { index: 0, attempts: 3, reason: "down".into() }).await;
    assert_eq!(r.unwrap().status(), SagaStatus::Stuck);
    backdate_end(&log, id, 2 * 3600).await;
    // Retried: running again, so no longer a candidate however long ago it was stuck.
    log.append(id, SagaEvent::RetryCompensation { by: None, reason: None }).await.unwrap();
    assert_eq!(log.prune_now().await.unwrap(), 0);
    assert_eq!(log.get(id).await.unwrap().unwrap().status(), SagaStatus::Compensating);
    let r = log.append(id, SagaEvent::StepCompensated { index: 0, attempts: 1 }).await.unwrap();
    assert_eq!(r.status(), SagaStatus::Compensated);
    assert_eq!(log.prune_now().await.unwrap(), 1, "once ended again, it goes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_pruning_runs_on_its_own() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let options = support::options(&schema)
        .retention(Retention { max_age: Duration::from_secs(3600), max_ended: 0, ..Retention::default() })
        .prune_interval(Some(Duration::from_millis(50)));
    let log = PostgresSagaLog::connect(options).await.unwrap();
    log.begin(new_saga("running", 2)).await.unwrap();
    run_to_end(&log, "done").await;
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        while log.get("done").await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the background task did not prune within 10 s");
    assert!(log.get("running").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_data_survives_reconnects() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    // Two replicas starting at once on an empty schema.
    let (a, b) = tokio::join!(
        PostgresSagaLog::connect(support::options(&schema)),
        PostgresSagaLog::connect(support::options(&schema))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    a.begin(new_saga("kept", 1)).await.unwrap();
    drop((a, b));
    let c = db.connect(&schema).await;
    assert!(matches!(c.begin(new_saga("kept", 1)).await.unwrap(), Begin::Exists(_)));
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(c.pool()).await.unwrap();
    // Each migration applied once, however many processes connected at once.
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap().count();
    assert_eq!(applied, migrations as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_row_is_reported_as_corrupt() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let log = db.connect(&schema).await;
    log.begin(new_saga("bad", 1)).await.unwrap();
    sqlx::query("UPDATE sagaflow_sagas SET record = '{\"nonsense\": true}' WHERE request_id = 'bad'")
        .execute(log.pool())
        .await
        .unwrap();
    let corrupt = log.get("bad").await.unwrap_err();
    assert!(matches!(corrupt, LogError::Corrupt { .. }) && corrupt.to_string().contains("bad"), "{corrupt}");
    let source = std::error::Error::source(&corrupt).expect("the decoder's error is kept");
    assert!(source.downcast_ref::<serde_json::Error>().is_some(), "{source:?}");
    assert!(matches!(log.append("bad", SagaEvent::StepStarted { index: 0 }).await, Err(LogError::Corrupt { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_columns_follow_the_record() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let log = db.connect(&schema).await;
    log.begin(new_saga("cols", 1)).await.unwrap();
    let row: (String, String, String, bool) =
        sqlx::query_as("SELECT facade, mode, status, ended_at IS NULL FROM sagaflow_sagas WHERE request_id = 'cols'")
            .fetch_one(log.pool())
            .await
            .unwrap();
    assert_eq!(row, ("F".into(), "sync".into(), "running".into(), true));
    log.append("cols", SagaEvent::StepStarted { index: 0 }).await.unwrap();
    let r = log.append("cols", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
    let (status, ended_ms): (String, f64) = sqlx::query_as(
        "SELECT status, extract(epoch FROM ended_at)::float8 * 1000 FROM sagaflow_sagas WHERE request_id = 'cols'",
    )
    .fetch_one(log.pool())
    .await
    .unwrap();
    assert_eq!(status, "completed");
    assert!((ended_ms - r.updated_ms as f64).abs() < 1.0, "{ended_ms} vs {}", r.updated_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_a_clear_error_without_the_password() {
    let options = PostgresOptions::from_url("postgres://someone:topsecret@127.0.0.1:1/nowhere")
        .unwrap()
        .acquire_timeout(Duration::from_secs(2));
    let err = tokio::time::timeout(Duration::from_secs(30), PostgresSagaLog::connect(options))
        .await
        .expect("connect gives up within its timeout")
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Connect { .. }), "{message}");
    assert!(message.contains("someone@127.0.0.1:1/nowhere"), "{message}");
    assert!(!message.contains("topsecret"), "{message}");
    let source = std::error::Error::source(&err).expect("the driver's error is kept");
    assert!(source.downcast_ref::<sqlx::Error>().is_some(), "{source:?}");
    let log_error = LogError::from(err);
    assert!(matches!(&log_error, LogError::Unavailable { .. }), "{log_error}");
    assert!(!log_error.to_string().contains("topsecret"), "{log_error}");
    // As the saga log's error, the failure still leads to sqlx's: a refused connection.
    let source = std::error::Error::source(&log_error).expect("the driver's error is kept");
    let sqlx_error = source.downcast_ref::<sqlx::Error>().expect("the source is the sqlx::Error");
    assert!(matches!(sqlx_error, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut), "{sqlx_error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_close_are_unavailable() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let log = db.connect(&schema).await;
    log.begin(new_saga("a", 1)).await.unwrap();
    log.close().await;
    let err = log.append("a", SagaEvent::StepStarted { index: 0 }).await.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, LogError::Unavailable { .. }) && (message.contains("127.0.0.1") || message.contains("@")),
        "{err}"
    );
    assert!(matches!(log.get("a").await, Err(LogError::Unavailable { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_by_the_server_while_idle_is_replaced() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let log = PostgresSagaLog::connect(support::options(&schema).pool_size(1)).await.unwrap();
    log.begin(new_saga("kept", 1)).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(log.pool()).await.unwrap();
    let admin = PostgresSagaLog::connect(support::options(&schema).pool_size(1)).await.unwrap();
    let killed: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(admin.pool()).await.unwrap();
    assert!(killed);
    // Past the idle time after which a pooled connection is checked before use.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(log.get("kept").await.unwrap().is_some(), "the dead connection was replaced, not handed out");
    let new_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(log.pool()).await.unwrap();
    assert_ne!(new_pid, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_written_before_steps_had_a_status_is_read_and_written_anew() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let first = db.connect(&schema).await;
    first.begin(new_saga("old", 3)).await.unwrap();
    first.append("old", SagaEvent::StepStarted { index: 0 }).await.unwrap();
    first.append("old", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
    first.append("old", SagaEvent::StepStarted { index: 1 }).await.unwrap();
    // The row as a release before per-step status wrote it.
    sqlx::query("UPDATE sagaflow_sagas SET record = record - 'step_states' WHERE request_id = 'old'")
        .execute(first.pool())
        .await
        .unwrap();
    drop(first);
    let log = db.connect(&schema).await;
    let record = log.get("old").await.unwrap().expect("the old row");
    let statuses: Vec<_> = record.step_states.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [StepStatus::Done, StepStatus::Running, StepStatus::Pending]);
    let record = log.append("old", SagaEvent::StepCompleted { index: 1, attempts: 1, data: json!(2) }).await.unwrap();
    assert_eq!((record.completed, record.step_status(1)), (2, StepStatus::Done));
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT record->'step_states' FROM sagaflow_sagas WHERE request_id = 'old'")
            .fetch_one(log.pool())
            .await
            .unwrap();
    assert_eq!(stored, json!(["done", "done", "pending"]));
}
