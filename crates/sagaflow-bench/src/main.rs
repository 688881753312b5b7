//! `sagaflow-bench`: open-loop load against the booking orchestrator, with a vegeta-style report.
//!
//! ```text
//! sagaflow-bench --flow sync --rate 500 --duration 30s --json out.json --plot out.png
//! sagaflow-bench --flow sync --rate max --max-in-flight 64 --duration 10s --compare
//! sagaflow-bench saturate --flow throttling --duration 20s --p99-max 100ms
//! sagaflow-bench snapshot --order 127.0.0.1:10001 --payment 127.0.0.1:10002
//! sagaflow-bench --rate 1000 --duration 10m --watch-pid orchestrator=PID --watch-dir data=DIR --plot soak.png
//! ```
//!
//! Requests are sent at their intended times on a fixed schedule and latency runs from those
//! times (no coordinated omission); `--rate max` is a closed loop of `--max-in-flight` callers
//! instead, for throughput at a fixed concurrency.
//!
//! A soak: with `--watch-pid` or `--watch-dir`, the watched processes' resident memory and CPU
//! and the directories' size are sampled every `--sample-interval` (10 s) and printed as they
//! come; the JSON report carries the series and `--plot FILE.png` draws them in
//! `FILE-resources.png`.

mod callback;
mod load;
mod plot;
mod procfs;
mod progress;
mod proto;
mod report;
mod resources;
mod schedule;
mod search;
mod stats;
mod target;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::callback::CallbackHub;
use crate::load::{Counters, Plan};
use crate::procfs::Process;
use crate::progress::{Display, Progress};
use crate::report::{Comparison, Load, Report, TargetShare, Usage, go_duration};
use crate::resources::{Resources, Sampler, Watch};
use crate::schedule::{Rate, parse_duration};
use crate::search::{RateSearch, passes};
use crate::target::{Flow, Replica, Target};

/// Open-loop load generator for the sagaflow booking orchestrator.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Finds the highest rate sustained with 100% success and p99 under a bound (steps of --duration).
    Saturate(Box<SaturateArgs>),
    /// Prints the upstream mocks' counters (their Snapshot) as JSON.
    Snapshot(UpstreamArgs),
}

/// Where the upstream mock services are.
#[derive(Debug, Clone, Args)]
struct UpstreamArgs {
    /// The OrderService (for --direct, --compare, --upstream-snapshot).
    #[arg(long, default_value = "127.0.0.1:10001")]
    order: String,
    /// The PaymentService (for --direct, --compare, --upstream-snapshot).
    #[arg(long, default_value = "127.0.0.1:10002")]
    payment: String,
    /// How long to keep trying to connect (the services may be starting).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    connect_timeout: Duration,
}

