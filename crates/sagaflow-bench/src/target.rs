//! What one request does: a booking through the orchestrator (sync, async with its callback,
//! throttling), or the same two-step saga called directly on the upstream services.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::callback::CallbackHub;
use crate::proto::pb::BookingRequest;
use crate::proto::pb::booking_service_client::BookingServiceClient;
use crate::proto::upstream::order_service_client::OrderServiceClient;
use crate::proto::upstream::payment_service_client::PaymentServiceClient;
use crate::proto::upstream::{CancelRequest, CreateOrderRequest, CreatePaymentRequest, SnapshotRequest};
use crate::report::{UpstreamCounters, Upstreams};
use crate::stats::Outcome;

/// The metadata key naming the saga.
const REQUEST_ID_HEADER: &str = "x-request-id";
/// Price of one item, as the booking example charges it.
const UNIT_PRICE: i64 = 100;
/// Snapshots list every record: allow large ones.
const MAX_SNAPSHOT_BYTES: usize = 256 * 1024 * 1024;

/// The booking flows of the orchestrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Flow {
    /// `HandleSyncBooking`: the caller waits while the orchestrator runs the steps.
    Sync,
    /// `HandleAsyncBooking`: accepted at once; done when the callback arrives.
    Async,
    /// `HandleThrottlingBooking`: queued on the broker, consumed by a fixed number of consumers.
    Throttling,
}

impl Flow {
    /// The flow's name in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async => "async",
            Self::Throttling => "throttling",
        }
    }
}

/// gRPC connections to one address, used in turn.
#[derive(Debug)]
pub(crate) struct Pool<T> {
    items: Vec<T>,
    next: AtomicUsize,
}

impl<T: Clone> Pool<T> {
    fn new(items: Vec<T>) -> Self {
        Self { items, next: AtomicUsize::new(0) }
    }

    /// The next client, round robin.
    fn get(&self) -> T {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.items.len();
        self.items[i].clone()
    }
}

