//! The operator's view: the dashboard in headless Chromium, the admin API's
//! listing, counts, detail and retry, and who may see what.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use booking::app::Running;
use booking::config::Config;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Service, booking, start, test_config, with_id};

const TOKEN: &str = "s3cret-dashboard";

/// A readable, unique request id.
fn id(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn base(running: &Running) -> String {
    format!("http://{}", running.http_addr)
}

async fn get(url: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn get_json(url: &str, token: Option<&str>) -> Value {
    let response = get(url, token).await;
    assert_eq!(response.status(), StatusCode::OK, "GET {url}");
    response.json().await.unwrap()
}

/// Waits (at most 15 s) until the saga's detail satisfies `done`, and returns it.
async fn saga_until(running: &Running, id: &str, token: Option<&str>, done: impl Fn(&Value) -> bool) -> Value {
    let url = format!("{}/api/sagas/{id}", base(running));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let response = get(&url, token).await;
        if response.status() == StatusCode::OK {
            let saga: Value = response.json().await.unwrap();
            if done(&saga) {
                return saga;
            }
            assert!(Instant::now() < deadline, "saga {id} never got there: {saga:#}");
        } else {
            assert!(Instant::now() < deadline, "saga {id}: {}", response.status());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn ended(saga: &Value) -> bool {
    matches!(saga["status"].as_str(), Some("completed" | "compensated" | "stuck"))
}

/// A sync booking that completes, and one whose payment fails so it compensates.
async fn completed_and_compensated(s: &mut Service) -> (String, String) {
    let ok = id("ok");
    let fault = id("fault");
    s.client.handle_sync_booking(with_id(Some(&ok), booking(1, 2, false))).await.unwrap();
    s.client.handle_sync_booking(with_id(Some(&fault), booking(1, 1, true))).await.unwrap_err();
    (ok, fault)
}

/// A config whose compensations give up after two attempts, so a saga gets stuck quickly.
fn quick_to_stick(mut config: Config) -> Config {
    config.app.flow.compensation_retry.max_attempts = 2;
    config
}

// ------------------------------------------------------------------ the browser

fn require_everything() -> bool {
    std::env::var("SAGAFLOW_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

fn which(name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    if path.is_absolute() {
        return path.is_file().then(|| path.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// Where CI picks up artifacts: `$CARGO_TARGET_DIR`, else the workspace's `target/`.
fn target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

/// Runs `command` to its end, killing it after `limit`; returns whether it succeeded and its output.
fn run_bounded(mut command: Command, limit: Duration) -> (bool, String) {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("driver starts");
    let deadline = Instant::now() + limit;
    let success = loop {
        match child.try_wait().expect("driver status") {
            Some(status) => break status.success(),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let output = child.wait_with_output().expect("driver output");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (success, text)
}

/// Waits (at most 120 s) until `addr` can be bound: another run of this test on the machine may hold it.
async fn wait_until_free(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Err(e) = std::net::TcpListener::bind(addr) {
        assert!(Instant::now() < deadline, "{addr} stayed busy for 120 s: {e}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Makes a little of everything (a stuck saga among it), then has `dashboard_test.py` drive
/// Chromium through the dashboard at `http://{host}:{port}/`, giving `token` when the page asks.
async fn drive_the_dashboard(config: Config, host: &str, token: Option<&str>, screenshot: &str) {
    let chromium = std::env::var("CHROMIUM").ok().and_then(|c| which(&c)).or_else(|| which("chromium"));
    let python = which(&std::env::var("SAGAFLOW_PYTHON").unwrap_or_else(|_| "python3".into()));
    let (Some(chromium), Some(python)) = (chromium, python) else {
        let why = "chromium or python3 is not installed (bash scripts/install-browser.sh installs Chromium)";
        assert!(!require_everything(), "SAGAFLOW_REQUIRE_BROKERS=1 and {why}");
        eprintln!("skipping the browser test: {why}");
        return;
    };

    let mut config = quick_to_stick(config);
    // A slowed payment keeps a saga running (each attempt waits this long) until the page aborts it.
    config.app.flow.step_timeout_ms = 20_000;
    config.app.flow.deadline_ms = 180_000;
    let mut s = start(config).await;
    // A little of everything, so the counts and the screenshot show each outcome.
    for _ in 0..3 {
        s.client.handle_sync_booking(with_id(Some(&id("sync")), booking(3, 1, false))).await.unwrap();
    }
    for _ in 0..2 {
        s.client.handle_throttling_booking(with_id(Some(&id("throttled")), booking(4, 2, false))).await.unwrap();
    }
    let queued = id("async");
    s.client.handle_async_booking(with_id(Some(&queued), booking(5, 1, false))).await.unwrap();
    saga_until(&s.running, &queued, token, ended).await;
    let (order, _) = s.running.mocks.clone().expect("in-process mocks");
    order.set_fail_cancels(true);
    let stuck = id("stuck");
    s.client.handle_throttling_booking(with_id(Some(&stuck), booking(6, 1, true))).await.unwrap_err();
    saga_until(&s.running, &stuck, token, |s| s["status"] == "stuck").await;
    // One stuck saga to settle by hand, two to redrive.
    let to_resolve = id("resolve");
    s.client.handle_async_booking(with_id(Some(&to_resolve), booking(7, 1, true))).await.unwrap();
    let to_redrive = [id("redrive"), id("redrive")];
    for id in &to_redrive {
        s.client.handle_sync_booking(with_id(Some(id), booking(8, 1, true))).await.unwrap_err();
    }
    for id in to_redrive.iter().chain([&to_resolve]) {
        saga_until(&s.running, id, token, |s| s["status"] == "stuck").await;
    }
    // Healed: the driver retries the stuck saga from the dashboard, and redrives the others.
    order.set_fail_cancels(false);
    let (ok, fault) = completed_and_compensated(&mut s).await;
    // A saga held in its payment step, for the page to abort.
    let (_, payment) = s.running.mocks.clone().expect("in-process mocks");
    payment.set_create_delay(Duration::from_secs(60));
    let running = id("running");
    s.client.handle_async_booking(with_id(Some(&running), booking(9, 1, false))).await.unwrap();
    saga_until(&s.running, &running, token, |s| {
        s["history"].as_array().is_some_and(|h| h.iter().any(|e| e["event"] == "step_started" && e["step"] == 1))
    })
    .await;

    let screenshot = target_dir().join(screenshot);
    let _ = std::fs::remove_file(&screenshot);
    let mut driver = Command::new(python);
    driver
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/dashboard_test.py"))
        .args(["--url", &format!("http://{host}:{}/", s.running.http_addr.port())])
        .args(["--token", token.unwrap_or_default()])
        .args(["--completed", &ok, "--compensated", &fault, "--stuck", &stuck])
        .args(["--operator", OPERATOR, "--running", &running, "--resolve", &to_resolve])
        .args(["--redrive-facade", "SyncBooking", "--redrive-count", &to_redrive.len().to_string()])
        .args(["--pause", PAUSED])
        .arg("--screenshot")
        .arg(&screenshot)
        .arg("--chromium")
        .arg(chromium);
    let (passed, output) =
        tokio::task::spawn_blocking(move || run_bounded(driver, Duration::from_secs(150))).await.unwrap();
    println!("{output}");
    assert!(passed, "the dashboard check failed:\n{output}");
    payment.set_create_delay(Duration::ZERO);
    let retried = get_json(&format!("{}/api/sagas/{stuck}", base(&s.running)), token).await;
    assert_eq!(retried["status"], "compensated", "{retried:#}");
    check_operator_actions(&s, token, &running, &to_resolve, &to_redrive).await;
    let png = std::fs::read(&screenshot).expect("a screenshot was saved");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "{} bytes of screenshot", png.len());
    s.running.shutdown().await.unwrap();
}

/// Who acts in the browser.
const OPERATOR: &str = "pat";
/// The facade the page leaves paused.
const PAUSED: &str = "ThrottlingBooking";

/// What the page's buttons did, read back through the API: the abort, the resolve and the
/// redrive each named the operator typed in the page, and the facade it paused refuses calls.
async fn check_operator_actions(s: &Service, token: Option<&str>, running: &str, resolved: &str, redriven: &[String]) {
    let aborted = saga_until(&s.running, running, token, |s| s["status"] == "compensated").await;
    let reason = aborted["rollback_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("aborted by pat: the customer cancelled in the browser"), "{aborted:#}");
    let audit = |id: &str| format!("{}/api/sagas/{id}/audit", base(&s.running));
    let trail = get_json(&audit(resolved), token).await;
    assert_eq!(trail["status"], "compensated", "{trail:#}");
    assert_eq!((&trail["actions"][0]["action"], &trail["actions"][0]["by"]), (&json!("resolve"), &json!(OPERATOR)));
    assert_eq!(trail["actions"][0]["reason"], "order voided in the browser", "{trail:#}");
    for id in redriven {
        saga_until(&s.running, id, token, |s| s["status"] == "compensated").await;
        let trail = get_json(&audit(id), token).await;
        let retry = &trail["actions"][0];
        assert_eq!(
            (&retry["action"], &retry["by"], &retry["reason"]),
            (&json!("retry"), &json!(OPERATOR), &json!("redrive"))
        );
    }
    let flows = get_json(&format!("{}/api/flows", base(&s.running)), token).await;
    let paused: Vec<&str> =
        flows.as_array().unwrap().iter().filter(|f| f["paused"] == true).filter_map(|f| f["facade"].as_str()).collect();
    assert_eq!(paused, [PAUSED]);
    let refused = s
        .client
        .clone()
        .handle_throttling_booking(with_id(Some(&id("refused")), booking(1, 1, false)))
        .await
        .expect_err("the paused facade refuses");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("paused (by pat)"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_finds_the_flows_retries_a_stuck_saga_and_shows_a_timeline() {
    let mut config = test_config();
    config.admin_token = Some(TOKEN.into());
    // The default admin port, as a person opens it: a browser must not refuse it as unsafe.
    config.http_listen = Config::default().http_listen;
    wait_until_free(config.http_listen).await;
    drive_the_dashboard(config, "127.0.0.1", Some(TOKEN), "dashboard.png").await;
}

/// Without a token, the page's retry is a same-origin POST (its `Origin` is the page's), which
/// the admin API takes; opened as `localhost`, the name a person types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_retries_without_a_token_as_a_same_origin_page() {
    drive_the_dashboard(test_config(), "localhost", None, "dashboard-no-token.png").await;
}

// ------------------------------------------------------------------ access

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_loads_without_the_token_and_the_api_needs_it() {
    let mut config = test_config();
    config.admin_token = Some(TOKEN.into());
    config.public_metrics = false;
    let s = start(config).await;
    let base = base(&s.running);

    let page = get(&format!("{base}/"), None).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("dashboard/app.js") && html.contains("id=\"token-form\""), "{html}");
    for (asset, kind) in [("app.js", "text/javascript"), ("style.css", "text/css")] {
        let response = get(&format!("{base}/dashboard/{asset}"), None).await;
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with(kind), "{asset}");
        assert!(!response.text().await.unwrap().is_empty());
    }

    for path in ["/api/flows", "/api/stats", "/api/sagas", "/api/sagas/any", "/metrics"] {
        let refused = get(&format!("{base}{path}"), None).await;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(refused.headers()["www-authenticate"], "Bearer", "{path}");
        let wrong = get(&format!("{base}{path}"), Some("s3cret-dashboarD")).await;
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let retry = reqwest::Client::new().post(format!("{base}/api/sagas/any/retry")).send().await.unwrap();
    assert_eq!(retry.status(), StatusCode::UNAUTHORIZED);
    for path in ["/api/flows", "/api/stats", "/api/sagas", "/metrics"] {
        assert_eq!(get(&format!("{base}{path}"), Some(TOKEN)).await.status(), StatusCode::OK, "{path}");
    }
    assert_eq!(get(&format!("{base}/healthz"), None).await.status(), StatusCode::OK);
    s.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_non_loopback_bind_without_a_token_refuses_to_start() {
    let free = SocketAddr::from(([127, 0, 0, 1], 0));
    let yaml = format!(
        "http_listen: 0.0.0.0:0\ngrpc_listen: {free}\nupstream:\n  order_addr: {free}\n  payment_addr: {free}\n"
    );
    let path = std::env::temp_dir().join(format!("{}.yaml", id("open-admin")));
    std::fs::write(&path, yaml).unwrap();
    let mut booking = Command::new(env!("CARGO_BIN_EXE_booking"));
    booking.arg("--config").arg(&path).env_remove("SAGAFLOW_ADMIN_TOKEN").env_remove("SAGAFLOW_HTTP_LISTEN");
    let (started, output) =
        tokio::task::spawn_blocking(move || run_bounded(booking, Duration::from_secs(20))).await.unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(!started, "booking started with an open admin API:\n{output}");
    assert!(output.contains("0.0.0.0:0 is not a loopback address") && output.contains("admin_token"), "{output}");
}

// ------------------------------------------------------------------ the API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_page_with_a_cursor_and_filter_by_time() {
    let mut s = start(test_config()).await;
    let mut made = Vec::new();
    for n in 0..7 {
        let request = id(&format!("page{n}"));
        s.client.handle_sync_booking(with_id(Some(&request), booking(1, 1, false))).await.unwrap();
        made.push(request);
        // Spread the creation times, so the time range below splits them.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let base = base(&s.running);
    let everything = get_json(&format!("{base}/api/sagas?limit=1000"), None).await;
    let everything: Vec<Value> = everything.as_array().unwrap().clone();
    assert_eq!(everything.len(), 7);
    let ids = |page: &[Value]| page.iter().map(|s| s["request_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    made.reverse(); // newest first
    assert_eq!(ids(&everything), made);

    let mut pages = Vec::new();
    let mut url = format!("{base}/api/sagas?facade=SyncBooking&status=completed&limit=3");
    loop {
        let response = get(&url, None).await;
        assert_eq!(response.status(), StatusCode::OK);
        let next = response.headers().get("x-next-cursor").map(|c| c.to_str().unwrap().to_owned());
        assert!(response.headers().get("x-scan-truncated").is_none());
        let page: Vec<Value> = response.json().await.unwrap();
        pages.push(ids(&page));
        match next {
            Some(cursor) => {
                url = format!("{base}/api/sagas?facade=SyncBooking&status=completed&limit=3&cursor={cursor}")
            }
            None => break,
        }
        assert!(pages.len() < 5, "paging does not end: {pages:?}");
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(pages.concat(), made);

    // since is inclusive, until exclusive, both on the creation time.
    let created: Vec<u64> = everything.iter().map(|s| s["created_ms"].as_u64().unwrap()).collect();
    let (since, until) = (created[5], created[1]);
    let window: Vec<Value> = get_json(&format!("{base}/api/sagas?since_ms={since}&until_ms={until}"), None)
        .await
        .as_array()
        .unwrap()
        .clone();
    let expected: Vec<String> = everything
        .iter()
        .filter(|s| (since..until).contains(&s["created_ms"].as_u64().unwrap()))
        .map(|s| s["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(expected.len() >= 3, "the sagas were not spread in time: {created:?}");
    assert_eq!(ids(&window), expected);
    assert!(get_json(&format!("{base}/api/sagas?facade=AsyncBooking"), None).await.as_array().unwrap().is_empty());

    for bad in ["cursor=nonsense", "status=lost", "limt=3", "since_ms=yesterday"] {
        let response = get(&format!("{base}/api/sagas?{bad}"), None).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_sagas_per_facade_and_outcome() {
    let mut s = start(test_config()).await;
    completed_and_compensated(&mut s).await;
    s.client.handle_sync_booking(with_id(Some(&id("ok")), booking(1, 1, false))).await.unwrap();
    s.client.handle_throttling_booking(with_id(Some(&id("thr")), booking(1, 1, false))).await.unwrap();
    let stats = get_json(&format!("{}/api/stats", base(&s.running)), None).await;
    let counts = |v: &Value| -> Vec<u64> {
        ["running", "compensating", "completed", "compensated", "stuck"]
            .iter()
            .map(|k| v[k].as_u64().unwrap())
            .collect()
    };
    assert_eq!(counts(&stats["total"]), [0, 0, 3, 1, 0], "{stats:#}");
    assert_eq!(counts(&stats["facades"]["SyncBooking"]), [0, 0, 2, 1, 0]);
    assert_eq!(counts(&stats["facades"]["ThrottlingBooking"]), [0, 0, 1, 0, 0]);
    assert_eq!(counts(&stats["facades"]["AsyncBooking"]), [0, 0, 0, 0, 0]);
    assert_eq!(stats["counted"], 4);
    assert_eq!(stats["truncated"], false);
    assert_eq!(stats["engine"]["dead_lettered"], 0);
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detail_tells_each_step_and_the_rollback_reason() {
    let mut s = start(test_config()).await;
    let (ok, fault) = completed_and_compensated(&mut s).await;
    let base = base(&s.running);

    let done = get_json(&format!("{base}/api/sagas/{ok}"), None).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["rollback_reason"], Value::Null);
    for (step, node) in [(0, "CreateOrder"), (1, "CreatePayment")] {
        let view = &done["step_details"][step];
        assert_eq!(view["node"], node);
        assert_eq!(view["action"]["status"], "completed");
        assert_eq!(view["action"]["attempts"], 1);
        assert!(view["action"]["ended_ms"].as_u64() >= view["action"]["started_ms"].as_u64());
        assert_eq!(view["compensation"]["status"], "not_needed");
    }
    assert_eq!(done["data"]["count"], 2);
    assert_eq!(done["steps"], 2);

    let rolled_back = get_json(&format!("{base}/api/sagas/{fault}"), None).await;
    assert_eq!(rolled_back["status"], "compensated");
    let reason = rolled_back["rollback_reason"].as_str().unwrap();
    assert!(reason.contains("CreatePayment") && reason.contains("fault injected"), "{reason}");
    assert!(reason.contains("FailedPrecondition"), "{reason}");
    assert_eq!(rolled_back["step_details"][1]["action"]["status"], "failed");
    assert!(rolled_back["step_details"][1]["action"]["error"].as_str().unwrap().contains("fault injected"));
    assert_eq!(rolled_back["step_details"][0]["compensation"]["status"], "compensated");
    assert_eq!(rolled_back["step_details"][0]["compensation"]["attempts"], 1);
    let events: Vec<&str> =
        rolled_back["history"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        ["started", "step_started", "step_completed", "step_started", "step_failed", "step_compensated"]
    );
    s.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_saga_is_retried_once_its_upstream_heals() {
    let mut s = start(quick_to_stick(test_config())).await;
    let (order, _) = s.running.mocks.clone().expect("in-process mocks");
    let base = base(&s.running);
    let request = id("stuck");

    order.set_fail_cancels(true);
    let err = s.client.handle_sync_booking(with_id(Some(&request), booking(1, 1, true))).await.unwrap_err();
    assert!(err.message().contains("stuck"), "{err:?}");
    let stuck = saga_until(&s.running, &request, None, |s| s["status"] == "stuck").await;
    assert!(stuck["stuck_reason"].as_str().unwrap().contains("2 attempts"), "{stuck:#}");
    assert_eq!(stuck["step_details"][0]["compensation"]["status"], "gave_up");
    assert!(stuck["step_details"][0]["compensation"]["error"].as_str().unwrap().contains("unavailable"), "{stuck:#}");
    let listed = get_json(&format!("{base}/api/sagas?status=stuck"), None).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["request_id"], request.as_str());
    let record = order.snapshot().records.into_iter().find(|r| r.request_id == request).unwrap();
    assert_eq!(record.status, "active", "the order must still stand while the saga is stuck");

    // The upstream heals; an operator retries.
    order.set_fail_cancels(false);
    let retried = reqwest::Client::new().post(format!("{base}/api/sagas/{request}/retry")).send().await.unwrap();
    assert_eq!(retried.status(), StatusCode::OK);
    let healed = saga_until(&s.running, &request, None, |s| s["status"] == "compensated").await;
    assert_eq!(healed["step_details"][0]["compensation"]["status"], "compensated");
    assert_eq!(healed["stuck_reason"], Value::Null);
    let events: Vec<&str> =
        healed["history"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(&events[events.len() - 3..], ["compensation_gave_up", "retry_compensation", "step_compensated"]);
    let record = order.snapshot().records.into_iter().find(|r| r.request_id == request).unwrap();
    assert_eq!(record.status, "cancelled");

    let again = reqwest::Client::new().post(format!("{base}/api/sagas/{request}/retry")).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    s.running.shutdown().await.unwrap();
}
