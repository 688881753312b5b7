//! Credentials never reach the logs or the admin API: the booking binary runs as its own
//! process with passwords in its broker, saga log and callback URLs and `RUST_LOG=debug`, and
//! everything it prints, and every admin answer, is searched for them.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use booking::proto::pb::booking_service_client::BookingServiceClient;
use support::{booking, channel, free_ports, with_id};

const NATS_PASSWORD: &str = "natsPw-7c1d0e";
const PG_PASSWORD: &str = "pgPw-3a9f42";
const CALLBACK_PASSWORD: &str = "cbPw-58e2b6";
const ADMIN_TOKEN: &str = "adminTok-91f3c7d2e5";
const SIGNING_SECRET: &str = "signingSecret-4d8e0a6b2c";
const ALL: [&str; 5] = [NATS_PASSWORD, PG_PASSWORD, CALLBACK_PASSWORD, ADMIN_TOKEN, SIGNING_SECRET];

/// The booking binary, its output collected in the background.
struct Booking {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

fn collect(mut stream: impl std::io::Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    })
}

impl Booking {
    fn spawn(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_booking"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "debug")
            .env("RUST_BACKTRACE", "1")
            .env("SAGAFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SAGAFLOW_CALLBACK_SECRET", SIGNING_SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("booking starts");
        let stdout = Some(collect(child.stdout.take().unwrap()));
        let stderr = Some(collect(child.stderr.take().unwrap()));
        Self { child, stdout, stderr }
    }

    /// Waits for the process to end (after SIGTERM if `stop`); returns everything it printed.
    fn finish(mut self, stop: bool) -> (std::process::ExitStatus, String) {
        if stop {
            assert!(Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success());
        }
        let status = self.child.wait().unwrap();
        let out = self.stdout.take().unwrap().join().unwrap();
        let err = self.stderr.take().unwrap().join().unwrap();
        (status, format!("{out}{err}"))
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in ALL {
        assert!(!text.contains(secret), "{what} shows `{secret}`:\n{text}");
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sagaflow-{name}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn unused_port() -> u16 {
    free_ports::<1>()[0]
}

/// The first lines of a config on free ports, upstreams in the process.
fn base_config() -> String {
    let [grpc, http, order, payment] = free_ports();
    format!(
        "grpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\n\
         upstream:\n  order_addr: 127.0.0.1:{order}\n  payment_addr: 127.0.0.1:{payment}\n"
    )
}

#[test]
fn a_failed_start_names_the_server_but_not_its_password() {
    let dir = temp_dir("secrets-start");
    let nats = unused_port();
    let postgres = unused_port();
    // Each: the settings, how the error names the server, and a line showing that the
    // debug logging that could print the password ran.
    let cases = [
        (
            format!("broker: nats\nbroker_url: nats://saga:{NATS_PASSWORD}@127.0.0.1:{nats}\n"),
            format!("nats://***@127.0.0.1:{nats}"),
            Some("async_nats::connector"),
        ),
        (
            format!("saga_log: postgres\nsaga_log_url: postgres://saga:{PG_PASSWORD}@127.0.0.1:{postgres}/test\n"),
            format!("saga@127.0.0.1:{postgres}/test"),
            None,
        ),
    ];
    for (i, (settings, shown, debug)) in cases.into_iter().enumerate() {
        let config = dir.join(format!("app{i}.yaml"));
        std::fs::write(&config, format!("{}{settings}", base_config())).unwrap();
        let (status, output) = Booking::spawn(&config).finish(false);
        assert!(!status.success(), "booking started without its server:\n{output}");
        assert!(output.contains(&shown), "the error names the server `{shown}`:\n{output}");
        if let Some(debug) = debug {
            assert!(output.contains(debug), "debug logging is on:\n{output}");
        }
        assert_no_secret("a failed start", &output);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A private nats-server that requires a user and password.
struct Nats {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nats {
    fn start() -> Option<Self> {
        let program = Path::new("/usr/sbin/nats-server");
        if !program.exists() {
            assert!(std::env::var_os("SAGAFLOW_REQUIRE_BROKERS").is_none(), "nats-server is required");
            eprintln!("skipping: /usr/sbin/nats-server not found");
            return None;
        }
        let port = unused_port();
        let dir = temp_dir("secrets-nats");
        let child = Command::new(program)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "--user", "saga", "--pass", NATS_PASSWORD])
            .arg("-sd")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        Some(Self { child, port, dir })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_for_port(port: u16, booking: &mut Booking) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(booking.child.try_wait().unwrap().is_none(), "booking exited early");
        assert!(Instant::now() < deadline, "port {port} did not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin_get(http: u16, path: &str) -> String {
    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{http}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "GET {path}: {}", response.status());
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_the_admin_api_never_show_credentials() {
    let Some(nats) = Nats::start() else { return };
    if std::net::TcpStream::connect(("127.0.0.1", 5432)).is_err() {
        assert!(std::env::var_os("SAGAFLOW_REQUIRE_BROKERS").is_none(), "PostgreSQL is required");
        eprintln!("skipping: no PostgreSQL on 127.0.0.1:5432");
        return;
    }
    // The receiver: answers 200 and keeps the Authorization header the callback carried.
    let (auth_tx, mut auth_rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/cb",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let auth_tx = auth_tx.clone();
            async move {
                let _ = auth_tx.send(headers.get("authorization").map(|v| v.to_str().unwrap().to_owned()));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let [grpc, http, order, payment] = free_ports();
    let schema = format!("secrets_{}", uuid::Uuid::new_v4().simple());
    let dir = temp_dir("secrets-run");
    let config = dir.join("app.yaml");
    std::fs::write(
        &config,
        format!(
            "grpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\n\
             upstream:\n  order_addr: 127.0.0.1:{order}\n  payment_addr: 127.0.0.1:{payment}\n\
             broker: nats\nbroker_url: nats://saga:{NATS_PASSWORD}@127.0.0.1:{}\n\
             saga_log: postgres\nsaga_log_url: postgres://postgres:{PG_PASSWORD}@127.0.0.1:5432/test\n\
             saga_log_schema: {schema}\n\
             callbacks:\n  attempts: 2\n  timeout_ms: 2000\n",
            nats.port
        ),
    )
    .unwrap();
    // nats-server takes a moment to listen; the booking service must not start before it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", nats.port)).await.is_err() {
        assert!(Instant::now() < deadline, "private nats-server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut service = Booking::spawn(&config);
    wait_for_port(grpc, &mut service).await;
    let mut client = BookingServiceClient::new(channel(([127, 0, 0, 1], grpc).into()).await);

    // Delivered with the URL's user information as basic auth; and one that cannot be delivered.
    let mut delivered = booking(1, 1, false);
    delivered.callback_url = format!("http://cbuser:{CALLBACK_PASSWORD}@{receiver}/cb");
    client.handle_async_booking(with_id(Some("secret-delivered"), delivered)).await.unwrap();
    let auth = tokio::time::timeout(Duration::from_secs(30), auth_rx.recv()).await.unwrap().unwrap();
    let expected = format!("cbuser:{CALLBACK_PASSWORD}");
    let expected = format!("Basic {}", base64(expected.as_bytes()));
    assert_eq!(auth.as_deref(), Some(expected.as_str()), "the callback authenticates with the URL's user information");
    let mut failing = booking(1, 1, false);
    failing.callback_url = format!("http://cbuser:{CALLBACK_PASSWORD}@127.0.0.1:{}/cb", unused_port());
    client.handle_async_booking(with_id(Some("secret-failing"), failing)).await.unwrap();

    // The admin API: the saga with its failed delivery, both details, the list.
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let detail = admin_get(http, "/api/sagas/secret-failing").await;
        if detail.contains("callback_failed") {
            break detail;
        }
        assert!(Instant::now() < deadline, "the failed delivery was not recorded: {detail}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let json: serde_json::Value = serde_json::from_str(&failed).unwrap();
    assert!(json["callback_url"].as_str().unwrap().starts_with("http://***@127.0.0.1:"), "{json}");
    let mut shown = failed;
    for path in ["/api/sagas/secret-delivered", "/api/sagas", "/api/flows", "/api/stats"] {
        shown.push_str(&admin_get(http, path).await);
    }
    assert!(shown.contains("secret-delivered"), "the list shows the sagas: {shown}");
    assert_no_secret("the admin API", &shown);

    let (status, output) = service.finish(true);
    let _ = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc"])
        .arg(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "booking exited with {status}:\n{output}");
    // The paths that could print credentials ran: async-nats dialling, the failed callback.
    assert!(output.contains("async_nats::connector"), "async-nats debug logging is on:\n{output}");
    assert!(output.contains("callback not delivered"), "the failed delivery is logged:\n{output}");
    assert_no_secret("the logs", &output);
}

/// Standard base64 with padding, for the expected basic-auth header.
fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
