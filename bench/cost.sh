#!/usr/bin/env bash
# What one sync saga costs the orchestrator, counted rather than timed, so that a change can be
# judged on a shared, noisy machine:
#
#   native (the release build, mimalloc), the load of `bench/ceiling.sh` (--rate max: 64 callers in
#   a closed loop, 4 connections; or an open loop of --rate sagas/s) for --duration after a
#   warm-up, counted with `perf` tracepoints and /proc/PID:
#       syscalls, fdatasync+fsync, writes to sockets, pwrite64 calls and the bytes they write (the
#       saga log: its write-ahead file and checkpoints), CPU time
#   under valgrind (the same build with the system allocator, `--features system-alloc`, so that
#   valgrind sees every allocation), 16 callers in a closed loop for --valgrind-duration:
#       instructions (callgrind, counted after the warm-up only), allocations and bytes allocated
#       (DHAT), bytes copied by memcpy/memmove (DHAT's copy mode)
#
# Each figure is divided by the sagas answered. The valgrind figures are deterministic to within a
# few percent for the same binary; DHAT counts the whole process, so it runs twice (warm-up only,
# warm-up and the measured load) and reports the difference.
#
#   bench/cost.sh [--log embedded] [--rate max] [--duration 10s] [--valgrind-duration 20s]
#                 [--parts "native callgrind heap copy"]
#
# --log memory|embedded|postgres measures the orchestrator on that saga log; --log proxy measures
# the do-nothing proxy (`booking proxy`) instead: the floor any orchestrator in the middle pays.
#
# Output in bench/out/cost-LOG.txt, with the profiles beside it: callgrind's (cost-LOG-callgrind.out,
# and inclusive costs in cost-LOG-callgrind.txt) and the top allocation and copy sites
# (cost-LOG-heap.txt, cost-LOG-copy.txt). BENCH_BIN_DIR=DIR skips the build (it must hold booking-system-alloc).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

log=embedded
rate=max
duration=10s
valgrind_duration=20s
parts="native callgrind heap copy"
while [ $# -gt 0 ]; do
    case $1 in
        --log) log=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --valgrind-duration) valgrind_duration=$2; shift 2 ;;
        --parts) parts=$2; shift 2 ;;
        *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }
command -v perf >/dev/null || { echo "perf is needed (apt-get install linux-perf)" >&2; exit 2; }

if [ -z "${BENCH_BIN_DIR:-}" ]; then
    target=${CARGO_TARGET_DIR:-target}
    case $target in /*) ;; *) target=$ROOT/$target ;; esac
    (cd "$ROOT" && cargo build --release -p booking --features system-alloc)
    cp "$target/release/booking" "$target/release/booking-system-alloc"
fi
build release
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'stop_all; rm -rf "$work"' EXIT
report="$OUT/cost-$log.txt"
{
    echo "machine: $(machine)"
    echo "command: bench/cost.sh --log $log --rate $rate --duration $duration --valgrind-duration $valgrind_duration"
    echo
} | tee "$report"

answered() { json_get "$1" 'j["requests"] if j["success"] == 1 else exit("run failed: success " + str(j["success"]))'; }
per() { python3 -c "import sys; print(f'{$1 / $2:,.${3:-1}f}')"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
load() { # TARGET RATE DURATION JSON
    local callers=()
    [ "$2" = max ] && callers=(--max-in-flight 64 --connections 4)
    "$BIN/sagaflow-bench" --flow sync --target "$1" --rate "$2" "${callers[@]}" --duration "$3" --quiet --json "$4" >"$4.txt"
}

wants() { case " $parts " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# start_measured DIR: the process measured (the orchestrator on $log, or the proxy), its gRPC port
# in GRPC and its pid in ORCHESTRATOR_PID.
start_measured() {
    if [ "$log" = proxy ]; then
        start_proxy "$1"
        GRPC=$PROXY ORCHESTRATOR_PID=$PROXY_PID
    else
        start_orchestrator "$1" memory "$log"
    fi
}

# Native: syscalls, syncs, bytes, CPU.
if wants native; then
start_mocks "$work/native"
start_measured "$work/native"
load "127.0.0.1:$GRPC" "$rate" 3s "$work/native/warmup.json"
events=raw_syscalls:sys_enter,syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,syscalls:sys_enter_pwrite64
events=$events,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendto
events=$events,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex
ticks0=$(cpu_ticks "$ORCHESTRATOR_PID")
perf stat -x, -e "$events" -p "$ORCHESTRATOR_PID" -o "$work/native/perf.csv" &
stat_pid=$!
perf record -q -e syscalls:sys_enter_pwrite64 -p "$ORCHESTRATOR_PID" -o "$work/native/pwrite.data" 2>/dev/null &
record_pid=$!
sleep 0.5
load "127.0.0.1:$GRPC" "$rate" "$duration" "$work/native/run.json"
kill -INT "$stat_pid" "$record_pid"
wait "$stat_pid" "$record_pid" || true
ticks1=$(cpu_ticks "$ORCHESTRATOR_PID")
pwrite_bytes=$(perf script -i "$work/native/pwrite.data" -F trace 2>/dev/null |
    sed -nE 's/.*count: (0x[0-9a-f]+).*/\1/p' | python3 -c 'import sys; print(sum(int(l, 16) for l in sys.stdin))')
