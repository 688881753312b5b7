#!/usr/bin/env bash
# The orchestrator against its ceiling: `sagaflow-bench --compare` runs the same load first
# directly on the upstream mocks (CreateOrder then CreatePayment, no orchestrator), then through a
# flow, and prints the throughput ratio and the p99 difference. Fresh stack: the mocks (no
# latency, no capacity limit) and the orchestrator as their own processes.
#
#   bench/compare.sh [--flow sync] [--broker memory] [--log memory] [--in-flight 64] [--rate max]
#                    [--connections 4] [--duration 20s] [--warmup 2s] [-- more sagaflow-bench flags]
#
# --warmup first sends the flow 64 callers' closed-loop load for that long, unmeasured (0s: none):
# a cold orchestrator (upstream connections opened lazily, allocator and maps growing) answered
# an open-loop 4000/s with a backlog of up to 600 ms in its first second.
# --rate max (the default) is a closed loop of --in-flight callers: throughput at that concurrency.
# A number is an open-loop rate (then --in-flight is the cap on outstanding requests).
# Four HTTP/2 connections per service by default: with one, the generator's single connection
# task is what limits the direct run (about 11,000/s against 15,000/s with four, measured here).
# Output in bench/out/compare-FLOW-BROKER-LOG.{txt,json,png}. BENCH_BIN_DIR=DIR skips the build.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

flow=sync
broker=memory
log=memory
in_flight=64
connections=4
rate=max
duration=20s
warmup=2s
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --flow) flow=$2; shift 2 ;;
        --broker) broker=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --in-flight) in_flight=$2; shift 2 ;;
        --connections) connections=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

build release
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'stop_all; keep_logs "$work"; rm -rf "$work"' EXIT
name="compare-$flow-$broker-$log"
start_stack "$work/$name" "$broker" "$log"
{
    echo "machine: $(machine)"
    echo "uptime: $(uptime)"
    echo "command: bench/compare.sh --flow $flow --broker $broker --log $log --in-flight $in_flight --connections $connections --rate $rate --duration $duration --warmup $warmup ${extra[*]}"
    echo
} | tee "$OUT/$name.txt"
case $warmup in
    0|0s) ;;
    *)
        echo "warm-up: $flow, 64 callers for $warmup (not measured)" | tee -a "$OUT/$name.txt"
        "$BIN/sagaflow-bench" --flow "$flow" --target "127.0.0.1:$GRPC" --rate max --max-in-flight 64 \
            --duration "$warmup" --quiet >"$work/warmup.txt" || { cat "$work/warmup.txt" >&2; exit 1; }
        ;;
esac
"$BIN/sagaflow-bench" --flow "$flow" --target "127.0.0.1:$GRPC" --order "127.0.0.1:$ORDER" --payment "127.0.0.1:$PAYMENT" \
    --rate "$rate" --max-in-flight "$in_flight" --connections "$connections" --duration "$duration" --compare --quiet \
    --watch-pid "orchestrator=$ORCHESTRATOR_PID" --watch-pid "order=$ORDER_PID" --watch-pid "payment=$PAYMENT_PID" \
    --json "$OUT/$name.json" --plot "$OUT/$name.png" "${extra[@]}" | tee -a "$OUT/$name.txt"
echo "uptime after: $(uptime)" | tee -a "$OUT/$name.txt"