/// What load, to what.
#[derive(Debug, Clone, Args)]
struct LoadArgs {
    /// The booking flow to call.
    #[arg(long, value_enum, default_value = "sync")]
    flow: Flow,
    /// The orchestrator's gRPC address. Repeat it, or give a comma list, to spread the calls
    /// over several replicas round robin, as a gRPC load balancer would.
    #[arg(long = "target", value_name = "HOST:PORT", value_delimiter = ',', default_value = "127.0.0.1:10000")]
    targets: Vec<String>,
    /// Call CreateOrder and CreatePayment on the upstreams directly, with no orchestrator.
    #[arg(long)]
    direct: bool,
    /// Requests per second (open loop), or `max`: a closed loop of --max-in-flight callers.
    #[arg(long)]
    rate: Option<Rate>,
    /// How long to send [default: 10s; saturate: 20s per step].
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Most requests outstanding; a request due beyond it is not sent and counts as failed
    /// [default: 10000; with --rate max, the callers: 64].
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Share of requests (0..1) with FaultInject: the payment fails and the saga compensates,
    /// which counts as success (ABORTED, or an async `compensated` callback).
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Longest a request (and an async request's callback) may take; past it, a TIMEOUT failure.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    wait: Duration,
    /// gRPC (HTTP/2) connections per service, used in turn.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Worker threads of the generator's runtime (1: a single-threaded runtime, lightest on shared cores).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Where the async callback receiver listens (loopback; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    callback_listen: SocketAddr,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
    /// Interval of the progress lines when stderr is not a terminal.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    progress_interval: Duration,
    /// Report the CPU time and peak memory of this process too: PID or NAME=PID (repeatable);
    /// its memory and CPU are also sampled every --sample-interval.
    #[arg(long = "watch-pid", value_parser = parse_watched)]
    watch_pids: Vec<(String, u32)>,
    /// Sample the total size of the files under this directory (a data directory) every
    /// --sample-interval: DIR or NAME=DIR (repeatable).
    #[arg(long = "watch-dir", value_parser = parse_watched_dir)]
    watch_dirs: Vec<(String, PathBuf)>,
    /// How often watched processes and directories are sampled.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    sample_interval: Duration,
    #[command(flatten)]
    upstream: UpstreamArgs,
}

/// One run (or, with --compare, two).
#[derive(Debug, Clone, Args)]
struct RunArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Run the same load with --direct first, then the flow, and print the throughput ratio.
    #[arg(long, conflicts_with = "direct")]
    compare: bool,
    /// Write the figures as JSON (vegeta's names; with --compare, both runs and the ratio).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency over time and throughput into this PNG (with --compare, also FILE-direct.png).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Add the upstreams' counters (peak in flight, rejected) after the run.
    #[arg(long)]
    upstream_snapshot: bool,
    /// Exit with status 1 when a run's success ratio is below this.
    #[arg(long)]
    min_success: Option<f64>,
}

/// The saturation search.
#[derive(Debug, Clone, Args)]
struct SaturateArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// First step's rate.
    #[arg(long, default_value_t = 250.0)]
    start_rate: f64,
    /// Lowest rate tried.
    #[arg(long, default_value_t = 10.0)]
    min_rate: f64,
    /// Highest rate tried.
    #[arg(long, default_value_t = 100_000.0)]
    max_rate: f64,
    /// Stop when the lowest failing rate is within this share of the best passing one.
    #[arg(long, default_value_t = 0.1)]
    precision: f64,
    /// A step passes with 100% success and p99 under this.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    p99_max: Duration,
    /// Pause between steps.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    cooldown: Duration,
    /// After each step, wait (up to this long) until a single request is answered within
    /// --p99-max again, so a backlog left by a failed step does not fail the next one.
    #[arg(long, value_parser = parse_duration, default_value = "180s")]
    settle_timeout: Duration,
    /// Write every step's figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Some(Command::Saturate(args)) => args.load.threads,
        Some(Command::Snapshot(_)) => 1,
        None => cli.run.load.threads,
    };
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    };
    let result = runtime.map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            match cli.command {
                None => run(cli.run).await,
                Some(Command::Saturate(args)) => saturate(*args).await,
                Some(Command::Snapshot(args)) => snapshot(args).await,
            }
        })
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sagaflow-bench: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// The targets a run needs, connected.
struct Setup {
    load: LoadArgs,
    flow: Option<Arc<Target>>,
    direct: Option<Arc<Target>>,
    hub: Option<Arc<CallbackHub>>,
    run_id: String,
}

impl Setup {
    async fn connect(load: &LoadArgs, flow: bool, direct: bool) -> anyhow::Result<Self> {
        if !(0.0..=1.0).contains(&load.fault_rate) {
            bail!("--fault-rate must be between 0 and 1, got {}", load.fault_rate);
        }
        let patience = load.upstream.connect_timeout;
        let connections = load.connections.max(1);
        let mut hub = None;
        let flow = if flow {
            let callbacks = if load.flow == Flow::Async {
                let shared = Arc::new(CallbackHub::default());
                let url = callback::serve(shared.clone(), load.callback_listen).await?;
                hub = Some(shared.clone());
                Some((shared, url))
            } else {
                None
            };
            let mut replicas = Vec::with_capacity(load.targets.len());
            for addr in &load.targets {
                replicas.push(Replica::new(addr.as_str(), target::connect(addr, connections, patience).await?));
            }
            Some(Arc::new(Target::booking(load.flow, replicas, callbacks)?))
        } else {
            None
        };
        let direct = if direct {
            let orders = target::connect(&load.upstream.order, connections, patience).await?;
            let payments = target::connect(&load.upstream.payment, connections, patience).await?;
            Some(Arc::new(Target::direct(orders, payments)))
        } else {
            None
        };
        Ok(Self { load: load.clone(), flow, direct, hub, run_id: run_id() })
    }

