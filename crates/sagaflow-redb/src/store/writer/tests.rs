//! The writer given exact batches: what it answers, stores, caches and checkpoints.

use std::collections::HashMap;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use sagaflow::SagaStatus;
use sagaflow::log::{SagaLog, SagaState};
use serde_json::json;
use tokio::sync::oneshot;

use super::*;
use crate::store::request::{Reply, Verdict};
use crate::store::shared::Shared;
use crate::store::tables::{BY_CREATED, ENDED, ENDED_AT, IDS, SAGAS, Tables, UNFINISHED, WAL_SALT};
use crate::store::tests::{crash_image, new_saga, stored};
use crate::{RedbSagaLog, WAL_FILE_NAME};

/// A writer that is not running, so a test can hand it one exact batch.
fn idle_writer(dir: &Path) -> Writer {
    let db = Database::create(dir.join(crate::FILE_NAME)).unwrap();
    let txn = db.begin_write().unwrap();
    Tables::open(&txn).unwrap().meta.insert(WAL_SALT, 1).unwrap();
    txn.commit().unwrap();
    let (_tx, rx) = mpsc::channel();
    let options = RedbOptions::new(dir).prune_interval(Duration::MAX).linger(Duration::ZERO);
    let wal = Wal::open(dir.join(WAL_FILE_NAME), 1 << 20, 1, 0, None).unwrap();
    let db = Arc::new(db);
    let shared = Arc::new(Shared::new(db.clone()));
    Writer::new(options, db, wal, 0, rx, Overlay::default(), shared).unwrap()
}

/// The record the writer finds for `id` (in its overlay or the file), and its number.
fn found(writer: &Writer, id: &str) -> (u64, SagaRecord) {
    match writer.lookup(id).unwrap() {
        Lookup::Found { seq, record } => (seq, record.unwrap()),
        _ => panic!("no record for `{id}`"),
    }
}

/// Applies what the writer holds in its write-ahead file alone to the database file.
fn checkpoint(writer: &mut Writer) {
    writer.checkpoint(&Staged::default(), &[]).unwrap();
    assert!(writer.pending.is_empty() && writer.overlay.request_ids().is_empty());
}

fn request<T>(make: impl FnOnce(Reply<T>) -> Request) -> (Request, oneshot::Receiver<Verdict<T>>) {
    let (reply, rx) = oneshot::channel();
    (make(reply), rx)
}

