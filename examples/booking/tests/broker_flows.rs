//! The async and throttling bookings end to end, once per broker.

mod support;

use std::time::Duration;

use booking::config::{Config, TopicConfig};
use booking::topic;
use sagaflow::SagaStatus;
use sagaflow::broker::{Message, REQUEST_ID_HEADER};
use support::{Service, booking, by_id, callback_server, start, test_config, with_id};
use tonic::Code;

async fn async_booking_calls_back(config: Config) {
    let mut s = start(config).await;
    let mut callbacks = callback_server().await;
    let mut ok = booking(1, 1, false);
    ok.callback_url = callbacks.url.clone();
    let reply = s.client.handle_async_booking(with_id(Some("async-ok"), ok)).await.unwrap().into_inner();
    assert_eq!(reply.request_id, "async-ok");
    let body = callbacks.next().await;
    assert_eq!(body["request_id"], "async-ok");
    assert_eq!(body["facade"], "AsyncBooking");
    assert_eq!(body["status"], "completed");
    assert!(body["data"]["order_id"].as_i64().unwrap() > 0 && body["data"]["payment_id"].as_i64().unwrap() > 0);

    let mut fault = booking(1, 1, true);
    fault.callback_url = callbacks.url.clone();
    let reply = s.client.handle_async_booking(with_id(Some("async-fault"), fault)).await.unwrap().into_inner();
    assert!(reply.fault_inject);
    let body = callbacks.next().await;
    assert_eq!((body["request_id"].as_str(), body["status"].as_str()), (Some("async-fault"), Some("compensated")));
    assert!(body["error"].as_str().unwrap().contains("CreatePayment"), "{body}");
    assert_eq!(by_id(&s.orders().await)["async-fault"][0].status, "cancelled");
    s.running.shutdown().await.unwrap();
}

async fn a_callback_outside_the_allow_list_is_refused(config: Config) {
    let mut s = start(config).await;
    let mut request = booking(1, 1, false);
    request.callback_url = "http://169.254.169.254/latest/meta-data".into();
    let status = s.client.handle_async_booking(with_id(Some("ssrf"), request)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("callbacks.allow"), "{}", status.message());
    assert!(s.running.orchestrator.saga("ssrf").await.unwrap().is_none(), "no saga was started");
    s.running.shutdown().await.unwrap();
}

fn throttled(config: &mut Config, concurrency: usize) {
    config.message_queue.topics =
        [topic::THROTTLING_CREATE_ORDER, topic::THROTTLING_CREATE_PAYMENT, topic::THROTTLING_ROLLBACK]
            .into_iter()
            .map(|id| TopicConfig { id: id.into(), is_throttling: true, concurrency: Some(concurrency) })
            .collect();
}

async fn throttling_holds_upstreams_under_their_capacity(mut config: Config) {
    throttled(&mut config, 8);
    for mock in [&mut config.app.upstream.order, &mut config.app.upstream.payment] {
        mock.capacity = 10;
        mock.latency = Duration::from_millis(5);
    }
    config.wait_timeout_ms = 120_000;
    let s = start(config).await;
    let mut calls = Vec::new();
    for i in 0..300 {
        let mut client = s.client.clone();
        calls.push(tokio::spawn(async move {
            client.handle_throttling_booking(with_id(Some(&format!("thr-{i}")), booking(1, 1, false))).await
        }));
    }
    for call in calls {
        let reply = call.await.unwrap().expect("every throttled call succeeds").into_inner();
        assert!(reply.order_id > 0 && reply.payment_id > 0);
    }
    for snapshot in [s.orders().await, s.payments().await] {
        let counters = snapshot.counters.unwrap();
        assert_eq!(counters.rejected, 0);
        assert!((1..=8).contains(&counters.peak_in_flight), "peak in flight {}", counters.peak_in_flight);
        assert_eq!(snapshot.records.len(), 300);
    }
    assert_eq!(s.running.orchestrator.stats().waiting, 0);
    s.running.shutdown().await.unwrap();
}

async fn a_throttled_caller_times_out_but_the_saga_completes(mut config: Config) {
    config.wait_timeout_ms = 200;
    config.app.upstream.order.latency = Duration::from_millis(600);
    let mut s = start(config).await;
    let status = s.client.handle_throttling_booking(with_id(Some("thr-slow"), booking(1, 1, false))).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(s.running.orchestrator.stats().waiting, 0, "the waiter left nothing behind");
    wait_for(&s, "thr-slow", SagaStatus::Completed).await;
    // Asking again answers with the recorded outcome.
    let reply = s.client.handle_throttling_booking(with_id(Some("thr-slow"), booking(1, 1, false))).await.unwrap();
    assert!(reply.into_inner().payment_id > 0);
    s.running.shutdown().await.unwrap();
}

