//! Saga log write throughput: 64 concurrent tasks, each running sagas of
//! `begin` + 4 appends, against the in-memory log and PostgreSQL.
//!
//! ```text
//! cargo run --release -p sagaflow-postgres --example postgres_throughput [SAGAS_PER_TASK] [POOL_SIZE]
//! ```
//!
//! The database is `SAGAFLOW_POSTGRES_URL` (else the local default); the run
//! uses a schema of its own and drops it at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow::log::{NewSaga, SagaEvent, SagaLog};
use sagaflow::{MemorySagaLog, Mode};
use sagaflow_postgres::{PostgresOptions, PostgresSagaLog};
use serde_json::json;
use sqlx::AssertSqlSafe;

const TASKS: usize = 64;
const EVENTS_PER_SAGA: usize = 5;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let per_task: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);
    let pool_size: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(PostgresOptions::DEFAULT_POOL_SIZE);
    let url = std::env::var("SAGAFLOW_POSTGRES_URL").unwrap_or_else(|_| PostgresOptions::DEFAULT_URL.into());

    println!("{TASKS} tasks x {per_task} sagas x (begin + 4 appends)");
    let memory = run("memory", Arc::new(MemorySagaLog::new()), per_task).await?;

    let schema = format!("sagaflow_bench_{:016x}", rand::random::<u64>());
    let options = PostgresOptions::from_url(&url)?.schema(&schema).pool_size(pool_size).prune_interval(None);
    println!("postgres: {} (pool {pool_size})", options.target());
    let log = Arc::new(PostgresSagaLog::connect(options).await?);
    let outcome = run("postgres", log.clone(), per_task).await;
    let dropped = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(log.pool()).await;
    let postgres = outcome?;
    dropped?;

    println!("memory / postgres: {:.1}x", memory / postgres);
    Ok(())
}

/// Runs the load on `log`; returns events per second.
async fn run(name: &str, log: Arc<dyn SagaLog>, per_task: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let run = format!("{:08x}", rand::random::<u32>());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let (log, run) = (log.clone(), run.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(per_task * EVENTS_PER_SAGA);
            for i in 0..per_task {
                let id = format!("{run}-{task}-{i}");
                let saga = NewSaga {
                    request_id: id.clone(),
                    facade: "Throughput".into(),
                    mode: Mode::Async,
                    steps: 2,
                    data: json!({ "task": task, "i": i }),
                    deadline_ms: u64::MAX,
                    callback_url: None,
                    owner: None,
                    version: None,
                };
                let t = Instant::now();
                log.begin(saga).await?;
                latencies.push(t.elapsed());
                for index in 0..2 {
                    let t = Instant::now();
                    log.append(&id, SagaEvent::StepStarted { index }).await?;
                    latencies.push(t.elapsed());
                    let data = json!({ "task": task, "i": i, "step": index });
                    let t = Instant::now();
                    log.append(&id, SagaEvent::StepCompleted { index, attempts: 1, data }).await?;
                    latencies.push(t.elapsed());
                }
            }
            Ok::<_, sagaflow::log::LogError>(latencies)
        });
    }
    let mut latencies: Vec<Duration> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        latencies.extend(joined??);
    }
    let elapsed = started.elapsed();
    let events = latencies.len();
    let rate = events as f64 / elapsed.as_secs_f64();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "{name:>9}: {events} events in {elapsed:.2?}: {rate:.0} events/s; latency p50 {:.2?} p99 {:.2?} max {:.2?}",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    Ok(rate)
}
