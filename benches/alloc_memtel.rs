//! memtel's `TrackingAllocator<Jemalloc>` doing attribution: every workload runs inside a
//! memtel component scope (each realistic worker thread enters it itself).
//!
//! Also `memtel_noscope`: the same allocator with no component entered, to tell the
//! allocator's own cost from the scope's. Part of the allocator comparison; run all of it
//! with `scripts/alloc-bench.sh` (see `support/alloc_workloads.rs`).

#[path = "support/alloc_workloads.rs"]
mod workloads;

use memtel::alloc::TrackingAllocator;
use workloads::{DomCorpus, InComponent, NoScope};

#[global_allocator]
static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> = TrackingAllocator::new(tikv_jemallocator::Jemalloc);

const NAME: &str = "memtel";

fn main() {
    let scope = InComponent(memtel::component("workload"));
    workloads::measure_memory(NAME, &scope, || Some(scope.0.live_bytes()));
    assert!(
        memtel::alloc::tracking_installed(),
        "the tracking allocator is not installed"
    );

    let corpus = DomCorpus::generate();
    let mut c = workloads::criterion();
    workloads::bench_churn(&mut c, NAME, &scope);
    workloads::bench_churn(&mut c, "memtel_noscope", &NoScope);
    workloads::bench_realistic(&mut c, NAME, &scope);
    workloads::bench_realistic(&mut c, "memtel_noscope", &NoScope);
    workloads::bench_dom(&mut c, NAME, &scope, &corpus);
    workloads::bench_dom(&mut c, "memtel_noscope", &NoScope, &corpus);
    // 0 means every allocation carried a tag (the reservation was refused, as under
    // valgrind): the figures above would then not measure placement.
    eprintln!("placement: {} component arena(s)", memtel::alloc::component_arenas());
    eprintln!(
        "attribution: component `workload` allocated {} bytes in all, {} live",
        scope.0.allocated_bytes(),
        scope.0.live_bytes()
    );
    c.final_summary();
}
