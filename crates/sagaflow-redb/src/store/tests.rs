//! The log through its handle: crash images, replay, concurrency, listing, locking.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{ReadTransaction, ReadableDatabase, ReadableTable};
use sagaflow::log::{Begin, ListFilter, LogError, NewSaga, Retention, SagaEvent, SagaLog};
use sagaflow::{Failure, Mode, SagaRecord, SagaStatus};
use serde_json::json;
use tempfile::TempDir;
use tokio::sync::oneshot;

use super::request::Request;
use super::tables::{ENDED, IDS, SAGAS, decode};
use crate::{Error, RedbOptions, RedbSagaLog};

pub(crate) fn new_saga(id: &str) -> NewSaga {
    NewSaga {
        request_id: id.into(),
        facade: "F".into(),
        mode: Mode::Sync,
        steps: 1,
        data: json!(null),
        deadline_ms: u64::MAX,
        callback_url: None,
        owner: None,
        version: None,
    }
}

/// A log in a fresh directory that only prunes when asked.
pub(crate) fn open(retention: Retention) -> (TempDir, RedbSagaLog) {
    let dir = tempfile::tempdir().unwrap();
    let options = RedbOptions::new(dir.path()).retention(retention).prune_interval(Duration::MAX);
    let log = RedbSagaLog::open(options).unwrap();
    (dir, log)
}

