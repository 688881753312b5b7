//! Retention: ended sagas past their age or beyond the count are deleted, each leaving a
//! tombstone ([`crate::tombstones`]), and the tombstones past theirs after them, a bounded chunk
//! per transaction, by the writer thread (every `prune_interval`) or on demand.

use redb::{ReadableTable, ReadableTableMetadata};
use sagaflow::SagaStatus;
use sagaflow::log::{LogError, Retention, Tombstone};
use serde::Deserialize;

use crate::error::Result;
use crate::store::{RedbSagaLog, Request, Tables};

/// What one prune chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pruned {
    /// Sagas deleted.
    pub(crate) removed: usize,
    /// Tombstones deleted.
    pub(crate) expired: usize,
    /// Whether more may be due (a chunk was full).
    pub(crate) more: bool,
    /// Ended sagas left in the file.
    pub(crate) ended_left: usize,
}

impl RedbSagaLog {
    /// Deletes every ended saga past the retention now, leaving its tombstone, and the
    /// tombstones past theirs; returns how many sagas it deleted.
    ///
    /// The writer does this by itself every `prune_interval`; this is for tests and operators.
    pub async fn prune_now(&self) -> Result<usize, LogError> {
        self.prune_at(sagaflow::now_ms()).await
    }

    /// [`prune_now`](Self::prune_now) as if the clock read `now_ms`.
    pub(crate) async fn prune_at(&self, now_ms: u64) -> Result<usize, LogError> {
        let mut removed = 0;
        loop {
            let pruned = self.call(|reply| Request::Prune(now_ms, reply)).await?;
            removed += pruned.removed;
            if !pruned.more {
                return Ok(removed);
            }
        }
    }
}

/// The only parts of a record pruning needs: its `by_created` and `ids` keys, and what its
/// tombstone keeps.
#[derive(Deserialize)]
struct Keys {
    request_id: String,
    created_ms: u64,
    facade: String,
    state: State,
}

#[derive(Deserialize)]
struct State {
    status: SagaStatus,
}

