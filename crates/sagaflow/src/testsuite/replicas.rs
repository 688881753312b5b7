//! The replica part of the [`SagaLog`] conformance suite: leases, the
//! takeover of an expired replica's sagas, fencing, and end announcements.
//!
//! Time is passed in (`now_ms`), so expiry is checked without sleeping. A log
//! that is not [`shared`](SagaLog::shared) must keep the single-replica
//! defaults: its one process owns everything and nothing ever expires.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::log::LogHarness;
use super::{WAIT, unique_name, within};
use crate::log::{LogError, SagaLog};
use crate::saga::{Mode, NewSaga, SagaEvent, SagaRecord, SagaStatus, now_ms};

const TTL: Duration = Duration::from_secs(10);

fn owned_saga(request_id: &str, owner: Option<&str>) -> NewSaga {
    NewSaga {
        request_id: request_id.to_owned(),
        facade: "Replicas".to_owned(),
        mode: Mode::Sync,
        steps: 2,
        data: json!({ "request": request_id }),
        deadline_ms: now_ms() + 3_600_000,
        callback_url: None,
        owner: owner.map(str::to_owned),
        version: None,
    }
}

async fn started(log: &dyn SagaLog, saga: NewSaga) -> SagaRecord {
    let id = saga.request_id.clone();
    match within("begin", log.begin(saga)).await {
        Ok(crate::log::Begin::Started(record)) => record,
        other => panic!("begin of `{id}`: expected Started, got {other:?}"),
    }
}

/// A second handle on the same log, as another replica process would have.
async fn another(harness: &dyn LogHarness) -> Arc<dyn SagaLog> {
    within("another handle on the shared log", harness.another()).await.expect("a shared log can be opened again")
}

/// A log of one process: registering works, nothing expires, nothing is
/// claimed, and every unfinished saga is the process's own.
async fn single_replica_defaults(log: &dyn SagaLog) {
    log.register("solo", 1_000, TTL).await.expect("register");
    let id = unique_name("solo");
    started(log, owned_saga(&id, None)).await;
    assert!(log.expired(u64::MAX).await.expect("expired").is_empty());
    assert_eq!(log.claim("solo", "other", u64::MAX).await.expect("claim"), None);
    let mine = log.unfinished_of("solo").await.expect("unfinished_of");
    assert!(mine.iter().any(|r| r.request_id == id), "an unowned saga is everyone's");
    assert!(log.ends().is_none() || log.shared());
}

/// A lease runs until `now + ttl`; a replica is expired after it and not
/// before; a renewal extends it; registering again starts a new epoch.
pub async fn leases_expire_and_renew(harness: &dyn LogHarness) {
    let log = within("a fresh log", harness.fresh()).await;
    if !log.shared() {
        return single_replica_defaults(&*log).await;
    }
    let a = unique_name("replica-a");
    let lease = log.register(&a, 1_000, TTL).await.expect("register");
    assert_eq!(lease.until_ms, 11_000);
    assert!(!log.expired(10_999).await.expect("expired").contains(&a), "alive until its lease runs out");
    assert!(log.expired(11_001).await.expect("expired").contains(&a), "expired once it ran out");
    let renewed = log.renew(&a, lease, 11_500, TTL).await.expect("renew before anyone claimed");
    assert_eq!((renewed.epoch, renewed.until_ms), (lease.epoch, 21_500));
    assert!(!log.expired(21_000).await.expect("expired").contains(&a), "renewed");
    let again = log.register(&a, 30_000, TTL).await.expect("register again");
    assert!(again.epoch > lease.epoch, "a new registration is a new epoch");
    assert!(
        matches!(log.renew(&a, lease, 30_001, TTL).await, Err(LogError::LeaseLost(_))),
        "a renewal under an old epoch is refused"
    );
}

