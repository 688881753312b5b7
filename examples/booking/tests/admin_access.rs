//! Who may use the admin API and the callbacks, against the `booking` binary as its own
//! process: a request without the token must be same-origin (its `Host` the bound address,
//! its `Origin` that host), and no callback may target the orchestrator's own ports.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use booking::proto::pb::BookingRequest;
use booking::proto::pb::booking_service_client::BookingServiceClient;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HOST, ORIGIN};
use support::{callback_server, channel, free_ports, with_id};
use tonic::Code;

const TOKEN: &str = "s3cret-access";

/// The `booking` binary, running on its own ports; killed when dropped.
struct Booking {
    child: Child,
    dir: PathBuf,
    grpc: u16,
    http: u16,
}

impl Drop for Booking {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Writes an `app.yaml` with `extra` appended and starts `booking` on it, in-memory and with
/// the mocks in process, on ports of its own. The environment is not passed on.
fn spawn(extra: &str, env: &[(&str, &str)]) -> (Booking, PathBuf) {
    let dir = std::env::temp_dir().join(format!("sagaflow-access-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let [grpc, http, order, payment] = free_ports();
    let config = dir.join("app.yaml");
    std::fs::write(
        &config,
        format!(
            "grpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\nsaga_log: memory\n\
             upstream:\n  order_addr: 127.0.0.1:{order}\n  payment_addr: 127.0.0.1:{payment}\n{extra}"
        ),
    )
    .unwrap();
    let log = dir.join("booking.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_booking"))
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("RUST_LOG", "info,h2=warn,tower=warn")
        .envs(env.iter().copied())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("booking starts");
    (Booking { child, dir, grpc, http }, log)
}

/// Starts `booking` and waits until both its servers listen.
async fn start(extra: &str, env: &[(&str, &str)]) -> Booking {
    let (mut booking, log) = spawn(extra, env);
    let deadline = Instant::now() + Duration::from_secs(30);
    for port in [booking.grpc, booking.http] {
        while tokio::net::TcpStream::connect(addr(port)).await.is_err() {
            if let Ok(Some(status)) = booking.child.try_wait() {
                panic!("booking exited with {status}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "booking did not listen on {port} within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    booking
}

/// Sends `method path` to `booking`'s admin port with the headers given, as any client could
/// (a browser fills in `Host` and `Origin` itself); returns the status and body.
async fn send(booking: &Booking, method: &str, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = reqwest::Client::new().request(method, format!("http://127.0.0.1:{}{path}", booking.http));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_same_origin_requests_are_taken() {
    let booking = start("", &[]).await;
    let ours = format!("127.0.0.1:{}", booking.http);
    let ours_origin = format!("http://{ours}");
    let local = format!("localhost:{}", booking.http);
    let local_origin = format!("http://{local}");
    let rebound = format!("rebound.example:{}", booking.http);
    let retry = "/api/sagas/no-such-saga/retry";

    // A foreign Origin: a cross-site form or script.
    for origin in ["http://evil.example", "null", &format!("http://127.0.0.1:{}", booking.grpc)] {
        let (status, body) = send(&booking, "POST", retry, &[(ORIGIN.as_str(), origin)]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "Origin {origin}: {body}");
        assert!(body.contains(&format!("Origin `{origin}`")) && body.contains("cross-site"), "{body}");
    }
    // The page's Origin under another name than the Host asked for.
    let (status, body) = send(&booking, "POST", retry, &[(ORIGIN.as_str(), &local_origin)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // A foreign Host: a DNS-rebound name; reads are refused as well as changes.
    for (method, path) in [("POST", retry), ("GET", "/api/flows"), ("GET", "/api/sagas"), ("GET", "/metrics")] {
        let (status, body) = send(&booking, method, path, &[(HOST.as_str(), &rebound)]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
        assert!(body.contains(&format!("Host `{rebound}`")) && body.contains(&ours), "{body}");
    }
    let (status, _) = send(&booking, "DELETE", retry, &[(HOST.as_str(), &rebound)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The right address on another port is another server.
    let (status, _) =
        send(&booking, "GET", "/api/flows", &[(HOST.as_str(), &format!("127.0.0.1:{}", booking.grpc))]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Same-origin, as the dashboard sends it, under either loopback name; and curl's (no Origin).
    let (status, body) = send(&booking, "POST", retry, &[(ORIGIN.as_str(), &ours_origin)]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("no-such-saga"), "{body}");
    let (status, body) =
        send(&booking, "POST", retry, &[(HOST.as_str(), &local), (ORIGIN.as_str(), &local_origin)]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = send(&booking, "POST", retry, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = send(&booking, "GET", "/api/flows", &[(HOST.as_str(), &local)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Probes reach a pod by any name.
    let (status, body) = send(&booking, "GET", "/healthz", &[(HOST.as_str(), &rebound)]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_taken_from_any_origin_and_nothing_else_is() {
    let booking = start("", &[("SAGAFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let retry = "/api/sagas/no-such-saga/retry";
    let bearer = format!("Bearer {TOKEN}");
    let rebound = format!("rebound.example:{}", booking.http);
    let foreign = [(ORIGIN.as_str(), "https://ops.example"), (HOST.as_str(), rebound.as_str())];

    // A reverse proxy or a script elsewhere, with the token.
    let with_token = [foreign[0], foreign[1], (AUTHORIZATION.as_str(), bearer.as_str())];
    let (status, body) = send(&booking, "POST", retry, &with_token).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = send(&booking, "GET", "/api/flows", &with_token).await;
    assert_eq!(status, StatusCode::OK);

    // Without it: refused from elsewhere, and asked for on the right address.
    let (status, body) = send(&booking, "POST", retry, &foreign).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let wrong = [foreign[0], foreign[1], (AUTHORIZATION.as_str(), "Bearer s3cret-accesS")];
    let (status, _) = send(&booking, "POST", retry, &wrong).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let same_origin = format!("http://127.0.0.1:{}", booking.http);
    let (status, body) = send(&booking, "POST", retry, &[(ORIGIN.as_str(), &same_origin)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

fn async_booking(callback_url: &str) -> tonic::Request<BookingRequest> {
    let request = BookingRequest { product_id: 1, count: 1, fault_inject: false, callback_url: callback_url.into() };
    with_id(Some(&format!("cb-{}", uuid::Uuid::new_v4().simple())), request)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_to_the_orchestrators_own_ports_is_invalid() {
    let mut receiver = callback_server().await;
    let cb_port = reqwest::Url::parse(&receiver.url).unwrap().port().unwrap();
    let booking =
        start(&format!("callbacks:\n  allow: [127.0.0.1, \"localhost:{cb_port}\", \"[::1]:{cb_port}\"]\n"), &[]).await;
    let mut client = BookingServiceClient::new(channel(addr(booking.grpc)).await);
    let (grpc, http) = (booking.grpc, booking.http);

    for (url, names) in [
        (format!("http://127.0.0.1:{http}/api/sagas/x/retry"), "admin HTTP API (http_listen)"),
        (format!("http://127.0.0.1:{grpc}/pb.BookingService/HandleAsyncBooking"), "gRPC API (grpc_listen)"),
    ] {
        let status = client.handle_async_booking(async_booking(&url)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{url}: {status:?}");
        assert!(status.message().contains(names) && status.message().contains("orchestrator itself"), "{status:?}");
    }
    // A port entry allows that port only.
    for url in [format!("http://localhost:{http}/"), format!("http://[::1]:{grpc}/")] {
        let status = client.handle_async_booking(async_booking(&url)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{url}: {status:?}");
        assert!(status.message().contains("is not in callbacks.allow"), "{status:?}");
    }
    // ...and the outcome goes there.
    let url = format!("http://localhost:{cb_port}/cb");
    let accepted = client.handle_async_booking(async_booking(&url)).await.unwrap().into_inner();
    let callback = receiver.next().await;
    assert_eq!(callback["request_id"], accepted.request_id, "{callback:#}");
}

#[tokio::test]
async fn a_malformed_allow_entry_refuses_to_start() {
    let (mut booking, log) = spawn("callbacks:\n  allow: [\"localhost:http\"]\n", &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = booking.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "booking started with a malformed callbacks.allow");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = std::fs::read_to_string(log).unwrap();
    assert!(!status.success(), "{output}");
    assert!(output.contains("callbacks.allow entry `localhost:http`") && output.contains("not a port"), "{output}");
}
