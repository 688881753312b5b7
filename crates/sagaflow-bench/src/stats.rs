//! Collects the results of a run: an HDR histogram of latencies, counts by status, the error set,
//! and (for plots) every request's time and latency.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::report::{ErrorCount, Latencies, Report};

/// Highest latency the histogram resolves, in µs (one hour); longer ones are recorded as this.
const HIGHEST_US: u64 = 3_600_000_000;
/// Distinct errors kept in the error set; the rest are counted together.
const MAX_ERRORS: usize = 50;

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Its status: a gRPC code name (`OK`, `ABORTED`, …), a callback status (`completed`, …),
    /// `TIMEOUT` or `UNSENT`.
    pub(crate) code: Cow<'static, str>,
    /// Whether it is the answer the request asked for (a rolled-back booking is, when it carried `FaultInject`).
    pub(crate) ok: bool,
    /// What went wrong, when it is not ok.
    pub(crate) error: Option<String>,
}

impl Outcome {
    /// The expected answer.
    pub(crate) fn success(code: impl Into<Cow<'static, str>>) -> Self {
        Self { code: code.into(), ok: true, error: None }
    }

    /// An unexpected answer, and why.
    pub(crate) fn failure(code: impl Into<Cow<'static, str>>, error: impl Into<String>) -> Self {
        Self { code: code.into(), ok: false, error: Some(error.into()) }
    }
}

/// One finished request, its times as offsets from the start of the run.
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    /// When it was due.
    pub(crate) intended: Duration,
    /// When it was actually sent.
    pub(crate) sent: Duration,
    /// When its outcome arrived.
    pub(crate) done: Duration,
    /// Its outcome.
    pub(crate) outcome: Outcome,
}

/// One point of the latency plot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Point {
    /// When the request was due (open loop) or sent (closed loop), in s from the start.
    pub(crate) at: f64,
    /// Its latency, in ms.
    pub(crate) latency_ms: f64,
    /// When it ended, in s from the start.
    pub(crate) done: f64,
    /// Whether it succeeded.
    pub(crate) ok: bool,
}

/// Accumulates finished requests into the figures of a [`Report`].
#[derive(Debug)]
pub(crate) struct Recorder {
    /// Latency is measured from the intended time (open loop) or from the send (closed loop).
    from_intended: bool,
    histogram: Histogram<u64>,
    sum_us: u128,
    min: Option<Duration>,
    max: Duration,
    requests: u64,
    successes: u64,
    unsent: u64,
    codes: BTreeMap<String, u64>,
    errors: HashMap<String, u64>,
    other_errors: u64,
    earliest: Option<Duration>,
    latest: Duration,
    end: Duration,
    max_lag: Duration,
    points: Option<Vec<Point>>,
}

impl Recorder {
    /// An empty recorder; `keep_points` keeps every request for a plot.
    pub(crate) fn new(from_intended: bool, keep_points: bool) -> Self {
        Self {
            from_intended,
            // Constant bounds that satisfy the crate's rules (1 ≤ low, 2 × low ≤ high, sigfig ≤ 5).
            histogram: Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("constant histogram bounds are valid"),
            sum_us: 0,
            min: None,
            max: Duration::ZERO,
            requests: 0,
            successes: 0,
            unsent: 0,
            codes: BTreeMap::new(),
            errors: HashMap::new(),
            other_errors: 0,
            earliest: None,
            latest: Duration::ZERO,
            end: Duration::ZERO,
            max_lag: Duration::ZERO,
            points: keep_points.then(Vec::new),
        }
    }

    /// Adds a request that was sent and ended (answered, failed or timed out).
    pub(crate) fn record(&mut self, finished: Finished) {
        let start = if self.from_intended { finished.intended } else { finished.sent };
        let latency = finished.done.saturating_sub(start);
        let us = latency.as_micros().min(u128::from(HIGHEST_US)) as u64;
        self.histogram.saturating_record(us.max(1));
        self.sum_us += latency.as_micros();
        self.min = Some(self.min.map_or(latency, |m| m.min(latency)));
        self.max = self.max.max(latency);
        self.earliest = Some(self.earliest.map_or(finished.sent, |e| e.min(finished.sent)));
        self.latest = self.latest.max(finished.sent);
        self.end = self.end.max(finished.done);
        self.max_lag = self.max_lag.max(finished.sent.saturating_sub(finished.intended));
        if let Some(points) = &mut self.points {
            points.push(Point {
                at: start.as_secs_f64(),
                latency_ms: latency.as_secs_f64() * 1e3,
                done: finished.done.as_secs_f64(),
                ok: finished.outcome.ok,
            });
        }
        self.count(finished.outcome);
    }

