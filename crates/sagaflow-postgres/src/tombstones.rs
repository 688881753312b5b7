//! Tombstones: what is left of a pruned saga, so that its request id is refused rather than
//! started again ([`Begin::Pruned`](sagaflow::log::Begin::Pruned)).
//!
//! Pruning moves a saga's row into `sagaflow_tombstones` in one statement ([`MOVE_OLD`],
//! [`MOVE_OLDEST`]); a trigger skips the insert of a saga whose request id has a tombstone
//! (the migration says why it is a trigger), and `begin` then answers with the tombstone
//! ([`find_all`]). Tombstones are pruned in their turn by their age and count ([`expire`]).

use sagaflow::SagaStatus;
use sagaflow::log::{Retention, Tombstone};
use sqlx::PgConnection;

use crate::prune::CHUNK;

/// Deletes a chunk of sagas that ended before `$1` (Unix ms) and moves them to tombstones
/// pruned at `$3`; `$2` is the chunk size. Affects one row per saga moved.
pub(crate) const MOVE_OLD: &str = "WITH gone AS ( \
       DELETE FROM sagaflow_sagas WHERE request_id IN ( \
         SELECT request_id FROM sagaflow_sagas WHERE ended_at < to_timestamp($1::float8 / 1000) \
         ORDER BY ended_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
       AND ended_at < to_timestamp($1::float8 / 1000) \
       RETURNING request_id, facade, status, ended_at) \
     INSERT INTO sagaflow_tombstones (request_id, facade, status, ended_at, pruned_at) \
     SELECT request_id, facade, status, ended_at, to_timestamp($3::float8 / 1000) FROM gone \
     ON CONFLICT (request_id) DO UPDATE SET facade = EXCLUDED.facade, status = EXCLUDED.status, \
       ended_at = EXCLUDED.ended_at, pruned_at = EXCLUDED.pruned_at";

/// Deletes the `$1` oldest ended sagas and moves them to tombstones pruned at `$2`.
pub(crate) const MOVE_OLDEST: &str = "WITH gone AS ( \
       DELETE FROM sagaflow_sagas WHERE request_id IN ( \
         SELECT request_id FROM sagaflow_sagas WHERE ended_at IS NOT NULL \
         ORDER BY ended_at, request_id LIMIT $1 FOR UPDATE SKIP LOCKED) \
       AND ended_at IS NOT NULL \
       RETURNING request_id, facade, status, ended_at) \
     INSERT INTO sagaflow_tombstones (request_id, facade, status, ended_at, pruned_at) \
     SELECT request_id, facade, status, ended_at, to_timestamp($2::float8 / 1000) FROM gone \
     ON CONFLICT (request_id) DO UPDATE SET facade = EXCLUDED.facade, status = EXCLUDED.status, \
       ended_at = EXCLUDED.ended_at, pruned_at = EXCLUDED.pruned_at";

const FIND_ALL: &str = "SELECT request_id, facade, status, \
       round(extract(epoch FROM ended_at) * 1000)::int8, round(extract(epoch FROM pruned_at) * 1000)::int8 \
     FROM sagaflow_tombstones WHERE request_id = ANY($1::text[])";

const DELETE_OLD: &str = "DELETE FROM sagaflow_tombstones WHERE request_id IN ( \
       SELECT request_id FROM sagaflow_tombstones WHERE pruned_at < to_timestamp($1::float8 / 1000) \
       ORDER BY pruned_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
     AND pruned_at < to_timestamp($1::float8 / 1000)";

const COUNT: &str = "SELECT count(*) FROM sagaflow_tombstones";

const DELETE_OLDEST: &str = "DELETE FROM sagaflow_tombstones WHERE request_id IN ( \
       SELECT request_id FROM sagaflow_tombstones ORDER BY pruned_at, request_id LIMIT $1 FOR UPDATE SKIP LOCKED)";

/// The tombstones of those of `request_ids` that have one.
pub(crate) async fn find_all(conn: &mut PgConnection, request_ids: &[String]) -> Result<Vec<Tombstone>, sqlx::Error> {
    let rows: Vec<(String, String, String, i64, i64)> =
        sqlx::query_as(FIND_ALL).bind(request_ids).fetch_all(conn).await?;
    rows.into_iter()
        .map(|(request_id, facade, status, ended_ms, pruned_ms)| {
            tombstone(request_id, facade, status, ended_ms, pruned_ms)
        })
        .collect()
}

fn tombstone(
    request_id: String,
    facade: String,
    status: String,
    ended_ms: i64,
    pruned_ms: i64,
) -> Result<Tombstone, sqlx::Error> {
    let status: SagaStatus = serde_json::from_value(serde_json::Value::String(status))
        .map_err(|e| sqlx::Error::Decode(format!("tombstone of `{request_id}`: {e}").into()))?;
    let ms = |value: i64| u64::try_from(value).unwrap_or(0);
    Ok(Tombstone { request_id, facade, status, ended_ms: ms(ended_ms), pruned_ms: ms(pruned_ms) })
}

/// Deletes the tombstones left more than `tombstone_age` before `now_ms`, then the oldest
/// beyond `max_tombstones`, in chunks; returns how many went. Runs under the prune's lock.
pub(crate) async fn expire(conn: &mut PgConnection, retention: &Retention, now_ms: u64) -> Result<u64, sqlx::Error> {
    let cutoff_ms = retention.tombstone_cutoff_ms(now_ms) as f64;
    let mut expired = 0;
    loop {
        let done = sqlx::query(DELETE_OLD).bind(cutoff_ms).bind(CHUNK).execute(&mut *conn).await?;
        expired += done.rows_affected();
        if done.rows_affected() < CHUNK as u64 {
            break;
        }
    }
    let held: i64 = sqlx::query_scalar(COUNT).fetch_one(&mut *conn).await?;
    let mut excess = u64::try_from(held).unwrap_or(0).saturating_sub(retention.max_tombstones as u64);
    while excess > 0 {
        let chunk = excess.min(CHUNK as u64) as i64;
        let deleted = sqlx::query(DELETE_OLDEST).bind(chunk).execute(&mut *conn).await?.rows_affected();
        if deleted == 0 {
            break;
        }
        expired += deleted;
        excess = excess.saturating_sub(deleted);
    }
    Ok(expired)
}
