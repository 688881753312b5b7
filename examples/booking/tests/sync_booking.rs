//! The sync booking end to end over gRPC, with the mocks on their own ports.

mod support;

use std::time::Duration;

use booking::app;
use booking::upstream::{OrderMock, PaymentMock};
use support::{any_port, booking, by_id, start, test_config, with_id};
use tokio_util::sync::CancellationToken;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_creates_an_order_and_a_payment() {
    let mut s = start(test_config()).await;
    let reply = s.client.handle_sync_booking(with_id(Some("req-ok"), booking(1, 2, false))).await.unwrap().into_inner();
    assert_eq!(reply.request_id, "req-ok");
    assert!(reply.order_id > 0 && reply.payment_id > 0, "{reply:?}");
    let orders = by_id(&s.orders().await);
    let payments = by_id(&s.payments().await);
    assert_eq!(orders["req-ok"].len(), 1);
    assert_eq!((orders["req-ok"][0].id, orders["req-ok"][0].status.as_str()), (reply.order_id, "active"));
    assert_eq!((payments["req-ok"][0].id, payments["req-ok"][0].status.as_str()), (reply.payment_id, "active"));
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_inject_cancels_the_order_and_aborts() {
    let mut s = start(test_config()).await;
    let status = s.client.handle_sync_booking(with_id(Some("req-fault"), booking(1, 1, true))).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("CreatePayment"), "{}", status.message());
    let orders = by_id(&s.orders().await);
    assert_eq!(orders["req-fault"][0].status, "cancelled");
    assert!(!by_id(&s.payments().await).get("req-fault").is_some_and(|p| p.iter().any(|r| r.status == "active")));
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_id_gets_the_same_answer_and_one_order() {
    let mut s = start(test_config()).await;
    let first =
        s.client.handle_sync_booking(with_id(Some("req-twice"), booking(3, 1, false))).await.unwrap().into_inner();
    let second =
        s.client.handle_sync_booking(with_id(Some("req-twice"), booking(3, 1, false))).await.unwrap().into_inner();
    assert_eq!(first, second);
    let orders = s.orders().await;
    assert_eq!(by_id(&orders)["req-twice"].len(), 1);
    assert_eq!(orders.counters.unwrap().creates, 1, "the second call never reached the upstream");
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_request_id_gets_a_generated_one() {
    let mut s = start(test_config()).await;
    let reply = s.client.handle_sync_booking(with_id(None, booking(1, 1, false))).await.unwrap().into_inner();
    assert!(uuid::Uuid::parse_str(&reply.request_id).is_ok(), "{}", reply.request_id);
    assert_eq!(by_id(&s.orders().await)[&reply.request_id].len(), 1);
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let mut s = start(test_config()).await;
    let status = s.client.handle_sync_booking(with_id(Some("bad-1"), booking(1, -1, false))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("Count"), "{}", status.message());
    let status = s.client.handle_sync_booking(with_id(Some("bad-2"), booking(0, 1, false))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("ProductID"), "{}", status.message());
    let status = s.client.handle_sync_booking(with_id(Some("bad id"), booking(1, 1, false))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Nothing reached the upstreams, and the service goes on.
    assert!(s.orders().await.records.is_empty());
    // A Count of 0, as in the call in the README of the Go project (seed), means 1.
    let reply = s.client.handle_sync_booking(with_id(Some("zero"), booking(1, 0, false))).await.unwrap().into_inner();
    assert!(reply.order_id > 0);
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_unavailable_for_a_moment_is_retried() {
    let stop = CancellationToken::new();
    let (order_addr, _o) =
        app::start_order(any_port(), OrderMock::new(Default::default()), stop.clone()).await.unwrap();
    // Reserve a port for the payment service, which is not up yet.
    let payment_addr = std::net::TcpListener::bind(any_port()).unwrap().local_addr().unwrap();
    let mut config = test_config();
    config.app.upstream.in_process = false;
    config.app.upstream.order_addr = order_addr;
    config.app.upstream.payment_addr = payment_addr;
    config.app.flow.retry.max_attempts = 8;
    let mut s = start(config).await;
    let payment = PaymentMock::new(Default::default());
    let late = {
        let (payment, stop) = (payment.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            app::start_payment(payment_addr, payment, stop).await.unwrap()
        })
    };
    let reply = s.client.handle_sync_booking(with_id(Some("late"), booking(1, 1, false))).await.unwrap().into_inner();
    assert!(reply.payment_id > 0);
    late.await.unwrap();
    let record = s.running.orchestrator.saga("late").await.unwrap().unwrap();
    let payment_step =
        record.history.iter().find(|h| h.event == sagaflow::HistoryEvent::StepCompleted && h.step == Some(1)).unwrap();
    assert!(payment_step.attempts.unwrap() > 1, "the payment needed retries: {payment_step:?}");
    assert_eq!(payment.snapshot().records.len(), 1);
    s.running.shutdown().await.unwrap();
    stop.cancel();
}
