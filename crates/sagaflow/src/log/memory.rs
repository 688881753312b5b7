//! The in-memory saga log: fast, bounded, and gone with the process.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{Begin, ListFilter, LogError, Retention, SagaLog, Tombstone};
use crate::saga::{NewSaga, SagaEvent, SagaRecord, SagaStatus, now_ms};

/// Keeps sagas in a map; ended ones, and the tombstones of those pruned, only within the
/// [`Retention`]. Pruning runs whenever a saga ends, and on [`prune_now`](Self::prune_now).
///
/// A running saga is held as its record; an ended one as its record encoded (JSON, as the
/// durable logs store it), beside what listing and pruning read of it. The retention holds
/// ended sagas by the hundred thousand, and a record kept whole is dozens of small blocks (its
/// strings, its history, its flow data's tree): encoded it is one block of about a third of
/// the size, and the heap grows that much less while the retention fills.
#[derive(Debug)]
pub struct MemorySagaLog {
    state: Mutex<State>,
    retention: Retention,
    /// Operators' switches, sorted by key.
    controls: Mutex<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Default)]
struct State {
    /// Sized for the retention up front: growing a map of that many entries under the lock
    /// would stall every saga while it copies them (up to 160 ms at the default retention).
    sagas: HashMap<String, Held>,
    /// Every saga's position in the list order (newest first, ties by request id), so that
    /// a page is read from where it starts rather than sorted out of every saga.
    by_created: BTreeSet<(Reverse<u64>, String)>,
    /// Ended sagas by the time they ended, oldest first.
    ended: VecDeque<(u64, String)>,
    /// What is left of the pruned sagas, by request id.
    tombstones: HashMap<String, Tombstone>,
    /// Tombstones by the time their record was pruned, oldest first.
    pruned: VecDeque<(u64, String)>,
    /// The facade names of the ended sagas held, one copy each.
    facades: HashSet<Arc<str>>,
    /// Where an ended saga's record is encoded before its exact-size copy is held.
    encoding: Vec<u8>,
}

/// The most room the encoding buffer keeps between records: one unusually large record does
/// not pin its size.
const KEPT_ROOM: usize = 64 << 10;

/// One saga as the log holds it.
#[derive(Debug)]
enum Held {
    /// Its record as it is: a running saga, an ended one whose callback is still to be
    /// recorded (that write follows soon: it is encoded after it), or one whose record could
    /// not be encoded (which never happens with flow data from JSON).
    Record(Box<SagaRecord>),
    /// An ended saga, encoded.
    Ended(Ended),
}

/// An ended saga's record, encoded, and what listing and pruning read of it.
#[derive(Debug)]
struct Ended {
    created_ms: u64,
    status: SagaStatus,
    facade: Arc<str>,
    json: Box<[u8]>,
}

impl Held {
    fn is_ended(&self) -> bool {
        match self {
            Held::Record(record) => record.state.is_ended(),
            Held::Ended(_) => true,
        }
    }

    fn created_ms(&self) -> u64 {
        match self {
            Held::Record(record) => record.created_ms,
            Held::Ended(ended) => ended.created_ms,
        }
    }

    /// Whether `filter` takes saga `request_id`, read without decoding it.
    fn matches(&self, request_id: &str, filter: &ListFilter) -> bool {
        match self {
            Held::Record(record) => filter.matches(record),
            Held::Ended(ended) => {
                filter.in_window(ended.created_ms, request_id)
                    && filter.facade.as_deref().is_none_or(|f| &*ended.facade == f)
                    && filter.status.is_none_or(|s| ended.status == s)
            }
        }
    }

    /// A copy of the record.
    fn record(&self, request_id: &str) -> Result<SagaRecord, LogError> {
        match self {
            Held::Record(record) => Ok(SagaRecord::clone(record)),
            Held::Ended(ended) => ended.decode(request_id),
        }
    }

    /// The record, to change: an ended saga's is decoded and held as a record again.
    fn thaw(&mut self, request_id: &str) -> Result<&mut SagaRecord, LogError> {
        if let Held::Ended(ended) = self {
            *self = Held::Record(Box::new(ended.decode(request_id)?));
        }
        match self {
            Held::Record(record) => Ok(record),
            Held::Ended(_) => Err(LogError::corrupt_msg(format!("saga `{request_id}` could not be thawed"))),
        }
    }

