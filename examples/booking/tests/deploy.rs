//! Deploying a changed flow while its sagas are in flight, with the booking service as its own
//! process and the mock upstreams as theirs (their records tell what really happened): sagas
//! begun on flow v1 (CreateOrder → CreatePayment) and cut off by `kill -9` finish on v1's nodes
//! after a restart on v2 (CheckBooking → CreateOrder → CreatePayment, v1 kept), while new
//! sagas run v2; a start on v2 alone with v1 sagas unfinished is refused naming the facade, the
//! version and how many sagas need it; started anyway, it leaves them untouched, and they end
//! once v1 is registered again.
//!
//! Without versions, a v1 saga recovered on v2 is driven by position: its step 1 (v1's
//! CreatePayment) would run v2's CreateOrder, a second order and no payment.

mod support;

use std::time::{Duration, Instant};

use booking::proto::pb::BookingRequest;
use booking::proto::pb::booking_service_client::BookingServiceClient;
use booking::proto::upstream::SnapshotRequest;
use booking::proto::upstream::order_service_client::OrderServiceClient;
use serde_json::Value;
use support::process::{Proc, booking_bin, loopback};
use support::stack::Stack;
use support::{assert_upstreams_agree, booking, channel, with_id};

const PAYMENT_MS: &str = "1500";
const REFUSED: &str = "unfinished sagas need flow versions that are not registered";

fn is_fault(i: usize) -> bool {
    i % 4 == 3
}

/// Rewrites the stack's config with `flow_version: VARIANT` and `extra` lines.
fn deploy(stack: &Stack, base: &str, variant: &str, extra: &str) {
    std::fs::write(&stack.config, format!("{base}flow_version: {variant}\n{extra}")).unwrap();
}

/// Sends `n` async bookings named `{prefix}-{i}`; every fourth is refused by the payment service.
async fn book(stack: &Stack, prefix: &str, n: usize) -> Vec<String> {
    let mut client = BookingServiceClient::new(channel(loopback(stack.grpc)).await);
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let request = BookingRequest { callback_url: String::new(), ..booking(1, 1, is_fault(i)) };
        client.handle_async_booking(with_id(Some(&id), request)).await.unwrap_or_else(|e| panic!("{id}: {e:?}"));
        ids.push(id);
    }
    ids
}

