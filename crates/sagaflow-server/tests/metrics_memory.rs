//! The Prometheus recorder must not hold histogram samples for as long as nobody scrapes
//! `/metrics`: its upkeep folds them into buckets and frees them while samples keep arriving.
//!
//! Measured with a counting allocator (this test binary's own, `stats_alloc`): the live heap must fall back by
//! megabytes at some point while 200,000 samples a second are recorded. Without the upkeep it
//! only grows, by about 8 bytes a sample.

use std::alloc::System;
use std::time::{Duration, Instant};

use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed by this process.
fn live() -> isize {
    let stats = ALLOCATOR.stats();
    stats.bytes_allocated as isize - stats.bytes_deallocated as isize
}

#[test]
fn histogram_samples_are_freed_while_nobody_scrapes() {
    let _handle = sagaflow_server::admin::prometheus();
    let histogram = metrics::histogram!("sagaflow_test_step_seconds", "facade" => "test");
    const CHUNK: usize = 4_000;
    const PACE: Duration = Duration::from_millis(20);
    const FALL: isize = 3 << 20;
    // Well past two upkeep intervals.
    let deadline = Instant::now() + Duration::from_secs(15);

    let mut recorded = 0usize;
    let start = live();
    let mut peak = start;
    let mut largest_fall = 0isize;
    while largest_fall < FALL {
        assert!(
            Instant::now() < deadline,
            "after {recorded} histogram samples the live heap grew from {start} to {} bytes (peak {peak}) and never fell \
             by {FALL} bytes: nothing frees the recorder's pending samples",
            live()
        );
        let chunk_started = Instant::now();
        for i in 0..CHUNK {
            histogram.record(i as f64 * 1e-6);
        }
        recorded += CHUNK;
        let now = live();
        peak = peak.max(now);
        largest_fall = largest_fall.max(peak - now);
        std::thread::sleep(PACE.saturating_sub(chunk_started.elapsed()));
    }
    // The samples were folded into the histogram, not lost.
    let rendered = sagaflow_server::admin::prometheus().render();
    assert!(
        rendered.lines().any(|l| l.starts_with("sagaflow_test_step_seconds_count") && !l.ends_with(" 0")),
        "{rendered}"
    );
}
