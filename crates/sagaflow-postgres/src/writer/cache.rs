//! The records this writer wrote last, with their row versions, so that the next write of a
//! saga needs no read: it applies only if the row is still at that version, and a saga whose row
//! moved (another process wrote it) is read again.

use std::collections::HashMap;

use sagaflow::SagaRecord;

/// A record as this writer wrote it, and the version of the row that holds it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) record: SagaRecord,
    pub(crate) version: u32,
    /// When it was put, in puts: the least recent go first when the cache is full.
    touched: u64,
}

impl Entry {
    pub(crate) fn new(record: SagaRecord, version: u32) -> Self {
        Self { record, version, touched: 0 }
    }
}

/// Running sagas' records by request id, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct Cache {
    entries: HashMap<String, Entry>,
    capacity: usize,
    puts: u64,
}

impl Cache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), capacity: capacity.max(1), puts: 0 }
    }

    /// Takes the saga's entry out for a batch; it comes back with [`put`](Self::put) once the
    /// batch wrote or confirmed it.
    pub(crate) fn take(&mut self, request_id: &str) -> Option<Entry> {
        self.entries.remove(request_id)
    }

    /// Keeps the record of a running saga; an ended one is not written again in the usual
    /// course, so it leaves the cache.
    pub(crate) fn put(&mut self, mut entry: Entry) {
        if entry.record.state.is_ended() {
            return;
        }
        self.puts += 1;
        entry.touched = self.puts;
        self.entries.insert(entry.record.request_id.clone(), entry);
        if self.entries.len() > self.capacity {
            // Drops the older half at once, so the scan is paid once per `capacity / 2` puts.
            let keep_after = self.puts.saturating_sub(self.capacity as u64 / 2);
            self.entries.retain(|_, e| e.touched > keep_after);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use sagaflow::Mode;
    use sagaflow::log::{NewSaga, SagaEvent};
    use serde_json::json;

    use super::*;

    fn record(id: &str) -> SagaRecord {
        SagaRecord::new(NewSaga {
            request_id: id.into(),
            facade: "F".into(),
            mode: Mode::Sync,
            steps: 1,
            data: json!(null),
            deadline_ms: u64::MAX,
            callback_url: None,
            owner: None,
            version: None,
        })
    }

    #[test]
    fn ended_sagas_leave_and_the_least_recent_go_when_full() {
        let mut cache = Cache::new(4);
        for i in 0..4 {
            cache.put(Entry::new(record(&format!("s{i}")), i));
        }
        assert_eq!(cache.len(), 4);
        // s0 written again: the most recent now.
        let s0 = cache.take("s0").unwrap();
        cache.put(s0);
        cache.put(Entry::new(record("s4"), 4));
        assert!(cache.len() <= 4, "{}", cache.len());
        assert!(cache.take("s0").is_some(), "the most recently written stays");
        assert!(cache.take("s1").is_none(), "the least recently written goes");

        let mut ended = record("done");
        ended.apply(&SagaEvent::StepStarted { index: 0 }).unwrap();
        ended.apply(&SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).unwrap();
        cache.put(Entry::new(ended, 9));
        assert!(cache.take("done").is_none(), "an ended saga is not kept");
    }
}
