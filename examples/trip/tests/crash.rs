//! Crash test: `trip drive` (a sync trip flow with its parallel stage, on a
//! durable saga log) killed with `kill -9` three times mid-run and run again;
//! at the end every trip has ended as its number says: compensated when the
//! hotel refuses it, completed with every booking and the payment otherwise.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use rand::Rng;
use sagaflow::SagaStatus;
use sagaflow::log::{ListFilter, SagaLog};
use trip::Trip;

const TRIPS: u64 = 2_000;
const REFUSE_EVERY: u64 = 7;
const KILLS: usize = 3;

fn drive(log: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_trip"))
        .args(["drive", log, &TRIPS.to_string(), &REFUSE_EVERY.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("trip drive starts")
}

/// Starts the driver and waits for its first line: it has recovered what a
/// previous run left and drives trips. Returns the driver, the rest of its
/// output (kept open: the driver still writes to it) and how many trips it
/// found unfinished.
async fn started(spec: &str) -> (Child, BufReader<ChildStdout>, u64) {
    let mut child = drive(spec);
    let stdout = child.stdout.take().expect("piped");
    let first = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).map(|_| (reader, line))
    });
    let (reader, line) = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the driver starts within a minute")
        .unwrap()
        .expect("the driver's first line");
    let recovered = line
        .strip_prefix("driving: ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the driver's first line: {line:?}"));
    (child, reader, recovered)
}

/// Kills the driver three times at random moments while it drives trips,
/// then lets a last run finish.
async fn kill_and_finish(spec: &str) {
    for kill in 0..KILLS {
        let (mut child, _output, _) = started(spec).await;
        let after = Duration::from_millis(rand::rng().random_range(200..700));
        tokio::time::sleep(after).await;
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the driver ended before kill {kill}: {status}");
        }
        child.kill().expect("kill -9"); // SIGKILL
        child.wait().expect("the killed driver is reaped");
    }
    let (mut last, mut output, recovered) = started(spec).await;
    // The last kill left sagas in flight, some of them mid-stage: the last run finishes them.
    assert!(recovered > 0, "the last run found nothing unfinished");
    let (status, said) = tokio::task::spawn_blocking(move || {
        let mut said = String::new();
        output.read_to_string(&mut said).map(|_| (last.wait(), said))
    })
    .await
    .unwrap()
    .expect("the last run's output");
    assert!(status.expect("the last run ends").success(), "the last run failed: {said}");
    assert!(said.contains(&format!("drove {TRIPS} trips")), "{said}");
}

/// Every trip's record in `log` ended as its number says.
async fn check(log: &dyn SagaLog) {
    let records = log.list(ListFilter { facade: Some(trip::SYNC_TRIP.into()), ..ListFilter::default() }).await.unwrap();
    assert_eq!(records.len() as u64, TRIPS, "one saga per trip");
    let mut compensated = 0;
    for record in records {
        let n = trip::service::number_of(&record.request_id).expect("a numbered trip");
        let merges = record.history.iter().filter(|h| h.event == sagaflow::HistoryEvent::BranchesJoined).count();
        assert!(merges <= 1, "{}: merged {merges} times", record.request_id);
        if n.is_multiple_of(REFUSE_EVERY) {
            compensated += 1;
            assert_eq!(record.status(), SagaStatus::Compensated, "{}: {:?}", record.request_id, record.state);
        } else {
            assert_eq!(record.status(), SagaStatus::Completed, "{}: {:?}", record.request_id, record.state);
            let trip: Trip = serde_json::from_value(record.data.clone()).unwrap();
            assert!(
                trip.flight.is_some() && trip.hotel.is_some() && trip.car.is_some() && trip.payment.is_some(),
                "{}: {trip:?}",
                record.request_id
            );
            assert_eq!(merges, 1, "{}", record.request_id);
        }
    }
    assert_eq!(compensated, TRIPS.div_ceil(REFUSE_EVERY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stage_on_the_embedded_log() {
    let dir = std::env::temp_dir().join(format!("trip-crash-{}-{:x}", std::process::id(), rand::random::<u32>()));
    kill_and_finish(&format!("redb:{}", dir.display())).await;
    let log = sagaflow_redb::RedbSagaLog::open(sagaflow_redb::RedbOptions::new(&dir)).expect("the log reopens");
    check(&log).await;
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stage_on_postgres() {
    let url = std::env::var("SAGAFLOW_POSTGRES_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| sagaflow_postgres::PostgresOptions::DEFAULT_URL.into());
    if tokio::net::TcpStream::connect("127.0.0.1:5432").await.is_err() {
        let required = std::env::var_os("SAGAFLOW_REQUIRE_BROKERS").is_some_and(|v| !v.is_empty() && v != "0");
        assert!(!required, "PostgreSQL on 127.0.0.1:5432 is required for the crash test");
        eprintln!("skipping: PostgreSQL not reachable on 127.0.0.1:5432");
        return;
    }
    // Named as the PostgreSQL tests name theirs, so a killed run's schema is swept by them later.
    let schema = format!("sagaflow_test_{}_{:016x}", sagaflow::now_ms() / 1000, rand::random::<u64>());
    kill_and_finish(&format!("postgres:{url}#{schema}")).await;
    let options = sagaflow_postgres::PostgresOptions::from_url(&url).unwrap().schema(&schema);
    let log = sagaflow_postgres::PostgresSagaLog::connect(options).await.expect("the log connects");
    check(&log).await;
    let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(log.pool()).await;
}
