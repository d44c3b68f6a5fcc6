//! The manager against real memory: episodes driven by allocating and freeing a
//! ballast, the cleanup's freed bytes, and a purge that hands resident memory back,
//! each checked against the kernel's VmRSS and jemalloc's own figures.
#![cfg(all(feature = "manager", feature = "jemalloc"))]

#[path = "support/process.rs"]
mod process;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use memtel::{MemoryManager, MemoryMonitor, Pressure, Thresholds};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const BALLAST: usize = 96 << 20;
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Many medium allocations, written so their pages are resident.
fn ballast() -> Vec<Vec<u8>> {
    (0..BALLAST / (64 << 10)).map(|i| vec![i as u8 | 1; 64 << 10]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn episodes_fire_once_each_and_respect_the_cooldown() {
    let _serial = SERIAL.lock().await;
    // Thresholds 0.5 / 0.99 with the limit set so that RSS with the ballast is at
    // about 0.7 (warning) and without it far below 0.45 (normal).
    let base = process::vm_rss() as f64;
    let limit = ((base + BALLAST as f64) / 0.7) as u64;
    let monitor = MemoryMonitor::builder()
        .limit_bytes(limit)
        .thresholds(Thresholds::new(0.5, 0.99).unwrap())
        .hysteresis(0.05)
        .cache_window(Duration::ZERO)
        .build();
    let held: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let hook_held = Arc::clone(&held);
    let cooldown = Duration::from_millis(1500);
    let mut manager = MemoryManager::new(monitor.clone())
        .cooldown(cooldown)
        .gc_trigger_bytes(1)
        .on_pressure(Pressure::Warning, "drop-ballast", move || {
            let held = Arc::clone(&hook_held);
            async move { held.lock().unwrap().clear() }
        });

    // Episode 1: the ballast pushes the process into warning; the hook fires once.
    *held.lock().unwrap() = ballast();
    let plan = manager.check();
    assert_eq!(plan.cleanup, Some(Pressure::Warning), "{:?}", monitor.snapshot());
    let rss_before = process::vm_rss();
    manager.act(plan).await;
    let rss_after = process::vm_rss();
    let actions = monitor.snapshot().actions;
    assert_eq!(actions.cleanup_runs, 1);
    assert!(
        actions.cleanup_freed_bytes as f64 >= 0.95 * BALLAST as f64,
        "cleanup freed {actions:?}"
    );
    assert_eq!(actions.gc_runs, 1, "the purge ran after the cleanup");
    assert!(
        actions.gc_freed_bytes as f64 >= 0.5 * BALLAST as f64,
        "purge returned {actions:?}"
    );
    assert!(
        rss_before.saturating_sub(rss_after) as f64 >= 0.5 * BALLAST as f64,
        "the kernel saw RSS fall: {rss_before} -> {rss_after}"
    );
    assert_eq!(monitor.snapshot().pressure, Pressure::Normal, "level recovered");
    assert_eq!(manager.check().cleanup, None);

    // Episode 2 within the cooldown: entering warning again does not fire yet ...
    *held.lock().unwrap() = ballast();
    assert_eq!(monitor.snapshot().pressure, Pressure::Warning);
    assert_eq!(manager.check().cleanup, None, "cooldown holds");
    // ... and fires once after it.
    tokio::time::sleep(cooldown).await;
    let plan = manager.check();
    assert_eq!(plan.cleanup, Some(Pressure::Warning));
    manager.act(plan).await;
    assert_eq!(manager.check().cleanup, None, "once per episode");
    assert_eq!(monitor.snapshot().actions.cleanup_runs, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_returns_dirty_pages_after_a_large_free() {
    let _serial = SERIAL.lock().await;
    let monitor = MemoryMonitor::builder()
        .limit_bytes(1 << 40)
        .cache_window(Duration::ZERO)
        .build();
    let mut manager = MemoryManager::new(monitor.clone()).gc_trigger_bytes(1);
    drop(ballast()); // freed, but jemalloc keeps the dirty pages for reuse
    let (_, resident_freed) = process::jemalloc_allocated_resident();
    let rss_freed = process::vm_rss();
    let plan = manager.check();
    assert!(plan.gc);
    manager.act(plan).await;
    let (_, resident_purged) = process::jemalloc_allocated_resident();
    let rss_purged = process::vm_rss();
    assert!(
        resident_freed.saturating_sub(resident_purged) as f64 >= 0.5 * BALLAST as f64,
        "jemalloc resident {resident_freed} -> {resident_purged}"
    );
    assert!(
        rss_freed.saturating_sub(rss_purged) as f64 >= 0.5 * BALLAST as f64,
        "VmRSS {rss_freed} -> {rss_purged}"
    );
    let actions = monitor.snapshot().actions;
    assert_eq!(actions.gc_runs, 1);
    let reported = actions.gc_freed_bytes as f64;
    let measured = resident_freed.saturating_sub(resident_purged) as f64;
    assert!(
        (reported - measured).abs() / measured < 0.10,
        "reported {reported} vs measured {measured}"
    );
}
