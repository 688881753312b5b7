//! Retry and timeout policies.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with jitter and a cap on attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of any delay.
    pub max_backoff: Duration,
    /// Growth of the delay per attempt.
    pub multiplier: f64,
    /// Share of each delay drawn at random (0 = none, 1 = full jitter).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The default of [`Flow::compensation_retry`](crate::Flow::compensation_retry): more
    /// patient than the actions', since past its last attempt the saga is Stuck.
    pub fn compensation() -> Self {
        Self {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            ..Self::default()
        }
    }

    /// A policy that never retries.
    pub fn never() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    /// The same policy with another attempt count.
    pub fn attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The same policy with other delays.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// The same policy with another jitter share.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay without jitter before attempt `next` (2 for the first retry).
    pub fn nominal_delay(&self, next: u32) -> Duration {
        let exponent = next.saturating_sub(2).min(64) as i32;
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        Duration::from_secs_f64(secs.min(self.max_backoff.as_secs_f64()))
    }

    /// The delay before attempt `next`, jitter applied: within
    /// `[nominal × (1 − jitter), nominal]`.
    pub fn delay(&self, next: u32) -> Duration {
        let nominal = self.nominal_delay(next);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return nominal;
        }
        let factor = 1.0 - jitter * rand::rng().random::<f64>();
        nominal.mul_f64(factor)
    }

    pub(crate) fn validate(&self, what: &str) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err(format!("{what}: max_attempts must be at least 1"));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(format!("{what}: multiplier must be >= 1"));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!("{what}: jitter must be within 0..=1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy::default().backoff(Duration::from_millis(100), Duration::from_millis(350)).jitter(0.0);
        assert_eq!(p.delay(2), Duration::from_millis(100));
        assert_eq!(p.delay(3), Duration::from_millis(200));
        assert_eq!(p.delay(4), Duration::from_millis(350));
        assert_eq!(p.delay(40), Duration::from_millis(350));
    }

    #[test]
    fn jitter_stays_within_its_share() {
        let p = RetryPolicy::default().backoff(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..1000 {
            let d = p.delay(2);
            assert!(d <= Duration::from_millis(100) && d >= Duration::from_millis(80), "{d:?}");
        }
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert!(RetryPolicy::default().attempts(0).validate("retry").is_err());
        assert!(RetryPolicy::default().jitter(2.0).validate("retry").is_err());
        assert!(RetryPolicy::default().validate("retry").is_ok());
    }
}
