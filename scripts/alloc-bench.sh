#!/usr/bin/env bash
# The attribution allocators side by side, in one `cargo bench` invocation:
#   alloc_jemalloc        bare tikv-jemallocator (the baseline)
#   alloc_memtel          memtel::alloc::TrackingAllocator<Jemalloc>, work inside a component scope
#   alloc_tracking_crate  tracking-allocator 0.4's Allocator<Jemalloc>, work inside a group guard
#   span_layer            span enter/exit: registry() vs registry().with(memtel::ComponentLayer)
# then prints the ratios from criterion's medians (target/criterion/**/new/estimates.json) and
# the memory figures each allocator bench wrote (target/criterion/alloc-memory/*.json).
#
#   scripts/alloc-bench.sh [criterion args, e.g. a filter]
#
# Waits first (up to 20 min) while another benchmark runs on this machine; set
# ALLOC_BENCH_NO_WAIT=1 to skip that. Not run by CI: timings belong in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
crit_dir=${CRITERION_HOME:-${CARGO_TARGET_DIR:-target}/criterion}

benches=(--bench alloc_jemalloc --bench alloc_memtel --bench alloc_tracking_crate --bench span_layer)

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
cargo bench --no-run --quiet "${benches[@]}"
wait_for_quiet

stamp=$(date +%s)
cmd=(cargo bench "${benches[@]}" -- "$@")
echo "+ ${cmd[*]}"
"${cmd[@]}"

python3 - "$crit_dir" "$stamp" <<'PY'
import json, os, sys

crit_dir, stamp = sys.argv[1], float(sys.argv[2])
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

print()
for group in ("alloc/churn", "alloc/realistic"):
    m = medians.get(group, {})
    if not m:
        print(f"{group}: no fresh results")
        continue
    base, rival = m.get("jemalloc"), m.get("tracking_crate")
    print(f"{group}")
    print(f"  {'allocator':<16} {'median':>12} {'÷ jemalloc':>11} {'÷ tracking_crate':>17}")
    for name in ("jemalloc", "memtel", "memtel_noscope", "tracking_crate"):
        if name not in m:
            continue
        r1 = f"{m[name] / base:.3f}×" if base else "-"
        r2 = f"{m[name] / rival:.3f}×" if rival else "-"
        print(f"  {name:<16} {human(m[name]):>12} {r1:>11} {r2:>17}")
    if "memtel" in m and base:
        verdict(f"{group} memtel ÷ jemalloc ≤ 1.10", m["memtel"] / base <= 1.10, f"{m['memtel'] / base:.3f}×")
    if "memtel" in m and rival:
        verdict(f"{group} memtel faster than tracking_crate", m["memtel"] < rival, f"{m['memtel'] / rival:.3f}×")
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

mem = {}
mem_dir = os.path.join(crit_dir, "alloc-memory")
if os.path.isdir(mem_dir):
    for f in sorted(os.listdir(mem_dir)):
        path = os.path.join(mem_dir, f)
        if f.endswith(".json") and fresh(path):
            d = json.load(open(path))
            mem[d["allocator"]] = d
if mem:
    mib = lambda v: f"{v / 2**20:.2f} MiB"
    base = mem.get("jemalloc")
    recs = next(iter(mem.values()))["records"]
    print(f"memory: a realistic data set of {recs} records kept (deltas of jemalloc stats, epoch advanced)")
    print(f"  {'allocator':<16} {'allocated':>12} {'resident':>12} {'tracked':>12} {'allocated ÷':>12} {'resident ÷':>11}")
    for name in ("jemalloc", "memtel", "tracking_crate"):
        if name not in mem:
            continue
        d = mem[name]
        ra = f"{d['allocated_delta'] / base['allocated_delta']:.4f}×" if base else "-"
        rr = f"{d['resident_delta'] / base['resident_delta']:.4f}×" if base else "-"
        tracked = mib(d["tracked_delta"]) if d.get("tracked_delta") is not None else "-"
        print(f"  {name:<16} {mib(d['allocated_delta']):>12} {mib(d['resident_delta']):>12} {tracked:>12} {ra:>12} {rr:>11}")
    if base and "memtel" in mem:
        extra = mem["memtel"]["resident_delta"] / base["resident_delta"] - 1
        verdict("memtel extra resident from tags ≤ 3%", extra <= 0.03, f"{extra * 100:+.2f}%")
    print()
else:
    print("memory: no fresh figures\n")

print("targets")
print("\n".join(verdicts) if verdicts else "  (no results)")
PY
