//! Drives the load: open loop on a fixed schedule, or closed loop with a fixed number of callers.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::report::go_duration;
use crate::schedule::{Rate, Schedule, faulted};
use crate::stats::{Finished, Outcome, Recorder};
use crate::target::Target;

/// Most requests outstanding at once that a run accepts.
pub(crate) const MAX_IN_FLIGHT_LIMIT: usize = 1_000_000;

/// Makes one request.
pub(crate) trait Caller: Send + Sync + 'static {
    /// Makes request number `i`, identified by `request_id`, carrying `FaultInject` when `fault`.
    fn call(&self, request_id: &str, i: u64, fault: bool) -> impl Future<Output = Outcome> + Send;
}

impl Caller for Target {
    fn call(&self, request_id: &str, i: u64, fault: bool) -> impl Future<Output = Outcome> + Send {
        Target::call(self, request_id, i, fault)
    }
}

/// What load to offer.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Requests/s, or a closed loop.
    pub(crate) rate: Rate,
    /// How long to send.
    pub(crate) duration: Duration,
    /// Most requests outstanding (closed loop: the number of callers).
    pub(crate) max_in_flight: usize,
    /// Share of requests with `FaultInject`.
    pub(crate) fault_rate: f64,
    /// Longest a request may take before it counts as a `TIMEOUT` failure.
    pub(crate) wait: Duration,
    /// Keep every request's times for a plot.
    pub(crate) keep_points: bool,
    /// Request ids are `<prefix>-<n>`: unique per run.
    pub(crate) id_prefix: String,
}

/// Live counts, read by the progress display.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Requests sent.
    pub(crate) sent: AtomicU64,
    /// Requests ended (any outcome).
    pub(crate) done: AtomicU64,
    /// Requests ended successfully.
    pub(crate) ok: AtomicU64,
    /// Requests due but not sent (too many in flight).
    pub(crate) unsent: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `(sent, done, ok, unsent)` now.
    pub(crate) fn read(&self) -> (u64, u64, u64, u64) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (load(&self.sent), load(&self.done), load(&self.ok), load(&self.unsent))
    }
}

type Shared = Arc<Mutex<Recorder>>;

fn lock(recorder: &Shared) -> std::sync::MutexGuard<'_, Recorder> {
    // Each critical section is one `record`, which leaves the recorder consistent.
    recorder.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `plan` against `caller`; returns when every request sent has ended or timed out.
pub(crate) async fn run<C: Caller>(caller: Arc<C>, plan: &Plan, counters: Arc<Counters>) -> anyhow::Result<Recorder> {
    let max_in_flight = plan.max_in_flight.clamp(1, MAX_IN_FLIGHT_LIMIT);
    match plan.rate {
        Rate::PerSecond(rate) => {
            let schedule = Schedule::new(rate, plan.duration)?;
            Ok(open_loop(caller, plan, schedule, max_in_flight, counters).await)
        }
        Rate::Max => Ok(closed_loop(caller, plan, max_in_flight, counters).await),
    }
}

/// One request to make.
#[derive(Debug)]
struct Request {
    id: String,
    i: u64,
    fault: bool,
    /// When it was due, from the start.
    intended: Duration,
    /// When it was sent, from the start.
    sent: Duration,
}

/// Makes `request`, bounded by `wait`, and returns it with its times.
async fn one<C: Caller>(caller: &C, wait: Duration, start: Instant, request: Request) -> Finished {
    let outcome = match tokio::time::timeout(wait, caller.call(&request.id, request.i, request.fault)).await {
        // Errors quoting the request id group together in the error set.
        Ok(Outcome { code, ok, error }) => Outcome { code, ok, error: error.map(|e| e.replace(&request.id, "<id>")) },
        Err(_) => {
            Outcome::failure("TIMEOUT", format!("no outcome within --wait {}", go_duration(wait.as_nanos() as u64)))
        }
    };
    Finished { intended: request.intended, sent: request.sent, done: start.elapsed(), outcome }
}

