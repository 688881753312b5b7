//! Crash test: the orchestrator as its own process on a durable saga log and a
//! private NATS, the upstream mocks as their own processes; about 2,000
//! bookings across the three calls, some with FaultInject, while the
//! orchestrator is `kill -9`ed at random moments and restarted. At the end
//! every saga is Completed or Compensated, and the upstreams agree with it.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use booking::proto::pb::BookingRequest;
use booking::proto::pb::booking_service_client::BookingServiceClient;
use rand::Rng;
use support::{by_id, channel, free_ports, with_id};
use tokio::sync::Mutex;
use tonic::Code;

const BOOKINGS: usize = 2_000;
const CALLERS: usize = 32;
const KILLS: usize = 3;

/// A child process killed when dropped.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn wait_port(port: u16, what: &str, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr(port)).await.is_err() {
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("{what} exited with {status} before listening on {port}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port} within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn(name: &'static str, program: &Path, args: &[&str], log: &Path) -> Proc {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "info,h2=warn,tower=warn")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", program.display()));
    Proc { child }
}

/// Which durable saga log the orchestrator uses.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Embedded,
    Postgres,
}

struct Cluster {
    dir: PathBuf,
    config: PathBuf,
    grpc: u16,
    http: u16,
    orchestrator: Option<Proc>,
    /// The PostgreSQL schema of this run's saga log, dropped at the end.
    schema: Option<String>,
    _nats: Proc,
    _order: Proc,
    _payment: Proc,
    order_port: u16,
    payment_port: u16,
}

fn booking_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_booking"))
}

