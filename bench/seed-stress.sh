#!/usr/bin/env bash
# The stress test of the Go project (seed), reproduced: 500 requests/s for 30 s against the booking
# orchestrator, once with the sync flow and once with the throttling flow, each on a fresh stack:
#
#   - OrderService and PaymentService mocks as their own processes, each with a call latency of
#     LATENCY_MS (40) and a CAPACITY (12) in flight, above which they refuse calls with
#     RESOURCE_EXHAUSTED, as an overloaded service would. 500/s × 40 ms needs 20 calls in flight
#     per service: the sync flow's unbounded concurrency overwhelms them, as it overwhelmed the
#     upstreams of the Go project (seed) (which were OOM-killed).
#   - the orchestrator as its own process, its throttling topics consumed by CONSUMERS (10) per
#     topic, below the capacity: the broker holds the backlog and the upstreams never see more.
#
# Then it checks the throttling run: 100% success, each upstream's peak in-flight (from its
# Snapshot) at most CONSUMERS with nothing rejected, and the orchestrator's peak RSS under 150 MiB.
# The overload is RATE × LATENCY_MS / 1000 / CAPACITY (1.67× here); for 5× the upstreams' capacity:
#   RATE=500 DURATION=10s CAPACITY=4 CONSUMERS=4 FLOWS=throttling bench/seed-stress.sh
#
# `--replicas N` is the deployment of the Go project (seed): N orchestrator processes (POD_ID <id>-0 .. <id>-N-1)
# sharing one PostgreSQL saga log (a fresh schema in the local `test` database) and one broker
# (BROKER: nats by default, or rabbitmq), with the load spread over them round robin, as a gRPC
# load balancer would. Each replica consumes its own throttling topics with CONSUMERS, by default
# ceil(10 / N) (4 for 3 replicas: 12 at most in flight on each upstream, its capacity); the check
# is then peak in flight <= N x CONSUMERS, and every replica's peak RSS under 150 MiB. A comma
# list runs each count in turn on fresh stacks, to compare them in one run:
#   DURATION=10s bench/seed-stress.sh --replicas 1,3
# Reports, JSON and plots go to bench/out/ (seed-FLOW.*, or seed-FLOW-rN.* with --replicas).
# Settings by environment: RATE, DURATION, LATENCY_MS, CAPACITY, CONSUMERS, BROKER (memory; with
# --replicas nats), SAGA_LOG (embedded, the default; with --replicas always postgres),
# FLOWS ("sync throttling"), REPLICAS (as --replicas); BENCH_BIN_DIR to skip the build.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

replicas=${REPLICAS:-}
while [ $# -gt 0 ]; do
    case $1 in
        --replicas) replicas=$2; shift 2 ;;
        *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
