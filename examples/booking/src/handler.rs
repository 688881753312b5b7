//! The gRPC `pb.BookingService`: validates requests and invokes the flows by facade.

use sagaflow::log::LogError;
use sagaflow::{Error, Orchestrator, Outcome};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::callback::CallbackPolicy;
use crate::facade::{ASYNC_BOOKING, SYNC_BOOKING, THROTTLING_BOOKING};
use crate::node::{Booking, UNIT_PRICE, amount};
use crate::proto::pb::{
    BookingASyncResponse, BookingRequest, BookingSyncResponse, booking_service_server::BookingService,
};

/// The metadata key carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest `CallbackURL` accepted, in bytes: it is stored with the saga.
pub const MAX_CALLBACK_URL_LEN: usize = 2048;

/// Serves `pb.BookingService` over an [`Orchestrator`].
#[derive(Debug, Clone)]
pub struct BookingHandler {
    orchestrator: Orchestrator,
    callbacks: CallbackPolicy,
}

impl BookingHandler {
    /// A handler invoking `orchestrator`'s booking facades.
    pub fn new(orchestrator: Orchestrator, callbacks: CallbackPolicy) -> Self {
        Self { orchestrator, callbacks }
    }
}

/// A request id for a caller that sent none: a UUIDv7, which sorts by time, so the sagas
/// running at once sit side by side in the embedded log's B-trees rather than scattered
/// across them (random ids halve its throughput: `crates/sagaflow-redb/examples/log_load.rs`).
fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The caller's `x-request-id`, or a fresh UUID when it sent none.
fn request_id<T>(request: &Request<T>) -> Result<String, Status> {
    match request.metadata().get(REQUEST_ID_HEADER) {
        None => Ok(new_request_id()),
        Some(value) => {
            let id = value
                .to_str()
                .map_err(|_| Status::invalid_argument("x-request-id must be visible ASCII"))?
                .trim()
                .to_owned();
            if id.is_empty() {
                return Ok(new_request_id());
            }
            if id.len() > sagaflow::MAX_REQUEST_ID_LEN || !id.chars().all(|c| c.is_ascii_graphic()) {
                return Err(Status::invalid_argument(format!(
                    "x-request-id must be 1 to {} visible ASCII characters without spaces",
                    sagaflow::MAX_REQUEST_ID_LEN
                )));
            }
            Ok(id)
        }
    }
}

/// Checks the request and turns it into flow data. A `Count` of 0 means 1.
fn booking(request: &BookingRequest) -> Result<Booking, Status> {
    if request.product_id <= 0 {
        return Err(Status::invalid_argument(format!("ProductID must be positive, got {}", request.product_id)));
    }
    if request.count < 0 {
        return Err(Status::invalid_argument(format!("Count must not be negative, got {}", request.count)));
    }
    let count = request.count.max(1);
    if amount(count).is_none() {
        return Err(Status::invalid_argument(format!(
            "Count {count} is too large: its price overflows (at most {} items at {UNIT_PRICE} each)",
            i64::MAX / UNIT_PRICE
        )));
    }
    Ok(Booking { product_id: request.product_id, count, fault_inject: request.fault_inject, ..Booking::default() })
}

/// The gRPC status for an orchestrator error.
fn status(request_id: &str, error: Error) -> Status {
    match error {
        Error::InvalidRequestId(why) => Status::invalid_argument(format!("x-request-id is invalid: {why}")),
        Error::RequestIdInUse { .. } => Status::already_exists(error.to_string()),
        // Not retriable with this request id: the caller must look the outcome up elsewhere, or
        // send a new request id if it means a new booking.
        Error::Pruned { .. } => Status::failed_precondition(error.to_string()),
        Error::DataTooLarge { .. } => Status::invalid_argument(format!("{error} (flow.max_data_bytes)")),
        Error::WaitTimeout(_) => Status::deadline_exceeded(format!(
            "booking {request_id} did not finish in time; it goes on, and its outcome will be recorded"
        )),
        Error::Overloaded { .. } => Status::resource_exhausted(format!("booking {request_id}: {error}")),
        Error::ShuttingDown => Status::unavailable("the orchestrator is shutting down; retry on another replica"),
        Error::Paused { .. } => Status::unavailable(error.to_string()),
        Error::TaskLost(_) => {
            Status::unavailable(format!("booking {request_id}: {error}; ask again with the same x-request-id"))
        }
        // The saga is not in a state this call applies to, or its flow version is not deployed here.
        Error::MissingVersions { .. } | Error::WrongState { .. } => {
            Status::failed_precondition(format!("booking {request_id}: {error}"))
        }
        Error::HopNotReady { .. } => Status::unavailable(format!("booking {request_id}: {error}")),
        Error::Broker(e) => Status::unavailable(format!("booking {request_id}: message broker: {e}")),
        Error::Log(LogError::NotFound(_)) => Status::not_found(format!("booking {request_id}: {error}")),
        Error::Log(e @ (LogError::Corrupt { .. } | LogError::Transition(_))) => {
            Status::internal(format!("booking {request_id}: saga log: {e}"))
        }
        Error::Log(e) => Status::unavailable(format!("booking {request_id}: saga log: {e}")),
        other => Status::internal(format!("booking {request_id}: {other}")),
    }
}

