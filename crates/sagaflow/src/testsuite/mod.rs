//! The conformance suites every [`Broker`](crate::broker::Broker) and [`SagaLog`](crate::log::SagaLog) backend runs.
//!
//! One suite per abstraction, written once here and run by every driver (the
//! in-memory ones in this crate's `tests/conformance_memory.rs`). A driver
//! implements a small harness that opens its backend and invokes one macro in
//! an integration test; the macro generates one `#[test]` per check, named
//! `broker_conformance_<check>` or `saga_log_conformance_<check>`, each on
//! its own multi-thread tokio runtime with two workers.
//!
//! ```
//! use std::sync::Arc;
//! use sagaflow::testsuite::{BrokerHarness, skip_or_fail};
//! use sagaflow::MemoryBroker;
//! use sagaflow::broker::Broker;
//!
//! /// Opens connections to one server; a real driver keeps its URL here.
//! struct Harness(MemoryBroker);
//!
//! #[sagaflow::async_trait]
//! impl BrokerHarness for Harness {
//!     async fn connect(&self) -> Arc<dyn Broker> {
//!         Arc::new(self.0.clone())
//!     }
//! }
//!
//! # async fn open_server() -> std::io::Result<MemoryBroker> { Ok(MemoryBroker::new()) }
//! async fn harness() -> Option<Harness> {
//!     match open_server().await {
//!         Ok(broker) => Some(Harness(broker)),
//!         Err(e) => skip_or_fail("the broker at 127.0.0.1:5672", e),
//!     }
//! }
//!
//! sagaflow::broker_conformance_tests!(harness());
//! # fn main() {}
//! ```
//!
//! Every check names its topics, groups and request ids with a random suffix,
//! so checks run in parallel against one shared server, and bounds every wait
//! (see [`WAIT`], [`QUIET`], [`CHECK_LIMIT`]), so a broken driver fails a check
//! instead of hanging it. The checks are public in [`broker`] and [`log`] too,
//! for a driver that wants to run one by hand.

pub mod broker;
pub mod log;
mod replicas;
mod stages;

use std::fmt;
use std::io::Write as _;
use std::time::Duration;

pub use broker::BrokerHarness;
pub use log::LogHarness;

/// The environment variable that turns a skipped test (service unreachable) into a failure.
pub const REQUIRE_BROKERS_ENV: &str = "SAGAFLOW_REQUIRE_BROKERS";

/// Longest a check waits for one thing that must happen (a delivery, a publish confirm, a connection).
pub const WAIT: Duration = Duration::from_secs(20);

/// How long a check watches for something that must not happen (a delivery beyond the concurrency limit).
pub const QUIET: Duration = Duration::from_millis(500);

/// Longest one whole check may run, harness included.
pub const CHECK_LIMIT: Duration = Duration::from_secs(180);

