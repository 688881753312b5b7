//! Writes that fail (a full disk, injected into redb's storage backend and the write-ahead
//! file): refused cleanly, reported by `health`, and accepted again once the disk has room,
//! without losing anything answered.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sagaflow::SagaRecord;
use sagaflow::log::{Begin, LogError, LogHealth, SagaEvent, SagaLog};
use serde_json::json;

use super::tests::{crash_image, new_saga, run_to_end};
use crate::faults::Faults;
use crate::{RedbOptions, RedbSagaLog};

fn options(dir: &std::path::Path, faults: &Arc<Faults>) -> RedbOptions {
    let mut options = RedbOptions::new(dir).prune_interval(Duration::MAX).checkpoint_interval(Duration::from_millis(5));
    options.faults = Some(faults.clone());
    options
}

/// Waits (bounded: the writer runs on the real clock) until the log serves again.
async fn serving(log: &RedbSagaLog) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log.health().is_serving() {
        assert!(Instant::now() < deadline, "the log never served again: {:?}", log.health());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_full_disk_refuses_writes_cleanly_until_it_has_room_and_loses_nothing_answered() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    let log = RedbSagaLog::open(options(dir.path(), &faults)).unwrap();
    let mut answered: Vec<SagaRecord> = Vec::new();
    for i in 0..10 {
        answered.push(run_to_end(&log, &format!("before-{i}")).await);
    }

    // The disk is full: writes go on to the write-ahead file until a checkpoint fails, then
    // are refused.
    faults.redb.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    let why = loop {
        assert!(Instant::now() < deadline, "no write was refused");
        match log.begin(new_saga(&format!("during-{}", answered.len()))).await {
            Ok(Begin::Started(record)) => answered.push(record),
            Err(refused @ LogError::Unavailable { .. }) => break refused,
            other => panic!("begin on a full disk: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(why.to_string().contains("No space left"), "{why}");
    // The refusal keeps redb's error (which holds the file system's) as its source.
    let source = std::error::Error::source(&why).expect("the store's error is kept");
    assert!(source.is::<redb::Error>() || source.is::<redb::DatabaseError>(), "{source:?}");
    assert!(source.to_string().contains("No space left"), "{source}");
    match log.health() {
        LogHealth::NotServing(why) => assert!(why.contains("No space left"), "{why}"),
        other => panic!("health on a full disk: {other:?}"),
    }
    // Still full: the file cannot be opened again, and writes stay refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!log.health().is_serving());
    let refused = log.append("before-0", SagaEvent::RetryCompensation { by: None, reason: None }).await;
    assert!(matches!(refused, Err(LogError::Unavailable { .. })), "{refused:?}");
    assert!(faults.injected.load(Ordering::SeqCst) > 1, "the file was tried again");

    // Room again: the log opens its file again by itself, and new sagas succeed.
    faults.redb.store(false, Ordering::SeqCst);
    serving(&log).await;
    assert!(log.stats().reopens >= 1);
    answered.push(run_to_end(&log, "after").await);
    for record in &answered {
        assert_eq!(log.get(&record.request_id).await.unwrap().as_ref(), Some(record), "{}", record.request_id);
    }
    // And after a restart.
    drop(log);
    let log = RedbSagaLog::open(RedbOptions::new(dir.path())).unwrap();
    for record in &answered {
        assert_eq!(log.get(&record.request_id).await.unwrap().as_ref(), Some(record), "{}", record.request_id);
    }
}

#[tokio::test]
async fn a_failed_write_ahead_append_is_refused_and_never_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    let options = options(dir.path(), &faults).checkpoint_interval(Duration::from_secs(3600));
    let log = RedbSagaLog::open(options).unwrap();
    let kept = run_to_end(&log, "kept").await;
    // The entry is written, and its sync fails: the bytes may be on disk, the write is refused.
    faults.wal.store(true, Ordering::SeqCst);
    assert!(matches!(log.begin(new_saga("refused")).await, Err(LogError::Unavailable { .. })));
    // A crash now does not replay it either.
    let image = crash_image(dir.path(), true);
    faults.wal.store(false, Ordering::SeqCst);
    serving(&log).await;
    let after = run_to_end(&log, "after").await;
    assert_eq!(log.get("refused").await.unwrap(), None);
    drop(log);

    for dir in [image.path(), dir.path()] {
        let log = RedbSagaLog::open(RedbOptions::new(dir)).unwrap();
        assert_eq!(log.get("kept").await.unwrap(), Some(kept.clone()));
        assert_eq!(log.get("refused").await.unwrap(), None, "{}", dir.display());
    }
    let log = RedbSagaLog::open(RedbOptions::new(dir.path())).unwrap();
    assert_eq!(log.get("after").await.unwrap(), Some(after));
}

#[tokio::test]
async fn a_queued_append_taken_while_writes_fail_is_applied_once_they_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    let options = options(dir.path(), &faults).checkpoint_interval(Duration::from_secs(3600));
    let log = RedbSagaLog::open(options).unwrap();
    log.begin(new_saga("s")).await.unwrap();
    faults.redb.store(true, Ordering::SeqCst);
    // A listing checkpoints the begin first, which fails: from its answer on, writes are refused.
    assert!(matches!(log.list(sagaflow::log::ListFilter::default()).await, Err(LogError::Unavailable { .. })));
    assert!(!log.health().is_serving());
    log.append_queued("s", SagaEvent::StepStarted { index: 0 }).await.unwrap();
    // Taken in order: this one refused, the one before was taken while writes failed too.
    assert!(matches!(log.begin(new_saga("probe")).await, Err(LogError::Unavailable { .. })));
    faults.redb.store(false, Ordering::SeqCst);
    serving(&log).await;
    let done = log.append("s", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
    assert!(done.state.is_ended());
    assert_eq!(done.history.len(), 3, "the step's start was applied before its result: {done:?}");
}