/// Three replicas claim a dead one's sagas at once: exactly one gets them
/// (owned by it now), the dead one's renewal and writes are refused, and a
/// restart under its id starts with what it still owns.
pub async fn claim_takes_over_exactly_once(harness: &dyn LogHarness) {
    let dead_log = within("a fresh log", harness.fresh()).await;
    if !dead_log.shared() {
        return;
    }
    let dead = unique_name("dead");
    let lease = dead_log.register(&dead, 1_000, TTL).await.expect("register");
    let mut owned = Vec::new();
    for i in 0..3 {
        let record = started(&*dead_log, owned_saga(&format!("{dead}-{i}"), Some(&dead))).await;
        owned.push(record.request_id);
    }
    let unowned = started(&*dead_log, owned_saga(&format!("{dead}-any"), None)).await.request_id;
    // An async saga's owner answers for its recovery only: it is taken over too,
    // and any replica may still write its hops.
    let mut async_saga = owned_saga(&format!("{dead}-async"), Some(&dead));
    async_saga.mode = Mode::Async;
    let async_id = started(&*dead_log, async_saga).await.request_id;
    owned.push(async_id.clone());
    owned.sort();
    let ended = started(&*dead_log, owned_saga(&format!("{dead}-ended"), Some(&dead))).await.request_id;
    dead_log.append(&ended, SagaEvent::StepStarted { index: 0 }).await.expect("append");
    dead_log.append(&ended, SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!({}) }).await.unwrap();
    dead_log.append(&ended, SagaEvent::StepStarted { index: 1 }).await.expect("append");
    let done = dead_log.append(&ended, SagaEvent::StepCompleted { index: 1, attempts: 1, data: json!({}) }).await;
    assert!(done.expect("append").state.is_ended());

    let mut claimers = Vec::new();
    for i in 0..3 {
        let log = another(harness).await;
        let name = format!("{dead}-claimer{i}");
        log.register(&name, 20_000, TTL).await.expect("register a claimer");
        claimers.push((name, log));
    }
    let claims = futures::future::join_all(claimers.iter().map(|(name, log)| {
        let dead = dead.clone();
        async move { log.claim(&dead, name, 20_000).await.expect("claim") }
    }))
    .await;
    let winners: Vec<_> = claims.iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|r| (i, r))).collect();
    assert_eq!(winners.len(), 1, "exactly one claimer wins: {claims:?}");
    let (winner, taken) = winners[0];
    let (winner_name, winner_log) = &claimers[winner];
    let mut taken_ids: Vec<_> = taken.iter().map(|r| r.request_id.clone()).collect();
    taken_ids.sort();
    assert_eq!(taken_ids, owned, "its unfinished sagas, not the ended or unowned ones");
    assert!(taken.iter().all(|r| r.owner.as_deref() == Some(winner_name.as_str())));
    assert!(!log_expired(&**winner_log, &dead).await, "a taken-over replica is not claimed again");

    // The dead replica, resumed, may not go on.
    assert!(matches!(dead_log.renew(&dead, lease, 20_001, TTL).await, Err(LogError::LeaseLost(_))));
    match dead_log.append(&owned[0], SagaEvent::StepStarted { index: 0 }).await {
        Err(LogError::NotOwner { owner, .. }) => assert_eq!(&owner, winner_name),
        other => panic!("a write by the replica the saga was taken from: {other:?}"),
    }
    dead_log.append(&async_id, SagaEvent::StepStarted { index: 0 }).await.expect("any replica writes an async hop");
    let after = winner_log.append(&owned[0], SagaEvent::StepStarted { index: 0 }).await.expect("owner writes");
    assert_eq!(after.owner.as_deref(), Some(winner_name.as_str()));
    // An operator's abort passes from any replica; the owner carries it out.
    let aborted = SagaEvent::Aborted { by: "ops".into(), reason: "asked on another replica".into() };
    let aborted = dead_log.append(&owned[0], aborted).await.expect("an operator's event passes the fence");
    assert_eq!((aborted.status(), aborted.owner.as_deref()), (SagaStatus::Compensating, Some(winner_name.as_str())));
    let theirs = winner_log.unfinished_of(winner_name).await.expect("unfinished_of");
    assert!(owned.iter().all(|id| theirs.iter().any(|r| &r.request_id == id)));
    assert!(theirs.iter().any(|r| r.request_id == unowned), "unowned sagas are everyone's");

    // Restarted under its id, it owns nothing of what was taken.
    dead_log.register(&dead, 30_000, TTL).await.expect("register again");
    let left = dead_log.unfinished_of(&dead).await.expect("unfinished_of");
    assert!(left.iter().all(|r| r.owner.as_deref() != Some(dead.as_str())), "{left:?}");
}

async fn log_expired(log: &dyn SagaLog, replica: &String) -> bool {
    log.expired(u64::MAX).await.expect("expired").contains(replica)
}

/// A replica that restarts under its id keeps its unfinished sagas and writes them.
pub async fn restart_keeps_own_sagas(harness: &dyn LogHarness) {
    let log = within("a fresh log", harness.fresh()).await;
    if !log.shared() {
        return;
    }
    let me = unique_name("restarted");
    log.register(&me, now_ms(), TTL).await.expect("register");
    let id = started(&*log, owned_saga(&format!("{me}-1"), Some(&me))).await.request_id;
    drop(log);
    let log = within("the log after a restart", harness.reopen()).await.expect("a shared log can be reopened");
    log.register(&me, now_ms(), TTL).await.expect("register after a restart");
    assert!(log.unfinished_of(&me).await.expect("unfinished_of").iter().any(|r| r.request_id == id));
    log.append(&id, SagaEvent::StepStarted { index: 0 }).await.expect("its own saga");
}

/// A saga ended through one handle is announced to another's `ends`.
pub async fn ends_are_announced(harness: &dyn LogHarness) {
    let writer = within("a fresh log", harness.fresh()).await;
    if !writer.shared() {
        return;
    }
    let reader = another(harness).await;
    let Some(mut ends) = reader.ends() else { return };
    let id = unique_name("announced");
    started(&*writer, owned_saga(&id, None)).await;
    // The listener may need a moment to connect: end sagas until one is heard.
    let heard = within("an end announcement", async {
        let mut round = 0;
        loop {
            let this = format!("{id}-{round}");
            started(&*writer, owned_saga(&this, None)).await;
            writer.append(&this, SagaEvent::StepStarted { index: 0 }).await.unwrap();
            let failure = crate::saga::Failure { step: 0, node: "n".into(), error: "refused".into(), code: None };
            let failed =
                SagaEvent::StepFailed { failure, attempts: 1, compensate_failed: false, later_steps_in_doubt: false };
            let record = writer.append(&this, failed).await.unwrap();
            assert!(record.state.is_ended());
            if let Ok(Ok(heard)) = tokio::time::timeout(Duration::from_millis(500), ends.recv()).await {
                return (heard, round);
            }
            round += 1;
            assert!(round < (WAIT.as_millis() / 500) as usize, "no end announced");
        }
    })
    .await;
    assert!(heard.0.starts_with(&id), "announced `{}`", heard.0);
}
