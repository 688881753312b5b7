//! Shared helpers of the booking service's end-to-end tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod postgres;
pub mod process;
pub mod replicas;
pub mod split;
pub mod stack;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use booking::app::{self, Running};
use booking::config::Config;
use booking::proto::pb::BookingRequest;
use booking::proto::pb::booking_service_client::BookingServiceClient;
use booking::proto::upstream::order_service_client::OrderServiceClient;
use booking::proto::upstream::payment_service_client::PaymentServiceClient;
use booking::proto::upstream::{Record, SnapshotReply, SnapshotRequest};
use tokio::sync::mpsc;
use tonic::transport::Channel;

pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// `N` distinct free ports for a child process to listen on. The listeners are held until all
/// are picked: picked one at a time, the same port could come back twice, and the child would
/// then answer on one port with another of its servers (a gRPC `Unimplemented`).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> =
        (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("a bound listener's address").port())
}

/// A config for tests: every listener on a free port, quick retries.
pub fn test_config() -> Config {
    let mut config = Config {
        grpc_listen: any_port(),
        http_listen: any_port(),
        saga_log: booking::config::LogKind::Memory,
        ..Config::default()
    };
    config.app.upstream.order_addr = any_port();
    config.app.upstream.payment_addr = any_port();
    config.app.flow.retry.initial_backoff_ms = 20;
    config.app.flow.compensation_retry.initial_backoff_ms = 20;
    config
}

pub struct Service {
    pub running: Running,
    pub client: BookingServiceClient<Channel>,
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connects")
}

/// Starts the booking service (with in-process mocks unless the config says otherwise).
pub async fn start(config: Config) -> Service {
    config.validate().expect("valid test config");
    let running = app::start(config).await.expect("service starts");
    let client = BookingServiceClient::new(channel(running.grpc_addr).await);
    Service { running, client }
}

pub fn booking(product_id: i64, count: i64, fault_inject: bool) -> BookingRequest {
    BookingRequest { product_id, count, fault_inject, callback_url: String::new() }
}

/// A request carrying `x-request-id` when given.
pub fn with_id<T>(id: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(id) = id {
        request.metadata_mut().insert("x-request-id", id.parse().unwrap());
    }
    request
}

impl Service {
    pub async fn orders(&self) -> SnapshotReply {
        let mut c = OrderServiceClient::new(channel(self.running.order_addr).await);
        c.snapshot(SnapshotRequest {}).await.unwrap().into_inner()
    }

    pub async fn payments(&self) -> SnapshotReply {
        let mut c = PaymentServiceClient::new(channel(self.running.payment_addr).await);
        c.snapshot(SnapshotRequest {}).await.unwrap().into_inner()
    }
}

/// Records by request id.
pub fn by_id(snapshot: &SnapshotReply) -> HashMap<String, Vec<Record>> {
    let mut map: HashMap<String, Vec<Record>> = HashMap::new();
    for r in &snapshot.records {
        map.entry(r.request_id.clone()).or_default().push(r.clone());
    }
    map
}

/// An HTTP server on loopback collecting JSON POSTed to `/cb`.
pub struct CallbackServer {
    pub url: String,
    pub received: mpsc::UnboundedReceiver<serde_json::Value>,
}

pub async fn callback_server() -> CallbackServer {
    let (tx, received) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/cb",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(any_port()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    CallbackServer { url: format!("http://{addr}/cb"), received }
}

impl CallbackServer {
    /// The next callback, within 20 s.
    pub async fn next(&mut self) -> serde_json::Value {
        tokio::time::timeout(Duration::from_secs(20), self.received.recv())
            .await
            .expect("callback arrives in time")
            .expect("server alive")
    }
}

/// An HTTP receiver on loopback counting the callbacks POSTed to `/cb` by their body's
/// `request_id` (the receiver's view: a second POST of one outcome counts twice).
#[derive(Clone)]
pub struct CallbackCounter {
    pub url: String,
    received: Arc<Mutex<HashMap<String, Vec<serde_json::Value>>>>,
}

