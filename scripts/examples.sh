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
echo "examples: passed"
