//! Group commit under load: many sagas sharing batches, two processes beginning the same
//! request ids, and the database going away in the middle of a batch.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sagaflow::log::{Begin, LogError, LogHealth, NewSaga, SagaEvent, SagaLog};
use sagaflow::{Failure, Mode, SagaRecord, SagaStatus};
use serde_json::json;
use sqlx::{Connection, PgConnection};
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

fn events(record: &SagaRecord) -> Vec<&str> {
    record.history.iter().map(|h| h.event.as_str()).collect()
}

/// Runs saga `i` as the engine does: steps' starts and intermediate results queued, the last
/// write awaited. Every fourth fails its step 1 and compensates step 0; every tenth also sends
/// an event its state refuses, which must fail alone.
async fn run_saga(log: Arc<dyn SagaLog>, i: usize) -> Result<SagaRecord, String> {
    const STEPS: usize = 3;
    let id = format!("saga-{i}");
    match log.begin(new_saga(&id, STEPS)).await {
        Ok(Begin::Started(_)) => {}
        other => return Err(format!("{id}: begin gave {other:?}")),
    }
    let fails = i.is_multiple_of(4);
    for index in 0..STEPS {
        log.append_queued(&id, SagaEvent::StepStarted { index }).await.map_err(|e| e.to_string())?;
        if i.is_multiple_of(10) {
            match log.append(&id, SagaEvent::StepCompensated { index: 0, attempts: 1 }).await {
                Err(LogError::Transition(_)) => {}
                other => return Err(format!("{id}: a refused event gave {other:?}")),
            }
        }
        if fails && index == 1 {
            let failure = Failure { step: 1, node: "N1".into(), error: "no".into(), code: None };
            let event =
                SagaEvent::StepFailed { failure, attempts: 1, compensate_failed: false, later_steps_in_doubt: false };
            let record = log.append(&id, event).await.map_err(|e| e.to_string())?;
            if record.status() != SagaStatus::Compensating {
                return Err(format!("{id}: not compensating after its failure: {record:?}"));
            }
            return log
                .append(&id, SagaEvent::StepCompensated { index: 0, attempts: 1 })
                .await
                .map_err(|e| e.to_string());
        }
        let event = SagaEvent::StepCompleted { index, attempts: 1, data: json!({ "saga": i, "step": index }) };
        if index + 1 < STEPS {
            log.append_queued(&id, event).await.map_err(|e| e.to_string())?;
        } else {
            return log.append(&id, event).await.map_err(|e| e.to_string());
        }
    }
    unreachable!("the last step returns")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_sagas_through_one_log_are_each_recorded_exactly() {
    const SAGAS: usize = 400;
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let pg = Arc::new(db.connect(&schema).await);
    let log: Arc<dyn SagaLog> = pg.clone();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..SAGAS {
        let log = log.clone();
        tasks.spawn(async move { (i, run_saga(log, i).await) });
    }
    let mut answered = HashMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.unwrap();
        answered.insert(i, result.unwrap_or_else(|e| panic!("{e}")));
    }
    let forward = [
        "started",
        "step_started",
        "step_completed",
        "step_started",
        "step_completed",
        "step_started",
        "step_completed",
    ];
    let backward = ["started", "step_started", "step_completed", "step_started", "step_failed", "step_compensated"];
    for i in 0..SAGAS {
        let id = format!("saga-{i}");
        let stored = log.get(&id).await.unwrap().unwrap_or_else(|| panic!("{id} was lost"));
        assert_eq!(Some(&stored), answered.get(&i), "{id}: the last answer is what is stored");
        if i.is_multiple_of(4) {
            assert_eq!(stored.status(), SagaStatus::Compensated, "{id}");
            assert_eq!(events(&stored), backward, "{id}");
            assert_eq!(stored.data, json!({ "saga": i, "step": 0 }), "{id}");
        } else {
            assert_eq!(stored.status(), SagaStatus::Completed, "{id}");
            assert_eq!(events(&stored), forward, "{id}");
            assert_eq!(stored.data, json!({ "saga": i, "step": 2 }), "{id}");
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow_sagas WHERE ended_at IS NOT NULL")
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(rows, SAGAS as i64, "every saga's row is marked ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_logs_beginning_the_same_ids_at_once_start_each_once() {
    const IDS: usize = 300;
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let a: Arc<dyn SagaLog> = Arc::new(db.connect(&schema).await);
    let b: Arc<dyn SagaLog> = Arc::new(db.connect(&schema).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..IDS {
        for (n, log) in [&a, &b].into_iter().enumerate() {
            let log = log.clone();
            let mut saga = new_saga(&format!("same-{i}"), 2);
            saga.data = json!({ "by": n });
            tasks.spawn(async move { (i, log.begin(saga).await) });
        }
    }
    let mut started: HashMap<usize, Vec<SagaRecord>> = HashMap::new();
    let mut existed: HashMap<usize, Vec<SagaRecord>> = HashMap::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.unwrap() {
            (i, Ok(Begin::Started(record))) => started.entry(i).or_default().push(record),
            (i, Ok(Begin::Exists(record))) => existed.entry(i).or_default().push(record),
            (i, other) => panic!("same-{i}: {other:?}"),
        }
    }
    for i in 0..IDS {
        let won = started.get(&i).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(won.len(), 1, "same-{i}: exactly one of the two processes starts it");
        assert_eq!(existed.get(&i).map(Vec::as_slice), Some(won), "same-{i}: the other finds that record");
        assert_eq!(a.get(&format!("same-{i}")).await.unwrap().as_ref(), won.first());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_mid_batch_fails_it_and_later_writes_succeed() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let log = Arc::new(db.connect(&schema).await);
    for id in ["held", "other"] {
        log.begin(new_saga(id, 2)).await.unwrap();
    }
    // The test's own connection locks one saga's row, so the writer's next batch waits on it.
    let mut admin = PgConnection::connect(&support::url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut admin).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT 1 FROM {schema}.sagaflow_sagas WHERE request_id = 'held' FOR UPDATE"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let blocked = tokio::spawn({
        let log = log.clone();
        async move { log.append("held", SagaEvent::StepStarted { index: 0 }).await }
    });
    let waiting = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let pids: Vec<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
            )
            .bind(&schema)
            .fetch_all(&mut admin)
            .await
            .unwrap();
            if let Some(&pid) = pids.first() {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the writer's batch waits on the locked row");
    // The server ends the writer's connection in the middle of its batch.
    let killed: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(waiting).fetch_one(&mut admin).await.unwrap();
    assert!(killed);
    let failed = blocked.await.unwrap();
    let failed = failed.unwrap_err();
    assert!(matches!(&failed, LogError::Unavailable { .. }) && failed.to_string().contains("127.0.0.1"), "{failed:?}");
    let source = std::error::Error::source(&failed).expect("the driver's error is kept");
    assert!(source.downcast_ref::<sqlx::Error>().is_some(), "{source:?}");
    sqlx::query("ROLLBACK").execute(&mut admin).await.unwrap();
    // Nothing of the failed batch was written, and the writer connects again for the next.
    assert_eq!(events(&log.get("held").await.unwrap().unwrap()), ["started"]);
    let record = log.append("held", SagaEvent::StepStarted { index: 0 }).await.unwrap();
    assert_eq!(events(&record), ["started", "step_started"]);
    log.append("other", SagaEvent::StepStarted { index: 0 }).await.unwrap();
    assert_eq!(log.health(), LogHealth::Serving);
    log.close().await;
    assert!(matches!(log.health(), LogHealth::NotServing(m) if m.contains("closed")));
}
