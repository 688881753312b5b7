//! Prometheus metrics after a few sagas (its own test binary: the recorder is per process).

mod support;

use support::{booking, start, test_config, with_id};

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_histograms_follow_the_sagas() {
    let mut s = start(test_config()).await;
    for i in 0..3 {
        s.client.handle_sync_booking(with_id(Some(&format!("m-ok-{i}")), booking(1, 1, false))).await.unwrap();
    }
    s.client.handle_sync_booking(with_id(Some("m-fault"), booking(1, 1, true))).await.unwrap_err();
    s.client.handle_throttling_booking(with_id(Some("m-thr"), booking(1, 1, false))).await.unwrap();
    // The caller is answered when the saga ends; the delivery that ended it is acked just after.
    // Scrape until that ack is counted (3: the rollback and the throttled saga's two hops).
    let url = format!("http://{}/metrics", s.running.http_addr);
    let mut text = String::new();
    for _ in 0..100 {
        text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if text.lines().any(|l| l.starts_with("sagaflow_broker_ack_seconds_count") && l.ends_with(" 3")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let sync = r#"facade="SyncBooking""#;
    assert_eq!(sample(&text, "sagaflow_sagas_started_total", &[sync, r#"mode="sync""#]), 4.0);
    assert_eq!(sample(&text, "sagaflow_sagas_ended_total", &[sync, r#"outcome="completed""#]), 3.0);
    assert_eq!(sample(&text, "sagaflow_sagas_ended_total", &[sync, r#"outcome="compensated""#]), 1.0);
    assert_eq!(sample(&text, "sagaflow_sagas_ended_total", &[r#"facade="ThrottlingBooking""#]), 1.0);
    assert_eq!(sample(&text, "sagaflow_sagas_in_flight", &[sync]), 0.0);
    let order = [sync, r#"node="CreateOrder""#, r#"phase="action""#];
    assert_eq!(sample(&text, "sagaflow_step_duration_seconds_count", &order), 4.0);
    assert!(text.contains(
        r#"sagaflow_step_duration_seconds_bucket{facade="SyncBooking",node="CreateOrder",phase="action",le="0.005"}"#
    ));
    assert_eq!(sample(&text, "sagaflow_compensations_total", &[sync, r#"node="CreateOrder""#, r#"result="ok""#]), 1.0);
    assert!(sample(&text, "sagaflow_broker_publish_seconds_count", &[r#"broker="memory""#]) >= 3.0);
    assert!(sample(&text, "sagaflow_broker_ack_seconds_count", &[r#"broker="memory""#]) >= 3.0);
    // Sampled at start and every 5 s: nothing is waiting once the sagas above are done.
    assert_eq!(sample(&text, "sagaflow_queue_depth", &[r#"ThrottlingBooking.CreateOrder"#]), 0.0);
    s.running.shutdown().await.unwrap();
}
