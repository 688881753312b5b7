//! A crash during compensations, on RabbitMQ: async bookings whose payment is refused
//! (FaultInject), so that each cancels its order, with the order service taking 2 s per cancel;
//! the orchestrator (its own process) is `kill -9`ed while cancels are in flight and restarted
//! with the same config. RabbitMQ then hands the unacked rollbacks back while the restart's
//! recovery queues them again: still each saga ends once, each order is cancelled, each
//! callback is POSTed once, and the in-flight gauge ends at 0.
//!
//! A second run kills as the first saga ends: a saga whose end is recorded but whose callback
//! is not yet POSTed (or its delivery not yet recorded) when the process dies gets its callback
//! from the restart, at most once more (receivers deduplicate by `Idempotency-Key`).
//!
//! What it catches: a saga driven twice in one process. Without in-process claims, and with end
//! effects run by more than the writer of the terminal record, the redelivered rollback and the
//! recovery's re-publish would both compensate, and the callback would be POSTed twice.

mod support;

use std::time::{Duration, Instant};

use booking::proto::pb::BookingRequest;
use booking::proto::pb::booking_service_client::BookingServiceClient;
use booking::proto::upstream::SnapshotRequest;
use booking::proto::upstream::order_service_client::OrderServiceClient;
use support::process::{loopback, recovered};
use support::stack::Stack;
use support::{CallbackCounter, assert_upstreams_agree, channel, upstream_records, with_id};

const BOOKINGS: usize = 48;
/// How long the order service takes to cancel (sagas compensate 16 at a time, in waves).
const CANCEL_MS: u64 = 3_000;
/// Time left after a saga's cancel for it to record its end and POST its callback.
const SETTLE: Duration = Duration::from_millis(700);

/// When the orchestrator is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillAt {
    /// Once a wave of cancels has ended (and its sagas had `SETTLE` to end) and the next is in flight.
    BetweenEnds,
    /// As soon as the first cancel has taken effect: its saga is about to end.
    FirstEnd,
}

fn is_fault(i: usize) -> bool {
    i % 6 != 5
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_compensations_compensates_and_calls_back_once() {
    run(KillAt::BetweenEnds).await;
}

/// The end of a saga is recorded before its callback is POSTed: a saga found ended at the
/// restart with no delivery recorded is called back then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_as_a_saga_ends_still_calls_it_back() {
    run(KillAt::FirstEnd).await;
}

async fn run(kill_at: KillAt) {
    if let Err(e) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
        return sagaflow::testsuite::skip_or_fail::<()>("RabbitMQ on 127.0.0.1:5672", e).unwrap_or(());
    }
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let callbacks = CallbackCounter::start().await;
    let cancel_ms = CANCEL_MS.to_string();
    let mut stack = Stack::start(
        &format!("comp-crash-{run}"),
        &format!(
            "broker: rabbitmq\nbroker_url: amqp://guest:guest@127.0.0.1:5672/%2f\nbroker_queue_expiry_ms: 300000\n\
             saga_log: embedded\nsaga_log_url: {{dir}}/data\n\
             message_queue:\n  topic_prefix: e2e-comp-{run}\n\
             flow:\n  deadline_ms: 120000\n"
        ),
        &["--cancel-latency-ms", &cancel_ms],
        &[],
    )
    .await;
    let mut client = BookingServiceClient::new(channel(loopback(stack.grpc)).await);
    let ids: Vec<String> = (0..BOOKINGS).map(|i| format!("comp-crash-{run}-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let request =
            BookingRequest { product_id: 1, count: 1, fault_inject: is_fault(i), callback_url: callbacks.url.clone() };
        client.handle_async_booking(with_id(Some(id), request)).await.unwrap_or_else(|e| panic!("{id}: {e:?}"));
    }

    // Wait until some cancels are done and others are in flight, then kill.
    let mut orders = OrderServiceClient::new(channel(stack.order_addr()).await);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (cancelled, in_flight) = loop {
        let snapshot = orders.snapshot(SnapshotRequest {}).await.unwrap().into_inner();
        let cancelled: Vec<i64> =
            snapshot.records.iter().filter(|r| r.status == "cancelled").map(|r| r.cancelled_at_ms).collect();
        let in_flight = snapshot.counters.unwrap().in_flight;
        let since_last = now_ms() - cancelled.iter().copied().max().unwrap_or(i64::MAX);
        let now = match kill_at {
            KillAt::BetweenEnds => since_last >= SETTLE.as_millis() as i64,
            KillAt::FirstEnd => true,
        };
        if !cancelled.is_empty() && in_flight > 0 && now {
            break (cancelled.len(), in_flight);
        }
        assert!(
            Instant::now() < deadline,
            "no moment to kill ({kill_at:?}): {} cancelled, {in_flight} in flight",
            cancelled.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stack.kill_orchestrator();
    let killed = Instant::now();
    println!("compensation crash: killed with {cancelled} orders cancelled and {in_flight} cancels in flight");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.start_orchestrator().await;

    let admin = stack.admin();
    let statuses = admin.wait_ended(&ids, Duration::from_secs(120)).await;
    println!("compensation crash: every saga ended {:?} after the kill", killed.elapsed());
    let mut ended = Vec::new();
    for (i, (id, status)) in ids.iter().zip(statuses).enumerate() {
        assert_eq!(status, if is_fault(i) { "compensated" } else { "completed" }, "{id}");
        ended.push((id.clone(), status));
    }
    let compensated = assert_upstreams_agree(stack.order_addr(), stack.payment_addr(), &ended).await;

    // Each order was cancelled once: a cancel cut short by the kill may be sent once more after
    // the restart (absorbed by the service), but no saga compensates twice over.
    let (orders, _) = upstream_records(stack.order_addr(), stack.payment_addr()).await;
    let mut repeated = 0;
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| is_fault(*i)) {
        let order = &orders[id][0];
        assert_eq!(order.status, "cancelled", "{id} (booking {i})");
        assert!(order.cancel_calls <= 2, "{id}: {} cancel calls for one kill", order.cancel_calls);
        repeated += usize::from(order.cancel_calls > 1);
    }

    // Each outcome reached its callback once; killed as a saga ended, a callback POSTed just
    // before the kill may come once more from the restart, the same one.
    callbacks.wait_all(&ids, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // time for a duplicate to show
    let most = if kill_at == KillAt::FirstEnd { 2 } else { 1 };
    let mut twice = 0;
    for (i, id) in ids.iter().enumerate() {
        let received = callbacks.of(id);
        assert!((1..=most).contains(&received.len()), "{id}: callbacks {received:?}");
        assert!(received.windows(2).all(|w| w[0] == w[1]), "{id}: different callbacks {received:?}");
        assert_eq!(received[0]["status"], if is_fault(i) { "compensated" } else { "completed" }, "{id}");
        twice += usize::from(received.len() > 1);
    }

    // The restarted orchestrator counted in flight exactly the sagas it took over and ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let gauge = admin.metric("sagaflow_sagas_in_flight").await;
        if gauge == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "sagaflow_sagas_in_flight is {gauge} with every saga ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let taken_over = recovered(&stack.orchestrator_log());
    assert!(taken_over > 0, "the restart recovered no saga");
    println!(
        "compensation crash: {compensated} compensated, {taken_over} recovered at restart, {repeated} cancels repeated, \
         {twice} callbacks sent twice"
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}
