//! The admin HTTP API: sagas by id and filter, retry, and access control.

mod support;

use std::net::SocketAddr;

use booking::config::Config;
use support::{booking, start, test_config, with_id};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_are_found_by_request_id_and_status() {
    let mut s = start(test_config()).await;
    s.client.handle_sync_booking(with_id(Some("adm-ok"), booking(1, 1, false))).await.unwrap();
    s.client.handle_sync_booking(with_id(Some("adm-fault"), booking(1, 1, true))).await.unwrap_err();
    let base = format!("http://{}", s.running.http_addr);
    let http = reqwest::Client::new();

    let record: serde_json::Value =
        http.get(format!("{base}/api/sagas/adm-fault")).send().await.unwrap().json().await.unwrap();
    assert_eq!(record["state"]["status"], "compensated");
    assert_eq!(record["state"]["failure"]["node"], "CreatePayment");

    let compensated: Vec<serde_json::Value> =
        http.get(format!("{base}/api/sagas?status=compensated")).send().await.unwrap().json().await.unwrap();
    assert_eq!(compensated.len(), 1);
    assert_eq!(compensated[0]["request_id"], "adm-fault");

    let missing = http.get(format!("{base}/api/sagas/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let not_stuck = http.post(format!("{base}/api/sagas/adm-ok/retry")).send().await.unwrap();
    assert_eq!(not_stuck.status(), 409);
    let flows: Vec<serde_json::Value> =
        http.get(format!("{base}/api/flows")).send().await.unwrap().json().await.unwrap();
    assert_eq!(flows.len(), 3);
    assert_eq!(flows[0]["nodes"], serde_json::json!(["CreateOrder", "CreatePayment"]));
    s.running.shutdown().await.unwrap();
}

#[test]
fn a_non_loopback_admin_bind_needs_a_token() {
    let mut config = Config { http_listen: SocketAddr::from(([0, 0, 0, 0], 10090)), ..Config::default() };
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("admin_token"), "{err}");
    config.admin_token = Some("s3cret".into());
    config.validate().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_requests_without_it_are_refused() {
    let mut config = test_config();
    config.admin_token = Some("s3cret".into());
    let s = start(config).await;
    let base = format!("http://{}", s.running.http_addr);
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("{base}/api/flows")).send().await.unwrap().status(), 401);
    let wrong = http.get(format!("{base}/api/flows")).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let right = http.get(format!("{base}/api/flows")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(right.status(), 200);
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    s.running.shutdown().await.unwrap();
}

/// The Fetch standard's bad ports (<https://fetch.spec.whatwg.org/#port-blocking>), which
/// Chromium and Firefox refuse to open with `ERR_UNSAFE_PORT`.
const BROWSER_BLOCKED_PORTS: [u16; 82] = [
    1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102, 103, 104, 109, 110,
    111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465, 512, 513, 514, 515, 526, 530, 531, 532,
    540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723, 2049, 3659, 4045, 4190, 5060, 5061,
    6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080,
];

#[test]
fn the_default_admin_port_is_one_browsers_open() {
    let default = Config::default().http_listen;
    assert_eq!(default, SocketAddr::from(([127, 0, 0, 1], 10090)));
    assert!(!BROWSER_BLOCKED_PORTS.contains(&default.port()), "{default} is on the browsers' blocked list");
    let sample = Config::from_yaml(include_str!("../../../deployment/local/app.yaml")).unwrap();
    assert_eq!(sample.http_listen, default, "deployment/local/app.yaml and the built-in default differ");
}
