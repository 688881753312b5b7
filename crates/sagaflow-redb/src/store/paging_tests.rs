//! Paging through 100,000 sagas: a page far into the list reads what the first one does.

use redb::Database;
use sagaflow::SagaRecord;
use sagaflow::log::{ListCursor, ListFilter, Retention, SagaLog};

use super::tables::{Tables, encode};
use super::tests::{new_saga, open};
use crate::{ListReads, RedbSagaLog};

const SAGAS: u64 = 100_000;
/// Sagas begun in each millisecond: ties the list orders by request id.
const PER_MS: u64 = 3;
const PAGE: usize = 100;
/// Creation time of the oldest saga.
const START_MS: u64 = 1_700_000_000_000;

/// The `i`th saga begun: request ids in another order than the sequence numbers, so that
/// ties are sorted rather than read in index order.
fn saga(i: u64) -> SagaRecord {
    let id = format!("r{:06}", (i * 7919) % SAGAS);
    let mut record = SagaRecord::new(new_saga(&id));
    record.created_ms = START_MS + i / PER_MS;
    record.updated_ms = record.created_ms;
    record.history.clear();
    record
}

/// Writes the sagas into the closed log's file in one transaction, as checkpoints would have.
fn load(path: &std::path::Path) {
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut tables = Tables::open(&txn).unwrap();
        for seq in 0..SAGAS {
            let record = saga(seq);
            tables.ids.insert(record.request_id.as_str(), seq).unwrap();
            let mut bytes = Vec::new();
            encode(&record, &mut bytes).unwrap();
            tables.sagas.insert(seq, bytes.as_slice()).unwrap();
            tables.unfinished.insert(seq, ()).unwrap();
            tables.by_created.insert((record.created_ms, seq), ()).unwrap();
        }
    }
    txn.commit().unwrap();
}

/// One page, and what reading it took.
async fn page(log: &RedbSagaLog, filter: ListFilter) -> (Vec<SagaRecord>, ListReads) {
    let before = log.list_reads();
    let records = log.list(filter).await.unwrap();
    let after = log.list_reads();
    let reads = ListReads {
        index_entries: after.index_entries - before.index_entries,
        records: after.records - before.records,
    };
    (records, reads)
}

/// At most what a page can read wherever it is: its own entries, the rest of the
/// millisecond it ends in, and the part of the millisecond it starts in that the page
/// before it listed.
fn bounded(reads: ListReads) -> bool {
    let most = PAGE as u64 + 2 * PER_MS;
    reads.index_entries <= most && reads.records <= most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_page_of_100_000_sagas_reads_what_the_first_does() {
    let (dir, log) = open(Retention::default());
    let path = log.path().to_owned();
    drop(log);
    load(&path);
    let log = RedbSagaLog::open(crate::RedbOptions::new(dir.path()).prune_interval(std::time::Duration::MAX)).unwrap();

    let (first, first_reads) = page(&log, ListFilter { limit: PAGE, ..ListFilter::default() }).await;
    assert_eq!(first.len(), PAGE);
    assert_eq!(first[0].created_ms, START_MS + (SAGAS - 1) / PER_MS);
    assert!(bounded(first_reads), "first page read {first_reads:?}");

    // Walk the cursor to the end: every page reads about as much as the first.
    let (mut seen, mut after, mut last_reads, mut worst) =
        (first.len(), ListCursor::of(&first[PAGE - 1]), first_reads, first_reads);
    let mut previous = first[PAGE - 1].clone();
    loop {
        let (records, reads) =
            page(&log, ListFilter { limit: PAGE, after: Some(after.clone()), ..ListFilter::default() }).await;
        if records.is_empty() {
            break;
        }
        let next = &records[0];
        let ordered = (next.created_ms, std::cmp::Reverse(&next.request_id))
            < (previous.created_ms, std::cmp::Reverse(&previous.request_id));
        assert!(ordered, "{} listed after {}", next.request_id, previous.request_id);
        assert!(bounded(reads), "page from {after:?} read {reads:?}");
        seen += records.len();
        worst = ListReads {
            index_entries: worst.index_entries.max(reads.index_entries),
            records: worst.records.max(reads.records),
        };
        last_reads = reads;
        previous = records[records.len() - 1].clone();
        after = ListCursor::of(&previous);
    }
    assert_eq!(seen as u64, SAGAS, "the walk lists every saga once");
    assert_eq!(previous.created_ms, START_MS, "the walk ends at the oldest saga");
    eprintln!("reads: first page {first_reads:?}, last page {last_reads:?}, most of any page {worst:?}");

    // Jump straight to the end, by a cursor and by a time range.
    let near_end = ListCursor { created_ms: START_MS + 40, request_id: String::new() };
    let (records, by_cursor) =
        page(&log, ListFilter { limit: PAGE, after: Some(near_end), ..ListFilter::default() }).await;
    assert_eq!(records.len(), PAGE);
    assert!(bounded(by_cursor), "a cursor near the end read {by_cursor:?}");
    let window =
        ListFilter { limit: PAGE, since_ms: Some(START_MS), until_ms: Some(START_MS + 50), ..ListFilter::default() };
    let (records, by_time) = page(&log, window).await;
    assert_eq!(records.len(), PAGE);
    assert_eq!(records[0].created_ms, START_MS + 49);
    assert!(bounded(by_time), "a time range at the end read {by_time:?}");
    eprintln!("reads: jump by cursor {by_cursor:?}, by time range {by_time:?}");
}
