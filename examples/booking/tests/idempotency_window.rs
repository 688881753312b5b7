//! A request id stays used after retention prunes its saga: a retry gets an error naming the
//! recorded outcome, never a second saga (a second order, a second payment).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use booking::proto::pb::booking_service_client::BookingServiceClient;
use booking::proto::upstream::SnapshotRequest;
use booking::proto::upstream::order_service_client::OrderServiceClient;
use booking::proto::upstream::payment_service_client::PaymentServiceClient;
use support::{booking, by_id, channel, free_ports, start, test_config, with_id};
use tonic::{Code, Status};

/// The error a retry of a pruned request id gets.
fn assert_pruned(status: &Status, request_id: &str, outcome: &str) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let message = status.message();
    for part in [request_id, outcome, "pruned"] {
        assert!(message.contains(part), "the message names `{part}`: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_call_with_a_pruned_request_id_is_refused_and_runs_nothing() {
    let mut config = test_config();
    // The in-memory log prunes as each saga ends: with none kept, at once.
    config.retention.max_ended = 0;
    let mut s = start(config).await;
    let paid = s.client.handle_sync_booking(with_id(Some("paid"), booking(1, 2, false))).await.unwrap().into_inner();
    assert!(paid.order_id > 0 && paid.payment_id > 0, "{paid:?}");
    let refused = s.client.handle_sync_booking(with_id(Some("refunded"), booking(1, 1, true))).await.unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert_eq!(s.running.orchestrator.saga("paid").await.unwrap(), None, "the record was pruned");
    let (orders_before, payments_before) = (s.orders().await.counters, s.payments().await.counters);

    let retried = s.client.handle_sync_booking(with_id(Some("paid"), booking(1, 2, false))).await.unwrap_err();
    assert_pruned(&retried, "paid", "completed");
    let retried = s.client.handle_throttling_booking(with_id(Some("paid"), booking(1, 2, false))).await.unwrap_err();
    assert_pruned(&retried, "paid", "completed");
    let retried = s.client.handle_async_booking(with_id(Some("paid"), booking(1, 2, false))).await.unwrap_err();
    assert_pruned(&retried, "paid", "completed");
    let retried = s.client.handle_sync_booking(with_id(Some("refunded"), booking(1, 1, false))).await.unwrap_err();
    assert_pruned(&retried, "refunded", "compensated");

    let (orders, payments) = (s.orders().await, s.payments().await);
    assert_eq!(by_id(&orders)["paid"].len(), 1, "one order for `paid`");
    assert_eq!(by_id(&payments)["paid"].len(), 1, "one payment for `paid`");
    assert_eq!(orders.counters, orders_before, "no retry reached the order service");
    assert_eq!(payments.counters, payments_before, "no retry reached the payment service");
    assert_eq!(s.running.orchestrator.saga("paid").await.unwrap(), None, "no second saga was started");
    s.running.shutdown().await.unwrap();
}

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The booking demo, all in one process, on `config`; its output goes to `log`.
async fn start_booking(config: &Path, log: &Path, grpc: u16) -> Proc {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_booking"))
        .args(["--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("starting the booking demo");
    let mut proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], grpc))).await.is_err() {
        if let Ok(Some(status)) = proc.0.try_wait() {
            panic!("the booking demo exited with {status}; see {}", log.display());
        }
        assert!(Instant::now() < deadline, "the booking demo did not listen within 30 s; see {}", log.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proc
}

/// The default log, the embedded one, prunes when it opens: a booking made before a restart is
/// refused after it, from the tombstone in the file, with nothing sent upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_log_refuses_a_pruned_request_id_after_a_restart() {
    let dir: PathBuf = std::env::temp_dir().join(format!("sagaflow-tombstones-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let [grpc, http, order, payment] = free_ports();
    let config = dir.join("app.yaml");
    std::fs::write(
        &config,
        format!(
            "grpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\n\
             saga_log: embedded\nsaga_log_url: {data}\n\
             retention:\n  max_age_secs: 3600\n  max_ended: 0\n  tombstone_age_secs: 3600\n  max_tombstones: 1000\n\
             upstream:\n  in_process: true\n  order_addr: 127.0.0.1:{order}\n  payment_addr: 127.0.0.1:{payment}\n",
            data = dir.join("data").display()
        ),
    )
    .unwrap();
    let log = dir.join("booking.log");
    let grpc_addr = SocketAddr::from(([127, 0, 0, 1], grpc));

    let first = start_booking(&config, &log, grpc).await;
    let mut client = BookingServiceClient::new(channel(grpc_addr).await);
    let paid = client.handle_sync_booking(with_id(Some("paid"), booking(4, 1, false))).await.unwrap().into_inner();
    assert!(paid.order_id > 0, "{paid:?}");
    drop(first);

    let _second = start_booking(&config, &log, grpc).await;
    let mut client = BookingServiceClient::new(channel(grpc_addr).await);
    // The writer prunes as it starts; until it has, a retry gets the recorded answer (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    let order_addr = SocketAddr::from(([127, 0, 0, 1], order));
    let refused = loop {
        match client.handle_sync_booking(with_id(Some("paid"), booking(4, 1, false))).await {
            Ok(reply) => {
                let orders = OrderServiceClient::new(channel(order_addr).await).snapshot(SnapshotRequest {}).await;
                let orders = orders.unwrap().into_inner();
                assert!(orders.records.is_empty(), "the retry ran a second saga: {:?}", orders.records);
                assert_eq!(reply.into_inner(), paid, "before the prune, the recorded answer");
            }
            Err(status) => break status,
        }
        assert!(Instant::now() < deadline, "the record was not pruned within 20 s of the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_pruned(&refused, "paid", "completed");

    let orders =
        OrderServiceClient::new(channel(order_addr).await).snapshot(SnapshotRequest {}).await.unwrap().into_inner();
    let payments = PaymentServiceClient::new(channel(SocketAddr::from(([127, 0, 0, 1], payment))).await)
        .snapshot(SnapshotRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(orders.counters.unwrap().creates, 0, "the retry created no order: {:?}", orders.records);
    assert_eq!(payments.counters.unwrap().creates, 0, "the retry took no payment: {:?}", payments.records);
    let saga = reqwest::get(format!("http://127.0.0.1:{http}/api/sagas/paid")).await.unwrap();
    assert_eq!(saga.status(), 404, "the pruned saga's record is gone, and no new one was started");
    let _ = std::fs::remove_dir_all(&dir);
}
