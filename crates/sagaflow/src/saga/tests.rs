use serde_json::json;

use super::*;

/// The stage of step `step` alone, as every stage of a linear flow.
fn one(step: usize) -> Stage {
    Stage { first: step, len: 1 }
}

fn record(steps: usize) -> SagaRecord {
    SagaRecord::new(NewSaga {
        request_id: "r1".into(),
        facade: "F".into(),
        mode: Mode::Sync,
        steps,
        data: json!({}),
        deadline_ms: u64::MAX,
        callback_url: None,
        owner: None,
        version: None,
    })
}

fn failure(step: usize) -> Failure {
    Failure { step, node: format!("N{step}"), error: "no".into(), code: Some(9) }
}

fn complete(r: &mut SagaRecord, index: usize) {
    r.apply(&SagaEvent::StepStarted { index }).unwrap();
    r.apply(&SagaEvent::StepCompleted { index, attempts: 1, data: json!({ "step": index }) }).unwrap();
}

#[test]
fn running_to_completed_in_order() {
    let mut r = record(2);
    complete(&mut r, 0);
    assert_eq!(r.status(), SagaStatus::Running);
    assert_eq!(r.completed, 1);
    complete(&mut r, 1);
    assert_eq!(r.state, SagaState::Completed);
    assert_eq!(r.data, json!({ "step": 1 }));
    assert_eq!(r.history.len(), 5);
}

#[test]
fn next_follows_the_record_through_every_state() {
    let mut r = record(3);
    assert_eq!(r.next(), Next::Run(one(0)));
    complete(&mut r, 0);
    complete(&mut r, 1);
    assert_eq!(r.next(), Next::Run(one(2)));
    assert_eq!((r.on_hop(2), r.on_hop(1), r.on_hop(0)), (OnHop::Run, OnHop::Resend(one(2)), OnHop::Resend(one(2))));
    r.apply(&SagaEvent::StepStarted { index: 2 }).unwrap();
    let failed = SagaEvent::StepFailed {
        failure: failure(2),
        attempts: 1,
        compensate_failed: false,
        later_steps_in_doubt: false,
    };
    r.apply(&failed).unwrap();
    assert_eq!(r.next(), Next::Compensate(one(1)));
    assert_eq!(r.on_hop(2), OnHop::Compensate);
    r.apply(&SagaEvent::CompensationGaveUp { index: 1, attempts: 3, reason: "down".into() }).unwrap();
    assert_eq!((r.next(), r.on_hop(2)), (Next::Wait, OnHop::Ended));
    r.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
    r.apply(&SagaEvent::StepCompensated { index: 1, attempts: 1 }).unwrap();
    assert_eq!(r.next(), Next::Compensate(one(0)));
    r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 1 }).unwrap();
    assert_eq!((r.next(), r.on_hop(0)), (Next::End, OnHop::Ended));
    let fresh = record(2);
    assert_eq!(fresh.on_hop(1), OnHop::Early(0), "a hop ahead of the record waits");
}

#[test]
fn steps_cannot_be_skipped_or_repeated() {
    let mut r = record(3);
    assert!(r.apply(&SagaEvent::StepStarted { index: 1 }).is_err());
    complete(&mut r, 0);
    let err = r.apply(&SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(null) }).unwrap_err();
    assert_eq!(err.state, SagaStatus::Running);
}

#[test]
fn failure_compensates_completed_steps_in_reverse() {
    let mut r = record(3);
    complete(&mut r, 0);
    complete(&mut r, 1);
    r.apply(&SagaEvent::StepFailed {
        failure: failure(2),
        attempts: 1,
        compensate_failed: false,
        later_steps_in_doubt: false,
    })
    .unwrap();
    assert_eq!(r.state, SagaState::Compensating { failure: failure(2), pending: vec![1, 0] });
    // Out of order is refused: step 0 cannot be undone before step 1.
    assert!(r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 1 }).is_err());
    r.apply(&SagaEvent::StepCompensated { index: 1, attempts: 1 }).unwrap();
    assert_eq!(r.next_compensation(), Some(0));
    r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 2 }).unwrap();
    assert_eq!(r.state, SagaState::Compensated { failure: failure(2) });
}

#[test]
fn an_uncertain_failed_step_is_compensated_too() {
    let mut r = record(2);
    complete(&mut r, 0);
    r.apply(&SagaEvent::StepFailed {
        failure: failure(1),
        attempts: 5,
        compensate_failed: true,
        later_steps_in_doubt: false,
    })
    .unwrap();
    assert_eq!(r.next_compensation(), Some(1));
}

