//! Server outages: a private `nats-server` (never the shared one) is killed with SIGKILL and
//! restarted on the same port and store directory while the driver is in use.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sagaflow::broker::{Broker, BrokerError, Delivery, Message, REQUEST_ID_HEADER, SubscribeOptions, Subscription};
use sagaflow::testsuite::skip_or_fail;
use sagaflow_nats::{NatsBroker, NatsOptions};
use tokio::time::{Instant, timeout};

const NATS_SERVER: &str = "/usr/sbin/nats-server";
/// The publish bound the tests configure: a publish during the outage must end by then.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for one delivery or one (re)connection.
const WAIT: Duration = Duration::from_secs(20);
/// Longest one whole test may run.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// A private nats-server with JetStream on a free loopback port; killed when dropped.
struct Server {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
}

impl Server {
    /// Starts a server, or says why it cannot (no binary) through `skip_or_fail`.
    fn start() -> Option<Self> {
        if !Path::new(NATS_SERVER).exists() {
            return skip_or_fail("nats-server (for the outage tests)", format!("{NATS_SERVER} is not installed"));
        }
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let store = std::env::temp_dir().join(format!("sagaflow-nats-outage-{}-{port}", std::process::id()));
        let mut server = Self { child: None, port, store };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let child = Command::new(NATS_SERVER)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown, no flush, as in a crash.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts the server again on the same port with an empty store, as after losing its disk.
    fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
        self.spawn();
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn options(&self) -> NatsOptions {
        NatsOptions::new(self.url())
            .and_then(|o| o.stream_prefix("SFOUTAGE"))
            .and_then(|o| o.publish_timeout(PUBLISH_TIMEOUT))
            .and_then(|o| o.request_timeout(Duration::from_secs(2)))
            .and_then(|o| o.pull_expires(Duration::from_secs(2)))
            .and_then(|o| o.reconnect_max_delay(Duration::from_millis(200)))
            .expect("valid test options")
    }

    /// Connects once the server (and its JetStream) is up.
    async fn connect(&self) -> NatsBroker {
        let deadline = Instant::now() + WAIT;
        loop {
            match NatsBroker::connect(self.options()).await {
                Ok(broker) => return broker,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for the private nats-server: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the private nats-server did not come up within {WAIT:?}: {e}"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

fn numbered(topic: &str, index: usize) -> Message {
    Message::new(topic, index.to_string()).header(REQUEST_ID_HEADER, format!("outage-{index}"))
}

async fn next(subscription: &mut Subscription, what: &str) -> Delivery {
    match timeout(WAIT, subscription.next()).await {
        Ok(Some(delivery)) => delivery,
        Ok(None) => panic!("the subscription ended while waiting for {what}"),
        Err(_) => panic!("no delivery within {WAIT:?} while waiting for {what}"),
    }
}

/// A subscribed consumer keeps working across a kill and restart of the server: it receives
/// messages published after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_resumes_after_server_restart() {
    let Some(mut server) = Server::start() else { return };
    timeout(TEST_LIMIT, async {
        let broker = server.connect().await;
        let topic = "outage.resume";
        let mut subscription = broker.subscribe(SubscribeOptions::new(topic, "workers").concurrency(4)).await.unwrap();
        broker.publish(numbered(topic, 0)).await.expect("publish before the outage");
        let before = next(&mut subscription, "the message published before the outage").await;
        assert_eq!(before.message, numbered(topic, 0));
        before.ack().await.expect("ack before the outage");

        server.restart();

        // The publish waits for the reconnect (bounded); retry once more if the server is slow to start.
        let mut published = broker.publish(numbered(topic, 1)).await;
        if let Err(e @ BrokerError::Unavailable { .. }) = &published {
            eprintln!("first publish after restart: {e}; retrying");
            published = broker.publish(numbered(topic, 1)).await;
        }
        published.expect("publish after the restart");
        let after = next(&mut subscription, "a message published after the restart").await;
        assert_eq!(after.message, numbered(topic, 1), "the message published after the restart");
        after.ack().await.expect("ack after the restart");
        broker.close().await;
    })
    .await
    .expect("the test finished in time");
}

/// Publishes issued while the server is down either wait and succeed after the restart or
/// fail with `Unavailable` within the publish timeout; every publish that returned `Ok` is
/// delivered, exactly as published (at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_during_outage_are_confirmed_or_fail_unavailable() {
    const N: usize = 60;
    let Some(mut server) = Server::start() else { return };
    timeout(TEST_LIMIT, async {
        let publisher = Arc::new(server.connect().await);
        let consumer = server.connect().await;
        let topic = "outage.publish";
        let mut subscription =
            consumer.subscribe(SubscribeOptions::new(topic, "workers").concurrency(8)).await.unwrap();

        let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
        let publishing = tokio::spawn({
            let publisher = publisher.clone();
            async move {
                let mut outcomes = BTreeMap::new();
                for i in 0..N {
                    let started = Instant::now();
                    let outcome = publisher.publish(numbered(topic, i)).await;
                    let took = started.elapsed();
                    match &outcome {
                        Ok(()) => {}
                        Err(e @ BrokerError::Unavailable { .. }) => {
                            eprintln!("publish {i} failed after {took:?}: {e}");
                            assert!(
                                took <= PUBLISH_TIMEOUT + Duration::from_secs(1),
                                "publish {i} took {took:?}, past its {PUBLISH_TIMEOUT:?} bound"
                            );
                        }
                        Err(e) => panic!("publish {i} failed with {e}, not as unavailable"),
                    }
                    outcomes.insert(i, outcome.is_ok());
                    let _ = progress_tx.send(i + 1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                outcomes
            }
        });

        // Kill the server a third of the way in, keep it down a while, and bring it back.
        progress.wait_for(|&n| n >= N / 3).await.expect("the publisher is running");
        server.kill();
        let down_since = Instant::now();
        progress.wait_for(|&n| n >= N / 3 + 3 || down_since.elapsed() > Duration::from_secs(2)).await.ok();
        tokio::time::sleep(Duration::from_secs(1)).await;
        server.spawn();

        let outcomes = publishing.await.expect("the publisher task");
        let confirmed: BTreeSet<usize> = outcomes.iter().filter(|(_, ok)| **ok).map(|(i, _)| *i).collect();
        eprintln!("{} of {N} publishes confirmed", confirmed.len());
        assert!(confirmed.contains(&(N - 1)), "publishing must recover after the restart: {outcomes:?}");

        let mut received = BTreeSet::new();
        while !confirmed.is_subset(&received) {
            let missing: Vec<_> = confirmed.difference(&received).collect();
            let delivery = next(&mut subscription, &format!("confirmed messages {missing:?}")).await;
            let index: usize = std::str::from_utf8(&delivery.message.payload).unwrap().parse().unwrap();
            assert_eq!(delivery.message, numbered(topic, index), "a delivery differs from what was published");
            received.insert(index);
            delivery.ack().await.ok();
        }
        publisher.close().await;
        consumer.close().await;
    })
    .await
    .expect("the test finished in time");
}

/// A server that comes back without its store (streams and consumers gone): publishes
/// recreate the stream, the subscription recreates its consumer and receives new messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_recreated_after_the_server_lost_its_store() {
    let Some(mut server) = Server::start() else { return };
    timeout(TEST_LIMIT, async {
        let broker = server.connect().await;
        let topic = "outage.lost-store";
        let mut subscription = broker.subscribe(SubscribeOptions::new(topic, "workers")).await.unwrap();
        broker.publish(numbered(topic, 0)).await.expect("publish before the outage");
        next(&mut subscription, "the message published before the outage").await.ack().await.unwrap();

        server.restart_empty();

        let deadline = Instant::now() + WAIT;
        while let Err(e) = broker.publish(numbered(topic, 1)).await {
            assert!(Instant::now() < deadline, "publishing after the restart kept failing: {e}");
            eprintln!("publish after an empty restart: {e}; retrying");
        }
        let after = next(&mut subscription, "a message published after the empty restart").await;
        assert_eq!(after.message, numbered(topic, 1));
        after.ack().await.expect("ack after the restart");
        broker.close().await;
    })
    .await
    .expect("the test finished in time");
}
