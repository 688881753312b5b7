//! Several booking orchestrators as processes of their own over one PostgreSQL saga log and
//! one broker (the shared servers on loopback, under a schema and a topic prefix of their own),
//! all calling one pair of mock upstreams, so that the mocks' snapshots see every effect.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use booking::proto::pb::BookingRequest;
use booking::proto::pb::booking_service_client::BookingServiceClient;
use booking::proto::upstream::order_service_client::OrderServiceClient;
use booking::proto::upstream::payment_service_client::PaymentServiceClient;
use booking::proto::upstream::{Record, SnapshotReply, SnapshotRequest};
use sagaflow::log::{ListFilter, SagaLog};
use sagaflow::{SagaRecord, SagaStatus};
use sagaflow_postgres::{PostgresOptions, PostgresSagaLog};
use tokio::task::JoinHandle;
use tonic::Code;

use super::{by_id, channel, free_ports, with_id};

/// The shared PostgreSQL the replicas' log lives in.
pub const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The broker the replicas share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Nats,
    Rabbitmq,
}

impl BrokerKind {
    fn port(self) -> u16 {
        match self {
            Self::Nats => 4222,
            Self::Rabbitmq => 5672,
        }
    }

    fn config(self) -> &'static str {
        match self {
            Self::Nats => "broker: nats\nbroker_url: nats://127.0.0.1:4222\n",
            // Each run's queues are its own: the shared server drops them a minute after the run.
            Self::Rabbitmq => {
                "broker: rabbitmq\nbroker_url: amqp://guest:guest@127.0.0.1:5672/%2f\nbroker_queue_expiry_ms: 60000\n"
            }
        }
    }
}

/// Whether PostgreSQL and the broker answer on loopback; when they do not, the test skips with
/// the reason printed, or fails when `SAGAFLOW_REQUIRE_BROKERS` is set.
pub fn servers_up(broker: BrokerKind) -> bool {
    for (name, port) in
        [("PostgreSQL", 5432), (if broker == BrokerKind::Nats { "NATS" } else { "RabbitMQ" }, broker.port())]
    {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::env::var_os("SAGAFLOW_REQUIRE_BROKERS").is_none(), "{name} on 127.0.0.1:{port} is required");
            eprintln!("skipping: {name} is not reachable on 127.0.0.1:{port}");
            return false;
        }
    }
    true
}

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(program: &Path, args: &[&str], env: &[(&str, String)], log: &Path) -> Self {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "info,h2=warn,tower=warn,sqlx=warn")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Self { child }
    }

    /// Sends a signal by name (`STOP`, `CONT`).
    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -s {signal} failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process dies of SIGKILL too.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_port(port: u16, what: &str, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("{what} exited with {status} before listening on {port}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port} within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn booking_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_booking"))
}

/// How a cluster is set up.
#[derive(Debug, Clone)]
pub struct Spec {
    pub replicas: usize,
    pub broker: BrokerKind,
    /// Latency of every call to the mock OrderService and PaymentService, in ms.
    pub order_latency_ms: u64,
    pub payment_latency_ms: u64,
    /// How long a caller waits for its saga, in ms.
    pub wait_timeout_ms: u64,
}

impl Spec {
    pub fn new(replicas: usize, broker: BrokerKind) -> Self {
        Self { replicas, broker, order_latency_ms: 5, payment_latency_ms: 20, wait_timeout_ms: 30_000 }
    }
}

/// One orchestrator process.
#[derive(Debug)]
pub struct Replica {
    pub pod: String,
    pub grpc: u16,
    pub http: u16,
    log: PathBuf,
    proc: Option<Proc>,
}

/// Replicas over one saga log schema and one topic prefix, and the mocks they call.
pub struct Cluster {
    pub dir: PathBuf,
    config: PathBuf,
    pub schema: String,
    pub prefix: String,
    pub replicas: Vec<Replica>,
    pub order_port: u16,
    pub payment_port: u16,
    _mocks: [Proc; 2],
    log: PostgresSagaLog,
    http: reqwest::Client,
}

/// Lease settings short enough for a test: a dead replica's sagas move within seconds.
pub const LEASE_TTL_MS: u64 = 2_000;
pub const LEASE_RENEW_MS: u64 = 500;

