//! `sagaflow-ctl` as its own process against a live admin API: every command,
//! table and JSON output, the token, and the errors an operator sees.

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sagaflow::{Flow, MemoryBroker, MemorySagaLog, Node, NodeError, Orchestrator, RetryPolicy, SagaStatus, Step};
use serde_json::Value;

const TOKEN: &str = "s3cret-token";

/// A payment whose refund fails until the service is fixed.
struct Payment {
    fixed: Arc<AtomicBool>,
}

#[sagaflow::async_trait]
impl Node<u32> for Payment {
    fn name(&self) -> &str {
        "Payment"
    }
    async fn action(&self, _: &Step, _: &mut u32) -> Result<(), NodeError> {
        Ok(())
    }
    async fn compensate(&self, _: &Step, _: &u32) -> Result<(), NodeError> {
        if self.fixed.load(Ordering::SeqCst) { Ok(()) } else { Err(NodeError::retryable("payment service down")) }
    }
}

/// A shipment that is always refused, or takes `delay`.
struct Shipment {
    delay: Option<Duration>,
}

#[sagaflow::async_trait]
impl Node<u32> for Shipment {
    fn name(&self) -> &str {
        "Shipment"
    }
    async fn action(&self, _: &Step, _: &mut u32) -> Result<(), NodeError> {
        match self.delay {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
            None => Err(NodeError::permanent("no courier")),
        }
    }
}

fn quick() -> RetryPolicy {
    RetryPolicy::default().attempts(2).backoff(Duration::from_millis(1), Duration::from_millis(2))
}