for n in ${replicas//,/ }; do
    [[ $n =~ ^[1-9][0-9]?$ ]] || { echo "--replicas: \`$n\` is not a count from 1 to 99" >&2; exit 2; }
done

rate=${RATE:-500}
duration=${DURATION:-30s}
latency=${LATENCY_MS:-40}
capacity=${CAPACITY:-12}
if [ -n "$replicas" ]; then
    broker=${BROKER:-nats}
    log=postgres
else
    broker=${BROKER:-memory}
    log=${SAGA_LOG:-embedded}
fi
flows=${FLOWS:-sync throttling}

build release
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'stop_all; drop_replica_schema; rm -rf "$work"' EXIT
stack_yaml="# The throttled backlog drains after the attack: let callers and sagas wait for it.
wait_timeout_ms: 120000
flow: { deadline_ms: 120000 }"

# check NAME CONSUMERS: the throttling run in $OUT/NAME.json: 100% success, each upstream's peak in
# flight at most CONSUMERS (all replicas together) with nothing rejected, every orchestrator's
# peak RSS under 150 MiB. Sets status=1 when it fails.
status=0
check() {
    local name=$1 limit=$2 label=${1#seed-} verdict
    verdict=$(json_get "$OUT/$name.json" "'; '.join(
        (['success %.2f%% (want 100%%)' % (j['success'] * 100)] if j['success'] < 1 else []) +
        ['%s peak in flight %d > %d consumers' % (s, j['upstream'][s]['peak_in_flight'], $limit)
         for s in ('order', 'payment') if j['upstream'][s]['peak_in_flight'] > $limit] +
        ['%s rejected %d calls' % (s, j['upstream'][s]['rejected'])
         for s in ('order', 'payment') if j['upstream'][s]['rejected'] > 0] +
        ['%s peak RSS %.1f MiB >= 150 MiB' % (w['name'], w['peak_rss_kib'] / 1024)
         for w in j['watched'] if w['name'].startswith('orchestrator') and w['peak_rss_kib'] >= 150 * 1024]) or 'ok'")
    if [ "$verdict" = ok ]; then
        echo "seed stress: $label: 100% success, upstream peak in flight <= $limit consumers, nothing rejected," \
            "orchestrator peak RSS under 150 MiB"
    else
        echo "seed stress: $label FAILED: $verdict" >&2
        status=1
    fi
}

# header NAME COMMAND: the top of $OUT/NAME.txt.
header() {
    echo
    {
        echo "== $1"
        echo "machine: $(machine)"
        echo "uptime: $(uptime)"
        echo "command: $2"
        echo
    } | tee "$OUT/$1.txt"
}

common=(--rate "$rate" --duration "$duration" --max-in-flight 50000 --wait 150s --upstream-snapshot)

if [ -z "$replicas" ]; then
    consumers=${CONSUMERS:-10}
    echo "seed stress: $rate/s for $duration; upstreams: ${latency} ms per call, capacity $capacity;" \
        "throttling consumers: $consumers per topic; broker $broker, saga log $log"
    echo "machine: $(machine)"
    for flow in $flows; do
        CONSUMERS=$consumers STACK_YAML=$stack_yaml \
            start_stack "$work/$flow" "$broker" "$log" --latency-ms "$latency" --capacity "$capacity"
        header "seed-$flow" "RATE=$rate DURATION=$duration LATENCY_MS=$latency CAPACITY=$capacity CONSUMERS=$consumers BROKER=$broker SAGA_LOG=$log FLOWS=$flow bench/seed-stress.sh"
        "$BIN/sagaflow-bench" --flow "$flow" --target "127.0.0.1:$GRPC" "${common[@]}" \
            --order "127.0.0.1:$ORDER" --payment "127.0.0.1:$PAYMENT" --watch-pid "orchestrator=$ORCHESTRATOR_PID" \
            --watch-pid "order=$ORDER_PID" --watch-pid "payment=$PAYMENT_PID" \
            --json "$OUT/seed-$flow.json" --plot "$OUT/seed-$flow.png" | tee -a "$OUT/seed-$flow.txt"
        stop_all
        if [ "$flow" = throttling ]; then
            echo
            check seed-throttling "$consumers"
        fi
    done
    echo "seed stress: reports, JSON and plots in $OUT/seed-*"
    exit $status
fi

echo "seed stress: $rate/s for $duration over ${replicas//,/ and } replica(s); upstreams: ${latency} ms per call," \
    "capacity $capacity; broker $broker, shared PostgreSQL saga log"
echo "machine: $(machine)"
for flow in $flows; do
    for n in ${replicas//,/ }; do
        consumers=${CONSUMERS:-$(((10 + n - 1) / n))}
        name="seed-$flow-r$n"
        start_mocks "$work/$name" --latency-ms "$latency" --capacity "$capacity"
        CONSUMERS=$consumers STACK_YAML=$stack_yaml start_replicas "$work/$name" "$n" "$broker"
        header "$name" "RATE=$rate DURATION=$duration LATENCY_MS=$latency CAPACITY=$capacity CONSUMERS=$consumers BROKER=$broker FLOWS=$flow bench/seed-stress.sh --replicas $n"
        echo "replicas: $n (POD_ID $REPLICA_SCHEMA-0 ..), $consumers throttling consumers per topic each; targets $TARGETS" |
            tee -a "$OUT/$name.txt"
        "$BIN/sagaflow-bench" --flow "$flow" --target "$TARGETS" "${common[@]}" \
            --order "127.0.0.1:$ORDER" --payment "127.0.0.1:$PAYMENT" "${WATCH_REPLICAS[@]}" \
            --watch-pid "order=$ORDER_PID" --watch-pid "payment=$PAYMENT_PID" \
            --json "$OUT/$name.json" --plot "$OUT/$name.png" | tee -a "$OUT/$name.txt"
        {
            echo "Saga log      [status, owner, sagas]"
            replica_sagas | sed 's/^/              /'
        } | tee -a "$OUT/$name.txt"
        stop_all
        drop_replica_schema
        if [ "$flow" = throttling ]; then
            echo
            check "$name" $((n * consumers))
        fi
    done
done
echo "seed stress: reports, JSON and plots in $OUT/seed-*-r*"
exit $status