/// Whether tests must fail rather than skip when a service is unreachable:
/// [`REQUIRE_BROKERS_ENV`] is set to anything but empty or `0`.
pub fn brokers_required() -> bool {
    std::env::var_os(REQUIRE_BROKERS_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Skips a test whose service is unreachable: returns `None` after printing why,
/// or panics with the same reason when [`brokers_required`] (as in CI).
///
/// `what` names the service (`"RabbitMQ at 127.0.0.1:5672"`), `error` is why it
/// could not be reached. Generic over `T` so a harness constructor can end with
/// `Err(e) => skip_or_fail("...", e)`. The reason goes straight to the process's
/// stderr, past libtest's output capture, so `cargo test` shows the skip.
pub fn skip_or_fail<T>(what: &str, error: impl fmt::Display) -> Option<T> {
    if brokers_required() {
        panic!("{what} is unreachable and {REQUIRE_BROKERS_ENV} is set: {error}");
    }
    // Writing to the handle directly (not eprintln!) is what bypasses libtest's capture.
    let _ =
        writeln!(std::io::stderr(), "skipped: {what} is unreachable ({error}); set {REQUIRE_BROKERS_ENV}=1 to fail");
    None
}

/// A name unique to this run: `prefix` and a random suffix.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Runs `future` to completion within `WAIT`, or panics naming `what`.
pub(crate) async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Support for the macros' expansion; not a public API.
#[doc(hidden)]
pub mod __private {
    use std::future::Future;

    use super::CHECK_LIMIT;

    /// Runs one check on a fresh two-worker multi-thread runtime, as
    /// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` would, bounded by [`CHECK_LIMIT`].
    pub fn run<F: Future<Output = ()>>(check: F) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the conformance check");
        runtime.block_on(async {
            if tokio::time::timeout(CHECK_LIMIT, check).await.is_err() {
                panic!("conformance check did not finish within {CHECK_LIMIT:?}");
            }
        });
    }
}

/// Generates one `#[test]` per [`broker`] check, named `broker_conformance_<check>`.
///
/// `$harness` is an expression of type `impl Future<Output = Option<H>>` where
/// `H: `[`BrokerHarness`]; it is evaluated once per test, and `None` skips the
/// test (see [`skip_or_fail`]).
#[macro_export]
macro_rules! broker_conformance_tests {
    ($harness:expr) => {
        $crate::__conformance_tests!(BrokerHarness, broker, $harness;
            broker_conformance_round_trip => round_trip,
            broker_conformance_order_within_topic => order_within_topic,
            broker_conformance_nack_redelivers => nack_redelivers,
            broker_conformance_abandoned_delivery_redelivers => abandoned_delivery_redelivers,
            broker_conformance_concurrency_limit => concurrency_limit,
            broker_conformance_competing_consumers_and_groups => competing_consumers_and_groups,
            broker_conformance_dead_letter => dead_letter,
            broker_conformance_graceful_close => graceful_close,
            broker_conformance_publish_after_close_fails => publish_after_close_fails,
            broker_conformance_nack_delay => nack_delay,
            broker_conformance_parallel_stage_hops => parallel_stage_hops,
        );
    };
}

/// Generates one `#[test]` per [`log`] check, named `saga_log_conformance_<check>`.
///
/// `$harness` is an expression of type `impl Future<Output = Option<H>>` where
/// `H: `[`LogHarness`]; it is evaluated once per test, and `None` skips the
/// test (see [`skip_or_fail`]).
#[macro_export]
macro_rules! saga_log_conformance_tests {
    ($harness:expr) => {
        $crate::__conformance_tests!(LogHarness, log, $harness;
            saga_log_conformance_begin_is_idempotent => begin_is_idempotent,
            saga_log_conformance_append_applies_transitions => append_applies_transitions,
            saga_log_conformance_refused_transition_leaves_record => refused_transition_leaves_record,
            saga_log_conformance_append_to_unknown_saga => append_to_unknown_saga,
            saga_log_conformance_get_returns_the_record => get_returns_the_record,
            saga_log_conformance_unfinished_is_running_and_compensating => unfinished_is_running_and_compensating,
            saga_log_conformance_list_filters_newest_first => list_filters_newest_first,
            saga_log_conformance_list_pages_by_cursor_and_time => list_pages_by_cursor_and_time,
            saga_log_conformance_concurrent_appends => concurrent_appends,
            saga_log_conformance_histories_round_trip => histories_round_trip,
            saga_log_conformance_parallel_branches_round_trip => parallel_branches_round_trip,
            saga_log_conformance_durable_across_reopen => durable_across_reopen,
            saga_log_conformance_controls_are_kept => controls_are_kept,
            saga_log_conformance_leases_expire_and_renew => leases_expire_and_renew,
            saga_log_conformance_claim_takes_over_exactly_once => claim_takes_over_exactly_once,
            saga_log_conformance_restart_keeps_own_sagas => restart_keeps_own_sagas,
            saga_log_conformance_ends_are_announced => ends_are_announced,
            saga_log_conformance_pruned_request_id_is_refused => pruned_request_id_is_refused,
            saga_log_conformance_tombstones_age_out => tombstones_age_out,
            saga_log_conformance_tombstones_survive_reopen => tombstones_survive_reopen,
        );
    };
}

/// Shared expansion of the two suite macros; not a public API.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($trait:ident, $module:ident, $harness:expr; $($test:ident => $check:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() {
                $crate::testsuite::__private::run(async {
                    if let ::core::option::Option::Some(harness) = $harness.await {
                        let harness: &dyn $crate::testsuite::$trait = &harness;
                        $crate::testsuite::$module::$check(harness).await;
                    }
                });
            }
        )+
    };
}
