//! Replicas sharing the log: leases in `sagaflow_replicas`, and the atomic
//! takeover of an expired replica's sagas.

use std::time::Duration;

use sagaflow::SagaRecord;
use sagaflow::log::{Lease, LogError};
use sqlx::PgPool;

use crate::store::decode;

/// `until_ms` of a lease taken at `now_ms` for `ttl` (Postgres has no unsigned integers).
fn until(now_ms: u64, ttl: Duration) -> i64 {
    i64::try_from(now_ms.saturating_add(ttl.as_millis() as u64)).unwrap_or(i64::MAX)
}

fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn lease(epoch: i64, until_ms: i64) -> Lease {
    Lease { epoch: epoch.max(0) as u64, until_ms: until_ms.max(0) as u64 }
}

/// Registers `replica` under a new epoch (a restart keeps what it still owns).
pub(crate) async fn register(pool: &PgPool, replica: &str, now_ms: u64, ttl: Duration) -> Result<Lease, sqlx::Error> {
    let (epoch, until_ms): (i64, i64) = sqlx::query_as(
        "INSERT INTO sagaflow_replicas (replica, epoch, until_ms, taken_by) VALUES ($1, 1, $2, NULL) \
         ON CONFLICT (replica) DO UPDATE SET epoch = sagaflow_replicas.epoch + 1, \
         until_ms = EXCLUDED.until_ms, taken_by = NULL RETURNING epoch, until_ms",
    )
    .bind(replica)
    .bind(until(now_ms, ttl))
    .fetch_one(pool)
    .await?;
    Ok(lease(epoch, until_ms))
}

/// Extends the lease; `None` if the replica's sagas were taken over since `held`.
pub(crate) async fn renew(
    pool: &PgPool,
    replica: &str,
    held: Lease,
    now_ms: u64,
    ttl: Duration,
) -> Result<Option<Lease>, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "UPDATE sagaflow_replicas SET until_ms = $3 \
         WHERE replica = $1 AND epoch = $2 AND taken_by IS NULL RETURNING epoch, until_ms",
    )
    .bind(replica)
    .bind(ms(held.epoch))
    .bind(until(now_ms, ttl))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(epoch, until_ms)| lease(epoch, until_ms)))
}

/// Replicas whose lease ran out before `now_ms` and that nobody took over.
pub(crate) async fn expired(pool: &PgPool, now_ms: u64) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT replica FROM sagaflow_replicas WHERE until_ms < $1 AND taken_by IS NULL ORDER BY replica",
    )
    .bind(ms(now_ms))
    .fetch_all(pool)
    .await
}

/// Takes over the unfinished sagas of `dead` for `by` in one transaction.
/// The replica row is updated first: of several claimers the first holds its
/// lock, and the others find it taken (or renewed) and get `None`.
///
/// A saga whose row is locked is skipped, not waited for: a replica paused in
/// the middle of a write (stopped, frozen, starved) holds that lock until it
/// resumes, and a claim waiting for it would hold up every saga of the replica,
/// and the claimer's own lease renewals, as long. While such a saga is left,
/// the replica stays expired and not taken (its epoch moves on all the same, so
/// it cannot renew): the next claim takes the rest once the lock is gone, or
/// the replica, resumed, registers again and goes on with what it still owns.
pub(crate) async fn claim(
    pool: &PgPool,
    dead: &str,
    by: &str,
    now_ms: u64,
) -> Result<Option<Vec<(String, String)>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let won: Option<i64> = sqlx::query_scalar(
        "UPDATE sagaflow_replicas SET epoch = epoch + 1 \
         WHERE replica = $1 AND until_ms < $2 AND taken_by IS NULL RETURNING epoch",
    )
    .bind(dead)
    .bind(ms(now_ms))
    .fetch_optional(&mut *tx)
    .await?;
    if won.is_none() {
        return Ok(None); // rolled back on drop
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "UPDATE sagaflow_sagas SET owner = $2, record = jsonb_set(record, '{owner}', to_jsonb($2::text)) \
         WHERE owner = $1 AND request_id IN (SELECT request_id FROM sagaflow_sagas \
         WHERE owner = $1 AND status IN ('running', 'compensating') FOR UPDATE SKIP LOCKED) \
         RETURNING request_id, record::text",
    )
    .bind(dead)
    .bind(by)
    .fetch_all(&mut *tx)
    .await?;
    let left: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sagaflow_sagas WHERE owner = $1 AND status IN ('running', 'compensating'))",
    )
    .bind(dead)
    .fetch_one(&mut *tx)
    .await?;
    if !left {
        sqlx::query("UPDATE sagaflow_replicas SET taken_by = $2 WHERE replica = $1")
            .bind(dead)
            .bind(by)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Some(rows))
}

/// The unfinished sagas `replica` owns, and the unowned ones.
pub(crate) async fn unfinished_of(pool: &PgPool, replica: &str) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT request_id, record::text FROM sagaflow_sagas \
         WHERE status IN ('running', 'compensating') AND (owner = $1 OR owner IS NULL) ORDER BY created_at",
    )
    .bind(replica)
    .fetch_all(pool)
    .await
}

/// Reads claimed or listed rows back.
pub(crate) fn records(rows: &[(String, String)]) -> Result<Vec<SagaRecord>, LogError> {
    rows.iter().map(|(id, text)| decode(id, text)).collect()
}
