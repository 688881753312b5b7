//! `sagaflow-ctl`: an operator's command line over a sagaflow service's admin
//! API. The token comes from `SAGAFLOW_ADMIN_TOKEN`, the address from `--url`
//! or `SAGAFLOW_ADMIN_URL`, who acts from `--operator`, `SAGAFLOW_OPERATOR` or
//! `USER`.
//!
//! ```text
//! sagaflow-ctl list --status stuck
//! sagaflow-ctl show 0193a6c1-...
//! sagaflow-ctl abort 0193a6c1-... --reason "the customer cancelled"
//! sagaflow-ctl resolve 0193a6c1-... --step 1 --reason "refunded in the payment console"
//! sagaflow-ctl audit 0193a6c1-...
//! sagaflow-ctl redrive --facade AsyncBooking --failed-step 1 --dry-run
//! sagaflow-ctl pause SyncBooking
//! ```

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

/// Prints a line to stdout; a reader gone away (`sagaflow-ctl list | head`) ends the
/// command quietly, as it ends any Unix filter, instead of failing on the write.
macro_rules! out {
    ($($arg:tt)*) => {
        emit(format_args!($($arg)*))
    };
}

fn emit(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if stdout.write_fmt(line).and_then(|()| stdout.write_all(b"\n")).is_err() {
        std::process::exit(0);
    }
}

/// Header naming the operator, as the admin API reads it.
const OPERATOR_HEADER: &str = "x-sagaflow-operator";
/// Header naming the next page's cursor.
const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

