//! `trip`: runs three trips (one that completes, one whose hotel refuses, one
//! whose payment refuses) and prints what each service kept.
//! `trip bench [SAGAS] [LATENCY_MS] [memory|redb]`: the sync latency of the
//! three-branch stage against a single step with the same upstream latency,
//! run side by side, on the in-memory or the embedded saga log.
//! `trip drive LOG COUNT REFUSE_EVERY`: runs trips `trip-0` to `trip-{COUNT-1}`
//! on a durable saga log (`redb:DIR` or `postgres:URL#SCHEMA`), finishing first
//! what a previous run left unfinished, the hotel refusing every trip whose
//! number is a multiple of REFUSE_EVERY; the crash test kills it mid-run.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow::log::{ListFilter, SagaLog};
use sagaflow::{Flow, MemoryBroker, MemorySagaLog, Options, Orchestrator, Outcome, Parallel};
use sagaflow_postgres::{PostgresOptions, PostgresSagaLog};
use sagaflow_redb::{RedbOptions, RedbSagaLog};
use trip::node::Reserve;
use trip::service::{Service, Services};
use trip::{SYNC_TRIP, Trip};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => demo().await,
        Some("bench") => {
            let sagas = args.next().map(|a| a.parse()).transpose()?.unwrap_or(300);
            let latency = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
            let dir = std::env::temp_dir().join(format!("trip-bench-{}", std::process::id()));
            let log: Arc<dyn SagaLog> = match args.next().as_deref() {
                None | Some("memory") => Arc::new(MemorySagaLog::new()),
                Some("redb") => Arc::new(RedbSagaLog::open(RedbOptions::new(&dir))?),
                Some(other) => anyhow::bail!("unknown saga log `{other}`: memory or redb"),
            };
            let result = bench(sagas, Duration::from_millis(latency), log).await;
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
        Some("drive") => {
            let (Some(log), Some(count), Some(refuse_every)) = (args.next(), args.next(), args.next()) else {
                anyhow::bail!("usage: trip drive redb:DIR|postgres:URL#SCHEMA COUNT REFUSE_EVERY");
            };
            drive(&log, count.parse()?, refuse_every.parse()?).await
        }
        Some(other) => {
            anyhow::bail!(
                "unknown command `{other}`: run `trip`, `trip bench [SAGAS] [LATENCY_MS] [memory|redb]` or `trip drive`"
            )
        }
    }
}

async fn demo() -> anyhow::Result<()> {
    let services = Services::new(Duration::from_millis(20));
    let orchestrator = trip::orchestrator(&services).await?;
    let faults: [(&str, Option<&Arc<Service>>); 3] =
        [("trip-ok", None), ("trip-no-hotel", Some(&services.hotels)), ("trip-no-payment", Some(&services.payments))];
    for (id, fault) in faults {
        if let Some(service) = fault {
            service.set_fault(true);
        }
        let started = Instant::now();
        let outcome = orchestrator.run(SYNC_TRIP, id, Trip::new("Ada", 48_000)).await?;
        let took = started.elapsed();
        match outcome {
            Outcome::Completed(trip) => println!("{id}: completed in {took:?}: {trip:?}"),
            Outcome::Compensated(failure) => println!("{id}: compensated in {took:?}: {failure}"),
            Outcome::Stuck { reason, .. } => println!("{id}: stuck: {reason}"),
        }
        for service in [&services.flights, &services.hotels, &services.cars, &services.payments] {
            println!("    {:<8} {:?}", service.name(), service.booking(id));
        }
        if let Some(service) = fault {
            service.set_fault(false);
        }
    }
    orchestrator.shutdown().await;
    Ok(())
}

/// Opens the durable saga log `spec` names: `redb:DIR` or `postgres:URL#SCHEMA`.
async fn open_log(spec: &str) -> anyhow::Result<Arc<dyn SagaLog>> {
    if let Some(dir) = spec.strip_prefix("redb:") {
        return Ok(Arc::new(RedbSagaLog::open(RedbOptions::new(dir))?));
    }
    if let Some((url, schema)) = spec.strip_prefix("postgres:").and_then(|s| s.split_once('#')) {
        let options = PostgresOptions::from_url(url)?.schema(schema);
        return Ok(Arc::new(PostgresSagaLog::connect(options).await?));
    }
    anyhow::bail!("unknown saga log `{spec}`: redb:DIR or postgres:URL#SCHEMA")
}

