//! The saturation search: the highest rate a flow sustains with every request successful and a
//! bounded p99.

use std::time::Duration;

use crate::report::Report;

/// Whether a step passed: 100 % success (unsent requests count as failures) and p99 under `p99_max`.
pub(crate) fn passes(report: &Report, p99_max: Duration) -> bool {
    report.requests > 0 && report.success >= 1.0 && u128::from(report.latencies.p99) < p99_max.as_nanos()
}

/// Chooses the rate of each step: doubles from `start` while steps pass (up to `max`), halves while
/// they fail (down to `min`), then bisects between the best pass and the lowest failure until the
/// two are within `precision` (a share: 0.1 = 10 %) of each other.
#[derive(Debug, Clone)]
pub(crate) struct RateSearch {
    start: f64,
    min: f64,
    max: f64,
    precision: f64,
    best_pass: Option<f64>,
    lowest_fail: Option<f64>,
}

impl RateSearch {
    /// A search starting at `start` requests/s, within `min..=max`.
    pub(crate) fn new(start: f64, min: f64, max: f64, precision: f64) -> Self {
        let max = max.max(min);
        Self {
            start: start.clamp(min, max),
            min,
            max,
            precision: precision.max(0.001),
            best_pass: None,
            lowest_fail: None,
        }
    }

    /// The rate of the next step, or `None` when the search is over.
    pub(crate) fn next(&self) -> Option<f64> {
        match (self.best_pass, self.lowest_fail) {
            (None, None) => Some(self.start),
            (Some(pass), None) => (pass < self.max).then(|| (pass * 2.0).min(self.max).round()),
            (None, Some(fail)) => {
                let rate = (fail / 2.0).round();
                (rate >= self.min && rate < fail).then_some(rate)
            }
            (Some(pass), Some(fail)) => {
                if fail <= pass * (1.0 + self.precision) {
                    return None;
                }
                let mid = ((pass + fail) / 2.0).round();
                (mid > pass && mid < fail).then_some(mid)
            }
        }
    }

    /// Records how the step at `rate` went.
    pub(crate) fn record(&mut self, rate: f64, passed: bool) {
        if passed {
            self.best_pass = Some(self.best_pass.map_or(rate, |p| p.max(rate)));
        } else {
            self.lowest_fail = Some(self.lowest_fail.map_or(rate, |f| f.min(rate)));
        }
    }

    /// The highest rate that passed.
    pub(crate) fn best(&self) -> Option<f64> {
        self.best_pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Latencies;

    /// Runs the search against a system that passes every rate up to `capacity`; returns the rates tried.
    fn run(mut search: RateSearch, capacity: f64) -> (Vec<f64>, Option<f64>) {
        let mut tried = Vec::new();
        while let Some(rate) = search.next() {
            assert!(tried.len() < 40, "the search does not end: {tried:?}");
            tried.push(rate);
            search.record(rate, rate <= capacity);
        }
        (tried, search.best())
    }

    #[test]
    fn doubles_then_bisects_to_within_the_precision() {
        let (tried, best) = run(RateSearch::new(250.0, 10.0, 100_000.0, 0.1), 5_300.0);
        assert_eq!(tried, [250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 6000.0, 5000.0, 5500.0]);
        assert_eq!(best, Some(5000.0));
    }

    #[test]
    fn halves_when_the_first_step_fails() {
        let (tried, best) = run(RateSearch::new(1000.0, 10.0, 100_000.0, 0.1), 300.0);
        assert_eq!(tried[..3], [1000.0, 500.0, 250.0]);
        let best = best.unwrap();
        assert!(best <= 300.0 && best * 1.1 >= 300.0 * 0.9, "{best} {tried:?}");
    }

    #[test]
    fn stops_at_the_maximum_and_gives_up_below_the_minimum() {
        let (tried, best) = run(RateSearch::new(250.0, 10.0, 1500.0, 0.1), f64::INFINITY);
        assert_eq!(tried, [250.0, 500.0, 1000.0, 1500.0]);
        assert_eq!(best, Some(1500.0));
        let (tried, best) = run(RateSearch::new(100.0, 20.0, 1000.0, 0.1), 1.0);
        assert_eq!(tried, [100.0, 50.0, 25.0]);
        assert_eq!(best, None);
    }

    #[test]
    fn the_answer_is_within_the_precision_of_the_capacity_whatever_it_is() {
        for capacity in [37.0, 120.0, 999.0, 2500.0, 7777.0, 30_000.0] {
            let (_, best) = run(RateSearch::new(250.0, 10.0, 100_000.0, 0.1), capacity);
            let best = best.unwrap();
            assert!(best <= capacity && best >= capacity / 1.1 - 1.0, "capacity {capacity}: {best}");
        }
    }

    #[test]
    fn a_step_passes_only_with_full_success_and_p99_under_the_bound() {
        let report = |success: f64, p99_ms: u64| Report {
            requests: 100,
            success,
            latencies: Latencies { p99: p99_ms * 1_000_000, ..Latencies::default() },
            ..Report::default()
        };
        let bound = Duration::from_millis(100);
        assert!(passes(&report(1.0, 99), bound));
        assert!(!passes(&report(1.0, 100), bound));
        assert!(!passes(&report(0.999, 5), bound));
        assert!(!passes(&Report::default(), bound));
    }
}
