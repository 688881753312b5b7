#!/usr/bin/env bash
# Several orchestrator replicas on one machine, as they run in production: N `booking
# orchestrator` processes sharing one app.yaml, one broker (NATS JetStream, or RabbitMQ) and one
# PostgreSQL saga log (a fresh schema in the local `test` database), told apart by POD_ID
# (<id>-0 .. <id>-N-1) and their listen ports; one set of OrderService and PaymentService mocks;
# and `sagaflow-bench` spreading its calls over the replicas round robin, as a gRPC load balancer
# would (`--target A,B,C`). After each run it prints the shared log's sagas by status and owner.
#
#   bench/replicas.sh [--replicas 3] [--broker nats] [--flow sync] [--rate max] [--in-flight 64]
#                     [--duration 10s] [--connections 1] [--latency-ms 0] [--capacity 0]
#                     [--consumers N] [--kill-one AFTER] [-- more sagaflow-bench flags]
#
# --replicas takes a comma list to compare counts in one run on fresh stacks (e.g. 1,3).
# --rate max (the default) is a closed loop of --in-flight callers; a number is an open-loop rate.
# --consumers is each replica's consumer count per throttling topic (default: the config's 16).
# --kill-one AFTER sends SIGKILL to the last replica AFTER (e.g. 5s) into the load: its callers
# get errors, and once its lease runs out (replicas.lease_ttl_ms, 10 s by default) a survivor
# takes its unfinished sagas over; the script then waits (up to 60 s) until the log has none
# left running and fails if some are.
# Output in bench/out/replicas-FLOW-BROKER-rN.{txt,json}. BENCH_BIN_DIR=DIR skips the build.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

replicas=3
broker=nats
flow=sync
rate=max
in_flight=64
duration=10s
connections=1
latency=0
capacity=0
consumers=""
kill_after=""
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --replicas) replicas=$2; shift 2 ;;
        --broker) broker=$2; shift 2 ;;
        --flow) flow=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --in-flight) in_flight=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --connections) connections=$2; shift 2 ;;
        --latency-ms) latency=$2; shift 2 ;;
        --capacity) capacity=$2; shift 2 ;;
        --consumers) consumers=$2; shift 2 ;;
        --kill-one) kill_after=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
for n in ${replicas//,/ }; do
    [[ $n =~ ^[1-9][0-9]?$ ]] || { echo "--replicas: \`$n\` is not a count from 1 to 99" >&2; exit 2; }
done
case $broker in nats | rabbitmq) ;; *) echo "--broker: nats or rabbitmq (replicas share it)" >&2; exit 2 ;; esac
if [ -n "$kill_after" ]; then
    [[ $kill_after =~ ^[0-9]+s$ ]] || { echo "--kill-one: a whole number of seconds, e.g. 5s" >&2; exit 2; }
fi

build release
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'stop_all; drop_replica_schema; keep_logs "$work"; rm -rf "$work"' EXIT
status=0

# unfinished: sagas of the shared log still running or compensating.
unfinished() {
    replica_sagas | awk '$1 == "running" || $1 == "compensating" { n += $3 } END { print n + 0 }'
}

for n in ${replicas//,/ }; do
    name="replicas-$flow-$broker-r$n"
    start_mocks "$work/$name" --latency-ms "$latency" --capacity "$capacity"
    CONSUMERS=$consumers start_replicas "$work/$name" "$n" "$broker"
    {
        echo "== $n replica(s)"
        echo "machine: $(machine)"
        echo "uptime: $(uptime)"
        echo "command: bench/replicas.sh --replicas $n --broker $broker --flow $flow --rate $rate --in-flight $in_flight" \
            "--duration $duration --connections $connections --latency-ms $latency --capacity $capacity" \
            "${consumers:+--consumers $consumers }${kill_after:+--kill-one $kill_after }${extra[*]}"
        echo "replicas: POD_ID $REPLICA_SCHEMA-0 .. $REPLICA_SCHEMA-$((n - 1)), gRPC $TARGETS, saga log schema $REPLICA_SCHEMA"
        echo
    } | tee "$OUT/$name.txt"
    if [ -n "$kill_after" ]; then
        victim=${REPLICA_PIDS[$((n - 1))]}
        (sleep "${kill_after%s}" && kill -KILL "$victim" && echo "replicas: killed replica $((n - 1)) (pid $victim) at $kill_after" >&2) &
        STARTED+=("$!")
    fi
    bench_status=0
    "$BIN/sagaflow-bench" --flow "$flow" --target "$TARGETS" --rate "$rate" --max-in-flight "$in_flight" \
        --duration "$duration" --connections "$connections" --order "127.0.0.1:$ORDER" --payment "127.0.0.1:$PAYMENT" \
        --upstream-snapshot "${WATCH_REPLICAS[@]}" --json "$OUT/$name.json" "${extra[@]}" |
        tee -a "$OUT/$name.txt" || bench_status=$?
    [ "$bench_status" = 0 ] || status=1
    if [ -n "$kill_after" ]; then
        left=$(unfinished)
        for _ in $(seq 60); do
            [ "$left" = 0 ] && break
            sleep 1
            left=$(unfinished)
        done
        echo "replicas: $left saga(s) left unfinished after the takeover" | tee -a "$OUT/$name.txt"
        [ "$left" = 0 ] || status=1
    fi
    {
        echo "Saga log      [status, owner, sagas]"
        replica_sagas | sed 's/^/              /'
    } | tee -a "$OUT/$name.txt"
    stop_all
    drop_replica_schema
done
echo "replicas: reports and JSON in $OUT/replicas-$flow-$broker-r*"
exit $status
