//! An operator's actions on a booking orchestrator running as its own process, through its
//! admin HTTP API: abort a saga in the middle of a slow step (each mode, and from another
//! replica than the one driving it), settle a stuck compensation by hand, redrive a thousand
//! stuck sagas once the upstream is fixed, and pause a facade under load across a restart.

mod support;

use std::sync::Arc;
use std::time::Duration;

use booking::proto::pb::booking_service_client::BookingServiceClient;
use booking::proto::upstream::{Record, SnapshotReply};
use booking::upstream::MockConfig;
use reqwest::StatusCode;
use sagaflow::SagaStatus;
use serde_json::{Value, json};
use support::replicas::{self, BrokerKind, Cluster, Job, Spec};
use support::split::{Ops, Split, ended};
use support::{CallbackCounter, booking, by_id, channel, with_id};
use tokio::task::JoinHandle;
use tonic::Code;

/// The embedded saga log and the in-memory broker, quick retries, compensations that give up
/// after two attempts (so a broken cancel makes a saga stuck at once), and bounded consumers.
const YAML: &str = "broker: memory\nsaga_log: embedded\nsaga_log_url: {dir}/data\n\
     message_queue:\n  topics:\n\
     \x20   - {id: ThrottlingBooking.CreateOrder, is_throttling: true, concurrency: 8}\n\
     \x20   - {id: ThrottlingBooking.CreatePayment, is_throttling: true, concurrency: 8}\n\
     \x20   - {id: ThrottlingBooking.rollback, is_throttling: true, concurrency: 8}\n\
     \x20   - {id: AsyncBooking.rollback, concurrency: 4}\n\
     flow:\n  retry: {max_attempts: 3, initial_backoff_ms: 20}\n\
     \x20 compensation_retry: {max_attempts: 2, initial_backoff_ms: 20}\n";

/// Consumers of the async flow's rollback topic: the most cancels a redrive may send at once.
const ASYNC_ROLLBACK_CONCURRENCY: u64 = 4;

fn slow(ms: u64) -> MockConfig {
    MockConfig { latency: Duration::from_millis(ms), ..MockConfig::default() }
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

async fn client(grpc: u16) -> BookingServiceClient<tonic::transport::Channel> {
    BookingServiceClient::new(channel(support::process::loopback(grpc)).await)
}

/// The one record of `id` in a snapshot.
fn record<'a>(snapshot: &'a SnapshotReply, id: &str) -> &'a Record {
    let matching: Vec<&Record> = snapshot.records.iter().filter(|r| r.request_id == id).collect();
    assert_eq!(matching.len(), 1, "{id}: records {matching:?}");
    matching[0]
}

/// A record undone by exactly one cancel: cancelled, or a tombstone when the cancel came
/// before the create (which the mock then refused).
fn undone_once(record: &Record) {
    assert!(matches!(record.status.as_str(), "cancelled" | "tombstone"), "{record:?}");
    assert_eq!(record.cancel_calls, 1, "cancelled more than once: {record:?}");
}

fn history_has(saga: &Value, event: &str) -> Option<Value> {
    saga["history"].as_array()?.iter().find(|e| e["event"] == event).cloned()
}

