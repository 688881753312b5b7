//! The parallel-stage part of the [`SagaLog`](crate::log::SagaLog) conformance
//! suite: branches of one stage recorded in any order and at once, one merge
//! of many racing, and a failed branch turning its siblings to compensation.

use serde_json::json;

use super::log::{LogHarness, append, begin, complete_steps, failure, fresh, get, new_saga, refused};
use super::{unique_name, within};
use crate::log::LogError;
use crate::saga::{FlowVersion, NewSaga, SagaEvent, SagaStatus, Shape, StepStatus};

/// A saga of a flow with a stage of three parallel branches between two steps.
fn parallel_saga(request_id: &str, facade: &str) -> NewSaga {
    let mut saga = new_saga(request_id, facade, 5);
    saga.version =
        Some(FlowVersion { fingerprint: "conformance".into(), label: None, shape: Shape::of_stages([1, 3, 1]) });
    saga
}

/// A parallel stage's branches: each step's status and unmerged data are
/// stored and read back; branches completed at once from several tasks are
/// each recorded; of concurrent merges exactly one is; a failed branch turns
/// its done and running siblings to compensation, before the step they follow.
pub async fn parallel_branches_round_trip(harness: &dyn LogHarness) {
    let log = fresh(harness).await;
    let facade = unique_name("Facade");
    let record = begin(&*log, parallel_saga(&unique_name("joined"), &facade)).await;
    let mut record = complete_steps(&*log, record, 1).await;
    for index in 1..4 {
        record = append(&*log, &record, SagaEvent::StepStarted { index }).await;
    }
    let branch =
        append(&*log, &record, SagaEvent::StepCompleted { index: 2, attempts: 1, data: json!({ "hotel": 2 }) }).await;
    assert_eq!(branch.step_states[2].output, Some(json!({ "hotel": 2 })));
    assert_eq!(branch.completed, 1, "a branch waits for the merge");
    let id = branch.request_id.clone();
    let tasks: Vec<_> = [1, 3]
        .into_iter()
        .map(|index| {
            let (log, id) = (log.clone(), id.clone());
            tokio::spawn(async move {
                let data = json!({ "branch": index });
                log.append(&id, SagaEvent::StepCompleted { index, attempts: 1, data }).await
            })
        })
        .collect();
    for task in tasks {
        within("a branch's completion", task).await.expect("task").expect("each branch is recorded");
    }
    let merges: Vec<_> = (0..4)
        .map(|n| {
            let (log, id) = (log.clone(), id.clone());
            tokio::spawn(async move {
                log.append(&id, SagaEvent::BranchesJoined { first: 1, data: json!({ "merge": n }) }).await
            })
        })
        .collect();
    let mut joined = Vec::new();
    for task in merges {
        match within("a merge", task).await.expect("task") {
            Ok(record) => joined.push(record),
            Err(LogError::Transition(_)) => {}
            Err(e) => panic!("a merge failed: {e}"),
        }
    }
    assert_eq!(joined.len(), 1, "exactly one of four concurrent merges is recorded");
    let record = get(&*log, &id).await.expect("the saga");
    assert_eq!((record.completed, &record.data), (4, &joined[0].data));
    assert!(record.step_states.iter().take(4).all(|s| s.status == StepStatus::Done && s.output.is_none()));
    let record = complete_steps(&*log, record, 5).await;
    assert_eq!(record.status(), SagaStatus::Completed);

    let record = begin(&*log, parallel_saga(&unique_name("failed"), &facade)).await;
    let mut record = complete_steps(&*log, record, 1).await;
    for index in 1..4 {
        record = append(&*log, &record, SagaEvent::StepStarted { index }).await;
    }
    let record =
        append(&*log, &record, SagaEvent::StepCompleted { index: 3, attempts: 1, data: json!({ "car": 3 }) }).await;
    let failed = SagaEvent::StepFailed {
        failure: failure(1),
        attempts: 1,
        compensate_failed: false,
        later_steps_in_doubt: false,
    };
    let record = append(&*log, &record, failed).await;
    assert_eq!(record.pending(), [3, 2, 0], "the done and the running sibling, then the step before");
    let statuses: Vec<_> = record.step_states.iter().map(|s| s.status).collect();
    use StepStatus::*;
    assert_eq!(statuses, [Compensating, Failed, Compensating, Compensating, Pending]);
    refused(&*log, &record, SagaEvent::StepCompensated { index: 0, attempts: 1 }, SagaStatus::Compensating).await;
    let record = append(&*log, &record, SagaEvent::StepCompensated { index: 2, attempts: 1 }).await;
    let record = append(&*log, &record, SagaEvent::StepCompensated { index: 3, attempts: 1 }).await;
    let record = append(&*log, &record, SagaEvent::StepCompensated { index: 0, attempts: 1 }).await;
    assert_eq!(record.status(), SagaStatus::Compensated);
}
