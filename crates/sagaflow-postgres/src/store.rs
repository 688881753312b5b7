//! The [`SagaLog`] over one PostgreSQL table.

use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use sagaflow::SagaRecord;
use sagaflow::log::{Begin, Lease, ListFilter, LogError, LogHealth, NewSaga, Retention, SagaEvent, SagaLog};
use sqlx::postgres::{PgPool, PgPoolOptions, Postgres};
use sqlx::{AssertSqlSafe, Connection, QueryBuilder};

use crate::ends::Ends;
use crate::error::{Error, Result};
use crate::options::PostgresOptions;
use crate::prune::{self, Pruner};
use crate::replicas;
use crate::writer::{Connect, Writers};

/// The schema, embedded at build time and applied on connect.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pooled connection idle this long is pinged before use (a dead one is replaced).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// Sagas in a PostgreSQL table, shared safely by several orchestrator replicas.
///
/// Each saga is one row. Writes go through a group-commit writer with a connection of its own:
/// the `begin`s and `append`s of every saga made while it wrote the last batch are written in
/// the next one, in one statement and one commit. An event is applied to the saga's current
/// record: the write applies only if the row is still at the version the record was read (or
/// last written) at, and a saga whose row another process changed meanwhile is read again under
/// lock. Ended sagas are pruned in the background per the [`Retention`].
pub struct PostgresSagaLog {
    pool: PgPool,
    writers: Writers,
    target: String,
    retention: Retention,
    /// The schema the table lives in, whose saga ends this log announces.
    schema: String,
    /// The replica this log writes as, once registered: its appends to a saga
    /// another replica owns are refused.
    replica: RwLock<Option<Arc<str>>>,
    /// Saga ends announced by the database, listened for once asked.
    ends: OnceLock<Ends>,
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
        let writer_connect =
            Connect { options: connect.clone(), timeout: options.acquire_timeout, target: target.clone() };
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
        let schema = match schema {
            Some(schema) => schema.to_owned(),
            None => sqlx::query_scalar("SELECT current_schema()")
                .fetch_one(&pool)
                .await
                .map_err(|source| Error::Database { target: target.clone(), what: "reading the schema", source })?,
        };
        let pruner =
            options.prune_interval.map(|every| Pruner::spawn(pool.clone(), target.clone(), options.retention, every));
        let writers = Writers::spawn(writer_connect, options.writers, options.defer_queued);
        tracing::debug!(target = %target, "postgres saga log ready");
        Ok(Self {
            pool,
            writers,
            target,
            retention: options.retention,
            schema,
            replica: RwLock::new(None),
            ends: OnceLock::new(),
            _pruner: pruner,
        })
    }

    /// Prunes ended sagas per the retention now, returning how many were dropped.
    pub async fn prune_now(&self) -> Result<u64> {
        prune::prune(&self.pool, &self.retention, sagaflow::now_ms()).await.map_err(|source| Error::Database {
            target: self.target.clone(),
            what: "pruning",
            source,
        })
    }

    /// The plan PostgreSQL runs [`SagaLog::list`] with for `filter`, run and measured: the
    /// output of `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`, for tests that a page far into the
    /// list costs what the first one does.
    #[doc(hidden)]
    pub async fn explain_list(&self, filter: &ListFilter) -> Result<serde_json::Value, LogError> {
        let select = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT request_id, record::text FROM sagaflow_sagas";
        let mut query = list_query(select, filter);
        let plan: sqlx::types::Json<serde_json::Value> =
            query.build_query_scalar().fetch_one(&self.pool).await.map_err(|e| self.unavailable("explain list", e))?;
        Ok(plan.0)
    }

    /// The connection pool, for admin queries on the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Stores the appends queued so far, then closes every connection; later calls fail as
    /// unavailable.
    pub async fn close(&self) {
        self.writers.close().await;
        self.pool.close().await;
    }

    fn replica(&self) -> Option<Arc<str>> {
        self.replica.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn unavailable(&self, what: &str, error: sqlx::Error) -> LogError {
        LogError::unavailable(format!("PostgreSQL at {}: {what} failed", self.target), error)
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

/// The statement of [`SagaLog::list`] from `select` on: keyset paging, where the cursor is a
/// position in (created_at DESC, request_id), so that a page deep in the list is one range of
/// `sagaflow_sagas_created_idx` like the first. The cursor's bound on `created_at` alone is
/// what the index range starts from; the test on `request_id` only sorts out the sagas of the
/// cursor's own millisecond.
fn list_query(select: &str, filter: &ListFilter) -> QueryBuilder<Postgres> {
    let mut query = QueryBuilder::new(select);
    query.push(" WHERE true");
    if let Some(facade) = &filter.facade {
        query.push(" AND facade = ").push_bind(facade.clone());
    }
    if let Some(status) = filter.status {
        query.push(" AND status = ").push_bind(status.to_string());
    }
    if let Some(since) = filter.since_ms {
        query.push(" AND created_at >= to_timestamp(").push_bind(ms(since)).push("::float8 / 1000)");
    }
    if let Some(until) = filter.until_ms {
        query.push(" AND created_at < to_timestamp(").push_bind(ms(until)).push("::float8 / 1000)");
    }
    if let Some(after) = &filter.after {
        query.push(" AND created_at <= to_timestamp(").push_bind(ms(after.created_ms)).push("::float8 / 1000)");
        query.push(" AND (created_at < to_timestamp(").push_bind(ms(after.created_ms));
        query.push("::float8 / 1000) OR request_id > ").push_bind(after.request_id.clone()).push(")");
    }
    query.push(" ORDER BY created_at DESC, request_id");
    if filter.limit > 0 {
        query.push(" LIMIT ").push_bind(i64::try_from(filter.limit).unwrap_or(i64::MAX));
    }
    query
}

/// Reads a stored record back.
pub(crate) fn decode(request_id: &str, text: &str) -> Result<SagaRecord, LogError> {
    serde_json::from_str(text).map_err(|e| LogError::corrupt(format!("saga `{request_id}`"), e))
}

pub(crate) fn encode(record: &SagaRecord) -> Result<String, LogError> {
    serde_json::to_string(record)
        .map_err(|e| LogError::corrupt(format!("saga `{}` cannot be serialized", record.request_id), e))
}

/// Unix ms as a `float8` bind (Postgres has no unsigned integers); the SQL
/// divides by 1000 for `to_timestamp`, exact to the millisecond for any real date.
pub(crate) fn ms(value: u64) -> f64 {
    value as f64
}

#[async_trait]
impl SagaLog for PostgresSagaLog {
    async fn begin(&self, saga: NewSaga) -> Result<Begin, LogError> {
        self.writers.begin(SagaRecord::new(saga)).await
    }

    async fn append(&self, request_id: &str, event: SagaEvent) -> Result<SagaRecord, LogError> {
        self.writers.append(request_id, event, self.replica()).await
    }

    async fn append_queued(&self, request_id: &str, event: SagaEvent) -> Result<(), LogError> {
        self.writers.append_queued(request_id, event, self.replica()).await
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
        let mut query = list_query("SELECT request_id, record::text FROM sagaflow_sagas", &filter);
        let rows: Vec<(String, String)> =
            query.build_query_as().fetch_all(&self.pool).await.map_err(|e| self.unavailable("list", e))?;
        rows.iter().map(|(id, text)| decode(id, text)).collect()
    }

    fn name(&self) -> &'static str {
        "postgres"
    }

    fn health(&self) -> LogHealth {
        self.writers.health()
    }

    fn shared(&self) -> bool {
        true
    }

    async fn controls(&self) -> Result<Vec<(String, String)>, LogError> {
        sqlx::query_as("SELECT key, value FROM sagaflow_controls ORDER BY key")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.unavailable("controls", e))
    }

    async fn set_control(&self, key: &str, value: Option<&str>) -> Result<(), LogError> {
        let query = match value {
            Some(value) => sqlx::query(
                "INSERT INTO sagaflow_controls (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
            )
            .bind(key)
            .bind(value),
            None => sqlx::query("DELETE FROM sagaflow_controls WHERE key = $1").bind(key),
        };
        query.execute(&self.pool).await.map_err(|e| self.unavailable("set_control", e))?;
        Ok(())
    }

    async fn register(&self, replica: &str, now_ms: u64, ttl: Duration) -> Result<Lease, LogError> {
        let lease =
            replicas::register(&self.pool, replica, now_ms, ttl).await.map_err(|e| self.unavailable("register", e))?;
        *self.replica.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::from(replica));
        Ok(lease)
    }

    async fn renew(&self, replica: &str, lease: Lease, now_ms: u64, ttl: Duration) -> Result<Lease, LogError> {
        replicas::renew(&self.pool, replica, lease, now_ms, ttl)
            .await
            .map_err(|e| self.unavailable("renew", e))?
            .ok_or_else(|| LogError::LeaseLost(replica.to_owned()))
    }

    async fn expired(&self, now_ms: u64) -> Result<Vec<String>, LogError> {
        replicas::expired(&self.pool, now_ms).await.map_err(|e| self.unavailable("expired", e))
    }

    async fn claim(&self, dead: &str, by: &str, now_ms: u64) -> Result<Option<Vec<SagaRecord>>, LogError> {
        let rows = replicas::claim(&self.pool, dead, by, now_ms).await.map_err(|e| self.unavailable("claim", e))?;
        rows.map(|rows| replicas::records(&rows)).transpose()
    }

    async fn unfinished_of(&self, replica: &str) -> Result<Vec<SagaRecord>, LogError> {
        let rows =
            replicas::unfinished_of(&self.pool, replica).await.map_err(|e| self.unavailable("unfinished_of", e))?;
        replicas::records(&rows)
    }

    fn ends(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        let ends = self.ends.get_or_init(|| Ends::listen(self.pool.clone(), self.schema.clone(), self.target.clone()));
        Some(ends.subscribe())
    }
}
