//! The runtime of a sagaflow orchestrator service: a `main` loads a [`Config`], registers its
//! flows and its gRPC API, and calls [`Server::serve`].
//!
//! ```ignore
//! let config = sagaflow_server::Config::<MyKeys>::load(None)?;
//! sagaflow_server::Server::new(config)
//!     .serve(|orchestrator| orchestrator.sync("Order", flow), |cx| MyServiceServer::new(MyHandler::new(cx)))
//!     .await
//! ```
//!
//! It owns what every service needs beside its flows: the configuration from YAML and the
//! environment ([`settings`], with the sections in [`config`]), the broker and saga log chosen
//! by kind or URL ([`backends`]), the admin HTTP API and its dashboard ([`admin`]), the HTTP
//! callback sink of async sagas with its allow-list and signatures ([`callback`]), the
//! redaction of credentials in what they show ([`redact`]), logs, OTLP traces and the stop
//! signals ([`telemetry`]), gRPC health and reflection, and the drain on SIGTERM ([`server`]).

pub mod admin;
pub mod backends;
pub mod callback;
pub mod config;
pub mod redact;
pub mod server;
pub mod settings;
pub mod telemetry;

pub use server::{Context, Running, Server};
pub use settings::{Config, NoKeys, ServiceConfig};
