//! The booking demo: a sagaflow orchestrator for CreateOrder → CreatePayment,
//! with mock Order and Payment services.
//!
//! Layout, as in the original: [`facade`] registers the flows, [`node`] holds
//! the steps, [`handler`] serves the gRPC API, [`topic`] names the topics.

pub mod admin;
pub mod app;
pub mod callback;
pub mod config;
pub mod facade;
pub mod handler;
pub mod node;
pub mod proto;
pub mod proxy;
pub mod redact;
pub mod topic;
pub mod upstream;
