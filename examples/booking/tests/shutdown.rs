//! SIGTERM under load: the orchestrator (its own process, on RabbitMQ and the embedded log) is
//! sent SIGTERM while sync, async and throttled bookings run, some rolling back through a slow
//! cancel. It exits within 10 s; started again with the same config, it ends every saga it had
//! in flight: none is lost, every caller gets its answer, every callback arrives once.
//!
//! The shutdown releases callers waiting for a saga's end; without that, throttled callers and
//! sync sagas waiting for their rollback would hold the drain for the whole `wait_timeout`
//! (30 s), past the 10 s this test allows.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use booking::proto::pb::BookingRequest;
use support::process::recovered;
use support::stack::Stack;
use support::{Call, CallbackCounter, assert_upstreams_agree, book_until_answered};

const BOOKINGS: usize = 600;
const CALLERS: usize = 24;
/// How long the orchestrator may take to drain.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_within_10_s_and_the_next_start_ends_what_was_in_flight() {
    if let Err(e) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
        return sagaflow::testsuite::skip_or_fail::<()>("RabbitMQ on 127.0.0.1:5672", e).unwrap_or(());
    }
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let callbacks = CallbackCounter::start().await;
    let mut stack = Stack::start(
        &format!("drain-{run}"),
        &format!(
            "broker: rabbitmq\nbroker_url: amqp://guest:guest@127.0.0.1:5672/%2f\nbroker_queue_expiry_ms: 300000\n\
             saga_log: embedded\nsaga_log_url: {{dir}}/data\n\
             message_queue:\n  topic_prefix: e2e-drain-{run}\n  topics:\n\
             \x20   - {{id: ThrottlingBooking.CreateOrder, is_throttling: true, concurrency: 4}}\n\
             \x20   - {{id: ThrottlingBooking.CreatePayment, is_throttling: true, concurrency: 4}}\n\
             \x20   - {{id: ThrottlingBooking.rollback, is_throttling: true, concurrency: 4}}\n\
             flow:\n  deadline_ms: 120000\n"
        ),
        &["--cancel-latency-ms", "1000"],
        &["--latency-ms", "300"],
    )
    .await;
    let grpc = stack.grpc;
    let jobs: Arc<Vec<(String, Call, bool)>> = Arc::new(
        (0..BOOKINGS)
            .map(|i| (format!("drain-{run}-{i}"), [Call::Sync, Call::Async, Call::Throttling][i % 3], i % 5 == 2))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let (next, jobs, url) = (next.clone(), jobs.clone(), callbacks.url.clone());
        callers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, call, fault)) = jobs.get(i) else { return answers };
                let callback_url = if *call == Call::Async { url.clone() } else { String::new() };
                let request = BookingRequest { product_id: 1, count: 1, fault_inject: *fault, callback_url };
                let answer = book_until_answered(grpc, id, *call, request, Duration::from_secs(240)).await;
                answers.push((id.clone(), *call, *fault, answer));
            }
        }));
    }

    // SIGTERM a third of the way in, while every kind of work is in flight.
    let deadline = Instant::now() + Duration::from_secs(120);
    while next.load(Ordering::Relaxed) < BOOKINGS / 3 {
        assert!(Instant::now() < deadline, "the load stalled at {}", next.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = stack.terminate_orchestrator(DRAIN_LIMIT).await;
    let Some(drained) = drained else {
        panic!(
            "the orchestrator did not exit within {DRAIN_LIMIT:?} of SIGTERM; see {}",
            stack.orchestrator_log().display()
        )
    };
    println!("shutdown: drained in {drained:?} (SIGTERM at booking {})", next.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restart = Instant::now();
    stack.start_orchestrator().await;

    let mut answers = Vec::new();
    for caller in callers {
        answers.extend(caller.await.unwrap());
    }
    let ids: Vec<String> = answers.iter().map(|(id, ..)| id.clone()).collect();
    let statuses = stack.admin().wait_ended(&ids, Duration::from_secs(120)).await;
    println!("shutdown: every saga ended {:?} after the restart", restart.elapsed());
    let mut ended = Vec::new();
    for ((id, call, fault, answer), status) in answers.iter().zip(statuses) {
        let answer = answer.as_ref().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, if *fault { "compensated" } else { "completed" }, "{id}");
        if *call != Call::Async {
            assert_eq!(*answer, !fault, "{id}: the caller's answer agrees with the record");
        }
        ended.push((id.clone(), status));
    }
    let compensated = assert_upstreams_agree(stack.order_addr(), stack.payment_addr(), &ended).await;

    let async_ids: Vec<String> =
        answers.iter().filter(|(_, call, ..)| *call == Call::Async).map(|(id, ..)| id.clone()).collect();
    callbacks.wait_all(&async_ids, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // time for a duplicate to show
    for id in &async_ids {
        assert_eq!(callbacks.of(id).len(), 1, "{id}: callbacks {:?}", callbacks.of(id));
    }
    let taken_over = recovered(&stack.orchestrator_log());
    println!("shutdown: {} sagas, {compensated} compensated, {taken_over} resumed by the next start", ended.len());
}
