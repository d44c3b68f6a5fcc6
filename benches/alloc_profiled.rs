//! The heap profiler's cost: `TrackingAllocator<Jemalloc>::with_heap_profiling()` on the
//! allocator workloads with sampling off (`profiled_off`) and sampling every 512 KiB on
//! average (`profiled_512k`), side by side in one run; compare `profiled_off` with
//! `alloc_memtel`'s `memtel` (an allocator without profiling) by instructions under
//! callgrind (see BENCHMARKS.md).
//!
//! `cargo bench --bench alloc_profiled`; with frame pointers (stacks walked, not unwound):
//! `RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=target-fp cargo bench --bench alloc_profiled`

#[path = "support/alloc_workloads.rs"]
mod workloads;

use memtel::alloc::TrackingAllocator;
use workloads::{DomCorpus, InComponent};

#[global_allocator]
static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> =
    TrackingAllocator::new(tikv_jemallocator::Jemalloc).with_heap_profiling();

fn main() {
    let scope = InComponent(memtel::component("workload"));
    let corpus = DomCorpus::generate();
    let mut c = workloads::criterion();
    // The variant measured second runs on a heap and caches the first one left behind:
    // `PROFILED_BENCH_REVERSE=1` measures sampling first, so that rounds of both orders
    // (scripts/profiled-bench.sh alternates them) cancel that out.
    if std::env::var_os("PROFILED_BENCH_REVERSE").is_some() {
        variant(&mut c, "profiled_512k", 512 << 10, &scope, &corpus);
        variant(&mut c, "profiled_off", 0, &scope, &corpus);
    } else {
        variant(&mut c, "profiled_off", 0, &scope, &corpus);
        variant(&mut c, "profiled_512k", 512 << 10, &scope, &corpus);
    }
    let samples: usize = memtel::profile::heap_profile().samples.len();
    eprintln!(
        "heap profile: {samples} sampled stacks, walked by {}",
        memtel::alloc::heap_profile_unwinder()
    );
    memtel::alloc::set_heap_sample_interval(0);
    c.final_summary();
}

/// Every workload with sampling at `interval` (0: off), as `name`.
fn variant(c: &mut workloads::Bench, name: &str, interval: u64, scope: &InComponent, corpus: &DomCorpus) {
    memtel::alloc::set_heap_sample_interval(interval);
    workloads::bench_churn(c, name, scope);
    workloads::bench_realistic(c, name, scope);
    workloads::bench_dom(c, name, scope, corpus);
}