async fn poison_messages_are_dead_lettered_and_service_goes_on(config: Config) {
    let mut s = start(config).await;
    let flows = s.running.orchestrator.flows();
    let mut topics: Vec<String> = flows.iter().flat_map(|f| f.topics.iter().cloned()).collect();
    topics.extend(flows.iter().map(|f| f.rollback_topic.clone()));
    let before = s.running.orchestrator.stats().dead_lettered;
    for topic in &topics {
        for payload in [&b"not json"[..], br#"{"request_id":"p","facade":"Nope","step":0,"data":{}}"#] {
            let message = Message::new(topic.clone(), payload.to_vec()).header(REQUEST_ID_HEADER, "poison");
            s.running.broker.publish(message).await.unwrap();
        }
    }
    let expected = before + 2 * topics.len() as u64;
    for _ in 0..1000 {
        if s.running.orchestrator.stats().dead_lettered >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // At least once: a broker may hand a poison message back once more if its ack was lost.
    let dead = s.running.orchestrator.stats().dead_lettered;
    assert!(dead >= expected, "{dead} of {expected} poison messages dead-lettered");
    let reply = s.client.handle_throttling_booking(with_id(Some("after-poison"), booking(1, 1, false))).await.unwrap();
    assert!(reply.into_inner().order_id > 0);
    s.running.shutdown().await.unwrap();
}

async fn wait_for(s: &Service, id: &str, status: SagaStatus) {
    for _ in 0..500 {
        if s.running.orchestrator.saga(id).await.unwrap().is_some_and(|r| r.status() == status) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("saga {id} never reached {status}");
}

/// One test per scenario for a broker, given how to configure it
/// (`None` skips, with the reason printed, when the broker is absent).
macro_rules! broker_flow_tests {
    ($broker:ident, $configure:expr) => {
        mod $broker {
            use super::*;

            fn config() -> Option<Config> {
                let mut config = test_config();
                let configure: fn(&mut Config) -> bool = $configure;
                configure(&mut config).then_some(config)
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn async_booking_calls_back() {
                if let Some(c) = config() {
                    super::async_booking_calls_back(c).await
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_callback_outside_the_allow_list_is_refused() {
                if let Some(c) = config() {
                    super::a_callback_outside_the_allow_list_is_refused(c).await
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn throttling_holds_upstreams_under_their_capacity() {
                if let Some(c) = config() {
                    super::throttling_holds_upstreams_under_their_capacity(c).await
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_throttled_caller_times_out_but_the_saga_completes() {
                if let Some(c) = config() {
                    super::a_throttled_caller_times_out_but_the_saga_completes(c).await
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn poison_messages_are_dead_lettered_and_service_goes_on() {
                if let Some(c) = config() {
                    super::poison_messages_are_dead_lettered_and_service_goes_on(c).await
                }
            }
        }
    };
}

broker_flow_tests!(memory, |_| true);

/// Whether a broker on this machine's port answers; when it does not, the
/// tests skip with a printed reason, or fail when `SAGAFLOW_REQUIRE_BROKERS` is set.
fn reachable(name: &str, port: u16) -> bool {
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        return true;
    }
    assert!(std::env::var_os("SAGAFLOW_REQUIRE_BROKERS").is_none(), "{name} on 127.0.0.1:{port} is required");
    eprintln!("skipping: {name} is not reachable on 127.0.0.1:{port}");
    false
}

/// Topics of their own per test, so tests running at once on one server do not share work.
fn isolate(config: &mut Config) {
    let run = uuid::Uuid::new_v4().simple().to_string();
    config.message_queue.topic_prefix = Some(format!("e2e-{}", &run[..12]));
    config.pod_id = format!("pod-{}", &run[..6]);
}

broker_flow_tests!(nats, |c| {
    isolate(c);
    c.broker = booking::config::BrokerKind::Nats;
    c.broker_url = std::env::var("SAGAFLOW_NATS_URL").ok();
    reachable("NATS", 4222)
});

broker_flow_tests!(rabbitmq, |c| {
    isolate(c);
    c.broker = booking::config::BrokerKind::Rabbitmq;
    // Each test's queues are its own: let the shared server drop them soon after.
    c.broker_queue_expiry_ms = Some(30_000);
    c.broker_url = std::env::var("SAGAFLOW_RABBITMQ_URL").ok();
    reachable("RabbitMQ", 5672)
});
