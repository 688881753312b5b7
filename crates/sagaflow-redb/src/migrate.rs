//! Files written before sagas had sequence numbers keyed every table by request id. Opening
//! one converts it, in the transaction that opens the log: each saga gets a sequence number in
//! start order, its record and index entries move to the tables keyed by it, and the old tables
//! are deleted. A file without the old tables is left as it is.

use redb::{ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use crate::error::Result;
use crate::store::{Tables, decode};

const OLD_SAGAS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("sagas");
const OLD_UNFINISHED: TableDefinition<'static, &str, ()> = TableDefinition::new("unfinished");
const OLD_BY_CREATED: TableDefinition<'static, (u64, &str), ()> = TableDefinition::new("by_created");
const OLD_ENDED: TableDefinition<'static, (u64, &str), ()> = TableDefinition::new("ended");
const OLD_ENDED_AT: TableDefinition<'static, &str, u64> = TableDefinition::new("ended_at");

/// Moves every saga of the request-id-keyed tables, if any, into `tables`.
pub(crate) fn from_request_id_keys(txn: &WriteTransaction, tables: &mut Tables<'_>) -> Result<()> {
    if !txn.list_tables()?.any(|t| t.name() == OLD_SAGAS.name()) {
        return Ok(());
    }
    let mut sagas = Vec::new();
    {
        let old = txn.open_table(OLD_SAGAS)?;
        let ended_at = txn.open_table(OLD_ENDED_AT)?;
        for entry in old.iter()? {
            let (id, bytes) = entry?;
            // A record that cannot be read stops the conversion (and the open) rather than
            // being dropped: the file is left as it was, for an operator to look at.
            let record = decode(bytes.value()).map_err(|e| match e {
                crate::Error::Corrupt(why) => crate::Error::Corrupt(format!(
                    "record of `{}`, found while converting the file to sequence-numbered tables: {why}",
                    id.value()
                )),
                other => other,
            })?;
            let ended_ms = ended_at.get(id.value())?.map(|ms| ms.value());
            sagas.push((record.created_ms, id.value().to_owned(), bytes.value().to_vec(), record, ended_ms));
        }
    }
    sagas.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let first = tables.sagas.last()?.map_or(0, |(seq, _)| seq.value() + 1);
    let count = sagas.len();
    for (seq, (created_ms, id, bytes, record, ended_ms)) in (first..).zip(sagas) {
        tables.ids.insert(id.as_str(), seq)?;
        tables.sagas.insert(seq, bytes.as_slice())?;
        tables.by_created.insert((created_ms, seq), ())?;
        if record.state.is_ended() {
            let at = ended_ms.unwrap_or(record.updated_ms);
            tables.ended.insert((at, seq), ())?;
            tables.ended_at.insert(seq, at)?;
        } else {
            tables.unfinished.insert(seq, ())?;
        }
    }
    txn.delete_table(OLD_SAGAS)?;
    txn.delete_table(OLD_UNFINISHED)?;
    txn.delete_table(OLD_BY_CREATED)?;
    txn.delete_table(OLD_ENDED)?;
    txn.delete_table(OLD_ENDED_AT)?;
    tracing::info!(sagas = count, "saga log converted to sequence-numbered tables");
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase as _, ReadableTableMetadata as _};
    use sagaflow::log::{ListFilter, Retention, SagaEvent, SagaLog};
    use sagaflow::{SagaRecord, SagaStatus};

    use super::*;
    use crate::store::tests::new_saga;
    use crate::{RedbOptions, RedbSagaLog};

    /// Writes `records` the way the request-id-keyed log did: before steps had their own status.
    fn write_old_file(path: &std::path::Path, records: &[SagaRecord]) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut sagas = txn.open_table(OLD_SAGAS).unwrap();
            let mut unfinished = txn.open_table(OLD_UNFINISHED).unwrap();
            let mut by_created = txn.open_table(OLD_BY_CREATED).unwrap();
            let mut ended = txn.open_table(OLD_ENDED).unwrap();
            let mut ended_at = txn.open_table(OLD_ENDED_AT).unwrap();
            for r in records {
                let id = r.request_id.as_str();
                let mut old = serde_json::to_value(r).unwrap();
                old.as_object_mut().unwrap().remove("step_states");
                sagas.insert(id, serde_json::to_vec(&old).unwrap().as_slice()).unwrap();
                by_created.insert((r.created_ms, id), ()).unwrap();
                if r.state.is_ended() {
                    ended.insert((r.updated_ms, id), ()).unwrap();
                    ended_at.insert(id, r.updated_ms).unwrap();
                } else {
                    unfinished.insert(id, ()).unwrap();
                }
            }
        }
        txn.commit().unwrap();
    }

    #[tokio::test]
    async fn a_file_keyed_by_request_id_is_converted_and_goes_on_working() {
        let dir = tempfile::tempdir().unwrap();
        let mut running = SagaRecord::new(new_saga("running"));
        running.created_ms = 1_000;
        let mut done = SagaRecord::new(new_saga("done"));
        done.created_ms = 2_000;
        done.apply(&SagaEvent::StepStarted { index: 0 }).unwrap();
        done.apply(&SagaEvent::StepCompleted { index: 0, attempts: 1, data: serde_json::json!(1) }).unwrap();
        assert_eq!(done.status(), SagaStatus::Completed);
        write_old_file(&dir.path().join(crate::FILE_NAME), &[running.clone(), done.clone()]);

        let log = RedbSagaLog::open(RedbOptions::new(dir.path()).prune_interval(std::time::Duration::MAX)).unwrap();
        // Read with the steps' status derived from their position.
        assert_eq!(log.get("done").await.unwrap(), Some(done.clone()));
        assert_eq!(done.step_status(0), sagaflow::log::StepStatus::Done);
        assert_eq!(log.unfinished().await.unwrap(), vec![running.clone()]);
        let listed: Vec<_> = log.list(ListFilter::default()).await.unwrap().into_iter().map(|r| r.request_id).collect();
        assert_eq!(listed, ["done", "running"], "newest first");
        // The converted sagas behave as any other: the running one goes on, the ended one is
        // found by its request id, a new one gets the next number.
        let after = log.append("running", SagaEvent::StepStarted { index: 0 }).await.unwrap();
        assert_eq!(after.history.len(), 2);
        assert!(matches!(log.begin(new_saga("done")).await.unwrap(), sagaflow::log::Begin::Exists(_)));
        assert!(matches!(log.begin(new_saga("new")).await.unwrap(), sagaflow::log::Begin::Started(_)));
        log.sync().await.unwrap();
        {
            let txn = log.db_for_tests().begin_read().unwrap();
            assert!(!txn.list_tables().unwrap().any(|t| t.name() == OLD_SAGAS.name()), "old tables are gone");
            let (new_seq, _) = crate::store::tests::stored(&txn, "new").unwrap();
            assert_eq!(new_seq, 2);
        }
        drop(log);

        // Opened again, nothing is converted twice.
        let log = RedbSagaLog::open(RedbOptions::new(dir.path()).retention(Retention::default())).unwrap();
        assert_eq!(log.list(ListFilter::default()).await.unwrap().len(), 3);
    }

    #[test]
    fn an_unreadable_record_stops_the_conversion_and_leaves_the_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::FILE_NAME);
        write_old_file(&path, &[SagaRecord::new(new_saga("fine"))]);
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(OLD_SAGAS).unwrap().insert("broken", b"{not json".as_slice()).unwrap();
            txn.commit().unwrap();
        }
        for _ in 0..2 {
            match RedbSagaLog::open(RedbOptions::new(dir.path())) {
                Err(e @ crate::Error::Corrupt(_)) => assert!(e.to_string().contains("`broken`"), "{e}"),
                other => panic!("open: {other:?}"),
            }
        }
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(OLD_SAGAS).unwrap().len().unwrap(), 2, "nothing was converted or lost");
    }
}
