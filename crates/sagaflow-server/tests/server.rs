//! `Server::start` runs a whole service from a configuration, its flows and its gRPC API.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use sagaflow::{Flow, Node, NodeError, Outcome, Step};
use sagaflow_server::{Config, NoKeys, Server};
use serde::{Deserialize, Serialize};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{HeaderValue, Request, Response};
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// A user's gRPC API, reduced to its name: every call gets an empty answer that says which
/// service gave it.
#[derive(Clone)]
struct Api<const N: u8>;

/// The service's API.
type Ping = Api<0>;
/// Another service beside it.
type Pong = Api<1>;

impl NamedService for Ping {
    const NAME: &'static str = "test.Ping";
}

impl NamedService for Pong {
    const NAME: &'static str = "test.Pong";
}

impl<const N: u8> Service<Request<Body>> for Api<N>
where
    Api<N>: NamedService,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        let mut response = Response::new(Body::empty());
        response.headers_mut().insert(SERVED_BY, HeaderValue::from_static(Self::NAME));
        ready(Ok(response))
    }
}

const SERVED_BY: &str = "x-served-by";

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    reserved: bool,
}

struct Reserve;

#[sagaflow::async_trait]
impl Node<Order> for Reserve {
    fn name(&self) -> &str {
        "Reserve"
    }

    async fn action(&self, _: &Step, order: &mut Order) -> Result<(), NodeError> {
        order.reserved = true;
        Ok(())
    }
}

fn config(yaml: &str) -> Config<NoKeys> {
    let base = "grpc_listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\nsaga_log_url: 'memory:'\n";
    let config = Config::from_yaml(&format!("{base}{yaml}")).unwrap();
    config.validate().unwrap();
    config
}

#[tokio::test]
async fn a_service_runs_its_flows_reports_its_api_healthy_serves_admin_and_closes_on_shutdown() {
    let running = Server::new(config(""))
        .start(|orchestrator| orchestrator.sync("Checkout", Flow::new().node(Reserve)), |_| Ping {})
        .await
        .unwrap();

    let outcome = running.orchestrator.run("Checkout", "order-1", Order { reserved: false }).await.unwrap();
    assert!(matches!(outcome, Outcome::Completed(Order { reserved: true })), "{outcome:?}");

    let grpc = Endpoint::from_shared(format!("http://{}", running.grpc_addr)).unwrap();
    let mut health = HealthClient::new(grpc.connect().await.unwrap());
    for service in [Ping::NAME, ""] {
        let answer = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "health of `{service}`");
    }
    let admin = format!("http://{}", running.http_addr);
    assert_eq!(reqwest::get(format!("{admin}/healthz")).await.unwrap().text().await.unwrap(), "ok");
    let flows = reqwest::get(format!("{admin}/api/flows")).await.unwrap().text().await.unwrap();
    assert!(flows.contains("Checkout"), "{flows}");

    let stopping = running.stopping();
    running.shutdown().await.unwrap();
    assert!(stopping.is_cancelled());
    assert!(grpc.connect().await.is_err(), "the gRPC listener is closed");
    assert!(reqwest::get(format!("{admin}/healthz")).await.is_err(), "the admin listener is closed");
}

#[tokio::test]
async fn a_configured_topic_no_flow_has_is_refused_by_name() {
    let yaml = "message_queue:\n  topics:\n    - {id: Checkout.Reserv, concurrency: 2}\n";
    let err = Server::new(config(yaml))
        .start(|orchestrator| orchestrator.sync("Checkout", Flow::new().node(Reserve)), |_| Ping {})
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("`Checkout.Reserv`") && err.contains("Checkout.Reserve"), "{err}");
    assert!(err.contains("prefixed with `sagaflow.`"), "{err}");
}

/// A call to `path` on `channel`, answered by whichever service the path routes to.
async fn call(channel: &mut Channel, path: &str) -> Response<Body> {
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
    let request = Request::builder()
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .unwrap();
    channel.call(request).await.unwrap()
}

#[tokio::test]
async fn several_grpc_services_answer_on_one_port_beside_health_and_reflection() {
    let running = Server::new(config(""))
        .grpc_service(|_| Pong {})
        .start(|orchestrator| orchestrator.sync("Checkout", Flow::new().node(Reserve)), |_| Ping {})
        .await
        .unwrap();
    let mut channel = Endpoint::from_shared(format!("http://{}", running.grpc_addr)).unwrap().connect().await.unwrap();
    for service in [Ping::NAME, Pong::NAME] {
        let answer = call(&mut channel, &format!("/{service}/Call")).await;
        assert_eq!(answer.headers().get(SERVED_BY).and_then(|v| v.to_str().ok()), Some(service));
    }
    let unknown = call(&mut channel, "/test.Nobody/Call").await;
    assert_eq!(unknown.headers().get("grpc-status").and_then(|v| v.to_str().ok()), Some("12"), "UNIMPLEMENTED");

    let mut health = HealthClient::new(channel.clone());
    for service in [Ping::NAME, Pong::NAME, ""] {
        let answer = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "health of `{service}`");
    }
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tonic::codegen::tokio_stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    match answers.message().await.unwrap().and_then(|a| a.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            assert!(list.service.iter().any(|s| s.name == "grpc.health.v1.Health"), "{list:?}");
        }
        other => panic!("reflection answered {other:?}"),
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_grpc_service_added_twice_is_refused_by_name() {
    let start = |server: Server| {
        server.start(|orchestrator| orchestrator.sync("Checkout", Flow::new().node(Reserve)), |_| Ping {})
    };
    let twice = start(Server::new(config("")).grpc_service(|_| Ping {})).await.unwrap_err().to_string();
    assert!(twice.contains("`test.Ping` is added twice"), "{twice}");
    let health = tonic_health::server::health_reporter().1;
    let own = start(Server::new(config("")).grpc_service(move |_| health)).await.unwrap_err().to_string();
    assert!(own.contains("`grpc.health.v1.Health` is served by sagaflow-server itself"), "{own}");
}
