//! Tombstones: what is left of a pruned saga, so that its request id is refused rather than
//! started again ([`Begin::Pruned`](sagaflow::log::Begin::Pruned)).
//!
//! Pruning writes them in the transaction that deletes the record, and prunes them in their
//! turn (past `tombstone_age`, or beyond `max_tombstones`, oldest first) in the same one. Only
//! the writer's own checkpoints prune, so tombstones never pass through the write-ahead file or
//! the overlay: the writer's snapshot of the file, refreshed after every checkpoint, has them all.

use redb::{ReadableTable, ReadableTableMetadata};
use sagaflow::log::{Retention, Tombstone};

use crate::error::{Error, Result};
use crate::store::Tables;

/// A stored tombstone, decoded.
pub(crate) fn decode(request_id: &str, bytes: &[u8]) -> Result<Tombstone> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("tombstone of `{request_id}`: {e}")))
}

impl Tables<'_> {
    /// Records `tombstone`, replacing any older one of its request id.
    pub(crate) fn bury(&mut self, tombstone: &Tombstone) -> Result<()> {
        let id = tombstone.request_id.as_str();
        let bytes = serde_json::to_vec(tombstone)
            .map_err(|e| Error::Corrupt(format!("cannot encode the tombstone of `{id}`: {e}")))?;
        if let Some(old) = self.tombstones.insert(id, bytes.as_slice())? {
            // A request id pruned twice: its first saga's tombstone was gone when the second began.
            let old: Option<Tombstone> = serde_json::from_slice(old.value()).ok();
            if let Some(old) = old {
                self.tombstones_by_pruned.remove((old.pruned_ms, id))?;
            }
        }
        self.tombstones_by_pruned.insert((tombstone.pruned_ms, id), ())?;
        Ok(())
    }

    /// Deletes up to `chunk` tombstones, oldest first, that are beyond `max_tombstones` or were
    /// left more than `tombstone_age` before `now_ms`. Returns how many, and whether more may
    /// be due.
    pub(crate) fn expire_tombstones(
        &mut self,
        retention: &Retention,
        now_ms: u64,
        chunk: usize,
    ) -> Result<(usize, bool)> {
        let held = usize::try_from(self.tombstones_by_pruned.len()?).unwrap_or(usize::MAX);
        let excess = held.saturating_sub(retention.max_tombstones);
        let cutoff = retention.tombstone_cutoff_ms(now_ms);
        let mut doomed: Vec<(u64, String)> = Vec::new();
        for entry in self.tombstones_by_pruned.iter()? {
            if doomed.len() >= chunk {
                break;
            }
            let (key, _) = entry?;
            let (pruned_ms, id) = key.value();
            if doomed.len() < excess || pruned_ms < cutoff {
                doomed.push((pruned_ms, id.to_owned()));
            } else {
                break;
            }
        }
        for (pruned_ms, id) in &doomed {
            self.tombstones_by_pruned.remove((*pruned_ms, id.as_str()))?;
            self.tombstones.remove(id.as_str())?;
        }
        Ok((doomed.len(), doomed.len() >= chunk))
    }
}