#[test]
fn one_batch_answers_each_request_on_its_own_and_sees_its_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = idle_writer(dir.path());
    let (begin, mut begin_rx) = request(|r| Request::Begin(new_saga("a"), r));
    let (again, mut again_rx) = request(|r| Request::Begin(new_saga("a"), r));
    let (start, mut start_rx) = request(|r| Request::Append("a".into(), SagaEvent::StepStarted { index: 0 }, r));
    let (skip, mut skip_rx) = request(|r| Request::Append("a".into(), SagaEvent::StepStarted { index: 3 }, r));
    let (nope, mut nope_rx) = request(|r| Request::Append("nope".into(), SagaEvent::StepStarted { index: 0 }, r));
    let done = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!({ "ok": true }) };
    let (complete, mut complete_rx) = request(|r| Request::Append("a".into(), done, r));

    writer.commit(&mut vec![begin, again, start, skip, nope, complete], false);

    assert!(matches!(begin_rx.try_recv().unwrap(), Ok(Begin::Started(_))));
    match again_rx.try_recv().unwrap() {
        Ok(Begin::Exists(r)) => assert_eq!(r.status(), SagaStatus::Running),
        other => panic!("second begin: {other:?}"),
    }
    assert_eq!(start_rx.try_recv().unwrap().unwrap().history.len(), 2);
    assert!(matches!(skip_rx.try_recv().unwrap(), Err(LogError::Transition(_))));
    assert!(matches!(nope_rx.try_recv().unwrap(), Err(LogError::NotFound(_))));
    let completed = complete_rx.try_recv().unwrap().unwrap();
    assert_eq!(completed.state, SagaState::Completed);
    assert_eq!(completed.history.len(), 3, "the refused event left no trace");

    assert_eq!(writer.shared.counters.batches.load(Ordering::Relaxed), 1);
    assert_eq!(writer.shared.counters.writes.load(Ordering::Relaxed), 6);
    // What was committed is what was answered, and the indexes follow the state.
    assert_eq!(found(&writer, "a").1, completed, "found before a checkpoint");
    assert!(
        writer.store.as_ref().unwrap().db.begin_read().unwrap().open_table(IDS).unwrap().get("a").unwrap().is_none()
    );
    checkpoint(&mut writer);
    let txn = writer.store.as_ref().unwrap().db.begin_read().unwrap();
    let (seq, stored) = stored(&txn, "a").unwrap();
    assert_eq!(stored, completed);
    assert!(txn.open_table(UNFINISHED).unwrap().get(seq).unwrap().is_none());
    assert_eq!(txn.open_table(ENDED_AT).unwrap().get(seq).unwrap().unwrap().value(), completed.updated_ms);
    assert!(writer.cache.records.is_empty(), "an ended saga leaves the cache");

    // Loaded for an event its state refuses, an ended saga does not stay cached either.
    let (late, mut late_rx) = request(|r| Request::Append("a".into(), SagaEvent::StepStarted { index: 0 }, r));
    writer.commit(&mut vec![late], false);
    assert!(matches!(late_rx.try_recv().unwrap(), Err(LogError::Transition(_))));
    assert!(writer.cache.records.is_empty());
}

#[test]
fn a_running_saga_is_cached_as_stored_and_queued_appends_get_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = idle_writer(dir.path());
    let mut saga = new_saga("r");
    saga.steps = 2;
    let (begin, _begin_rx) = request(|r| Request::Begin(saga, r));
    writer.commit(&mut vec![begin], false);
    // A queued append: its receiver is gone before the writer sees it.
    let (queued, queued_rx) = request(|r| Request::Append("r".into(), SagaEvent::StepStarted { index: 0 }, r));
    drop(queued_rx);
    let done = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(7) };
    let (complete, mut complete_rx) = request(|r| Request::Append("r".into(), done, r));
    writer.commit(&mut vec![queued, complete], false);

    let after = complete_rx.try_recv().unwrap().unwrap();
    assert_eq!(after.completed, 1);
    assert_eq!(after.history.len(), 3, "the queued start was applied first");
    assert_eq!(found(&writer, "r").1, after);
    assert_eq!(writer.cache.records.get("r").map(|c| &c.record), Some(&after));
    assert!(writer.cache.records.get("r").is_some_and(|c| !c.unstored), "nothing left to store");
    assert_eq!(writer.shared.counters.stored.load(Ordering::Relaxed), 2, "once per commit");
}

/// Begins a two-step saga in a commit of its own.
fn begin_two_steps(writer: &mut Writer, id: &str) {
    let mut saga = new_saga(id);
    saga.steps = 2;
    let (begin, _rx) = request(|r| Request::Begin(saga, r));
    writer.commit(&mut vec![begin], false);
}

fn queued(id: &str, event: SagaEvent) -> Request {
    request(|r| Request::Append(id.into(), event, r)).0
}

fn stored_history(writer: &Writer, id: &str) -> usize {
    found(writer, id).1.history.len()
}