#[test]
fn a_first_step_refusal_ends_compensated_at_once() {
    let mut r = record(2);
    r.apply(&SagaEvent::StepFailed {
        failure: failure(0),
        attempts: 1,
        compensate_failed: false,
        later_steps_in_doubt: false,
    })
    .unwrap();
    assert_eq!(r.state, SagaState::Compensated { failure: failure(0) });
}

#[test]
fn compensation_giving_up_is_stuck_and_retriable() {
    let mut r = record(2);
    complete(&mut r, 0);
    r.apply(&SagaEvent::StepFailed {
        failure: failure(1),
        attempts: 1,
        compensate_failed: false,
        later_steps_in_doubt: false,
    })
    .unwrap();
    r.apply(&SagaEvent::CompensationGaveUp { index: 0, attempts: 10, reason: "down".into() }).unwrap();
    match &r.state {
        SagaState::Stuck { reason, pending, .. } => {
            assert!(reason.contains("down"), "{reason}");
            assert_eq!(pending, &vec![0]);
        }
        other => panic!("not stuck: {other:?}"),
    }
    assert!(r.state.is_ended());
    r.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
    assert_eq!(r.next_compensation(), Some(0));
    r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 1 }).unwrap();
    assert_eq!(r.status(), SagaStatus::Compensated);
}

#[test]
fn operators_are_named_in_the_history_and_older_retries_still_read() {
    let old: SagaEvent = serde_json::from_value(json!({ "event": "retry_compensation" })).unwrap();
    assert_eq!(old, SagaEvent::RetryCompensation { by: None, reason: None });
    let mut r = record(2);
    complete(&mut r, 0);
    r.apply(&SagaEvent::StepStarted { index: 1 }).unwrap();
    r.apply(&SagaEvent::Aborted { by: "ann".into(), reason: "asked to".into() }).unwrap();
    if let SagaState::Compensating { failure, .. } = &r.state {
        assert_eq!(failure.to_string(), "step 1 failed: aborted by ann: asked to");
    }
    let aborted = r.history.last().unwrap();
    assert_eq!((aborted.by.as_deref(), aborted.reason.as_deref()), (Some("ann"), Some("asked to")));
    r.apply(&SagaEvent::StepCompensated { index: 1, attempts: 1 }).unwrap();
    r.apply(&SagaEvent::CompensationGaveUp { index: 0, attempts: 2, reason: "down".into() }).unwrap();
    let retry = SagaEvent::RetryCompensation { by: Some("bo".into()), reason: Some("redrive".into()) };
    r.apply(&retry).unwrap();
    let retried = r.history.last().unwrap();
    assert_eq!(
        (retried.by.as_deref(), retried.reason.as_deref(), retried.step),
        (Some("bo"), Some("redrive"), Some(0))
    );
    // Entries without an operator keep their old shape.
    let started = serde_json::to_value(&r.history[1]).unwrap();
    assert!(started.get("by").is_none() && started.get("reason").is_none(), "{started}");
}

#[test]
fn ended_sagas_refuse_every_event() {
    let mut r = record(1);
    complete(&mut r, 0);
    assert!(r.apply(&SagaEvent::StepStarted { index: 1 }).is_err());
    assert!(r.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).is_err());
    assert!(
        r.apply(&SagaEvent::StepFailed {
            failure: failure(0),
            attempts: 1,
            compensate_failed: false,
            later_steps_in_doubt: false
        })
        .is_err()
    );
}

#[test]
fn a_halted_saga_is_stuck_and_a_retry_compensates_what_it_did() {
    let mut r = record(3);
    complete(&mut r, 0);
    r.apply(&SagaEvent::StepStarted { index: 1 }).unwrap();
    r.apply(&SagaEvent::Halted { reason: "does not decode".into() }).unwrap();
    match &r.state {
        SagaState::Stuck { reason, pending, failure } => {
            assert_eq!(reason, "does not decode");
            assert_eq!(pending, &vec![1, 0], "the step started last is in doubt");
            assert_eq!(failure.step, 1);
        }
        other => panic!("not stuck: {other:?}"),
    }
    assert_eq!(r.next(), Next::Wait);
    r.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
    assert_eq!(r.next(), Next::Compensate(one(1)));
    r.apply(&SagaEvent::Halted { reason: "still".into() }).unwrap();
    assert!(matches!(&r.state, SagaState::Stuck { pending, .. } if pending == &vec![1, 0]));

    let mut fresh = record(2);
    fresh.apply(&SagaEvent::Halted { reason: "no".into() }).unwrap();
    fresh.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
    assert_eq!(fresh.status(), SagaStatus::Compensated, "nothing ran: nothing to undo");
    assert!(fresh.apply(&SagaEvent::Halted { reason: "no".into() }).is_err(), "an ended saga stays ended");
}

