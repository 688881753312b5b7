//! The saga log alone under the sync flow's write pattern: `--callers` tasks each run two-step
//! sagas back to back (begin and the last result awaited, the step starts and the first result
//! queued, as the engine writes them), on the embedded log or the in-memory one, for
//! `--seconds`. Prints sagas/s and the process's CPU per saga, so a change to the log can be
//! judged by its own cost, without the gRPC stack around it.
//!
//! `gap-µs` (default 0) sleeps that long (at least a timer tick, 1 ms) around each step, as the
//! upstream calls do: the queued writes then fall into other commits than the awaited ones.
//! `DEFER_QUEUED_MS` sets [`RedbOptions::defer_queued`], `CACHE_MB` [`RedbOptions::cache_size`].
//! The peak resident memory (VmHWM) is printed at the end.
//!
//!   cargo run --release -p sagaflow-redb --example log_load -- [memory|embedded] [callers] [seconds] [random|sequential] [gap-µs]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sagaflow::log::{NewSaga, Retention, SagaEvent, SagaLog};
use sagaflow::{MemorySagaLog, Mode};
use sagaflow_redb::{RedbOptions, RedbSagaLog};
use serde_json::json;

/// As the booking binary allocates.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// User + system CPU of this process, from /proc (clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// User + system CPU seconds and context switches of the log's writer thread so far, if it runs.
fn writer_usage() -> Option<(f64, f64)> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "sagaflow-redb-w" {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            let switches: f64 = status
                .lines()
                .filter(|line| line.contains("ctxt_switches"))
                .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
                .sum();
            return Some(((ticks(11) + ticks(12)) / 100.0, switches));
        }
    }
    None
}

/// A well-mixed 64-bit hash, for ids spread like random UUIDs.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Runs one saga; returns how long its two awaited writes took.
async fn saga(log: &dyn SagaLog, id: String, gap: Duration) -> [Duration; 2] {
    let call = || async {
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    };
    let data = json!({"product_id": 7, "count": 1, "fault_inject": false, "order_id": 0, "payment_id": 0});
    let start = NewSaga {
        request_id: id.clone(),
        facade: "SyncBooking".into(),
        mode: Mode::Sync,
        steps: 2,
        data: data.clone(),
        deadline_ms: u64::MAX,
        callback_url: None,
        owner: None,
        version: None,
    };
    let began = Instant::now();
    log.begin(start).await.expect("begin");
    let begin_took = began.elapsed();
    log.append_queued(&id, SagaEvent::StepStarted { index: 0 }).await.expect("start 0");
    call().await;
    let after_order = json!({"product_id": 7, "count": 1, "fault_inject": false, "order_id": 12345, "payment_id": 0});
    log.append_queued(&id, SagaEvent::StepCompleted { index: 0, attempts: 1, data: after_order })
        .await
        .expect("result 0");
    log.append_queued(&id, SagaEvent::StepStarted { index: 1 }).await.expect("start 1");
    call().await;
    let done = json!({"product_id": 7, "count": 1, "fault_inject": false, "order_id": 12345, "payment_id": 67890});
    let ending = Instant::now();
    let record =
        log.append(&id, SagaEvent::StepCompleted { index: 1, attempts: 1, data: done }).await.expect("result 1");
    let end_took = ending.elapsed();
    if std::env::var_os("SHOW_RECORD").is_some() {
        println!("{}", serde_json::to_string(&record).unwrap_or_default());
    }
    [begin_took, end_took]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map(String::as_str).unwrap_or("embedded").to_owned();
    let callers: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(64);
    let seconds: u64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(5);
    // `random` ids scatter over the key space as UUIDs do; `sequential` ones are ordered as
    // sagaflow-bench's are (`bench-<run>-<flow>-<n>-<i>`).
    let random_ids = args.get(4).map(String::as_str) != Some("sequential");
    let gap = Duration::from_micros(args.get(5).and_then(|v| v.parse().ok()).unwrap_or(0));
    let next_id = Arc::new(AtomicU64::new(0));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = RedbOptions::new(dir.path());
    if let Some(ms) = std::env::var("DEFER_QUEUED_MS").ok().and_then(|v| v.parse().ok()) {
        options = options.defer_queued(Duration::from_millis(ms));
    }
    if let Some(mb) = std::env::var("CACHE_MB").ok().and_then(|v| v.parse::<usize>().ok()) {
        options = options.cache_size(mb << 20);
    }
    let redb = (kind != "memory").then(|| Arc::new(RedbSagaLog::open(options).expect("open")));
    let log: Arc<dyn SagaLog> = match &redb {
        None => Arc::new(MemorySagaLog::with_retention(Retention::default())),
        Some(redb) => redb.clone(),
    };
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    runtime.block_on(async {
        let cpu0 = cpu_seconds();
        let writer0 = writer_usage();
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let (log, done, stop, next_id) = (log.clone(), done.clone(), stop.clone(), next_id.clone());
                tokio::spawn(async move {
                    let mut awaited = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                    while !stop.load(Ordering::Relaxed) {
                        let n = next_id.fetch_add(1, Ordering::Relaxed);
                        let id = if random_ids { format!("{:016x}-{c}", splitmix64(n)) } else { format!("load-{n}") };
                        for took in saga(log.as_ref(), id, gap).await {
                            awaited.saturating_record(took.as_micros() as u64);
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        // The memory log never suspends: let the timer and the other callers run.
                        tokio::task::yield_now().await;
                    }
                    awaited
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut awaited = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
        for task in tasks {
            awaited.add(task.await.expect("caller")).expect("same histogram bounds");
        }
        let (elapsed, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
        let writer = writer_usage().zip(writer0).map(|(now, then)| (now.0 - then.0, now.1 - then.1));
        let n = done.load(Ordering::Relaxed) as f64;
        println!(
            "{kind}: {callers} callers, {n:.0} sagas in {elapsed:.2}s = {:.0} sagas/s, CPU {:.0}% of a core, {:.1} µs CPU per saga",
            n / elapsed,
            100.0 * cpu / elapsed,
            1e6 * cpu / n
        );
        println!(
            "  awaited writes (begin, last result): p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            awaited.value_at_quantile(0.5),
            awaited.value_at_quantile(0.99),
            awaited.value_at_quantile(0.999),
            awaited.max()
        );
        if let Some(redb) = &redb {
            let stats = redb.stats();
            println!(
                "  writer thread {:.1} µs CPU and {:.2} context switches per saga; {} commits = {:.0}/s, {:.1} writes per commit, {:.2} records stored per saga",
                1e6 * writer.map_or(f64::NAN, |w| w.0) / n,
                writer.map_or(f64::NAN, |w| w.1) / n,
                stats.batches,
                stats.batches as f64 / elapsed,
                stats.average_batch(),
                stats.stored as f64 / n
            );
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let peak = status.lines().find(|line| line.starts_with("VmHWM")).unwrap_or("VmHWM: ?");
        println!("  peak resident memory: {}", peak.trim_start_matches("VmHWM:").trim());
    });
}
