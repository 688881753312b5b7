//! The orchestrator as a process of its own, calling mock Order and Payment services that run
//! inside the test: the test breaks and heals the mocks (`set_fail_cancels`) and reads their
//! records and counters directly, while it restarts the orchestrator and drives it only through
//! its gRPC and admin HTTP APIs, as a client and an operator would.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use booking::upstream::{MockConfig, OrderMock, PaymentMock, serve_order, serve_payment};
use reqwest::StatusCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::free_ports;
use super::process::{Proc, Scratch, spawn_orchestrator};

/// The operator name tests act under, unless they say otherwise.
pub const OPERATOR_HEADER: &str = "x-sagaflow-operator";

pub struct Split {
    pub config: PathBuf,
    pub grpc: u16,
    pub http: u16,
    pub order: OrderMock,
    pub payment: PaymentMock,
    pub orchestrator: Option<Proc>,
    stop_mocks: CancellationToken,
    /// Last: removed once the orchestrator is gone.
    pub scratch: Scratch,
}

impl Split {
    /// Starts the mocks as `order` and `payment` say and the orchestrator with a config of its
    /// listeners and upstreams plus `yaml` (`{dir}` stands for the scratch directory).
    pub async fn start(name: &str, yaml: &str, order: MockConfig, payment: MockConfig) -> Self {
        let scratch = Scratch::new(name);
        let stop_mocks = CancellationToken::new();
        let (order, payment) = (OrderMock::new(order), PaymentMock::new(payment));
        let order_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let payment_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (order_port, payment_port) =
            (order_listener.local_addr().unwrap().port(), payment_listener.local_addr().unwrap().port());
        let stop = stop_mocks.clone();
        tokio::spawn(serve_order(order_listener, order.clone(), async move { stop.cancelled().await }));
        let stop = stop_mocks.clone();
        tokio::spawn(serve_payment(payment_listener, payment.clone(), async move { stop.cancelled().await }));
        let [grpc, http] = free_ports();
        let config = scratch.write(
            "app.yaml",
            &format!(
                "pod_id: {name}\ngrpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\n\
                 upstream:\n  in_process: false\n  order_addr: 127.0.0.1:{order_port}\n  payment_addr: 127.0.0.1:{payment_port}\n\
                 {}",
                yaml.replace("{dir}", &scratch.dir.display().to_string())
            ),
        );
        let mut split = Self { config, grpc, http, order, payment, orchestrator: None, stop_mocks, scratch };
        split.start_orchestrator().await;
        split
    }

    pub fn orchestrator_log(&self) -> PathBuf {
        self.scratch.path("orchestrator.log")
    }

    /// Starts the orchestrator (again) and waits for its gRPC and HTTP ports.
    pub async fn start_orchestrator(&mut self) {
        assert!(self.orchestrator.is_none(), "the orchestrator already runs");
        let proc = spawn_orchestrator(&self.config, &self.orchestrator_log(), &[self.grpc, self.http]).await;
        self.orchestrator = Some(proc);
    }

    /// SIGTERM to the orchestrator; panics unless it exits cleanly within 30 s.
    pub async fn stop_orchestrator(&mut self) {
        let mut proc = self.orchestrator.take().expect("the orchestrator runs");
        proc.signal("TERM");
        let status = proc.exited_within(Duration::from_secs(30)).await.expect("the orchestrator exits on SIGTERM");
        assert!(status.success(), "the orchestrator exited with {status} on SIGTERM");
    }

    pub fn ops(&self) -> Ops {
        Ops::new(self.http)
    }
}

impl Drop for Split {
    fn drop(&mut self) {
        if let Some(mut proc) = self.orchestrator.take() {
            proc.kill9();
        }
        self.stop_mocks.cancel();
    }
}

/// The admin HTTP API as an operator calls it.
#[derive(Clone)]
pub struct Ops {
    pub port: u16,
    web: reqwest::Client,
}

impl Ops {
    pub fn new(port: u16) -> Self {
        // A redrive answers when it has retried every saga it matched: long enough for that.
        Self { port, web: reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `GET path`: the status and the JSON body (`null` when the body is not JSON).
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.web.get(self.url(path)).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `GET path`: the status and the body as text.
    pub async fn text(&self, path: &str) -> (StatusCode, String) {
        let response = self.web.get(self.url(path)).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status();
        (status, response.text().await.unwrap_or_default())
    }

    /// `POST path` as `operator` with `body`: the status and the JSON body.
    pub async fn post(&self, path: &str, operator: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .web
            .post(self.url(path))
            .header(OPERATOR_HEADER, operator)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The saga's detail, once the API has it.
    pub async fn saga(&self, id: &str) -> Option<Value> {
        let (status, body) = self.get(&format!("/api/sagas/{id}")).await;
        (status == StatusCode::OK).then_some(body)
    }

    /// Waits (at most `within`) until the saga's detail satisfies `done`; returns it.
    pub async fn saga_until(&self, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let saga = self.saga(id).await;
            if let Some(saga) = &saga
                && done(saga)
            {
                return saga.clone();
            }
            assert!(Instant::now() < deadline, "saga {id} did not get there within {within:?}: {saga:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until step `step` of the saga has started.
    pub async fn step_started(&self, id: &str, step: u64) -> Value {
        self.saga_until(id, Duration::from_secs(30), |s| {
            s["history"]
                .as_array()
                .is_some_and(|h| h.iter().any(|e| e["event"] == "step_started" && e["step"].as_u64() == Some(step)))
        })
        .await
    }

    /// The counts of `facade`'s sagas per status, from `/api/stats`.
    pub async fn counts(&self, facade: &str) -> Value {
        let (status, stats) = self.get("/api/stats").await;
        assert_eq!(status, StatusCode::OK, "{stats}");
        stats["facades"][facade].clone()
    }

    /// Waits (at most 60 s) until at least `count` of `facade`'s sagas are `status`.
    pub async fn count_until_at_least(&self, facade: &str, status: &str, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let counts = self.counts(facade).await;
            if counts[status].as_u64().is_some_and(|n| n >= count) {
                return;
            }
            assert!(Instant::now() < deadline, "{facade}: not {count} {status} within 60 s: {counts}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (at most `within`) until `count` of `facade`'s sagas are `status`.
    pub async fn count_until(&self, facade: &str, status: &str, count: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let counts = self.counts(facade).await;
            if counts[status].as_u64() == Some(count) {
                return;
            }
            assert!(Instant::now() < deadline, "{facade}: not {count} {status} within {within:?}: {counts}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Whether a saga's detail shows it ended.
pub fn ended(saga: &Value) -> bool {
    matches!(saga["status"].as_str(), Some("completed" | "compensated" | "stuck"))
}
