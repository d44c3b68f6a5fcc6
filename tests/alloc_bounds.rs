//! What memtel's allocator holds beyond what bare jemalloc holds, on the same pattern: each test
//! runs its pattern in two child processes of this binary, one on bare jemalloc and one on
//! `TrackingAllocator<Jemalloc>` (support/versus_bare.rs), and bounds memtel's figure by bare's.
//! The figures are the allocator's own (`stats.active`) and the kernel's (`VmRSS`), each taken as
//! growth over a baseline read in the same child before the pattern.
//!
//! - Sparse survivors: batches of one size where 1 in 32 survives. Refills that take fresh slabs
//!   instead of the holes the frees left keep a slab per survivor; bare jemalloc refills the holes.
//! - Idle arenas: threads that fill and free 64 MiB in their own components, then exit. A
//!   component arena that gets no more allocations must still give its freed pages back.
//! - Idle threads × components: per-thread caches of many components on threads that stay alive
//!   but idle must stay bounded per thread, whatever the number of components.
//!
//! `cargo test --test alloc_bounds -- --nocapture` prints both allocators' figures side by side.
#![cfg(feature = "jemalloc")]

#[path = "support/process.rs"]
mod process;
#[path = "support/versus_bare.rs"]
mod versus_bare;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use memtel::component;
use serde_json::json;
use versus_bare::{automatic_arenas_small_allocations, child, jemalloc_active, report, run_both, Runs};

memtel_or_bare_allocator!();

const MIB: u64 = 1 << 20;

// ---- sparse survivors -------------------------------------------------------------------------

/// jemalloc size classes where a refill of a slab's region count or more took fresh slabs only,
/// and two sizes between classes (100 → 112 B, 3000 → 3072 B).
const SPARSE_SIZES: [usize; 10] = [128, 256, 512, 1024, 2048, 4096, 8192, 14_336, 100, 3000];
const SPARSE_ROUNDS: usize = 40;
/// Allocations per round, at most [`SPARSE_ROUND_BYTES`] of them: still hundreds of slabs a
/// round at every size, in a few seconds in all.
const SPARSE_PER_ROUND: usize = 32_768;
const SPARSE_ROUND_BYTES: usize = 32 << 20;
/// One allocation in this many survives its round.
const SPARSE_KEEP: usize = 32;

/// Growth of jemalloc's `active` (after a purge) over its baseline once `SPARSE_ROUNDS` rounds
/// of allocations of `size` bytes left 1 in `SPARSE_KEEP` alive each.
fn sparse_survivors_active_growth(size: usize) -> u64 {
    let scope = component("sparse");
    let per_round = SPARSE_PER_ROUND.min(SPARSE_ROUND_BYTES / size);
    let mut survivors: Vec<Vec<u8>> = Vec::with_capacity(SPARSE_ROUNDS * per_round.div_ceil(SPARSE_KEEP));
    let mut round: Vec<Vec<u8>> = Vec::with_capacity(per_round);
    assert!(memtel::purge_jemalloc(), "arena.<all>.purge");
    let baseline = jemalloc_active();
    for _ in 0..SPARSE_ROUNDS {
        scope.in_scope(|| round.extend((0..per_round).map(|_| Vec::with_capacity(size))));
        // Frees in allocation order, keeping every 32nd: each slab is left with a few survivors.
        for (i, buffer) in round.drain(..).enumerate() {
            if i % SPARSE_KEEP == 0 {
                survivors.push(buffer);
            }
        }
    }
    assert!(memtel::purge_jemalloc(), "arena.<all>.purge");
    let grown = jemalloc_active().saturating_sub(baseline);
    drop(survivors);
    grown
}

#[test]
fn sparse_survivors_take_at_most_a_quarter_more_active_pages_than_bare_jemalloc() {
    const TEST: &str = "sparse_survivors_take_at_most_a_quarter_more_active_pages_than_bare_jemalloc";
    if child().is_some() {
        let mut figures = json!({});
        for size in SPARSE_SIZES {
            figures[size.to_string()] = sparse_survivors_active_growth(size).into();
        }
        report(figures);
        return;
    }
    // jemalloc's active pages depend on the order of allocations only, not on time: the two
    // children can share the CPUs.
    let both = run_both(TEST, Runs::Together, &[]);
    let labels: Vec<(String, String)> = SPARSE_SIZES
        .iter()
        .map(|size| (format!("{size} B"), size.to_string()))
        .collect();
    let rows: Vec<(&str, &str)> = labels.iter().map(|(l, k)| (l.as_str(), k.as_str())).collect();
    both.print_mib(
        "sparse survivors: growth of jemalloc stats.active after a purge (40 rounds of ≤ 32,768 / ≤ 32 MiB, 1 in 32 kept)",
        &rows,
    );
    let over: Vec<String> = SPARSE_SIZES
        .iter()
        .filter_map(|size| {
            let (bare, memtel) = both.get(&size.to_string());
            (memtel > 1.25 * bare).then(|| format!("{size} B: {memtel} vs bare {bare}"))
        })
        .collect();
    assert!(over.is_empty(), "active above 1.25 × bare jemalloc's: {over:?}");
}