#[test]
fn queued_appends_wait_for_the_sagas_next_awaited_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = idle_writer(dir.path());
    begin_two_steps(&mut writer, "q");
    assert_eq!(stored_history(&writer, "q"), 1);

    writer.commit(&mut vec![queued("q", SagaEvent::StepStarted { index: 0 })], false);
    let result = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) };
    writer.commit(&mut vec![queued("q", result)], false);
    assert_eq!(stored_history(&writer, "q"), 1, "queued appends alone are not stored yet");
    assert_eq!(writer.shared.counters.stored.load(Ordering::Relaxed), 1);
    assert_eq!(writer.shared.counters.batches.load(Ordering::Relaxed), 1, "nor committed: no fsync for them");

    // Another saga's awaited write does not store them either: only this saga's does.
    begin_two_steps(&mut writer, "other");
    assert_eq!(stored_history(&writer, "q"), 1);
    let (start, mut start_rx) = request(|r| Request::Append("q".into(), SagaEvent::StepStarted { index: 1 }, r));
    writer.commit(&mut vec![start], false);
    let answered = start_rx.try_recv().unwrap().unwrap();
    assert_eq!(answered.history.len(), 4);
    assert_eq!(found(&writer, "q").1, answered);
    assert_eq!(writer.shared.counters.stored.load(Ordering::Relaxed), 3, "q once more, other once");
}

#[test]
fn a_checkpoint_applies_the_batches_since_the_last_one_with_each_saga_stored_as_last_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = idle_writer(dir.path());
    begin_two_steps(&mut writer, "spans");
    checkpoint(&mut writer);
    // Between two checkpoints: "passing" begins and ends, "spans" ends, "left" begins.
    let mut answered = HashMap::new();
    let mut awaited = |writer: &mut Writer, id: &str, event: SagaEvent| {
        let (append, mut rx) = request(|r| Request::Append(id.into(), event, r));
        writer.commit(&mut vec![append], false);
        answered.insert(id.to_owned(), rx.try_recv().unwrap().unwrap());
    };
    writer.commit(&mut vec![request(|r| Request::Begin(new_saga("passing"), r)).0], false);
    awaited(&mut writer, "passing", SagaEvent::StepStarted { index: 0 });
    awaited(&mut writer, "passing", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) });
    for index in 0..2 {
        awaited(&mut writer, "spans", SagaEvent::StepStarted { index });
        awaited(&mut writer, "spans", SagaEvent::StepCompleted { index, attempts: 1, data: json!(index) });
    }
    begin_two_steps(&mut writer, "left");
    let stores = writer.pending.iter().filter(|op| matches!(op, Op::Stored { .. })).count();
    assert_eq!(stores, 8, "each answer stored its record in the write-ahead file");
    assert_eq!(found(&writer, "spans").1, answered["spans"], "found in the overlay meanwhile");

    checkpoint(&mut writer);
    let txn = writer.store.as_ref().unwrap().db.begin_read().unwrap();
    for id in ["passing", "spans"] {
        let (_, record) = stored(&txn, id).unwrap();
        assert_eq!(record, answered[id], "{id}: the last record answered is the one stored");
        assert!(record.state.is_ended());
    }
    let (left, _) = stored(&txn, "left").unwrap();
    let running: Vec<u64> = txn.open_table(UNFINISHED).unwrap().iter().unwrap().map(|e| e.unwrap().0.value()).collect();
    assert_eq!(running, [left], "only the saga still running is indexed as running");
    assert_eq!(txn.open_table(ENDED).unwrap().len().unwrap(), 2);
    assert_eq!(txn.open_table(BY_CREATED).unwrap().len().unwrap(), 3);
    assert_eq!(found(&writer, "spans").1, answered["spans"], "and found in the file after");
}

