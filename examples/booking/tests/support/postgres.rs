//! A private PostgreSQL cluster (initdb + pg_ctl in a scratch directory, on its own port) for
//! tests that pause, stop or restart the database; the shared server is never touched.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::send_signal;

/// A cluster of its own, stopped and deleted when dropped.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    /// Whether commands run as the `postgres` user (PostgreSQL refuses to run as root).
    as_postgres: bool,
}

/// The newest PostgreSQL server binaries installed.
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PrivatePostgres {
    /// Creates and starts a cluster on a free port; `Err` says why it could not.
    pub fn start() -> Result<Self, String> {
        let bin = bin_dir().ok_or("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")?;
        let dir = std::env::temp_dir().join(format!("sagaflow-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let as_postgres = is_root();
        let [port] = super::free_ports();
        let cluster = Self { bin, dir, port, as_postgres };
        let (dir, data) = (cluster.dir.display().to_string(), cluster.data_arg());
        if as_postgres {
            cluster.run("chown", &["postgres", &dir], false)?;
        }
        cluster.run("initdb", &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"], true)?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Starts the server on the cluster's port (again, after [`stop`](Self::stop)).
    pub fn start_server(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60",
            self.port,
            self.dir.display()
        );
        self.run("pg_ctl", &["-D", &self.data_arg(), "-l", &self.log_arg(), "-w", "-o", &options, "start"], true)
    }

    /// Stops the server at once (`-m immediate`: connections are cut, as by a crash).
    pub fn stop(&self) -> Result<(), String> {
        self.run("pg_ctl", &["-D", &self.data_arg(), "-m", "immediate", "-w", "stop"], true)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn data_arg(&self) -> String {
        self.data().display().to_string()
    }

    fn log_arg(&self) -> String {
        self.log().display().to_string()
    }

    /// Runs `program` (a server binary when `server`), as `postgres` when running as root.
    fn run(&self, program: &str, args: &[&str], server: bool) -> Result<(), String> {
        let path = if server { self.bin.join(program) } else { PathBuf::from(program) };
        let mut command = if self.as_postgres && server {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        command.args(args);
        let output = command.output().map_err(|e| format!("running {}: {e}", path.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed: {}{}",
                path.display(),
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The postmaster and every process it started.
    pub fn pids(&self) -> Vec<u32> {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap_or_default();
        let Some(postmaster) = pid_file.lines().next().and_then(|l| l.trim().parse::<u32>().ok()) else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        pids.extend(children(postmaster));
        pids
    }

    /// SIGSTOPs the whole cluster: connections stay open but nothing answers, as a database
    /// host that froze (a VM pause, a stalled disk) would.
    pub fn freeze(&self) {
        for pid in self.pids() {
            send_signal(pid, "STOP");
        }
    }

    /// SIGCONTs the whole cluster.
    pub fn thaw(&self) {
        for pid in self.pids() {
            send_signal(pid, "CONT");
        }
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }
}

/// The processes whose parent is `parent` (from /proc).
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| ppid(*pid) == Some(parent))
        .collect()
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces, so split after its closing parenthesis.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = Command::new("kill").arg("-CONT").arg(pid.to_string()).status();
        }
        if !self.pids().is_empty()
            && let Err(e) = self.stop()
        {
            eprintln!("stopping the private PostgreSQL: {e}");
        }
        if std::thread::panicking() {
            eprintln!("private PostgreSQL files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
