# shellcheck shell=bash
# Shared by the bench scripts: where the binaries are, free ports, and the processes a script
# starts (all stopped on exit, whatever the exit). Source it; do not run it.
#
# Environment: BENCH_BIN_DIR (prebuilt binaries), BENCH_OUT (output directory), RUST_LOG (the
# orchestrator's and proxy's log filter, default warn), ORCHESTRATOR_ENV (extra NAME=VALUE words
# for the orchestrator's environment, e.g. TOKIO_WORKER_THREADS=1), BENCH_KEEP_LOGS=1 (scripts
# that call keep_logs copy the stacks' logs to $OUT/logs/), ORCHESTRATOR_WRAP (words run before the
# orchestrator, e.g. a valgrind command line), BIN_ORCHESTRATOR (another orchestrator binary),
# START_TIMEOUT (seconds a process may take to listen, default 30).

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
OUT=${BENCH_OUT:-$BENCH_DIR/out}
STARTED=()

# Builds booking and sagaflow-bench (release or debug) and sets BIN to their directory.
# BENCH_BIN_DIR=DIR uses binaries already built there instead.
build() {
    local profile=$1
    if [ -n "${BENCH_BIN_DIR:-}" ]; then
        BIN=$BENCH_BIN_DIR
    else
        local target=${CARGO_TARGET_DIR:-target}
        case $target in /*) ;; *) target=$ROOT/$target ;; esac
        if [ "$profile" = release ]; then
            (cd "$ROOT" && cargo build --release --workspace --bins)
            BIN=$target/release
        else
            (cd "$ROOT" && cargo build --workspace --bins)
            BIN=$target/debug
        fi
    fi
    for exe in booking sagaflow-bench; do
        [ -x "$BIN/$exe" ] || { echo "no $BIN/$exe" >&2; exit 1; }
    done
}

# Prints N free loopback TCP ports.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# start LOG CMD...: runs CMD in the background, its output in LOG; sets LAST_PID.
start() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    LAST_PID=$!
    STARTED+=("$LAST_PID")
}

# wait_port PORT PID LOG: until PORT accepts connections; fails if PID exits first or after
# START_TIMEOUT seconds (default 30).
wait_port() {
    local port=$1 pid=$2 log=$3
    for _ in $(seq $((${START_TIMEOUT:-30} * 5))); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "process $pid exited before listening on $port:" >&2
            tail -20 "$log" >&2
            return 1
        fi
        sleep 0.2
    done
    echo "nothing listens on $port after ${START_TIMEOUT:-30} s" >&2
    return 1
}

# Stops every process started here: SIGTERM, then SIGKILL after 10 s.
# keep_logs DIR: with BENCH_KEEP_LOGS=1, copies the stacks' logs under DIR to $OUT/logs/ (for a
# look at what the orchestrator said during a run: RUST_LOG=sagaflow_redb=debug,warn, say).
keep_logs() {
    [ "${BENCH_KEEP_LOGS:-}" = 1 ] || return 0
    mkdir -p "$OUT/logs"
    find "$1" -name '*.log' -exec sh -c 'for f; do cp "$f" "$0/$(basename "$(dirname "$f")")-$(basename "$f")"; done' "$OUT/logs" {} + 2>/dev/null || true
}

stop_all() {
    local pid
    for pid in "${STARTED[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    STARTED=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# The machine, for the top of a report.
machine() {
    echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')," \
        "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'))," \
        "load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

# json_get FILE EXPR: evaluates a Python expression over the JSON document `j`.
json_get() {
    python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# start_stack DIR BROKER LOG [MOCK FLAGS...]: the OrderService and PaymentService mocks (with the
# given `booking order` flags, e.g. --latency-ms 40 --capacity 12) and an orchestrator, each its own
# process on free ports (start_mocks, then start_orchestrator). Sets GRPC, ORDER, PAYMENT (ports)
# and ORCHESTRATOR_PID, ORDER_PID, PAYMENT_PID.
start_stack() {
    local dir=$1 broker=$2 log=$3
    shift 3
    start_mocks "$dir" "$@" || return 1
    start_orchestrator "$dir" "$broker" "$log" || return 1
}

# start_mocks DIR [MOCK FLAGS...]: the OrderService and PaymentService mocks on free ports.
# Sets ORDER, PAYMENT, ORDER_PID, PAYMENT_PID.
start_mocks() {
    local dir=$1
    shift
    mkdir -p "$dir"
    read -r ORDER PAYMENT <<<"$(free_ports 2)"
    start "$dir/order.log" "$BIN/booking" order --listen "127.0.0.1:$ORDER" "$@"
    ORDER_PID=$LAST_PID
    start "$dir/payment.log" "$BIN/booking" payment --listen "127.0.0.1:$PAYMENT" "$@"
    PAYMENT_PID=$LAST_PID
    wait_port "$ORDER" "$ORDER_PID" "$dir/order.log" || return 1
    wait_port "$PAYMENT" "$PAYMENT_PID" "$dir/payment.log" || return 1
}

# start_orchestrator DIR BROKER LOG: an orchestrator on the mocks at ORDER and PAYMENT, on free
# ports, with a fresh topic prefix, pod id and saga log (embedded: under DIR; postgres: a fresh
# schema), so runs never see each other's messages or sagas. CONSUMERS, when set, is the consumer
# count of each throttling topic; STACK_YAML is appended to its config. Sets GRPC and
# ORCHESTRATOR_PID.
start_orchestrator() {
    local dir=$1 broker=$2 log=$3 http id
    mkdir -p "$dir"
    read -r GRPC http <<<"$(free_ports 2)"
    id="bench$(date +%s)$RANDOM"
    {
        echo "pod_id: $id"
        echo "grpc_listen: 127.0.0.1:$GRPC"
        echo "http_listen: 127.0.0.1:$http"
        echo "broker: $broker"
        echo "saga_log: $log"
        case $log in
            embedded) echo "saga_log_url: $dir/data" ;;
            postgres) echo "saga_log_schema: $id" ;;
        esac
        echo "upstream: { in_process: false, order_addr: 127.0.0.1:$ORDER, payment_addr: 127.0.0.1:$PAYMENT }"
        echo "message_queue:"
        echo "  topic_prefix: $id"
        if [ -n "${CONSUMERS:-}" ]; then
            echo "  topics:"
            for topic in CreateOrder CreatePayment rollback; do
                echo "    - { id: ThrottlingBooking.$topic, is_throttling: true, concurrency: $CONSUMERS }"
            done
        fi
        echo "${STACK_YAML:-}"
    } >"$dir/app.yaml"
    # shellcheck disable=SC2086 # ORCHESTRATOR_WRAP and ORCHESTRATOR_ENV are lists of words
    start "$dir/orchestrator.log" env RUST_LOG="${RUST_LOG:-warn}" ${ORCHESTRATOR_ENV:-} ${ORCHESTRATOR_WRAP:-} \
        "${BIN_ORCHESTRATOR:-$BIN/booking}" --config "$dir/app.yaml" orchestrator
    ORCHESTRATOR_PID=$LAST_PID
    wait_port "$GRPC" "$ORCHESTRATOR_PID" "$dir/orchestrator.log" || return 1
}

# start_proxy DIR: the do-nothing benchmark proxy (`booking proxy`) on the mocks at ORDER and
# PAYMENT, on a free port. Sets PROXY (port) and PROXY_PID. PROXY_WRAP and BIN_PROXY are to the
# proxy what ORCHESTRATOR_WRAP and BIN_ORCHESTRATOR are to the orchestrator.
start_proxy() {
    local dir=$1
    mkdir -p "$dir"
    read -r PROXY <<<"$(free_ports 1)"
    # shellcheck disable=SC2086 # PROXY_WRAP is a list of words
    start "$dir/proxy.log" env RUST_LOG="${RUST_LOG:-warn}" ${PROXY_WRAP:-} "${BIN_PROXY:-$BIN/booking}" proxy \
        --listen "127.0.0.1:$PROXY" --order "127.0.0.1:$ORDER" --payment "127.0.0.1:$PAYMENT"
    PROXY_PID=$LAST_PID
    wait_port "$PROXY" "$PROXY_PID" "$dir/proxy.log" || return 1
}

# start_replicas DIR N BROKER: N orchestrators (`booking orchestrator`) sharing one app.yaml, one
# topic prefix on BROKER (nats or rabbitmq) and one PostgreSQL saga log (a fresh schema on
# SAGA_LOG_URL, default the local `test` database), told apart only by their environment:
# POD_ID=<id>-0 .. <id>-(N-1) and their listen addresses (SAGAFLOW_GRPC_LISTEN,
# SAGAFLOW_HTTP_LISTEN), as a StatefulSet's pods would be. They call the mocks at ORDER and
# PAYMENT. The first starts alone (it creates the schema), then the others. CONSUMERS (per
# replica) and STACK_YAML as for start_orchestrator. Sets REPLICA_GRPC and REPLICA_PIDS (arrays,
# one entry per replica), TARGETS (their gRPC addresses, comma-separated, for --target),
# WATCH_REPLICAS (--watch-pid flags naming them), REPLICA_SCHEMA; drop_replica_schema removes it.
start_replicas() {
    local dir=$1 count=$2 broker=$3 id i grpc http
    case $broker in
        nats | rabbitmq) ;;
        *) echo "start_replicas: broker \`$broker\`: replicas share a broker, use nats or rabbitmq" >&2; return 1 ;;
    esac
    mkdir -p "$dir"
    id="replicas$(date +%s)$RANDOM"
    REPLICA_SCHEMA=$id
    {
        echo "broker: $broker"
        if [ "$broker" = rabbitmq ]; then echo "broker_queue_expiry_ms: 600000   # the run's queues go once it is over"; fi
        echo "saga_log: postgres"
        if [ -n "${SAGA_LOG_URL:-}" ]; then echo "saga_log_url: $SAGA_LOG_URL"; fi
        echo "saga_log_schema: $id"
        echo "upstream: { in_process: false, order_addr: 127.0.0.1:$ORDER, payment_addr: 127.0.0.1:$PAYMENT }"
        echo "message_queue:"
        echo "  topic_prefix: $id"
        if [ -n "${CONSUMERS:-}" ]; then
            echo "  topics:"
            for topic in CreateOrder CreatePayment rollback; do
                echo "    - { id: ThrottlingBooking.$topic, is_throttling: true, concurrency: $CONSUMERS }"
            done
        fi
        echo "${STACK_YAML:-}"
    } >"$dir/app.yaml"
    REPLICA_GRPC=()
    REPLICA_PIDS=()
    TARGETS=""
    WATCH_REPLICAS=()
    for i in $(seq 0 $((count - 1))); do
        read -r grpc http <<<"$(free_ports 2)"
        start "$dir/orchestrator-$i.log" env RUST_LOG="${RUST_LOG:-warn}" ${ORCHESTRATOR_ENV:-} POD_ID="$id-$i" \
            SAGAFLOW_GRPC_LISTEN="127.0.0.1:$grpc" SAGAFLOW_HTTP_LISTEN="127.0.0.1:$http" \
            "$BIN/booking" --config "$dir/app.yaml" orchestrator
        REPLICA_GRPC+=("$grpc")
        REPLICA_PIDS+=("$LAST_PID")
        TARGETS+="${TARGETS:+,}127.0.0.1:$grpc"
        WATCH_REPLICAS+=(--watch-pid "orchestrator-$i=$LAST_PID")
        if [ "$i" = 0 ]; then
            wait_port "$grpc" "$LAST_PID" "$dir/orchestrator-$i.log" || return 1
        fi
    done
    for i in $(seq 1 $((count - 1))); do
        wait_port "${REPLICA_GRPC[$i]}" "${REPLICA_PIDS[$i]}" "$dir/orchestrator-$i.log" || return 1
    done
}

# drop_replica_schema: drops the saga log schema start_replicas made (needs psql; best effort).
drop_replica_schema() {
    [ -n "${REPLICA_SCHEMA:-}" ] || return 0
    command -v psql >/dev/null || return 0
    psql "${SAGA_LOG_URL:-postgres://postgres@127.0.0.1:5432/test}" -qc "DROP SCHEMA IF EXISTS \"$REPLICA_SCHEMA\" CASCADE" \
        >/dev/null 2>&1 || true
    REPLICA_SCHEMA=""
}

# replica_sagas: the shared saga log's sagas by status and owner (the pod id that drove it; `-`
# for async sagas, which any replica drives), as `status owner count` lines (needs psql).
replica_sagas() {
    psql "${SAGA_LOG_URL:-postgres://postgres@127.0.0.1:5432/test}" -AF' ' -tc \
        "SELECT status, coalesce(owner, '-'), count(*) FROM \"$REPLICA_SCHEMA\".sagaflow_sagas GROUP BY 1, 2 ORDER BY 1, 2"
}