/// Waits until the order service holds `n` orders of `prefix`'s sagas (their payments in flight).
async fn orders_taken(stack: &Stack, prefix: &str, n: usize) {
    let mut orders = OrderServiceClient::new(channel(stack.order_addr()).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snapshot = orders.snapshot(SnapshotRequest {}).await.unwrap().into_inner();
        if snapshot.records.iter().filter(|r| r.request_id.starts_with(prefix)).count() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{prefix}: fewer than {n} orders within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn saga(stack: &Stack, id: &str) -> Value {
    let url = format!("http://127.0.0.1:{}/api/sagas/{id}", stack.http);
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// Waits for `ids` to end; checks each ran on `label` with `steps` steps and ended as booked.
async fn ended_on(stack: &Stack, ids: &[String], label: &str, steps: u64) {
    let statuses = stack.admin().wait_ended(ids, Duration::from_secs(120)).await;
    let mut ended = Vec::new();
    for (i, (id, status)) in ids.iter().zip(statuses).enumerate() {
        assert_eq!(status, if is_fault(i) { "compensated" } else { "completed" }, "{id}");
        let record = saga(stack, id).await;
        assert_eq!((record["version"]["label"].as_str(), record["steps"].as_u64()), (Some(label), Some(steps)), "{id}");
        ended.push((id.clone(), status));
    }
    // One order per saga, paid or cancelled: no step ran as another version's node.
    assert_upstreams_agree(stack.order_addr(), stack.payment_addr(), &ended).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_begun_on_v1_finish_on_v1_after_a_deploy_and_a_start_without_v1_is_refused() {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let yaml = "saga_log: embedded\nsaga_log_url: {dir}/data\nflow:\n  deadline_ms: 120000\n";
    let mut stack = Stack::start(&format!("deploy-{run}"), yaml, &[], &["--latency-ms", PAYMENT_MS]).await;
    let base = std::fs::read_to_string(&stack.config).unwrap();

    // v1 under load, killed while payments are in flight; then v2 with v1 kept.
    let first = book(&stack, &format!("v1-{run}"), 24).await;
    orders_taken(&stack, &format!("v1-{run}"), 8).await;
    stack.kill_orchestrator();
    deploy(&stack, &base, "v2", "");
    stack.start_orchestrator().await;
    let fresh = book(&stack, &format!("v2-{run}"), 8).await;
    ended_on(&stack, &first, "v1", 2).await;
    ended_on(&stack, &fresh, "v2", 3).await;
    let checked = saga(&stack, &fresh[0]).await;
    assert!(checked["history"].as_array().unwrap().iter().any(|h| h["event"] == "step_completed" && h["step"] == 0));

    // v1 again, killed mid-load; v2 alone is refused while those sagas need v1.
    stack.kill_orchestrator();
    deploy(&stack, &base, "v1", "");
    stack.start_orchestrator().await;
    let second = book(&stack, &format!("again-{run}"), 12).await;
    orders_taken(&stack, &format!("again-{run}"), 4).await;
    stack.kill_orchestrator();
    deploy(&stack, &base, "v2-only", "");
    let log = stack.scratch.path("refused.log");
    let config = stack.config.to_str().unwrap().to_owned();
    let mut refused = Proc::spawn("refused", &booking_bin(), &["--config", &config, "orchestrator"], &log);
    let status = refused.exited_within(Duration::from_secs(30)).await.expect("a refused start exits");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "the start on v2 alone was not refused:\n{said}");
    assert!(said.contains(REFUSED) && said.contains("`AsyncBooking` version v1"), "{said}");
    let unfinished: Vec<&str> = said.lines().filter(|l| l.contains(REFUSED)).collect();
    println!("deploy: refused start said: {}", unfinished.first().unwrap_or(&""));

    // Started anyway: the v1 sagas are left as they are.
    deploy(&stack, &base, "v2-only", "start_with_missing_versions: true\n");
    stack.start_orchestrator().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut waiting = 0;
    for id in &second {
        let record = saga(&stack, id).await;
        if record["state"]["status"] == "running" {
            waiting += 1;
            assert_eq!(record["version"]["label"], "v1", "{id}");
        }
    }
    assert!(waiting > 0, "no v1 saga was left waiting for its version");
    // The admin API counts them under the version they wait for.
    let url = format!("http://127.0.0.1:{}/api/versions", stack.http);
    let uses: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    let missing: Vec<&Value> = uses.as_array().unwrap().iter().filter(|u| u["role"] == "missing").collect();
    assert_eq!(missing.len(), 1, "{uses:#}");
    assert_eq!(
        (&missing[0]["facade"], &missing[0]["version"]["label"]),
        (&Value::from("AsyncBooking"), &Value::from("v1"))
    );
    assert_eq!(missing[0]["unfinished"].as_u64(), Some(waiting), "{uses:#}");
    let (orders_before, _) = support::upstream_records(stack.order_addr(), stack.payment_addr()).await;

    // v1 registered again: they end on v1.
    stack.kill_orchestrator();
    deploy(&stack, &base, "v2", "");
    stack.start_orchestrator().await;
    ended_on(&stack, &second, "v1", 2).await;
    let (orders_after, _) = support::upstream_records(stack.order_addr(), stack.payment_addr()).await;
    for id in &second {
        let (before, after) = (orders_before.get(id).map_or(0, Vec::len), orders_after.get(id).map_or(0, Vec::len));
        assert!(after <= 1 && before <= after, "{id}: orders {before} then {after}");
    }
    println!("deploy: {} v1 sagas finished on v1 after v2's deploy; {waiting} waited for v1 to come back", first.len());
}