#[derive(Debug, Parser)]
#[command(name = "sagaflow-ctl", version, about = "List, inspect, retry, abort, resolve and redrive sagas.")]
struct Cli {
    /// The admin API's address.
    #[arg(long, env = "SAGAFLOW_ADMIN_URL", default_value = "http://127.0.0.1:10090")]
    url: String,
    /// The admin token (sent as a bearer token).
    #[arg(long, env = "SAGAFLOW_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Who acts, recorded in the saga's history.
    #[arg(long, env = "SAGAFLOW_OPERATOR")]
    operator: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sagas, newest first.
    List {
        #[arg(long)]
        facade: Option<String>,
        /// running, compensating, completed, compensated or stuck.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// The cursor a previous page printed.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// One saga with its history.
    Show { request_id: String },
    /// Who did what to a saga (abort, resolve, retry), when and why.
    Audit { request_id: String },
    /// Retry a stuck saga's compensation.
    Retry { request_id: String },
    /// Abort a running saga: it stops at the next step and compensates.
    Abort {
        request_id: String,
        #[arg(long)]
        reason: String,
    },
    /// Settle a stuck saga's pending compensation of `--step` by hand.
    Resolve {
        request_id: String,
        #[arg(long)]
        step: usize,
        #[arg(long)]
        reason: String,
    },
    /// Refuse new calls of a facade (every replica, across restarts) until resumed.
    Pause {
        facade: String,
        /// Keep new calls waiting for the resume (at most the wait timeout) instead of refusing them.
        #[arg(long)]
        queue: bool,
    },
    /// Take new calls of a paused facade again.
    Resume { facade: String },
    /// Retry every stuck saga matching the filter, at a bounded rate.
    Redrive {
        #[arg(long)]
        facade: Option<String>,
        #[arg(long)]
        failed_step: Option<usize>,
        /// Only sagas whose error contains this text.
        #[arg(long = "error")]
        error_contains: Option<String>,
        #[arg(long)]
        since_ms: Option<u64>,
        #[arg(long)]
        until_ms: Option<u64>,
        #[arg(long, default_value_t = 50)]
        per_second: u32,
        /// Count the matching sagas; retry none.
        #[arg(long)]
        dry_run: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sagaflow-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The admin API as this command line calls it.
struct Api {
    client: reqwest::Client,
    url: String,
    token: Option<String>,
    operator: String,
}

impl Api {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request =
            self.client.request(method, format!("{}{path}", self.url)).header(OPERATOR_HEADER, &self.operator);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
    }

    /// Sends the request; the answer's JSON and its next-page cursor, or the API's error.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(Value, Option<String>)> {
        let response = request.send().await.with_context(|| format!("cannot reach the admin API at {}", self.url))?;
        let status = response.status();
        let cursor = response.headers().get(NEXT_CURSOR_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body["error"].as_str().map(str::to_owned).unwrap_or_else(|| body.to_string());
            bail!("{status}: {message}");
        }
        Ok((body, cursor))
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let operator = cli.operator.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "admin".to_owned());
    let api = Api {
        client: reqwest::Client::new(),
        url: cli.url.trim_end_matches('/').to_owned(),
        token: cli.token.filter(|t| !t.is_empty()),
        operator,
    };
    let post = reqwest::Method::POST;
    let (body, cursor) = match &cli.command {
        Command::List { facade, status, limit, cursor } => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(facade.clone().map(|f| ("facade", f)));
            query.extend(status.clone().map(|s| ("status", s)));
            query.extend(cursor.clone().map(|c| ("cursor", c)));
            let mut list = reqwest::Url::parse(&format!("{}/api/sagas", api.url)).context("--url")?;
            list.query_pairs_mut().extend_pairs(&query);
            let path = format!("/api/sagas?{}", list.query().unwrap_or_default());
            api.send(api.request(reqwest::Method::GET, &path)).await?
        }
        Command::Show { request_id } => api.send(api.request(reqwest::Method::GET, &saga_path(request_id, ""))).await?,
        Command::Audit { request_id } => {
            api.send(api.request(reqwest::Method::GET, &saga_path(request_id, "/audit"))).await?
        }
        Command::Retry { request_id } => api.send(api.request(post, &saga_path(request_id, "/retry"))).await?,
        Command::Abort { request_id, reason } => {
            let body = json!({ "reason": reason });
            api.send(api.request(post, &saga_path(request_id, "/abort")).json(&body)).await?
        }
        Command::Resolve { request_id, step, reason } => {
            let body = json!({ "step": step, "reason": reason });
            api.send(api.request(post, &saga_path(request_id, "/resolve")).json(&body)).await?
        }
        Command::Pause { facade, queue } => {
            let mode = if *queue { "queue" } else { "refuse" };
            api.send(api.request(post, &format!("/api/flows/{}/pause?mode={mode}", escape(facade)))).await?
        }
        Command::Resume { facade } => {
            api.send(api.request(post, &format!("/api/flows/{}/resume", escape(facade)))).await?
        }
        Command::Redrive { facade, failed_step, error_contains, since_ms, until_ms, per_second, dry_run } => {
            let body = json!({
                "facade": facade, "failed_step": failed_step, "error_contains": error_contains,
                "since_ms": since_ms, "until_ms": until_ms, "per_second": per_second, "dry_run": dry_run,
            });
            api.send(api.request(post, "/api/redrive").json(&body)).await?
        }
    };
    if cli.json {
        out!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    match &cli.command {
        Command::List { .. } => {
            print_table(body.as_array().map(Vec::as_slice).unwrap_or_default());
            if let Some(cursor) = cursor {
                out!("next page: --cursor {cursor}");
            }
        }
        Command::Redrive { dry_run, .. } => {
            let matched = body["matched"].as_u64().unwrap_or(0);
            let verb = if *dry_run { "would be retried" } else { "retried" };
            out!("{matched} stuck sagas {verb}");
        }
        Command::Pause { facade, .. } | Command::Resume { facade } => {
            let state = match (body["paused"].as_bool(), body["mode"].as_str()) {
                (Some(true), Some("queue")) => "paused (new calls queued)",
                (Some(true), _) => "paused",
                _ => "resumed",
            };
            out!("{facade} {state} by {}", body["by"].as_str().unwrap_or("?"));
        }
        Command::Audit { .. } => print_audit(&body),
        _ => print_saga(&body),
    }
    Ok(())
}

/// `/api/sagas/<id><rest>`, the id escaped for a path.
fn saga_path(request_id: &str, rest: &str) -> String {
    format!("/api/sagas/{}{rest}", escape(request_id))
}

/// `text` escaped for one path segment.
fn escape(text: &str) -> String {
    let mut escaped = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            escaped.push(byte as char);
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    escaped
}

fn status(saga: &Value) -> &str {
    saga["state"]["status"].as_str().unwrap_or("?")
}

fn print_table(sagas: &[Value]) {
    out!("{:<40} {:<20} {:<13} {:>5} {:>15}", "REQUEST ID", "FACADE", "STATUS", "STEPS", "CREATED (ms)");
    for saga in sagas {
        let steps = format!("{}/{}", saga["completed"].as_u64().unwrap_or(0), saga["steps"].as_u64().unwrap_or(0));
        out!(
            "{:<40} {:<20} {:<13} {:>5} {:>15}",
            saga["request_id"].as_str().unwrap_or("?"),
            saga["facade"].as_str().unwrap_or("?"),
            status(saga),
            steps,
            saga["created_ms"].as_u64().unwrap_or(0),
        );
    }
}

fn print_audit(audit: &Value) {
    out!(
        "{} ({}, {})",
        audit["request_id"].as_str().unwrap_or("?"),
        audit["facade"].as_str().unwrap_or("?"),
        audit["status"].as_str().unwrap_or("?")
    );
    out!("{:>15}  {:<8} {:<16} {:>4}  REASON", "AT (ms)", "ACTION", "BY", "STEP");
    for action in audit["actions"].as_array().map(Vec::as_slice).unwrap_or_default() {
        out!(
            "{:>15}  {:<8} {:<16} {:>4}  {}",
            action["at_ms"].as_u64().unwrap_or(0),
            action["action"].as_str().unwrap_or("?"),
            action["by"].as_str().unwrap_or("-"),
            action["step"].as_u64().map(|s| s.to_string()).unwrap_or_default(),
            action["reason"].as_str().unwrap_or(""),
        );
    }
}

fn print_saga(saga: &Value) {
    out!("request id  {}", saga["request_id"].as_str().unwrap_or("?"));
    out!("facade      {} ({})", saga["facade"].as_str().unwrap_or("?"), saga["mode"].as_str().unwrap_or("?"));
    out!("status      {}", status(saga));
    if let Some(error) = saga["state"]["failure"]["error"].as_str() {
        out!("failure     {error}");
    }
    if let Some(reason) = saga["state"]["reason"].as_str() {
        out!("stuck       {reason}");
    }
    if let Some(pending) = saga["state"]["pending"].as_array() {
        out!("pending     {}", pending.iter().map(Value::to_string).collect::<Vec<_>>().join(", "));
    }
    out!("history");
    for entry in saga["history"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let step = entry["step"].as_u64().map(|s| format!(" step {s}")).unwrap_or_default();
        let error = entry["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default();
        // An operator's retry has no error text; name who asked.
        let error = match (error.is_empty(), entry["by"].as_str()) {
            (true, Some(by)) => format!(" by {by}"),
            _ => error,
        };
        out!("  {:>15}  {}{step}{error}", entry["at_ms"].as_u64().unwrap_or(0), entry["event"].as_str().unwrap_or("?"));
    }
}
