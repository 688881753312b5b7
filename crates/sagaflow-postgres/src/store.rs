//! The [`SagaLog`] over one PostgreSQL table.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use sagaflow::log::{Begin, ListFilter, LogError, Retention, SagaLog};
use sagaflow::{NewSaga, SagaEvent, SagaRecord};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::error::{Error, Result};
use crate::options::PostgresOptions;
use crate::prune::{self, Pruner};

/// The schema, embedded at build time and applied on connect.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pooled connection idle this long is pinged before use (a dead one is replaced).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// Sagas in a PostgreSQL table, shared safely by several orchestrator replicas.
///
/// Each saga is one row; [`append`](SagaLog::append) locks it (`SELECT ... FOR
/// UPDATE`) so concurrent writers to one saga apply their events one after the
/// other. Ended sagas are pruned in the background per the
/// [`Retention`].
pub struct PostgresSagaLog {
    pool: PgPool,
    target: String,
    retention: Retention,
    /// Stops the background pruning when the log is dropped.
    _pruner: Option<Pruner>,
}

impl PostgresSagaLog {
    /// Connects, creates the schema if asked, applies the migrations and starts pruning.
    pub async fn connect(options: PostgresOptions) -> Result<Self> {
        let target = options.target();
        let schema = options.checked_schema()?;
        let mut connect = options.connect.clone();
        if let Some(schema) = schema {
            connect = connect.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size.max(1))
            .acquire_timeout(options.acquire_timeout)
            // sqlx pings every connection it hands out, a round trip per call on
            // the hot path; only a connection idle for a while can have gone stale.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_WHEN_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect)
            .await
            .map_err(|source| Error::Connect { target: target.clone(), source })?;
        if let Some(schema) = schema {
            create_schema(&pool, schema).await.map_err(|source| Error::Database {
                target: target.clone(),
                what: "creating the schema",
                source,
            })?;
        }
        MIGRATOR.run(&pool).await.map_err(|source| Error::Migrate { target: target.clone(), source })?;
        let pruner =
            options.prune_interval.map(|every| Pruner::spawn(pool.clone(), target.clone(), options.retention, every));
        tracing::debug!(target = %target, "postgres saga log ready");
        Ok(Self { pool, target, retention: options.retention, _pruner: pruner })
    }

    /// Prunes ended sagas per the retention now, returning how many were dropped.
    pub async fn prune_now(&self) -> Result<u64> {
        prune::prune(&self.pool, &self.retention, sagaflow::now_ms()).await.map_err(|source| Error::Database {
            target: self.target.clone(),
            what: "pruning",
            source,
        })
    }

    /// The connection pool, for admin queries on the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes every connection; later calls fail as unavailable.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn unavailable(&self, what: &str, error: sqlx::Error) -> LogError {
        LogError::Unavailable(format!("PostgreSQL at {}: {what} failed: {error}", self.target))
    }
}

impl fmt::Debug for PostgresSagaLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSagaLog")
            .field("target", &self.target)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

