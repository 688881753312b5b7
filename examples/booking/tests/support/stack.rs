//! The booking demo as separate processes: the orchestrator, and the mock Order and Payment
//! services (which outlive the orchestrator's kills and restarts, so their records tell what
//! really happened upstream).

use std::path::PathBuf;
use std::time::Duration;

use super::free_ports;
use super::process::{Admin, Proc, Scratch, booking_bin, loopback, spawn_orchestrator};

pub struct Stack {
    pub config: PathBuf,
    pub grpc: u16,
    pub http: u16,
    pub order: u16,
    pub payment: u16,
    pub orchestrator: Option<Proc>,
    _order: Proc,
    _payment: Proc,
    /// Last: removed once every process is gone.
    pub scratch: Scratch,
}

impl Stack {
    /// Starts the mocks (with `order_args` and `payment_args`, e.g. `--latency-ms 100`) and the
    /// orchestrator, on free ports, with a config of the listeners and upstreams plus `yaml`
    /// (the broker, the saga log, flows...), in which `{dir}` stands for the test's scratch directory.
    pub async fn start(name: &str, yaml: &str, order_args: &[&str], payment_args: &[&str]) -> Self {
        let scratch = Scratch::new(name);
        let [grpc, http, order, payment] = free_ports();
        let config = scratch.write(
            "app.yaml",
            &format!(
                "pod_id: {name}\ngrpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\n\
                 upstream:\n  in_process: false\n  order_addr: 127.0.0.1:{order}\n  payment_addr: 127.0.0.1:{payment}\n\
                 {}",
                yaml.replace("{dir}", &scratch.dir.display().to_string())
            ),
        );
        let cfg = config.to_str().unwrap().to_owned();
        let mock = |part: &str, port: u16, extra: &[&str]| {
            let listen = format!("127.0.0.1:{port}");
            let mut args = vec!["--config", &cfg, part, "--listen", &listen];
            args.extend_from_slice(extra);
            Proc::spawn(part, &booking_bin(), &args, &scratch.path(&format!("{part}.log")))
        };
        let mut order_proc = mock("order", order, order_args);
        let mut payment_proc = mock("payment", payment, payment_args);
        order_proc.wait_port(order).await;
        payment_proc.wait_port(payment).await;
        let mut stack = Self {
            config,
            grpc,
            http,
            order,
            payment,
            orchestrator: None,
            _order: order_proc,
            _payment: payment_proc,
            scratch,
        };
        stack.start_orchestrator().await;
        stack
    }

    pub fn orchestrator_log(&self) -> PathBuf {
        self.scratch.path("orchestrator.log")
    }

    /// Starts the orchestrator (again) with the same config and waits for its gRPC port.
    pub async fn start_orchestrator(&mut self) {
        assert!(self.orchestrator.is_none(), "the orchestrator already runs");
        self.orchestrator = Some(spawn_orchestrator(&self.config, &self.orchestrator_log(), &[self.grpc]).await);
    }

    /// `kill -9` of the orchestrator.
    pub fn kill_orchestrator(&mut self) {
        if let Some(mut proc) = self.orchestrator.take() {
            proc.kill9();
        }
    }

    /// SIGTERM to the orchestrator; the time it took to exit, or `None` if it had not after `within`
    /// (it is then killed).
    pub async fn terminate_orchestrator(&mut self, within: Duration) -> Option<Duration> {
        let mut proc = self.orchestrator.take().expect("the orchestrator runs");
        let sent = std::time::Instant::now();
        proc.signal("TERM");
        let status = proc.exited_within(within).await;
        if let Some(status) = status {
            assert!(status.success(), "the orchestrator exited with {status} on SIGTERM");
        }
        status.map(|_| sent.elapsed())
    }

    pub fn admin(&self) -> Admin {
        Admin::new(self.http)
    }

    pub fn order_addr(&self) -> std::net::SocketAddr {
        loopback(self.order)
    }

    pub fn payment_addr(&self) -> std::net::SocketAddr {
        loopback(self.payment)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.kill_orchestrator();
    }
}
