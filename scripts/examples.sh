#!/usr/bin/env bash
# Runs the small examples and checks that each printed the outcome it exists to show.
set -euo pipefail
cd "$(dirname "$0")/.."

expect() {
    local output=$1 line=$2
    grep -qF -- "$line" <<<"$output" || { printf '%s\n' "$output"; echo "examples: expected '$line'" >&2; exit 1; }
}

out=$(cargo run -q -p sagaflow --example sync_flow)
expect "$out" "order-1: completed"
expect "$out" "order-2: released"
expect "$out" "order-2: compensated after Charge failed: over the card's limit"

out=$(cargo run -q -p sagaflow --example retry_policy)
expect "$out" "flaky-network attempt 3"
expect "$out" "  completed"
expect "$out" "  compensated: inventory: no product 999"

out=$(cargo run -q -p sagaflow-nats --example async_nats)
expect "$out" ": accepted"
expect "$out" ": Completed with [\""
out=$(cargo run -q -p trip)
expect "$out" "trip-ok: completed in"
expect "$out" "trip-no-hotel: compensated in"
expect "$out" "step 1 (BookHotel) failed: hotels refused the booking (fault switch on)"
expect "$out" "trip-no-payment: compensated in"

# The README's whole `main` of a service: started with the in-memory log on ports the system
# picks, it must report both ports, answer gRPC health and list its flows within the time
# allowed, then stop on SIGTERM. The upstream services need not run: its channels connect lazily.
root=$PWD tmp=$(mktemp -d)
service=
stop_service() {
    if [[ -n $service ]] && kill -0 "$service" 2>/dev/null; then
        kill "$service" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$service" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$service" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap stop_service EXIT
cargo build -q -p booking --example service
# `cargo run` replaces itself with the example on Unix, so $! is the service.
(cd "$tmp" && exec env OCH_PATH="$tmp" SAGAFLOW_LOG=memory SAGAFLOW_BROKER=memory \
    SAGAFLOW_GRPC_LISTEN=127.0.0.1:0 SAGAFLOW_HTTP_LISTEN=127.0.0.1:0 NO_COLOR=1 \
    cargo run -q --manifest-path "$root/Cargo.toml" -p booking --example service) >"$tmp/log" 2>&1 &
service=$!
grpc= http=
for _ in $(seq 300); do
    grpc=$(grep -o 'grpc_addr=[0-9.:]*' "$tmp/log" | head -1 | cut -d= -f2 || true)
    http=$(grep -o 'http_addr=[0-9.:]*' "$tmp/log" | head -1 | cut -d= -f2 || true)
    [[ -n $grpc && -n $http ]] && break
    kill -0 "$service" 2>/dev/null || break
    sleep 0.1
done
[[ -n $grpc && -n $http ]] || { cat "$tmp/log"; echo "examples: booking service did not report its ports within 30s" >&2; exit 1; }
expect "$(curl -sS -m 5 "http://$http/healthz")" "ok"
expect "$(curl -sS -m 5 "http://$http/api/flows")" '"facade":"AsyncBooking"'
# grpc.health.v1.Health/Check for the whole server: an empty request, SERVING (1) in the answer.
health=$(printf '\0\0\0\0\0' | curl -sS -m 5 --http2-prior-knowledge -H 'content-type: application/grpc' \
    -H 'te: trailers' --data-binary @- "http://$grpc/grpc.health.v1.Health/Check" | od -An -tx1 | tr -d ' \n')
expect "$health" "00000000020801"
stop_service
service=
trap - EXIT
echo "examples: passed"
