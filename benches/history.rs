//! The history's costs, side by side: recording one sample against taking one snapshot
//! (64 components), judging the trends, serving a 24 h history and a trends document; and
//! the history's memory when full at 64 components.
//!
//! `cargo bench --bench history`

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use memtel::history::{HistoryDocument, TrendsDocument};
use memtel::{History, HistoryConfig, MemoryMonitor};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const COMPONENTS: usize = 64;

/// A monitor of 64 reported components, snapshots fresh on every call, and its history
/// filled with 24 h of 10 s samples ending now.
fn full() -> (MemoryMonitor, History) {
    let history = History::new(HistoryConfig::default()).expect("history");
    let monitor = MemoryMonitor::builder()
        .cache_window(Duration::ZERO)
        .history(history.clone())
        .build();
    for i in 0..COMPONENTS {
        monitor
            .component(&format!("component{i:02}"), move || (i as u64 + 1) << 20)
            .expect("component");
    }
    let snap = monitor.snapshot();
    let now = SystemTime::now();
    for k in (0..8640u32).rev() {
        let mut s = (*snap).clone();
        s.taken_at = now - Duration::from_secs(10) * k;
        history.record(&s);
    }
    (monitor, history)
}

fn history(c: &mut Criterion) {
    let (monitor, history) = full();
    let heap = history.heap_bytes();
    let before = jemalloc_allocated();
    let (_, second) = full();
    let measured = jemalloc_allocated().saturating_sub(before);
    println!(
        "history memory, full (24 h at 10 s, {COMPONENTS} components): {:.2} MiB by its own count, \
         {:.2} MiB by jemalloc's stats.allocated (the monitor included)",
        heap as f64 / 1_048_576.0,
        measured as f64 / 1_048_576.0
    );
    drop(second);

    let samples = history.samples(Duration::from_secs(24 * 3600), None).expect("24 h");
    let body = serde_json::to_vec(&HistoryDocument::new(
        &history,
        Duration::from_secs(24 * 3600),
        &samples,
    ))
    .unwrap();
    let trends = history.trends(Duration::from_secs(3600)).expect("1 h");
    let trends_body = serde_json::to_vec(&TrendsDocument::new(&trends, &monitor.snapshot())).unwrap();
    println!(
        "24 h history document: {} samples, {} bytes; 1 h trends document: {} bytes",
        samples.samples.len(),
        body.len(),
        trends_body.len()
    );

    let mut group = c.benchmark_group("history");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("snapshot", |b| b.iter(|| monitor.snapshot()));
    let snap = monitor.snapshot();
    group.bench_function("record", |b| b.iter(|| history.record(&snap)));
    group.bench_function("snapshot_and_record", |b| {
        b.iter(|| history.record(&monitor.snapshot()))
    });
    group.bench_function("refresh_trends_1h", |b| b.iter(|| history.refresh()));
    group.bench_function("serve_history_24h", |b| {
        b.iter(|| {
            let window = Duration::from_secs(24 * 3600);
            let samples = history.samples(window, None).unwrap();
            serde_json::to_vec(&HistoryDocument::new(&history, window, &samples)).unwrap()
        })
    });
    group.bench_function("serve_trends_1h", |b| {
        b.iter(|| {
            let trends = history.trends(Duration::from_secs(3600)).unwrap();
            serde_json::to_vec(&TrendsDocument::new(&trends, &monitor.snapshot())).unwrap()
        })
    });
    group.finish();
}

fn jemalloc_allocated() -> u64 {
    tikv_jemalloc_ctl::epoch::advance().expect("epoch");
    tikv_jemalloc_ctl::stats::allocated::read().expect("allocated") as u64
}

criterion_group!(benches, history);
criterion_main!(benches);
