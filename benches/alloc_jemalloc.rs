//! The baseline: bare jemalloc as the global allocator, no attribution.
//!
//! Part of the allocator comparison; run all of it with `scripts/alloc-bench.sh`
//! (see `support/alloc_workloads.rs`).

#[path = "support/alloc_workloads.rs"]
mod workloads;

use workloads::{DomCorpus, NoScope};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const NAME: &str = "jemalloc";

fn main() {
    workloads::measure_memory(NAME, &NoScope, || None);
    let corpus = DomCorpus::generate();
    let mut c = workloads::criterion();
    workloads::bench_churn(&mut c, NAME, &NoScope);
    workloads::bench_realistic(&mut c, NAME, &NoScope);
    workloads::bench_dom(&mut c, NAME, &NoScope, &corpus);
    c.final_summary();
}
