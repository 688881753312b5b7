//! Saga log outages under load: the booking service (its own process) on a private PostgreSQL
//! cluster, fed async bookings (with callbacks) and throttled ones, some fault-injected. Mid-load
//! the whole cluster is first frozen for 20 s (SIGSTOP: connections stay open, nothing answers),
//! then, after a few seconds back, stopped for 30 s (connections cut, new ones refused: the log
//! answers "unavailable", and a hop that gave up on it would use up its deliveries within the
//! outage). Every booking gets its answer, every saga ends, nothing is dead-lettered, and every
//! async booking's callback arrives, once.
//!
//! What it catches: log writes that fail rather than wait out an unavailable log. Hops nacked
//! during the stop would use up their deliveries and be dead-lettered, and their sagas would
//! never end.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use booking::proto::pb::BookingRequest;
use support::postgres::PrivatePostgres;
use support::process::{Admin, Proc, Scratch, booking_bin, log_lines, loopback};
use support::{Call, CallbackCounter, assert_upstreams_agree, book_until_answered, free_ports};

/// Load alone between the outages.
const BETWEEN: Duration = Duration::from_secs(4);
const FROZEN: Duration = Duration::from_secs(20);
const STOPPED: Duration = Duration::from_secs(30);
/// One booking every this often.
const PACE: Duration = Duration::from_millis(80);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_wait_out_a_frozen_then_stopped_postgres_log_and_all_end_once() {
    let postgres = match PrivatePostgres::start() {
        Ok(pg) => pg,
        Err(e) => return sagaflow::testsuite::skip_or_fail::<()>("a private PostgreSQL cluster", e).unwrap_or(()),
    };
    let scratch = Scratch::new("log-outage");
    let callbacks = CallbackCounter::start().await;
    let [grpc, http, order, payment] = free_ports();
    let config = scratch.write(
        "app.yaml",
        &format!(
            "pod_id: log-outage\ngrpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\n\
             broker: memory\nsaga_log: postgres\nsaga_log_url: {}\n\
             upstream:\n  in_process: true\n  order_addr: 127.0.0.1:{order}\n  payment_addr: 127.0.0.1:{payment}\n\
             \x20 order: {{latency_ms: 20}}\n  payment: {{latency_ms: 20}}\n\
             message_queue:\n  topics:\n\
             \x20   - {{id: ThrottlingBooking.CreateOrder, is_throttling: true, concurrency: 8}}\n\
             \x20   - {{id: ThrottlingBooking.CreatePayment, is_throttling: true, concurrency: 8}}\n\
             \x20   - {{id: ThrottlingBooking.rollback, is_throttling: true, concurrency: 8}}\n\
             flow:\n  deadline_ms: 120000\n\
             wait_timeout_ms: 120000\n",
            postgres.url()
        ),
    );
    let log = scratch.path("booking.log");
    let mut service = Proc::spawn("booking", &booking_bin(), &["--config", config.to_str().unwrap()], &log);
    service.wait_port(grpc).await;
    let admin = Admin::new(http);

    // A steady stream of bookings across the outage; each caller retries with its request id.
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (stop, url) = (stop.clone(), callbacks.url.clone());
        tokio::spawn(async move {
            let mut bookings = Vec::new();
            let mut tick = tokio::time::interval(PACE);
            for i in 0.. {
                tick.tick().await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let call = if i % 2 == 0 { Call::Async } else { Call::Throttling };
                let fault = i % 5 == 4;
                let id = format!("log-outage-{run}-{i}");
                let callback_url = if call == Call::Async { url.clone() } else { String::new() };
                let request = BookingRequest { product_id: 1, count: 1, fault_inject: fault, callback_url };
                let caller = tokio::spawn({
                    let id = id.clone();
                    async move { book_until_answered(grpc, &id, call, request, Duration::from_secs(240)).await }
                });
                bookings.push((id, call, fault, caller));
            }
            bookings
        })
    };
    tokio::time::sleep(BETWEEN).await;
    postgres.freeze();
    let frozen_at = Instant::now();
    tokio::time::sleep(FROZEN).await;
    postgres.thaw();
    println!("log outage: PostgreSQL frozen for {:?}", frozen_at.elapsed());
    tokio::time::sleep(BETWEEN).await;
    postgres.stop().unwrap();
    let stopped_at = Instant::now();
    tokio::time::sleep(STOPPED).await;
    postgres.start_server().unwrap();
    println!("log outage: PostgreSQL stopped for {:?}", stopped_at.elapsed());
    tokio::time::sleep(BETWEEN).await;
    stop.store(true, Ordering::Relaxed);
    let bookings = producer.await.unwrap();

    let mut answers = Vec::new();
    for (id, call, fault, caller) in bookings {
        let answer = caller.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        answers.push((id, call, fault, answer));
    }
    let thawed = Instant::now();
    let ids: Vec<String> = answers.iter().map(|(id, ..)| id.clone()).collect();
    let statuses = admin.wait_ended(&ids, Duration::from_secs(120)).await;
    println!("log outage: {} bookings answered and ended {:?} after the last answer", ids.len(), thawed.elapsed());
    let mut ended = Vec::new();
    for ((id, call, fault, answer), status) in answers.iter().zip(statuses) {
        let expected = if *fault { "compensated" } else { "completed" };
        assert_eq!(status, expected, "{id}");
        if *call == Call::Throttling {
            assert_eq!(*answer, !fault, "{id}: the caller's answer agrees with the record");
        }
        ended.push((id.clone(), status));
    }

    // Every async booking's outcome was POSTed to its callback, once.
    let async_ids: Vec<String> =
        answers.iter().filter(|(_, c, ..)| *c == Call::Async).map(|(id, ..)| id.clone()).collect();
    callbacks.wait_all(&async_ids, Duration::from_secs(60)).await;
    for (id, _, fault, _) in answers.iter().filter(|(_, c, ..)| *c == Call::Async) {
        let received = callbacks.of(id);
        assert_eq!(received.len(), 1, "{id}: callbacks {received:?}");
        let expected = if *fault { "compensated" } else { "completed" };
        assert_eq!(received[0]["status"], expected, "{id}");
    }

    // The outage was felt, and nothing was dead-lettered for it. Whether a saga's write waited
    // it out (retried) or the service refused new bookings meanwhile (health NOT_SERVING, the
    // callers retrying) depends on where each saga was when the database went away.
    let retries = admin.metric("sagaflow_log_retries_total").await;
    let refused = log_lines(&log, "health NOT_SERVING");
    assert!(retries > 0.0 || refused > 0, "the service never noticed the outage; see {}", log.display());
    assert_eq!(admin.metric("sagaflow_dead_lettered_total").await, 0.0);
    assert_eq!(log_lines(&log, "dead-lettered"), 0, "a message was dead-lettered; see {}", log.display());
    assert_eq!(admin.metric("sagaflow_sagas_in_flight").await, 0.0, "every saga counted in flight ended");
    let compensated = assert_upstreams_agree(loopback(order), loopback(payment), &ended).await;
    println!(
        "log outage: {} sagas, {compensated} compensated, {retries} log writes retried, {refused} times NOT_SERVING",
        ended.len()
    );
    assert!(service.is_running(), "the booking service exited");
    drop(service);
    drop(postgres);
}