    /// Holds an ended saga's record encoded (in `encoding`, then copied) from now on, and
    /// returns the record itself; `None` if it is not an ended saga's record, its callback is
    /// still to be recorded, or it could not be encoded (it is then kept as it is).
    fn freeze(&mut self, facades: &mut HashSet<Arc<str>>, encoding: &mut Vec<u8>) -> Option<SagaRecord> {
        let Held::Record(record) = self else { return None };
        if !record.state.is_ended() || record.callback_pending() {
            return None;
        }
        encoding.clear();
        serde_json::to_writer(&mut *encoding, &**record).ok()?;
        let json = Box::from(encoding.as_slice());
        encoding.shrink_to(KEPT_ROOM);
        let facade = match facades.get(record.facade.as_str()) {
            Some(facade) => facade.clone(),
            None => {
                let facade: Arc<str> = record.facade.as_str().into();
                facades.insert(facade.clone());
                facade
            }
        };
        let ended = Ended { created_ms: record.created_ms, status: record.status(), facade, json };
        match std::mem::replace(self, Held::Ended(ended)) {
            Held::Record(record) => Some(*record),
            Held::Ended(_) => None,
        }
    }
}

impl Ended {
    fn decode(&self, request_id: &str) -> Result<SagaRecord, LogError> {
        serde_json::from_slice(&self.json).map_err(|e| LogError::corrupt(format!("saga `{request_id}`"), e))
    }
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
    /// Applies the event and returns the record after it if `answer` (a queued append needs
    /// no copy of the record).
    fn apply_event(&self, request_id: &str, event: SagaEvent, answer: bool) -> Result<Option<SagaRecord>, LogError> {
        let mut state = self.lock();
        let State { sagas, facades, encoding, .. } = &mut *state;
        let held = sagas.get_mut(request_id).ok_or_else(|| LogError::NotFound(request_id.to_owned()))?;
        let record = held.thaw(request_id)?;
        let was_ended = record.state.is_ended();
        let applied = record.apply_owned(event);
        let (now_ended, ended_ms) = (record.state.is_ended(), record.updated_ms);
        // An ended saga goes back to being held encoded, refused event or not; its record
        // itself is the answer, else a copy of the one still held.
        let frozen = held.freeze(facades, encoding);
        applied?;
        let answer = match (answer, frozen) {
            (false, _) => None,
            (true, Some(record)) => Some(record),
            (true, None) => Some(held.record(request_id)?),
        };
        if now_ended && !was_ended {
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
            if !self.sagas.get(&id).is_some_and(Held::is_ended) {
                continue;
            }
            let Some(held) = self.sagas.remove(&id) else { continue };
            self.by_created.remove(&(Reverse(held.created_ms()), id.clone()));
            dropped += 1;
            if retention.keeps_tombstones() {
                let (facade, status) = match held {
                    Held::Record(record) => (record.facade, record.state.status()),
                    Held::Ended(ended) => (ended.facade.to_string(), ended.status),
                };
                let tombstone = Tombstone { request_id: id.clone(), facade, status, ended_ms, pruned_ms: now };
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
            return Ok(Begin::Exists(existing.record(&saga.request_id)?));
        }
        if let Some(tombstone) = state.tombstones.get(&saga.request_id) {
            return Ok(Begin::Pruned(tombstone.clone()));
        }
        let record = SagaRecord::new(saga);
        state.by_created.insert((Reverse(record.created_ms), record.request_id.clone()));
        state.sagas.insert(record.request_id.clone(), Held::Record(Box::new(record.clone())));
        Ok(Begin::Started(record))
    }

    async fn append(&self, request_id: &str, event: SagaEvent) -> Result<SagaRecord, LogError> {
        let record = self.apply_event(request_id, event, true)?;
        record.ok_or_else(|| LogError::NotFound(request_id.to_owned()))
    }

    async fn append_queued(&self, request_id: &str, event: SagaEvent) -> Result<(), LogError> {
        self.apply_event(request_id, event, false).map(drop)
    }

    async fn get(&self, request_id: &str) -> Result<Option<SagaRecord>, LogError> {
        self.lock().sagas.get(request_id).map(|held| held.record(request_id)).transpose()
    }

    async fn unfinished(&self) -> Result<Vec<SagaRecord>, LogError> {
        let state = self.lock();
        Ok(state
            .sagas
            .values()
            .filter_map(|held| match held {
                Held::Record(record) if !record.state.is_ended() => Some(SagaRecord::clone(record)),
                _ => None,
            })
            .collect())
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
            if let Some(held) = state.sagas.get(id)
                && held.matches(id, &filter)
            {
                out.push(held.record(id)?);
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

    /// Whether the log holds `id` encoded (as an ended saga) rather than as a record.
    fn held_encoded(log: &MemorySagaLog, id: &str) -> bool {
        matches!(log.lock().sagas.get(id), Some(Held::Ended(_)))
    }

    #[tokio::test]
    async fn an_ended_saga_is_held_encoded_and_read_back_whole() {
        let log = MemorySagaLog::new();
        log.begin(new_saga("running")).await.unwrap();
        log.begin(NewSaga { data: json!({"order": {"id": 7, "lines": [1, 2.5, "x"]}}), ..new_saga("done") })
            .await
            .unwrap();
        log.append("done", SagaEvent::StepStarted { index: 0 }).await.unwrap();
        let data = json!({"order": {"id": 7, "lines": [1, 2.5, "x"]}, "paid": true});
        let ended = log.append("done", SagaEvent::StepCompleted { index: 0, attempts: 2, data }).await.unwrap();
        assert_eq!(ended.status(), SagaStatus::Completed);

        assert!(held_encoded(&log, "done"));
        assert!(!held_encoded(&log, "running"));
        assert_eq!(log.get("done").await.unwrap(), Some(ended.clone()));
        assert!(matches!(log.begin(new_saga("done")).await.unwrap(), Begin::Exists(r) if r == ended));
        let listed = log.list(ListFilter { facade: Some("F".into()), ..ListFilter::default() }).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed.iter().find(|r| r.request_id == "done"), Some(&ended));
        let other = ListFilter { facade: Some("G".into()), ..ListFilter::default() };
        assert!(log.list(other).await.unwrap().is_empty());
        assert_eq!(log.unfinished().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_ended_saga_awaiting_its_callback_is_encoded_once_the_delivery_is_recorded() {
        let log = MemorySagaLog::new();
        let callback_url = Some("http://127.0.0.1:9/done".to_owned());
        log.begin(NewSaga { mode: Mode::Async, callback_url, ..new_saga("a") }).await.unwrap();
        log.append("a", SagaEvent::StepStarted { index: 0 }).await.unwrap();
        let ended = log.append("a", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
        assert_eq!(ended.status(), SagaStatus::Completed);
        assert!(!held_encoded(&log, "a"), "the delivery's write follows: not encoded before it");
        assert_eq!(log.get("a").await.unwrap(), Some(ended));

        let delivered = SagaEvent::CallbackDelivered { delivered: true, attempts: 1, error: None };
        let after = log.append("a", delivered).await.unwrap();
        assert!(!after.callback_pending());
        assert!(held_encoded(&log, "a"));
        assert_eq!(log.get("a").await.unwrap(), Some(after));
    }

    #[tokio::test]
    async fn a_refused_event_leaves_an_ended_saga_encoded_and_unchanged() {
        let log = MemorySagaLog::new();
        run_to_end(&log, "a").await;
        let before = log.get("a").await.unwrap();
        let refused = log.append("a", SagaEvent::StepStarted { index: 0 }).await;
        assert!(matches!(refused, Err(LogError::Transition(_))), "{refused:?}");
        assert!(held_encoded(&log, "a"));
        assert_eq!(log.get("a").await.unwrap(), before);
    }

    #[tokio::test]
    async fn a_stuck_saga_retried_runs_from_its_record_again_and_is_listed_by_its_new_status() {
        let log = MemorySagaLog::new();
        log.begin(NewSaga { steps: 2, ..new_saga("s") }).await.unwrap();
        log.append("s", SagaEvent::StepStarted { index: 0 }).await.unwrap();
        log.append("s", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
        log.append("s", SagaEvent::StepStarted { index: 1 }).await.unwrap();
        let failure = crate::saga::Failure { step: 1, node: "B".into(), error: "no".into(), code: None };
        let failed =
            SagaEvent::StepFailed { failure, attempts: 1, compensate_failed: false, later_steps_in_doubt: false };
        log.append("s", failed).await.unwrap();
        let gave_up = SagaEvent::CompensationGaveUp { index: 0, attempts: 3, reason: "down".into() };
        let stuck = log.append("s", gave_up).await.unwrap();
        assert_eq!(stuck.status(), SagaStatus::Stuck);
        assert!(held_encoded(&log, "s"));
        let stuck_ones = ListFilter { status: Some(SagaStatus::Stuck), ..ListFilter::default() };
        assert_eq!(log.list(stuck_ones.clone()).await.unwrap(), [stuck]);

        let retried = log.append("s", SagaEvent::RetryCompensation { by: None, reason: None }).await.unwrap();
        assert_eq!(retried.status(), SagaStatus::Compensating);
        assert!(!held_encoded(&log, "s"));
        assert!(log.list(stuck_ones).await.unwrap().is_empty());
        assert_eq!(log.unfinished().await.unwrap(), [retried]);
        // Still held against pruning: it is not ended any more.
        assert_eq!(log.prune_now(), 0);
        assert!(log.get("s").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn unknown_sagas_and_bad_transitions_are_errors() {
        let log = MemorySagaLog::new();
        assert!(matches!(log.append("nope", SagaEvent::StepStarted { index: 0 }).await, Err(LogError::NotFound(_))));
        log.begin(new_saga("a")).await.unwrap();
        assert!(matches!(log.append("a", SagaEvent::StepStarted { index: 3 }).await, Err(LogError::Transition(_))));
    }
}