#[test]
fn a_record_without_a_version_still_reads_and_one_with_it_round_trips() {
    let mut old = serde_json::to_value(record(1)).unwrap();
    assert!(old.get("version").is_none(), "no version, no field");
    old.as_object_mut().unwrap().remove("version");
    let read: SagaRecord = serde_json::from_value(old).unwrap();
    assert_eq!(read.version, None);
    let mut versioned = record(1);
    versioned.version =
        Some(FlowVersion { fingerprint: "00ff".into(), label: Some("v1".into()), shape: Shape::default() });
    let json = serde_json::to_value(&versioned).unwrap();
    assert_eq!(json["version"], json!({ "fingerprint": "00ff", "label": "v1" }));
    assert_eq!(serde_json::from_value::<SagaRecord>(json).unwrap(), versioned);
    assert_eq!(versioned.version.unwrap().to_string(), "v1 (00ff)");
}

/// A saga of a flow whose stages have `sizes` steps each.
fn shaped(sizes: &[usize]) -> SagaRecord {
    let mut r = record(sizes.iter().sum());
    r.version =
        Some(FlowVersion { fingerprint: "0".into(), label: None, shape: Shape::of_stages(sizes.iter().copied()) });
    r
}

fn statuses(r: &SagaRecord) -> Vec<StepStatus> {
    r.step_states.iter().map(|s| s.status).collect()
}

#[test]
fn a_linear_shape_is_recorded_as_nothing() {
    assert!(Shape::of_stages([1, 1, 1]).is_linear());
    let shape = Shape::of_stages([1, 3, 1]);
    assert_eq!(shape.stages(), [1, 3, 1]);
    assert_eq!((shape.stage_of(0), shape.stage_of(2), shape.stage_of(4)), (one(0), Stage { first: 1, len: 3 }, one(4)));
    let version = FlowVersion { fingerprint: "0".into(), label: None, shape: Shape::default() };
    assert_eq!(serde_json::to_value(&version).unwrap(), json!({ "fingerprint": "0" }));
}

#[test]
fn branches_complete_in_any_order_and_join_once() {
    use StepStatus::*;
    let mut r = shaped(&[1, 3, 1]);
    complete(&mut r, 0);
    let branches = Stage { first: 1, len: 3 };
    assert_eq!(r.next(), Next::Run(branches));
    for index in 1..4 {
        r.apply(&SagaEvent::StepStarted { index }).unwrap();
    }
    assert!(r.apply(&SagaEvent::StepStarted { index: 4 }).is_err(), "the step after the branches waits for them");
    r.apply(&SagaEvent::StepCompleted { index: 2, attempts: 1, data: json!({ "hotel": 2 }) }).unwrap();
    assert_eq!(statuses(&r), [Done, Running, Done, Running, Pending]);
    assert_eq!((r.completed, &r.data), (1, &json!({ "step": 0 })), "a branch's data waits for the merge");
    assert_eq!(r.step_states[2].output, Some(json!({ "hotel": 2 })));
    let stored = serde_json::to_value(&r.step_states).unwrap();
    assert_eq!(
        stored,
        json!(["done", "running", { "status": "done", "output": { "hotel": 2 } }, "running", "pending"])
    );
    assert_eq!(serde_json::from_value::<SagaRecord>(serde_json::to_value(&r).unwrap()).unwrap(), r);
    assert_eq!(r.to_run(branches).collect::<Vec<_>>(), [1, 3]);
    assert_eq!((r.on_hop(2), r.on_hop(3), r.on_hop(4)), (OnHop::Done, OnHop::Run, OnHop::Early(1)));
    assert!(r.apply(&SagaEvent::StepCompleted { index: 2, attempts: 1, data: json!(null) }).is_err());
    let join = SagaEvent::BranchesJoined { first: 1, data: json!({ "all": true }) };
    assert!(r.apply(&join).is_err(), "no merge before every branch is done");
    r.apply(&SagaEvent::StepCompleted { index: 3, attempts: 1, data: json!({ "car": 3 }) }).unwrap();
    let failed_branch = |step| SagaEvent::StepFailed {
        failure: failure(step),
        attempts: 0,
        compensate_failed: true,
        later_steps_in_doubt: false,
    };
    assert!(r.apply(&failed_branch(2)).is_err(), "a done branch does not fail while a sibling runs");
    r.apply(&SagaEvent::StepCompleted { index: 1, attempts: 2, data: json!({ "flight": 1 }) }).unwrap();
    assert_eq!(r.next(), Next::Join(branches));
    let mut merge_failed = r.clone();
    merge_failed.apply(&failed_branch(1)).unwrap();
    assert_eq!(merge_failed.pending(), [3, 2, 1, 0], "a failed merge undoes every branch");
    assert_eq!((r.on_hop(1), r.on_hop(0)), (OnHop::Join(branches), OnHop::Join(branches)));
    r.apply(&join).unwrap();
    assert!(r.apply(&join).is_err(), "exactly one merge is recorded");
    assert_eq!((r.completed, &r.data), (4, &json!({ "all": true })));
    assert!(r.step_states.iter().all(|s| s.output.is_none()), "merged outputs are not kept twice");
    assert_eq!((r.next(), r.on_hop(2)), (Next::Run(one(4)), OnHop::Resend(one(4))));
    complete(&mut r, 4);
    assert_eq!(r.state, SagaState::Completed);
    assert_eq!(r.history.iter().filter(|h| h.event == HistoryEvent::BranchesJoined).count(), 1);
}