async fn create_schema(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(pool)
        .await?;
    if exists {
        return Ok(());
    }
    // The name was checked to be a plain identifier, so it can be spliced in.
    match sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS {schema}"))).execute(pool).await {
        Ok(_) => Ok(()),
        // Two replicas creating it at once: the loser sees a duplicate.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("23505" | "42P06")) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads a stored record back.
fn decode(request_id: &str, text: &str) -> Result<SagaRecord, LogError> {
    serde_json::from_str(text).map_err(|e| LogError::Corrupt(format!("saga `{request_id}`: {e}")))
}

fn encode(record: &SagaRecord) -> Result<String, LogError> {
    serde_json::to_string(record)
        .map_err(|e| LogError::Corrupt(format!("saga `{}` cannot be serialized: {e}", record.request_id)))
}

/// Unix ms as a `float8` bind (Postgres has no unsigned integers); the SQL
/// divides by 1000 for `to_timestamp`, exact to the millisecond for any real date.
fn ms(value: u64) -> f64 {
    value as f64
}

const SELECT_FOR_UPDATE: &str = "SELECT record::text FROM sagaflow_sagas WHERE request_id = $1 FOR UPDATE";
const UPDATE: &str = "UPDATE sagaflow_sagas SET record = $2::text::jsonb, status = $3, \
     updated_at = to_timestamp($4::float8 / 1000), \
     ended_at = CASE WHEN $5 THEN coalesce(ended_at, to_timestamp($4::float8 / 1000)) ELSE NULL END \
     WHERE request_id = $1";

async fn write(conn: &mut PgConnection, record: &SagaRecord, json: String) -> Result<(), sqlx::Error> {
    let status = record.status();
    sqlx::query(UPDATE)
        .bind(&record.request_id)
        .bind(json)
        .bind(status.to_string())
        .bind(ms(record.updated_ms))
        .bind(record.state.is_ended())
        .execute(conn)
        .await?;
    Ok(())
}

const LIST_ALL: &str = "SELECT request_id, record::text FROM sagaflow_sagas \
     ORDER BY created_at DESC, request_id LIMIT $1";
const LIST_BY_FACADE: &str = "SELECT request_id, record::text FROM sagaflow_sagas WHERE facade = $2 \
     ORDER BY created_at DESC, request_id LIMIT $1";
const LIST_BY_STATUS: &str = "SELECT request_id, record::text FROM sagaflow_sagas WHERE status = $2 \
     ORDER BY created_at DESC, request_id LIMIT $1";
const LIST_BY_BOTH: &str = "SELECT request_id, record::text FROM sagaflow_sagas WHERE facade = $2 AND status = $3 \
     ORDER BY created_at DESC, request_id LIMIT $1";

#[async_trait]
impl SagaLog for PostgresSagaLog {
    async fn begin(&self, saga: NewSaga) -> Result<Begin, LogError> {
        let record = SagaRecord::new(saga);
        let json = encode(&record)?;
        // A concurrent prune may delete the row between the insert and the select; try again then.
        for _ in 0..3 {
            let inserted: Option<String> = sqlx::query_scalar(
                "INSERT INTO sagaflow_sagas (request_id, facade, mode, status, record, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5::text::jsonb, to_timestamp($6::float8 / 1000), \
                 to_timestamp($6::float8 / 1000)) \
                 ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
            )
            .bind(&record.request_id)
            .bind(&record.facade)
            .bind(record.mode.to_string())
            .bind(record.status().to_string())
            .bind(&json)
            .bind(ms(record.created_ms))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.unavailable("begin", e))?;
            if inserted.is_some() {
                return Ok(Begin::Started(record));
            }
            if let Some(existing) = self.get(&record.request_id).await? {
                return Ok(Begin::Exists(existing));
            }
            // Not inserted and not there: a trigger skipped the insert over this tombstone.
            let pruned = crate::tombstones::find(&self.pool, &record.request_id).await;
            if let Some(tombstone) = pruned.map_err(|e| self.unavailable("begin (tombstone)", e))? {
                return Ok(Begin::Pruned(tombstone));
            }
        }
        Err(LogError::Unavailable(format!(
            "PostgreSQL at {}: saga `{}` kept appearing and vanishing during begin",
            self.target, record.request_id
        )))
    }

    async fn append(&self, request_id: &str, event: SagaEvent) -> Result<SagaRecord, LogError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.unavailable("append (begin)", e))?;
        let text: Option<String> = sqlx::query_scalar(SELECT_FOR_UPDATE)
            .bind(request_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.unavailable("append (select)", e))?;
        // On every early return the dropped transaction rolls back, releasing the row lock.
        let Some(text) = text else { return Err(LogError::NotFound(request_id.to_owned())) };
        let mut record = decode(request_id, &text)?;
        record.apply(&event)?;
        let json = encode(&record)?;
        write(&mut tx, &record, json).await.map_err(|e| self.unavailable("append (update)", e))?;
        tx.commit().await.map_err(|e| self.unavailable("append (commit)", e))?;
        Ok(record)
    }

    async fn get(&self, request_id: &str) -> Result<Option<SagaRecord>, LogError> {
        let text: Option<String> = sqlx::query_scalar("SELECT record::text FROM sagaflow_sagas WHERE request_id = $1")
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.unavailable("get", e))?;
        text.map(|text| decode(request_id, &text)).transpose()
    }

    async fn unfinished(&self) -> Result<Vec<SagaRecord>, LogError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT request_id, record::text FROM sagaflow_sagas \
             WHERE status IN ('running', 'compensating') ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.unavailable("unfinished", e))?;
        rows.iter().map(|(id, text)| decode(id, text)).collect()
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<SagaRecord>, LogError> {
        // A NULL limit is no limit, as `limit: 0` means in the filter.
        let limit = (filter.limit > 0).then(|| i64::try_from(filter.limit).unwrap_or(i64::MAX));
        let status = filter.status.map(|s| s.to_string());
        // One statement per shape rather than `$n IS NULL OR ...`, so each keeps its index plan.
        let query = match (filter.facade, status) {
            (None, None) => sqlx::query_as(LIST_ALL).bind(limit),
            (Some(facade), None) => sqlx::query_as(LIST_BY_FACADE).bind(limit).bind(facade),
            (None, Some(status)) => sqlx::query_as(LIST_BY_STATUS).bind(limit).bind(status),
            (Some(facade), Some(status)) => sqlx::query_as(LIST_BY_BOTH).bind(limit).bind(facade).bind(status),
        };
        let rows: Vec<(String, String)> = query.fetch_all(&self.pool).await.map_err(|e| self.unavailable("list", e))?;
        rows.iter().map(|(id, text)| decode(id, text)).collect()
    }

    fn name(&self) -> &'static str {
        "postgres"
    }
}
