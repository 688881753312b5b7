//! Throttled callers waiting while their private NATS server is killed and
//! restarted still get their answers.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use booking::config::{BrokerKind, TopicConfig};
use booking::topic;
use support::{booking, start, test_config, with_id};

struct Nats {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Nats {
    fn spawn(port: u16, dir: &Path) -> Child {
        Command::new("/usr/sbin/nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts")
    }

    async fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "private nats-server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_callers_get_their_answers_across_a_broker_restart() {
    if !Path::new("/usr/sbin/nats-server").exists() {
        assert!(std::env::var_os("SAGAFLOW_REQUIRE_BROKERS").is_none(), "nats-server is required");
        eprintln!("skipping: /usr/sbin/nats-server not found");
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("sagaflow-outage-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut nats = Nats { child: Nats::spawn(port, &dir), port, dir: dir.clone() };
    nats.wait_up().await;

    let mut config = test_config();
    config.broker = BrokerKind::Nats;
    config.broker_url = Some(format!("nats://127.0.0.1:{port}"));
    config.wait_timeout_ms = 60_000;
    config.app.upstream.order.latency = Duration::from_millis(40);
    config.message_queue.topics =
        [topic::THROTTLING_CREATE_ORDER, topic::THROTTLING_CREATE_PAYMENT, topic::THROTTLING_ROLLBACK]
            .into_iter()
            .map(|id| TopicConfig { id: id.into(), is_throttling: true, concurrency: Some(4) })
            .collect();
    let s = start(config).await;

    let mut calls = Vec::new();
    for i in 0..60 {
        let mut client = s.client.clone();
        calls.push(tokio::spawn(async move {
            client.handle_throttling_booking(with_id(Some(&format!("outage-{i}")), booking(1, 1, i % 6 == 5))).await
        }));
    }
    // The queue is several hundred ms deep: kill the broker under it, keep it down a moment, restart it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    nats.child.kill().unwrap();
    nats.child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.child = Nats::spawn(port, &dir);
    nats.wait_up().await;

    let (mut completed, mut compensated) = (0, 0);
    for (i, call) in calls.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(90), call).await.expect("answer in time").unwrap() {
            Ok(reply) => {
                assert!(reply.into_inner().payment_id > 0);
                completed += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Aborted, "outage-{i}: {status:?}");
                assert_eq!(i % 6, 5, "only fault-injected bookings roll back: outage-{i}");
                compensated += 1;
            }
        }
    }
    assert_eq!((completed, compensated), (50, 10));
    assert_eq!(s.running.orchestrator.stats().waiting, 0);
    s.running.shutdown().await.unwrap();
}