impl Tables<'_> {
    /// Deletes up to `chunk` ended sagas, oldest first, that are beyond `max_ended` or ended
    /// more than `max_age` before `now_ms`, each leaving a tombstone if the retention keeps
    /// them; then up to `chunk` tombstones past theirs.
    pub(crate) fn prune(&mut self, retention: &Retention, now_ms: u64, chunk: usize) -> Result<Pruned> {
        let ended = usize::try_from(self.ended.len()?).unwrap_or(usize::MAX);
        let excess = ended.saturating_sub(retention.max_ended);
        // Too old means `now - ended > max_age`, as in the in-memory log.
        let cutoff = retention.ended_cutoff_ms(now_ms);
        let mut doomed: Vec<(u64, u64)> = Vec::new();
        for entry in self.ended.iter()? {
            if doomed.len() >= chunk {
                break;
            }
            let (key, _) = entry?;
            let (ended_ms, seq) = key.value();
            if doomed.len() < excess || ended_ms < cutoff {
                doomed.push((ended_ms, seq));
            } else {
                break;
            }
        }
        for &(ended_ms, seq) in &doomed {
            self.ended.remove((ended_ms, seq))?;
            self.ended_at.remove(seq)?;
            if self.unfinished.get(seq)?.is_some() {
                // Indexes out of step: the saga runs again, so keep it whatever `ended` said.
                tracing::warn!(seq, "saga in both `ended` and `unfinished`; kept");
                continue;
            }
            let keys = match self.sagas.remove(seq)? {
                Some(bytes) => serde_json::from_slice::<Keys>(bytes.value()).ok(),
                None => None,
            };
            match keys {
                Some(Keys { request_id, created_ms, facade, state }) => {
                    self.by_created.remove((created_ms, seq))?;
                    // Only if it still names this saga (it always should).
                    if self.ids.get(request_id.as_str())?.is_some_and(|s| s.value() == seq) {
                        self.ids.remove(request_id.as_str())?;
                    }
                    if retention.keeps_tombstones() {
                        let status = state.status;
                        self.bury(&Tombstone { request_id, facade, status, ended_ms, pruned_ms: now_ms })?;
                    }
                }
                // Its request id and creation time are unknown: a listing skips a `by_created`
                // entry without a record, but an `ids` entry must not outlive it, or it would
                // name whichever saga gets this number next (numbers restart above the highest
                // one stored when the log is opened). A scan, on this rare path only.
                None => {
                    tracing::warn!(seq, "pruned saga had no readable record");
                    self.ids.retain(|_, s| s != seq)?;
                }
            }
        }
        let (expired, more_tombstones) = self.expire_tombstones(retention, now_ms, chunk)?;
        Ok(Pruned {
            removed: doomed.len(),
            expired,
            more: doomed.len() >= chunk || more_tombstones,
            ended_left: ended - doomed.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sagaflow::log::{Begin, ListFilter, SagaEvent, SagaLog};

    use super::*;
    use crate::RedbOptions;
    use crate::store::tests::{crash_image, new_saga, open, run_to_end, run_to_stuck};

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn ended_sagas_beyond_the_count_are_dropped_oldest_first_but_running_ones_stay() {
        let (_dir, log) = open(Retention { max_age: HOUR, max_ended: 3, ..Retention::default() });
        log.begin(new_saga("running")).await.unwrap();
        for i in 0..10 {
            run_to_end(&log, &format!("s{i}")).await;
        }
        assert_eq!(log.prune_now().await.unwrap(), 7);
        let left: Vec<_> = log.list(ListFilter::default()).await.unwrap().into_iter().map(|r| r.request_id).collect();
        assert_eq!(left.len(), 4, "{left:?}");
        assert!(left.contains(&"running".to_owned()));
        for kept in ["s7", "s8", "s9"] {
            assert!(log.get(kept).await.unwrap().is_some(), "{kept}");
        }
        assert!(log.get("s0").await.unwrap().is_none());
        assert_eq!(log.unfinished().await.unwrap().len(), 1);
        assert_eq!(log.prune_now().await.unwrap(), 0, "nothing more is due");
        assert_eq!(log.stats().pruned, 7);
    }

    #[tokio::test]
    async fn ended_sagas_past_their_age_are_dropped_but_running_and_stuck_retried_ones_stay() {
        let (_dir, log) = open(Retention { max_age: HOUR, max_ended: 1000, ..Retention::default() });
        log.begin(new_saga("running")).await.unwrap();
        run_to_stuck(&log, "retried").await;
        log.append("retried", SagaEvent::RetryCompensation { by: None, reason: None }).await.unwrap();
        run_to_stuck(&log, "stuck").await;
        let done = run_to_end(&log, "done").await;

        let first_ended = log.get("stuck").await.unwrap().unwrap().updated_ms;
        assert_eq!(log.prune_at(first_ended + HOUR.as_millis() as u64).await.unwrap(), 0, "none older than 1 h");
        let later = done.updated_ms + 2 * HOUR.as_millis() as u64;
        assert_eq!(log.prune_at(later).await.unwrap(), 2);
        assert!(log.get("done").await.unwrap().is_none());
        assert!(log.get("stuck").await.unwrap().is_none());
        let mut left: Vec<_> = log.unfinished().await.unwrap().into_iter().map(|r| r.request_id).collect();
        left.sort();
        assert_eq!(left, ["retried", "running"]);
        assert_eq!(log.list(ListFilter::default()).await.unwrap().len(), 2, "the listing index is pruned too");
    }

    #[tokio::test]
    async fn an_unreadable_record_is_pruned_without_leaving_its_request_id_behind() {
        let (_dir, log) = open(Retention { max_age: HOUR, max_ended: 0, ..Retention::default() });
        run_to_end(&log, "bad").await;
        run_to_end(&log, "good").await;
        log.sync().await.unwrap();
        {
            let txn = log.db_for_tests().begin_write().unwrap();
            let seq = txn.open_table(crate::store::tables::IDS).unwrap().get("bad").unwrap().unwrap().value();
            txn.open_table(crate::store::tables::SAGAS).unwrap().insert(seq, b"{not json".as_slice()).unwrap();
            txn.commit().unwrap();
        }
        assert_eq!(log.prune_now().await.unwrap(), 2);
        let txn = redb::ReadableDatabase::begin_read(&*log.db_for_tests()).unwrap();
        assert!(
            txn.open_table(crate::store::tables::IDS).unwrap().is_empty().unwrap(),
            "no request id outlives its saga"
        );
    }

    #[tokio::test]
    async fn pruning_runs_in_bounded_chunks_until_done() {
        let dir = tempfile::tempdir().unwrap();
        let options = RedbOptions::new(dir.path())
            .retention(Retention { max_age: HOUR, max_ended: 0, ..Retention::default() })
            .prune_interval(Duration::MAX)
            .prune_chunk(3);
        let log = RedbSagaLog::open(options).unwrap();
        for i in 0..10 {
            run_to_end(&log, &format!("s{i}")).await;
        }
        let pruned = log.call(|reply| Request::Prune(sagaflow::now_ms(), reply)).await.unwrap();
        assert_eq!(pruned, Pruned { removed: 3, expired: 0, more: true, ended_left: 7 });
        assert_eq!(log.prune_now().await.unwrap(), 7);
        assert!(log.list(ListFilter::default()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_writer_prunes_by_itself_every_interval() {
        let dir = tempfile::tempdir().unwrap();
        let options = RedbOptions::new(dir.path())
            .retention(Retention { max_age: HOUR, max_ended: 0, ..Retention::default() })
            .prune_interval(Duration::from_millis(20));
        let log = RedbSagaLog::open(options).unwrap();
        log.begin(new_saga("running")).await.unwrap();
        run_to_end(&log, "done").await;
        // The writer thread runs on the real clock: wait (bounded) for it to get there.
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.get("done").await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "the writer never pruned");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(log.stats().pruned, 1);
        assert!(log.get("running").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_crash_after_pruning_keeps_the_tombstone_and_what_came_after() {
        let options = |dir: &std::path::Path| {
            RedbOptions::new(dir)
                .retention(Retention { max_ended: 0, ..Retention::default() })
                .prune_interval(Duration::MAX)
                .checkpoint_interval(Duration::from_secs(3600))
        };
        let dir = tempfile::tempdir().unwrap();
        let log = RedbSagaLog::open(options(dir.path())).unwrap();
        let paid = run_to_end(&log, "paid").await;
        assert_eq!(log.prune_now().await.unwrap(), 1);
        // After the prune's commit, only in the write-ahead file: a new saga, and one that ends.
        log.begin(new_saga("after")).await.unwrap();
        run_to_end(&log, "ended-after").await;

        let image = crash_image(dir.path(), true);
        let reopened = RedbSagaLog::open(options(image.path())).unwrap();
        match reopened.begin(new_saga("paid")).await.unwrap() {
            Begin::Pruned(tombstone) => {
                assert_eq!((tombstone.status, tombstone.ended_ms), (paid.status(), paid.updated_ms));
            }
            other => panic!("the pruned request id after a crash: {other:?}"),
        }
        assert_eq!(reopened.get("paid").await.unwrap(), None, "the replay brings no pruned saga back");
        assert_eq!(reopened.get("after").await.unwrap(), log.get("after").await.unwrap());
        assert!(matches!(reopened.begin(new_saga("after")).await.unwrap(), Begin::Exists(_)));
        assert_eq!(reopened.prune_now().await.unwrap(), 1, "the saga that ended after the prune goes next");
        assert!(matches!(reopened.begin(new_saga("ended-after")).await.unwrap(), Begin::Pruned(_)));
    }

    #[tokio::test]
    async fn tombstones_beyond_the_count_go_oldest_first_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let options = RedbOptions::new(dir.path())
            .retention(Retention { max_ended: 0, max_tombstones: 2, ..Retention::default() })
            .prune_interval(Duration::MAX)
            .prune_chunk(3);
        let log = RedbSagaLog::open(options).unwrap();
        for i in 0..10 {
            run_to_end(&log, &format!("s{i}")).await;
        }
        let first = log.call(|reply| Request::Prune(sagaflow::now_ms(), reply)).await.unwrap();
        assert_eq!(first, Pruned { removed: 3, expired: 1, more: true, ended_left: 7 });
        assert_eq!(log.prune_now().await.unwrap(), 7);
        let txn = redb::ReadableDatabase::begin_read(&*log.db_for_tests()).unwrap();
        let tombstones = txn.open_table(crate::store::tables::TOMBSTONES).unwrap();
        let by_pruned = txn.open_table(crate::store::tables::TOMBSTONES_BY_PRUNED).unwrap();
        assert_eq!((tombstones.len().unwrap(), by_pruned.len().unwrap()), (2, 2), "the count holds, in both tables");
        drop((tombstones, by_pruned, txn));
        for id in ["s8", "s9"] {
            assert!(matches!(log.begin(new_saga(id)).await.unwrap(), Begin::Pruned(_)), "{id}");
        }
        assert!(matches!(log.begin(new_saga("s0")).await.unwrap(), Begin::Started(_)), "the oldest tombstone went");
    }

    /// The ended sagas in the file, once it holds every write answered.
    async fn ended_in_file(log: &RedbSagaLog) -> u64 {
        log.sync().await.unwrap();
        let txn = redb::ReadableDatabase::begin_read(&*log.db_for_tests()).unwrap();
        txn.open_table(crate::store::tables::ENDED).unwrap().len().unwrap()
    }

    /// `tasks` callers each running `sagas` sagas to their end, one after the other.
    fn load(log: &std::sync::Arc<RedbSagaLog>, tasks: usize, sagas: usize) -> Vec<tokio::task::JoinHandle<()>> {
        (0..tasks)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..sagas {
                        run_to_end(&log, &format!("t{t}-s{i}")).await;
                    }
                })
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_steady_load_the_ended_sagas_kept_stay_at_the_retention_count() {
        let (max_ended, chunk, tasks, sagas) = (50, 10, 4, 150);
        let dir = tempfile::tempdir().unwrap();
        // The interval alone would prune once, at the start: the count keeps up by itself.
        let options = RedbOptions::new(dir.path())
            .retention(Retention { max_ended, ..Retention::default() })
            .prune_interval(HOUR)
            .prune_chunk(chunk);
        let log = std::sync::Arc::new(RedbSagaLog::open(options).unwrap());
        let callers = load(&log, tasks, sagas);
        let mut most = 0;
        let mut samples = 0;
        while !callers.iter().all(|caller| caller.is_finished()) {
            most = most.max(ended_in_file(&log).await);
            samples += 1;
        }
        for caller in callers {
            caller.await.unwrap();
        }
        // The last batches may have made a prune due by the count, which the writer runs after
        // them: read the ended sagas, the list and the pruned count once the log is still.
        let total = (tasks * sagas) as u64;
        let deadline = Instant::now() + Duration::from_secs(10);
        let left = loop {
            let left = ended_in_file(&log).await;
            let listed = log.list(ListFilter::default()).await.unwrap().len() as u64;
            let pruned = log.stats().pruned;
            if listed == left && pruned == total - left {
                break left;
            }
            assert!(Instant::now() < deadline, "{left} ended in the file, {listed} listed, {pruned} pruned of {total}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // At most the count, a chunk, and one batch's endings (one saga per caller).
        let bound = (max_ended + chunk + tasks) as u64;
        assert!(samples > 0);
        assert!(most <= bound, "{most} ended sagas kept at one point, over {bound}");
        assert!((max_ended as u64..=bound).contains(&left), "{left} ended sagas left");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sagas_past_their_age_are_pruned_while_load_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        // Every saga is past its age a millisecond after it ends; the count never binds.
        let options = RedbOptions::new(dir.path())
            .retention(Retention { max_age: Duration::ZERO, max_ended: 1_000_000, ..Retention::default() })
            .prune_interval(Duration::from_millis(10));
        let log = std::sync::Arc::new(RedbSagaLog::open(options).unwrap());
        let callers = load(&log, 2, 100_000);
        // The writer runs on the real clock: wait (bounded) for it to prune during the load.
        let deadline = Instant::now() + Duration::from_secs(30);
        while log.stats().pruned < 200 {
            assert!(Instant::now() < deadline, "nothing pruned by age under load: {:?}", log.stats());
            assert!(!callers.iter().any(|caller| caller.is_finished()), "the load ended first");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for caller in &callers {
            caller.abort();
        }
        // Once the load stops, the age prunes every saga that ended.
        while ended_in_file(&log).await > 0 {
            assert!(Instant::now() < deadline, "ended sagas left after the load: {:?}", log.stats());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