/// Opens `count` HTTP/2 connections to `addr`, retrying until `patience` runs out (the service may be starting).
pub(crate) async fn connect(addr: &str, count: usize, patience: Duration) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("`{addr}` is not a HOST:PORT"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        // Many small concurrent calls: wide windows so flow control never throttles them.
        .initial_connection_window_size(16 * 1024 * 1024)
        .initial_stream_window_size(1024 * 1024);
    let deadline = Instant::now() + patience;
    let mut channels = Vec::with_capacity(count);
    while channels.len() < count.max(1) {
        match endpoint.connect().await {
            Ok(channel) => channels.push(channel),
            Err(error) if Instant::now() >= deadline => {
                return Err(anyhow::Error::new(error).context(format!("connecting to {addr}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(channels)
}

/// One orchestrator replica: its address, its connections, and what it was sent.
#[derive(Debug)]
pub(crate) struct Replica {
    addr: String,
    clients: Pool<BookingServiceClient<Channel>>,
    requests: AtomicU64,
    successes: AtomicU64,
}

impl Replica {
    /// The replica at `addr`, over `channels`.
    pub(crate) fn new(addr: impl Into<String>, channels: Vec<Channel>) -> Self {
        Self {
            addr: addr.into(),
            clients: Pool::new(channels.into_iter().map(BookingServiceClient::new).collect()),
            requests: AtomicU64::new(0),
            successes: AtomicU64::new(0),
        }
    }
}

/// Requests sent to one replica so far, and how many got the answer they asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sent {
    /// The replica's address.
    pub(crate) addr: String,
    /// Requests sent to it.
    pub(crate) requests: u64,
    /// Of those, the successes.
    pub(crate) successes: u64,
}

/// What the load calls.
#[derive(Debug)]
pub(crate) enum Target {
    /// A booking flow of the orchestrator, on one replica or spread over several.
    Booking {
        /// Which flow.
        flow: Flow,
        /// The replicas (at least one). Request `i` goes to replica `i mod len`: round robin,
        /// as a gRPC load balancer spreads calls.
        replicas: Vec<Replica>,
        /// For `async`: where callbacks arrive, and the URL to give.
        callbacks: Option<(Arc<CallbackHub>, String)>,
    },
    /// CreateOrder then CreatePayment (and CancelOrder when the payment is refused) on the upstreams.
    Direct {
        /// Clients of the OrderService.
        orders: Pool<OrderServiceClient<Channel>>,
        /// Clients of the PaymentService.
        payments: Pool<PaymentServiceClient<Channel>>,
    },
}

impl Target {
    /// A booking flow over `replicas`; `callbacks` is required for `async`.
    pub(crate) fn booking(
        flow: Flow,
        replicas: Vec<Replica>,
        callbacks: Option<(Arc<CallbackHub>, String)>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!replicas.is_empty(), "no orchestrator to call: give at least one --target");
        Ok(Self::Booking { flow, replicas, callbacks })
    }

    /// Requests sent to each replica so far (empty for `direct`).
    pub(crate) fn sent(&self) -> Vec<Sent> {
        match self {
            Self::Booking { replicas, .. } => replicas
                .iter()
                .map(|r| Sent {
                    addr: r.addr.clone(),
                    requests: r.requests.load(Ordering::Relaxed),
                    successes: r.successes.load(Ordering::Relaxed),
                })
                .collect(),
            Self::Direct { .. } => Vec::new(),
        }
    }

    /// The two upstream calls, over their channels.
    pub(crate) fn direct(orders: Vec<Channel>, payments: Vec<Channel>) -> Self {
        Self::Direct {
            orders: Pool::new(orders.into_iter().map(OrderServiceClient::new).collect()),
            payments: Pool::new(payments.into_iter().map(PaymentServiceClient::new).collect()),
        }
    }

    /// The name of what is called, for reports.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Booking { flow, .. } => flow.name(),
            Self::Direct { .. } => "direct",
        }
    }

    /// Makes request number `i`, identified by `request_id`, carrying `FaultInject` when `fault`.
    pub(crate) async fn call(&self, request_id: &str, i: u64, fault: bool) -> Outcome {
        let Ok(id) = MetadataValue::try_from(request_id) else {
            return Outcome::failure("INVALID_ID", format!("request id `{request_id}` is not valid metadata"));
        };
        let product_id = 1 + (i % 1000) as i64;
        match self {
            Self::Booking { flow, replicas, callbacks } => {
                let replica = &replicas[(i % replicas.len() as u64) as usize];
                replica.requests.fetch_add(1, Ordering::Relaxed);
                let outcome = async {
                    let booking = BookingRequest {
                        product_id,
                        count: 1,
                        fault_inject: fault,
                        callback_url: callbacks.as_ref().map(|(_, url)| url.clone()).unwrap_or_default(),
                    };
                    let mut client = replica.clients.get();
                    match flow {
                        Flow::Sync => {
                            answered(client.handle_sync_booking(with_id(booking, &id)).await.map(drop), fault)
                        }
                        Flow::Throttling => {
                            answered(client.handle_throttling_booking(with_id(booking, &id)).await.map(drop), fault)
                        }
                        Flow::Async => {
                            let Some((hub, _)) = callbacks else {
                                return Outcome::failure("NO_RECEIVER", "async flow without a callback receiver");
                            };
                            // Wait before sending: the callback may come before the answer.
                            let mut waiting = hub.wait_for(request_id);
                            if let Err(status) = client.handle_async_booking(with_id(booking, &id)).await {
                                return failed(&status);
                            }
                            match waiting.status().await {
                                Some(status) => called_back(status, fault),
                                None => Outcome::failure("NO_CALLBACK", "the callback receiver stopped"),
                            }
                        }
                    }
                }
                .await;
                if outcome.ok {
                    replica.successes.fetch_add(1, Ordering::Relaxed);
                }
                outcome
            }
            Self::Direct { orders, payments } => {
                let order =
                    match orders.get().create_order(with_id(CreateOrderRequest { product_id, count: 1 }, &id)).await {
                        Ok(order) => order.into_inner(),
                        Err(status) => return step_failed("CreateOrder", &status),
                    };
                let payment = CreatePaymentRequest { order_id: order.id, amount: UNIT_PRICE, fault_inject: fault };
                match payments.get().create_payment(with_id(payment, &id)).await {
                    Ok(_) if !fault => Outcome::success("OK"),
                    Ok(_) => Outcome::failure("OK", "FaultInject was set but the payment was taken"),
                    Err(status) if fault && status.code() == Code::FailedPrecondition => {
                        // The compensation the saga would run.
                        match orders.get().cancel_order(with_id(CancelRequest {}, &id)).await {
                            Ok(_) => Outcome::success("ABORTED"),
                            Err(status) => step_failed("CancelOrder", &status),
                        }
                    }
                    Err(status) => step_failed("CreatePayment", &status),
                }
            }
        }
    }
}

/// A request carrying the saga's id as `x-request-id`.
fn with_id<T>(message: T, id: &MetadataValue<tonic::metadata::Ascii>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(REQUEST_ID_HEADER, id.clone());
    request
}

/// The outcome of a sync or throttled booking: OK, or ABORTED (rolled back) when `FaultInject` asked for it.
fn answered(result: Result<(), Status>, fault: bool) -> Outcome {
    match result {
        Ok(()) if !fault => Outcome::success("OK"),
        Ok(()) => Outcome::failure("OK", "FaultInject was set but the booking completed"),
        Err(status) if fault && status.code() == Code::Aborted => Outcome::success("ABORTED"),
        Err(status) => failed(&status),
    }
}

/// The outcome of an async booking from its callback's status.
fn called_back(status: String, fault: bool) -> Outcome {
    let expected = if fault { "compensated" } else { "completed" };
    if status == expected {
        return Outcome::success(expected);
    }
    let error = format!("callback status `{status}`, expected `{expected}`");
    match status.as_str() {
        "completed" => Outcome::failure("completed", error),
        "compensated" => Outcome::failure("compensated", error),
        "stuck" => Outcome::failure("stuck", error),
        _ => Outcome::failure("callback", error),
    }
}

fn failed(status: &Status) -> Outcome {
    Outcome::failure(code_name(status.code()), format!("{}: {}", code_name(status.code()), status.message()))
}

fn step_failed(step: &str, status: &Status) -> Outcome {
    Outcome::failure(code_name(status.code()), format!("{step}: {}: {}", code_name(status.code()), status.message()))
}

/// The canonical name of a gRPC status code.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Both upstreams' counters (their `Snapshot` calls).
pub(crate) async fn snapshot(order: &str, payment: &str, patience: Duration) -> anyhow::Result<Upstreams> {
    let order_channel = connect(order, 1, patience).await?.remove(0);
    let payment_channel = connect(payment, 1, patience).await?.remove(0);
    let orders = OrderServiceClient::new(order_channel).max_decoding_message_size(MAX_SNAPSHOT_BYTES);
    let payments = PaymentServiceClient::new(payment_channel).max_decoding_message_size(MAX_SNAPSHOT_BYTES);
    let order = orders.clone().snapshot(SnapshotRequest {}).await.context("OrderService.Snapshot")?.into_inner();
    let payment = payments.clone().snapshot(SnapshotRequest {}).await.context("PaymentService.Snapshot")?.into_inner();
    Ok(Upstreams { order: counters(order.counters), payment: counters(payment.counters) })
}

fn counters(counters: Option<crate::proto::upstream::Counters>) -> UpstreamCounters {
    let c = counters.unwrap_or_default();
    UpstreamCounters {
        calls: c.calls,
        creates: c.creates,
        cancels: c.cancels,
        duplicates_absorbed: c.duplicates_absorbed,
        peak_in_flight: c.peak_in_flight,
        rejected: c.rejected,
        injected_failures: c.injected_failures,
        in_flight: c.in_flight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolled_back_booking_is_a_success_only_when_it_asked_for_it() {
        assert!(answered(Ok(()), false).ok);
        assert!(!answered(Ok(()), true).ok);
        let aborted = Status::aborted("booking x was rolled back");
        assert_eq!(answered(Err(aborted.clone()), true), Outcome::success("ABORTED"));
        let outcome = answered(Err(aborted), false);
        assert!(!outcome.ok);
        assert_eq!(outcome.code, "ABORTED");
        assert_eq!(outcome.error.as_deref(), Some("ABORTED: booking x was rolled back"));
        assert_eq!(answered(Err(Status::unavailable("down")), true).code, "UNAVAILABLE");
    }

    #[test]
    fn an_async_booking_succeeds_when_its_callback_says_what_was_asked() {
        assert_eq!(called_back("completed".into(), false), Outcome::success("completed"));
        assert_eq!(called_back("compensated".into(), true), Outcome::success("compensated"));
        let stuck = called_back("stuck".into(), true);
        assert!(!stuck.ok);
        assert_eq!(stuck.code, "stuck");
        assert!(!called_back("compensated".into(), false).ok);
        assert_eq!(called_back("weird".into(), false).code, "callback");
    }

    /// A loopback address where nothing listens.
    fn closed_port() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    }

    #[tokio::test]
    async fn requests_go_round_robin_over_the_replicas_and_each_is_counted() {
        let replicas: Vec<Replica> = (0..3)
            .map(|_| {
                let addr = closed_port();
                let channel = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
                Replica::new(addr, vec![channel])
            })
            .collect();
        let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
        let target = Target::booking(Flow::Sync, replicas, None).unwrap();
        for i in 0..7 {
            let outcome = target.call(&format!("req-{i}"), i, false).await;
            assert_eq!(outcome.code, "UNAVAILABLE", "nothing listens: {outcome:?}");
        }
        let sent = target.sent();
        let expected: Vec<Sent> =
            addrs.into_iter().zip([3, 2, 2]).map(|(addr, requests)| Sent { addr, requests, successes: 0 }).collect();
        assert_eq!(sent, expected);
        assert!(Target::booking(Flow::Sync, Vec::new(), None).is_err());
    }

    #[test]
    fn status_codes_have_their_canonical_names() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }
}