pub(crate) async fn run_to_end(log: &RedbSagaLog, id: &str) -> SagaRecord {
    log.begin(new_saga(id)).await.unwrap();
    log.append(id, SagaEvent::StepStarted { index: 0 }).await.unwrap();
    let r = log.append(id, SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
    assert_eq!(r.status(), SagaStatus::Completed);
    r
}

/// Ends `id` stuck: its only step failed uncertainly and its compensation gave up.
pub(crate) async fn run_to_stuck(log: &RedbSagaLog, id: &str) {
    log.begin(new_saga(id)).await.unwrap();
    let failure = Failure { step: 0, node: "N".into(), error: "timeout".into(), code: None };
    log.append(
        id,
        SagaEvent::StepFailed { failure, attempts: 1, compensate_failed: true, later_steps_in_doubt: false },
    )
    .await
    .unwrap();
    let r =
        log.append(id, SagaEvent::CompensationGaveUp { index: 0, attempts: 3, reason: "down".into() }).await.unwrap();
    assert_eq!(r.status(), SagaStatus::Stuck);
}

/// What a crash leaves of `from`'s log: its two files as they are on disk now, copied while
/// it is open and idle (redb's file still holds only its last durable commit).
pub(crate) fn crash_image(from: &Path, with_wal: bool) -> TempDir {
    let to = tempfile::tempdir().unwrap();
    std::fs::copy(from.join(crate::FILE_NAME), to.path().join(crate::FILE_NAME)).unwrap();
    if with_wal {
        std::fs::copy(from.join(crate::WAL_FILE_NAME), to.path().join(crate::WAL_FILE_NAME)).unwrap();
    }
    to
}

/// The record stored for `id` in the file, and its sequence number.
pub(crate) fn stored(txn: &ReadTransaction, id: &str) -> Option<(u64, SagaRecord)> {
    let seq = txn.open_table(IDS).unwrap().get(id).unwrap()?.value();
    let record = decode(txn.open_table(SAGAS).unwrap().get(seq).unwrap().unwrap().value()).unwrap();
    Some((seq, record))
}

#[tokio::test]
async fn a_crash_between_checkpoints_loses_no_answered_write() {
    let dir = tempfile::tempdir().unwrap();
    let options =
        |dir: &Path| RedbOptions::new(dir).prune_interval(Duration::MAX).checkpoint_interval(Duration::from_secs(3600));
    let log = RedbSagaLog::open(options(dir.path())).unwrap();
    run_to_end(&log, "done").await;
    run_to_stuck(&log, "stuck").await;
    log.begin(new_saga("running")).await.unwrap();
    log.append("running", SagaEvent::StepStarted { index: 0 }).await.unwrap();
    // A stuck saga retried moves back to the running ones.
    log.begin(new_saga("retried")).await.unwrap();
    run_to_stuck(&log, "retried-stuck").await;
    log.append("retried-stuck", SagaEvent::RetryCompensation { by: None, reason: None }).await.unwrap();
    let stats = log.stats();
    assert_eq!(stats.checkpoints, 0, "every batch went to the write-ahead file: {stats:?}");

    // Without the write-ahead file, the crash image has none of it: the test below is not
    // passing on redb's own durability.
    let bare = crash_image(dir.path(), false);
    let reopened = RedbSagaLog::open(options(bare.path())).unwrap();
    assert_eq!(reopened.get("done").await.unwrap(), None);
    drop(reopened);

    let image = crash_image(dir.path(), true);
    let reopened = RedbSagaLog::open(options(image.path())).unwrap();
    for id in ["done", "stuck", "running", "retried", "retried-stuck"] {
        assert_eq!(reopened.get(id).await.unwrap(), log.get(id).await.unwrap(), "{id}");
    }
    let mut running: Vec<String> = reopened.unfinished().await.unwrap().into_iter().map(|r| r.request_id).collect();
    running.sort();
    assert_eq!(running, ["retried", "retried-stuck", "running"]);
    let listed = reopened.list(ListFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 5);
    // The replay ended in a checkpoint: a second crash right away replays nothing twice.
    assert_eq!(reopened.stats().checkpoints, 0);
    let again = crash_image(image.path(), true);
    let twice = RedbSagaLog::open(options(again.path())).unwrap();
    assert_eq!(twice.get("done").await.unwrap(), log.get("done").await.unwrap());
    assert_eq!(twice.unfinished().await.unwrap().len(), 3);
    // New sagas after a replay get numbers of their own.
    twice.begin(new_saga("after")).await.unwrap();
    assert_eq!(twice.get("running").await.unwrap(), log.get("running").await.unwrap());
    assert_eq!(twice.list(ListFilter::default()).await.unwrap().len(), 6);
}

#[tokio::test]
async fn checkpoints_retire_the_write_ahead_entries() {
    let dir = tempfile::tempdir().unwrap();
    let options = RedbOptions::new(dir.path()).prune_interval(Duration::MAX).checkpoint_interval(Duration::ZERO);
    let log = RedbSagaLog::open(options.clone()).unwrap();
    for i in 0..5 {
        run_to_end(&log, &format!("r{i}")).await;
    }
    // Checkpoints run on their own thread and are counted when the writer collects them:
    // wait (bounded) for the writer to get there rather than assume it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.stats().checkpoints < 2 {
        assert!(Instant::now() < deadline, "no checkpoints by themselves: {:?}", log.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut expected = Vec::new();
    for i in 0..5 {
        expected.push(log.get(&format!("r{i}")).await.unwrap().unwrap());
    }
    // Closing ends in a checkpoint: the redb file alone holds every saga.
    drop(log);
    std::fs::remove_file(dir.path().join(crate::WAL_FILE_NAME)).unwrap();
    let reopened = RedbSagaLog::open(options).unwrap();
    for record in expected {
        assert_eq!(reopened.get(&record.request_id).await.unwrap().as_ref(), Some(&record));
    }
}

#[tokio::test]
async fn closing_the_log_stores_what_queued_appends_left_and_readers_see_it_within_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let options = || RedbOptions::new(dir.path()).prune_interval(Duration::MAX);
    let log = RedbSagaLog::open(options().defer_queued(Duration::from_secs(10))).unwrap();
    let mut saga = new_saga("c");
    saga.steps = 2;
    log.begin(saga).await.unwrap();
    log.append_queued("c", SagaEvent::StepStarted { index: 0 }).await.unwrap();
    drop(log);
    let log = RedbSagaLog::open(options()).unwrap();
    assert_eq!(log.get("c").await.unwrap().unwrap().history.len(), 2, "stored on close");

    // With a short delay, a reader sees a lone queued append without any awaited write.
    drop(log);
    let log = RedbSagaLog::open(options().defer_queued(Duration::from_millis(20))).unwrap();
    log.append_queued("c", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
    let seen = async {
        while log.get("c").await.unwrap().unwrap().history.len() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), seen).await.expect("stored within the delay, by an idle writer");
}

#[tokio::test]
async fn concurrent_begins_of_one_request_id_start_it_once() {
    let (_dir, log) = open(Retention::default());
    let log = Arc::new(log);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let log = log.clone();
            tokio::spawn(async move { log.begin(new_saga("same")).await.unwrap() })
        })
        .collect();
    let mut started = 0;
    let mut records = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Begin::Started(r) => {
                started += 1;
                records.push(r);
            }
            Begin::Exists(r) => records.push(r),
            pruned @ Begin::Pruned(_) => panic!("a request id never pruned: {pruned:?}"),
        }
    }
    assert_eq!(started, 1);
    assert!(records.windows(2).all(|w| w[0] == w[1]), "every caller sees the one record");
    assert_eq!(log.unfinished().await.unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_writers_share_commits() {
    let (_dir, log) = open(Retention::default());
    let log = Arc::new(log);
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { run_to_end(&log, &format!("s{i}")).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = log.stats();
    assert_eq!(stats.writes, 32 * 3);
    assert!(stats.batches <= stats.writes);
    assert_eq!(log.list(ListFilter::default()).await.unwrap().len(), 32);
    assert!(log.unfinished().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_retried_stuck_saga_is_unfinished_again() {
    let (_dir, log) = open(Retention::default());
    run_to_stuck(&log, "s").await;
    assert!(log.unfinished().await.unwrap().is_empty());
    let r = log.append("s", SagaEvent::RetryCompensation { by: None, reason: None }).await.unwrap();
    assert_eq!(r.next_compensation(), Some(0));
    let unfinished = log.unfinished().await.unwrap();
    assert_eq!(unfinished, vec![r]);
    let r = log.append("s", SagaEvent::StepCompensated { index: 0, attempts: 1 }).await.unwrap();
    assert_eq!(r.status(), SagaStatus::Compensated);
    assert!(log.unfinished().await.unwrap().is_empty());
    // Exactly one `ended` entry, at the second ending.
    let txn = log.db_for_tests().begin_read().unwrap();
    let ended = txn.open_table(ENDED).unwrap();
    let keys: Vec<_> = ended.iter().unwrap().map(|e| e.unwrap().0.value().0).collect();
    assert_eq!(keys, vec![r.updated_ms]);
}

#[tokio::test]
async fn list_is_newest_first_with_ties_by_request_id_and_filters() {
    let (_dir, log) = open(Retention::default());
    // Sagas begun together mostly share a millisecond: the tie order must be stable.
    let ids = ["c", "a", "b", "e", "d"];
    for id in ids {
        log.begin(new_saga(id)).await.unwrap();
    }
    let mut other = new_saga("x");
    other.facade = "G".into();
    log.begin(other).await.unwrap();
    run_to_end(&log, "done").await;

    let all = log.list(ListFilter::default()).await.unwrap();
    assert_eq!(all.len(), 7);
    for w in all.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(
            a.created_ms > b.created_ms || (a.created_ms == b.created_ms && a.request_id < b.request_id),
            "{} then {}",
            a.request_id,
            b.request_id
        );
    }
    let first_two = log.list(ListFilter { limit: 2, ..ListFilter::default() }).await.unwrap();
    assert_eq!(first_two, all[..2]);
    let g = log.list(ListFilter { facade: Some("G".into()), ..ListFilter::default() }).await.unwrap();
    assert_eq!(g.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), ["x"]);
    let done = ListFilter { status: Some(SagaStatus::Completed), ..ListFilter::default() };
    assert_eq!(log.list(done).await.unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_sagas_and_bad_transitions_are_errors() {
    let (_dir, log) = open(Retention::default());
    assert!(matches!(log.append("nope", SagaEvent::StepStarted { index: 0 }).await, Err(LogError::NotFound(_))));
    log.begin(new_saga("a")).await.unwrap();
    assert!(matches!(log.append("a", SagaEvent::StepStarted { index: 3 }).await, Err(LogError::Transition(_))));
    assert_eq!(log.get("a").await.unwrap().unwrap().history.len(), 1);
    assert_eq!(log.get("nope").await.unwrap(), None);
}

#[tokio::test]
async fn the_file_is_locked_while_open_and_released_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let log = RedbSagaLog::open(RedbOptions::new(dir.path().join("nested"))).unwrap();
    run_to_end(&log, "kept").await;
    log.begin(new_saga("running")).await.unwrap();
    match RedbSagaLog::open(RedbOptions::new(dir.path().join("nested"))) {
        Err(e @ Error::AlreadyOpen { .. }) => assert!(e.to_string().contains("already open"), "{e}"),
        other => panic!("second open: {other:?}"),
    }
    drop(log);
    let log = RedbSagaLog::open(RedbOptions::new(dir.path().join("nested"))).unwrap();
    assert_eq!(log.get("kept").await.unwrap().unwrap().status(), SagaStatus::Completed);
    let unfinished = log.unfinished().await.unwrap();
    assert_eq!(unfinished.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), ["running"]);
}

#[tokio::test]
async fn writes_queued_at_drop_are_committed() {
    let dir = tempfile::tempdir().unwrap();
    let log = RedbSagaLog::open(RedbOptions::new(dir.path())).unwrap();
    let mut answers = Vec::new();
    for i in 0..50 {
        let (reply, rx) = oneshot::channel();
        log.tx.as_ref().unwrap().send(Request::Begin(new_saga(&format!("q{i}")), reply)).unwrap();
        answers.push(rx);
    }
    drop(log);
    for rx in answers {
        assert!(matches!(rx.await.unwrap(), Ok(Begin::Started(_))));
    }
    let log = RedbSagaLog::open(RedbOptions::new(dir.path())).unwrap();
    assert_eq!(log.unfinished().await.unwrap().len(), 50);
}

#[test]
fn a_file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(crate::FILE_NAME), b"not a redb file, not at all, no").unwrap();
    match RedbSagaLog::open(RedbOptions::new(dir.path())) {
        Err(e @ Error::Open { .. }) => assert!(e.to_string().contains("sagas.redb"), "{e}"),
        other => panic!("open: {other:?}"),
    }
}

