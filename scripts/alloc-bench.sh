#!/usr/bin/env bash
# The attribution allocators side by side:
#   alloc_jemalloc        bare tikv-jemallocator (the baseline)
#   alloc_memtel          memtel::alloc::TrackingAllocator<Jemalloc>, work inside a component scope
#   alloc_tracking_crate  tracking-allocator 0.4's Allocator<Jemalloc>, work inside a group guard
#   span_layer            span enter/exit: registry() vs registry().with(memtel::ComponentLayer)
#
# The machine is shared and its speed drifts over minutes, so the three allocator benches run
# in ROUNDS interleaved rounds (default 5, the order rotating each round), and each target is
# judged on the median over rounds of the per-round ratio of criterion medians. span_layer
# runs once, after them. Then it prints the memory figures each allocator bench wrote
# (target/criterion/alloc-memory/*.json).
#
# The benches measure the process's CPU time, all threads (benches/support/bench_clock.rs):
# on a shared machine it spreads far less than elapsed time. ALLOC_BENCH_CLOCK=wall
# measures elapsed time instead.
#
# Workloads (criterion groups): alloc/churn, alloc/realistic, alloc/dom (API-like JSON
# documents parsed into serde_json::Value and serialized back on 2 threads).
#
#   scripts/alloc-bench.sh [criterion args, e.g. a filter]
#   ROUNDS=3 scripts/alloc-bench.sh
#   ROUNDS=3 scripts/alloc-bench.sh alloc/dom     # one workload (the memory figures still run)
#
# Waits first (up to 20 min) while another benchmark runs on this machine; set
# ALLOC_BENCH_NO_WAIT=1 to skip that. Not run by CI: timings belong in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
crit_dir=${CRITERION_HOME:-${CARGO_TARGET_DIR:-target}/criterion}

allocators=(alloc_jemalloc alloc_memtel alloc_tracking_crate)
rounds=${ROUNDS:-5}

# Neither compile nor measure while another benchmark runs (2 shared cores).
wait_for_quiet() {
  [ -n "${ALLOC_BENCH_NO_WAIT:-}" ] && return 0
  for _ in $(seq 40); do
    pgrep -fa 'target/release/deps/.*--bench' >/dev/null || return 0
    echo "another benchmark is running; waiting 30 s" >&2
    sleep 30
  done
  echo "still busy after 20 min; running anyway" >&2
}

wait_for_quiet
cargo bench --no-run --quiet "${allocators[@]/#/--bench=}" --bench span_layer
wait_for_quiet

stamp=$(date +%s)
rounds_file=$(mktemp)
trap 'rm -f "$rounds_file"' EXIT
# Criterion medians of the allocator groups, as one JSON line per round.
collect_round() {
  python3 - "$crit_dir" "$1" "$2" >>"$rounds_file" <<'PY'
import json, os, sys
crit_dir, since, round_no = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
medians = {}
for root, _dirs, files in os.walk(crit_dir):
    if os.path.basename(root) != "new" or "benchmark.json" not in files or "estimates.json" not in files:
        continue
    est = os.path.join(root, "estimates.json")
    if os.path.getmtime(est) < since - 1:
        continue
    bench = json.load(open(os.path.join(root, "benchmark.json")))
    if not bench["group_id"].startswith("alloc/"):
        continue
    median = json.load(open(est))["median"]["point_estimate"]
    medians.setdefault(bench["group_id"], {})[bench.get("function_id") or bench["full_id"]] = median
memory = {}
mem_dir = os.path.join(crit_dir, "alloc-memory")
if os.path.isdir(mem_dir):
    for f in os.listdir(mem_dir):
        path = os.path.join(mem_dir, f)
        if f.endswith(".json") and os.path.getmtime(path) >= since - 1:
            d = json.load(open(path))
            memory[d["allocator"]] = d
print(json.dumps({"round": round_no, "medians": medians, "memory": memory}))
PY
}

for round in $(seq "$rounds"); do
  # Rotate the order so no allocator always runs first or last.
  order=("${allocators[@]:$(((round - 1) % 3))}" "${allocators[@]:0:$(((round - 1) % 3))}")
  round_start=$(date +%s)
  for bench in "${order[@]}"; do
    cmd=(cargo bench --quiet --bench "$bench" -- "$@")
    echo "+ round $round/$rounds: ${cmd[*]}"
    "${cmd[@]}"
  done
  collect_round "$round_start" "$round"
done
span_start=$(date +%s)
cmd=(cargo bench --quiet --bench span_layer -- "$@")
echo "+ ${cmd[*]}"
"${cmd[@]}"

python3 - "$crit_dir" "$stamp" "$rounds_file" "$span_start" <<'PY'
import json, os, sys

crit_dir, stamp, rounds_file, span_start = sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
fresh = lambda path: os.path.getmtime(path) >= stamp - 1

medians = {}  # group -> function -> median ns
for root, _dirs, files in os.walk(crit_dir):
    if os.path.basename(root) != "new" or "benchmark.json" not in files or "estimates.json" not in files:
        continue
    est = os.path.join(root, "estimates.json")
    if not fresh(est):
        continue
    bench = json.load(open(os.path.join(root, "benchmark.json")))
    median = json.load(open(est))["median"]["point_estimate"]
    medians.setdefault(bench["group_id"], {})[bench.get("function_id") or bench["full_id"]] = median