/// Runs the command line with `args`, as an operator named alice.
async fn ctl(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sagaflow-ctl"));
    command
        .args(args)
        .env("SAGAFLOW_ADMIN_URL", url)
        .env("SAGAFLOW_OPERATOR", "alice")
        .env_remove("SAGAFLOW_ADMIN_TOKEN");
    if let Some(token) = token {
        command.env("SAGAFLOW_ADMIN_TOKEN", token);
    }
    tokio::task::spawn_blocking(move || command.output().expect("sagaflow-ctl runs")).await.unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn status_is(o: &Orchestrator, id: &str, status: SagaStatus) {
    for _ in 0..500 {
        if o.saga(id).await.unwrap().is_some_and(|r| r.status() == status) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never became {status}: {:?}", o.saga(id).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_against_a_live_admin_api() {
    let fixed = Arc::new(AtomicBool::new(false));
    let stuck_flow = Flow::new()
        .node(Payment { fixed: fixed.clone() })
        .node(Shipment { delay: None })
        .retry(quick())
        .compensation_retry(quick());
    let slow_flow = Flow::new()
        .node(Payment { fixed: Arc::new(AtomicBool::new(true)) })
        .node(Shipment { delay: Some(Duration::from_secs(2)) });
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .asynchronous("Ship", stuck_flow)
        .sync("Slow", slow_flow)
        .start()
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let hosts = booking::admin::AdminHosts::new(listener.local_addr().unwrap(), &[]).unwrap();
    let admin = booking::admin::serve(listener, o.clone(), Some(TOKEN.into()), true, hosts, stop.clone());
    let server = tokio::spawn(admin);
    for i in 0..5 {
        o.submit("Ship", &format!("ship-{i}"), 1u32, None).await.unwrap();
    }
    for i in 0..5 {
        status_is(&o, &format!("ship-{i}"), SagaStatus::Stuck).await;
    }
    let token = Some(TOKEN);

    // Without the token: refused, with the API's reason.
    let refused = ctl(&url, None, &["list"]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"), "{refused:?}");

    let table = stdout(&ctl(&url, token, &["list", "--status", "stuck", "--limit", "3"]).await);
    assert_eq!(table.lines().filter(|l| l.contains(" stuck ")).count(), 3, "{table}");
    let cursor = table.lines().find_map(|l| l.strip_prefix("next page: --cursor ")).expect("a next page").to_owned();
    let json = stdout(&ctl(&url, token, &["--json", "list", "--status", "stuck", "--cursor", &cursor]).await);
    let rest: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(rest.as_array().unwrap().len(), 2, "the second page");

    // A reader that goes away early (`| head`) ends the command quietly, not with a panic.
    let mut early = std::process::Command::new(env!("CARGO_BIN_EXE_sagaflow-ctl"));
    early.args(["list", "--limit", "1000"]).env("SAGAFLOW_ADMIN_URL", &url).env("SAGAFLOW_ADMIN_TOKEN", TOKEN);
    let mut child = early.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let gone = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert!(gone.status.success(), "{gone:?}");
    assert!(!String::from_utf8_lossy(&gone.stderr).contains("panicked"), "{gone:?}");

    let shown = stdout(&ctl(&url, token, &["show", "ship-0"]).await);
    assert!(shown.contains("status      stuck") && shown.contains("compensation_gave_up"), "{shown}");

    let dry = stdout(&ctl(&url, token, &["redrive", "--facade", "Ship", "--failed-step", "1", "--dry-run"]).await);
    assert_eq!(dry.trim(), "5 stuck sagas would be retried");

    let resolved =
        stdout(&ctl(&url, token, &["resolve", "ship-0", "--step", "0", "--reason", "refunded by hand"]).await);
    assert!(resolved.contains("status      compensated"), "{resolved}");
    let history = stdout(&ctl(&url, token, &["show", "ship-0"]).await);
    assert!(history.contains("resolved step 0: resolved by alice: refunded by hand"), "{history}");

    fixed.store(true, Ordering::SeqCst);
    let redriven = stdout(&ctl(&url, token, &["redrive", "--facade", "Ship"]).await);
    assert_eq!(redriven.trim(), "4 stuck sagas retried");
    for i in 1..5 {
        status_is(&o, &format!("ship-{i}"), SagaStatus::Compensated).await;
    }
    let audit = stdout(&ctl(&url, token, &["audit", "ship-0"]).await);
    let rows: Vec<&str> = audit.lines().skip(2).collect();
    assert_eq!(rows.len(), 1, "{audit}");
    assert!(
        rows[0].contains("resolve") && rows[0].contains("alice") && rows[0].ends_with("refunded by hand"),
        "{audit}"
    );
    let audit = stdout(&ctl(&url, token, &["--json", "audit", "ship-1"]).await);
    let audit: Value = serde_json::from_str(&audit).unwrap();
    assert_eq!(audit["actions"][0]["action"], "retry", "{audit}");
    assert_eq!(
        (&audit["actions"][0]["by"], &audit["actions"][0]["reason"]),
        (&Value::from("alice"), &Value::from("redrive"))
    );
    let shown = stdout(&ctl(&url, token, &["show", "ship-1"]).await);
    assert!(shown.contains("retry_compensation step 0 by alice"), "{shown}");

    // A running sync saga, aborted from the command line.
    let caller = {
        let o = o.clone();
        tokio::spawn(async move { o.run("Slow", "slow-1", 1u32).await })
    };
    status_is(&o, "slow-1", SagaStatus::Running).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let aborted = stdout(&ctl(&url, token, &["abort", "slow-1", "--reason", "the customer cancelled"]).await);
    assert!(aborted.contains("aborted by alice: the customer cancelled"), "{aborted}");
    assert!(matches!(caller.await.unwrap(), Ok(sagaflow::Outcome::Compensated(_))));

    // Wrong state and unknown saga: clear errors, non-zero exit.
    let again = ctl(&url, token, &["retry", "slow-1"]).await;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("409"), "{again:?}");
    let missing = ctl(&url, token, &["show", "nope"]).await;
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"), "{missing:?}");

    // Paused: new calls refused, on this replica at once; resumed: taken again.
    let paused = stdout(&ctl(&url, token, &["pause", "Ship"]).await);
    assert_eq!(paused.trim(), "Ship paused by alice");
    assert!(matches!(o.submit("Ship", "late", 1u32, None).await, Err(sagaflow::Error::Paused { .. })));
    let flows: Value = reqwest::Client::new()
        .get(format!("{url}/api/flows"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(flows.as_array().unwrap().iter().any(|f| f["facade"] == "Ship" && f["paused"] == true), "{flows}");
    assert_eq!(stdout(&ctl(&url, token, &["resume", "Ship"]).await).trim(), "Ship resumed by alice");
    o.submit("Ship", "late", 1u32, None).await.unwrap();
    // Paused with new calls queued: a call waits for the resume, then runs.
    let queued = stdout(&ctl(&url, token, &["pause", "Ship", "--queue"]).await);
    assert_eq!(queued.trim(), "Ship paused (new calls queued) by alice");
    let waiting = tokio::spawn({
        let o = o.clone();
        async move { o.submit("Ship", "queued", 1u32, None).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a queued call waits for the resume");
    assert_eq!(stdout(&ctl(&url, token, &["resume", "Ship"]).await).trim(), "Ship resumed by alice");
    waiting.await.unwrap().unwrap();
    let unknown = ctl(&url, token, &["pause", "Nope"]).await;
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"), "{unknown:?}");

    stop.cancel();
    server.await.unwrap().unwrap();
    o.shutdown().await;
}