    /// Runs `rate` for `duration` against `target` and reports it.
    async fn measure(
        &self,
        target: &Arc<Target>,
        rate: Rate,
        duration: Duration,
        keep_points: bool,
    ) -> anyhow::Result<(Report, Vec<stats::Point>)> {
        let load = &self.load;
        let max_in_flight = load.max_in_flight.unwrap_or(if rate == Rate::Max { 64 } else { 10_000 });
        let plan = Plan {
            rate,
            duration,
            max_in_flight,
            fault_rate: load.fault_rate,
            wait: load.wait,
            keep_points,
            id_prefix: format!("bench-{}-{}-{}", self.run_id, target.name(), next_run()),
        };
        let counters = Arc::new(Counters::default());
        let label = format!("{} {rate}", target.name());
        let display = Display::choose(load.quiet, load.progress_interval);
        let watched: Vec<(&str, u32, Option<Duration>)> =
            load.watch_pids.iter().map(|(name, pid)| (name.as_str(), *pid, Process::Pid(*pid).cpu_time())).collect();
        let cpu_before = Process::Myself.cpu_time();
        let unexpected_before = self.hub.as_ref().map_or(0, |hub| hub.unexpected());
        let sent_before = target.sent();
        let started_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;

        let progress = Progress::start(display, label, duration, counters.clone());
        let watch =
            Watch { pids: load.watch_pids.clone(), dirs: load.watch_dirs.clone(), interval: load.sample_interval };
        let sampler = (!watch.is_empty()).then(|| Sampler::start(watch, progress.printer(display)));
        let recorder = load::run(target.clone(), &plan, counters).await;
        let resources = match sampler {
            Some(sampler) => sampler.finish().await,
            None => Resources::default(),
        };
        progress.finish();
        let recorder = recorder?;

        let mut report = recorder.report();
        let cpu_used = |before: Option<Duration>, now: Option<Duration>| match (before, now) {
            (Some(before), Some(now)) => now.saturating_sub(before).as_secs_f64(),
            _ => 0.0,
        };
        report.generator = Usage {
            name: "sagaflow-bench".into(),
            pid: std::process::id(),
            cpu_seconds: cpu_used(cpu_before, Process::Myself.cpu_time()),
            peak_rss_kib: Process::Myself.peak_rss_kib().unwrap_or(0),
        };
        report.watched = watched
            .into_iter()
            .map(|(name, pid, before)| Usage {
                name: name.to_owned(),
                pid,
                cpu_seconds: cpu_used(before, Process::Pid(pid).cpu_time()),
                peak_rss_kib: Process::Pid(pid).peak_rss_kib().unwrap_or(0),
            })
            .collect();
        report.resources = resources;
        report.unexpected_callbacks = self.hub.as_ref().map_or(0, |hub| hub.unexpected()) - unexpected_before;
        report.targets = target
            .sent()
            .into_iter()
            .zip(sent_before)
            .map(|(now, before)| TargetShare {
                addr: now.addr,
                requests: now.requests - before.requests,
                successes: now.successes - before.successes,
            })
            .collect();
        let is_direct = matches!(**target, Target::Direct { .. });
        report.load = Load {
            flow: target.name().into(),
            target: if is_direct {
                format!("order {} + payment {}", load.upstream.order, load.upstream.payment)
            } else {
                load.targets.join(",")
            },
            rate: match rate {
                Rate::PerSecond(rate) => Some(rate),
                Rate::Max => None,
            },
            duration: duration.as_nanos() as u64,
            max_in_flight: plan.max_in_flight,
            fault_rate: load.fault_rate,
            connections: load.connections.max(1),
            threads: load.threads.max(1),
            started_unix_ms,
        };
        let points = recorder.points().to_vec();
        Ok((report, points))
    }
}

