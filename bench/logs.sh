#!/usr/bin/env bash
# The sync flow on each saga log, as a ratio to the in-memory log in the same run (the figure
# BENCHMARKS.md quotes for what each log costs). Each round runs every log once, back to back, each on a fresh stack (mocks with no
# latency, in-memory broker), 64 callers in a closed loop; the ratio of a round compares runs
# seconds apart, and the median over the rounds is what to quote on a shared machine.
#
#   bench/logs.sh [--logs "memory embedded postgres"] [--rounds 3] [--in-flight 64] [--duration 10s]
#                 [--flow sync] [--before DIR]
#
# --before DIR: a log named LOG@before runs LOG on the orchestrator built in DIR (an earlier
# commit's `booking`), so a change is measured against the code before it in the same run:
# --logs "memory postgres@before postgres".
#
# Output in bench/out/logs-FLOW.txt. BENCH_BIN_DIR=DIR skips the build.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

logs="memory embedded postgres"
rounds=3
in_flight=64
duration=10s
flow=sync
before=
while [ $# -gt 0 ]; do
    case $1 in
        --logs) logs=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --in-flight) in_flight=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --flow) flow=$2; shift 2 ;;
        --before) before=$2; shift 2 ;;
        *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
case " $logs " in *" memory "*) ;; *) echo "--logs must include memory, the baseline" >&2; exit 2 ;; esac
case " $logs " in *"@before "*) [ -x "$before/booking" ] || { echo "--before DIR with a booking binary is needed for LOG@before" >&2; exit 2; } ;; esac

build release
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'stop_all; rm -rf "$work"' EXIT
report="$OUT/logs-$flow.txt"
{
    echo "machine: $(machine)"
    echo "command: bench/logs.sh --logs \"$logs\" --rounds $rounds --in-flight $in_flight --duration $duration --flow $flow${before:+ --before $before}"
    echo
} | tee "$report"

declare -A rate
for round in $(seq "$rounds"); do
    for log in $logs; do
        dir="$work/r$round-$log"
        own=$BIN
        [ "${log%@before}" = "$log" ] || BIN=$before
        start_stack "$dir" memory "${log%@before}"
        BIN=$own
        "$BIN/sagaflow-bench" --flow "$flow" --target "127.0.0.1:$GRPC" --rate max --max-in-flight "$in_flight" \
            --duration "$duration" --quiet --json "$dir/report.json" \
            --watch-pid "orchestrator=$ORCHESTRATOR_PID" >"$dir/report.txt"
        stop_all
        success=$(json_get "$dir/report.json" 'int(j["success"] == 1)')
        r=$(json_get "$dir/report.json" 'round(j["throughput"])')
        p99=$(json_get "$dir/report.json" 'round(j["latencies"]["99th"] / 1e6, 2)')
        cpu=$(grep -m1 -o 'orchestrator [0-9]*: [^,]*' "$dir/report.txt" | sed 's/.*(\(.*\) of a core)/\1/')
        # The orchestrator's CPU per saga answered, and its peak resident memory.
        per_saga=$(json_get "$dir/report.json" 'round(1e6 * j["watched"][0]["cpu_seconds"] / max(1, j["requests"] * j["success"]))')
        rss=$(json_get "$dir/report.json" 'round(j["watched"][0]["peak_rss_kib"] / 1024)')
        rate[$round,$log]=$r
        printf 'round %s  %-15s %6s sagas/s  p99 %6s ms  success %s  orchestrator CPU %s, %s µs/saga, peak RSS %s MiB  load %s\n' \
            "$round" "$log" "$r" "$p99" "$success" "$cpu" "$per_saga" "$rss" "$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$report"
        [ "$success" = 1 ] || { echo "run failed: $(grep -A3 'Error Set' "$dir/report.txt")" >&2; exit 1; }
    done
done

{
    echo
    printf '%-15s %s\n' log "ratio to memory, per round  -> median"
    for log in $logs; do
        ratios=()
        for round in $(seq "$rounds"); do
            ratios+=("$(python3 -c "print(f'{${rate[$round,$log]} / ${rate[$round,memory]}:.3f}')")")
        done
        median=$(printf '%s\n' "${ratios[@]}" | sort -n | python3 -c 'import sys; v=[float(l) for l in sys.stdin]; print(f"{v[len(v)//2]:.3f}")')
        printf '%-15s %s  -> %s\n' "$log" "${ratios[*]}" "$median"
    done
} | tee -a "$report"