#[tokio::test]
async fn a_checkpoint_runs_beside_the_writer_and_a_crash_during_it_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = idle_writer(dir.path());
    let begin = |id: &str| request(|r| Request::Begin(new_saga(id), r)).0;
    writer.commit(&mut vec![begin("a"), begin("b")], false);
    // The file as it is before the checkpoint of epoch 0 gets in.
    let before = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join(crate::FILE_NAME), before.path().join(crate::FILE_NAME)).unwrap();

    writer.start_checkpoint().unwrap();
    assert_eq!((writer.in_flight, writer.wal.epoch()), (Some(0), 1), "the writer went on in the next epoch");
    let done = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) };
    let (end_a, mut end_a_rx) = request(|r| Request::Append("a".into(), done, r));
    writer.commit(&mut vec![end_a, begin("c")], false);
    let a = end_a_rx.try_recv().unwrap().unwrap();
    // A crash now, with the checkpoint not in the file yet: both epochs are replayed.
    let mid = crash_image(dir.path(), true);
    std::fs::copy(before.path().join(crate::FILE_NAME), mid.path().join(crate::FILE_NAME)).unwrap();

    writer.collect(true).unwrap();
    assert_eq!(writer.in_flight, None);
    assert_eq!(writer.overlay.request_ids(), ["a", "c"], "the overlay keeps only what epoch 1 stored");
    assert_eq!(found(&writer, "b").1.request_id, "b", "found in the file now");
    // A crash after the checkpoint: epoch 1 is replayed on top of it.
    let after = crash_image(dir.path(), true);

    // (The idle writer's file is 1 MiB, the log's default larger: the replay reads it with
    // the halves it was written in, and only then is it resized.)
    for image in [mid, after] {
        let log = RedbSagaLog::open(RedbOptions::new(image.path()).prune_interval(Duration::MAX)).unwrap();
        assert_eq!(log.get("a").await.unwrap(), Some(a.clone()));
        let mut running: Vec<String> = log.unfinished().await.unwrap().into_iter().map(|r| r.request_id).collect();
        running.sort();
        assert_eq!(running, ["b", "c"]);
    }
}

#[tokio::test]
async fn a_checkpoint_thread_lost_mid_checkpoint_makes_the_writer_open_its_file_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = idle_writer(dir.path());
    writer.commit(&mut vec![request(|r| Request::Begin(new_saga("a"), r)).0], false);
    writer.start_checkpoint().unwrap();
    // The thread is gone with the job, as far as the writer can tell.
    let (jobs, _) = mpsc::channel();
    let (_, done) = mpsc::channel();
    let store = writer.store.as_mut().unwrap();
    drop(std::mem::replace(&mut store.checkpointer, Checkpointer { jobs: Some(jobs), done, thread: None }));
    let lost = writer.collect(false).unwrap_err();
    assert!(matches!(lost, Error::CheckpointStopped { epoch: 0 }), "{lost}");
    // Nothing retired epoch 0: a crash now replays it.
    let image = crash_image(dir.path(), true);

    writer.enter_outage(lost);
    assert!(!writer.shared.health().is_serving());
    assert!(writer.shared.db().is_err(), "the file is closed");
    // Meanwhile an awaited write is refused, a queued one held.
    let (refused, mut refused_rx) = request(|r| Request::Begin(new_saga("c"), r));
    writer.refuse_or_hold(refused);
    match refused_rx.try_recv().unwrap() {
        Err(why @ LogError::Unavailable { .. }) => assert!(why.to_string().contains("checkpoint"), "{why}"),
        other => panic!("refused begin: {other:?}"),
    }
    writer.refuse_or_hold(queued("a", SagaEvent::StepStarted { index: 0 }));

    assert!(writer.reopen());
    assert!(writer.shared.health().is_serving());
    assert_eq!(writer.shared.counters.reopens.load(Ordering::Relaxed), 1);
    assert_eq!(stored_history(&writer, "a"), 1, "the held append is applied, and waits as a queued one does");
    let (begin, mut begin_rx) = request(|r| Request::Begin(new_saga("b"), r));
    writer.commit(&mut vec![begin], false);
    assert!(matches!(begin_rx.try_recv().unwrap(), Ok(Begin::Started(_))));
    let started = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) };
    let (end, mut end_rx) = request(|r| Request::Append("a".into(), started, r));
    writer.commit(&mut vec![end], false);
    assert_eq!(end_rx.try_recv().unwrap().unwrap().history.len(), 3, "the held start came first");
    drop(writer);

    let log = RedbSagaLog::open(RedbOptions::new(image.path()).prune_interval(Duration::MAX)).unwrap();
    let running: Vec<String> = log.unfinished().await.unwrap().into_iter().map(|r| r.request_id).collect();
    assert_eq!(running, ["a"], "the crash image replays the epoch the lost thread never retired");
    let log = RedbSagaLog::open(RedbOptions::new(dir.path()).prune_interval(Duration::MAX)).unwrap();
    assert!(log.get("a").await.unwrap().unwrap().state.is_ended());
    assert!(log.get("b").await.unwrap().is_some());
    assert_eq!(log.get("c").await.unwrap(), None, "refused");
}

