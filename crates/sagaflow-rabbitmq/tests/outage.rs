//! Broker outages, against a private RabbitMQ node this test starts, kills
//! (SIGKILL, as a crash) and restarts on the same ports and data directory.
//! The shared server on 5672 is never touched.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sagaflow::broker::{Broker, BrokerError, Delivery, Message, REQUEST_ID_HEADER, SubscribeOptions, Subscription};
use sagaflow::testsuite::{skip_or_fail, unique_name};
use sagaflow_rabbitmq::{Error, RabbitMqBroker, RabbitMqOptions};
use tokio::time::{Instant, timeout};

/// Longest a private node may take to boot (it usually takes 3–8 s).
const BOOT: Duration = Duration::from_secs(60);
/// Publish timeout of the publisher that must give up during the outage.
const HASTY: Duration = Duration::from_secs(1);
/// Publish timeout of the publisher that must outlast the outage.
const PATIENT: Duration = Duration::from_secs(90);

/// A RabbitMQ node of our own on free ports; killed and its files removed on drop.
struct PrivateNode {
    server: PathBuf,
    dir: PathBuf,
    name: String,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

impl PrivateNode {
    /// Writes the node's config into a fresh directory and starts it.
    fn start(server: PathBuf) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("sagaflow-rabbitmq-outage"));
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::create_dir_all(dir.join("mnesia"))?;
        let (port, dist_port) = (free_port()?, free_port()?);
        // Only the AMQP listener, on loopback; no plugins (their ports would clash).
        std::fs::write(dir.join("rabbitmq.conf"), format!("listeners.tcp.local = 127.0.0.1:{port}\n"))?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let mut node =
            Self { server, dir, name: unique_name("sagaflow-test") + "@localhost", port, dist_port, child: None };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let dir = &self.dir;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("console.log"))?;
        let child = Command::new(&self.server)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("node.pid"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            // Makes the script `exec` the VM, so our child *is* the node and SIGKILL kills it.
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Waits until the AMQP port accepts connections, or fails with the node's log.
    async fn wait_ready(&mut self) {
        let started = Instant::now();
        while started.elapsed() < BOOT {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the private RabbitMQ node exited while booting ({status}):\n{}", self.log_tail());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the private RabbitMQ node did not listen within {BOOT:?}:\n{}", self.log_tail());
    }

    /// Kills the node as a crash would: no clean shutdown, no goodbye to clients.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let mut lines = Vec::new();
        for file in [self.dir.join("console.log")].into_iter().chain(log_files(&self.dir.join("log"))) {
            if let Ok(f) = std::fs::File::open(&file) {
                lines.push(format!("--- {}", file.display()));
                let all: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
                lines.extend(all.iter().skip(all.len().saturating_sub(30)).cloned());
            }
        }
        lines.join("\n")
    }
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // Kept for a post-mortem; the node is dead, so it holds nothing else.
            eprintln!(
                "private RabbitMQ node {} (files kept in {}):\n{}",
                self.name,
                self.dir.display(),
                self.log_tail()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `rabbitmq-server` runnable as the current user: the scripts in
/// /usr/lib/rabbitmq/bin (Debian's /usr/sbin wrappers switch to the `rabbitmq`
/// user, who could not write our directory), else the first on PATH.
fn find_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/lib/rabbitmq/bin"))
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join("rabbitmq-server"))
        .find(|candidate| candidate.is_file())
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn message(topic: &str, run: &str, index: usize) -> Message {
    Message::new(topic, index.to_string()).header(REQUEST_ID_HEADER, format!("{run}-{index}"))
}

fn index_of(delivery: &Delivery) -> usize {
    std::str::from_utf8(&delivery.message.payload).ok().and_then(|s| s.parse().ok()).expect("a message of this test")
}

async fn connect(url: &str, publish_timeout: Duration) -> Arc<RabbitMqBroker> {
    let options = RabbitMqOptions::from_url(url)
        .expect("a valid URL")
        .publish_timeout(publish_timeout)
        .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1));
    Arc::new(RabbitMqBroker::connect(options).await.expect("the private node accepts connections"))
}

async fn next(subscription: &mut Subscription, what: &str) -> Delivery {
    match timeout(BOOT, subscription.next()).await {
        Ok(Some(delivery)) => delivery,
        Ok(None) => panic!("the subscription ended while waiting for {what}"),
        Err(_) => panic!("no {what} within {BOOT:?}"),
    }
}

