#!/usr/bin/env bash
# The heap profiler's cost: sampling every 512 KiB ÷ sampling off, on the allocator workloads.
#
# Each round is one process of the `alloc_profiled` bench running both variants of each
# workload (off, then 512 KiB), so the ratio is taken within one address-space layout:
# across processes the same variant moves by more than the effect measured (load addresses
# shift the unwinder's and jemalloc's cache behaviour). The variant measured second runs on
# the heap and caches the first left behind, so rounds alternate which goes first (odd
# rounds sampling off first, even rounds 512 KiB first: PROFILED_BENCH_REVERSE). Prints
# each round's ratio and order, and the median over rounds. Measures the process's CPU
# time (ALLOC_BENCH_CLOCK=wall for elapsed).
#
#   scripts/profiled-bench.sh [rounds, default 8] [workloads, default "churn realistic dom"]
#   RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=target-fp scripts/profiled-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-8}
workloads=${2:-churn realistic dom}
crit_dir=${CRITERION_HOME:-${CARGO_TARGET_DIR:-target}/criterion}
export CRITERION_HOME=$crit_dir

cargo bench --no-run --quiet --bench alloc_profiled
bin=$(cargo bench --no-run --bench alloc_profiled --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "alloc_profiled" and m.get("executable"):
        print(m["executable"])')

for workload in $workloads; do
  ratios=()
  for round in $(seq "$rounds"); do
    if ((round % 2 == 0)); then order="512 KiB first"; export PROFILED_BENCH_REVERSE=1
    else order="off first"; unset PROFILED_BENCH_REVERSE; fi
    "$bin" --bench "^alloc/$workload/(profiled_off|profiled_512k)\$" >/dev/null 2>&1
    ratio=$(python3 - "$crit_dir" "$workload" <<'PY'
import json, sys
d = f"{sys.argv[1]}/alloc_{sys.argv[2]}"
m = lambda f: json.load(open(f"{d}/{f}/new/estimates.json"))["median"]["point_estimate"]
print(f"{m('profiled_512k') / m('profiled_off'):.4f}")
PY
)
    echo "alloc/$workload round $round ($order): 512 KiB ÷ off $ratio"
    ratios+=("$ratio")
  done
  python3 -c 'import sys, statistics
r = sorted(map(float, sys.argv[2:]))
print(f"alloc/{sys.argv[1]}: median {statistics.median(r):.3f}x over {len(r)} rounds ({r[0]:.3f}-{r[-1]:.3f})")' "$workload" "${ratios[@]}"
done