def human(ns):
    for unit, scale in (("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3f} {unit}"
    return f"{ns:.2f} ns"

verdicts = []
def verdict(what, ok, detail):
    verdicts.append(f"  {'PASS' if ok else 'MISS'}  {what}: {detail}")

rounds = [json.loads(line) for line in open(rounds_file) if line.strip()]

def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2

print()
# memtel ÷ jemalloc bars: every allocator workload, the DOM-heavy one included, ≤ 1.05×.
bars = {"alloc/churn": 1.05, "alloc/realistic": 1.05, "alloc/dom": 1.05}
for group in bars:
    per_round = [r["medians"].get(group, {}) for r in rounds]
    per_round = [m for m in per_round if m]
    if not per_round:
        print(f"{group}: no fresh results")
        continue
    names = [n for n in ("jemalloc", "memtel", "memtel_noscope", "tracking_crate") if any(n in m for m in per_round)]
    print(f"{group}: {len(per_round)} rounds; criterion median per round, then the median over rounds of")
    print("  each round's ratio (min–max over rounds)")
    print(f"  {'allocator':<16} {'median of medians':>18} {'÷ jemalloc':>24} {'÷ tracking_crate':>24}")
    ratio = {}
    for name in names:
        times = [m[name] for m in per_round if name in m]
        cells = []
        for base in ("jemalloc", "tracking_crate"):
            rs = [m[name] / m[base] for m in per_round if name in m and base in m]
            ratio[(name, base)] = median(rs) if rs else None
            cells.append(f"{median(rs):.3f}× ({min(rs):.2f}–{max(rs):.2f})" if rs else "-")
        print(f"  {name:<16} {human(median(times)):>18} {cells[0]:>24} {cells[1]:>24}")
    print("  per round (µs or ms as above): " + "; ".join(
        ", ".join(f"{n} {human(m[n])}" for n in names if n in m) for m in per_round))
    r = ratio.get(("memtel", "jemalloc"))
    if r is not None:
        verdict(f"{group} memtel ÷ jemalloc ≤ {bars[group]:.2f} (median of {len(per_round)} rounds)", r <= bars[group],
                f"{r:.3f}×")
    r = ratio.get(("memtel", "tracking_crate"))
    if r is not None:
        verdict(f"{group} memtel faster than tracking_crate (median of {len(per_round)} rounds)", r < 1, f"{r:.3f}×")
    print()

m = medians.get("span/enter_exit", {})
if m:
    print("span/enter_exit (one enter + exit of a pre-created span, both under TrackingAllocator<Jemalloc>)")
    print(f"  {'variant':<20} {'median':>12}")
    for name in sorted(m):
        print(f"  {name:<20} {human(m[name]):>12}")
    for kind in ("plain", "component"):
        a, b = m.get(f"layer/{kind}"), m.get(f"registry/{kind}")
        if a is not None and b is not None:
            verdict(f"span {kind}: ComponentLayer adds ≤ 50 ns per pair", a - b <= 50, f"{a - b:+.1f} ns ({human(a)} vs {human(b)})")
    print()
else:
    print("span/enter_exit: no fresh results\n")

# Memory figures: each allocator bench measures its data set once per round.
mem_rounds = [r.get("memory", {}) for r in rounds]
mem_rounds = [m for m in mem_rounds if m]
if mem_rounds:
    mib = lambda v: f"{v / 2**20:.2f} MiB"
    recs = next(iter(mem_rounds[0].values()))["records"]
    print(f"memory: a realistic data set of {recs} records kept (deltas of jemalloc stats, epoch advanced),")
    print(f"  median over {len(mem_rounds)} rounds of each figure, and of each round's ratio (min–max)")
    print(f"  {'allocator':<16} {'allocated':>12} {'resident':>12} {'tracked':>12} {'allocated ÷':>22} {'resident ÷':>22}")
    extra = None
    for name in ("jemalloc", "memtel", "tracking_crate"):
        ds = [m[name] for m in mem_rounds if name in m]
        if not ds:
            continue
        cells = []
        for key in ("allocated_delta", "resident_delta"):
            rs = [m[name][key] / m["jemalloc"][key] for m in mem_rounds if name in m and "jemalloc" in m]
            cells.append(f"{median(rs):.4f}× ({min(rs):.3f}–{max(rs):.3f})" if rs else "-")
            if name == "memtel" and key == "resident_delta" and rs:
                extra = median(rs) - 1
        tracked = [d["tracked_delta"] for d in ds if d.get("tracked_delta") is not None]
        print(f"  {name:<16} {mib(median([d['allocated_delta'] for d in ds])):>12} "
              f"{mib(median([d['resident_delta'] for d in ds])):>12} "
              f"{mib(median(tracked)) if tracked else '-':>12} {cells[0]:>22} {cells[1]:>22}")
    if extra is not None:
        verdict(f"memtel extra resident from tags ≤ 3% (median of {len(mem_rounds)} rounds)", extra <= 0.03, f"{extra * 100:+.2f}%")
    # The same data set 1.5 s later, still held: freed pages have had their decay.
    settled = [m["memtel"]["resident_settled_delta"] / m["jemalloc"]["resident_settled_delta"]
               for m in mem_rounds if "memtel" in m and "jemalloc" in m
               and m["jemalloc"].get("resident_settled_delta") and "resident_settled_delta" in m["memtel"]]
    if settled:
        print(f"  resident 1.5 s later, memtel ÷ jemalloc: {median(settled):.4f}× ({min(settled):.3f}–{max(settled):.3f})")
        verdict(f"memtel extra resident 1.5 s later ≤ 3% (median of {len(settled)} rounds)", median(settled) - 1 <= 0.03, f"{(median(settled) - 1) * 100:+.2f}%")
    print()
else:
    print("memory: no fresh figures\n")

print("targets")
print("\n".join(verdicts) if verdicts else "  (no results)")
PY
