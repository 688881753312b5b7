//! The trip's steps: a booking at each service, then the payment.

use std::sync::Arc;

use sagaflow::{Node, NodeError, Step};

use crate::Trip;
use crate::service::Service;

/// Books at one service and keeps the booking id in the trip; cancels by request id.
pub struct Reserve {
    name: &'static str,
    service: Arc<Service>,
    field: fn(&mut Trip) -> &mut Option<u64>,
}

impl Reserve {
    /// Books the flight.
    pub fn flight(service: Arc<Service>) -> Self {
        Self { name: "BookFlight", service, field: |t| &mut t.flight }
    }

    /// Books the hotel.
    pub fn hotel(service: Arc<Service>) -> Self {
        Self { name: "BookHotel", service, field: |t| &mut t.hotel }
    }

    /// Rents the car.
    pub fn car(service: Arc<Service>) -> Self {
        Self { name: "RentCar", service, field: |t| &mut t.car }
    }
}

#[sagaflow::async_trait]
impl Node<Trip> for Reserve {
    fn name(&self) -> &str {
        self.name
    }

    async fn action(&self, step: &Step, trip: &mut Trip) -> Result<(), NodeError> {
        let id = self.service.book(step.request_id()).await.map_err(|e| NodeError::permanent(e.0))?;
        *(self.field)(trip) = Some(id);
        Ok(())
    }

    async fn compensate(&self, step: &Step, _trip: &Trip) -> Result<(), NodeError> {
        self.service.cancel(step.request_id()).await;
        Ok(())
    }
}

/// Takes the payment for the whole trip, once every booking is made.
pub struct TakePayment(pub Arc<Service>);

#[sagaflow::async_trait]
impl Node<Trip> for TakePayment {
    fn name(&self) -> &str {
        "TakePayment"
    }

    async fn action(&self, step: &Step, trip: &mut Trip) -> Result<(), NodeError> {
        debug_assert!(trip.flight.is_some() && trip.hotel.is_some() && trip.car.is_some());
        let id = self.0.book(step.request_id()).await.map_err(|e| NodeError::permanent(e.0))?;
        trip.payment = Some(id);
        Ok(())
    }

    async fn compensate(&self, step: &Step, _trip: &Trip) -> Result<(), NodeError> {
        self.0.cancel(step.request_id()).await;
        Ok(())
    }
}
