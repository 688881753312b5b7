#!/usr/bin/env bash
# A soak of the booking demo as a user runs it (`cargo run --release`: one process, in-process
# mocks, in-memory broker, embedded saga log, default settings): an open load for a long time,
# with the orchestrator's resident memory and CPU and the data directory's size sampled as it
# goes, to see what memory and disk a deployment needs and whether they stop growing.
#
#   bench/soak.sh [--rate 1000] [--duration 10m] [--interval 10s] [--flow sync]
#
# Output in bench/out/: soak.txt (the report, with the samples), soak.json (the series under
# `resources`), soak.png (latency) and soak-resources.png (RSS, CPU, data directory over time).
# STACK_YAML is appended to the demo's app.yaml (e.g. "saga_log_cache_mib: 16").
# BENCH_BIN_DIR=DIR skips the build.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

rate=1000
duration=10m
interval=10s
flow=sync
while [ $# -gt 0 ]; do
    case $1 in
        --rate) rate=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --interval) interval=$2; shift 2 ;;
        --flow) flow=$2; shift 2 ;;
        *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

build release
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'stop_all; rm -rf "$work"' EXIT
read -r grpc http order payment <<<"$(free_ports 4)"
{
    echo "grpc_listen: 127.0.0.1:$grpc"
    echo "http_listen: 127.0.0.1:$http"
    echo "saga_log_url: $work/data"
    echo "upstream: { in_process: true, order_addr: 127.0.0.1:$order, payment_addr: 127.0.0.1:$payment }"
    echo "${STACK_YAML:-}"
} >"$work/app.yaml"
start "$work/booking.log" env RUST_LOG="${RUST_LOG:-warn}" ${ORCHESTRATOR_ENV:-} "$BIN/booking" --config "$work/app.yaml" all
booking=$LAST_PID
wait_port "$grpc" "$booking" "$work/booking.log"

report="$OUT/soak.txt"
{
    echo "machine: $(machine)"
    echo "command: bench/soak.sh --rate $rate --duration $duration --interval $interval --flow $flow${STACK_YAML:+ (STACK_YAML: $STACK_YAML)}"
    echo "idle: orchestrator rss $(awk '/VmRSS/ {print $2, $3}' "/proc/$booking/status")"
    echo
} | tee "$report"
"$BIN/sagaflow-bench" --target "127.0.0.1:$grpc" --order "127.0.0.1:$order" --payment "127.0.0.1:$payment" \
    --flow "$flow" --rate "$rate" --duration "$duration" --progress-interval 60s \
    --watch-pid "orchestrator=$booking" --watch-dir "data=$work/data" --sample-interval "$interval" \
    --json "$OUT/soak.json" --plot "$OUT/soak.png" 2>&1 | tee -a "$report"
keep_logs "$work"