impl Setup {
    /// Sends single requests, one after the other, until one succeeds within `bound` (the queues
    /// a failed step left behind have drained); returns how long that took, or `None` after `patience`.
    async fn settle(&self, target: &Arc<Target>, bound: Duration, patience: Duration) -> Option<Duration> {
        let start = tokio::time::Instant::now();
        let deadline = start + patience;
        for i in 0.. {
            let id = format!("bench-{}-{}-settle-{}-{i}", self.run_id, target.name(), next_run());
            let sent = tokio::time::Instant::now();
            let outcome = tokio::time::timeout_at(deadline, target.call(&id, i, false)).await.ok()?;
            if outcome.ok && sent.elapsed() < bound {
                return Some(start.elapsed());
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }
}

/// `PID` or `NAME=PID`.
fn parse_watched(text: &str) -> anyhow::Result<(String, u32)> {
    let (name, pid) = text.split_once('=').unwrap_or(("", text));
    let pid = pid.trim().parse().with_context(|| format!("--watch-pid `{text}`: expected PID or NAME=PID"))?;
    Ok((name.trim().to_owned(), pid))
}

/// `DIR` or `NAME=DIR`.
fn parse_watched_dir(text: &str) -> anyhow::Result<(String, PathBuf)> {
    let (name, dir) = match text.split_once('=') {
        Some((name, dir)) if !name.contains('/') => (name.trim(), dir),
        _ => ("", text),
    };
    if dir.is_empty() {
        bail!("--watch-dir `{text}`: expected DIR or NAME=DIR");
    }
    Ok((name.to_owned(), PathBuf::from(dir)))
}

/// A short random id, so request ids never repeat across runs against the same services.
fn run_id() -> String {
    use std::hash::BuildHasher as _;
    let seed = (std::process::id(), SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    format!("{:08x}", std::collections::hash_map::RandomState::new().hash_one(seed) as u32)
}

/// A counter distinguishing the runs of one process (a --compare, saturation steps).
fn next_run() -> u64 {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// `dir/name.png` → `dir/name-direct.png`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!("{stem}{suffix}{ext}"))
}

fn plot_title(report: &Report) -> String {
    let offered = match report.load.rate {
        Some(rate) => format!("{rate}/s"),
        None => format!("{} in flight", report.load.max_in_flight),
    };
    format!(
        "{} — {offered} for {} — success {:.2}%, throughput {:.1}/s, p99 {}",
        report.load.flow,
        go_duration(report.load.duration),
        report.success * 100.0,
        report.throughput,
        go_duration(report.latencies.p99)
    )
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let load = &args.load;
    let rate = load.rate.unwrap_or(Rate::PerSecond(100.0));
    let duration = load.duration.unwrap_or(Duration::from_secs(10));
    let setup = Setup::connect(load, !load.direct, load.direct || args.compare).await?;
    let keep_points = args.plot.is_some();
    let mut reports = Vec::new();
    if args.compare {
        let direct = setup.direct.as_ref().context("--compare without the upstreams")?;
        let flow = setup.flow.as_ref().context("--compare without the orchestrator")?;
        let (direct_report, direct_points) = setup.measure(direct, rate, duration, keep_points).await?;
        println!("{}", direct_report.text());
        let (mut flow_report, flow_points) = setup.measure(flow, rate, duration, keep_points).await?;
        add_upstream(&args, &mut flow_report).await?;
        println!("{}", flow_report.text());
        let comparison = Comparison::new(direct_report, flow_report);
        print!("{}", comparison.text());
        if let Some(path) = &args.plot {
            plot::draw(&sibling(path, "-direct"), &plot_title(&comparison.direct), &direct_points)?;
            plot::draw(path, &plot_title(&comparison.flow), &flow_points)?;
            draw_resources(path, &comparison.flow)?;
        }
        if let Some(path) = &args.json {
            write_json(path, &comparison)?;
        }
        reports.push(comparison.direct);
        reports.push(comparison.flow);
    } else {
        let target = setup.flow.as_ref().or(setup.direct.as_ref()).context("nothing to call")?;
        let (mut report, points) = setup.measure(target, rate, duration, keep_points).await?;
        add_upstream(&args, &mut report).await?;
        print!("{}", report.text());
        if let Some(path) = &args.plot {
            plot::draw(path, &plot_title(&report), &points)?;
            draw_resources(path, &report)?;
        }
        if let Some(path) = &args.json {
            write_json(path, &report)?;
        }
        reports.push(report);
    }
    let below = args.min_success.is_some_and(|min| reports.iter().any(|r| r.success < min));
    Ok(if below { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// With watched processes or directories, draws their series beside the latency plot at `path`
/// (`FILE.png` → `FILE-resources.png`).
fn draw_resources(path: &Path, report: &Report) -> anyhow::Result<()> {
    if report.resources.is_empty() {
        return Ok(());
    }
    let title = format!("resources — {}", plot_title(report));
    plot::draw_resources(&sibling(path, "-resources"), &title, &report.resources)
}

/// With --upstream-snapshot, adds the upstreams' counters to `report`.
async fn add_upstream(args: &RunArgs, report: &mut Report) -> anyhow::Result<()> {
    if args.upstream_snapshot {
        let upstream = &args.load.upstream;
        report.upstream = Some(target::snapshot(&upstream.order, &upstream.payment, upstream.connect_timeout).await?);
    }
    Ok(())
}

/// One step of a saturation search.
#[derive(Debug, Serialize)]
struct Step {
    rate: f64,
    passed: bool,
    report: Report,
}

/// The whole search, as JSON.
#[derive(Debug, Serialize)]
struct Saturation {
    flow: String,
    target: String,
    /// Step length, ns.
    step: u64,
    /// The p99 bound, ns.
    p99_max: u64,
    /// Highest passing rate, if any.
    best_rate: Option<f64>,
    steps: Vec<Step>,
}

async fn saturate(args: SaturateArgs) -> anyhow::Result<ExitCode> {
    let load = &args.load;
    if load.rate.is_some() {
        bail!("saturate chooses the rates itself: use --start-rate, --min-rate and --max-rate instead of --rate");
    }
    let step_length = load.duration.unwrap_or(Duration::from_secs(20));
    let setup = Setup::connect(load, !load.direct, load.direct).await?;
    let target = setup.flow.as_ref().or(setup.direct.as_ref()).context("nothing to call")?;
    let mut search = RateSearch::new(args.start_rate, args.min_rate, args.max_rate, args.precision);
    let mut steps: Vec<Step> = Vec::new();
    while let Some(rate) = search.next() {
        if !steps.is_empty() {
            tokio::time::sleep(args.cooldown).await;
        }
        let (report, _) = setup.measure(target, Rate::PerSecond(rate), step_length, false).await?;
        let passed = passes(&report, args.p99_max);
        println!(
            "step {}: {} {rate}/s for {}: {} -> {}",
            steps.len() + 1,
            target.name(),
            go_duration(step_length.as_nanos() as u64),
            report.summary(),
            if passed { "pass" } else { "FAIL" }
        );
        search.record(rate, passed);
        steps.push(Step { rate, passed, report });
        if let Some(waited) = setup.settle(target, args.p99_max, args.settle_timeout).await {
            if waited > Duration::from_secs(1) {
                println!(
                    "  (settled: a single request took under {} again after {:.1}s)",
                    go_duration(args.p99_max.as_nanos() as u64),
                    waited.as_secs_f64()
                );
            }
        } else {
            println!(
                "  (not settled after {}: the next step may inherit a backlog)",
                go_duration(args.settle_timeout.as_nanos() as u64)
            );
        }
    }
    let best = search.best();
    match best.and_then(|b| steps.iter().find(|s| s.passed && s.rate == b)) {
        Some(step) => {
            println!(
                "\nsaturation: {} sustains {}/s for {} with 100% success and p99 {} (< {}):\n",
                target.name(),
                step.rate,
                go_duration(step_length.as_nanos() as u64),
                go_duration(step.report.latencies.p99),
                go_duration(args.p99_max.as_nanos() as u64)
            );
            print!("{}", step.report.text());
        }
        None => println!("\nsaturation: {} passed at no rate down to {}/s", target.name(), args.min_rate),
    }
    if let Some(path) = &args.json {
        let saturation = Saturation {
            flow: target.name().into(),
            target: load.targets.join(","),
            step: step_length.as_nanos() as u64,
            p99_max: args.p99_max.as_nanos() as u64,
            best_rate: best,
            steps,
        };
        write_json(path, &saturation)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn snapshot(args: UpstreamArgs) -> anyhow::Result<ExitCode> {
    let upstreams = target::snapshot(&args.order, &args.payment, args.connect_timeout).await?;
    println!("{}", serde_json::to_string_pretty(&upstreams)?);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse_with_and_without_a_subcommand() {
        let cli = Cli::try_parse_from([
            "sagaflow-bench",
            "--flow",
            "throttling",
            "--rate",
            "500",
            "--duration",
            "30s",
            "--fault-rate",
            "0.1",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.load.flow, Flow::Throttling);
        assert_eq!(cli.run.load.rate, Some(Rate::PerSecond(500.0)));
        assert_eq!(cli.run.load.duration, Some(Duration::from_secs(30)));
        let cli = Cli::try_parse_from(["sagaflow-bench", "saturate", "--flow", "async", "--p99-max", "50ms"]).unwrap();
        let Some(Command::Saturate(args)) = cli.command else { panic!("not saturate") };
        assert_eq!(args.p99_max, Duration::from_millis(50));
        assert!(Cli::try_parse_from(["sagaflow-bench", "--direct", "--compare"]).is_err());
    }

    #[test]
    fn several_targets_are_given_repeated_or_as_a_comma_list() {
        let cli = Cli::try_parse_from(["sagaflow-bench"]).unwrap();
        assert_eq!(cli.run.load.targets, ["127.0.0.1:10000"]);
        let cli =
            Cli::try_parse_from(["sagaflow-bench", "--target", "127.0.0.1:1,127.0.0.1:2", "--target", "127.0.0.1:3"])
                .unwrap();
        assert_eq!(cli.run.load.targets, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
    }

    #[test]
    fn watched_processes_may_be_named() {
        assert_eq!(parse_watched("4242").unwrap(), (String::new(), 4242));
        assert_eq!(parse_watched("orchestrator=17").unwrap(), ("orchestrator".to_string(), 17));
        assert!(parse_watched("orchestrator").is_err());
    }

    #[test]
    fn watched_dirs_may_be_named() {
        assert_eq!(parse_watched_dir("/tmp/data").unwrap(), (String::new(), PathBuf::from("/tmp/data")));
        assert_eq!(parse_watched_dir("data=/var/d").unwrap(), ("data".to_owned(), PathBuf::from("/var/d")));
        assert_eq!(parse_watched_dir("./a=b").unwrap(), (String::new(), PathBuf::from("./a=b")));
        assert!(parse_watched_dir("data=").is_err());
        let cli = Cli::try_parse_from(["sagaflow-bench", "--watch-dir", "data=/d", "--sample-interval", "2s"]).unwrap();
        assert_eq!(cli.run.load.sample_interval, Duration::from_secs(2));
        assert_eq!(Cli::try_parse_from(["sagaflow-bench"]).unwrap().run.load.sample_interval, Duration::from_secs(10));
    }

    #[test]
    fn the_direct_plot_of_a_comparison_sits_beside_the_flows() {
        assert_eq!(sibling(Path::new("out/sync.png"), "-direct"), PathBuf::from("out/sync-direct.png"));
        assert_eq!(sibling(Path::new("plot"), "-direct"), PathBuf::from("plot-direct"));
    }
}
