//! The mock Order service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::store::{MockConfig, Store};
use crate::proto::upstream::{
    CancelReply, CancelRequest, CreateOrderRequest, Order, SnapshotReply, SnapshotRequest,
    order_service_server::{OrderService, OrderServiceServer},
};

/// The mock Order service: idempotent orders keyed by `x-request-id`.
#[derive(Debug, Clone)]
pub struct OrderMock {
    store: Arc<Store>,
}

impl OrderMock {
    /// A new, empty Order service that behaves as `config` says.
    pub fn new(config: MockConfig) -> Self {
        Self { store: Arc::new(Store::new("order", config)) }
    }

    /// The tonic service to mount on a gRPC server.
    pub fn into_server(self) -> OrderServiceServer<Self> {
        OrderServiceServer::new(self)
    }

    /// Makes every later cancel fail with `UNAVAILABLE` (`true`), as an upstream
    /// whose undo is down, or work again (`false`); other calls are unaffected.
    pub fn set_fail_cancels(&self, fail: bool) {
        self.store.set_fail_cancels(fail);
    }

    /// Makes every later create take `delay` more, as a forward step gone slow (zero: back
    /// to the configured latency); cancels are unaffected.
    pub fn set_create_delay(&self, delay: std::time::Duration) {
        self.store.set_create_delay(delay);
    }

    /// Starts `peak_in_flight` over from the calls in flight now.
    pub fn reset_peak(&self) {
        self.store.reset_peak();
    }

    /// Every record and the counters, as the `Snapshot` call returns them.
    pub fn snapshot(&self) -> SnapshotReply {
        self.store.snapshot()
    }
}

#[tonic::async_trait]
impl OrderService for OrderMock {
    async fn create_order(&self, request: Request<CreateOrderRequest>) -> Result<Response<Order>, Status> {
        let (request_id, _slot) = self.store.enter_create(request.metadata()).await?;
        let order = request.get_ref();
        if order.product_id <= 0 {
            return Err(Status::invalid_argument("product_id must be positive"));
        }
        if order.count <= 0 {
            return Err(Status::invalid_argument("count must be positive"));
        }
        let created = self.store.create(&request_id, || Ok(()))?;
        Ok(Response::new(Order { id: created.id, request_id, status: "active".to_owned() }))
    }

    async fn cancel_order(&self, request: Request<CancelRequest>) -> Result<Response<CancelReply>, Status> {
        let (request_id, _slot) = self.store.enter_cancel(request.metadata()).await?;
        Ok(Response::new(self.store.cancel(&request_id)?))
    }

