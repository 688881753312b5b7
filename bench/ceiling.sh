#!/usr/bin/env bash
# The sync flow between its two ceilings, in one run: the same closed-loop load sent
#   direct      CreateOrder then CreatePayment on the upstream mocks, no orchestrator;
#   proxy       through `booking proxy`, a do-nothing gRPC proxy making those two calls (one extra
#               hop, nothing recorded): what any orchestrator in the middle pays at least;
#   memory      through the orchestrator, sync flow, in-memory broker and saga log;
#   embedded    through the orchestrator, sync flow, in-memory broker, embedded saga log;
# all on one pair of mocks, each leg seconds after the other. The order of the legs rotates from
# round to round so none always runs first (on a warmer or colder machine); the ratios of a round
# compare runs seconds apart, and the median over rounds is what to quote on a shared machine.
# Each leg also gets the CPU the whole machine spent per saga (the load generator, the mocks, and
# the proxy or orchestrator): the loop saturates both cores, so a leg's throughput is roughly the
# machine's CPU over that sum, and the sum moves far less between runs than sagas/s does. Its
# ratio to direct's (direct's µs per saga / the leg's) is printed beside the throughput ratios.
#
#   bench/ceiling.sh [--rounds 3] [--in-flight 64] [--duration 10s] [--connections 4]
#                    [--legs "direct proxy memory embedded"]
#
# Output in bench/out/ceiling.txt. BENCH_BIN_DIR=DIR skips the build.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

rounds=3
in_flight=64
duration=10s
connections=4
legs="direct proxy memory embedded"
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --in-flight) in_flight=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --connections) connections=$2; shift 2 ;;
        --legs) legs=$2; shift 2 ;;
        *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
case " $legs " in *" direct "*) ;; *) echo "--legs must include direct, the baseline" >&2; exit 2 ;; esac
read -r -a order <<<"$legs"

build release
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'stop_all; rm -rf "$work"' EXIT
report="$OUT/ceiling.txt"
{
    echo "machine: $(machine)"
    echo "command: bench/ceiling.sh --rounds $rounds --in-flight $in_flight --duration $duration --connections $connections --legs \"$legs\""
    echo
} | tee "$report"

declare -A rate cost
for round in $(seq "$rounds"); do
    dir="$work/r$round"
    start_mocks "$dir"
    watch=(--watch-pid "order=$ORDER_PID" --watch-pid "payment=$PAYMENT_PID")
    declare -A target=()
    for leg in "${order[@]}"; do
        case $leg in
            direct) ;;
            proxy)
                start_proxy "$dir/proxy"
                target[proxy]="--target 127.0.0.1:$PROXY --watch-pid proxy=$PROXY_PID"
                ;;
            memory|embedded)
                start_orchestrator "$dir/$leg" memory "$leg"
                target[$leg]="--target 127.0.0.1:$GRPC --watch-pid orchestrator=$ORCHESTRATOR_PID"
                # Unmeasured warm-up: connections opened, allocator and maps grown.
                "$BIN/sagaflow-bench" --flow sync --target "127.0.0.1:$GRPC" --rate max --max-in-flight 64 \
                    --duration 2s --quiet >"$dir/$leg-warmup.txt"
                ;;
            *) echo "unknown leg $leg" >&2; exit 2 ;;
        esac
    done
    n=${#order[@]}
    for k in $(seq 0 $((n - 1))); do
        leg=${order[$(((k + round - 1) % n))]}
        if [ "$leg" = direct ]; then
            args=(--direct --order "127.0.0.1:$ORDER" --payment "127.0.0.1:$PAYMENT")
        else
            read -r -a args <<<"--flow sync ${target[$leg]}"
        fi
        "$BIN/sagaflow-bench" "${args[@]}" --rate max --max-in-flight "$in_flight" --connections "$connections" \
            --duration "$duration" --quiet --json "$dir/$leg.json" "${watch[@]}" >"$dir/$leg.txt"
        success=$(json_get "$dir/$leg.json" 'int(j["success"] == 1)')
        r=$(json_get "$dir/$leg.json" 'round(j["throughput"])')
        p99=$(json_get "$dir/$leg.json" 'round(j["latencies"]["99th"] / 1e6, 2)')
        cpu=$(grep -o '^Watched.*' "$dir/$leg.txt" | sed -E 's/.*\] *([a-z]+) [0-9]+: [^(]*\(([0-9]+)% of a core\).*/\1 \2%/' | paste -sd' ')
        rate[$round,$leg]=$r
        # Machine CPU per saga answered, in µs: the generator and every watched process.
        read -r us parts <<<"$(python3 - "$dir/$leg.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
sagas = max(1, j["requests"] * j["success"])
each = [(w["name"], w["cpu_seconds"]) for w in j["watched"]] + [("client", j["generator"]["cpu_seconds"])]
total = sum(cpu for _, cpu in each)
print(f"{1e6 * total / sagas:.1f}", " ".join(f"{name} {1e6 * cpu / sagas:.0f}" for name, cpu in each))
PY
)"
        cost[$round,$leg]=$us
        printf 'round %s  %-9s %6s sagas/s  p99 %6s ms  success %s  cpu: %s  load %s\n' \
            "$round" "$leg" "$r" "$p99" "$success" "$cpu" "$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$report"
        printf '         %-9s CPU µs per saga: %s = %s\n' "$leg" "$parts" "$us" | tee -a "$report"
        [ "$success" = 1 ] || { echo "run failed: $(grep -A3 'Error Set' "$dir/$leg.txt")" >&2; exit 1; }
    done
    stop_all
done

# median [DECIMALS]: the median of the numbers on standard input (3 decimals unless told).
median() { sort -n | python3 -c 'import sys; v=[float(l) for l in sys.stdin]; print(f"{v[len(v)//2]:.{int(sys.argv[1])}f}")' "${1:-3}"; }
{
    echo
    printf '%-9s %-40s %s\n' leg "ratio to direct, per round  -> median" "ratio to proxy -> median"
    for leg in "${order[@]}"; do
        to_direct=() to_proxy=()
        for round in $(seq "$rounds"); do
            to_direct+=("$(python3 -c "print(f'{${rate[$round,$leg]} / ${rate[$round,direct]}:.3f}')")")
            if [ -n "${rate[$round,proxy]:-}" ]; then
                to_proxy+=("$(python3 -c "print(f'{${rate[$round,$leg]} / ${rate[$round,proxy]}:.3f}')")")
            fi
        done
        line=$(printf '%s  -> %s' "${to_direct[*]}" "$(printf '%s\n' "${to_direct[@]}" | median)")
        if [ ${#to_proxy[@]} -gt 0 ]; then
            printf '%-9s %-40s %s  -> %s\n' "$leg" "$line" "${to_proxy[*]}" "$(printf '%s\n' "${to_proxy[@]}" | median)"
        else
            printf '%-9s %s\n' "$leg" "$line"
        fi
    done
    echo
    printf '%-9s %s\n' leg "machine CPU per saga, µs, per round -> median; direct's / the leg's -> median"
    for leg in "${order[@]}"; do
        us=() to_direct=()
        for round in $(seq "$rounds"); do
            us+=("${cost[$round,$leg]}")
            to_direct+=("$(python3 -c "print(f'{${cost[$round,direct]} / ${cost[$round,$leg]}:.3f}')")")
        done
        printf '%-9s %s  -> %s;  %s  -> %s\n' "$leg" "${us[*]}" "$(printf '%s\n' "${us[@]}" | median 1)" \
            "${to_direct[*]}" "$(printf '%s\n' "${to_direct[@]}" | median)"
    done
} | tee -a "$report"
