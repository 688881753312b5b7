//! Shared helpers: a throw-away schema per test on the shared database.
#![allow(dead_code, unreachable_pub)]

use std::sync::Mutex;
use std::time::Duration;

use sagaflow::log::Retention;
use sagaflow_postgres::{PostgresOptions, PostgresSagaLog};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The environment variable naming the test database.
pub const URL_ENV: &str = "SAGAFLOW_POSTGRES_URL";

/// Prefix of every schema the tests create.
const PREFIX: &str = "sagaflow_test_";

/// Schemas older than this are left-overs of killed runs, dropped on the next run.
const STALE: Duration = Duration::from_secs(3600);

/// The test database's URL.
pub fn url() -> String {
    std::env::var(URL_ENV).ok().filter(|u| !u.trim().is_empty()).unwrap_or_else(|| PostgresOptions::DEFAULT_URL.into())
}

/// Options for `schema` on the test database, without background pruning; its connections show
/// the schema as their application name, so a test can find its own in `pg_stat_activity`.
pub fn options(schema: &str) -> PostgresOptions {
    PostgresOptions::from_url(&url())
        .expect("test URL")
        .schema(schema)
        .prune_interval(None)
        .pool_size(4)
        .application_name(schema)
}

/// The test database; every schema made through it is dropped when it is.
pub struct TestDb {
    schemas: Mutex<Vec<String>>,
}

impl TestDb {
    /// The database if reachable; else `None` after printing why (or a panic when required).
    pub async fn open() -> Option<Self> {
        let mut conn = match admin_connection().await {
            Ok(conn) => conn,
            Err(e) => {
                let target = PostgresOptions::from_url(&url()).map(|o| o.target()).unwrap_or_else(|_| url());
                return sagaflow::testsuite::skip_or_fail(&format!("PostgreSQL at {target}"), e);
            }
        };
        reap_stale_schemas(&mut conn).await;
        let _ = conn.close().await;
        Some(Self { schemas: Mutex::new(Vec::new()) })
    }

    /// A new schema name, dropped with this value (created by the first connect).
    pub fn new_schema(&self) -> String {
        let secs = sagaflow::now_ms() / 1000;
        let name = format!("{PREFIX}{secs}_{:016x}", rand::random::<u64>());
        self.schemas.lock().unwrap_or_else(|e| e.into_inner()).push(name.clone());
        name
    }

    /// Opens the log in `schema`.
    pub async fn connect(&self, schema: &str) -> PostgresSagaLog {
        PostgresSagaLog::connect(options(schema)).await.expect("connect to the test schema")
    }

    /// Opens the log in `schema` with this retention.
    pub async fn connect_with_retention(&self, schema: &str, retention: Retention) -> PostgresSagaLog {
        PostgresSagaLog::connect(options(schema).retention(retention)).await.expect("connect to the test schema")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let schemas = std::mem::take(&mut *self.schemas.lock().unwrap_or_else(|e| e.into_inner()));
        if schemas.is_empty() {
            return;
        }
        // Drop runs inside the test's runtime, which cannot block on a future:
        // a thread of its own with its own runtime does the async cleanup.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                let Ok(mut conn) = admin_connection().await else { return };
                for schema in schemas {
                    drop_schema(&mut conn, &schema).await;
                }
                let _ = conn.close().await;
            });
        });
        let _ = cleanup.join();
    }
}

async fn admin_connection() -> Result<PgConnection, String> {
    let options: PgConnectOptions = url().parse().map_err(|e| format!("bad {URL_ENV}: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

async fn drop_schema(conn: &mut PgConnection, schema: &str) {
    // Names come from `new_schema` or the catalog filtered by PREFIX: plain identifiers.
    if !schema.starts_with(PREFIX) || !schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return;
    }
    let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
    if let Err(e) = sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await {
        eprintln!("could not drop test schema {schema}: {e}");
    }
}

async fn reap_stale_schemas(conn: &mut PgConnection) {
    let Ok(names) = sqlx::query_scalar::<_, String>("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1")
        .bind(format!("{PREFIX}%"))
        .fetch_all(&mut *conn)
        .await
    else {
        return;
    };
    let now = sagaflow::now_ms() / 1000;
    for name in names {
        let secs = name[PREFIX.len()..].split('_').next().and_then(|s| s.parse::<u64>().ok());
        if secs.is_some_and(|secs| now.saturating_sub(secs) > STALE.as_secs()) {
            drop_schema(conn, &name).await;
        }
    }
}