    async fn snapshot(&self, _request: Request<SnapshotRequest>) -> Result<Response<SnapshotReply>, Status> {
        Ok(Response::new(self.store.snapshot()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;
    use crate::upstream::store::tests::with_id;

    fn order() -> CreateOrderRequest {
        CreateOrderRequest { product_id: 1, count: 1 }
    }

    fn counters(mock: &OrderMock) -> crate::proto::upstream::Counters {
        mock.snapshot().counters.unwrap()
    }

    #[tokio::test]
    async fn repeat_create_returns_the_same_order() {
        let mock = OrderMock::new(MockConfig::default());
        let first = mock.create_order(with_id("r1", order())).await.unwrap().into_inner();
        let again = mock.create_order(with_id("r1", order())).await.unwrap().into_inner();
        assert_eq!(first.id, 1);
        assert_eq!(first, again);
        assert_eq!(first.request_id, "r1");
        let other = mock.create_order(with_id("r2", order())).await.unwrap();
        assert_eq!(other.get_ref().id, 2);
        let c = counters(&mock);
        assert_eq!((c.calls, c.creates, c.duplicates_absorbed), (3, 2, 1));
        assert_eq!(mock.snapshot().records.len(), 2);
    }

    #[tokio::test]
    async fn cancel_before_create_leaves_a_tombstone_that_refuses_the_create() {
        let mock = OrderMock::new(MockConfig::default());
        let reply = mock.cancel_order(with_id("r1", CancelRequest {})).await.unwrap().into_inner();
        assert_eq!(reply, CancelReply { id: 0, already_cancelled: false });
        let err = mock.create_order(with_id("r1", order())).await.unwrap_err();
        assert_eq!(err.code(), Code::Aborted);
        assert_eq!(err.message(), "order for request r1 was cancelled");
        let snapshot = mock.snapshot();
        assert_eq!(snapshot.records.len(), 1);
        assert_eq!(snapshot.records[0].status, "tombstone");
        let c = snapshot.counters.unwrap();
        assert_eq!((c.creates, c.cancels, c.refused_after_cancel), (0, 1, 1));
    }

    #[tokio::test]
    async fn cancel_twice_is_idempotent_and_refuses_a_late_create() {
        let mock = OrderMock::new(MockConfig::default());
        let id = mock.create_order(with_id("r1", order())).await.unwrap().into_inner().id;
        let first = mock.cancel_order(with_id("r1", CancelRequest {})).await.unwrap().into_inner();
        let second = mock.cancel_order(with_id("r1", CancelRequest {})).await.unwrap().into_inner();
        assert_eq!(first, CancelReply { id, already_cancelled: false });
        assert_eq!(second, CancelReply { id, already_cancelled: true });
        let record = &mock.snapshot().records[0];
        assert_eq!(record.status, "cancelled");
        assert!(record.cancelled_at_ms >= record.created_at_ms);
        let err = mock.create_order(with_id("r1", order())).await.unwrap_err();
        assert_eq!(err.code(), Code::Aborted);
    }

    #[tokio::test]
    async fn over_capacity_calls_are_rejected() {
        tokio::time::pause();
        let mock =
            OrderMock::new(MockConfig { latency: Duration::from_millis(100), capacity: 1, ..MockConfig::default() });
        let (first, second) =
            tokio::join!(mock.create_order(with_id("r1", order())), mock.create_order(with_id("r2", order())),);
        assert_eq!(first.unwrap().get_ref().id, 1);
        let err = second.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(err.message(), "order service over capacity (1 in flight)");
        let c = counters(&mock);
        assert_eq!((c.peak_in_flight, c.rejected, c.in_flight), (1, 1, 0));
        // The slot is free again once the first call is done.
        assert!(mock.create_order(with_id("r2", order())).await.is_ok());
    }

    #[tokio::test]
    async fn a_reset_peak_counts_from_the_calls_in_flight_then() {
        tokio::time::pause();
        let mock = OrderMock::new(MockConfig { latency: Duration::from_millis(100), ..MockConfig::default() });
        let (a, b) = tokio::join!(mock.create_order(with_id("r1", order())), mock.create_order(with_id("r2", order())));
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(counters(&mock).peak_in_flight, 2);
        mock.reset_peak();
        assert_eq!(counters(&mock).peak_in_flight, 0);
        mock.cancel_order(with_id("r1", CancelRequest {})).await.unwrap();
        assert_eq!(counters(&mock).peak_in_flight, 1);
    }

    #[tokio::test]
    async fn a_create_delay_slows_creates_only_until_lifted() {
        tokio::time::pause();
        let mock = OrderMock::new(MockConfig::default());
        mock.set_create_delay(Duration::from_secs(5));
        let start = tokio::time::Instant::now();
        mock.cancel_order(with_id("r0", CancelRequest {})).await.unwrap();
        assert!(start.elapsed() < Duration::from_millis(1), "{:?}", start.elapsed());
        mock.create_order(with_id("r1", order())).await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(5), "{:?}", start.elapsed());
        mock.set_create_delay(Duration::ZERO);
        let lifted = tokio::time::Instant::now();
        mock.create_order(with_id("r2", order())).await.unwrap();
        assert!(lifted.elapsed() < Duration::from_millis(1), "{:?}", lifted.elapsed());
    }

    #[tokio::test]
    async fn latency_is_spent_inside_the_call() {
        tokio::time::pause();
        let mock = OrderMock::new(MockConfig { latency: Duration::from_secs(3), ..MockConfig::default() });
        let start = tokio::time::Instant::now();
        let (a, b) = tokio::join!(
            mock.create_order(with_id("r1", order())),
            mock.cancel_order(with_id("r2", CancelRequest {})),
        );
        assert!(a.is_ok() && b.is_ok());
        // Both calls wait out their latency together (the timer rounds up to the next millisecond).
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(4), "{elapsed:?}");
        assert_eq!(counters(&mock).peak_in_flight, 2);
    }

    #[tokio::test]
    async fn cancel_latency_slows_cancels_only_and_repeats_are_counted() {
        tokio::time::pause();
        let mock = OrderMock::new(MockConfig { cancel_latency: Duration::from_secs(2), ..MockConfig::default() });
        let start = tokio::time::Instant::now();
        mock.create_order(with_id("r1", order())).await.unwrap();
        assert!(start.elapsed() < Duration::from_millis(1), "{:?}", start.elapsed());
        mock.cancel_order(with_id("r1", CancelRequest {})).await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(2), "{:?}", start.elapsed());
        mock.cancel_order(with_id("r1", CancelRequest {})).await.unwrap();
        mock.cancel_order(with_id("r2", CancelRequest {})).await.unwrap();
        let records = mock.snapshot().records;
        let calls: Vec<_> =
            records.iter().map(|r| (r.request_id.as_str(), r.status.as_str(), r.cancel_calls)).collect();
        assert_eq!(calls, [("r1", "cancelled", 2), ("r2", "tombstone", 1)]);
    }

