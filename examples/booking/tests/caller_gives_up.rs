//! Callers who give up: 200 sync bookings, each called with a 50 ms gRPC deadline while the
//! payment service takes 500 ms, against the booking service as its own process. Every saga
//! still ends (completed, or compensated when fault-injected) without a restart; asking again
//! with the same request id returns that outcome and books nothing more; and the upstreams hold
//! no order without its payment or its cancellation.
//!
//! What it catches: a saga tied to its caller's call. Cancelled with the call, the sagas would
//! stay `running` with their order taken and no payment.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use booking::proto::pb::BookingRequest;
use booking::proto::pb::booking_service_client::BookingServiceClient;
use booking::proto::upstream::SnapshotRequest;
use booking::proto::upstream::order_service_client::OrderServiceClient;
use booking::proto::upstream::payment_service_client::PaymentServiceClient;
use support::process::{Admin, Proc, Scratch, booking_bin, loopback};
use support::{by_id, channel, free_ports, with_id};
use tonic::Code;

const BOOKINGS: usize = 200;
/// Connections the calls are spread over.
const CONNECTIONS: usize = 20;
/// One call every this often.
const PACE: Duration = Duration::from_millis(5);

fn is_fault(i: usize) -> bool {
    i % 10 == 3
}

fn booking_request(i: usize) -> BookingRequest {
    BookingRequest { product_id: 1, count: 1, fault_inject: is_fault(i), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_whose_callers_gave_up_still_end_and_keep_their_outcome() {
    let scratch = Scratch::new("gives-up");
    let [grpc, http, order, payment] = free_ports();
    let config = scratch.write(
        "app.yaml",
        &format!(
            "pod_id: gives-up\ngrpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\n\
             broker: memory\nsaga_log: embedded\nsaga_log_url: {}\n\
             upstream:\n  in_process: true\n  order_addr: 127.0.0.1:{order}\n  payment_addr: 127.0.0.1:{payment}\n\
             \x20 payment: {{latency_ms: 500}}\n",
            scratch.path("data").display()
        ),
    );
    let mut service =
        Proc::spawn("booking", &booking_bin(), &["--config", config.to_str().unwrap()], &scratch.path("booking.log"));
    service.wait_port(grpc).await;
    // Callers on several connections: h2 closes a connection on which more than 20 calls were
    // given up before the server took them (its guard against reset floods).
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(BookingServiceClient::new(channel(loopback(grpc)).await));
    }
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let ids: Vec<String> = (0..BOOKINGS).map(|i| format!("gives-up-{run}-{i}")).collect();

    // Every caller gives up after 50 ms, long before the payment answers.
    let mut calls = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut client = clients[i % CONNECTIONS].clone();
        let mut request = with_id(Some(id), booking_request(i));
        request.set_timeout(Duration::from_millis(50));
        calls.push(tokio::spawn(async move { client.handle_sync_booking(request).await }));
        tokio::time::sleep(PACE).await;
    }
    for (id, call) in ids.iter().zip(calls) {
        let status = call.await.unwrap().expect_err("no booking can finish within 50 ms");
        assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{id}: {status:?}");
    }

    // Without a restart, every saga that started ends as its request asked. (A call given up
    // before the service took it started nothing; that is checked below.)
    let admin = Admin::new(http);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut started = Vec::new();
    for id in &ids {
        if admin.status(id).await.is_some() {
            started.push(id.clone());
        }
    }
    let statuses = admin.wait_ended(&started, Duration::from_secs(60)).await;
    let ended: HashMap<&str, &str> =
        started.iter().map(String::as_str).zip(statuses.iter().map(String::as_str)).collect();
    println!("caller gives up: {} of {BOOKINGS} calls started a saga before their caller gave up", started.len());
    assert!(
        started.len() >= BOOKINGS / 4,
        "only {} of {BOOKINGS} calls reached the service: the test proves little; see {}",
        started.len(),
        scratch.path("booking.log").display()
    );
    for (i, id) in ids.iter().enumerate() {
        match ended.get(id.as_str()) {
            Some(status) => assert_eq!(*status, if is_fault(i) { "compensated" } else { "completed" }, "{id}"),
            None => assert!(admin.status(id).await.is_none(), "{id} started late"),
        }
    }

    // The upstreams agree: each order has its payment, or is cancelled with no payment taken.
    let orders = by_id(
        &OrderServiceClient::new(channel(loopback(order)).await)
            .snapshot(SnapshotRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    let payments = by_id(
        &PaymentServiceClient::new(channel(loopback(payment)).await)
            .snapshot(SnapshotRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    let mut booked: HashMap<&str, (i64, i64)> = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        let order = orders.get(id).map(Vec::as_slice).unwrap_or_default();
        let payment = payments.get(id).map(Vec::as_slice).unwrap_or_default();
        if !ended.contains_key(id.as_str()) {
            assert!(order.is_empty() && payment.is_empty(), "{id} booked without a saga: {order:?} {payment:?}");
            continue;
        }
        assert_eq!(order.len(), 1, "{id}: one order record, got {order:?}");
        assert!(payment.len() <= 1, "{id}: {payment:?}");
        let payment_active = payment.first().is_some_and(|p| p.status == "active");
        if is_fault(i) {
            assert_eq!(order[0].status, "cancelled", "{id}: a compensated booking's order");
            assert!(!payment_active, "{id}: a compensated booking took a payment: {payment:?}");
        } else {
            assert_eq!(order[0].status, "active", "{id}");
            assert!(payment_active, "{id}: an order without its payment: {payment:?}");
            booked.insert(id, (order[0].id, payment[0].id));
        }
    }

    // Asking again with the same request id returns the recorded outcome and books nothing more
    // (a request id whose first call started nothing is booked now, once).
    for (i, id) in ids.iter().enumerate() {
        let answer = clients[0].clone().handle_sync_booking(with_id(Some(id), booking_request(i))).await;
        if is_fault(i) {
            let status = answer.expect_err(id);
            assert_eq!(status.code(), Code::Aborted, "{id}: {status:?}");
        } else {
            let reply = answer.unwrap_or_else(|e| panic!("{id}: {e:?}")).into_inner();
            if let Some(first) = booked.get(id.as_str()) {
                assert_eq!((reply.order_id, reply.payment_id), *first, "{id}");
            }
        }
    }
    let counters = OrderServiceClient::new(channel(loopback(order)).await)
        .snapshot(SnapshotRequest {})
        .await
        .unwrap()
        .into_inner()
        .counters
        .unwrap();
    assert_eq!(counters.creates, BOOKINGS as u64, "one order per request id");
    assert_eq!(admin.metric("sagaflow_sagas_in_flight").await, 0.0, "every saga counted in flight ended");
    assert!(service.is_running(), "the booking service exited");
}