// ---- idle arenas ------------------------------------------------------------------------------

const IDLE_THREADS: usize = 8;
const IDLE_FILL: usize = 64 << 20;
const IDLE_WAIT: Duration = Duration::from_secs(15);

/// Fills `IDLE_FILL` bytes with buffers and strings of 64..=8192 B (every byte written), in
/// `scope`, then frees them all.
fn fill_and_free(scope: memtel::Component, seed: u64) {
    let mut rng = seed | 1;
    let mut held_bytes = 0;
    let mut bytes: Vec<Vec<u8>> = Vec::new();
    let mut strings: Vec<String> = Vec::new();
    scope.in_scope(|| {
        while held_bytes < IDLE_FILL {
            // xorshift64: the same sizes in both children.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let size = 64 + (rng % (8192 - 64 + 1)) as usize;
            if rng & (1 << 40) == 0 {
                bytes.push(vec![rng as u8; size]);
            } else {
                strings.push("m".repeat(size));
            }
            held_bytes += size;
        }
    });
    drop(bytes);
    drop(strings);
}

#[test]
fn idle_arenas_return_freed_pages_like_bare_jemalloc() {
    const TEST: &str = "idle_arenas_return_freed_pages_like_bare_jemalloc";
    if child().is_some() {
        let scopes: Vec<memtel::Component> = (0..IDLE_THREADS).map(|i| component(&format!("idle{i}"))).collect();
        let baseline = process::vm_rss();
        let threads: Vec<_> = scopes
            .into_iter()
            .enumerate()
            .map(|(i, scope)| std::thread::spawn(move || fill_and_free(scope, 0x9E37_79B9_7F4A_7C15 ^ i as u64)))
            .collect();
        for thread in threads {
            thread.join().expect("filling thread");
        }
        let right_after = process::vm_rss();
        // Idle: no purge, no allocation; only time for jemalloc's decay.
        std::thread::sleep(IDLE_WAIT);
        let rss = process::vm_rss();
        report(json!({
            "rss_growth_after_exit": right_after.saturating_sub(baseline),
            "rss_growth_after_wait": rss.saturating_sub(baseline),
        }));
        return;
    }
    // Run together: the figure is read after a 15 s sleep, not after a given amount of work.
    let both = run_both(TEST, Runs::Together, &[]);
    both.print_mib(
        "idle arenas: VmRSS growth, 8 threads × 64 MiB filled, freed, exited",
        &[
            ("right after the threads exit", "rss_growth_after_exit"),
            ("15 s later", "rss_growth_after_wait"),
        ],
    );
    let (bare, memtel) = both.get("rss_growth_after_wait");
    assert!(
        memtel <= 1.5 * bare,
        "RSS 15 s after the threads exited: +{:.1} MiB vs bare jemalloc's +{:.1} MiB (bound 1.5×)",
        memtel / MIB as f64,
        bare / MIB as f64
    );
}

// ---- idle threads × components ----------------------------------------------------------------

const CACHED_THREADS: usize = 8;
const CACHED_COMPONENTS: usize = 64;
/// jemalloc's 36 small size classes (checked against `nallocx` in the child).
const SMALL_CLASSES: [usize; 36] = [
    8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
    2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192, 10_240, 12_288, 14_336,
];
/// What a thread's lists may hold, whatever the number of components (README: 512 KiB).
const CACHED_PER_THREAD: u64 = 512 << 10;
/// What memtel may add to bare jemalloc's RSS with all threads idle.
const CACHED_RSS_SLACK: u64 = 16 * MIB;
/// How long the threads stay idle before their figure is taken.
const IDLE_FOR: Duration = Duration::from_secs(3);

/// In each component: a burst in every small class (32 KiB worth and 16 allocations more per
/// class, every byte written, all held at once), then all of it freed.
fn bursts_in_every_component(scopes: &[memtel::Component]) {
    for scope in scopes {
        let burst: Vec<Vec<u8>> = scope.in_scope(|| {
            SMALL_CLASSES
                .iter()
                .flat_map(|&class| (0..(32 << 10) / class).chain(0..16).map(move |_| vec![1u8; class]))
                .collect()
        });
        drop(burst);
    }
}

