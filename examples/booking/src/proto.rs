//! Generated gRPC code for the booking API and the mock upstream services.
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

/// The public booking API (`package pb`).
pub mod pb {
    tonic::include_proto!("pb");
}

/// The mock upstream Order and Payment services (`package upstream`).
pub mod upstream {
    tonic::include_proto!("upstream");
}

/// Encoded file descriptors of both protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
