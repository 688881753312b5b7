//! Several orchestrator replicas over one PostgreSQL saga log and one broker, each its own
//! process, calling one pair of mock upstreams: a replica killed, killed and restarted, or
//! paused past its lease has its sagas taken over by the others, every saga ends once, and a
//! request id asked on any replica gets its saga's outcome.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use booking::proto::pb::booking_service_client::BookingServiceClient;
use rand::Rng;
use sagaflow::{SagaRecord, SagaStatus};
use support::replicas::{
    Answer, BrokerKind, Call, Cluster, Job, LEASE_TTL_MS, Load, Spec, check_answers, mixed_jobs, servers_up,
};
use support::{booking, channel, with_id};
use tonic::Code;

/// Bookings of the main load, and callers sending them at once.
const BOOKINGS: usize = 450;
const CALLERS: usize = 24;
/// Bookings sent after a replica comes back, round-robin over all three.
const AFTER: usize = 150;
/// How long every saga has to end once the callers are answered.
const END_WITHIN: Duration = Duration::from_secs(60);

const TAKEN_OVER: &str = "sagaflow_taken_over_total";
const TOOK_OVER_LOG: &str = "took over the sagas of an expired replica";
const LEASE_LOST_LOG: &str = "lease ran out and this replica's sagas were taken over";

/// Whether replica `i` answered some of `answers` itself (first try, no retry elsewhere).
fn served(answers: &[Answer], i: usize) -> bool {
    answers.iter().any(|a| a.job.replica == i && a.retries == 0)
}

