//! A component's arena is sharded for threads that allocate in it at the same time (one
//! arena per CPU the process may run on, at most 4), and the extra arenas are bounded for
//! the whole process (16) whatever the number of components: by jemalloc's own account of
//! which arena holds the regions.
#![cfg(feature = "jemalloc")]

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

use memtel::alloc::TrackingAllocator;

#[global_allocator]
static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> = TrackingAllocator::new(tikv_jemallocator::Jemalloc);

/// The shards memtel makes per component: the CPUs of this process's affinity mask, 1 to 4.
fn expected_shards() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, filled by the call.
    let cpus = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        libc::CPU_COUNT(&set) as usize
    };
    cpus.clamp(1, 4)
}

/// Per component name: how many arenas hold its live small regions, by jemalloc's stats.
fn arenas_holding_regions() -> BTreeMap<&'static str, usize> {
    let mut held = BTreeMap::new();
    for arena in memtel::memory_pools().expect("jemalloc stats") {
        let live: u64 = arena.classes.iter().map(|c| c.live_regions).sum();
        if let (Some(name), true) = (arena.component, live > 0) {
            *held.entry(name).or_insert(0) += 1;
        }
    }
    held
}

/// `threads` threads alive at once each hold 4,000 small strings in `component`; returns
/// what they hold (freed by the caller) after checking the component's live bytes.
fn hold_from_threads(component: &memtel::Component, threads: usize) -> Vec<Vec<String>> {
    let before = component.live_bytes();
    let all_started = Arc::new(Barrier::new(threads));
    let held: Vec<Vec<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let all_started = all_started.clone();
                scope.spawn(move || {
                    // Every thread is bound to its shard (at its first placed allocation)
                    // before any allocates here, all alive at once: they spread over the
                    // shards, the least used first.
                    let _ = std::hint::black_box(vec![0u8; 1]);
                    all_started.wait();
                    component.in_scope(|| (0..4_000).map(|i| format!("thread {t} string {i:>6}")).collect())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a thread")).collect()
    });
    let outer: usize = held.iter().map(|v| v.capacity() * size_of::<String>()).sum::<usize>();
    let strings: usize = held.iter().flatten().map(String::capacity).sum();
    // The outer vectors were allocated in the component too (inside in_scope).
    assert_eq!(
        component.live_bytes() - before,
        (strings + outer) as u64,
        "{}",
        component.name()
    );
    held
}

#[test]
fn threads_at_once_in_one_component_use_its_shards_and_extra_arenas_stay_bounded() {
    let shards = expected_shards();
    let shared = memtel::component("shared");
    let held = hold_from_threads(&shared, shards);
    let by_arena = arenas_holding_regions();
    assert_eq!(
        by_arena.get("shared").copied(),
        Some(shards),
        "{shards} threads at once in one component, on {shards} shard(s): {by_arena:?}"
    );
    drop(held);
    assert_eq!(shared.live_bytes(), 0);

    // Many components, each used by threads at once: at most 16 arenas beyond one each.
    let components: Vec<memtel::Component> = (0..40).map(|i| memtel::component(&format!("many{i:02}"))).collect();
    for component in &components {
        drop(hold_from_threads(component, shards));
        assert_eq!(component.live_bytes(), 0, "{}", component.name());
    }
    let arenas = memtel::alloc::component_arenas();
    let named = memtel::memory_pools()
        .expect("jemalloc stats")
        .iter()
        .filter_map(|a| a.component)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert!(
        arenas <= named + 16,
        "{arenas} component arenas for {named} components: more than 16 extra"
    );
    if shards > 1 {
        assert_eq!(
            arenas,
            named + 16,
            "the extra arenas were all used (41 components, {shards} shards)"
        );
    }
}
