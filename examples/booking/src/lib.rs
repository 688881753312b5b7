//! The booking demo: a sagaflow orchestrator for CreateOrder → CreatePayment,
//! with mock Order and Payment services.
//!
//! [`facade`] registers the flows, [`node`] holds the steps, [`handler`] serves the gRPC API,
//! [`topic`] names the topics, [`config`] adds booking's keys (`upstream`, `flow`) to the
//! shared ones, [`upstream`] holds the mocks, and [`app`] starts them beside the service.
//! The service itself (configuration, broker and log, admin API and dashboard, callbacks,
//! health, drain) is `sagaflow-server`'s [`sagaflow_server::Server`].

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