impl Cluster {
    async fn start(backend: Backend, postgres_url: Option<String>) -> Self {
        let dir = std::env::temp_dir().join(format!("sagaflow-crash-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("nats")).unwrap();
        let [nats_port, grpc, http, order_port, payment_port] = free_ports();
        let nats_port_s = nats_port.to_string();
        let nats_dir = dir.join("nats");
        let mut nats = spawn(
            "nats",
            Path::new("/usr/sbin/nats-server"),
            &["-js", "-a", "127.0.0.1", "-p", &nats_port_s, "-sd", nats_dir.to_str().unwrap()],
            &dir.join("nats.log"),
        );
        wait_port(nats_port, "nats-server", &mut nats).await;
        let log = match backend {
            Backend::Embedded => format!("saga_log: embedded\nsaga_log_url: {}\n", dir.join("data").display()),
            Backend::Postgres => format!(
                "saga_log: postgres\nsaga_log_url: {}\nsaga_log_schema: crash_{}\n",
                postgres_url.unwrap(),
                uuid::Uuid::new_v4().simple()
            ),
        };
        let schema = log.lines().find_map(|l| l.strip_prefix("saga_log_schema: ")).map(str::to_owned);
        let config = dir.join("app.yaml");
        std::fs::write(
            &config,
            format!(
                "pod_id: crash\ngrpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\n\
                 broker: nats\nbroker_url: nats://127.0.0.1:{nats_port}\n{log}\
                 upstream:\n  in_process: false\n  order_addr: 127.0.0.1:{order_port}\n  payment_addr: 127.0.0.1:{payment_port}\n\
                 message_queue:\n  topic_prefix: crash\n  topics:\n\
                 \x20   - {{id: ThrottlingBooking.CreateOrder, is_throttling: true, concurrency: 8}}\n\
                 \x20   - {{id: ThrottlingBooking.CreatePayment, is_throttling: true, concurrency: 8}}\n\
                 \x20   - {{id: ThrottlingBooking.rollback, is_throttling: true, concurrency: 8}}\n\
                 flow:\n  deadline_ms: 120000\n  retry: {{max_attempts: 8, initial_backoff_ms: 50}}\n\
                 wait_timeout_ms: 20000\n"
            ),
        )
        .unwrap();
        let (o, p) = (order_port.to_string(), payment_port.to_string());
        let bin = booking_bin();
        let cfg = config.to_str().unwrap().to_owned();
        let listen_o = format!("127.0.0.1:{o}");
        let listen_p = format!("127.0.0.1:{p}");
        let mut order =
            spawn("order", &bin, &["--config", &cfg, "order", "--listen", &listen_o], &dir.join("order.log"));
        let mut payment =
            spawn("payment", &bin, &["--config", &cfg, "payment", "--listen", &listen_p], &dir.join("payment.log"));
        wait_port(order_port, "order service", &mut order).await;
        wait_port(payment_port, "payment service", &mut payment).await;
        let mut cluster = Cluster {
            dir,
            config,
            grpc,
            http,
            orchestrator: None,
            schema,
            _nats: nats,
            _order: order,
            _payment: payment,
            order_port,
            payment_port,
        };
        cluster.start_orchestrator().await;
        cluster
    }

    async fn start_orchestrator(&mut self) {
        let cfg = self.config.to_str().unwrap().to_owned();
        let mut proc = spawn(
            "orchestrator",
            &booking_bin(),
            &["--config", &cfg, "orchestrator"],
            &self.dir.join("orchestrator.log"),
        );
        wait_port(self.grpc, "orchestrator", &mut proc).await;
        self.orchestrator = Some(proc);
    }

    fn kill_orchestrator(&mut self) {
        if let Some(mut proc) = self.orchestrator.take() {
            // SIGKILL: no shutdown code runs.
            proc.child.kill().unwrap();
            proc.child.wait().unwrap();
        }
    }

    fn recovered(&self) -> usize {
        let log = std::fs::read_to_string(self.dir.join("orchestrator.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("recovering unfinished sagas"))
            .filter_map(|l| l.split("count=").nth(1)?.split_whitespace().next()?.parse::<usize>().ok())
            .sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_orchestrator();
        if let Some(schema) = &self.schema {
            let _ = Command::new("psql")
                .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc"])
                .arg(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .output();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("crash test files kept in {}", self.dir.display());
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Sync,
    Async,
    Throttling,
}

/// Calls until the service gives a definitive answer; transient errors (the
/// orchestrator is down or restarting) are retried with the same request id.
async fn book(grpc: u16, id: &str, call: Call, fault: bool, stop: &AtomicBool) -> Result<bool, String> {
    let request = BookingRequest { product_id: 1, count: 1, fault_inject: fault, callback_url: String::new() };
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            return Err(format!("{id}: no definitive answer"));
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}")).unwrap();
        if let Ok(ch) = endpoint.connect_timeout(Duration::from_secs(1)).connect().await {
            let mut client = BookingServiceClient::new(ch);
            let result = match call {
                Call::Sync => client.handle_sync_booking(with_id(Some(id), request.clone())).await.map(|_| ()),
                Call::Async => client.handle_async_booking(with_id(Some(id), request.clone())).await.map(|_| ()),
                Call::Throttling => {
                    client.handle_throttling_booking(with_id(Some(id), request.clone())).await.map(|_| ())
                }
            };
            match result {
                Ok(()) => return Ok(true),
                Err(status) if status.code() == Code::Aborted => return Ok(false),
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::Internal
                    ) => {}
                Err(status) => return Err(format!("{id}: unexpected {status:?}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn saga_status(http: &reqwest::Client, port: u16, id: &str) -> Option<String> {
    let response = http.get(format!("http://127.0.0.1:{port}/api/sagas/{id}")).send().await.ok()?;
    let body: serde_json::Value = response.json().await.ok()?;
    body["state"]["status"].as_str().map(str::to_owned)
}

async fn run(backend: Backend, postgres_url: Option<String>) {
    let cluster = Arc::new(Mutex::new(Cluster::start(backend, postgres_url).await));
    let grpc = cluster.lock().await.grpc;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let jobs: Vec<(String, Call, bool)> = (0..BOOKINGS)
        .map(|i| {
            let call = [Call::Sync, Call::Async, Call::Throttling][i % 3];
            (format!("crash-{run_id}-{i}"), call, i % 10 == 7)
        })
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let jobs = Arc::new(jobs);
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let (next, stop, jobs) = (next.clone(), stop.clone(), jobs.clone());
        callers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, call, fault)) = jobs.get(i) else { return answers };
                answers.push((id.clone(), *call, *fault, book(grpc, id, *call, *fault, &stop).await));
            }
        }));
    }
    // Kill at random moments while the load runs: the k-th kill once a random point of the k-th
    // share of the bookings has been sent (a fast log gets through them all in about a second,
    // so a kill on a timer alone may come after the last one).
    let mut kills = 0;
    while kills < KILLS {
        let share = BOOKINGS / KILLS;
        let at = kills * share + rand::rng().random_range(share / 5..share * 4 / 5);
        let give_up = Instant::now() + Duration::from_secs(120);
        while next.load(Ordering::Relaxed) < at {
            assert!(
                Instant::now() < give_up,
                "the load stalled at {} of {BOOKINGS} bookings",
                next.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut c = cluster.lock().await;
        c.kill_orchestrator();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(50..400))).await;
        c.start_orchestrator().await;
    }
    let mut answers = Vec::new();
    for caller in callers {
        answers.extend(caller.await.unwrap());
    }
    let failed: Vec<_> = answers.iter().filter_map(|(_, _, _, r)| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} bookings without an answer, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    // Every saga ends Completed or Compensated.
    let http = reqwest::Client::new();
    let (http_port, order_port, payment_port) = {
        let c = cluster.lock().await;
        (c.http, c.order_port, c.payment_port)
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut statuses: HashMap<String, String> = HashMap::new();
    for (id, _, _, _) in &answers {
        loop {
            let status = saga_status(&http, http_port, id).await;
            if let Some(s) = status.as_deref()
                && (s == "completed" || s == "compensated")
            {
                statuses.insert(id.clone(), s.to_owned());
                break;
            }
            assert!(Instant::now() < deadline, "saga {id} did not end: {status:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The sync and throttled callers' answers agree with the record.
    for (id, call, _, answer) in &answers {
        if *call != Call::Async {
            let completed = *answer.as_ref().unwrap();
            assert_eq!(statuses[id] == "completed", completed, "{id}: caller was told {completed}");
        }
    }

    // The upstreams agree: an active order with an active payment, or a cancelled order and no active payment.
    let orders = by_id(
        &booking::proto::upstream::order_service_client::OrderServiceClient::new(channel(addr(order_port)).await)
            .snapshot(booking::proto::upstream::SnapshotRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    let payments = by_id(
        &booking::proto::upstream::payment_service_client::PaymentServiceClient::new(channel(addr(payment_port)).await)
            .snapshot(booking::proto::upstream::SnapshotRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    let mut compensated = 0;
    for (id, status) in &statuses {
        let order = orders.get(id).map(Vec::as_slice).unwrap_or_default();
        let payment = payments.get(id).map(Vec::as_slice).unwrap_or_default();
        assert!(order.len() <= 1 && payment.len() <= 1, "{id}: two records {order:?} {payment:?}");
        let order_status = order.first().map(|r| r.status.as_str());
        let payment_active = payment.first().is_some_and(|r| r.status == "active");
        match status.as_str() {
            "completed" => {
                assert_eq!(order_status, Some("active"), "{id} completed: order {order:?}");
                assert!(payment_active, "{id} completed: payment {payment:?}");
            }
            _ => {
                compensated += 1;
                assert!(matches!(order_status, None | Some("cancelled" | "tombstone")), "{id}: order {order:?}");
                assert!(!payment_active, "{id} compensated but payment active: {payment:?}");
            }
        }
    }
    let faults = answers.iter().filter(|(_, _, fault, _)| *fault).count();
    assert!(compensated >= faults, "every FaultInject booking compensates ({compensated} < {faults})");
    let recovered = cluster.lock().await.recovered();
    println!("crash test ({backend:?}): sagas {}", statuses.len());
    println!("crash test ({backend:?}): kills {kills}");
    println!("crash test ({backend:?}): recovered {recovered}");
    println!("crash test ({backend:?}): compensated {compensated} (fault-injected {faults})");
    println!("crash test ({backend:?}): completed {}", statuses.len() - compensated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_the_embedded_log() {
    if !Path::new("/usr/sbin/nats-server").exists() {
        if std::env::var_os("SAGAFLOW_REQUIRE_BROKERS").is_some() {
            panic!("nats-server is required for the crash test");
        }
        eprintln!("skipping: /usr/sbin/nats-server not found");
        return;
    }
    run(Backend::Embedded, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_postgres() {
    let url =
        std::env::var("SAGAFLOW_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    if tokio::net::TcpStream::connect("127.0.0.1:5432").await.is_err() || !Path::new("/usr/sbin/nats-server").exists() {
        if std::env::var_os("SAGAFLOW_REQUIRE_BROKERS").is_some() {
            panic!("PostgreSQL on 127.0.0.1:5432 and nats-server are required for the crash test");
        }
        eprintln!("skipping: PostgreSQL or nats-server not available");
        return;
    }
    run(Backend::Postgres, Some(url)).await;
}
