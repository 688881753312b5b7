//! Generated gRPC clients for the booking API and the mock upstream services.
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

/// The public booking API (`package pb`).
pub(crate) mod pb {
    tonic::include_proto!("pb");
}

/// The mock upstream Order and Payment services (`package upstream`).
pub(crate) mod upstream {
    tonic::include_proto!("upstream");
}
