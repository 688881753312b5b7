//! The booking binary and servers as child processes: started, signalled, killed, waited for.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `booking` binary cargo built for these tests.
pub fn booking_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_booking"))
}

/// Starts `booking --config CONFIG orchestrator`, logging to `log`, and waits for each of `ports`.
pub async fn spawn_orchestrator(config: &Path, log: &Path, ports: &[u16]) -> Proc {
    let config = config.to_str().expect("a UTF-8 config path").to_owned();
    let mut proc = Proc::spawn("orchestrator", &booking_bin(), &["--config", &config, "orchestrator"], log);
    for &port in ports {
        proc.wait_port(port).await;
    }
    proc
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child process, killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    /// Starts `program` with its stdout and stderr appended to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[&str], log: &Path) -> Self {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info,h2=warn,tower=warn")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", program.display()));
        Self { name: name.to_owned(), child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a name such as `TERM`, `STOP`, `CONT`).
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (polling) up to `within` for the process to exit.
    pub async fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until something listens on `port`; panics if the process exits first or after 30 s.
    pub async fn wait_port(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(loopback(port)).await.is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status} before listening on {port}", self.name);
            }
            assert!(Instant::now() < deadline, "{} did not listen on {port} within 30 s", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends `signal` to `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().expect("kill(1) runs");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A scratch directory, removed at the end unless the test failed (then its path is printed).
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sagaflow-{what}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `text` to `name` in the directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The booking service's admin HTTP API and metrics, as an operator reads them.
#[derive(Clone)]
pub struct Admin {
    pub port: u16,
    web: reqwest::Client,
}

impl Admin {
    pub fn new(port: u16) -> Self {
        Self { port, web: reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap() }
    }

    /// The saga's status (`running`, `compensating`, `completed`, ...), if the API answers.
    pub async fn status(&self, id: &str) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/api/sagas/{id}", self.port);
        let body: serde_json::Value = self.web.get(url).send().await.ok()?.json().await.ok()?;
        body["state"]["status"].as_str().map(str::to_owned)
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        self.web.get(url).send().await.ok()?.text().await.ok()
    }

    /// The sum of every series of metric `name` on `/metrics` (0 when it has none yet).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await.expect("/metrics answers");
        metric_sum(&text, name)
    }

    /// Waits until every saga of `ids` has ended (completed, compensated or stuck), at most
    /// `within`; returns each one's status. Panics naming a saga that did not end.
    pub async fn wait_ended(&self, ids: &[String], within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut statuses = Vec::with_capacity(ids.len());
        for id in ids {
            loop {
                let status = self.status(id).await;
                if let Some(s) = status.as_deref()
                    && matches!(s, "completed" | "compensated" | "stuck")
                {
                    statuses.push(s.to_owned());
                    break;
                }
                assert!(Instant::now() < deadline, "saga {id} did not end within {within:?}: {status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        statuses
    }
}

/// The sum of every series of metric `name` in a Prometheus text page.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many lines of a process's log contain `needle`.
pub fn log_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains(needle)).count()
}

/// The `count=` of every "recovering unfinished sagas" line of a booking log, summed.
pub fn recovered(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("recovering unfinished sagas"))
        .filter_map(|l| l.split("count=").nth(1)?.split_whitespace().next()?.parse::<usize>().ok())
        .sum()
}
