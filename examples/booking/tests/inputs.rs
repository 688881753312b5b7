//! Bounded inputs: an oversized CallbackURL, flow data over its cap and a Count whose price
//! overflows are refused with INVALID_ARGUMENT before any saga or upstream effect; a config
//! value out of its range stops the binary at start with an error naming the key.

mod support;

use std::process::Command;

use booking::handler::MAX_CALLBACK_URL_LEN;
use booking::node::UNIT_PRICE;
use support::{booking, free_ports, start, test_config, with_id};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_url_over_2_kib_is_refused_and_nothing_is_stored() {
    let mut config = test_config();
    config.callbacks.attempts = 1;
    let mut s = start(config).await;
    let mut huge = booking(1, 1, false);
    huge.callback_url = format!("http://127.0.0.1:9/{}", "a".repeat(3 << 20));
    let status = s.client.handle_async_booking(with_id(Some("huge-url"), huge)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), format!("CallbackURL is {} bytes, over the limit of 2048 bytes", 19 + (3 << 20)));
    assert!(s.running.orchestrator.saga("huge-url").await.unwrap().is_none(), "no saga was stored");
    assert!(s.orders().await.records.is_empty(), "no order was made");

    // Exactly at the limit is accepted.
    let mut at_limit = booking(1, 1, false);
    let prefix = "http://127.0.0.1:9/";
    at_limit.callback_url = format!("{prefix}{}", "a".repeat(MAX_CALLBACK_URL_LEN - prefix.len()));
    s.client.handle_async_booking(with_id(Some("url-at-limit"), at_limit)).await.unwrap();
    let record = s.running.orchestrator.saga("url-at-limit").await.unwrap().unwrap();
    assert_eq!(record.callback_url.unwrap().len(), MAX_CALLBACK_URL_LEN);
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_data_over_its_cap_is_refused() {
    let mut config = test_config();
    // A booking is 75 bytes of JSON; the smallest cap allowed is 64.
    config.app.flow.max_data_bytes = 64;
    config.callbacks.attempts = 1;
    let mut s = start(config).await;
    let sync = s.client.handle_sync_booking(with_id(Some("big-sync"), booking(1, 1, false))).await.unwrap_err();
    let mut request = booking(1, 1, false);
    request.callback_url = "http://127.0.0.1:9/cb".into();
    let asynchronous = s.client.handle_async_booking(with_id(Some("big-async"), request)).await.unwrap_err();
    for (id, status) in [("big-sync", sync), ("big-async", asynchronous)] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let expected =
            format!("flow data of saga `{id}` is 75 bytes of JSON, over the limit of 64 bytes (flow.max_data_bytes)");
        assert_eq!(status.message(), expected);
        assert!(s.running.orchestrator.saga(id).await.unwrap().is_none(), "no saga {id} was stored");
    }
    assert!(s.orders().await.records.is_empty(), "no order was made");
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_whose_price_overflows_is_refused_before_any_upstream_call() {
    let mut s = start(test_config()).await;
    for count in [i64::MAX / UNIT_PRICE + 1, i64::MAX] {
        let id = format!("overflow-{count}");
        let status = s.client.handle_sync_booking(with_id(Some(&id), booking(1, count, false))).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(&format!("Count {count} is too large")), "{}", status.message());
        assert!(s.running.orchestrator.saga(&id).await.unwrap().is_none());
    }
    assert!(s.orders().await.records.is_empty(), "no order was made");
    // The largest count whose price fits goes through, and is charged exactly.
    let largest = i64::MAX / UNIT_PRICE;
    let reply = s.client.handle_sync_booking(with_id(Some("largest"), booking(1, largest, false))).await.unwrap();
    assert!(reply.into_inner().payment_id > 0);
    s.running.shutdown().await.unwrap();
}

#[test]
fn a_value_out_of_range_stops_the_binary_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("sagaflow-inputs-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let [grpc, http] = free_ports();
    let cases = [
        ("callbacks:\n  timeout_ms: 0\n", "callbacks.timeout_ms must be between 1 and 600000, got 0"),
        (
            "flow:\n  deadline_ms: 18446744073709551615\n",
            "flow.deadline_ms must be between 1 and 604800000, got 18446744073709551615",
        ),
    ];
    for (i, (settings, expected)) in cases.into_iter().enumerate() {
        let config = dir.join(format!("app{i}.yaml"));
        let listen = format!("grpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\nsaga_log: memory\n");
        std::fs::write(&config, format!("{listen}{settings}")).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_booking"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "started with {settings:?}");
        assert!(stderr.contains(expected), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
