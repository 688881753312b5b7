//! A trip: a flight, a hotel and a car booked at once, then one payment.
//!
//! The three bookings do not depend on each other, so they run as the
//! branches of one parallel stage; the payment needs all three. If any step
//! fails for good, what was booked is cancelled: the branches first (at
//! once), the step before them last. The upstream services are in-process
//! mocks ([`service`]) with a fault switch each.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use trip::{Trip, service::Services};
//!
//! let services = Services::new(Duration::from_millis(1));
//! let orchestrator = trip::orchestrator(&services).await?;
//! let outcome = orchestrator.run(trip::SYNC_TRIP, "trip-1", Trip::new("Ada", 48_000)).await?;
//! assert!(matches!(outcome, sagaflow::Outcome::Completed(t) if t.payment.is_some()));
//! # Ok::<_, sagaflow::Error>(())
//! # }).unwrap();
//! ```

pub mod facade;
pub mod node;
pub mod service;

pub use facade::{ASYNC_TRIP, SYNC_TRIP, orchestrator, trip_flow};

use serde::{Deserialize, Serialize};

/// The flow data: the request, and what each booking adds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trip {
    /// Who travels.
    pub traveller: String,
    /// What the trip costs, in cents.
    pub price_cents: u64,
    /// The flight's booking id, once booked.
    pub flight: Option<u64>,
    /// The hotel's booking id, once booked.
    pub hotel: Option<u64>,
    /// The car's booking id, once booked.
    pub car: Option<u64>,
    /// The payment's id, once taken.
    pub payment: Option<u64>,
}

impl Trip {
    /// A trip for `traveller` at `price_cents`, nothing booked yet.
    pub fn new(traveller: &str, price_cents: u64) -> Self {
        Self { traveller: traveller.to_owned(), price_cents, ..Self::default() }
    }

    /// Folds what one booking branch added into the trip: each branch sets its
    /// own field on its own copy of the trip.
    pub fn merge(&mut self, branch: Trip) {
        self.flight = self.flight.or(branch.flight);
        self.hotel = self.hotel.or(branch.hotel);
        self.car = self.car.or(branch.car);
    }
}
