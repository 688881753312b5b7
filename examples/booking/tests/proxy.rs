//! `booking proxy`, the benchmark's do-nothing ceiling, makes the saga's calls and answers as
//! the orchestrator does, so `bench/ceiling.sh` compares like with like.

mod support;

use booking::app;
use booking::proto::pb::booking_service_client::BookingServiceClient;
use booking::upstream::{OrderMock, PaymentMock};
use support::{any_port, booking, by_id, channel, with_id};
use tokio_util::sync::CancellationToken;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_books_rolls_back_a_refused_payment_and_serves_only_the_sync_call() {
    let stop = CancellationToken::new();
    let (orders, payments) = (OrderMock::new(Default::default()), PaymentMock::new(Default::default()));
    let (order_addr, _o) = app::start_order(any_port(), orders.clone(), stop.clone()).await.unwrap();
    let (payment_addr, _p) = app::start_payment(any_port(), payments.clone(), stop.clone()).await.unwrap();
    let (proxy_addr, proxy) = app::start_proxy(any_port(), order_addr, payment_addr, stop.clone()).await.unwrap();
    let mut client = BookingServiceClient::new(channel(proxy_addr).await);

    let reply = client.handle_sync_booking(with_id(Some("p-ok"), booking(1, 2, false))).await.unwrap().into_inner();
    assert_eq!(reply.request_id, "p-ok");
    let order = &by_id(&orders.snapshot())["p-ok"];
    let payment = &by_id(&payments.snapshot())["p-ok"];
    assert_eq!((order.len(), order[0].id, order[0].status.as_str()), (1, reply.order_id, "active"));
    assert_eq!((payment.len(), payment[0].id, payment[0].status.as_str()), (1, reply.payment_id, "active"));

    let refused = client.handle_sync_booking(with_id(Some("p-fault"), booking(1, 1, true))).await.unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert_eq!(by_id(&orders.snapshot())["p-fault"][0].status, "cancelled");

    let no_id = client.handle_sync_booking(with_id(None, booking(1, 1, false))).await.unwrap_err();
    assert_eq!(no_id.code(), Code::InvalidArgument);
    assert!(no_id.message().contains("x-request-id"), "{}", no_id.message());
    let other = client.handle_async_booking(with_id(Some("p-async"), booking(1, 1, false))).await.unwrap_err();
    assert_eq!(other.code(), Code::Unimplemented);

    stop.cancel();
    proxy.await.unwrap().unwrap();
}