#[test]
fn a_failed_branch_compensates_its_done_and_running_siblings_before_what_came_before() {
    use StepStatus::*;
    let mut r = shaped(&[1, 3, 1]);
    complete(&mut r, 0);
    for index in 1..4 {
        r.apply(&SagaEvent::StepStarted { index }).unwrap();
    }
    r.apply(&SagaEvent::StepCompleted { index: 1, attempts: 1, data: json!({ "flight": 1 }) }).unwrap();
    let failed = SagaEvent::StepFailed {
        failure: failure(2),
        attempts: 1,
        compensate_failed: false,
        later_steps_in_doubt: false,
    };
    r.apply(&failed).unwrap();
    // Step 3 was running: cancelled, in doubt, compensated with the done one.
    assert_eq!(r.pending(), [3, 1, 0]);
    assert_eq!(statuses(&r), [Compensating, Compensating, Failed, Compensating, Pending]);
    assert_eq!(r.step_states[1].output, Some(json!({ "flight": 1 })), "kept for its compensation");
    let branches = Stage { first: 1, len: 3 };
    assert_eq!(r.next(), Next::Compensate(branches));
    assert_eq!(r.to_compensate(branches).collect::<Vec<_>>(), [3, 1]);
    assert!(r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 1 }).is_err(), "0 waits for its dependents");
    r.apply(&SagaEvent::StepCompensated { index: 1, attempts: 1 }).unwrap();
    r.apply(&SagaEvent::CompensationGaveUp { index: 3, attempts: 4, reason: "down".into() }).unwrap();
    assert_eq!(r.status(), SagaStatus::Stuck);
    r.apply(&SagaEvent::RetryCompensation { by: None, reason: None }).unwrap();
    assert_eq!(r.next(), Next::Compensate(branches));
    r.apply(&SagaEvent::StepCompensated { index: 3, attempts: 1 }).unwrap();
    assert_eq!(r.next(), Next::Compensate(one(0)));
    r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 1 }).unwrap();
    assert_eq!(r.status(), SagaStatus::Compensated);
    assert_eq!(statuses(&r), [Compensated, Compensated, Failed, Compensated, Pending]);
}

