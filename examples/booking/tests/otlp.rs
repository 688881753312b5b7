//! Traces reach an OTLP/HTTP collector when `otlp_endpoint` is set: the
//! booking binary runs as its own process and exports to a receiver the test runs.

mod support;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use booking::proto::pb::booking_service_client::BookingServiceClient;
use support::{booking, channel, free_ports, with_id};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_spans_are_exported_over_otlp() {
    // The collector: keeps every body POSTed to /v1/traces.
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body.to_vec());
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let [grpc, http, order, payment] = free_ports();
    let dir = std::env::temp_dir().join(format!("sagaflow-otlp-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("app.yaml");
    std::fs::write(
        &config,
        format!(
            "grpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\nsaga_log: memory\n\
             otlp_endpoint: http://{collector}/v1/traces\n\
             upstream:\n  order_addr: 127.0.0.1:{order}\n  payment_addr: 127.0.0.1:{payment}\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_booking"))
        .args(["--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", grpc)).await.is_err() {
        assert!(child.try_wait().unwrap().is_none(), "booking exited early");
        assert!(Instant::now() < deadline, "booking did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = BookingServiceClient::new(channel(([127, 0, 0, 1], grpc).into()).await);
    client.handle_sync_booking(with_id(Some("otlp-traced-1"), booking(1, 1, false))).await.unwrap();

    // SIGTERM: a graceful stop flushes the batched spans.
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "booking exited with {status}");
    let _ = std::fs::remove_dir_all(&dir);

    let bodies = bodies.lock().unwrap();
    assert!(!bodies.is_empty(), "no OTLP export arrived");
    let all: Vec<u8> = bodies.concat();
    let has = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"sagaflow-booking"), "the service name is exported");
    assert!(has(b"saga"), "the saga span is exported");
    assert!(has(b"otlp-traced-1"), "spans carry the request id");
}