impl Cluster {
    pub async fn start(spec: Spec) -> Self {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("sagaflow-replicas-{}", &run[..12]));
        std::fs::create_dir_all(&dir).unwrap();
        let schema = format!("replicas_{}", &run[..16]);
        let prefix = format!("rep-{}", &run[..12]);
        let [order_port, payment_port] = free_ports();
        let config = dir.join("app.yaml");
        std::fs::write(
            &config,
            format!(
                "{broker}saga_log: postgres\nsaga_log_url: {POSTGRES_URL}\nsaga_log_schema: {schema}\n\
                 upstream:\n  in_process: false\n  order_addr: 127.0.0.1:{order_port}\n  payment_addr: 127.0.0.1:{payment_port}\n\
                 message_queue:\n  topic_prefix: {prefix}\n  topics:\n\
                 \x20   - {{id: ThrottlingBooking.CreateOrder, is_throttling: true, concurrency: 8}}\n\
                 \x20   - {{id: ThrottlingBooking.CreatePayment, is_throttling: true, concurrency: 8}}\n\
                 \x20   - {{id: ThrottlingBooking.rollback, is_throttling: true, concurrency: 8}}\n\
                 flow:\n  deadline_ms: 60000\n  retry: {{max_attempts: 8, initial_backoff_ms: 50}}\n\
                 \x20 compensation_retry: {{max_attempts: 20, initial_backoff_ms: 50}}\n\
                 wait_timeout_ms: {wait}\n\
                 replicas:\n  lease_ttl_ms: {LEASE_TTL_MS}\n  lease_renew_ms: {LEASE_RENEW_MS}\n",
                broker = spec.broker.config(),
                wait = spec.wait_timeout_ms,
            ),
        )
        .unwrap();
        let bin = booking_bin();
        let mock = |part: &str, port: u16, latency: u64| {
            let listen = format!("127.0.0.1:{port}");
            let latency = latency.to_string();
            Proc::spawn(
                &bin,
                &[part, "--listen", &listen, "--latency-ms", &latency],
                &[],
                &dir.join(format!("{part}.log")),
            )
        };
        let mut order = mock("order", order_port, spec.order_latency_ms);
        let mut payment = mock("payment", payment_port, spec.payment_latency_ms);
        wait_port(order_port, "order service", &mut order).await;
        wait_port(payment_port, "payment service", &mut payment).await;

