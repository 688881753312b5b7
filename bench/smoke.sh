#!/usr/bin/env bash
# CI smoke check of sagaflow-bench: builds the debug binaries, starts the booking demo on free
# ports (default broker and saga log, the log in a temporary directory), runs each flow (sync, async with its callbacks, throttling) at a low rate for a few
# seconds with some FaultInject, then a short --compare, and asserts 100% success from the JSON.
# Debug binaries: CI has built most of the debug dependencies for the tests already.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

build "${BENCH_PROFILE:-debug}"
dir=$(mktemp -d)
trap 'stop_all; rm -rf "$dir"' EXIT

read -r grpc http order payment <<<"$(free_ports 4)"
cat >"$dir/app.yaml" <<YAML
grpc_listen: 127.0.0.1:$grpc
http_listen: 127.0.0.1:$http
saga_log_url: $dir/data
upstream:
  in_process: true
  order_addr: 127.0.0.1:$order
  payment_addr: 127.0.0.1:$payment
YAML
start "$dir/booking.log" "$BIN/booking" --config "$dir/app.yaml" all
booking=$LAST_PID
wait_port "$grpc" "$booking" "$dir/booking.log"

bench=("$BIN/sagaflow-bench" --target "127.0.0.1:$grpc" --order "127.0.0.1:$order" --payment "127.0.0.1:$payment"
    --wait 10s --progress-interval 1s --watch-pid "booking=$booking")
failed=0
check() { # check NAME JSON-EXPR-FOR-THE-SUCCESS-RATIOS
    local name=$1 ratios
    ratios=$(json_get "$dir/$name.json" "$2")
    if [ "$ratios" = "ok" ]; then
        echo "smoke: $name: 100% success"
    else
        echo "smoke: $name: FAILED ($ratios)" >&2
        failed=1
    fi
}
for flow in sync async throttling; do
    echo "== $flow"
    "${bench[@]}" --flow "$flow" --rate 30 --duration 3s --fault-rate 0.1 --json "$dir/$flow.json" \
        --plot "$dir/$flow.png" --upstream-snapshot
    check "$flow" '"ok" if j["success"] == 1.0 and j["requests"] == 90 else j["status_codes"]'
done
echo "== compare (closed loop, 4 in flight)"
"${bench[@]}" --flow sync --rate max --max-in-flight 4 --duration 1s --compare --json "$dir/compare.json"
check compare '"ok" if j["direct"]["success"] == 1.0 and j["flow"]["success"] == 1.0 and j["throughput_ratio"] > 0 else j'

if [ "$failed" != 0 ]; then
    echo "--- booking log" >&2
    tail -50 "$dir/booking.log" >&2
    exit 1
fi
echo "smoke: sagaflow-bench passed"