/// The answer of a sync or throttled booking.
fn respond(
    request_id: String,
    outcome: Result<Outcome<Booking>, Error>,
) -> Result<Response<BookingSyncResponse>, Status> {
    match outcome {
        Ok(Outcome::Completed(b)) => Ok(Response::new(BookingSyncResponse {
            request_id,
            order_id: b.order_id,
            payment_id: b.payment_id,
            fault_inject: b.fault_inject,
        })),
        Ok(Outcome::Compensated(failure)) => {
            Err(Status::aborted(format!("booking {request_id} was rolled back: {failure}")))
        }
        Ok(Outcome::Stuck { failure, reason }) => Err(Status::internal(format!(
            "booking {request_id} failed ({failure}) and its rollback is stuck: {reason}"
        ))),
        Err(error) => Err(status(&request_id, error)),
    }
}

#[tonic::async_trait]
impl BookingService for BookingHandler {
    async fn handle_sync_booking(
        &self,
        request: Request<BookingRequest>,
    ) -> Result<Response<BookingSyncResponse>, Status> {
        let id = request_id(&request)?;
        let data = booking(request.get_ref())?;
        let span = tracing::info_span!("booking", call = "sync");
        let outcome = self.orchestrator.run(SYNC_BOOKING, &id, data).instrument(span).await;
        respond(id, outcome)
    }

    async fn handle_async_booking(
        &self,
        request: Request<BookingRequest>,
    ) -> Result<Response<BookingASyncResponse>, Status> {
        let id = request_id(&request)?;
        let data = booking(request.get_ref())?;
        let url = &request.get_ref().callback_url;
        if url.len() > MAX_CALLBACK_URL_LEN {
            return Err(Status::invalid_argument(format!(
                "CallbackURL is {} bytes, over the limit of {MAX_CALLBACK_URL_LEN} bytes",
                url.len()
            )));
        }
        let callback = match url.trim() {
            "" => None,
            url => Some(self.callbacks.check(url).map_err(Status::invalid_argument)?),
        };
        let fault_inject = data.fault_inject;
        let span = tracing::info_span!("booking", call = "async");
        match self.orchestrator.submit(ASYNC_BOOKING, &id, data, callback).instrument(span).await {
            Ok(()) => Ok(Response::new(BookingASyncResponse { request_id: id, fault_inject })),
            Err(error) => Err(status(&id, error)),
        }
    }

    async fn handle_throttling_booking(
        &self,
        request: Request<BookingRequest>,
    ) -> Result<Response<BookingSyncResponse>, Status> {
        let id = request_id(&request)?;
        let data = booking(request.get_ref())?;
        let span = tracing::info_span!("booking", call = "throttling");
        let outcome = self.orchestrator.run(THROTTLING_BOOKING, &id, data).instrument(span).await;
        respond(id, outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orchestrator_errors_get_the_status_a_caller_can_act_on() {
        let code = |error: Error| status("r1", error).code();
        assert_eq!(code(Error::InvalidRequestId("empty".into())), tonic::Code::InvalidArgument);
        let not_stuck = Error::WrongState {
            request_id: "r1".into(),
            status: sagaflow::SagaStatus::Completed,
            operation: "retry",
            wanted: "stuck",
        };
        assert_eq!(code(not_stuck), tonic::Code::FailedPrecondition);
        assert_eq!(code(Error::Log(LogError::NotFound("r1".into()))), tonic::Code::NotFound);
        let down = status("r1", Error::Log(LogError::unavailable_msg("PostgreSQL at db:5432: cannot connect")));
        assert_eq!(down.code(), tonic::Code::Unavailable);
        assert!(down.message().contains("cannot connect"), "{}", down.message());
        assert_eq!(code(Error::Config("bad".into())), tonic::Code::Internal);
    }

    #[test]
    fn count_zero_means_one_and_bad_fields_are_named() {
        let ok = booking(&BookingRequest { product_id: 1, count: 0, ..Default::default() }).unwrap();
        assert_eq!(ok.count, 1);
        let err = booking(&BookingRequest { product_id: 0, ..Default::default() }).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("ProductID"));
        let err = booking(&BookingRequest { product_id: 1, count: -2, ..Default::default() }).unwrap_err();
        assert!(err.message().contains("Count"));
    }

    #[test]
    fn a_count_whose_price_overflows_is_refused() {
        let largest = i64::MAX / UNIT_PRICE;
        assert_eq!(
            booking(&BookingRequest { product_id: 1, count: largest, ..Default::default() }).unwrap().count,
            largest
        );
        for count in [largest + 1, i64::MAX] {
            let err = booking(&BookingRequest { product_id: 1, count, ..Default::default() }).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(&format!("Count {count} is too large")), "{}", err.message());
        }
    }

    #[test]
    fn a_missing_request_id_gets_a_uuid_and_a_given_one_is_kept() {
        let generated = request_id(&Request::new(())).unwrap();
        assert_eq!(uuid::Uuid::parse_str(&generated).unwrap().get_version_num(), 7);
        // Time-ordered: an id made later sorts after (UUIDv7 keeps a counter within one ms).
        let later = request_id(&Request::new(())).unwrap();
        assert!(later > generated, "{later} should sort after {generated}");
        let mut request = Request::new(());
        request.metadata_mut().insert(REQUEST_ID_HEADER, "abc-1".parse().unwrap());
        assert_eq!(request_id(&request).unwrap(), "abc-1");
        let mut request = Request::new(());
        request.metadata_mut().insert(REQUEST_ID_HEADER, "x".repeat(500).parse().unwrap());
        assert_eq!(request_id(&request).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
