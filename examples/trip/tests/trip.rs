//! The trip flow end to end in both modes, with each service's fault switch.

use std::time::Duration;

use sagaflow::{Outcome, SagaStatus};
use trip::service::{Booking, Services};
use trip::{ASYNC_TRIP, SYNC_TRIP, Trip};

fn services() -> Services {
    Services::new(Duration::from_millis(5))
}

async fn ended(o: &sagaflow::Orchestrator, id: &str) -> sagaflow::SagaRecord {
    for _ in 0..1000 {
        if let Some(record) = o.saga(id).await.unwrap()
            && record.state.is_ended()
        {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("saga `{id}` did not end");
}

#[tokio::test]
async fn a_trip_books_everything_at_once_then_pays() {
    let s = services();
    let o = trip::orchestrator(&s).await.unwrap();
    let Outcome::Completed(trip) = o.run(SYNC_TRIP, "t1", Trip::new("Ada", 100)).await.unwrap() else {
        panic!("not completed")
    };
    let booked = |service: &trip::service::Service| match service.booking("t1") {
        Some(Booking::Active(id)) => Some(id),
        other => panic!("{}: {other:?}", service.name()),
    };
    assert_eq!(
        (trip.flight, trip.hotel, trip.car, trip.payment),
        (booked(&s.flights), booked(&s.hotels), booked(&s.cars), booked(&s.payments))
    );
}

#[tokio::test]
async fn a_refused_hotel_cancels_the_flight_and_the_car_and_takes_no_payment() {
    let s = services();
    let o = trip::orchestrator(&s).await.unwrap();
    s.hotels.set_fault(true);
    let Outcome::Compensated(failure) = o.run(SYNC_TRIP, "t1", Trip::new("Ada", 100)).await.unwrap() else {
        panic!("not compensated")
    };
    assert_eq!(failure.node, "BookHotel");
    for service in [&s.flights, &s.cars] {
        assert_eq!(service.booking("t1"), Some(Booking::Cancelled), "{}", service.name());
    }
    assert_eq!(s.payments.booking("t1"), None, "no payment was asked for");
}

#[tokio::test]
async fn a_refused_payment_cancels_every_booking_in_both_modes() {
    let s = services();
    let o = trip::orchestrator(&s).await.unwrap();
    s.payments.set_fault(true);
    assert!(matches!(o.run(SYNC_TRIP, "t1", Trip::new("Ada", 100)).await.unwrap(), Outcome::Compensated(_)));
    o.submit(ASYNC_TRIP, "t2", Trip::new("Bo", 100), None).await.unwrap();
    assert_eq!(ended(&o, "t2").await.status(), SagaStatus::Compensated);
    for id in ["t1", "t2"] {
        for service in [&s.flights, &s.hotels, &s.cars] {
            assert_eq!(service.booking(id), Some(Booking::Cancelled), "{id} at {}", service.name());
        }
    }
    s.payments.set_fault(false);
    o.submit(ASYNC_TRIP, "t3", Trip::new("Cy", 100), None).await.unwrap();
    let record = ended(&o, "t3").await;
    assert_eq!(record.status(), SagaStatus::Completed);
    let trip: Trip = serde_json::from_value(record.data).unwrap();
    assert!(trip.flight.is_some() && trip.hotel.is_some() && trip.car.is_some() && trip.payment.is_some(), "{trip:?}");
}
