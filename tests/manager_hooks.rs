//! MemoryManager hooks: isolation from panics and hangs, once per episode.
#![cfg(all(feature = "manager", feature = "jemalloc"))]

#[path = "support/process.rs"]
mod process;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use memtel::{MemoryManager, MemoryMonitor, Pressure, Thresholds};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A monitor whose limit puts the process at about 75 % with thresholds 0.5 / 0.99:
/// in `warning`, with a wide margin either side.
fn in_warning() -> MemoryMonitor {
    MemoryMonitor::builder()
        .limit_bytes(process::vm_rss() * 4 / 3)
        .thresholds(Thresholds::new(0.5, 0.99).unwrap())
        .cache_window(Duration::ZERO)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_or_hanging_hook_stops_neither_the_manager_nor_other_hooks() {
    let monitor = in_warning();
    assert_eq!(monitor.snapshot().pressure, Pressure::Warning);
    let good = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&good);
    let mut manager = MemoryManager::new(monitor.clone())
        .hook_timeout(Duration::from_millis(300))
        .on_pressure(Pressure::Warning, "panics", || async { panic!("hook failure") })
        .on_pressure(Pressure::Warning, "hangs", std::future::pending::<()>)
        .on_pressure(Pressure::Warning, "works", move || {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });

    let plan = manager.check();
    assert_eq!(plan.cleanup, Some(Pressure::Warning));
    tokio::time::timeout(Duration::from_secs(5), manager.act(plan))
        .await
        .expect("act returns despite a hanging hook");
    assert_eq!(good.load(Ordering::SeqCst), 1, "the good hook ran");
    let actions = monitor.snapshot().actions;
    assert_eq!(actions.cleanup_runs, 1);
    assert!(actions.last_cleanup_ago.unwrap() < Duration::from_secs(5));

    // Still in the same episode: the hooks do not run again.
    assert_eq!(manager.check().cleanup, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_manager_survives_bad_hooks_and_keeps_sampling() {
    let monitor = in_warning();
    let handle = MemoryManager::new(monitor.clone())
        .check_interval(Duration::from_millis(20))
        .cooldown(Duration::from_millis(50))
        .hook_timeout(Duration::from_millis(200))
        // A purge whenever RSS is above 1 byte: its count shows the loop goes on.
        .gc_trigger_bytes(1)
        .on_pressure(Pressure::Warning, "panics", || async { panic!("hook failure") })
        .on_pressure(Pressure::Warning, "hangs", std::future::pending::<()>)
        .spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let actions = monitor.snapshot().actions;
        if actions.cleanup_runs >= 1 && actions.gc_runs >= 5 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "manager stalled: {actions:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!handle.is_finished(), "the manager task is still running");
    handle.abort();
}

#[tokio::test]
async fn no_hooks_run_in_normal() {
    let monitor = MemoryMonitor::builder()
        .limit_bytes(1 << 40)
        .cache_window(Duration::ZERO)
        .build();
    let mut manager = MemoryManager::new(monitor.clone()).on_pressure(Pressure::Warning, "never", || async {
        panic!("must not run");
    });
    let plan = manager.check();
    assert_eq!(plan.cleanup, None);
    assert!(!plan.gc);
    manager.act(plan).await;
    assert_eq!(monitor.snapshot().actions, memtel::Actions::default());
}
