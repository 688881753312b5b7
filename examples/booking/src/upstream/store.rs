//! The record store, counters and capacity gate shared by both mock services.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Deserializer};
use tonic::{Status, metadata::MetadataMap};

use crate::proto::upstream as pb;

/// The metadata key that names the saga a call belongs to.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";

/// How a mock service misbehaves: its latency, capacity and transient failure rate.
///
/// In yaml: `latency_ms`, `cancel_latency_ms`, `capacity`, `failure_rate` and `max_records`; every
/// key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockConfig {
    /// Time each call (except `Snapshot`) takes while holding its in-flight slot.
    #[serde(rename = "latency_ms", deserialize_with = "millis")]
    pub latency: Duration,
    /// Further time each cancel takes (a slow compensation), on top of `latency`.
    #[serde(rename = "cancel_latency_ms", deserialize_with = "millis")]
    pub cancel_latency: Duration,
    /// Most calls in flight at once; above it calls fail with `RESOURCE_EXHAUSTED`. 0 = unlimited.
    pub capacity: usize,
    /// Share of calls (0..=1) that fail with `UNAVAILABLE` before doing anything.
    pub failure_rate: f64,
    /// At most this many records (by request id) are remembered, the oldest forgotten first, so
    /// a long run holds a bounded memory. A retry or cancel of any of the last
    /// `max_records / 4` request ids is recognised; one older than the last `max_records` is not.
    pub max_records: usize,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            cancel_latency: Duration::ZERO,
            capacity: 0,
            failure_rate: 0.0,
            max_records: Self::DEFAULT_MAX_RECORDS,
        }
    }
}

impl MockConfig {
    /// Longest latency a mock may be configured with, in ms.
    pub const MAX_LATENCY_MS: u64 = 600_000;
    /// Largest capacity a mock may be configured with.
    pub const MAX_CAPACITY: usize = 1_000_000;
    /// Records remembered by default: about 13 MiB per mock.
    pub const DEFAULT_MAX_RECORDS: usize = 100_000;
    /// Fewest and most records a mock may be configured to remember.
    pub const MAX_RECORDS: std::ops::RangeInclusive<usize> = 1_000..=100_000_000;

    /// Checks the values a deserializer cannot; the error names the key (`latency_ms`, ...).
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(format!("failure_rate must be between 0 and 1, got {}", self.failure_rate));
        }
        let latency_ms = self.latency.as_millis();
        if latency_ms > u128::from(Self::MAX_LATENCY_MS) {
            return Err(format!("latency_ms must be between 0 and {}, got {latency_ms}", Self::MAX_LATENCY_MS));
        }
        if self.capacity > Self::MAX_CAPACITY {
            return Err(format!("capacity must be between 0 and {}, got {}", Self::MAX_CAPACITY, self.capacity));
        }
        if !Self::MAX_RECORDS.contains(&self.max_records) {
            let (low, high) = (Self::MAX_RECORDS.start(), Self::MAX_RECORDS.end());
            return Err(format!("max_records must be between {low} and {high}, got {}", self.max_records));
        }
        Ok(())
    }
}

fn millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_millis)
}

/// Where one request id's record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active,
    Cancelled,
    /// A cancel arrived before any create; later creates are refused.
    Tombstone,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Cancelled => "cancelled",
            Self::Tombstone => "tombstone",
        }
    }
}

#[derive(Debug, Clone)]
struct Record {
    id: i64,
    state: State,
    created_at_ms: i64,
    cancelled_at_ms: i64,
    cancel_calls: u64,
}

/// A successful create: the record's id, and whether it already existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Created {
    pub(crate) id: i64,
    pub(crate) duplicate: bool,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    creates: AtomicU64,
    cancels: AtomicU64,
    duplicates_absorbed: AtomicU64,
    peak_in_flight: AtomicUsize,
    rejected: AtomicU64,
    injected_failures: AtomicU64,
    refused_after_cancel: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// How many shards hold a mock's records.
const SHARDS: usize = 64;

