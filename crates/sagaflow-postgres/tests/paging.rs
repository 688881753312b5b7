//! Paging through 100,000 sagas: PostgreSQL lists a page far into the list from one index
//! range, reading what it reads for the first page.

mod support;

use sagaflow::log::{ListCursor, ListFilter, NewSaga, SagaLog};
use sagaflow::{Mode, SagaRecord};
use sagaflow_postgres::PostgresSagaLog;
use serde_json::Value;
use support::TestDb;

const SAGAS: i64 = 100_000;
/// Sagas begun in each millisecond: ties the list orders by request id.
const PER_MS: i64 = 3;
const PAGE: usize = 100;
/// Creation time of the oldest saga.
const START_MS: i64 = 1_700_000_000_000;

/// Inserts the sagas in one statement: the `i`th begun at `START_MS + i / PER_MS`, with
/// request ids in another order than their creation.
async fn load(log: &PostgresSagaLog) {
    let template = SagaRecord::new(NewSaga {
        request_id: String::new(),
        facade: "F".into(),
        mode: Mode::Sync,
        steps: 1,
        data: serde_json::json!(null),
        deadline_ms: u64::MAX,
        callback_url: None,
        owner: None,
        version: None,
    });
    let template = serde_json::to_string(&template).unwrap();
    sqlx::query(
        "INSERT INTO sagaflow_sagas (request_id, facade, mode, status, record, created_at, updated_at) \
         SELECT id, 'F', 'sync', 'running', \
                jsonb_set(jsonb_set(jsonb_set($1::jsonb, '{request_id}', to_jsonb(id)), \
                                    '{created_ms}', to_jsonb(ms)), '{updated_ms}', to_jsonb(ms)), \
                to_timestamp(ms::float8 / 1000), to_timestamp(ms::float8 / 1000) \
         FROM (SELECT 'r' || lpad(((i * 7919) % $2)::text, 6, '0') AS id, $3 + i / $4 AS ms \
               FROM generate_series(0::bigint, $2 - 1) AS i) AS s",
    )
    .bind(template)
    .bind(SAGAS)
    .bind(START_MS)
    .bind(PER_MS)
    .execute(log.pool())
    .await
    .unwrap();
    // What autovacuum does soon after a load this size: the planner then knows the table.
    sqlx::query("ANALYZE sagaflow_sagas").execute(log.pool()).await.unwrap();
}

/// What one page cost, from its plan.
#[derive(Debug)]
struct Cost {
    /// The index the rows came from (`None`: not from an index scan).
    index: Option<String>,
    /// Rows the scan produced, kept or filtered out.
    rows_read: u64,
    /// Shared buffers the statement touched (in the cache or read).
    buffers: u64,
}

fn cost(plan: &Value) -> Cost {
    let top = &plan[0]["Plan"];
    let number = |node: &Value, key: &str| node[key].as_u64().unwrap_or(0);
    // The scan under the Limit (no sort between them: the index gives the order).
    let mut scan = top;
    while scan["Node Type"] == "Limit" {
        scan = &scan["Plans"][0];
    }
    let index = (scan["Node Type"] == "Index Scan").then(|| scan["Index Name"].as_str().unwrap_or_default().to_owned());
    Cost {
        index,
        rows_read: number(scan, "Actual Rows") + number(scan, "Rows Removed by Filter"),
        buffers: number(top, "Shared Hit Blocks") + number(top, "Shared Read Blocks"),
    }
}

/// The page's plan uses the creation index and reads about one page, in rows and in buffers.
fn assert_bounded(what: &str, cost: &Cost, first: &Cost) {
    assert_eq!(cost.index.as_deref(), Some("sagaflow_sagas_created_idx"), "{what}: {cost:?}");
    assert!(cost.rows_read <= (PAGE as i64 + 2 * PER_MS) as u64, "{what} read {cost:?}");
    assert!(cost.buffers <= 2 * first.buffers + 8, "{what} touched {cost:?}, the first page {first:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_page_of_100_000_sagas_reads_what_the_first_does() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let log = db.connect(&schema).await;
    load(&log).await;

    let first_page = ListFilter { limit: PAGE, ..ListFilter::default() };
    let first = cost(&log.explain_list(&first_page).await.unwrap());
    assert_eq!(first.index.as_deref(), Some("sagaflow_sagas_created_idx"), "first page: {first:?}");
    assert!(first.rows_read <= PAGE as u64, "first page read {first:?}");

    // Walk the cursor to the end, then measure the last page: the oldest sagas.
    let (mut seen, mut filter, mut last_page) = (0, first_page.clone(), first_page.clone());
    loop {
        let records = log.list(filter.clone()).await.unwrap();
        let Some(last) = records.last() else { break };
        seen += records.len();
        last_page = filter.clone();
        filter.after = Some(ListCursor::of(last));
    }
    assert_eq!(seen as i64, SAGAS, "the walk lists every saga once");
    let oldest = log.list(last_page.clone()).await.unwrap();
    assert_eq!(oldest.last().map(|r| r.created_ms), Some(START_MS as u64), "the last page ends at the oldest saga");
    let last = cost(&log.explain_list(&last_page).await.unwrap());
    assert_bounded("last page", &last, &first);

    // Jump near the end by a cursor, and by a time range.
    let near_end = ListCursor { created_ms: START_MS as u64 + 40, request_id: String::new() };
    let by_cursor = ListFilter { after: Some(near_end), ..first_page.clone() };
    let by_cursor = cost(&log.explain_list(&by_cursor).await.unwrap());
    assert_bounded("a cursor near the end", &by_cursor, &first);
    let by_time = ListFilter { since_ms: Some(START_MS as u64), until_ms: Some(START_MS as u64 + 50), ..first_page };
    let by_time = cost(&log.explain_list(&by_time).await.unwrap());
    assert_bounded("a time range at the end", &by_time, &first);
    eprintln!(
        "first page {first:?}\nlast page {last:?}\ncursor near the end {by_cursor:?}\ntime range at the end {by_time:?}"
    );
}
