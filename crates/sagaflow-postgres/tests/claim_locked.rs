//! A takeover does not wait for a saga row that a write of the expired replica
//! still locks (a replica paused, frozen or starved in the middle of a write):
//! it takes the other sagas now and that one in a later round.

mod support;

use std::time::Duration;

use sagaflow::Mode;
use sagaflow::log::{LogError, NewSaga, SagaLog};
use serde_json::json;
use support::TestDb;

const TTL: Duration = Duration::from_secs(10);

fn owned(id: &str, owner: &str) -> NewSaga {
    NewSaga {
        request_id: id.into(),
        facade: "F".into(),
        mode: Mode::Sync,
        steps: 2,
        data: json!({}),
        deadline_ms: u64::MAX,
        callback_url: None,
        owner: Some(owner.into()),
        version: None,
    }
}

fn ids(records: &[sagaflow::SagaRecord]) -> Vec<String> {
    let mut ids: Vec<String> = records.iter().map(|r| r.request_id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_skips_a_saga_locked_by_a_paused_write_and_takes_it_later() {
    let Some(db) = TestDb::open().await else { return };
    let schema = db.new_schema();
    let dead = db.connect(&schema).await;
    let lease = dead.register("dead", 1_000, TTL).await.unwrap();
    for id in ["a", "b", "locked"] {
        dead.begin(owned(id, "dead")).await.unwrap();
    }
    // The replica paused in the middle of a write to `locked`: its transaction holds the row.
    let mut paused = dead.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sagaflow_sagas WHERE request_id = 'locked' FOR UPDATE")
        .execute(&mut *paused)
        .await
        .unwrap();

    let survivor = db.connect(&schema).await;
    survivor.register("survivor", 20_000, TTL).await.unwrap();
    let claim = survivor.claim("dead", "survivor", 20_000);
    let first =
        tokio::time::timeout(Duration::from_secs(5), claim).await.expect("the claim does not wait for the lock");
    assert_eq!(ids(&first.unwrap().expect("claimed")), ["a", "b"]);
    // The paused replica's lease is gone all the same; it stays to be claimed for what is left.
    assert!(matches!(dead.renew("dead", lease, 20_000, TTL).await, Err(LogError::LeaseLost(_))));
    assert_eq!(survivor.expired(20_000).await.unwrap(), ["dead"]);
    assert_eq!(survivor.claim("dead", "survivor", 20_100).await.unwrap().map(|r| r.len()), Some(0));

    paused.rollback().await.unwrap();
    let rest = survivor.claim("dead", "survivor", 20_200).await.unwrap().expect("claimed");
    assert_eq!(ids(&rest), ["locked"]);
    assert!(rest.iter().all(|r| r.owner.as_deref() == Some("survivor")));
    assert!(survivor.expired(20_300).await.unwrap().is_empty(), "taken over: not claimed again");
    assert_eq!(survivor.claim("dead", "survivor", 20_300).await.unwrap(), None);
}