impl CallbackCounter {
    pub async fn start() -> Self {
        let received: Arc<Mutex<HashMap<String, Vec<serde_json::Value>>>> = Arc::default();
        let store = received.clone();
        let app = axum::Router::new().route(
            "/cb",
            axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let store = store.clone();
                async move {
                    let id = body["request_id"].as_str().unwrap_or_default().to_owned();
                    store.lock().unwrap().entry(id).or_default().push(body);
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url: format!("http://{addr}/cb"), received }
    }

    /// The callbacks received for `id`.
    pub fn of(&self, id: &str) -> Vec<serde_json::Value> {
        self.received.lock().unwrap().get(id).cloned().unwrap_or_default()
    }

    /// Waits until every one of `ids` has a callback, at most `within`; panics naming one without.
    pub async fn wait_all(&self, ids: &[String], within: Duration) {
        let deadline = std::time::Instant::now() + within;
        for id in ids {
            while self.of(id).is_empty() {
                assert!(std::time::Instant::now() < deadline, "no callback for {id} within {within:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Which of the booking service's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Sync,
    Async,
    Throttling,
}

/// Books through the service on `grpc` until it gives a definitive answer, as a client that
/// retries would: transient errors (the service down, restarting, shutting down, its log
/// unavailable, the wait timed out) are retried with the same request id. `Ok(true)` when
/// completed (or, for async, accepted), `Ok(false)` when rolled back (`ABORTED`).
pub async fn book_until_answered(
    grpc: u16,
    id: &str,
    call: Call,
    request: BookingRequest,
    within: Duration,
) -> Result<bool, String> {
    use tonic::Code;
    let deadline = std::time::Instant::now() + within;
    let mut last = None;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(format!("{id}: no definitive answer within {within:?}; last {last:?}"));
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}")).unwrap();
        if let Ok(ch) = endpoint.connect_timeout(Duration::from_secs(1)).connect().await {
            let mut client = BookingServiceClient::new(ch);
            let request = with_id(Some(id), request.clone());
            let result = match call {
                Call::Sync => client.handle_sync_booking(request).await.map(|_| ()),
                Call::Async => client.handle_async_booking(request).await.map(|_| ()),
                Call::Throttling => client.handle_throttling_booking(request).await.map(|_| ()),
            };
            match result {
                Ok(()) => return Ok(true),
                Err(status) if status.code() == Code::Aborted => return Ok(false),
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::Internal
                    ) =>
                {
                    last = Some(status)
                }
                Err(status) => return Err(format!("{id}: unexpected {status:?}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The order and payment services' records by request id.
pub async fn upstream_records(
    order: SocketAddr,
    payment: SocketAddr,
) -> (HashMap<String, Vec<Record>>, HashMap<String, Vec<Record>>) {
    let orders = OrderServiceClient::new(channel(order).await).snapshot(SnapshotRequest {}).await.unwrap().into_inner();
    let payments =
        PaymentServiceClient::new(channel(payment).await).snapshot(SnapshotRequest {}).await.unwrap().into_inner();
    (by_id(&orders), by_id(&payments))
}

/// Checks that the upstreams agree with how each saga ended (`(request id, status)`): a
/// completed booking has one active order and one active payment; a compensated one has its
/// order cancelled (or none: a tombstone) and no active payment. Returns the number compensated.
pub async fn assert_upstreams_agree(order: SocketAddr, payment: SocketAddr, ended: &[(String, String)]) -> usize {
    let (orders, payments) = upstream_records(order, payment).await;
    let mut compensated = 0;
    for (id, status) in ended {
        let order = orders.get(id).map(Vec::as_slice).unwrap_or_default();
        let payment = payments.get(id).map(Vec::as_slice).unwrap_or_default();
        assert!(order.len() <= 1 && payment.len() <= 1, "{id}: two records {order:?} {payment:?}");
        let order_status = order.first().map(|r| r.status.as_str());
        let payment_active = payment.first().is_some_and(|r| r.status == "active");
        match status.as_str() {
            "completed" => {
                assert_eq!(order_status, Some("active"), "{id} completed: order {order:?}");
                assert!(payment_active, "{id} completed without its payment: {payment:?}");
            }
            "compensated" => {
                compensated += 1;
                assert!(matches!(order_status, None | Some("cancelled" | "tombstone")), "{id}: order {order:?}");
                assert!(!payment_active, "{id} compensated but its payment is active: {payment:?}");
            }
            other => panic!("{id} ended {other}"),
        }
    }
    compensated
}
