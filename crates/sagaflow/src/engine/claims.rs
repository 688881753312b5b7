//! Which sagas this process is working on right now, and log writes that
//! wait out an unavailable log instead of failing the saga.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::log::LogError;
use crate::metrics as m;

use super::Engine;

/// First pause after the saga log refused a write as unavailable.
const LOG_RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest pause between attempts while the saga log stays unavailable.
const LOG_RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a saga waits out an unavailable log before its waiting caller is
/// told so (a blip shorter than this is only a delay).
const OUTAGE_NOTICE: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// Where a saga's task tells its waiting caller that the log is unavailable.
    /// It carries the log's context and its underlying error.
    pub(crate) static OUTAGE: tokio::sync::watch::Sender<Option<(String, Option<crate::ErrorSource>)>>;
}

/// What a process does with a saga it holds a claim on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    /// Running step `n`'s action (or, for a sync saga, its steps from `n` on).
    Forward(usize),
    /// Running the action of step `n`, a branch of a parallel stage: its
    /// siblings may run beside it in this process.
    Branch(usize),
    /// Running its compensations.
    Compensation,
}

/// The sagas this process is driving, so that a second delivery of the same
/// work (a broker's redelivery beside a recovery's re-publish) does not run it
/// twice at once, and the stale-saga sweep leaves live sagas alone. Forward
/// work and compensation are claimed apart: a sync saga's driver waits, holding
/// its forward claim, while its compensation runs.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    forward: HashMap<Arc<str>, usize>,
    branches: HashSet<(Arc<str>, usize)>,
    compensation: HashSet<Arc<str>>,
}

impl Claims {
    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims the saga for `work`; `Err` with the work already under way if
    /// another task of this process holds the same kind of claim.
    pub(crate) fn claim(self: &Arc<Self>, id: &Arc<str>, work: Work) -> Result<Claim, Work> {
        let mut held = self.lock();
        match work {
            Work::Forward(step) => {
                if let Some(current) = held.forward.get(id) {
                    return Err(Work::Forward(*current));
                }
                held.forward.insert(id.clone(), step);
            }
            Work::Branch(step) => {
                if !held.branches.insert((id.clone(), step)) {
                    return Err(work);
                }
            }
            Work::Compensation => {
                if !held.compensation.insert(id.clone()) {
                    return Err(Work::Compensation);
                }
            }
        }
        Ok(Claim { claims: self.clone(), id: id.clone(), work })
    }

    /// Whether some task of this process works on the saga.
    pub(crate) fn is_claimed(&self, id: &str) -> bool {
        let held = self.lock();
        held.forward.contains_key(id) || held.compensation.contains(id) || held.branches.iter().any(|(b, _)| &**b == id)
    }

    /// Number of claims held.
    pub(crate) fn len(&self) -> usize {
        let held = self.lock();
        held.forward.len() + held.branches.len() + held.compensation.len()
    }
}

/// A held claim; dropping it releases the saga.
#[derive(Debug)]
pub(crate) struct Claim {
    claims: Arc<Claims>,
    id: Arc<str>,
    work: Work,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = self.claims.lock();
        match self.work {
            Work::Forward(_) => held.forward.remove(&self.id),
            Work::Branch(step) => held.branches.remove(&(self.id.clone(), step)).then_some(0),
            Work::Compensation => held.compensation.remove(&self.id).then_some(0),
        };
    }
}

impl Engine {
    /// Runs a saga log operation until it succeeds or fails for a reason other
    /// than the log being unavailable. An outage is nobody's fault: the saga
    /// waits it out (with backoff) instead of failing, and a broker delivery
    /// held meanwhile spends none of its redelivery budget. Gives
    /// [`Error::ShuttingDown`] if the orchestrator stops first.
    pub(crate) async fn durably<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, LogError>>,
    {
        let mut delay = LOG_RETRY_FIRST;
        let since = tokio::time::Instant::now();
        loop {
            match op().await {
                Err(error @ LogError::Unavailable { .. }) => {
                    metrics::counter!(m::LOG_RETRIES).increment(1);
                    if delay == LOG_RETRY_FIRST {
                        tracing::warn!(reason = %error, "saga log unavailable; retrying until it is back");
                    }
                    if since.elapsed() >= OUTAGE_NOTICE
                        && let LogError::Unavailable { context, source } = error
                    {
                        let _ = OUTAGE.try_with(|caller| caller.send_replace(Some((context, source))));
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(Error::ShuttingDown),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(LOG_RETRY_MAX);
                }
                other => return other.map_err(Error::from),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_exclusive_until_dropped() {
        let claims = Arc::new(Claims::default());
        let id: Arc<str> = "a".into();
        let first = claims.claim(&id, Work::Compensation).expect("free");
        assert_eq!(claims.claim(&id, Work::Compensation).unwrap_err(), Work::Compensation);
        // A sync saga's driver holds its forward claim while its compensation runs.
        let forward = claims.claim(&id, Work::Forward(2)).expect("another kind");
        assert_eq!(claims.claim(&id, Work::Forward(0)).unwrap_err(), Work::Forward(2));
        assert!(claims.is_claimed("a"));
        drop(first);
        drop(forward);
        assert!(!claims.is_claimed("a"));
        assert_eq!(claims.len(), 0);
        assert!(claims.claim(&id, Work::Forward(1)).is_ok());
    }

    #[test]
    fn branches_of_one_saga_are_claimed_apart() {
        let claims = Arc::new(Claims::default());
        let id: Arc<str> = "a".into();
        let b = claims.claim(&id, Work::Branch(1)).expect("free");
        let c = claims.claim(&id, Work::Branch(2)).expect("a sibling runs beside it");
        assert_eq!(claims.claim(&id, Work::Branch(1)).unwrap_err(), Work::Branch(1), "a duplicate delivery");
        assert_eq!(claims.len(), 2);
        drop((b, c));
        assert!(!claims.is_claimed("a"));
    }
}
