#!/usr/bin/env bash
# Runs every test: starts the services they need, installs the Python client,
# runs the Rust tests (nextest, then doctests) and the Python end-to-end check.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh
bash scripts/install-browser.sh

cache=${SAGAFLOW_CACHE:-$HOME/.cache/sagaflow}
venv="$cache/pyvenv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r examples/booking/tests/python/requirements.txt

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi
cargo test --workspace --doc
bash scripts/examples.sh

# From outside Rust: the booking service as its own process, called by grpcio.
cargo build --bin booking
bin="${CARGO_TARGET_DIR:-target}/debug/booking"
ports=$("$venv/bin/python" - <<'PY'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)
read -r grpc order payment http <<<"$ports"
config=$(mktemp --suffix=.yaml)
log=$(mktemp --suffix=.log)
data=$(mktemp -d)
cat >"$config" <<YAML
saga_log: embedded
saga_log_url: $data
grpc_listen: 127.0.0.1:$grpc
http_listen: 127.0.0.1:$http
upstream:
  order_addr: 127.0.0.1:$order
  payment_addr: 127.0.0.1:$payment
YAML
"$bin" --config "$config" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$config" "$data"' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$grpc") 2>/dev/null && break
    kill -0 $pid 2>/dev/null || { cat "$log"; echo "booking exited early" >&2; exit 1; }
    sleep 0.2
done
if ! "$venv/bin/python" examples/booking/tests/python/test_booking.py --target "127.0.0.1:$grpc"; then
    echo "--- booking log" >&2
    cat "$log" >&2
    exit 1
fi
kill -TERM $pid
wait $pid
echo "booking stopped cleanly on SIGTERM"
