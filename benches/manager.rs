//! The memory manager's own cost: one check cycle against one snapshot, side by side.
//!
//! `cargo bench --bench manager`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use memtel::{MemoryManager, MemoryMonitor, Pressure};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn monitor() -> MemoryMonitor {
    // Fresh reads every call, as the manager's once-a-second check gets them.
    MemoryMonitor::builder()
        .cache_window(Duration::ZERO)
        .jemalloc_max_age(Duration::ZERO)
        .build()
}

fn manager_cycle(c: &mut Criterion) {
    // jemalloc's epoch costs more with more arenas in use, and criterion's own threads
    // add arenas after the first benchmark: put them in use first, so both functions
    // are measured in the same allocator state.
    for _ in 0..8 {
        std::thread::spawn(|| drop(std::hint::black_box(vec![0u8; 1 << 16])))
            .join()
            .unwrap();
    }
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| drop(std::hint::black_box(vec![0u8; 1 << 16])));
        }
    });
    let mut group = c.benchmark_group("manager");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));

    let snapshot_monitor = monitor();
    group.bench_function("snapshot", |b| b.iter(|| snapshot_monitor.snapshot()));

    let mut manager =
        MemoryManager::new(monitor())
            .gc_trigger_bytes(u64::MAX)
            .on_pressure(Pressure::Warning, "noop", || async {});
    group.bench_function("check_cycle", |b| b.iter(|| manager.check()));
    group.finish();
}

criterion_group!(benches, manager_cycle);
criterion_main!(benches);