// ------------------------------------------------------------------ abort

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_during_a_slow_step_compensates_once_in_every_mode() {
    // The payment takes 3 s: each saga is aborted while its payment is in flight.
    let split = Split::start(&format!("abort-{}", run_id()), YAML, MockConfig::default(), slow(3_000)).await;
    let ops = split.ops();
    let callbacks = CallbackCounter::start().await;
    let run = run_id();
    let (sync_id, async_id, throttled_id) =
        (format!("abort-sync-{run}"), format!("abort-async-{run}"), format!("abort-throttled-{run}"));

    let mut c = client(split.grpc).await;
    let sync_call = tokio::spawn({
        let (mut c, id) = (c.clone(), sync_id.clone());
        async move { c.handle_sync_booking(with_id(Some(&id), booking(1, 1, false))).await }
    });
    let throttled_call = tokio::spawn({
        let (mut c, id) = (c.clone(), throttled_id.clone());
        async move { c.handle_throttling_booking(with_id(Some(&id), booking(1, 1, false))).await }
    });
    let mut request = booking(1, 1, false);
    request.callback_url = callbacks.url.clone();
    c.handle_async_booking(with_id(Some(&async_id), request)).await.expect("accepted");

    for id in [&sync_id, &async_id, &throttled_id] {
        ops.step_started(id, 1).await;
        let (status, body) =
            ops.post(&format!("/api/sagas/{id}/abort"), "alice", json!({ "reason": "the customer cancelled" })).await;
        assert_eq!(status, StatusCode::OK, "{id}: {body}");
        assert_eq!(body["state"]["status"], "compensating", "{id}: {body}");
    }
    for (mode, call) in [("sync", sync_call), ("throttling", throttled_call)] {
        let status = call.await.unwrap().expect_err("an aborted booking is not completed");
        assert_eq!(status.code(), Code::Aborted, "{mode}: {status:?}");
        assert!(status.message().contains("aborted by alice: the customer cancelled"), "{mode}: {status:?}");
    }
    for id in [&sync_id, &async_id, &throttled_id] {
        let saga = ops.saga_until(id, Duration::from_secs(30), ended).await;
        assert_eq!(saga["status"], "compensated", "{id}: {saga:#}");
        let reason = saga["rollback_reason"].as_str().unwrap_or_default();
        assert!(reason.contains("aborted by alice: the customer cancelled"), "{id}: {reason}");
        let aborted = history_has(&saga, "aborted").unwrap_or_else(|| panic!("{id}: no abort in {saga:#}"));
        assert_eq!(aborted["by"], "alice", "{id}: {aborted}");
        // No step after the one in flight started.
        assert!(saga["step_details"][1]["action"]["status"] != "completed", "{id}: {saga:#}");
        // Aborting again is a conflict that names the state.
        let (status, body) = ops.post(&format!("/api/sagas/{id}/abort"), "alice", json!({ "reason": "again" })).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("compensated"), "{body}");
    }
    // Upstream, the order and the payment in flight were each undone by one cancel.
    let (orders, payments) = (split.order.snapshot(), split.payment.snapshot());
    for id in [&sync_id, &async_id, &throttled_id] {
        undone_once(record(&orders, id));
        undone_once(record(&payments, id));
    }
    callbacks.wait_all(std::slice::from_ref(&async_id), Duration::from_secs(20)).await;
    let posted = callbacks.of(&async_id);
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(posted[0]["status"], "compensated");
    assert!(posted[0]["error"].as_str().unwrap_or_default().contains("aborted by alice"), "{posted:?}");
    let log = std::fs::read_to_string(split.orchestrator_log()).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("saga aborted by an operator")).count(), 3, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_on_one_replica_stops_a_saga_another_replica_drives() {
    if !replicas::servers_up(BrokerKind::Nats) {
        return;
    }
    let spec = Spec { payment_latency_ms: 3_000, ..Spec::new(2, BrokerKind::Nats) };
    let cluster = Cluster::start(spec).await;
    let run = run_id();
    let jobs: Vec<Job> = [replicas::Call::Sync, replicas::Call::Throttling]
        .into_iter()
        .enumerate()
        .map(|(i, call)| Job { id: format!("abort-b-{i}-{run}"), call, fault: false, replica: 0 })
        .collect();
    let port = cluster.replicas[0].grpc;
    let calls: Vec<_> =
        jobs.iter().cloned().map(|job| tokio::spawn(async move { replicas::call_once(port, &job).await })).collect();
    // Replica B sees the saga A drives through the shared log, and aborts it there.
    let b = Ops::new(cluster.replicas[1].http);
    for job in &jobs {
        let saga = b.step_started(&job.id, 1).await;
        assert_eq!(saga["owner"].as_str(), Some(cluster.replicas[0].pod.as_str()), "{saga:#}");
        let (status, body) =
            b.post(&format!("/api/sagas/{}/abort", job.id), "bob", json!({ "reason": "partner outage" })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for (job, call) in jobs.iter().zip(calls) {
        assert_eq!(call.await.unwrap().map_err(|s| s.to_string()), Ok(false), "{}: A answers rolled back", job.id);
    }
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let records = cluster.all_ended(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        let record = &records[id];
        assert_eq!(record.status(), SagaStatus::Compensated, "{id}");
        let aborted = record
            .history
            .iter()
            .find(|h| h.event == sagaflow::HistoryEvent::Aborted)
            .expect("the abort is in the history");
        assert!(aborted.error.as_deref().unwrap_or_default().contains("aborted by bob: partner outage"));
    }
    let effects = cluster.check_effects(&records).await;
    assert_eq!(effects.compensated, ids.len());
    let (orders, payments) = (by_id(&cluster.orders().await), by_id(&cluster.payments().await));
    for id in &ids {
        undone_once(&orders[id][0]);
        undone_once(&payments[id][0]);
    }
    let aborted_on_b = cluster.log_of(1).lines().filter(|l| l.contains("saga aborted by an operator")).count();
    assert_eq!(aborted_on_b, ids.len(), "B logs each abort");
}

// ------------------------------------------------------------------ resolve

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_a_stuck_compensation_ends_the_saga_and_posts_its_callback_once() {
    let split =
        Split::start(&format!("resolve-{}", run_id()), YAML, MockConfig::default(), MockConfig::default()).await;
    let ops = split.ops();
    let callbacks = CallbackCounter::start().await;
    // The order service lost its undo: the order's cancel fails until the saga is stuck.
    split.order.set_fail_cancels(true);
    let id = format!("resolve-{}", run_id());
    let mut request = booking(2, 1, true);
    request.callback_url = callbacks.url.clone();
    client(split.grpc).await.handle_async_booking(with_id(Some(&id), request)).await.expect("accepted");
    let stuck = ops.saga_until(&id, Duration::from_secs(30), |s| s["status"] == "stuck").await;
    assert_eq!(stuck["state"]["pending"], json!([0]), "{stuck:#}");
    callbacks.wait_all(std::slice::from_ref(&id), Duration::from_secs(20)).await;
    assert_eq!(callbacks.of(&id)[0]["status"], "stuck");

    // Bad asks are refused with the reason, and change nothing.
    let path = format!("/api/sagas/{id}/resolve");
    let (status, body) = ops.post(&path, "carol", json!({ "step": 1, "reason": "x" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "not the pending step: {body}");
    let (status, body) = ops.post(&path, "carol", json!({ "step": 0, "reason": "  " })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a reason is required: {body}");
    let (status, _) = ops.post("/api/sagas/no-such-saga/resolve", "carol", json!({ "step": 0, "reason": "x" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = ops.post(&path, "carol", json!({ "step": 0, "reason": "order voided by hand" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let saga = ops.saga_until(&id, Duration::from_secs(30), |s| s["status"] == "compensated").await;
    let resolved = history_has(&saga, "resolved").expect("the resolve is in the history");
    assert_eq!((resolved["by"].as_str(), resolved["step"].as_u64()), (Some("carol"), Some(0)), "{resolved}");
    assert!(resolved["reason"].as_str().unwrap_or_default().contains("order voided by hand"), "{resolved}");

    // The ended saga's callback: once, and nothing after it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while callbacks.of(&id).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no callback after the resolve: {:?}", callbacks.of(&id));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ops.saga_until(&id, Duration::from_secs(20), |s| {
        s["history"].as_array().is_some_and(|h| h.iter().filter(|e| e["event"] == "callback_delivered").count() == 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let posted: Vec<String> = callbacks.of(&id).iter().map(|c| c["status"].as_str().unwrap().to_owned()).collect();
    assert_eq!(posted, ["stuck", "compensated"]);
    let (status, _) = ops.post(&path, "carol", json!({ "step": 0, "reason": "twice" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "an ended saga cannot be resolved again");
    // The audit trail tells who did what, and when.
    let (status, audit) = ops.get(&format!("/api/sagas/{id}/audit")).await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    assert_eq!(audit["status"], "compensated");
    let actions = audit["actions"].as_array().cloned().unwrap_or_default();
    assert_eq!(actions.len(), 1, "{audit:#}");
    assert_eq!(
        (&actions[0]["action"], &actions[0]["by"], &actions[0]["step"]),
        (&json!("resolve"), &json!("carol"), &json!(0))
    );
    assert_eq!(actions[0]["reason"], "order voided by hand");
    assert_eq!(ops.get("/api/sagas/no-such-saga/audit").await.0, StatusCode::NOT_FOUND);
    // Settled by hand, not by a cancel: the mock saw none succeed.
    assert_eq!(record(&split.order.snapshot(), &id).cancel_calls, 0);
}

// ------------------------------------------------------------------ redrive

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_after_the_upstream_is_fixed_ends_a_thousand_stuck_sagas_within_the_flows_concurrency() {
    const SAGAS: usize = 1_000;
    // Each call takes 10 ms, so cancels sent together overlap at the mock.
    let split = Split::start(&format!("redrive-{}", run_id()), YAML, slow(10), MockConfig::default()).await;
    let ops = split.ops();
    split.order.set_fail_cancels(true);
    let run = run_id();
    let ids: Arc<Vec<String>> = Arc::new((0..SAGAS).map(|i| format!("redrive-{run}-{i}")).collect());
    let senders: Vec<_> = (0..8)
        .map(|k| {
            let (ids, grpc) = (ids.clone(), split.grpc);
            tokio::spawn(async move {
                let mut c = client(grpc).await;
                for id in ids.iter().skip(k).step_by(8) {
                    c.handle_async_booking(with_id(Some(id), booking(3, 1, true))).await.expect("accepted");
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    ops.count_until("AsyncBooking", "stuck", SAGAS as u64, Duration::from_secs(240)).await;

    // The upstream is fixed; the dry run counts and changes nothing.
    split.order.set_fail_cancels(false);
    let (status, body) = ops.post("/api/redrive", "dana", json!({ "facade": "AsyncBooking", "dry_run": true })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "matched": SAGAS, "dry_run": true }));
    assert_eq!(ops.counts("AsyncBooking").await["stuck"], SAGAS);
    let (status, body) = ops.post("/api/redrive", "dana", json!({ "facade": "SyncBooking", "dry_run": true })).await;
    assert_eq!((status, &body["matched"]), (StatusCode::OK, &json!(0)), "{body}");

    split.order.reset_peak();
    let (status, body) = ops.post("/api/redrive", "dana", json!({ "facade": "AsyncBooking", "per_second": 500 })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["matched"], SAGAS);
    ops.count_until("AsyncBooking", "compensated", SAGAS as u64, Duration::from_secs(240)).await;
    let (_, metrics) = ops.text("/metrics").await;
    assert_eq!(support::process::metric_sum(&metrics, "sagaflow_redriven_total"), SAGAS as f64, "{metrics}");

    let orders = split.order.snapshot();
    let counters = orders.counters.unwrap_or_default();
    println!("redrive of {SAGAS}: peak {} cancels in flight at the order service", counters.peak_in_flight);
    assert!(
        counters.peak_in_flight <= ASYNC_ROLLBACK_CONCURRENCY,
        "the order service saw {} calls at once; the flow allows {ASYNC_ROLLBACK_CONCURRENCY}",
        counters.peak_in_flight
    );
    let records = by_id(&orders);
    for id in ids.iter() {
        let order = &records[id];
        assert_eq!(order.len(), 1, "{id}: {order:?}");
        undone_once(&order[0]);
    }
    // Who redrove it is in each saga's history.
    let saga = ops.saga(&ids[0]).await.expect("the saga");
    let retried = history_has(&saga, "retry_compensation").expect("the retry is in the history");
    assert_eq!((&retried["by"], &retried["reason"]), (&json!("dana"), &json!("redrive")), "{retried}");
    let (_, audit) = ops.get(&format!("/api/sagas/{}/audit", ids[0])).await;
    assert_eq!(audit["actions"][0]["action"], "retry", "{audit:#}");
    assert_eq!(audit["actions"][0]["by"], "dana", "{audit:#}");
}

// ------------------------------------------------------------------ pause

/// Sync bookings from `callers` loops, each until its first refusal: each caller's answers
/// in order, `Ok(())` for a completed booking, else the status.
fn sync_load(grpc: u16, tag: &str, callers: usize) -> Vec<JoinHandle<Vec<Result<(), tonic::Status>>>> {
    (0..callers)
        .map(|k| {
            let tag = tag.to_owned();
            tokio::spawn(async move {
                let mut c = client(grpc).await;
                let mut answers = Vec::new();
                for n in 0..10_000 {
                    let id = format!("{tag}-{k}-{n}");
                    let answer = c.handle_sync_booking(with_id(Some(&id), booking(4, 1, false))).await.map(|_| ());
                    let refused = answer.is_err();
                    answers.push(answer);
                    if refused {
                        break;
                    }
                }
                answers
            })
        })
        .collect()
}

fn is_paused_refusal(status: &tonic::Status) -> bool {
    status.code() == Code::Unavailable
        && status.message().contains("facade `SyncBooking` is paused (by erin)")
        && status.message().contains("resumes it")
}

/// Callers of the load on the paused facade.
const CALLERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_facade_refuses_new_calls_lets_running_ones_end_and_stays_paused_across_a_restart() {
    let mut split = Split::start(&format!("pause-{}", run_id()), YAML, MockConfig::default(), slow(200)).await;
    let ops = split.ops();
    let tag = format!("pause-{}", run_id());
    let load = sync_load(split.grpc, &tag, CALLERS);
    ops.count_until_at_least("SyncBooking", "completed", 12).await;

    let (status, body) = ops.post("/api/flows/SyncBooking/pause?mode=wait", "erin", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("refuse, queue"), "{body}");
    let asked = sagaflow::now_ms();
    let (status, body) = ops.post("/api/flows/SyncBooking/pause", "erin", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let paused_at = sagaflow::now_ms();
    // Every caller goes on until it is refused: the calls under way when the pause came end.
    let (mut completed, mut refused) = (0, 0);
    for caller in load {
        let answers = tokio::time::timeout(Duration::from_secs(60), caller).await.expect("refused in time").unwrap();
        for answer in &answers {
            match answer {
                Ok(()) => completed += 1,
                Err(status) => {
                    assert!(is_paused_refusal(status), "a call neither completed nor refused as paused: {status:?}");
                    refused += 1;
                }
            }
        }
    }
    assert_eq!(refused, CALLERS, "each caller was refused once, then stopped");
    // The sagas that were running when the pause came ended, completed.
    let (_, sagas) = ops.get("/api/sagas?facade=SyncBooking&limit=1000").await;
    let sagas = sagas.as_array().cloned().unwrap_or_default();
    assert_eq!(sagas.len(), completed, "one saga per completed call, none for a refused one");
    let mut running_at_pause = 0;
    for saga in &sagas {
        let id = saga["request_id"].as_str().unwrap();
        let saga = ops.saga_until(id, Duration::from_secs(30), ended).await;
        assert_eq!(saga["status"], "completed", "{saga:#}");
        let (created, updated) = (saga["created_ms"].as_u64().unwrap(), saga["updated_ms"].as_u64().unwrap());
        // Under way when the pause was asked for (it took effect by `paused_at`).
        running_at_pause += usize::from(created < asked && updated > asked);
    }
    println!(
        "{completed} bookings completed, {running_at_pause} of them running when the pause was asked for \
         (it took {} ms)",
        paused_at - asked
    );
    assert!(running_at_pause > 0, "the callers kept sagas running the whole time; one must have spanned the pause");
    // Other facades go on.
    let mut c = client(split.grpc).await;
    c.handle_throttling_booking(with_id(Some(&format!("{tag}-throttled")), booking(4, 1, false)))
        .await
        .expect("ThrottlingBooking is not paused");
    let (_, flows) = ops.get("/api/flows").await;
    let paused: Vec<&str> = flows
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["paused"] == true)
        .filter_map(|f| f["facade"].as_str())
        .collect();
    assert_eq!(paused, ["SyncBooking"]);

    // A restart keeps it paused: the switch is in the saga log.
    split.stop_orchestrator().await;
    split.start_orchestrator().await;
    let mut c = client(split.grpc).await;
    let status = c
        .handle_sync_booking(with_id(Some(&format!("{tag}-after-restart")), booking(4, 1, false)))
        .await
        .expect_err("still paused after the restart");
    assert!(is_paused_refusal(&status), "{status:?}");

    // Paused with its calls queued: a new call waits, with nothing recorded, until the resume.
    let (status, body) = ops.post("/api/flows/SyncBooking/pause?mode=queue", "erin", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let held_id = format!("{tag}-held");
    let held = tokio::spawn({
        let (grpc, id) = (split.grpc, held_id.clone());
        async move { client(grpc).await.handle_sync_booking(with_id(Some(&id), booking(4, 1, false))).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!held.is_finished(), "a queued call waits for the resume");
    let (status, body) = ops.get(&format!("/api/sagas/{held_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a queued call records nothing before the resume: {body}");

    let (status, body) = ops.post("/api/flows/SyncBooking/resume", "erin", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    held.await.unwrap().expect("the queued call ran once the facade was resumed");
    c.handle_sync_booking(with_id(Some(&format!("{tag}-resumed")), booking(4, 1, false)))
        .await
        .expect("resumed: calls run again");
    let log = std::fs::read_to_string(split.orchestrator_log()).unwrap();
    assert!(log.contains("facade paused by an operator") && log.contains("facade resumed by an operator"));
}