async fn wait_disconnected(broker: &RabbitMqBroker) {
    let started = Instant::now();
    while broker.is_connected() {
        assert!(started.elapsed() < Duration::from_secs(10), "the driver did not notice the node died");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A consumer subscribed across a crash and restart of the node keeps
/// receiving; a delivery from before the crash cannot be acked and comes back;
/// a publish during the outage either waits for the node or fails with
/// `Unavailable` within its bound; every publish that returned `Ok` is received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_and_publishers_survive_a_broker_crash() {
    init_tracing();
    let Some(server) = find_server() else {
        let _: Option<()> = skip_or_fail("rabbitmq-server (to start a private node)", "not installed");
        return;
    };
    let mut node = PrivateNode::start(server).expect("a private RabbitMQ node starts");
    node.wait_ready().await;
    let url = node.url();
    let topic = unique_name("outage.hops");
    let run = unique_name("m");

    let consumer = connect(&url, PATIENT).await;
    let patient = connect(&url, PATIENT).await;
    let hasty = connect(&url, HASTY).await;
    let mut subscription = consumer
        .subscribe(SubscribeOptions::new(&topic, "sagaflow").concurrency(4))
        .await
        .expect("subscribe before the outage");
    let mut confirmed = vec![0, 1];
    for i in &confirmed {
        patient.publish(message(&topic, &run, *i)).await.expect("publish before the outage");
    }
    let first = next(&mut subscription, "message 0 before the outage").await;
    assert_eq!((index_of(&first), first.delivery_count), (0, 1));
    first.ack().await.expect("ack before the outage");
    let in_flight = next(&mut subscription, "message 1 before the outage").await;
    assert_eq!((index_of(&in_flight), in_flight.delivery_count), (1, 1));

    // RabbitMQ 3.10 may lose a quorum queue created moments before a SIGKILL
    // (it restarts without a leader); crash a node whose queue is settled in.
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Crash.
    node.kill();
    wait_disconnected(&consumer).await;
    let acked = in_flight.ack().await;
    assert!(
        matches!(acked, Err(BrokerError::Unavailable { .. })),
        "a delivery whose channel died cannot be acked, got {acked:?}"
    );

    let started = Instant::now();
    let hasty_result = hasty.publish(message(&topic, &run, 2)).await;
    let took = started.elapsed();
    match &hasty_result {
        Err(why @ BrokerError::Unavailable { .. }) => {
            assert!(took < HASTY + Duration::from_secs(2), "gave up after {took:?}, beyond its {HASTY:?} bound");
            assert!(why.to_string().contains(&topic), "the error names the topic: {why}");
        }
        other => panic!("a publish during the outage must fail with Unavailable within its bound, got {other:?}"),
    }
    let waiting = {
        let patient = patient.clone();
        let message = message(&topic, &run, 3);
        tokio::spawn(async move { patient.publish(message).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the patient publish must wait for the node, not fail or drop the message");

    // Restart on the same ports and data.
    node.spawn().expect("the node restarts");
    node.wait_ready().await;
    match timeout(PATIENT, waiting).await {
        Ok(Ok(Ok(()))) => confirmed.push(3),
        Ok(Ok(Err(why @ BrokerError::Unavailable { .. }))) => {
            println!("the patient publish gave up within its bound: {why}")
        }
        other => panic!("the publish issued during the outage: {other:?}"),
    }
    patient.publish(message(&topic, &run, 4)).await.expect("publish after the restart");
    confirmed.push(4);

    // Every confirmed message still unacked arrives on the subscription made before the crash.
    let mut pending: BTreeSet<usize> = confirmed.iter().copied().filter(|i| *i != 0).collect();
    while !pending.is_empty() {
        let delivery = next(&mut subscription, &format!("the confirmed messages {pending:?} after the restart")).await;
        let index = index_of(&delivery);
        if index == 1 {
            assert!(delivery.delivery_count >= 2, "the crash cut a delivery short: {delivery:?}");
        }
        pending.remove(&index);
        delivery.ack().await.expect("ack after the restart");
    }

    for broker in [&consumer, &patient, &hasty] {
        timeout(Duration::from_secs(10), broker.close()).await.expect("close within 10 s");
    }
    assert!(subscription.next().await.is_none(), "a closed broker's subscription ends");
}

/// Without a server, `connect` gives up within its timeout with a clear error.
#[tokio::test]
async fn connect_gives_up_within_its_timeout() {
    let port = free_port().expect("a free port");
    let options = RabbitMqOptions::from_url(&format!("amqp://guest:s3cr3t@127.0.0.1:{port}/%2f"))
        .expect("a valid URL")
        .connect_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let error = RabbitMqBroker::connect(options).await.expect_err("nothing listens there");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    let shown = error.to_string();
    assert!(shown.contains(&format!("127.0.0.1:{port}")) && !shown.contains("s3cr3t"), "{shown}");
    // The refused connection is lapin's error, kept as the source, as a broker error too.
    let lapin_source = |e: &dyn std::error::Error| e.source().is_some_and(|s| s.is::<lapin::Error>());
    assert!(lapin_source(&error), "{error:?}");
    assert!(lapin_source(&BrokerError::from(error)));
}