#[test]
fn idle_threads_in_64_components_hold_at_most_16_mib_more_than_bare_jemalloc() {
    const TEST: &str = "idle_threads_in_64_components_hold_at_most_16_mib_more_than_bare_jemalloc";
    if let Some(allocator) = child() {
        for class in SMALL_CLASSES {
            // SAFETY: nallocx only computes a size.
            assert_eq!(
                unsafe { tikv_jemalloc_sys::nallocx(class, 0) },
                class,
                "not a jemalloc class"
            );
        }
        let scopes: Vec<memtel::Component> = (0..CACHED_COMPONENTS)
            .map(|i| component(&format!("cached{i:02}")))
            .collect();
        if allocator == "memtel" {
            for (i, scope) in scopes.iter().enumerate() {
                assert_eq!(scope.name(), format!("cached{i:02}"), "64 components of their own");
            }
        }
        let starts: Vec<u64> = scopes.iter().map(|c| c.live_bytes()).collect();
        let scopes = Arc::new(scopes);
        let baseline = process::vm_rss();
        let (idle, release) = (
            Arc::new(Barrier::new(CACHED_THREADS + 1)),
            Arc::new(Barrier::new(CACHED_THREADS + 1)),
        );
        let threads: Vec<_> = (0..CACHED_THREADS)
            .map(|_| {
                let (scopes, idle, release) = (scopes.clone(), idle.clone(), release.clone());
                std::thread::spawn(move || {
                    bursts_in_every_component(&scopes);
                    idle.wait();
                    // Alive and idle until the figures are read.
                    release.wait();
                })
            })
            .collect();
        idle.wait();
        let rss_just_idle = process::vm_rss();
        // Idle a while: long enough for a component arena's decay (1 s) to run its course.
        std::thread::sleep(IDLE_FOR);
        let rss_idle = process::vm_rss();
        let cached_idle = memtel::alloc::cached_bytes();
        let automatic_small = automatic_arenas_small_allocations();
        let not_back: Vec<String> = scopes
            .iter()
            .zip(&starts)
            .filter(|(scope, start)| scope.live_bytes() != **start)
            .map(|(scope, start)| format!("{}: {} → {}", scope.name(), start, scope.live_bytes()))
            .collect();
        release.wait();
        for thread in threads {
            thread.join().expect("burst thread");
        }
        let rss_exited = process::vm_rss();
        report(json!({
            "rss_growth_just_idle": rss_just_idle.saturating_sub(baseline),
            "rss_growth_idle": rss_idle.saturating_sub(baseline),
            "rss_growth_exited": rss_exited.saturating_sub(baseline),
            "cached_bytes_idle": cached_idle,
            "automatic_arenas_small_allocations": automatic_small,
            "components_not_back": not_back,
        }));
        return;
    }
    let both = run_both(TEST, Runs::OneAfterTheOther, &[]);
    both.print_mib(
        "idle threads × components: 8 threads × 64 components × 36 classes, all freed",
        &[
            ("VmRSS growth, just idle", "rss_growth_just_idle"),
            ("VmRSS growth, idle 3 s", "rss_growth_idle"),
            ("VmRSS growth, threads exited", "rss_growth_exited"),
            ("memtel cached_bytes, idle", "cached_bytes_idle"),
        ],
    );
    let (bare, memtel) = both.get("rss_growth_idle");
    assert!(
        memtel <= bare + CACHED_RSS_SLACK as f64,
        "RSS with 8 idle threads: +{:.1} MiB vs bare jemalloc's +{:.1} MiB (bound bare + 16 MiB)",
        memtel / MIB as f64,
        bare / MIB as f64
    );
    assert_eq!(
        both.memtel["components_not_back"],
        json!([]),
        "components whose live bytes did not return to their start with everything freed"
    );
    // Every burst allocation is placed, none tagged: jemalloc's own arenas served memtel only
    // the lists' own records (one per thread and component, and a few of the test's).
    // Threads that meet a component's arena being made wait for it rather than tag.
    let (_, automatic_small) = both.get("automatic_arenas_small_allocations");
    let lists = ((CACHED_THREADS + 1) * (CACHED_COMPONENTS + 2)) as f64;
    assert!(
        automatic_small <= lists,
        "jemalloc's own arenas served {automatic_small} small allocations, more than the {lists} \
         records of the threads' lists: burst allocations were tagged, not placed"
    );
    let (_, cached) = both.get("cached_bytes_idle");
    // Eight idle threads that each just freed into 64 components: their lists hold something.
    assert!(
        cached > 0.0,
        "memtel reports no cached bytes with 8 threads idle after bursts"
    );
    // The burst threads, and the main thread (its own allocations are placed too).
    let cached_bound = CACHED_PER_THREAD * (CACHED_THREADS as u64 + 1);
    assert!(
        cached <= cached_bound as f64,
        "memtel holds {:.1} MiB in per-thread caches of 8 idle threads (bound {} MiB)",
        cached / MIB as f64,
        cached_bound / MIB
    );
}
