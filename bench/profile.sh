#!/usr/bin/env bash
# Where the orchestrator spends its CPU: a closed-loop load through one flow while `perf record`
# samples the orchestrator process (software clock, DWARF call graphs from the release build's
# line tables), then a text report of the hottest functions (self and with children) and, if
# `inferno-flamegraph` is on the PATH (`cargo install inferno`), a flamegraph SVG.
#
#   bench/profile.sh [--flow sync] [--broker memory] [--log memory] [--in-flight 64]
#                    [--duration 15s] [--sample 8]
#
# --sample is how many seconds perf records, from 3 s into the run. Outputs in
# bench/out/profile-FLOW-BROKER-LOG.{txt,perf.data,svg}. BENCH_BIN_DIR=DIR skips the build.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

flow=sync
broker=memory
log=memory
in_flight=64
duration=15s
sample=8
while [ $# -gt 0 ]; do
    case $1 in
        --flow) flow=$2; shift 2 ;;
        --broker) broker=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --in-flight) in_flight=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --sample) sample=$2; shift 2 ;;
        *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
command -v perf >/dev/null || { echo "perf is not installed (Debian: linux-perf)" >&2; exit 1; }

build release
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'stop_all; rm -rf "$work"' EXIT
name="profile-$flow-$broker-$log"
start_stack "$work/$name" "$broker" "$log"
"$BIN/sagaflow-bench" --flow "$flow" --target "127.0.0.1:$GRPC" --rate max --max-in-flight "$in_flight" \
    --duration "$duration" --quiet --watch-pid "orchestrator=$ORCHESTRATOR_PID" >"$work/bench.txt" &
bench=$!
sleep 3
perf record -F 499 -e cpu-clock --call-graph dwarf,16384 -p "$ORCHESTRATOR_PID" -o "$OUT/$name.perf.data" \
    -- sleep "$sample" 2>"$work/perf.err" || { cat "$work/perf.err" >&2; exit 1; }
wait "$bench"
{
    echo "machine: $(machine)"
    echo "command: bench/profile.sh --flow $flow --broker $broker --log $log --in-flight $in_flight --duration $duration --sample $sample"
    echo
    cat "$work/bench.txt"
    echo
    echo "## Self time by function (top 40)"
    perf report -i "$OUT/$name.perf.data" --no-children --sort symbol --stdio -g none --percent-limit 0.4 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' | cut -c1-160 | head -40
    echo
    echo "## Time with children, by function (top 60)"
    perf report -i "$OUT/$name.perf.data" --children --sort symbol --stdio -g none --percent-limit 1 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' | cut -c1-160 | head -60
    echo
    echo "## By thread"
    perf report -i "$OUT/$name.perf.data" --no-children --sort comm --stdio -g none 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' | cut -c1-160 | head -20
} | tee "$OUT/$name.txt"
if command -v inferno-collapse-perf >/dev/null; then
    perf script -i "$OUT/$name.perf.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph >"$OUT/$name.svg"
    echo "flamegraph: $OUT/$name.svg"
fi
