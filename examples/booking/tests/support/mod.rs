//! Shared helpers of the booking service's end-to-end tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod replicas;

use std::collections::HashMap;
use std::net::SocketAddr;
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
    config.upstream.order_addr = any_port();
    config.upstream.payment_addr = any_port();
    config.flow.retry.initial_backoff_ms = 20;
    config.flow.compensation_retry.initial_backoff_ms = 20;
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
