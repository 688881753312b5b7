//! Retention: dropping ended sagas past their age or beyond the count, in small chunks, each
//! moved to a tombstone if the retention keeps them ([`crate::tombstones`]), then the tombstones
//! past theirs.
//!
//! Each chunk is one short `DELETE` of at most [`CHUNK`] rows that skips rows
//! an `append` holds locked, so pruning never stalls the hot path. One pass
//! runs at a time across every replica sharing the table (an advisory lock);
//! the others skip their turn.

use std::time::Duration;

use sagaflow::log::Retention;
use sqlx::postgres::PgPool;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::tombstones;

/// Rows deleted per statement.
pub(crate) const CHUNK: i64 = 1000;

/// First key of the advisory lock (`'sagf'`); the second is the schema's hash.
const LOCK_CLASS: i32 = 0x7361_6766;

const DELETE_OLD: &str = "DELETE FROM sagaflow_sagas WHERE request_id IN ( \
       SELECT request_id FROM sagaflow_sagas WHERE ended_at < to_timestamp($1::float8 / 1000) \
       ORDER BY ended_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
     AND ended_at < to_timestamp($1::float8 / 1000)";

const COUNT_ENDED: &str = "SELECT count(*) FROM sagaflow_sagas WHERE ended_at IS NOT NULL";

const DELETE_OLDEST: &str = "DELETE FROM sagaflow_sagas WHERE request_id IN ( \
       SELECT request_id FROM sagaflow_sagas WHERE ended_at IS NOT NULL \
       ORDER BY ended_at, request_id LIMIT $1 FOR UPDATE SKIP LOCKED) \
     AND ended_at IS NOT NULL";

/// Drops ended sagas that ended before `now_ms - max_age`, then the oldest
/// ended ones beyond `max_ended`, leaving their tombstones, then the tombstones past
/// the retention; returns how many sagas went.
pub(crate) async fn prune(pool: &PgPool, retention: &Retention, now_ms: u64) -> Result<u64, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    // The advisory lock lives as long as the session: closing this connection
    // when done (or when this future is dropped half-way) is what releases it
    // for sure.
    conn.close_on_drop();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext(current_schema()))")
        .bind(LOCK_CLASS)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        tracing::debug!("another replica is pruning the saga log");
        return Ok(0);
    }
    let cutoff_ms = retention.ended_cutoff_ms(now_ms) as f64;
    let tombs = retention.keeps_tombstones();
    let (delete_old, delete_oldest) =
        if tombs { (tombstones::MOVE_OLD, tombstones::MOVE_OLDEST) } else { (DELETE_OLD, DELETE_OLDEST) };
    let mut pruned = 0;
    loop {
        let mut query = sqlx::query(delete_old).bind(cutoff_ms).bind(CHUNK);
        if tombs {
            query = query.bind(now_ms as f64);
        }
        let done = query.execute(&mut *conn).await?;
        pruned += done.rows_affected();
        if done.rows_affected() < CHUNK as u64 {
            break;
        }
    }
    let ended: i64 = sqlx::query_scalar(COUNT_ENDED).fetch_one(&mut *conn).await?;
    let mut excess = u64::try_from(ended).unwrap_or(0).saturating_sub(retention.max_ended as u64);
    while excess > 0 {
        let chunk = excess.min(CHUNK as u64) as i64;
        let mut query = sqlx::query(delete_oldest).bind(chunk);
        if tombs {
            query = query.bind(now_ms as f64);
        }
        let deleted = query.execute(&mut *conn).await?.rows_affected();
        if deleted == 0 {
            // The rest are locked by appends right now; the next pass gets them.
            break;
        }
        pruned += deleted;
        excess = excess.saturating_sub(deleted);
    }
    let expired = tombstones::expire(&mut conn, retention, now_ms).await?;
    if expired > 0 {
        tracing::debug!(expired, "pruned tombstones");
    }
    sqlx::query("SELECT pg_advisory_unlock($1, hashtext(current_schema()))")
        .bind(LOCK_CLASS)
        .execute(&mut *conn)
        .await?;
    Ok(pruned)
}

/// The background pruning task; aborted when dropped.
pub(crate) struct Pruner(JoinHandle<()>);

impl Pruner {
    /// Prunes every `every`, first after one period.
    pub(crate) fn spawn(pool: PgPool, target: String, retention: Retention, every: Duration) -> Self {
        let every = every.max(Duration::from_millis(10));
        Self(tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match prune(&pool, &retention, sagaflow::now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(target = %target, pruned = n, "pruned ended sagas"),
                    Err(e) => tracing::warn!(target = %target, error = %e, "pruning the saga log failed"),
                }
            }
        }))
    }
}

impl Drop for Pruner {
    fn drop(&mut self) {
        self.0.abort();
    }
}
