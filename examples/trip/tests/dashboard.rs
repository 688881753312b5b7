//! The dashboard draws a parallel flow as a graph (the three bookings stacked in
//! one column, the payment after them, their compensations under them) and a
//! saga's steps and timeline by branch, read from the page headless Chromium
//! renders against the admin API of a trip orchestrator.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sagaflow::Outcome;
use sagaflow_server::admin::{self, AdminHosts};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trip::service::Services;
use trip::{SYNC_TRIP, Trip};

fn which(name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    if path.is_absolute() {
        return path.is_file().then(|| path.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// The page at `url` once its scripts have run, as Chromium serialises it; bounded to 60 s.
fn rendered(chromium: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=5000", "--dump-dom", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not render {url} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The text from `start` (which must be in `page`) to the next `</{tag}>`.
fn element<'a>(page: &'a str, start: &str, tag: &str) -> &'a str {
    let at = page.find(start).unwrap_or_else(|| panic!("no `{start}` in the page:\n{page}"));
    let rest = &page[at..];
    &rest[..rest.find(&format!("</{tag}>")).unwrap_or(rest.len())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_draws_the_branches_of_a_parallel_flow_and_of_a_sagas_timeline() {
    let Some(chromium) = std::env::var("CHROMIUM").ok().and_then(|c| which(&c)).or_else(|| which("chromium")) else {
        let why = "chromium is not installed (bash scripts/install-browser.sh installs it)";
        assert!(std::env::var_os("SAGAFLOW_REQUIRE_BROKERS").is_none(), "SAGAFLOW_REQUIRE_BROKERS=1 and {why}");
        eprintln!("skipping: {why}");
        return;
    };
    let services = Services::new(Duration::from_millis(2));
    let orchestrator = trip::orchestrator(&services).await.unwrap();
    let done = orchestrator.run(SYNC_TRIP, "trip-done", Trip::new("Ada", 100)).await.unwrap();
    assert!(matches!(done, Outcome::Completed(_)), "{done:?}");
    services.hotels.set_fault(true);
    let refused = orchestrator.run(SYNC_TRIP, "trip-refused", Trip::new("Bo", 100)).await.unwrap();
    assert!(matches!(refused, Outcome::Compensated(_)), "{refused:?}");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let hosts = AdminHosts::new(addr, &[]).unwrap();
    let server = tokio::spawn(admin::serve(listener, orchestrator.clone(), None, false, hosts, shutdown.clone()));
    let page = |id: &str| {
        let (chromium, url) = (chromium.clone(), format!("http://{addr}/#saga={id}"));
        tokio::task::spawn_blocking(move || rendered(&chromium, &url))
    };

    // The flow: one stage of three branches, then one step; each booking has its compensation
    // in its branch's row, and the payment comes after all three.
    let refused_page = page("trip-refused").await.unwrap();
    let flows = element(&refused_page, "id=\"flows\"", "section");
    let diagram = element(flows, "data-facade=\"SyncTrip\" data-stages=\"3,1\"", "svg");
    let said = "aria-label=\"SyncTrip: BookFlight and BookHotel and RentCar at once then TakePayment\"";
    assert!(flows.contains(said), "{flows}");
    for (step, branch, node) in [(0, 0, "BookFlight"), (1, 1, "BookHotel"), (2, 2, "RentCar")] {
        let at = format!("class=\"box node \" data-step=\"{step}\" data-stage=\"0\" data-branch=\"{branch}\"");
        let drawn = element(diagram, &at, "g");
        assert!(drawn.contains(node) && drawn.contains(&format!("step 1{}", ['a', 'b', 'c'][branch])), "{drawn}");
        let compensation =
            format!("class=\"box comp \" data-step=\"{step}\" data-stage=\"0\" data-branch=\"{branch}\"");
        assert!(diagram.contains(&compensation), "no compensation box for {node}: {diagram}");
    }
    assert!(diagram.contains("data-step=\"3\" data-stage=\"1\" data-branch=\"0\""), "{diagram}");

    // Each flow names its version; the saga names the version it runs on.
    let fingerprint = orchestrator.flows().iter().find(|f| f.facade == SYNC_TRIP).unwrap().version.fingerprint.clone();
    let current = element(flows, "class=\"version current\"", "span");
    assert!(current.contains(&format!("data-fingerprint=\"{fingerprint}\"")), "{current}");

    // The refused saga: its hotel failed in branch 1b, the flight and the car were compensated.
    let saga = element(&refused_page, "id=\"saga\"", "section");
    assert!(saga.contains("data-request-id=\"trip-refused\""), "{saga}");
    let own = element(saga, "class=\"version saga-version\"", "span");
    assert!(own.contains(&format!("data-fingerprint=\"{fingerprint}\"")), "{own}");
    let timeline = element(saga, "id=\"saga-timeline\"", "ol");
    assert!(
        timeline.contains("data-event=\"step_failed\" data-node=\"BookHotel\" data-branch=\"1b\""),
        "the hotel's failure is not shown as branch 1b: {timeline}"
    );
    for (node, branch) in [("BookFlight", "1a"), ("RentCar", "1c")] {
        let compensated = format!("data-event=\"step_compensated\" data-node=\"{node}\" data-branch=\"{branch}\"");
        assert!(timeline.contains(&compensated), "{node}'s compensation is not in branch {branch}: {timeline}");
    }
    let diagram = element(saga, "class=\"flow-diagram\"", "svg");
    assert!(diagram.contains("class=\"box node failed\" data-step=\"1\""), "the hotel is not marked failed: {diagram}");
    // The diagram is tall enough for the last branch's compensation.
    let height: u32 =
        diagram["height=\"".len() + diagram.find("height=\"").unwrap()..].split('"').next().unwrap().parse().unwrap();
    let last = element(diagram, "class=\"box comp compensated\" data-step=\"2\"", "g");
    let y: u32 = last[last.find("y=\"").unwrap() + 3..].split('"').next().unwrap().parse().unwrap();
    assert!(y + 46 <= height, "the car's compensation at y {y} is cut off by the diagram's height {height}");

    // The completed saga: the three branches merged once, then the payment.
    let done_page = page("trip-done").await.unwrap();
    let timeline = element(element(&done_page, "id=\"saga\"", "section"), "id=\"saga-timeline\"", "ol");
    assert_eq!(timeline.matches("data-event=\"branches_joined\"").count(), 1, "{timeline}");
    assert!(timeline.contains("step 1: 3 branches merged"), "{timeline}");
    assert!(timeline.contains("data-event=\"step_completed\" data-node=\"TakePayment\""), "{timeline}");
    assert!(!timeline.contains("data-node=\"TakePayment\" data-branch"), "the payment is no branch: {timeline}");

    shutdown.cancel();
    server.await.unwrap().unwrap();
}