/// One shard's records in two generations: new records go to `current`; when it is full, it
/// becomes `previous` and the records of the one before are forgotten. A shard thus holds at
/// most two generations' records, and always the last generation's worth.
#[derive(Debug, Default)]
struct Shard {
    current: HashMap<String, Record>,
    previous: HashMap<String, Record>,
}

impl Shard {
    fn get(&self, request_id: &str) -> Option<&Record> {
        self.current.get(request_id).or_else(|| self.previous.get(request_id))
    }

    /// The record, brought into the current generation first: a record that changes is as
    /// recent as a new one.
    fn get_mut(&mut self, request_id: &str, generation: usize) -> Option<&mut Record> {
        if !self.current.contains_key(request_id) {
            let (id, record) = self.previous.remove_entry(request_id)?;
            self.insert(id, record, generation);
        }
        self.current.get_mut(request_id)
    }

    fn insert(&mut self, request_id: String, record: Record, generation: usize) {
        if self.current.len() >= generation {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(request_id, record);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.current.iter().chain(&self.previous)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the map consistent, so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The records and counters of one mock service, keyed by request id.
#[derive(Debug)]
pub(crate) struct Store {
    /// "order" or "payment": names the service in error messages.
    kind: &'static str,
    config: MockConfig,
    /// The records in shards by request id: a shard grows (rehashing every record it holds) a
    /// few hundred records at a time, where one map would stall every call for tens of
    /// milliseconds each time it doubled past tens of thousands of records (faulting in a
    /// fresh table), and a benchmark's later legs would meet longer stalls than its first.
    shards: Box<[Mutex<Shard>]>,
    /// Records per generation of a shard.
    generation: usize,
    hasher: RandomState,
    next_id: AtomicI64,
    in_flight: AtomicUsize,
    counters: Counters,
    /// While set, every cancel fails with `UNAVAILABLE` (an upstream whose undo is down).
    fail_cancels: AtomicBool,
    /// Further time each create takes from now on, in ms (a forward step gone slow).
    create_delay_ms: AtomicU64,
}

/// Holds one in-flight slot; dropping it (on any path, cancellation included) frees the slot.
#[derive(Debug)]
pub(crate) struct InFlight<'a> {
    store: &'a Store,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.store.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Store {
    pub(crate) fn new(kind: &'static str, config: MockConfig) -> Self {
        Self {
            kind,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            generation: (config.max_records / SHARDS / 2).max(1),
            hasher: RandomState::new(),
            next_id: AtomicI64::new(1),
            in_flight: AtomicUsize::new(0),
            counters: Counters::default(),
            fail_cancels: AtomicBool::new(false),
            create_delay_ms: AtomicU64::new(0),
            config,
        }
    }

    /// Admits one call: checks its request id, rolls the failure dice, takes an
    /// in-flight slot and waits out the latency. The call runs while the guard lives.
    pub(crate) async fn enter(&self, metadata: &MetadataMap) -> Result<(String, InFlight<'_>), Status> {
        bump(&self.counters.calls);
        let request_id = request_id(metadata)?;
        if self.config.failure_rate > 0.0 && rand::random::<f64>() < self.config.failure_rate {
            bump(&self.counters.injected_failures);
            return Err(Status::unavailable("injected transient failure"));
        }
        let slot = self.admit()?;
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        Ok((request_id, slot))
    }

    /// Admits one create as [`enter`](Self::enter) does, then waits out the create delay too.
    pub(crate) async fn enter_create(&self, metadata: &MetadataMap) -> Result<(String, InFlight<'_>), Status> {
        let admitted = self.enter(metadata).await?;
        let delay = self.create_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        Ok(admitted)
    }

    /// Makes every later create take `delay` more (zero: as configured).
    pub(crate) fn set_create_delay(&self, delay: Duration) {
        self.create_delay_ms.store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Admits one cancel as [`enter`](Self::enter) does, then waits out `cancel_latency` too.
    pub(crate) async fn enter_cancel(&self, metadata: &MetadataMap) -> Result<(String, InFlight<'_>), Status> {
        let admitted = self.enter(metadata).await?;
        if !self.config.cancel_latency.is_zero() {
            tokio::time::sleep(self.config.cancel_latency).await;
        }
        Ok(admitted)
    }

    fn admit(&self) -> Result<InFlight<'_>, Status> {
        let capacity = self.config.capacity;
        // A CAS loop rather than add-then-check, so a rejected call never
        // briefly occupies a slot another call could have had.
        let mut current = self.in_flight.load(Ordering::Acquire);
        loop {
            if capacity > 0 && current >= capacity {
                bump(&self.counters.rejected);
                return Err(Status::resource_exhausted(format!(
                    "{} service over capacity ({current} in flight)",
                    self.kind
                )));
            }
            match self.in_flight.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.counters.peak_in_flight.fetch_max(current + 1, Ordering::Relaxed);
        Ok(InFlight { store: self })
    }

    /// The shard that holds `request_id`'s record.
    fn records(&self, request_id: &str) -> MutexGuard<'_, Shard> {
        let shard = self.hasher.hash_one(request_id) as usize % self.shards.len();
        lock(&self.shards[shard])
    }

    /// Creates the record for `request_id`, or returns the existing one.
    ///
    /// A cancelled or tombstoned request id is refused with `ABORTED` (a create
    /// that arrives after its compensation must not take effect). `precondition`
    /// runs only when a new record would be made; its error refuses the create.
    pub(crate) fn create(
        &self,
        request_id: &str,
        precondition: impl FnOnce() -> Result<(), Status>,
    ) -> Result<Created, Status> {
        let mut records = self.records(request_id);
        if let Some(record) = records.get(request_id) {
            return match record.state {
                State::Active => {
                    bump(&self.counters.duplicates_absorbed);
                    Ok(Created { id: record.id, duplicate: true })
                }
                State::Cancelled | State::Tombstone => {
                    bump(&self.counters.refused_after_cancel);
                    Err(Status::aborted(format!("{} for request {request_id} was cancelled", self.kind)))
                }
            };
        }
        precondition()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        records.insert(
            request_id.to_owned(),
            Record { id, state: State::Active, created_at_ms: now_ms(), cancelled_at_ms: 0, cancel_calls: 0 },
            self.generation,
        );
        bump(&self.counters.creates);
        Ok(Created { id, duplicate: false })
    }

    /// Counts and builds a `FAILED_PRECONDITION` refusal asked for by the caller.
    pub(crate) fn injected_refusal(&self) -> Status {
        bump(&self.counters.injected_failures);
        Status::failed_precondition(format!("{} refused: fault injected", self.kind))
    }

    /// Makes every later cancel fail with `UNAVAILABLE` (`true`) or work again (`false`).
    pub(crate) fn set_fail_cancels(&self, fail: bool) {
        self.fail_cancels.store(fail, Ordering::Relaxed);
    }

    /// Starts the peak in-flight count over from the calls in flight now, so a test can
    /// measure one phase of its load apart from what came before.
    pub(crate) fn reset_peak(&self) {
        self.counters.peak_in_flight.store(self.in_flight.load(Ordering::Acquire), Ordering::Relaxed);
    }

    /// Cancels the record for `request_id`, leaving a tombstone when there is none;
    /// fails with `UNAVAILABLE`, changing nothing, while cancels are set to fail.
    pub(crate) fn cancel(&self, request_id: &str) -> Result<pb::CancelReply, Status> {
        if self.fail_cancels.load(Ordering::Relaxed) {
            bump(&self.counters.injected_failures);
            return Err(Status::unavailable(format!("{} cancel unavailable (injected)", self.kind)));
        }
        let mut records = self.records(request_id);
        bump(&self.counters.cancels);
        match records.get_mut(request_id, self.generation) {
            Some(record) => {
                record.cancel_calls += 1;
                if record.state == State::Active {
                    record.state = State::Cancelled;
                    record.cancelled_at_ms = now_ms();
                    Ok(pb::CancelReply { id: record.id, already_cancelled: false })
                } else {
                    bump(&self.counters.duplicates_absorbed);
                    Ok(pb::CancelReply { id: record.id, already_cancelled: true })
                }
            }
            None => {
                records.insert(
                    request_id.to_owned(),
                    Record {
                        id: 0,
                        state: State::Tombstone,
                        created_at_ms: 0,
                        cancelled_at_ms: now_ms(),
                        cancel_calls: 1,
                    },
                    self.generation,
                );
                Ok(pb::CancelReply { id: 0, already_cancelled: false })
            }
        }
    }

    /// How many records are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    /// Every record, sorted by request id, and the counters.
    pub(crate) fn snapshot(&self) -> pb::SnapshotReply {
        let mut records = Vec::new();
        for shard in &self.shards {
            records.extend(lock(shard).iter().map(|(request_id, record)| pb::Record {
                request_id: request_id.clone(),
                id: record.id,
                status: record.state.as_str().to_owned(),
                created_at_ms: record.created_at_ms,
                cancelled_at_ms: record.cancelled_at_ms,
                cancel_calls: record.cancel_calls,
            }));
        }
        records.sort_unstable_by(|a, b| a.request_id.cmp(&b.request_id));
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        pb::SnapshotReply {
            records,
            counters: Some(pb::Counters {
                calls: load(&c.calls),
                creates: load(&c.creates),
                cancels: load(&c.cancels),
                duplicates_absorbed: load(&c.duplicates_absorbed),
                peak_in_flight: c.peak_in_flight.load(Ordering::Relaxed) as u64,
                rejected: load(&c.rejected),
                injected_failures: load(&c.injected_failures),
                refused_after_cancel: load(&c.refused_after_cancel),
                in_flight: self.in_flight.load(Ordering::Relaxed) as u64,
            }),
        }
    }
}

/// The request id a call carries in its `x-request-id` metadata.
fn request_id(metadata: &MetadataMap) -> Result<String, Status> {
    metadata
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| Status::invalid_argument("missing x-request-id metadata"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Metadata carrying `x-request-id: id`.
    pub(crate) fn with_id<T>(id: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(REQUEST_ID_HEADER, id.parse().unwrap());
        request
    }

    #[test]
    fn config_reads_yaml_keys_and_rejects_unknown_ones() {
        let cfg: MockConfig = serde_norway::from_str("latency_ms: 25\ncapacity: 4\nfailure_rate: 0.5\n").unwrap();
        assert_eq!(
            cfg,
            MockConfig { latency: Duration::from_millis(25), capacity: 4, failure_rate: 0.5, ..MockConfig::default() }
        );
        let partial: MockConfig = serde_norway::from_str("capacity: 2\n").unwrap();
        assert_eq!(partial.latency, Duration::ZERO);
        assert_eq!(partial.capacity, 2);
        let err = serde_norway::from_str::<MockConfig>("latency: 3\n").unwrap_err();
        assert!(err.to_string().contains("latency"), "{err}");
    }

    #[test]
    fn validate_bounds_failure_rate() {
        assert!(MockConfig::default().validate().is_ok());
        let mut cfg = MockConfig { failure_rate: 1.0, ..MockConfig::default() };
        assert!(cfg.validate().is_ok());
        cfg.failure_rate = 1.5;
        assert!(cfg.validate().unwrap_err().contains("failure_rate"));
        cfg.failure_rate = f64::NAN;
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn validate_bounds_latency_and_capacity() {
        let cfg: MockConfig = serde_norway::from_str("latency_ms: 18446744073709551615\n").unwrap();
        let err = cfg.validate().unwrap_err();
        assert_eq!(err, "latency_ms must be between 0 and 600000, got 18446744073709551615");
        let cfg = MockConfig { capacity: usize::MAX, ..MockConfig::default() };
        assert!(cfg.validate().unwrap_err().starts_with("capacity must be between 0 and 1000000"));
        let edge = MockConfig {
            latency: Duration::from_millis(600_000),
            capacity: 1_000_000,
            failure_rate: 0.0,
            ..MockConfig::default()
        };
        assert!(edge.validate().is_ok());
        let cfg: MockConfig = serde_norway::from_str("max_records: 10\n").unwrap();
        assert_eq!(cfg.validate().unwrap_err(), "max_records must be between 1000 and 100000000, got 10");
    }

    #[test]
    fn records_stay_within_the_bound_and_recent_ones_are_remembered() {
        let max = 64_000;
        let store = Store::new("order", MockConfig { max_records: max, ..MockConfig::default() });
        let total = 3 * max;
        for i in 0..total {
            store.create(&format!("r{i}"), || Ok(())).unwrap();
            if i % 7 == 0 {
                store.cancel(&format!("c{i}")).unwrap();
            }
        }
        assert!(store.len() <= max, "{} records held", store.len());
        assert!(store.len() >= max / 2, "{} records held", store.len());
        // The last `max / 4` request ids are all still known: a repeat is absorbed...
        let created = store.snapshot().counters.unwrap().creates;
        for i in total - max / 4..total {
            assert!(store.create(&format!("r{i}"), || Ok(())).unwrap().duplicate, "r{i}");
        }
        assert_eq!(store.snapshot().counters.unwrap().creates, created);
        // ...and a cancel of a known one keeps it refused afterwards.
        let last = format!("r{}", total - 1);
        assert!(!store.cancel(&last).unwrap().already_cancelled);
        assert_eq!(store.create(&last, || Ok(())).unwrap_err().code(), tonic::Code::Aborted);
        // The oldest are forgotten.
        assert!(!store.create("r0", || Ok(())).unwrap().duplicate);
    }

    #[tokio::test]
    async fn missing_or_empty_request_id_is_invalid() {
        let store = Store::new("order", MockConfig::default());
        let err = store.enter(&MetadataMap::new()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(err.message(), "missing x-request-id metadata");
        let empty = with_id("", ());
        let err = store.enter(empty.metadata()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn slot_is_released_when_the_call_is_dropped_mid_latency() {
        tokio::time::pause();
        let store =
            Store::new("order", MockConfig { latency: Duration::from_secs(10), capacity: 1, ..MockConfig::default() });
        let request = with_id("r1", ());
        {
            let call = store.enter(request.metadata());
            tokio::pin!(call);
            assert!(tokio::time::timeout(Duration::from_secs(1), &mut call).await.is_err());
            assert_eq!(store.in_flight.load(Ordering::Relaxed), 1);
        }
        assert_eq!(store.in_flight.load(Ordering::Relaxed), 0);
        let (_, slot) = store.enter(request.metadata()).await.unwrap();
        drop(slot);
        assert_eq!(store.snapshot().counters.unwrap().peak_in_flight, 1);
    }

    #[test]
    fn ids_start_at_one_and_snapshot_is_sorted() {
        let store = Store::new("order", MockConfig::default());
        assert_eq!(store.create("b", || Ok(())).unwrap().id, 1);
        assert_eq!(store.create("a", || Ok(())).unwrap().id, 2);
        store.cancel("c").unwrap();
        let snapshot = store.snapshot();
        let ids: Vec<_> = snapshot.records.iter().map(|r| (r.request_id.as_str(), r.id, r.status.as_str())).collect();
        assert_eq!(ids, [("a", 2, "active"), ("b", 1, "active"), ("c", 0, "tombstone")]);
        assert!(snapshot.records[0].created_at_ms > 0);
        assert_eq!(snapshot.records[0].cancelled_at_ms, 0);
        assert_eq!(snapshot.records[2].created_at_ms, 0);
        assert!(snapshot.records[2].cancelled_at_ms > 0);
    }

    #[test]
    fn refused_precondition_creates_nothing() {
        let store = Store::new("payment", MockConfig::default());
        let err = store.create("r1", || Err(Status::failed_precondition("no"))).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(store.snapshot().records.is_empty());
        assert_eq!(store.create("r1", || Ok(())).unwrap().id, 1);
    }
}
