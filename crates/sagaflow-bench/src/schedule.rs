//! When each request is due, which requests carry `FaultInject`, and the textual forms of rates and durations.

use std::time::Duration;

use anyhow::{Context as _, bail};

/// The offered load: a fixed rate (open loop) or as fast as a fixed number of callers go (closed loop).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Rate {
    /// This many requests per second, each sent at its intended time whatever the answers do.
    PerSecond(f64),
    /// `--max-in-flight` callers, each sending its next request as soon as the last one ends.
    Max,
}

impl std::str::FromStr for Rate {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("max") {
            return Ok(Self::Max);
        }
        let number = text.strip_suffix("/s").unwrap_or(text);
        let rate: f64 = number.parse().with_context(|| format!("rate `{text}`: expected requests/s or `max`"))?;
        if !rate.is_finite() || rate <= 0.0 {
            bail!("rate `{text}` must be a positive number of requests/s");
        }
        Ok(Self::PerSecond(rate))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PerSecond(rate) => write!(f, "{rate}/s"),
            Self::Max => f.write_str("max"),
        }
    }
}

/// Open-loop send times: request `i` is due `i / rate` seconds after the start, for `duration`.
///
/// Fixed in advance, so a slow answer never delays the next request: latency is
/// measured from these intended times and a stalled server cannot hide its
/// backlog (no coordinated omission).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Schedule {
    rate: f64,
    count: u64,
}

impl Schedule {
    /// The schedule of `rate` requests/s for `duration`: `floor(rate × duration)` requests, at least one.
    pub(crate) fn new(rate: f64, duration: Duration) -> anyhow::Result<Self> {
        if !rate.is_finite() || rate <= 0.0 {
            bail!("rate must be positive, got {rate}");
        }
        // The epsilon keeps 0.1/s × 30 s at 3 requests despite binary fractions.
        let count = (rate * duration.as_secs_f64() + 1e-9).floor().max(1.0) as u64;
        Ok(Self { rate, count })
    }

    /// How many requests the schedule holds.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// When request `i` is due, from the start.
    pub(crate) fn offset(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate)
    }
}

/// Whether request `i` carries `FaultInject` when a share `share` of all requests must: spread evenly,
/// so any prefix of `n` requests holds `floor(n × share)` of them.
pub(crate) fn faulted(i: u64, share: f64) -> bool {
    ((i + 1) as f64 * share + 1e-9).floor() > (i as f64 * share + 1e-9).floor()
}

/// Parses `30s`, `500ms`, `2m`, `1.5s`, `100us` or `1h`.
pub(crate) fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().with_context(|| format!("duration `{text}`: expected e.g. 30s, 500ms, 2m"))?;
    let seconds = match unit.trim() {
        "ns" => value / 1e9,
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "" => bail!("duration `{text}` needs a unit (ms, s, m, h)"),
        other => bail!("duration `{text}`: unknown unit `{other}`"),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        bail!("duration `{text}` is out of range");
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_spreads_requests_evenly_over_the_duration() {
        let schedule = Schedule::new(500.0, Duration::from_secs(30)).unwrap();
        assert_eq!(schedule.count(), 15_000);
        assert_eq!(schedule.offset(0), Duration::ZERO);
        assert_eq!(schedule.offset(1), Duration::from_millis(2));
        assert_eq!(schedule.offset(500), Duration::from_secs(1));
        assert_eq!(schedule.offset(14_999), Duration::from_millis(29_998));
        // Offsets never go backwards.
        assert!((1..schedule.count()).all(|i| schedule.offset(i) > schedule.offset(i - 1)));
    }

    #[test]
    fn fractional_rates_and_short_runs_round_down_but_keep_one_request() {
        assert_eq!(Schedule::new(0.1, Duration::from_secs(30)).unwrap().count(), 3);
        assert_eq!(Schedule::new(3.0, Duration::from_millis(500)).unwrap().count(), 1);
        assert_eq!(Schedule::new(1.0, Duration::from_millis(100)).unwrap().count(), 1);
        assert_eq!(Schedule::new(333.3, Duration::from_secs(3)).unwrap().count(), 999);
        assert!(Schedule::new(0.0, Duration::from_secs(1)).is_err());
        assert!(Schedule::new(f64::NAN, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn faults_are_spread_evenly_with_the_exact_share() {
        let count = |share: f64, n: u64| (0..n).filter(|&i| faulted(i, share)).count();
        assert_eq!(count(0.0, 1000), 0);
        assert_eq!(count(1.0, 1000), 1000);
        assert_eq!(count(0.1, 1000), 100);
        assert_eq!(count(0.25, 8), 2);
        assert_eq!(count(0.01, 99), 0);
        assert_eq!(count(0.01, 100), 1);
        // Every window of ten holds one fault at 10 %.
        assert!((0..100).step_by(10).all(|start| (start..start + 10).filter(|&i| faulted(i, 0.1)).count() == 1));
    }

    #[test]
    fn rates_parse_as_numbers_or_max() {
        assert_eq!("500".parse::<Rate>().unwrap(), Rate::PerSecond(500.0));
        assert_eq!("2.5/s".parse::<Rate>().unwrap(), Rate::PerSecond(2.5));
        assert_eq!("MAX".parse::<Rate>().unwrap(), Rate::Max);
        assert!("0".parse::<Rate>().is_err());
        assert!("-3".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("100us").unwrap(), Duration::from_micros(100));
        assert!(parse_duration("30").unwrap_err().to_string().contains("unit"));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("s").is_err());
    }
}
