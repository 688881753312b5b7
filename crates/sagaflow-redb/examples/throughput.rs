//! Write throughput of the embedded saga log against the in-memory one.
//!
//! `cargo run --release -p sagaflow-redb --example throughput [TASKS] [SAGAS_PER_TASK]`
//! (defaults 64 and 200): TASKS concurrent tasks each run SAGAS_PER_TASK sagas of
//! `begin` + 4 `append`s, first against `MemorySagaLog`, then against `RedbSagaLog` in a
//! temporary directory; prints events per second for both, their ratio and how many
//! writes shared each redb commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow::log::{NewSaga, SagaEvent, SagaLog};
use sagaflow::{MemorySagaLog, Mode};
use sagaflow_redb::{RedbOptions, RedbSagaLog};
use serde_json::json;

const EVENTS_PER_SAGA: u64 = 5;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tasks: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let sagas: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    println!("{tasks} concurrent tasks x {sagas} sagas x {EVENTS_PER_SAGA} events (begin + 4 appends)");

    let memory = run("memory", Arc::new(MemorySagaLog::new()), tasks, sagas).await?;

    let dir = tempfile::tempdir()?;
    let redb = Arc::new(RedbSagaLog::open(RedbOptions::new(dir.path()))?);
    let embedded = run("redb", redb.clone(), tasks, sagas).await?;
    let stats = redb.stats();
    println!("redb commits: {} for {} writes, average batch {:.1}", stats.batches, stats.writes, stats.average_batch());
    println!("ratio redb / memory: {:.3}", embedded / memory);
    Ok(())
}

/// Runs the load on `log` and returns events per second.
async fn run(name: &str, log: Arc<dyn SagaLog>, tasks: usize, sagas: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let log = log.clone();
        set.spawn(async move {
            for saga in 0..sagas {
                let id = format!("{task}-{saga}");
                log.begin(new_saga(&id)).await?;
                for index in 0..2 {
                    log.append(&id, SagaEvent::StepStarted { index }).await?;
                    let data = json!({ "order_id": task, "payment_id": saga, "step": index });
                    log.append(&id, SagaEvent::StepCompleted { index, attempts: 1, data }).await?;
                }
            }
            Ok::<_, sagaflow::log::LogError>(())
        });
    }
    while let Some(joined) = set.join_next().await {
        joined??;
    }
    let elapsed = started.elapsed().max(Duration::from_nanos(1));
    let events = (tasks * sagas) as u64 * EVENTS_PER_SAGA;
    let rate = events as f64 / elapsed.as_secs_f64();
    println!("{name:>6}: {events} events in {elapsed:.2?} = {rate:.0} events/s");
    Ok(rate)
}

fn new_saga(id: &str) -> NewSaga {
    NewSaga {
        request_id: id.to_owned(),
        facade: "SyncBooking".into(),
        mode: Mode::Sync,
        steps: 2,
        data: json!({ "product_id": 1, "count": 2 }),
        deadline_ms: u64::MAX,
        callback_url: None,
        owner: None,
        version: None,
    }
}
