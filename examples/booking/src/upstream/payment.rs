//! The mock Payment service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::store::{MockConfig, Store};
use crate::proto::upstream::{
    CancelReply, CancelRequest, CreatePaymentRequest, Payment, SnapshotReply, SnapshotRequest,
    payment_service_server::{PaymentService, PaymentServiceServer},
};

/// The mock Payment service: idempotent payments keyed by `x-request-id`.
#[derive(Debug, Clone)]
pub struct PaymentMock {
    store: Arc<Store>,
}

impl PaymentMock {
    /// A new, empty Payment service that behaves as `config` says.
    pub fn new(config: MockConfig) -> Self {
        Self { store: Arc::new(Store::new("payment", config)) }
    }

    /// The tonic service to mount on a gRPC server.
    pub fn into_server(self) -> PaymentServiceServer<Self> {
        PaymentServiceServer::new(self)
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
impl PaymentService for PaymentMock {
    async fn create_payment(&self, request: Request<CreatePaymentRequest>) -> Result<Response<Payment>, Status> {
        let (request_id, _slot) = self.store.enter_create(request.metadata()).await?;
        if request.get_ref().amount <= 0 {
            return Err(Status::invalid_argument(format!("amount must be positive, got {}", request.get_ref().amount)));
        }
        // A repeat of a payment already taken returns it; only a new one can be refused.
        let created = self.store.create(&request_id, || {
            if request.get_ref().fault_inject { Err(self.store.injected_refusal()) } else { Ok(()) }
        })?;
        Ok(Response::new(Payment { id: created.id, request_id, status: "active".to_owned() }))
    }

    async fn cancel_payment(&self, request: Request<CancelRequest>) -> Result<Response<CancelReply>, Status> {
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

    fn payment(fault_inject: bool) -> CreatePaymentRequest {
        CreatePaymentRequest { order_id: 1, amount: 100, fault_inject }
    }

    #[tokio::test]
    async fn repeat_create_returns_the_same_payment() {
        let mock = PaymentMock::new(MockConfig::default());
        let first = mock.create_payment(with_id("r1", payment(false))).await.unwrap().into_inner();
        let again = mock.create_payment(with_id("r1", payment(false))).await.unwrap().into_inner();
        assert_eq!(first.id, 1);
        assert_eq!(first, again);
        let c = mock.snapshot().counters.unwrap();
        assert_eq!((c.creates, c.duplicates_absorbed), (1, 1));
    }

    #[tokio::test]
    async fn fault_inject_refuses_without_a_record() {
        let mock = PaymentMock::new(MockConfig::default());
        let err = mock.create_payment(with_id("r1", payment(true))).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(err.message(), "payment refused: fault injected");
        let snapshot = mock.snapshot();
        assert!(snapshot.records.is_empty());
        let c = snapshot.counters.unwrap();
        assert_eq!((c.injected_failures, c.creates), (1, 0));
        // The saga then compensates: the cancel leaves a tombstone.
        let reply = mock.cancel_payment(with_id("r1", CancelRequest {})).await.unwrap();
        assert_eq!(reply.get_ref().id, 0);
        assert_eq!(mock.snapshot().records[0].status, "tombstone");
    }

    #[tokio::test]
    async fn cancel_before_create_refuses_the_create() {
        let mock = PaymentMock::new(MockConfig::default());
        mock.cancel_payment(with_id("r1", CancelRequest {})).await.unwrap();
        let err = mock.create_payment(with_id("r1", payment(false))).await.unwrap_err();
        assert_eq!(err.code(), Code::Aborted);
        assert_eq!(err.message(), "payment for request r1 was cancelled");
        assert_eq!(mock.snapshot().counters.unwrap().refused_after_cancel, 1);
    }

    #[tokio::test]
    async fn cancel_twice_is_idempotent() {
        let mock = PaymentMock::new(MockConfig::default());
        let id = mock.create_payment(with_id("r1", payment(false))).await.unwrap().into_inner().id;
        let first = mock.cancel_payment(with_id("r1", CancelRequest {})).await.unwrap().into_inner();
        let second = mock.cancel_payment(with_id("r1", CancelRequest {})).await.unwrap().into_inner();
        assert_eq!((first.id, first.already_cancelled), (id, false));
        assert_eq!((second.id, second.already_cancelled), (id, true));
        assert_eq!(mock.snapshot().records[0].status, "cancelled");
    }

    #[tokio::test]
    async fn over_capacity_calls_are_rejected() {
        tokio::time::pause();
        let mock =
            PaymentMock::new(MockConfig { latency: Duration::from_millis(50), capacity: 1, ..MockConfig::default() });
        let (first, second) = tokio::join!(
            mock.create_payment(with_id("r1", payment(false))),
            mock.cancel_payment(with_id("r2", CancelRequest {})),
        );
        assert!(first.is_ok());
        let err = second.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(err.message(), "payment service over capacity (1 in flight)");
        let c = mock.snapshot().counters.unwrap();
        assert_eq!((c.peak_in_flight, c.rejected), (1, 1));
    }

    #[tokio::test]
    async fn failure_rate_one_is_unavailable() {
        let mock = PaymentMock::new(MockConfig { failure_rate: 1.0, ..MockConfig::default() });
        let err = mock.create_payment(with_id("r1", payment(false))).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(mock.snapshot().records.is_empty());
    }

    #[tokio::test]
    async fn a_non_positive_amount_is_invalid() {
        let mock = PaymentMock::new(MockConfig::default());
        for amount in [0, -100, i64::MIN] {
            let request = CreatePaymentRequest { order_id: 1, amount, fault_inject: false };
            let err = mock.create_payment(with_id("r1", request)).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert_eq!(err.message(), format!("amount must be positive, got {amount}"));
        }
        assert!(mock.snapshot().records.is_empty());
    }

    #[tokio::test]
    async fn missing_request_id_is_invalid() {
        let mock = PaymentMock::new(MockConfig::default());
        let err = mock.cancel_payment(Request::new(CancelRequest {})).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(mock.snapshot().records.is_empty());
    }
}