/// Sends request `i` at `start + schedule.offset(i)` whatever happened to the earlier ones; latency
/// runs from that intended time. A request due while `max_in_flight` are outstanding is not sent and
/// counts as a failure.
async fn open_loop<C: Caller>(
    caller: Arc<C>,
    plan: &Plan,
    schedule: Schedule,
    max_in_flight: usize,
    counters: Arc<Counters>,
) -> Recorder {
    let recorder: Shared = Arc::new(Mutex::new(Recorder::new(true, plan.keep_points)));
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let start = Instant::now();
    for i in 0..schedule.count() {
        let intended = schedule.offset(i);
        let due = start + intended;
        if Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            lock(&recorder).record_unsent(max_in_flight);
            Counters::bump(&counters.unsent);
            continue;
        };
        Counters::bump(&counters.sent);
        let sent = start.elapsed();
        let (caller, recorder, counters) = (caller.clone(), recorder.clone(), counters.clone());
        let request =
            Request { id: format!("{}-{i}", plan.id_prefix), i, fault: faulted(i, plan.fault_rate), intended, sent };
        let wait = plan.wait;
        tokio::spawn(async move {
            let finished = one(&*caller, wait, start, request).await;
            if finished.outcome.ok {
                Counters::bump(&counters.ok);
            }
            lock(&recorder).record(finished);
            Counters::bump(&counters.done);
            drop(permit);
        });
    }
    // Every request holds a permit until it is recorded: all of them back means all recorded.
    let _all = permits.acquire_many(max_in_flight as u32).await;
    std::mem::replace(&mut *lock(&recorder), Recorder::new(true, false))
}