n=$(answered "$work/native/run.json")
ticks_per_s=$(getconf CLK_TCK)
count() { awk -F, -v e="$1" '$3 == e { print $1 }' "$work/native/perf.csv"; }
syncs=$(($(count syscalls:sys_enter_fdatasync) + $(count syscalls:sys_enter_fsync)))
sockets=$(($(count syscalls:sys_enter_writev) + $(count syscalls:sys_enter_sendmsg) + $(count syscalls:sys_enter_sendto) + $(count syscalls:sys_enter_write)))
{
    echo "native, $n sagas at rate $rate (after a 3 s warm-up), per saga:"
    printf '  %-34s %s\n' "syscalls" "$(per "$(count raw_syscalls:sys_enter)" "$n")"
    printf '  %-34s %s\n' "fdatasync + fsync" "$(per "$syncs" "$n" 3)"
    printf '  %-34s %s\n' "pwrite64 (saga log)" "$(per "$(count syscalls:sys_enter_pwrite64)" "$n" 2)"
    printf '  %-34s %s\n' "write/writev/sendmsg (sockets)" "$(per "$sockets" "$n" 2)"
    printf '  %-34s %s\n' "recvfrom" "$(per "$(count syscalls:sys_enter_recvfrom)" "$n" 2)"
    printf '  %-34s %s\n' "epoll_wait" "$(per "$(count syscalls:sys_enter_epoll_wait)" "$n" 2)"
    printf '  %-34s %s\n' "futex" "$(per "$(count syscalls:sys_enter_futex)" "$n" 2)"
    printf '  %-34s %s\n' "bytes written by pwrite64" "$(per "$pwrite_bytes" "$n" 0)"
    printf '  %-34s %s\n' "CPU µs (user + system)" "$(per "($ticks1 - $ticks0) * 1e6 / $ticks_per_s" "$n" 0)"
} | tee -a "$report"
stop_all
STARTED=()
fi

# Under valgrind: a fresh stack per tool, the orchestrator run under it, loaded by 16 callers in a
# closed loop (as fast as it answers under valgrind, so that batches are as full as at saturation).
valgrind_load() { # JSON DURATION
    "$BIN/sagaflow-bench" --flow sync --target "127.0.0.1:$GRPC" --rate max --max-in-flight 16 --duration "$2" \
        --wait 120s --quiet --json "$1" >"$1.txt"
}
under() { # NAME TOOL-ARGS... : starts the orchestrator under valgrind in $work/NAME, then warms it up
    local name=$1
    shift
    start_mocks "$work/$name"
    ORCHESTRATOR_WRAP="valgrind $* --" BIN_ORCHESTRATOR="$BIN/booking-system-alloc" \
        PROXY_WRAP="valgrind $* --" BIN_PROXY="$BIN/booking-system-alloc" START_TIMEOUT=600 start_measured "$work/$name"
    valgrind_load "$work/$name/warmup.json" 5s
}
finish() { # stops the orchestrator (valgrind writes its output at exit)
    kill -TERM "$ORCHESTRATOR_PID"
    wait "$ORCHESTRATOR_PID" 2>/dev/null || true
    stop_all
    STARTED=()
}

echo "under valgrind, 16 callers for $valgrind_duration after a warm-up, per saga:" | tee -a "$report"
if wants callgrind; then
under callgrind --tool=callgrind --callgrind-out-file="$work/callgrind/out"
callgrind_control -z "$ORCHESTRATOR_PID" >/dev/null
valgrind_load "$work/callgrind/run.json" "$valgrind_duration"
callgrind_control -d "$ORCHESTRATOR_PID" >/dev/null
n_cg=$(answered "$work/callgrind/run.json")
finish
dump=$(ls -t "$work"/callgrind/out.* | head -1)
instructions=$(callgrind_annotate "$dump" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
callgrind_annotate --inclusive=yes "$dump" >"$OUT/cost-$log-callgrind.txt" 2>/dev/null || true
cp "$dump" "$OUT/cost-$log-callgrind.out"
printf '  %-34s %s\n' "instructions (callgrind)" "$(per "$instructions" "$n_cg" 0)" | tee -a "$report"
fi

dhat_total() { # NAME MODE DURATION: runs DHAT; sets TOTAL_BYTES, TOTAL_BLOCKS (whole run) and SAGAS
    under "$1" --tool=dhat --mode="$2" --dhat-out-file="$work/$1/dhat.json"
    SAGAS=0
    if [ "$3" != 0 ]; then
        valgrind_load "$work/$1/run.json" "$3"
        SAGAS=$(answered "$work/$1/run.json")
    fi
    finish
    read -r TOTAL_BYTES TOTAL_BLOCKS < <(awk '/^==[0-9]+== Total:/ { gsub(",", "", $3); gsub(",", "", $6); print $3, $6; exit }' \
        "$work/$1/$([ "$log" = proxy ] && echo proxy || echo orchestrator).log")
}
for mode in heap copy; do
    wants "$mode" || continue
    dhat_total "${mode}0" "$mode" 0
    bytes0=$TOTAL_BYTES blocks0=$TOTAL_BLOCKS
    dhat_total "${mode}1" "$mode" "$valgrind_duration"
    cp "$work/${mode}1/dhat.json" "$OUT/cost-$log-$mode.json"
    python3 "$BENCH_DIR/dhat_top.py" "$OUT/cost-$log-$mode.json" "$SAGAS" >"$OUT/cost-$log-$mode.txt"
    if [ "$mode" = heap ]; then
        what=("allocations (DHAT)" "bytes allocated (DHAT)")
    else
        what=("memcpy/memmove calls (DHAT copy)" "bytes copied (DHAT copy)")
    fi
    {
        printf '  %-34s %s\n' "${what[0]}" "$(per "$((TOTAL_BLOCKS - blocks0))" "$SAGAS")"
        printf '  %-34s %s\n' "${what[1]}" "$(per "$((TOTAL_BYTES - bytes0))" "$SAGAS" 0)"
    } | tee -a "$report"
done
echo "profiles: $OUT/cost-$log-{callgrind.txt,callgrind.out,heap.txt,copy.txt}" | tee -a "$report"