async fn drive(log: &str, count: u64, refuse_every: u64) -> anyhow::Result<()> {
    let log = open_log(log).await?;
    let services = Services::new(Duration::from_millis(20));
    services.hotels.refuse_every(refuse_every);
    // The same pod id in every run: a shared log gives a restarted driver its own sagas back.
    let options = Options { pod_id: "trip-drive".into(), ..Options::default() };
    let orchestrator = Arc::new(
        Orchestrator::builder(Arc::new(MemoryBroker::new()), log.clone())
            .options(options)
            .sync(SYNC_TRIP, trip::trip_flow(&services))
            .start() // finishes what a previous run left
            .await?,
    );
    let recovered = orchestrator.stats().recovered;
    // Trips a previous run began have ended or are being recovered: only the others are
    // started, so a run drives new trips from its first moment, however many came before.
    let trips = ListFilter { facade: Some(SYNC_TRIP.into()), ..ListFilter::default() };
    let begun: HashSet<String> = log.list(trips).await?.into_iter().map(|r| r.request_id).collect();
    let begun = Arc::new(begun);
    println!("driving: {recovered} trips unfinished from a previous run, {} begun", begun.len());
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (orchestrator, next, begun) = (orchestrator.clone(), next.clone(), begun.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= count {
                        return Ok::<_, sagaflow::Error>(());
                    }
                    let id = format!("trip-{n}");
                    if !begun.contains(&id) {
                        orchestrator.run(SYNC_TRIP, &id, Trip::new("Ada", 1)).await?;
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await??;
    }
    while !log.unfinished().await?.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("drove {count} trips");
    orchestrator.shutdown().await;
    Ok(())
}

async fn bench(sagas: usize, latency: Duration, log: Arc<dyn SagaLog>) -> anyhow::Result<()> {
    let services = Services::new(latency);
    let single = Flow::new().node(Reserve::flight(services.flights.clone()));
    let parallel = Flow::new().parallel(
        Parallel::new()
            .branch(Reserve::flight(services.flights.clone()))
            .branch(Reserve::hotel(services.hotels.clone()))
            .branch(Reserve::car(services.cars.clone()))
            .merge(Trip::merge),
    );
    let name = log.name();
    let orchestrator = Orchestrator::builder(Arc::new(MemoryBroker::new()), log)
        .sync("Single", single)
        .sync("Parallel", parallel)
        .start()
        .await?;
    let (mut one, mut three) = (Vec::with_capacity(sagas), Vec::with_capacity(sagas));
    // Alternating, one saga at a time, so both see the same machine.
    for n in 0..sagas {
        for (facade, took) in [("Single", &mut one), ("Parallel", &mut three)] {
            let started = Instant::now();
            let outcome = orchestrator.run(facade, &format!("{facade}-{n}"), Trip::new("Ada", 1)).await?;
            anyhow::ensure!(matches!(outcome, Outcome::Completed(_)), "{facade} saga {n} did not complete");
            took.push(started.elapsed());
        }
    }
    orchestrator.shutdown().await;
    println!("{sagas} sagas per flow, upstream latency {latency:?}, {name} log, sync, one at a time, alternating");
    let (p_one, p_three) = (report("single step", &mut one), report("three parallel branches", &mut three));
    println!("p50 ratio (parallel / single): {:.3}", p_three.as_secs_f64() / p_one.as_secs_f64());
    Ok(())
}

/// Prints the percentiles of `took` and returns its median.
fn report(what: &str, took: &mut [Duration]) -> Duration {
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what:<24} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(at(0.5)),
        ms(at(0.9)),
        ms(at(0.99)),
        ms(took[took.len() - 1])
    );
    at(0.5)
}
