#!/usr/bin/env bash
# The original project's stress test, reproduced: 500 requests/s for 30 s against the booking
# orchestrator, once with the sync flow and once with the throttling flow, each on a fresh stack:
#
#   - OrderService and PaymentService mocks as their own processes, each with a call latency of
#     LATENCY_MS (40) and a CAPACITY (12) in flight, above which they refuse calls with
#     RESOURCE_EXHAUSTED, as an overloaded service would. 500/s × 40 ms needs 20 calls in flight
#     per service: the sync flow's unbounded concurrency overwhelms them, as it overwhelmed the
#     original's upstreams (which were OOM-killed).
#   - the orchestrator as its own process, its throttling topics consumed by CONSUMERS (10) per
#     topic, below the capacity: the broker holds the backlog and the upstreams never see more.
#
# Then it checks the throttling run: 100% success, each upstream's peak in-flight (from its
# Snapshot) at most CONSUMERS with nothing rejected, and the orchestrator's peak RSS under 150 MiB.
# The overload is RATE × LATENCY_MS / 1000 / CAPACITY (1.67× here); for the issue's 5× check:
#   RATE=500 DURATION=10s CAPACITY=4 CONSUMERS=4 FLOWS=throttling bench/seed-stress.sh
# Reports, JSON and plots go to bench/out/.
# Settings by environment: RATE, DURATION, LATENCY_MS, CAPACITY, CONSUMERS, BROKER (memory),
# SAGA_LOG (embedded, the default), FLOWS ("sync throttling"); BENCH_BIN_DIR to skip the build.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

rate=${RATE:-500}
duration=${DURATION:-30s}
latency=${LATENCY_MS:-40}
capacity=${CAPACITY:-12}
consumers=${CONSUMERS:-10}
broker=${BROKER:-memory}
log=${SAGA_LOG:-embedded}
flows=${FLOWS:-sync throttling}

build release
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'stop_all; rm -rf "$work"' EXIT
echo "seed stress: $rate/s for $duration; upstreams: ${latency} ms per call, capacity $capacity;" \
    "throttling consumers: $consumers per topic; broker $broker, saga log $log"
echo "machine: $(machine)"

for flow in $flows; do
    CONSUMERS=$consumers STACK_YAML="# The throttled backlog drains after the attack: let callers and sagas wait for it.
wait_timeout_ms: 120000
flow: { deadline_ms: 120000 }" \
        start_stack "$work/$flow" "$broker" "$log" --latency-ms "$latency" --capacity "$capacity"
    echo
    {
        echo "== $flow flow"
        echo "machine: $(machine)"
        echo "uptime: $(uptime)"
        echo "command: RATE=$rate DURATION=$duration LATENCY_MS=$latency CAPACITY=$capacity CONSUMERS=$consumers" \
            "BROKER=$broker SAGA_LOG=$log FLOWS=$flow bench/seed-stress.sh"
        echo
    } | tee "$OUT/seed-$flow.txt"
    "$BIN/sagaflow-bench" --flow "$flow" --target "127.0.0.1:$GRPC" --rate "$rate" --duration "$duration" \
        --max-in-flight 50000 --wait 150s --order "127.0.0.1:$ORDER" --payment "127.0.0.1:$PAYMENT" \
        --upstream-snapshot --watch-pid "orchestrator=$ORCHESTRATOR_PID" \
        --watch-pid "order=$ORDER_PID" --watch-pid "payment=$PAYMENT_PID" \
        --json "$OUT/seed-$flow.json" --plot "$OUT/seed-$flow.png" | tee -a "$OUT/seed-$flow.txt"
    stop_all
done

status=0
if [ -f "$OUT/seed-throttling.json" ] && [[ " $flows " == *" throttling "* ]]; then
    echo
    verdict=$(json_get "$OUT/seed-throttling.json" "'; '.join(
        (['success %.2f%% (want 100%%)' % (j['success'] * 100)] if j['success'] < 1 else []) +
        ['%s peak in flight %d > %d consumers' % (s, j['upstream'][s]['peak_in_flight'], $consumers)
         for s in ('order', 'payment') if j['upstream'][s]['peak_in_flight'] > $consumers] +
        ['%s rejected %d calls' % (s, j['upstream'][s]['rejected'])
         for s in ('order', 'payment') if j['upstream'][s]['rejected'] > 0] +
        (['orchestrator peak RSS %.1f MiB >= 150 MiB' % (j['watched'][0]['peak_rss_kib'] / 1024)]
         if j['watched'][0]['peak_rss_kib'] >= 150 * 1024 else [])) or 'ok'")
    if [ "$verdict" = ok ]; then
        echo "seed stress: throttling: 100% success, upstream peak in flight <= $consumers consumers, nothing rejected," \
            "orchestrator peak RSS under 150 MiB"
    else
        echo "seed stress: throttling FAILED: $verdict" >&2
        status=1
    fi
fi
echo "seed stress: reports, JSON and plots in $OUT/seed-*"
exit $status