#[tokio::test]
async fn the_cache_size_option_bounds_the_pages_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    let options = || RedbOptions::new(dir.path()).prune_interval(Duration::MAX);
    let blob = json!({ "blob": "x".repeat(4096) });
    let log = RedbSagaLog::open(options()).unwrap();
    for i in 0..400 {
        let mut saga = new_saga(&format!("s{i}"));
        saga.data = blob.clone();
        log.begin(saga).await.unwrap();
    }
    drop(log);
    // Every saga read back from the file (the overlay is empty after a reopen), under a cache
    // of `bytes`: what the cache holds afterwards.
    let held = |bytes: usize| {
        let log = RedbSagaLog::open(options().cache_size(bytes)).unwrap();
        async move {
            for i in 0..400 {
                assert!(log.get(&format!("s{i}")).await.unwrap().is_some());
            }
            log.db_for_tests().cache_stats().used_bytes()
        }
    };
    let small = 256 << 10;
    let under_small = held(small).await;
    assert!(under_small <= small + (16 << 10), "{under_small} bytes held under a {small}-byte cache");
    // The same reads fill a larger cache well past the small one: the bound above is the option's.
    let under_default = held(crate::DEFAULT_CACHE_SIZE).await;
    assert!(under_default > 4 * small, "{under_default} bytes held under the default cache");
    assert!(under_default <= crate::DEFAULT_CACHE_SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_waits_for_the_checkpoint_in_flight() {
    // Checkpoints start every millisecond, so one is often in flight, holding the last begin,
    // when the sync comes: the sync must wait for it, not only for what is still pending.
    let dir = tempfile::tempdir().unwrap();
    let options =
        RedbOptions::new(dir.path()).prune_interval(Duration::MAX).checkpoint_interval(Duration::from_millis(1));
    let log = RedbSagaLog::open(options).unwrap();
    for i in 0..300 {
        let id = format!("s{i}");
        log.begin(new_saga(&id)).await.unwrap();
        if i % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        log.sync().await.unwrap();
        let txn = log.db_for_tests().begin_read().unwrap();
        assert!(stored(&txn, &id).is_some(), "{id} is not in the file after a sync");
    }
}