#[test]
fn a_sibling_compensated_after_another_gave_up_is_recorded_and_the_saga_stays_stuck() {
    let mut r = shaped(&[2]);
    for index in 0..2 {
        r.apply(&SagaEvent::StepStarted { index }).unwrap();
    }
    r.apply(&SagaEvent::Aborted { by: "ann".into(), reason: "wrong trip".into() }).unwrap();
    assert_eq!(r.pending(), [1, 0], "both branches were in flight");
    r.apply(&SagaEvent::CompensationGaveUp { index: 1, attempts: 2, reason: "down".into() }).unwrap();
    r.apply(&SagaEvent::StepCompensated { index: 0, attempts: 1 }).unwrap();
    assert!(matches!(&r.state, SagaState::Stuck { pending, .. } if pending == &vec![1]));
    assert!(r.apply(&SagaEvent::StepCompensated { index: 1, attempts: 1 }).is_err(), "the one that gave up waits");
    r.apply(&SagaEvent::Resolved { index: 1, by: "ann".into(), reason: "by hand".into() }).unwrap();
    assert_eq!(r.status(), SagaStatus::Compensated);
}

#[test]
fn a_record_stored_before_steps_had_a_status_reads_with_one() {
    use StepStatus::*;
    // As written before: no `step_states`, the position in `completed`.
    let stored = |completed: usize, state: serde_json::Value, last: serde_json::Value| {
        json!({
            "request_id": "old", "facade": "F", "mode": "async", "steps": 3, "completed": completed,
            "data": { "order": 7 }, "state": state, "deadline_ms": 1, "callback_url": null,
            "created_ms": 1, "updated_ms": 2,
            "history": [{ "at_ms": 1, "event": "started", "step": null, "attempts": null, "error": null }, last],
        })
    };
    let entry =
        |event: &str, step: usize| json!({ "at_ms": 2, "event": event, "step": step, "attempts": null, "error": null });
    let running: SagaRecord =
        serde_json::from_value(stored(1, json!({ "status": "running" }), entry("step_started", 1))).unwrap();
    assert_eq!(statuses(&running), [Done, Running, Pending]);
    assert_eq!(running.next(), Next::Run(one(1)));
    let failure = json!({ "step": 2, "node": "C", "error": "no", "code": null });
    let compensating = stored(
        2,
        json!({ "status": "compensating", "failure": failure, "pending": [0] }),
        entry("step_compensated", 1),
    );
    let compensating: SagaRecord = serde_json::from_value(compensating).unwrap();
    assert_eq!(statuses(&compensating), [Compensating, Compensated, Failed]);
    let stuck = stored(
        2,
        json!({ "status": "stuck", "failure": failure, "reason": "down", "pending": [2, 1, 0] }),
        entry("compensation_gave_up", 2),
    );
    let stuck: SagaRecord = serde_json::from_value(stuck).unwrap();
    assert_eq!(statuses(&stuck), [Compensating, Compensating, Compensating]);
    let mut compensated: SagaRecord = serde_json::from_value(stored(
        2,
        json!({ "status": "compensated", "failure": failure }),
        entry("step_compensated", 0),
    ))
    .unwrap();
    assert_eq!(statuses(&compensated), [Compensated, Compensated, Failed]);
    // Once read, it is written in the new form and reads back the same.
    compensated.apply(&SagaEvent::CallbackDelivered { delivered: true, attempts: 1, error: None }).unwrap();
    let written = serde_json::to_value(&compensated).unwrap();
    assert_eq!(written["step_states"], json!(["compensated", "compensated", "failed"]));
    assert_eq!(serde_json::from_value::<SagaRecord>(written).unwrap(), compensated);
}

#[test]
fn an_owned_event_changes_the_record_as_a_borrowed_one_does() {
    let events = |index: usize| {
        [
            SagaEvent::StepStarted { index },
            SagaEvent::StepCompleted { index, attempts: 1, data: json!({ "step": index, "ids": [index, 7] }) },
        ]
    };
    // One record copied, not two made: two `record` calls can fall in different milliseconds.
    let mut borrowed = record(2);
    let mut owned = borrowed.clone();
    for event in events(0).into_iter().chain(events(1)) {
        borrowed.apply(&event).unwrap();
        owned.apply_owned(event).unwrap();
        assert_eq!(owned.history.last().map(|h| &h.event), borrowed.history.last().map(|h| &h.event));
        owned.updated_ms = borrowed.updated_ms;
        for (o, b) in owned.history.iter_mut().zip(&borrowed.history) {
            o.at_ms = b.at_ms;
        }
        assert_eq!(owned, borrowed);
    }
    assert_eq!(owned.data, json!({ "step": 1, "ids": [1, 7] }));
    // A refused event leaves the record as it was, owned or not.
    let before = owned.clone();
    assert!(owned.apply_owned(SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(0) }).is_err());
    assert_eq!(owned, before);
}