        let options = PostgresOptions::from_url(POSTGRES_URL).unwrap().schema(schema.clone()).pool_size(2);
        let log = PostgresSagaLog::connect(options.prune_interval(None)).await.expect("the saga log's PostgreSQL");
        let replicas = (0..spec.replicas)
            .map(|i| {
                let [grpc, http] = free_ports();
                let pod = format!("r{i}-{}", &run[..6]);
                Replica { log: dir.join(format!("{pod}.log")), pod, grpc, http, proc: None }
            })
            .collect();
        let mut cluster = Self {
            dir,
            config,
            schema,
            prefix,
            replicas,
            order_port,
            payment_port,
            _mocks: [order, payment],
            log,
            http: reqwest::Client::new(),
        };
        // One at a time: the first creates the schema the others find.
        for i in 0..spec.replicas {
            cluster.start_replica(i).await;
        }
        cluster
    }

    /// Starts replica `i` (again, after a kill: same pod id, same ports); returns once it serves.
    pub async fn start_replica(&mut self, i: usize) {
        let replica = &mut self.replicas[i];
        assert!(replica.proc.is_none(), "replica {i} runs already");
        let env = [
            ("POD_ID", replica.pod.clone()),
            ("SAGAFLOW_GRPC_LISTEN", format!("127.0.0.1:{}", replica.grpc)),
            ("SAGAFLOW_HTTP_LISTEN", format!("127.0.0.1:{}", replica.http)),
        ];
        let config = self.config.to_str().unwrap();
        let mut proc = Proc::spawn(&booking_bin(), &["--config", config, "orchestrator"], &env, &replica.log);
        wait_port(replica.grpc, &replica.pod, &mut proc).await;
        wait_port(replica.http, &replica.pod, &mut proc).await;
        replica.proc = Some(proc);
    }

    /// SIGKILLs replica `i` (no shutdown code runs); returns the Unix ms just before the signal.
    pub fn kill(&mut self, i: usize) -> u64 {
        let mut proc = self.replicas[i].proc.take().expect("a running replica");
        let at = sagaflow::now_ms();
        proc.child.kill().unwrap();
        proc.child.wait().unwrap();
        at
    }

    /// SIGSTOPs replica `i`: it holds its connections and does nothing; returns the Unix ms.
    pub fn pause(&self, i: usize) -> u64 {
        let at = sagaflow::now_ms();
        self.replicas[i].proc.as_ref().expect("a running replica").signal("STOP");
        at
    }

    /// SIGCONTs replica `i`.
    pub fn resume(&self, i: usize) {
        self.replicas[i].proc.as_ref().expect("a running replica").signal("CONT");
    }

    pub fn grpc_ports(&self) -> Vec<u16> {
        self.replicas.iter().map(|r| r.grpc).collect()
    }

    /// What replica `i` logged so far.
    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(&self.replicas[i].log).unwrap_or_default()
    }

    /// The sum of a counter over its labels on replica `i`'s `/metrics`; 0 when absent.
    pub async fn counter(&self, i: usize, name: &str) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.replicas[i].http);
        let text = self.http.get(url).send().await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Every saga in the log.
    pub async fn records(&self) -> HashMap<String, SagaRecord> {
        let all = self.log.list(ListFilter::default()).await.expect("reading the saga log");
        all.into_iter().map(|r| (r.request_id.clone(), r)).collect()
    }

    /// Waits until each of `ids`, and every other saga in the log, has ended; returns them all.
    pub async fn all_ended(&self, ids: &[String], within: Duration) -> HashMap<String, SagaRecord> {
        let deadline = Instant::now() + within;
        loop {
            let records = self.records().await;
            let open: Vec<String> = ids
                .iter()
                .filter(|id| !records.get(*id).is_some_and(|r| r.state.is_ended()))
                .chain(records.values().filter(|r| !r.state.is_ended()).map(|r| &r.request_id))
                .cloned()
                .collect();
            if open.is_empty() {
                return records;
            }
            if Instant::now() > deadline {
                let sample: Vec<String> = open
                    .iter()
                    .take(5)
                    .map(|id| match records.get(id) {
                        Some(r) => format!("{id}: {} owned by {:?}", r.status(), r.owner),
                        None => format!("{id}: not in the log"),
                    })
                    .collect();
                panic!("{} sagas did not end within {within:?}, e.g. {sample:?}", open.len());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn orders(&self) -> SnapshotReply {
        let ch = channel(SocketAddr::from(([127, 0, 0, 1], self.order_port))).await;
        OrderServiceClient::new(ch).snapshot(SnapshotRequest {}).await.unwrap().into_inner()
    }

    pub async fn payments(&self) -> SnapshotReply {
        let ch = channel(SocketAddr::from(([127, 0, 0, 1], self.payment_port))).await;
        PaymentServiceClient::new(ch).snapshot(SnapshotRequest {}).await.unwrap().into_inner()
    }

    /// Checks that the upstreams agree with every ended saga: one record at most per request id
    /// and service; a completed saga has its active order and its active payment, a compensated
    /// one no active payment and no active order. Returns the mocks' snapshots.
    pub async fn check_effects(&self, records: &HashMap<String, SagaRecord>) -> Effects {
        let (orders, payments) = (self.orders().await, self.payments().await);
        let (order_map, payment_map) = (by_id(&orders), by_id(&payments));
        let mut effects = Effects::default();
        for (id, record) in records {
            let order = order_map.get(id).map(Vec::as_slice).unwrap_or_default();
            let payment = payment_map.get(id).map(Vec::as_slice).unwrap_or_default();
            assert!(order.len() <= 1 && payment.len() <= 1, "{id}: two records {order:?} {payment:?}");
            let active = |r: &[Record]| r.first().is_some_and(|r| r.status == "active");
            match record.status() {
                SagaStatus::Completed => {
                    effects.completed += 1;
                    assert!(active(order) && active(payment), "{id} completed: order {order:?}, payment {payment:?}");
                }
                SagaStatus::Compensated => {
                    effects.compensated += 1;
                    assert!(
                        !active(order) && !active(payment),
                        "{id} compensated: order {order:?}, payment {payment:?}"
                    );
                }
                other => panic!("{id} is {other}, not completed or compensated"),
            }
        }
        // Nothing happened upstream for a request id the log does not know.
        for id in order_map.keys().chain(payment_map.keys()) {
            assert!(records.contains_key(id), "an upstream record for `{id}`, which has no saga");
        }
        let counter = |s: &SnapshotReply| s.counters.unwrap_or_default();
        effects.duplicates_absorbed = counter(&orders).duplicates_absorbed + counter(&payments).duplicates_absorbed;
        effects.refused_after_cancel = counter(&orders).refused_after_cancel + counter(&payments).refused_after_cancel;
        effects
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for replica in &mut self.replicas {
            replica.proc.take();
        }
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc"])
            .arg(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .output();
        if std::thread::panicking() {
            eprintln!("replica logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What the upstreams saw, per [`Cluster::check_effects`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Effects {
    pub completed: usize,
    pub compensated: usize,
    /// Repeated creates and cancels the mocks answered with the existing record.
    pub duplicates_absorbed: u64,
    /// Creates that arrived after their request id was cancelled (and were refused).
    pub refused_after_cancel: u64,
}

/// The three booking calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Sync,
    Async,
    Throttling,
}

/// One booking of a load: its request id, call, FaultInject, and the replica it goes to first.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub call: Call,
    pub fault: bool,
    pub replica: usize,
}

/// `n` bookings spread round-robin over `replicas` replicas and the three calls, one in ten
/// with FaultInject.
pub fn mixed_jobs(tag: &str, n: usize, replicas: usize) -> Vec<Job> {
    (0..n)
        .map(|i| Job {
            id: format!("{tag}-{i}"),
            call: [Call::Sync, Call::Async, Call::Throttling][(i / replicas) % 3],
            fault: i % 10 == 7,
            replica: i % replicas,
        })
        .collect()
}

/// Makes one call; `Ok(true)` completed (or accepted, for an async call), `Ok(false)` aborted
/// (compensated), `Err` with the status otherwise.
pub async fn call_once(port: u16, job: &Job) -> Result<bool, tonic::Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    let ch = endpoint
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting to {port}: {e}")))?;
    let mut client = BookingServiceClient::new(ch);
    let request = BookingRequest { product_id: 1, count: 1, fault_inject: job.fault, callback_url: String::new() };
    let result = match job.call {
        Call::Sync => client.handle_sync_booking(with_id(Some(&job.id), request)).await.map(|_| ()),
        Call::Async => client.handle_async_booking(with_id(Some(&job.id), request)).await.map(|_| ()),
        Call::Throttling => client.handle_throttling_booking(with_id(Some(&job.id), request)).await.map(|_| ()),
    };
    match result {
        Ok(()) => Ok(true),
        Err(status) if status.code() == Code::Aborted => Ok(false),
        Err(status) => Err(status),
    }
}

/// Calls until a replica gives a definitive answer: first the job's replica, and on a transient
/// error (a replica down, restarting, or a wait that timed out) the next one, with the same
/// request id. Returns the answer and how many calls were transient failures.
pub async fn book(ports: &[u16], job: &Job, within: Duration) -> (Result<bool, String>, usize) {
    let deadline = Instant::now() + within;
    // Every turn but the last is a transient failure.
    for failures in 0.. {
        if Instant::now() > deadline {
            return (Err(format!("{}: no definitive answer within {within:?}", job.id)), failures);
        }
        let port = ports[(job.replica + failures) % ports.len()];
        match tokio::time::timeout(Duration::from_secs(90), call_once(port, job)).await {
            Ok(Ok(answer)) => return (Ok(answer), failures),
            Ok(Err(status))
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::Internal
                ) => {}
            Ok(Err(status)) => return (Err(format!("{}: unexpected {status:?}", job.id)), failures),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!("the loop returns")
}

/// One job's answer.
#[derive(Debug)]
pub struct Answer {
    pub job: Job,
    pub result: Result<bool, String>,
    /// Calls that failed transiently before the answer.
    pub retries: usize,
}

/// Jobs being sent by concurrent callers.
pub struct Load {
    next: Arc<AtomicUsize>,
    callers: Vec<JoinHandle<Vec<Answer>>>,
    total: usize,
}

impl Load {
    pub fn start(ports: Vec<u16>, jobs: Vec<Job>, callers: usize) -> Self {
        let next = Arc::new(AtomicUsize::new(0));
        let total = jobs.len();
        let (jobs, ports) = (Arc::new(jobs), Arc::new(ports));
        let callers = (0..callers)
            .map(|_| {
                let (next, jobs, ports) = (next.clone(), jobs.clone(), ports.clone());
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    while let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let (result, retries) = book(&ports, job, Duration::from_secs(150)).await;
                        answers.push(Answer { job: job.clone(), result, retries });
                    }
                    answers
                })
            })
            .collect();
        Self { next, callers, total }
    }

    /// Waits until `n` jobs have been picked up by callers (at most 60 s).
    pub async fn sent(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.next.load(Ordering::Relaxed) < n.min(self.total) {
            assert!(
                Instant::now() < deadline,
                "the load stalled at {} of {}",
                self.next.load(Ordering::Relaxed),
                self.total
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for every answer; each must be definitive.
    pub async fn finish(self) -> Vec<Answer> {
        let mut answers = Vec::new();
        for caller in self.callers {
            answers.extend(caller.await.unwrap());
        }
        let failed: Vec<&String> = answers.iter().filter_map(|a| a.result.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{} bookings without an answer, e.g. {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        answers
    }
}

/// The sync and throttled callers' answers agree with the log; every FaultInject saga compensated.
pub fn check_answers(answers: &[Answer], records: &HashMap<String, SagaRecord>) {
    for a in answers {
        let record = &records[&a.job.id];
        assert_eq!(
            record.facade.starts_with("Sync"),
            a.job.call == Call::Sync,
            "{}: facade {}",
            a.job.id,
            record.facade
        );
        if a.job.fault {
            assert_eq!(record.status(), SagaStatus::Compensated, "{}: FaultInject, yet {}", a.job.id, record.status());
        }
        if a.job.call != Call::Async {
            let completed = *a.result.as_ref().unwrap();
            assert_eq!(record.status() == SagaStatus::Completed, completed, "{}: caller told {completed}", a.job.id);
        }
    }
}
