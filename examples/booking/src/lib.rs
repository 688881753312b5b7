//! The booking demo: a sagaflow orchestrator for CreateOrder → CreatePayment,
//! with mock Order and Payment services.
//!
//! Layout, as in the original: [`facade`] registers the flows, [`node`] holds
//! the steps, [`handler`] serves the gRPC API, [`topic`] names the topics.
//! What any orchestrator service needs beside that (the admin API and dashboard,
//! HTTP callbacks) comes from `sagaflow-server`.

pub mod app;
pub mod config;
pub mod facade;
pub mod handler;
pub mod node;
pub mod proto;
pub mod proxy;
pub mod topic;
pub mod upstream;

pub use sagaflow_server::{admin, callback, redact};
