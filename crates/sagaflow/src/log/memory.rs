//! The in-memory saga log: fast, bounded, and gone with the process.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::{Begin, ListFilter, LogError, Retention, SagaLog, Tombstone};
use crate::saga::{NewSaga, SagaEvent, SagaRecord, now_ms};

/// Keeps sagas in a map; ended ones, and the tombstones of those pruned, only within the
/// [`Retention`]. Pruning runs whenever a saga ends, and on [`prune_now`](Self::prune_now).
#[derive(Debug)]
pub struct MemorySagaLog {
    state: Mutex<State>,
    retention: Retention,
    /// Operators' switches, sorted by key.
    controls: Mutex<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Default)]
struct State {
    /// Boxed, and sized for the retention up front: growing a map of whole records under the
    /// lock would stall every saga while it copies them (up to 160 ms at the default retention).
    sagas: HashMap<String, Box<SagaRecord>>,
    /// Every saga's position in the list order (newest first, ties by request id), so that
    /// a page is read from where it starts rather than sorted out of every saga.
    by_created: BTreeSet<(Reverse<u64>, String)>,
    /// Ended sagas by the time they ended, oldest first.
    ended: VecDeque<(u64, String)>,
    /// What is left of the pruned sagas, by request id.
    tombstones: HashMap<String, Tombstone>,
    /// Tombstones by the time their record was pruned, oldest first.
    pruned: VecDeque<(u64, String)>,
}

impl Default for MemorySagaLog {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySagaLog {
    /// An empty log with the default retention.
    pub fn new() -> Self {
        Self::with_retention(Retention::default())
    }

    /// An empty log keeping ended sagas within `retention`.
    pub fn with_retention(retention: Retention) -> Self {
        // A few MiB at the default retention (100,000 ended sagas): far less than the records.
        let ended = retention.max_ended.min(Self::PRESIZE_LIMIT);
        let state = State {
            sagas: HashMap::with_capacity(ended + 1024),
            ended: VecDeque::with_capacity(ended),
            ..State::default()
        };
        Self { state: Mutex::new(state), retention, controls: Mutex::default() }
    }

    /// Above this many ended sagas, the maps grow on demand rather than up front.
    const PRESIZE_LIMIT: usize = 1 << 20;

    /// Number of sagas held, running and ended.
    pub fn len(&self) -> usize {
        self.lock().sagas.len()
    }

    /// Whether the log holds no saga.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tombstones held (see [`Tombstone`]).
    pub fn tombstones(&self) -> usize {
        self.lock().tombstones.len()
    }

