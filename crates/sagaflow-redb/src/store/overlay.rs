//! The records answered since the last checkpoint, which the write-ahead file holds and the
//! database file not yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// One record in the overlay.
#[derive(Debug, Clone)]
pub(super) struct Fresh {
    /// The saga's sequence number.
    pub(super) seq: u64,
    /// The record, encoded.
    pub(super) bytes: Arc<[u8]>,
    /// The write-ahead epoch of the entry that stored it.
    pub(super) epoch: u64,
}

/// The records stored since the last checkpoint, by request id. The writer and the readers
/// look here before the file; the writer adds a batch's records once its entry is durable and
/// drops them once a checkpoint has put their epoch in the file.
#[derive(Debug, Clone, Default)]
pub(super) struct Overlay(Arc<Mutex<HashMap<String, Fresh>>>);

impl Overlay {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Fresh>> {
        // Nothing panics while holding it; if something did, the map is still whole.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record of `request_id`, if it is newer than the file's.
    pub(super) fn get(&self, request_id: &str) -> Option<Fresh> {
        self.lock().get(request_id).cloned()
    }

    /// Adds records stored by entries of `epoch`, under one lock.
    pub(super) fn insert_all<'a>(&self, epoch: u64, records: impl IntoIterator<Item = (&'a str, u64, &'a [u8])>) {
        let mut overlay = self.lock();
        for (request_id, seq, bytes) in records {
            overlay.insert(request_id.to_owned(), Fresh { seq, bytes: Arc::from(bytes), epoch });
        }
    }

    /// Drops the records of `epoch` and before, which a checkpoint has put in the file.
    pub(super) fn retire(&self, epoch: u64) {
        self.lock().retain(|_, fresh| fresh.epoch > epoch);
    }

    /// Drops every record: the file holds them all.
    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    /// The request ids it holds, sorted.
    #[cfg(test)]
    pub(super) fn request_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }
}
