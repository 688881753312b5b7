#!/usr/bin/env bash
# The saturation table: for each flow, broker and saga log, the highest rate sustained for a step
# (20 s) with 100% success and p99 under 100 ms, found by `sagaflow-bench saturate` (doubling from
# 250/s, then bisecting to within 10%). Each row runs on a fresh stack: the upstream mocks (no
# latency, no capacity limit) and the orchestrator as their own processes. Prints the machine and
# a markdown table (also in bench/out/saturation.md); the JSON of every step is in bench/out/.
#
#   bench/saturate.sh [--flows "sync async throttling"] [--brokers "memory nats rabbitmq"]
#                     [--logs "memory embedded postgres"] [--step 20s] [--p99-max 100ms]
#
# The sync flow's steps do not travel over the broker, so it runs with the first broker only.
# BENCH_BIN_DIR=DIR uses prebuilt binaries; extra flags for `sagaflow-bench saturate` go after `--`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

flows="sync async throttling"
brokers="memory"
logs="memory"
step=20s
p99=100ms
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --flows) flows=$2; shift 2 ;;
        --brokers) brokers=$2; shift 2 ;;
        --logs) logs=$2; shift 2 ;;
        --step) step=$2; shift 2 ;;
        --p99-max) p99=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

build release
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'stop_all; rm -rf "$work"' EXIT
first_broker=${brokers%% *}
table="$OUT/saturation.md"
{
    echo "Machine: $(machine). Steps of $step; a step passes with 100% success and p99 < $p99."
    echo
    echo "| flow | broker | saga log | highest rate passed (req/s) | p99 there | orchestrator CPU there | load avg at start | command |"
    echo "|---|---|---|---|---|---|---|---|"
} >"$table"

for log in $logs; do
    for broker in $brokers; do
        for flow in $flows; do
            if [ "$flow" = sync ] && [ "$broker" != "$first_broker" ]; then
                continue
            fi
            name="$flow-$broker-$log"
            command="bench/saturate.sh --flows $flow --brokers $broker --logs $log --step $step --p99-max $p99"
            load=$(cut -d' ' -f1 /proc/loadavg)
            echo
            echo "== $name ($(uptime))"
            if ! start_stack "$work/$name" "$broker" "$log"; then
                echo "| $flow | $broker | $log | (did not start: see the log above) | | | $load | \`$command\` |" >>"$table"
                stop_all
                continue
            fi
            if "$BIN/sagaflow-bench" saturate --flow "$flow" --target "127.0.0.1:$GRPC" --duration "$step" \
                --p99-max "$p99" --wait 10s --quiet --watch-pid "orchestrator=$ORCHESTRATOR_PID" \
                --json "$OUT/saturate-$name.json" "${extra[@]}" | tee "$OUT/saturate-$name.txt"; then
                row=$(json_get "$OUT/saturate-$name.json" "(lambda best: '%s | %s | %s' % (
                    '%g' % j['best_rate'], '%.2f ms' % (best['report']['latencies']['99th'] / 1e6),
                    '%.0f%% of a core' % (100 * best['report']['watched'][0]['cpu_seconds'] /
                        max(1e-9, (best['report']['duration'] + best['report']['wait']) / 1e9)))
                    if best else 'none | | ')(next((s for s in j['steps'] if s['passed'] and s['rate'] == j['best_rate']), None))")
            else
                row="(the bench failed: see its output) | | "
            fi
            echo "| $flow | $broker | $log | $row | $load | \`$command\` |" >>"$table"
            stop_all
        done
    done
done
echo
cat "$table"