    /// Adds a request that was due but not sent because `--max-in-flight` requests were outstanding.
    pub(crate) fn record_unsent(&mut self, max_in_flight: usize) {
        self.unsent += 1;
        self.count(Outcome::failure("UNSENT", format!("not sent: {max_in_flight} requests were in flight")));
    }

    fn count(&mut self, outcome: Outcome) {
        self.requests += 1;
        if outcome.ok {
            self.successes += 1;
        }
        *self.codes.entry(outcome.code.into_owned()).or_default() += 1;
        if let Some(error) = outcome.error {
            let error = normalize_error(&error);
            if let Some(count) = self.errors.get_mut(&error) {
                *count += 1;
            } else if self.errors.len() < MAX_ERRORS {
                self.errors.insert(error, 1);
            } else {
                self.other_errors += 1;
            }
        }
    }

    /// The plot's points, if kept.
    pub(crate) fn points(&self) -> &[Point] {
        self.points.as_deref().unwrap_or(&[])
    }

    /// The figures of the run, in the shape of vegeta's report (other fields are left at their defaults).
    pub(crate) fn report(&self) -> Report {
        let earliest = self.earliest.unwrap_or_default();
        let attack = self.latest.saturating_sub(earliest);
        let wait = self.end.saturating_sub(self.latest);
        let sent = self.requests - self.unsent;
        let attack_s = attack.as_secs_f64();
        let (rate, throughput) = if attack_s > 0.0 {
            (self.requests as f64 / attack_s, self.successes as f64 / (attack + wait).as_secs_f64())
        } else {
            (0.0, 0.0)
        };
        let quantile = |q: f64| {
            if sent == 0 { 0 } else { Duration::from_micros(self.histogram.value_at_quantile(q)).as_nanos() as u64 }
        };
        let mut errors: Vec<ErrorCount> =
            self.errors.iter().map(|(error, &count)| ErrorCount { error: error.clone(), count }).collect();
        errors.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.error.cmp(&b.error)));
        if self.other_errors > 0 {
            errors.push(ErrorCount { error: "(other errors)".into(), count: self.other_errors });
        }
        Report {
            latencies: Latencies {
                total: (self.sum_us * 1000).min(u128::from(u64::MAX)) as u64,
                mean: if sent == 0 { 0 } else { (self.sum_us * 1000 / u128::from(sent)) as u64 },
                p50: quantile(0.50),
                p90: quantile(0.90),
                p95: quantile(0.95),
                p99: quantile(0.99),
                max: self.max.as_nanos() as u64,
                min: self.min.unwrap_or_default().as_nanos() as u64,
            },
            duration: attack.as_nanos() as u64,
            wait: wait.as_nanos() as u64,
            requests: self.requests,
            rate,
            throughput,
            success: if self.requests == 0 { 0.0 } else { self.successes as f64 / self.requests as f64 },
            status_codes: self.codes.clone(),
            errors: errors.iter().map(|e| e.error.clone()).collect(),
            error_counts: errors,
            unsent: self.unsent,
            max_send_lag: self.max_lag.as_nanos() as u64,
            ..Report::default()
        }
    }
}

