//! `Server::start` runs a whole service from a configuration, its flows and its gRPC API.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use sagaflow::{Flow, Node, NodeError, Outcome, Step};
use sagaflow_server::{Config, NoKeys, Server};
use serde::{Deserialize, Serialize};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A user's gRPC API, reduced to its name: every call gets an empty answer.
#[derive(Clone)]
struct Ping;

impl NamedService for Ping {
    const NAME: &'static str = "test.Ping";
}

impl Service<Request<Body>> for Ping {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        ready(Ok(Response::new(Body::empty())))
    }
}

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
        .start(|orchestrator| orchestrator.sync("Checkout", Flow::new().node(Reserve)), |_| Ping)
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
        .start(|orchestrator| orchestrator.sync("Checkout", Flow::new().node(Reserve)), |_| Ping)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("`Checkout.Reserv`") && err.contains("Checkout.Reserve"), "{err}");
    assert!(err.contains("prefixed with `sagaflow.`"), "{err}");
}