    /// Drops the ended sagas past the retention now, each leaving a tombstone, and the
    /// tombstones past theirs; returns how many sagas it dropped. The log prunes whenever a
    /// saga ends too.
    pub fn prune_now(&self) -> usize {
        self.lock().prune(&self.retention, now_ms())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MemorySagaLog {
    /// Applies the event and returns `answer` of the record after it (a queued append needs
    /// no copy of the record).
    fn apply_event<T>(
        &self,
        request_id: &str,
        event: SagaEvent,
        answer: impl FnOnce(&SagaRecord) -> T,
    ) -> Result<T, LogError> {
        let mut state = self.lock();
        let record = state.sagas.get_mut(request_id).ok_or_else(|| LogError::NotFound(request_id.to_owned()))?;
        let was_ended = record.state.is_ended();
        record.apply_owned(event)?;
        let ended = record.state.is_ended() && !was_ended;
        let answer = answer(record);
        if ended {
            let ended_ms = record.updated_ms;
            state.ended.push_back((ended_ms, request_id.to_owned()));
            state.prune(&self.retention, now_ms());
        }
        Ok(answer)
    }
}

impl State {
    /// Drops the ended sagas past the retention, each leaving a tombstone, then the tombstones
    /// past it; returns how many sagas it dropped.
    fn prune(&mut self, retention: &Retention, now: u64) -> usize {
        let cutoff = retention.ended_cutoff_ms(now);
        let mut dropped = 0;
        while let Some((ended_ms, _)) = self.ended.front() {
            let too_many = self.ended.len() > retention.max_ended;
            let too_old = *ended_ms < cutoff;
            if !(too_many || too_old) {
                break;
            }
            let Some((ended_ms, id)) = self.ended.pop_front() else { break };
            // Only drop it if it is still ended (a retried stuck saga may run again).
            if !self.sagas.get(&id).is_some_and(|r| r.state.is_ended()) {
                continue;
            }
            let Some(record) = self.sagas.remove(&id) else { continue };
            self.by_created.remove(&(Reverse(record.created_ms), id.clone()));
            dropped += 1;
            if retention.keeps_tombstones() {
                let tombstone = Tombstone {
                    request_id: id.clone(),
                    facade: record.facade,
                    status: record.state.status(),
                    ended_ms,
                    pruned_ms: now,
                };
                self.pruned.push_back((now, id.clone()));
                self.tombstones.insert(id, tombstone);
            }
        }
        let cutoff = retention.tombstone_cutoff_ms(now);
        while let Some((pruned_ms, _)) = self.pruned.front() {
            if self.pruned.len() <= retention.max_tombstones && *pruned_ms >= cutoff {
                break;
            }
            let Some((pruned_ms, id)) = self.pruned.pop_front() else { break };
            // Only if it is still this tombstone (the request id may have been pruned again since).
            if self.tombstones.get(&id).is_some_and(|t| t.pruned_ms == pruned_ms) {
                self.tombstones.remove(&id);
            }
        }
        dropped
    }
}

#[async_trait]
impl SagaLog for MemorySagaLog {
    async fn begin(&self, saga: NewSaga) -> Result<Begin, LogError> {
        let mut state = self.lock();
        if let Some(existing) = state.sagas.get(&saga.request_id) {
            return Ok(Begin::Exists(SagaRecord::clone(existing)));
        }
        if let Some(tombstone) = state.tombstones.get(&saga.request_id) {
            return Ok(Begin::Pruned(tombstone.clone()));
        }
        let record = SagaRecord::new(saga);
        state.by_created.insert((Reverse(record.created_ms), record.request_id.clone()));
        state.sagas.insert(record.request_id.clone(), Box::new(record.clone()));
        Ok(Begin::Started(record))
    }

    async fn append(&self, request_id: &str, event: SagaEvent) -> Result<SagaRecord, LogError> {
        self.apply_event(request_id, event, SagaRecord::clone)
    }

    async fn append_queued(&self, request_id: &str, event: SagaEvent) -> Result<(), LogError> {
        self.apply_event(request_id, event, |_| ())
    }

    async fn get(&self, request_id: &str) -> Result<Option<SagaRecord>, LogError> {
        Ok(self.lock().sagas.get(request_id).map(|r| SagaRecord::clone(r)))
    }

    async fn unfinished(&self) -> Result<Vec<SagaRecord>, LogError> {
        Ok(self.lock().sagas.values().filter(|r| !r.state.is_ended()).map(|r| SagaRecord::clone(r)).collect())
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<SagaRecord>, LogError> {
        let state = self.lock();
        let limit = if filter.limit == 0 { usize::MAX } else { filter.limit };
        // The first position the window and the cursor allow; `matches` leaves out the cursor's
        // own saga.
        let mut start = (Reverse(u64::MAX), String::new());
        if let Some(until) = filter.until_ms {
            let Some(newest) = until.checked_sub(1) else { return Ok(Vec::new()) };
            start = start.max((Reverse(newest), String::new()));
        }
        if let Some(after) = &filter.after {
            start = start.max((Reverse(after.created_ms), after.request_id.clone()));
        }
        let oldest = filter.since_ms.unwrap_or(0);
        let mut out = Vec::new();
        for (Reverse(created_ms), id) in state.by_created.range(start..) {
            if *created_ms < oldest || out.len() >= limit {
                break;
            }
            if let Some(record) = state.sagas.get(id)
                && filter.matches(record)
            {
                out.push(SagaRecord::clone(record));
            }
        }
        Ok(out)
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    async fn controls(&self) -> Result<Vec<(String, String)>, LogError> {
        let controls = self.controls.lock().unwrap_or_else(|e| e.into_inner());
        Ok(controls.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    async fn set_control(&self, key: &str, value: Option<&str>) -> Result<(), LogError> {
        let mut controls = self.controls.lock().unwrap_or_else(|e| e.into_inner());
        match value {
            Some(value) => controls.insert(key.to_owned(), value.to_owned()),
            None => controls.remove(key),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::saga::{Mode, SagaStatus};

    fn new_saga(id: &str) -> NewSaga {
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

    async fn run_to_end(log: &MemorySagaLog, id: &str) {
        log.begin(new_saga(id)).await.unwrap();
        log.append(id, SagaEvent::StepStarted { index: 0 }).await.unwrap();
        let r = log.append(id, SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
        assert_eq!(r.status(), SagaStatus::Completed);
    }

    #[tokio::test]
    async fn begin_is_idempotent_per_request_id() {
        let log = MemorySagaLog::new();
        assert!(matches!(log.begin(new_saga("a")).await.unwrap(), Begin::Started(_)));
        assert!(matches!(log.begin(new_saga("a")).await.unwrap(), Begin::Exists(_)));
        assert_eq!(log.len(), 1);
    }

    #[tokio::test]
    async fn ended_sagas_beyond_the_count_are_dropped_but_running_ones_stay() {
        let log = MemorySagaLog::with_retention(Retention {
            max_age: Duration::from_secs(3600),
            max_ended: 3,
            ..Retention::default()
        });
        log.begin(new_saga("running")).await.unwrap();
        for i in 0..10 {
            run_to_end(&log, &format!("s{i}")).await;
        }
        assert_eq!(log.len(), 4);
        assert!(log.get("running").await.unwrap().is_some());
        assert!(log.get("s9").await.unwrap().is_some());
        assert!(log.get("s0").await.unwrap().is_none());
        assert_eq!(log.unfinished().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn ended_sagas_past_their_age_are_dropped() {
        let log = MemorySagaLog::with_retention(Retention {
            max_age: Duration::ZERO,
            max_ended: 1000,
            ..Retention::default()
        });
        run_to_end(&log, "old").await;
        std::thread::sleep(Duration::from_millis(5));
        run_to_end(&log, "new").await;
        assert!(log.get("old").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn tombstones_are_bounded_by_their_count_and_none_are_kept_at_zero() {
        let retention = Retention { max_ended: 0, max_tombstones: 3, ..Retention::default() };
        let log = MemorySagaLog::with_retention(retention);
        for i in 0..10 {
            run_to_end(&log, &format!("s{i}")).await;
        }
        assert_eq!((log.len(), log.tombstones()), (0, 3));
        assert!(matches!(log.begin(new_saga("s9")).await.unwrap(), Begin::Pruned(_)));
        assert!(matches!(log.begin(new_saga("s6")).await.unwrap(), Begin::Started(_)));

        let log = MemorySagaLog::with_retention(Retention { max_tombstones: 0, ..retention });
        run_to_end(&log, "s0").await;
        assert_eq!((log.len(), log.tombstones()), (0, 0));
        assert!(matches!(log.begin(new_saga("s0")).await.unwrap(), Begin::Started(_)));
    }

    #[tokio::test]
    async fn list_filters_by_status() {
        let log = MemorySagaLog::new();
        log.begin(new_saga("running")).await.unwrap();
        run_to_end(&log, "done").await;
        let filter = ListFilter { status: Some(SagaStatus::Completed), ..ListFilter::default() };
        let done = log.list(filter).await.unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].request_id, "done");
    }

    #[tokio::test]
    async fn pruned_sagas_leave_the_list_order_too() {
        let log = MemorySagaLog::with_retention(Retention { max_ended: 3, ..Retention::default() });
        log.begin(new_saga("running")).await.unwrap();
        for i in 0..10 {
            run_to_end(&log, &format!("s{i}")).await;
        }
        {
            let state = log.lock();
            assert_eq!(state.by_created.len(), state.sagas.len());
            assert!(state.by_created.iter().all(|(_, id)| state.sagas.contains_key(id)));
        }
        let ids: Vec<String> = log
            .list(ListFilter { limit: 2, ..ListFilter::default() })
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.iter().all(|id| id != "s0"));
    }

    #[tokio::test]
    async fn unknown_sagas_and_bad_transitions_are_errors() {
        let log = MemorySagaLog::new();
        assert!(matches!(log.append("nope", SagaEvent::StepStarted { index: 0 }).await, Err(LogError::NotFound(_))));
        log.begin(new_saga("a")).await.unwrap();
        assert!(matches!(log.append("a", SagaEvent::StepStarted { index: 3 }).await, Err(LogError::Transition(_))));
    }
}
