//! In-process mock upstreams: each books and cancels by request id,
//! idempotently, after a fixed latency, and refuses while its fault switch is on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a mock service refused a booking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// Where one request id's booking stands at a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Booking {
    /// Booked under this id.
    Active(u64),
    /// Cancelled (or cancelled before it was ever made, which refuses a late booking).
    Cancelled,
}

/// One mock upstream service (flights, hotels, cars or payments).
#[derive(Debug)]
pub struct Service {
    name: &'static str,
    latency: Duration,
    fault: AtomicBool,
    refuse_every: AtomicU64,
    next_id: AtomicU64,
    bookings: Mutex<HashMap<String, Booking>>,
}

impl Service {
    /// A service that answers after `latency`.
    pub fn new(name: &'static str, latency: Duration) -> Arc<Self> {
        Arc::new(Self {
            name,
            latency,
            fault: AtomicBool::new(false),
            refuse_every: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            bookings: Mutex::default(),
        })
    }

    /// Turns the fault switch: while on, every booking is refused.
    pub fn set_fault(&self, on: bool) {
        self.fault.store(on, Ordering::Relaxed);
    }

    /// Refuses every booking whose request id ends in a multiple of `n` (0: none),
    /// the same in every process, so a test knows which sagas compensate.
    pub fn refuse_every(&self, n: u64) {
        self.refuse_every.store(n, Ordering::Relaxed);
    }

    /// Books for `request_id`; the same request id gets the same booking.
    pub async fn book(&self, request_id: &str) -> Result<u64, Refused> {
        tokio::time::sleep(self.latency).await;
        if self.fault.load(Ordering::Relaxed) {
            return Err(Refused(format!("{} refused the booking (fault switch on)", self.name)));
        }
        let every = self.refuse_every.load(Ordering::Relaxed);
        if every > 0 && number_of(request_id).is_some_and(|n| n.is_multiple_of(every)) {
            return Err(Refused(format!("{} refused booking `{request_id}` (refuses every {every})", self.name)));
        }
        let mut bookings = self.bookings.lock().unwrap_or_else(|e| e.into_inner());
        match bookings.get(request_id) {
            Some(Booking::Active(id)) => Ok(*id),
            Some(Booking::Cancelled) => Err(Refused(format!("{}: booking `{request_id}` was cancelled", self.name))),
            None => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                bookings.insert(request_id.to_owned(), Booking::Active(id));
                Ok(id)
            }
        }
    }

    /// Cancels `request_id`'s booking, made or not.
    pub async fn cancel(&self, request_id: &str) {
        tokio::time::sleep(self.latency).await;
        self.bookings.lock().unwrap_or_else(|e| e.into_inner()).insert(request_id.to_owned(), Booking::Cancelled);
    }

    /// Where `request_id`'s booking stands, if it was ever asked for.
    pub fn booking(&self, request_id: &str) -> Option<Booking> {
        self.bookings.lock().unwrap_or_else(|e| e.into_inner()).get(request_id).copied()
    }

    /// The service's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// The number a request id ends in, if it ends in digits.
pub fn number_of(request_id: &str) -> Option<u64> {
    let digits = request_id.len() - request_id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    request_id[request_id.len() - digits..].parse().ok()
}

/// The four services a trip needs.
#[derive(Debug, Clone)]
pub struct Services {
    /// Flights.
    pub flights: Arc<Service>,
    /// Hotels.
    pub hotels: Arc<Service>,
    /// Car rentals.
    pub cars: Arc<Service>,
    /// Payments.
    pub payments: Arc<Service>,
}

impl Services {
    /// The four services, each answering after `latency`.
    pub fn new(latency: Duration) -> Self {
        Self {
            flights: Service::new("flights", latency),
            hotels: Service::new("hotels", latency),
            cars: Service::new("cars", latency),
            payments: Service::new("payments", latency),
        }
    }
}