#[test]
fn a_deferred_record_is_stored_once_due_or_when_forced() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = idle_writer(dir.path());
    writer.cache = Cache::new(Duration::from_millis(30));
    begin_two_steps(&mut writer, "d");
    writer.commit(&mut vec![queued("d", SagaEvent::StepStarted { index: 0 })], false);
    let due = writer.cache.next_due().unwrap();
    writer.commit(&mut Vec::new(), false);
    assert_eq!(stored_history(&writer, "d"), 1, "not due yet");
    std::thread::sleep(due.saturating_duration_since(Instant::now()));
    writer.commit(&mut Vec::new(), false);
    assert_eq!(stored_history(&writer, "d"), 2, "stored once due");
    assert!(writer.cache.next_due().is_none());

    writer.commit(&mut vec![queued("d", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) })], false);
    assert_eq!(stored_history(&writer, "d"), 2);
    writer.commit(&mut Vec::new(), true);
    assert_eq!(stored_history(&writer, "d"), 3, "forced");
}

#[test]
fn a_queued_append_that_ends_the_saga_is_stored_by_its_own_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = idle_writer(dir.path());
    writer.commit(&mut vec![request(|r| Request::Begin(new_saga("e"), r)).0], false);
    writer.commit(&mut vec![queued("e", SagaEvent::StepStarted { index: 0 })], false);
    writer.commit(&mut vec![queued("e", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) })], false);
    checkpoint(&mut writer);
    let txn = writer.store.as_ref().unwrap().db.begin_read().unwrap();
    let (seq, record) = stored(&txn, "e").unwrap();
    assert_eq!(record.state, SagaState::Completed);
    assert!(txn.open_table(UNFINISHED).unwrap().get(seq).unwrap().is_none(), "record and index agree");
    assert!(writer.cache.records.is_empty());
}

#[test]
fn a_queued_event_on_an_ended_saga_waits_and_pruning_stores_it_before_deleting_the_saga() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = idle_writer(dir.path());
    writer.cache = Cache::new(Duration::from_secs(10));
    writer.commit(&mut vec![request(|r| Request::Begin(new_saga("p"), r)).0], false);
    let done = SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) };
    writer.commit(&mut vec![request(|r| Request::Append("p".into(), done, r)).0], false);
    let delivered = SagaEvent::CallbackDelivered { delivered: true, attempts: 1, error: None };
    writer.commit(&mut vec![queued("p", delivered)], false);
    assert_eq!(stored_history(&writer, "p"), 2, "the delivery waits");
    assert!(writer.cache.next_due().is_some());

    // Pruning this very saga: its waiting change is stored first, then deleted with it,
    // never written back after.
    writer.retention = Retention { max_age: Duration::from_secs(3600), max_ended: 0, ..Retention::default() };
    assert_eq!(writer.prune_once().unwrap().removed, 1);
    assert!(writer.cache.next_due().is_none() && writer.cache.records.is_empty());
    writer.commit(&mut Vec::new(), true);
    let txn = writer.store.as_ref().unwrap().db.begin_read().unwrap();
    assert_eq!(txn.open_table(SAGAS).unwrap().len().unwrap(), 0, "no record left behind");
    assert_eq!(txn.open_table(IDS).unwrap().len().unwrap(), 0);
    assert_eq!(writer.shared.counters.stored.load(Ordering::Relaxed), 3);
}
