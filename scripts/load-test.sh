#!/usr/bin/env bash
# Requests per second of memtel's routes vs the bare GET /healthz of the same release
# binary, measured with wrk in alternating rounds. Prints a table and the ratios.
#
#   scripts/load-test.sh [seconds per round, default 10] [rounds, default 3]
#   ROUTES="/metrics /memory" scripts/load-test.sh 5 3      # other routes
#   RATE_LIMIT=1000000 scripts/load-test.sh                 # the rate limiter on, never refusing
#   GZIP=1 ROUTES=/metrics scripts/load-test.sh             # as Prometheus and browsers ask
#
# ROUTES defaults to the profile. RATE_LIMIT (default 0, off) is passed as --rate-limit.
# GZIP=1 sends `Accept-Encoding: gzip` on every request (both routes), as Prometheus's
# scrapes and browsers do; without it the bodies go uncompressed.
#
# Installs wrk from Debian's packages when it is missing. Not run by CI: timings belong
# in BENCHMARKS.md, not in tests.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}

if ! command -v wrk >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet --bin memtel
bin="${CARGO_TARGET_DIR:-target}/release/memtel"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
OTEL_METRICS_EXPORTER=none OTEL_TRACES_EXPORTER=none RUST_LOG=warn "$bin" --listen "127.0.0.1:$port" --rate-limit "${RATE_LIMIT:-0}" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done

encoding=()
[ -n "${GZIP:-}" ] && encoding=(-H "Accept-Encoding: gzip")
rps() { wrk -t1 -c32 -d"${secs}s" --latency "${encoding[@]}" "http://127.0.0.1:$port$1" | awk '/Requests\/sec/ {print $2}'; }

routes=${ROUTES:-/api/v1/memory/profile}
for route in $routes; do
  echo "route $route (rate limit ${RATE_LIMIT:-0}${GZIP:+, gzip})"
  echo "round  healthz_rps  route_rps  ratio"
  sum=0
  for r in $(seq "$rounds"); do
    h=$(rps /healthz)
    p=$(rps "$route")
    ratio=$(python3 -c "print(f'{$p/$h:.3f}')")
    echo "$r      $h     $p     $ratio"
    sum=$(python3 -c "print($sum+$ratio)")
  done
  python3 -c "print(f'mean $route/healthz ratio over $rounds rounds: {$sum/$rounds:.3f}')"
done