/// `callers` callers, each sending its next request when its last one ends, until `plan.duration`
/// has passed; latency runs from each send.
async fn closed_loop<C: Caller>(caller: Arc<C>, plan: &Plan, callers: usize, counters: Arc<Counters>) -> Recorder {
    let recorder: Shared = Arc::new(Mutex::new(Recorder::new(false, plan.keep_points)));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + plan.duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (caller, recorder, counters, next) = (caller.clone(), recorder.clone(), counters.clone(), next.clone());
        let (wait, prefix, fault_rate) = (plan.wait, plan.id_prefix.clone(), plan.fault_rate);
        workers.spawn(async move {
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                Counters::bump(&counters.sent);
                let sent = start.elapsed();
                let request =
                    Request { id: format!("{prefix}-{i}"), i, fault: faulted(i, fault_rate), intended: sent, sent };
                let finished = one(&*caller, wait, start, request).await;
                if finished.outcome.ok {
                    Counters::bump(&counters.ok);
                }
                lock(&recorder).record(finished);
                Counters::bump(&counters.done);
            }
        });
    }
    while workers.join_next().await.is_some() {}
    std::mem::replace(&mut *lock(&recorder), Recorder::new(false, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers OK after `latency`, except that nothing is answered before `stall_until` from the
    /// test's start (a server stalled at first).
    struct Fake {
        start: Instant,
        latency: Duration,
        stall_until: Duration,
    }

    impl Caller for Fake {
        async fn call(&self, id: &str, _i: u64, fault: bool) -> Outcome {
            let answer_at = (Instant::now() + self.latency).max(self.start + self.stall_until);
            tokio::time::sleep_until(answer_at).await;
            if fault {
                Outcome::failure("ABORTED", format!("booking {id} was rolled back"))
            } else {
                Outcome::success("OK")
            }
        }
    }

    fn plan(rate: Rate, duration_ms: u64, max_in_flight: usize) -> Plan {
        Plan {
            rate,
            duration: Duration::from_millis(duration_ms),
            max_in_flight,
            fault_rate: 0.0,
            wait: Duration::from_secs(10),
            keep_points: true,
            id_prefix: "t".into(),
        }
    }

    fn ms(ns: u64) -> u64 {
        ns / 1_000_000
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_latency_includes_the_backlog_of_a_stalled_server() {
        let fake = Arc::new(Fake {
            start: Instant::now(),
            latency: Duration::from_millis(1),
            stall_until: Duration::from_millis(501),
        });
        let counters = Arc::new(Counters::default());
        let recorder = run(fake.clone(), &plan(Rate::PerSecond(100.0), 1000, 1000), counters.clone()).await.unwrap();
        let report = recorder.report();
        assert_eq!(report.requests, 100);
        assert_eq!(report.success, 1.0);
        // The request due at 0 waited out the whole stall; nothing was sent late.
        assert_eq!(ms(report.latencies.max), 501);
        assert_eq!(report.max_send_lag, 0);
        // Half the requests were due during the stall: the 90th percentile carries it.
        assert!(ms(report.latencies.p90) >= 300, "{:?}", report.latencies);
        assert_eq!(ms(report.duration), 990);
        assert_eq!(counters.read(), (100, 100, 100, 0));

        // A closed loop with one caller hides the same stall behind a single slow request.
        let fake = Arc::new(Fake {
            start: Instant::now(),
            latency: Duration::from_millis(1),
            stall_until: Duration::from_millis(501),
        });
        let closed = run(fake, &plan(Rate::Max, 1000, 1), Arc::default()).await.unwrap().report();
        assert_eq!(ms(closed.latencies.max), 501);
        assert_eq!(ms(closed.latencies.p50), 1);
        assert!(closed.requests > 400, "{}", closed.requests);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_due_while_max_in_flight_are_outstanding_are_counted_unsent() {
        let fake =
            Arc::new(Fake { start: Instant::now(), latency: Duration::from_millis(95), stall_until: Duration::ZERO });
        let counters = Arc::new(Counters::default());
        // 100/s with answers in 95 ms needs 10 in flight; 5 are allowed, so every other half-window is unsent.
        let report = run(fake, &plan(Rate::PerSecond(100.0), 1000, 5), counters.clone()).await.unwrap().report();
        assert_eq!(report.requests, 100);
        assert_eq!(report.unsent, 50);
        assert_eq!(report.status_codes["UNSENT"], 50);
        assert_eq!(report.success, 0.5);
        assert_eq!(ms(report.latencies.max), 95);
        assert_eq!(counters.read(), (50, 50, 50, 50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_longer_than_wait_times_out_and_faults_are_injected_by_share() {
        let fake = Arc::new(Fake {
            start: Instant::now(),
            latency: Duration::from_millis(1),
            stall_until: Duration::from_secs(60),
        });
        let mut slow = plan(Rate::PerSecond(10.0), 1000, 100);
        slow.wait = Duration::from_secs(2);
        let report = run(fake, &slow, Arc::default()).await.unwrap().report();
        assert_eq!(report.status_codes["TIMEOUT"], 10);
        assert_eq!(ms(report.latencies.max), 2000);
        assert_eq!(report.errors, vec!["no outcome within --wait Ns".to_string()]);

        let fake =
            Arc::new(Fake { start: Instant::now(), latency: Duration::from_millis(1), stall_until: Duration::ZERO });
        let mut faulty = plan(Rate::PerSecond(100.0), 1000, 100);
        faulty.fault_rate = 0.1;
        let report = run(fake, &faulty, Arc::default()).await.unwrap().report();
        assert_eq!(report.status_codes["ABORTED"], 10);
        assert_eq!(report.status_codes["OK"], 90);
        // Ten errors quoting ten request ids are one entry of the error set.
        assert_eq!(report.errors, vec!["booking <id> was rolled back".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_loop_keeps_its_callers_busy_for_the_duration() {
        let fake =
            Arc::new(Fake { start: Instant::now(), latency: Duration::from_millis(10), stall_until: Duration::ZERO });
        let report = run(fake, &plan(Rate::Max, 1000, 4), Arc::default()).await.unwrap().report();
        // 4 callers × 100 requests of 10 ms each.
        assert_eq!(report.requests, 400);
        assert_eq!(ms(report.latencies.min), 10);
        assert_eq!(ms(report.latencies.max), 10);
        assert!((report.throughput - 400.0).abs() < 1.0, "{}", report.throughput);
    }
}
