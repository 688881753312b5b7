//! A full disk under the embedded saga log, with the booking service as its own process and its
//! data directory on a size-limited tmpfs: once the disk is filled, bookings are refused with
//! UNAVAILABLE and the health service says NOT_SERVING, without the process failing; once room
//! is made, the health service says SERVING and new bookings complete, without a restart; and
//! every booking answered, before, during and after, is in the log, also after a `kill -9` and
//! a restart.
//!
//! Mounting the tmpfs needs root (`mount -t tmpfs -o size=...`); without it the test is skipped,
//! unless `SAGAFLOW_REQUIRE_BROKERS` is set.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use booking::proto::pb::BookingRequest;
use booking::proto::pb::booking_service_client::BookingServiceClient;
use support::{free_ports, with_id};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The tmpfs: the write-ahead file (16 MiB) and the database file fit with room to spare.
const DISK_BYTES: u64 = 48 << 20;

/// A size-limited tmpfs, unmounted when dropped.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: PathBuf) -> Result<Self, String> {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={DISK_BYTES}"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !output.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Ok(Self { dir })
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x5Au8; 64 << 10];
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // What is left of a partly written chunk.
        while file.write_all(&[0x5A]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The booking service, killed when dropped.
struct Booking {
    child: Child,
}

impl Booking {
    async fn start(config: &Path, log: &Path, grpc: u16) -> Self {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_booking"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info,h2=warn,tower=warn")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("booking starts");
        let mut booking = Self { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", grpc)).await.is_err() {
            if let Ok(Some(status)) = booking.child.try_wait() {
                panic!("booking exited with {status}; see {}", log.display());
            }
            assert!(Instant::now() < deadline, "booking did not listen on {grpc} within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        booking
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn assert_alive(&mut self) {
        assert!(matches!(self.child.try_wait(), Ok(None)), "the booking process exited");
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Service {
    grpc: u16,
    http: u16,
    client: BookingServiceClient<tonic::transport::Channel>,
    health: HealthClient<tonic::transport::Channel>,
    web: reqwest::Client,
}

impl Service {
    async fn connect(grpc: u16, http: u16) -> Self {
        let channel = support::channel(([127, 0, 0, 1], grpc).into()).await;
        Self {
            grpc,
            http,
            client: BookingServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
            web: reqwest::Client::new(),
        }
    }

    async fn book(&mut self, id: &str) -> Result<(), tonic::Status> {
        let request = BookingRequest { product_id: 3, count: 1, fault_inject: false, callback_url: String::new() };
        let call = self.client.handle_sync_booking(with_id(Some(id), request));
        match tokio::time::timeout(Duration::from_secs(30), call).await {
            Ok(answer) => answer.map(|_| ()),
            Err(_) => panic!("booking {id} got no answer within 30 s (port {})", self.grpc),
        }
    }

    /// The health service's status of `service`.
    async fn health(&mut self, service: &str) -> ServingStatus {
        let answer = self.health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        ServingStatus::try_from(answer.status).unwrap()
    }

    /// Waits (bounded) until both "" and the booking service report `status`.
    async fn health_becomes(&mut self, status: ServingStatus, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (all, booking) = (self.health("").await, self.health("pb.BookingService").await);
            if all == status && booking == status {
                return;
            }
            assert!(Instant::now() < deadline, "health is {all:?} / {booking:?}, not {status:?}, after {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The saga log gauge as `/metrics` shows it.
    async fn log_gauge(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.http);
        let text = self.web.get(url).send().await.ok()?.text().await.ok()?;
        text.lines().find(|l| l.starts_with("sagaflow_saga_log_serving{")).map(str::to_owned)
    }

    /// The saga's status as the admin API reports it.
    async fn status(&self, id: &str) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/api/sagas/{id}", self.http);
        let body: serde_json::Value = self.web.get(url).send().await.ok()?.json().await.ok()?;
        body["state"]["status"].as_str().map(str::to_owned)
    }

    async fn assert_all_completed(&self, ids: &[String], when: &str) {
        for id in ids {
            assert_eq!(self.status(id).await.as_deref(), Some("completed"), "{when}: booking {id} answered OK");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_bookings_cleanly_and_they_succeed_again_once_it_has_room() {
    let root = std::env::temp_dir().join(format!("sagaflow-disk-full-{}", uuid::Uuid::new_v4().simple()));
    let disk = match SmallDisk::mount(root.join("disk")) {
        Ok(disk) => disk,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&root);
            return sagaflow::testsuite::skip_or_fail::<()>("a size-limited tmpfs (mount -t tmpfs)", e).unwrap_or(());
        }
    };
    let [grpc, http, order, payment] = free_ports();
    let config = root.join("app.yaml");
    std::fs::write(
        &config,
        format!(
            "pod_id: disk-full\ngrpc_listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\n\
             broker: memory\nsaga_log: embedded\nsaga_log_url: {}\n\
             upstream:\n  in_process: true\n  order_addr: 127.0.0.1:{order}\n  payment_addr: 127.0.0.1:{payment}\n",
            disk.dir.join("data").display()
        ),
    )
    .unwrap();
    let log = root.join("booking.log");
    let mut process = Booking::start(&config, &log, grpc).await;
    let mut service = Service::connect(grpc, http).await;
    service.health_becomes(ServingStatus::Serving, Duration::from_secs(10)).await;

    let mut answered: Vec<String> = Vec::new();
    for i in 0..30 {
        let id = format!("before-{i}");
        service.book(&id).await.unwrap_or_else(|e| panic!("{id}: {e:?}"));
        answered.push(id);
    }

    // The disk fills: bookings go on until the log cannot write, then are refused cleanly.
    let filler = disk.fill();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    let refusal = loop {
        assert!(Instant::now() < deadline, "no booking was refused on a full disk");
        let id = format!("filling-{n}");
        n += 1;
        match service.book(&id).await {
            Ok(()) => answered.push(id),
            Err(status) if status.code() == Code::Unavailable => break status,
            Err(status) => panic!("{id} on a full disk: {status:?}"),
        }
    };
    assert!(refusal.message().contains("saga log"), "{refusal:?}");
    service.health_becomes(ServingStatus::NotServing, Duration::from_secs(5)).await;
    assert!(service.log_gauge().await.is_some_and(|l| l.ends_with(" 0")), "{:?}", service.log_gauge().await);
    for i in 0..5 {
        let id = format!("full-{i}");
        match service.book(&id).await {
            Err(status) if status.code() == Code::Unavailable => {}
            other => panic!("{id} on a full disk: {other:?}"),
        }
    }
    process.assert_alive();

    // Room again: the log opens its file again by itself.
    std::fs::remove_file(&filler).unwrap();
    service.health_becomes(ServingStatus::Serving, Duration::from_secs(30)).await;
    assert!(service.log_gauge().await.is_some_and(|l| l.ends_with(" 1")), "{:?}", service.log_gauge().await);
    for i in 0..20 {
        let id = format!("after-{i}");
        service.book(&id).await.unwrap_or_else(|e| panic!("{id} once the disk has room: {e:?}"));
        answered.push(id);
    }
    service.assert_all_completed(&answered, "without a restart").await;

    // After a kill -9 and a restart, from the files alone.
    process.kill();
    let process = Booking::start(&config, &log, grpc).await;
    let service = Service::connect(grpc, http).await;
    service.assert_all_completed(&answered, "after a restart").await;
    drop(process);
    drop(disk);
    let _ = std::fs::remove_dir_all(&root);
}