/// Groups errors that differ only by numbers (ids, counts): runs of digits become `N`.
pub(crate) fn normalize_error(error: &str) -> String {
    let mut out = String::with_capacity(error.len());
    let mut in_number = false;
    for c in error.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn finished(intended: u64, sent: u64, done: u64, outcome: Outcome) -> Finished {
        Finished { intended: ms(intended), sent: ms(sent), done: ms(done), outcome }
    }

    #[test]
    fn percentiles_come_from_the_histogram_and_min_mean_max_are_exact() {
        let mut recorder = Recorder::new(true, false);
        // Latencies 1..=100 ms, sent on a 10 ms schedule.
        for i in 0..100 {
            recorder.record(finished(i * 10, i * 10, i * 10 + i + 1, Outcome::success("OK")));
        }
        let report = recorder.report();
        let l = &report.latencies;
        assert_eq!(l.min, 1_000_000);
        assert_eq!(l.max, 100_000_000);
        assert_eq!(l.mean, 50_500_000);
        // Three significant figures: within 0.1 % of the true value.
        let close = |got: u64, want_ms: u64| (got as f64 - want_ms as f64 * 1e6).abs() <= want_ms as f64 * 1e3;
        assert!(close(l.p50, 50), "{}", l.p50);
        assert!(close(l.p90, 90), "{}", l.p90);
        assert!(close(l.p95, 95), "{}", l.p95);
        assert!(close(l.p99, 99), "{}", l.p99);
        assert_eq!(report.requests, 100);
        assert_eq!(report.success, 1.0);
    }

    #[test]
    fn latency_runs_from_the_intended_time_in_open_loop_and_from_the_send_in_closed_loop() {
        // Sent 40 ms late (the generator or a full pipe held it back), answered 10 ms after the send.
        let late = finished(100, 140, 150, Outcome::success("OK"));
        let mut open = Recorder::new(true, true);
        open.record(late.clone());
        assert_eq!(open.report().latencies.max, 50_000_000);
        assert_eq!(open.report().max_send_lag, 40_000_000);
        assert_eq!(open.points()[0].at, 0.1);
        let mut closed = Recorder::new(false, false);
        closed.record(late);
        assert_eq!(closed.report().latencies.max, 10_000_000);
        assert!(closed.points().is_empty());
    }

    #[test]
    fn durations_rate_and_throughput_follow_vegeta() {
        let mut recorder = Recorder::new(true, false);
        // 4 requests sent over 3 s, the last answered 1 s after it was sent; one fails.
        recorder.record(finished(0, 0, 100, Outcome::success("OK")));
        recorder.record(finished(1000, 1000, 1100, Outcome::success("OK")));
        recorder.record(finished(2000, 2000, 2100, Outcome::failure("UNAVAILABLE", "UNAVAILABLE: down")));
        recorder.record(finished(3000, 3000, 4000, Outcome::success("OK")));
        let report = recorder.report();
        assert_eq!(report.duration, 3_000_000_000);
        assert_eq!(report.wait, 1_000_000_000);
        assert!((report.rate - 4.0 / 3.0).abs() < 1e-9);
        assert!((report.throughput - 3.0 / 4.0).abs() < 1e-9);
        assert_eq!(report.success, 0.75);
        assert_eq!(report.status_codes, BTreeMap::from([("OK".into(), 3), ("UNAVAILABLE".into(), 1)]));
        assert_eq!(report.errors, vec!["UNAVAILABLE: down".to_string()]);
    }

    #[test]
    fn unsent_requests_count_as_failures_without_a_latency() {
        let mut recorder = Recorder::new(true, false);
        recorder.record(finished(0, 0, 5, Outcome::success("OK")));
        recorder.record_unsent(1);
        let report = recorder.report();
        assert_eq!(report.requests, 2);
        assert_eq!(report.unsent, 1);
        assert_eq!(report.success, 0.5);
        assert_eq!(report.latencies.max, 5_000_000);
        assert_eq!(report.latencies.mean, 5_000_000);
        assert_eq!(report.status_codes["UNSENT"], 1);
    }

    #[test]
    fn errors_group_by_text_with_numbers_masked_most_frequent_first() {
        let mut recorder = Recorder::new(true, false);
        for i in 0..3 {
            let error = format!("RESOURCE_EXHAUSTED: order service over capacity ({} in flight)", 10 + i);
            recorder.record(finished(i, i, i + 1, Outcome::failure("RESOURCE_EXHAUSTED", error)));
        }
        recorder.record(finished(9, 9, 10, Outcome::failure("TIMEOUT", "no outcome within 30s")));
        let report = recorder.report();
        assert_eq!(report.error_counts.len(), 2);
        assert_eq!(report.error_counts[0].error, "RESOURCE_EXHAUSTED: order service over capacity (N in flight)");
        assert_eq!(report.error_counts[0].count, 3);
        assert_eq!(report.error_counts[1].error, "no outcome within Ns");
    }

    #[test]
    fn an_empty_run_reports_zeroes_not_nans() {
        let report = Recorder::new(true, false).report();
        assert_eq!(report.requests, 0);
        assert_eq!(report.rate, 0.0);
        assert_eq!(report.success, 0.0);
        assert_eq!(report.latencies.p99, 0);
    }
}
