//! What every sagaflow orchestrator service needs beside its flows: the admin HTTP API and
//! its dashboard ([`admin`]), the HTTP callback sink of async sagas with its allow-list and
//! signatures ([`callback`]), the configuration sections they read ([`config`]) and the
//! redaction of credentials in what they show ([`redact`]), and the broker and saga log chosen
//! by kind or URL ([`backends`]), logs and OTLP traces and the stop signals ([`telemetry`]).
//!
//! A service registers its flows on a [`sagaflow::Orchestrator`], gives it
//! [`callback::HttpCallbacks`] as its callback sink and serves [`admin::serve`] beside its
//! gRPC API; `examples/booking` is such a service.

pub mod admin;
pub mod backends;
pub mod callback;
pub mod config;
pub mod redact;
pub mod telemetry;
