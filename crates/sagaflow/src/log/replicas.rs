//! Replicas sharing one saga log: leases, and who may write a saga.

use super::LogError;
use crate::saga::{Mode, SagaEvent, SagaRecord};

/// A replica's registration in a shared saga log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// New at each registration and each takeover of the replica's sagas; a
    /// renewal under an older epoch is refused.
    pub epoch: u64,
    /// Unix ms the replica counts as alive until.
    pub until_ms: u64,
}

/// The fence a shared log applies under the saga's lock before each write of
/// `event`: a sync or throttling saga owned by another replica is not this
/// writer's to change. An async saga's owner only answers for its recovery: its
/// hops go to whichever replica consumes them. An operator's event (abort,
/// resolve, retry) passes from any replica: it drives nothing itself, and the
/// owner carries out what follows from it.
pub fn check_owner(record: &SagaRecord, writer: Option<&str>, event: &SagaEvent) -> Result<(), LogError> {
    if record.mode == Mode::Async || event.is_operators() {
        return Ok(());
    }
    match (record.owner.as_deref(), writer) {
        (Some(owner), Some(writer)) if owner != writer => {
            Err(LogError::NotOwner { request_id: record.request_id.clone(), owner: owner.to_owned() })
        }
        _ => Ok(()),
    }
}
