//! Rendering one snapshot for `/metrics` (Prometheus text and OpenMetrics) against
//! rendering the same snapshot as the profile JSON, at 8 and 64 reported components.
//!
//! `cargo bench --bench prometheus`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use memtel::{MemoryMonitor, MemoryProfile};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn monitor(components: usize) -> MemoryMonitor {
    let monitor = MemoryMonitor::builder().build();
    for i in 0..components {
        monitor
            .component(&format!("component{i:02}"), move || (i as u64 + 1) << 20)
            .expect("component");
    }
    monitor
}

fn render(c: &mut Criterion) {
    let mut group = c.benchmark_group("render");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for components in [8, 64] {
        let snap = monitor(components).snapshot();
        let text = memtel::render_prometheus(&snap, false).expect("text");
        println!(
            "{components} components: exposition {} bytes, {} series",
            text.len(),
            text.lines().filter(|l| !l.starts_with('#')).count()
        );
        group.bench_function(format!("prometheus_text/{components}"), |b| {
            b.iter(|| memtel::render_prometheus(&snap, false).expect("text"))
        });
        group.bench_function(format!("openmetrics/{components}"), |b| {
            b.iter(|| memtel::render_prometheus(&snap, true).expect("text"))
        });
        group.bench_function(format!("profile_json/{components}"), |b| {
            b.iter(|| serde_json::to_vec(&MemoryProfile::from_snapshot(&snap)).expect("json"))
        });
    }
    group.finish();
}

criterion_group!(benches, render);
criterion_main!(benches);