fn tag(what: &str) -> String {
    format!("{what}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A random point between a quarter and a half of the load.
fn some_point_of(n: usize) -> usize {
    rand::rng().random_range(n / 4..n / 2)
}

/// The sagas that replica `victim` had begun before `since_ms` and that another replica ended:
/// the ones taken over from it. (Callers move to another replica only after `since_ms`, so a
/// saga begun earlier for a job of the victim was begun by the victim.)
fn taken_from(
    victim: &str,
    since_ms: u64,
    jobs: &[Job],
    victim_index: usize,
    records: &HashMap<String, SagaRecord>,
) -> Vec<SagaRecord> {
    jobs.iter()
        .filter(|j| j.replica == victim_index && j.call != Call::Async)
        .filter_map(|j| records.get(&j.id))
        .filter(|r| r.created_ms < since_ms && r.owner.as_deref().is_some_and(|o| o != victim))
        .cloned()
        .collect()
}

/// Sum of the takeover counter over the replicas other than `victim`.
async fn taken_over_metric(cluster: &Cluster, victim: usize) -> f64 {
    let mut total = 0.0;
    for i in (0..cluster.replicas.len()).filter(|&i| i != victim) {
        total += cluster.counter(i, TAKEN_OVER).await;
    }
    total
}

/// Waits until a replica other than `victim` has taken sagas over (at most 30 s).
async fn wait_for_takeover(cluster: &Cluster, victim: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while taken_over_metric(cluster, victim).await == 0.0 {
        assert!(Instant::now() < deadline, "nobody took over the sagas of replica {victim} within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one run measured.
struct Report {
    sagas: usize,
    taken: usize,
    /// From the kill (or pause) to the end of the last saga taken over.
    takeover: Duration,
}

/// The checks every scenario ends with: every saga ended, callers told the truth, the upstreams
/// agree with the log, and the sagas begun by `victim` before `since_ms` that are not its own any
/// more were taken over (the survivors' counter counts them) and ended.
async fn settle(
    cluster: &Cluster,
    name: &str,
    answers: &[Answer],
    jobs: &[Job],
    victim: usize,
    since_ms: u64,
) -> (Report, HashMap<String, SagaRecord>) {
    let ids: Vec<String> = answers.iter().map(|a| a.job.id.clone()).collect();
    let records = cluster.all_ended(&ids, END_WITHIN).await;
    check_answers(answers, &records);
    let effects = cluster.check_effects(&records).await;
    let faults = answers.iter().filter(|a| a.job.fault).count();
    assert!(effects.compensated >= faults, "{} compensated < {faults} fault-injected", effects.compensated);

    let pod = cluster.replicas[victim].pod.clone();
    let taken = taken_from(&pod, since_ms, jobs, victim, &records);
    let metric = taken_over_metric(cluster, victim).await;
    assert!(!taken.is_empty(), "{name}: no saga of the victim was taken over (the kill came too late?)");
    // At least those: a claim also takes what the victim began after the pause and before it
    // learnt its lease was lost, and under a slow database a survivor's lease may run out too.
    assert!(metric as usize >= taken.len(), "{name}: {TAKEN_OVER} {metric} < {} sagas moved", taken.len());
    let logged =
        (0..cluster.replicas.len()).filter(|&i| i != victim).any(|i| cluster.log_of(i).contains(TOOK_OVER_LOG));
    assert!(logged, "{name}: no survivor logged `{TOOK_OVER_LOG}`");
    let last_end = taken.iter().map(|r| r.updated_ms).max().unwrap();
    let takeover = Duration::from_millis(last_end.saturating_sub(since_ms));
    // Of every saga begun before the kill (or pause), async ones included: those are nobody's,
    // and a dead replica's unacked hops come back when the broker's ack wait runs out.
    let before = records.values().filter(|r| r.created_ms < since_ms);
    let all_ended = before.map(|r| r.updated_ms).max().unwrap_or(since_ms).saturating_sub(since_ms);
    let retried = answers.iter().filter(|a| a.retries > 0).count();
    println!(
        "{name}: sagas {}, completed {}, compensated {} (fault-injected {faults}), callers that retried {retried}",
        records.len(),
        effects.completed,
        effects.compensated
    );
    println!(
        "{name}: taken over {} ({TAKEN_OVER} {metric}); last of them ended {:.2} s after the kill/pause (lease {LEASE_TTL_MS} ms)",
        taken.len(),
        takeover.as_secs_f64()
    );
    println!("{name}: every saga begun before it (async ones too) ended {:.2} s after it", all_ended as f64 / 1000.0);
    println!(
        "{name}: upstream duplicates absorbed {}, creates refused after their cancel {}",
        effects.duplicates_absorbed, effects.refused_after_cancel
    );
    let count =
        |what: &str| (0..cluster.replicas.len()).map(|i| cluster.log_of(i).matches(what).count()).sum::<usize>();
    println!(
        "{name}: leases lost {}, renewed late {}, drains handed back {}",
        count(LEASE_LOST_LOG),
        count("lease renewed after it had run out"),
        count("replica is back")
    );
    (Report { sagas: records.len(), taken: taken.len(), takeover }, records)
}

/// Three replicas under mixed load; one is SIGKILLed mid-load and stays dead.
async fn kill_one_of_three(broker: BrokerKind, name: &str) -> Report {
    let t = Instant::now();
    let mut cluster = Cluster::start(Spec::new(3, broker)).await;
    println!("{name}: cluster up after {:?}", t.elapsed());
    let jobs = mixed_jobs(&tag(name), BOOKINGS, 3);
    let load = Load::start(cluster.grpc_ports(), jobs.clone(), CALLERS);
    load.sent(some_point_of(BOOKINGS)).await;
    let victim = 1;
    let killed_at = cluster.kill(victim);
    println!("{name}: killed after {:?}", t.elapsed());
    let answers = load.finish().await;
    println!("{name}: answered after {:?}", t.elapsed());
    let (report, _) = settle(&cluster, name, &answers, &jobs, victim, killed_at).await;
    println!("{name}: settled after {:?}", t.elapsed());
    assert_eq!(report.sagas, BOOKINGS);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_sagas_are_taken_over_nats() {
    if servers_up(BrokerKind::Nats) {
        let report = kill_one_of_three(BrokerKind::Nats, "kill-nats").await;
        assert!(report.taken > 0 && report.takeover > Duration::ZERO);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_sagas_are_taken_over_rabbitmq() {
    if servers_up(BrokerKind::Rabbitmq) {
        let report = kill_one_of_three(BrokerKind::Rabbitmq, "kill-rabbitmq").await;
        assert!(report.taken > 0 && report.takeover > Duration::ZERO);
    }
}

/// A replica SIGKILLed mid-load and restarted under its pod id as soon as the others have begun
/// taking its sagas over; then more load over all three, the restarted one included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_during_the_takeover_drives_nothing_twice() {
    if !servers_up(BrokerKind::Nats) {
        return;
    }
    let name = "restart";
    let mut cluster = Cluster::start(Spec::new(3, BrokerKind::Nats)).await;
    let run = tag(name);
    let mut jobs = mixed_jobs(&run, BOOKINGS, 3);
    let load = Load::start(cluster.grpc_ports(), jobs.clone(), CALLERS);
    load.sent(some_point_of(BOOKINGS)).await;
    let victim = 2;
    let killed_at = cluster.kill(victim);
    wait_for_takeover(&cluster, victim).await;
    cluster.start_replica(victim).await;
    let restarted_after = Duration::from_millis(sagaflow::now_ms() - killed_at);
    let mut answers = load.finish().await;

    // The restarted replica takes work again, beside the ones still finishing what was its.
    let after = mixed_jobs(&format!("{run}-after"), AFTER, 3);
    let served_after = Load::start(cluster.grpc_ports(), after.clone(), CALLERS).finish().await;
    assert!(served(&served_after, victim), "the replica that came back answers again");
    answers.extend(served_after);
    jobs.extend(after);
    let (report, _) = settle(&cluster, name, &answers, &jobs, victim, killed_at).await;
    assert_eq!(report.sagas, BOOKINGS + AFTER);
    assert!(cluster.log_of(victim).contains("registered in the shared saga log"));
    println!("{name}: restarted {:.2} s after the kill", restarted_after.as_secs_f64());
}

/// A request id asked again on another replica gets the saga's outcome: at once when it has
/// ended, and when it ends while it still runs on the first replica (a slow upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_asked_on_another_replica_gets_the_outcome() {
    if !servers_up(BrokerKind::Nats) {
        return;
    }
    let spec = Spec { payment_latency_ms: 1_500, ..Spec::new(2, BrokerKind::Nats) };
    let cluster = Cluster::start(spec).await;
    let run = tag("ask");
    let client = |i: usize| {
        let port = cluster.replicas[i].grpc;
        async move { BookingServiceClient::new(channel(([127, 0, 0, 1], port).into()).await) }
    };
    let (mut a, mut b) = (client(0).await, client(1).await);

    // Ended: the same ids from B as from A; a compensated one is ABORTED on both.
    for call in [Call::Sync, Call::Throttling] {
        let id = format!("{run}-{call:?}-done");
        let first = reply(&mut a, call, &id, false).await.expect("completes on A");
        let again = reply(&mut b, call, &id, false).await.expect("the recorded outcome on B");
        assert_eq!(first, again, "{id}: B answered with other ids than A");
        let id = format!("{run}-{call:?}-fault");
        for client in [&mut a, &mut b] {
            let status = reply(client, call, &id, true).await.unwrap_err();
            assert_eq!(status.code(), Code::Aborted, "{id}: {status:?}");
            assert!(status.message().contains("CreatePayment"), "{id}: {}", status.message());
        }
    }

    // Still running on A: B's caller waits for the end and gets it.
    for call in [Call::Sync, Call::Throttling] {
        let id = format!("{run}-{call:?}-slow");
        let mut on_a = a.clone();
        let (first_id, started) = (id.clone(), Instant::now());
        let first = tokio::spawn(async move {
            let answer = reply(&mut on_a, call, &first_id, false).await;
            (answer, started.elapsed())
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let running = cluster.records().await.get(&id).map(|r| r.status());
            if running == Some(SagaStatus::Running) {
                break;
            }
            assert!(Instant::now() < deadline && running.is_none(), "{id} on A: {running:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let again = reply(&mut b, call, &id, false).await;
        let b_done = started.elapsed();
        let (first, a_done) = first.await.unwrap();
        let (first, again) =
            (first.expect("completes on A"), again.expect("B waits for the end, no DEADLINE_EXCEEDED"));
        assert_eq!(first, again, "{id}: B answered with other ids than A");
        let record = &cluster.records().await[&id];
        assert_eq!(record.owner.as_deref(), Some(cluster.replicas[0].pod.as_str()), "{id} ran on A");
        println!(
            "ask: {call:?} saga on A answered there after {:.2} s, on B after {:.2} s",
            a_done.as_secs_f64(),
            b_done.as_secs_f64()
        );
    }
    let records = cluster.all_ended(&[], END_WITHIN).await;
    assert_eq!(records.len(), 6);
    let effects = cluster.check_effects(&records).await;
    assert_eq!((effects.completed, effects.compensated), (4, 2));
}

/// Calls `call` with FaultInject `fault`; the order and payment ids of a completed booking.
async fn reply(
    client: &mut BookingServiceClient<tonic::transport::Channel>,
    call: Call,
    id: &str,
    fault: bool,
) -> Result<(i64, i64), tonic::Status> {
    let request = with_id(Some(id), booking(1, 1, fault));
    let reply = match call {
        Call::Sync => client.handle_sync_booking(request).await?,
        Call::Throttling => client.handle_throttling_booking(request).await?,
        Call::Async => unreachable!("async calls have no outcome to answer with"),
    };
    let reply = reply.into_inner();
    assert_eq!(reply.request_id, id);
    Ok((reply.order_id, reply.payment_id))
}

/// A replica SIGSTOPped mid-load past its lease, then SIGCONTed once the others took its sagas:
/// it leaves them alone, learns that its lease was lost, and serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_leaves_its_taken_sagas_alone() {
    if !servers_up(BrokerKind::Nats) {
        return;
    }
    let name = "pause";
    let cluster = Cluster::start(Spec::new(3, BrokerKind::Nats)).await;
    let run = tag(name);
    let mut jobs = mixed_jobs(&run, BOOKINGS, 3);
    let load = Load::start(cluster.grpc_ports(), jobs.clone(), CALLERS);
    load.sent(some_point_of(BOOKINGS)).await;
    let victim = 0;
    let paused_at = cluster.pause(victim);
    wait_for_takeover(&cluster, victim).await;
    // Let the takeover finish claiming and queueing before the victim wakes up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.resume(victim);
    let paused_for = Duration::from_millis(sagaflow::now_ms() - paused_at);
    let mut answers = load.finish().await;

    let after = mixed_jobs(&format!("{run}-after"), AFTER, 3);
    let served_after = Load::start(cluster.grpc_ports(), after.clone(), CALLERS).finish().await;
    assert!(served(&served_after, victim), "the replica that came back answers again");
    answers.extend(served_after);
    jobs.extend(after);
    let (report, _) = settle(&cluster, name, &answers, &jobs, victim, paused_at).await;
    assert_eq!(report.sagas, BOOKINGS + AFTER);
    let log = cluster.log_of(victim);
    assert!(log.contains(LEASE_LOST_LOG), "the paused replica did not log `{LEASE_LOST_LOG}`");
    let fenced = log.lines().filter(|l| l.contains("taken over by another replica")).count();
    println!("{name}: paused for {:.2} s; fenced writes the victim logged: {fenced}", paused_for.as_secs_f64());
}
