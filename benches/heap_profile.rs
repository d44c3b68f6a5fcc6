//! Serving a heap profile with 10,000 live samples: the time to take it and render it as
//! pprof (symbolized), folded stacks and SVG, and the sizes.
//!
//! `cargo bench --bench heap_profile`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use memtel::alloc::TrackingAllocator;

#[global_allocator]
static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> =
    TrackingAllocator::new(tikv_jemallocator::Jemalloc).with_heap_profiling();

const LIVE: usize = 10_000;

/// 10,000 live allocations from 40 call sites in 4 components, each sampled (interval 1 B).
fn hold() -> Vec<Vec<u8>> {
    memtel::alloc::set_heap_sample_interval(1);
    let mut held = Vec::with_capacity(LIVE);
    for i in 0..LIVE {
        let component = memtel::component(["cache", "api", "browser", "extraction"][i % 4]);
        held.push(component.in_scope(|| site(i % 40, 64 + i % 1000)));
    }
    memtel::alloc::set_heap_sample_interval(512 << 10);
    held
}

#[inline(never)]
fn site(n: usize, size: usize) -> Vec<u8> {
    // Distinct stacks: recursion depth varies with the site.
    if n == 0 {
        black_box(vec![1u8; size])
    } else {
        black_box(site(n - 1, size))
    }
}

fn serve(c: &mut Criterion) {
    let held = hold();
    let profile = memtel::profile::heap_profile();
    let live: f64 = profile.samples.iter().map(|s| s.inuse_objects).sum();
    let pprof = profile.to_pprof();
    let folded = profile.to_folded();
    let svg = profile.to_svg().expect("svg");
    println!(
        "heap profile: {} stacks, {:.0} live objects estimated; pprof {} bytes (gzipped), folded {} bytes, svg {} bytes",
        profile.samples.len(),
        live,
        pprof.len(),
        folded.len(),
        svg.len()
    );
    let mut group = c.benchmark_group("heap_profile");
    group.measurement_time(Duration::from_secs(5)).sample_size(20);
    group.bench_function("take", |b| b.iter(memtel::profile::heap_profile));
    group.bench_function("take_and_pprof", |b| {
        b.iter(|| memtel::profile::heap_profile().to_pprof())
    });
    group.bench_function("take_and_svg", |b| b.iter(|| memtel::profile::heap_profile().to_svg()));
    group.finish();
    drop(held);
}

criterion_group!(benches, serve);
criterion_main!(benches);