    #[tokio::test]
    async fn failure_rate_one_fails_every_call_before_it_runs() {
        let mock = OrderMock::new(MockConfig { failure_rate: 1.0, ..MockConfig::default() });
        for _ in 0..3 {
            let err = mock.create_order(with_id("r1", order())).await.unwrap_err();
            assert_eq!(err.code(), Code::Unavailable);
            assert_eq!(err.message(), "injected transient failure");
        }
        let err = mock.cancel_order(with_id("r1", CancelRequest {})).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        let snapshot = mock.snapshot();
        assert!(snapshot.records.is_empty());
        let c = snapshot.counters.unwrap();
        assert_eq!((c.calls, c.injected_failures, c.creates), (4, 4, 0));
    }

    #[tokio::test]
    async fn failing_cancels_refuse_only_cancels_until_healed() {
        let mock = OrderMock::new(MockConfig::default());
        mock.set_fail_cancels(true);
        let id = mock.create_order(with_id("r1", order())).await.unwrap().into_inner().id;
        let err = mock.cancel_order(with_id("r1", CancelRequest {})).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(mock.snapshot().records[0].status, "active");
        mock.set_fail_cancels(false);
        let reply = mock.cancel_order(with_id("r1", CancelRequest {})).await.unwrap().into_inner();
        assert_eq!(reply, CancelReply { id, already_cancelled: false });
        let c = counters(&mock);
        assert_eq!((c.cancels, c.injected_failures), (1, 1));
    }

    #[tokio::test]
    async fn missing_request_id_is_invalid() {
        let mock = OrderMock::new(MockConfig::default());
        let err = mock.create_order(Request::new(order())).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "missing x-request-id metadata");
        assert!(mock.snapshot().records.is_empty());
    }

    #[tokio::test]
    async fn bad_product_or_count_is_invalid() {
        let mock = OrderMock::new(MockConfig::default());
        for (product_id, count) in [(0, 1), (1, 0), (-1, 1)] {
            let err = mock.create_order(with_id("r1", CreateOrderRequest { product_id, count })).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
        }
        assert!(mock.snapshot().records.is_empty());
    }

    #[tokio::test]
    async fn snapshot_is_not_counted_or_gated() {
        let mock = OrderMock::new(MockConfig { failure_rate: 1.0, capacity: 1, ..MockConfig::default() });
        let reply = OrderService::snapshot(&mock, Request::new(SnapshotRequest {})).await;
        assert_eq!(reply.unwrap().into_inner().counters.unwrap().calls, 0);
    }
}
