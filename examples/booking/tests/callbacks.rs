//! What a callback receiver gets: an `Idempotency-Key` (the request id) on every POST, the
//! same on a retry, and — with `callbacks.secret` — a `Sagaflow-Signature` that the receiver
//! verifies on its own, as docs/operations.md tells.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode};
use hmac::{KeyInit, Mac};
use sagaflow::SagaStatus;
use support::{booking, start, test_config, with_id};
use tokio::sync::mpsc;

const SECRET: &str = "receiver-shared-secret-0123456789";

/// One POST as the receiver saw it.
#[derive(Debug)]
struct Received {
    headers: HeaderMap,
    body: Vec<u8>,
}

/// A receiver on loopback that answers 503 to the first `failures` POSTs, then 200.
async fn receiver(failures: usize) -> (String, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(Mutex::new(0usize));
    let app = axum::Router::new().route(
        "/cb",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (tx, seen) = (tx.clone(), seen.clone());
            async move {
                let n = {
                    let mut seen = seen.lock().unwrap();
                    *seen += 1;
                    *seen
                };
                let _ = tx.send(Received { headers, body: body.to_vec() });
                if n <= failures { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/cb"), rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("a callback in time").expect("receiver up")
}

/// The receiver's check, written apart from the service's code: parse `t=..,v1=..`, recompute
/// HMAC-SHA256 over `<t>.<body>` with the shared secret, compare in constant time, and refuse
/// a timestamp more than five minutes away. Returns the timestamp.
fn verify(headers: &HeaderMap, body: &[u8], secret: &[u8]) -> Result<u64, String> {
    let header =
        headers.get("sagaflow-signature").ok_or("no Sagaflow-Signature")?.to_str().map_err(|e| e.to_string())?;
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => v1 = Some(value),
            _ => {}
        }
    }
    let (t, v1) = (t.ok_or("no t=")?, v1.ok_or("no v1=")?);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    if now.abs_diff(t) > 300 {
        return Err(format!("timestamp {t} is more than 5 minutes from {now}"));
    }
    let expected: Vec<u8> = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(v1.get(i..i + 2).ok_or("odd hex")?, 16).map_err(|e| e.to_string()))
        .collect::<Result<_, String>>()?;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&expected).map_err(|_| "signature does not match".to_owned())?;
    Ok(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_keyed_signed_and_a_retry_keeps_its_key() {
    let mut config = test_config();
    config.callbacks.secret = Some(SECRET.into());
    config.callbacks.attempts = 3;
    let mut s = start(config).await;
    let (url, mut received) = receiver(1).await;
    let mut request = booking(1, 2, false);
    request.callback_url = url;
    s.client.handle_async_booking(with_id(Some("cb-signed-1"), request)).await.unwrap();

    let first = next(&mut received).await;
    let retry = next(&mut received).await;
    for post in [&first, &retry] {
        assert_eq!(post.headers["idempotency-key"], "cb-signed-1");
        assert_eq!(post.headers["content-type"], "application/json");
        verify(&post.headers, &post.body, SECRET.as_bytes()).expect("the signature verifies");
        let body: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
        assert_eq!((body["request_id"].as_str(), body["status"].as_str()), (Some("cb-signed-1"), Some("completed")));
    }
    assert_eq!(first.body, retry.body, "a retry sends the same body");

    // Forgeries fail the same check: another secret, a changed body.
    assert!(verify(&first.headers, &first.body, b"another-secret-0123456789").is_err());
    let mut tampered = first.body.clone();
    tampered.extend_from_slice(b" ");
    assert_eq!(verify(&first.headers, &tampered, SECRET.as_bytes()), Err("signature does not match".into()));

    // The delivery is recorded with its two attempts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let record = s.running.orchestrator.saga("cb-signed-1").await.unwrap().unwrap();
        assert_eq!(record.status(), SagaStatus::Completed);
        if let Some(entry) = record.history.iter().find(|h| h.event == sagaflow::HistoryEvent::CallbackDelivered) {
            assert_eq!(entry.attempts, Some(2));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the delivery was not recorded: {:?}", record.history);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tokio::time::timeout(Duration::from_millis(300), received.recv()).await.is_err(), "no third POST");
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_callbacks_are_keyed_but_unsigned() {
    let mut s = start(test_config()).await;
    let (url, mut received) = receiver(0).await;
    let mut request = booking(1, 1, true);
    request.callback_url = url;
    s.client.handle_async_booking(with_id(Some("cb-plain-1"), request)).await.unwrap();
    let post = next(&mut received).await;
    assert_eq!(post.headers["idempotency-key"], "cb-plain-1");
    assert!(post.headers.get("sagaflow-signature").is_none());
    let body: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(body["status"], "compensated");
    s.running.shutdown().await.unwrap();
}
