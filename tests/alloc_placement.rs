//! What attribution costs in memory, by jemalloc's own account: small allocations (up to
//! 14 KiB) are placed untagged in their component's arena, in exactly the size class
//! jemalloc alone would give them, and large ones keep a tag byte.
#![cfg(feature = "jemalloc")]

#[path = "support/process.rs"]
mod process;

use memtel::alloc::TrackingAllocator;
use memtel::component;

#[global_allocator]
static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> = TrackingAllocator::new(tikv_jemallocator::Jemalloc);

const BUFFERS: usize = 50_000;

/// The tests measure process-wide figures: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Each of up to `BUFFERS` buffers (64 MiB at most) of `capacity` bytes held in `name`
/// takes exactly `class` bytes by jemalloc's own account (`sallocx`: the usable size of
/// the allocation, its size class), and the component's live bytes grow by exactly the
/// buffers' capacities.
fn holds_at_class_size(name: &str, capacity: usize, class: usize) {
    let scope = component(name);
    let live_before = scope.live_bytes();
    let count = BUFFERS.min((64 << 20) / capacity);
    let buffers: Vec<Vec<u8>> = scope.in_scope(|| (0..count).map(|_| Vec::with_capacity(capacity)).collect());
    for buffer in &buffers {
        // SAFETY: a live allocation of the global allocator (jemalloc underneath).
        let usable = unsafe { tikv_jemalloc_sys::sallocx(buffer.as_ptr().cast_mut().cast(), 0) };
        assert_eq!(
            usable, class,
            "{name}: a {capacity} B buffer takes {usable} B, expected its {class} B class"
        );
    }
    let outer = count * size_of::<Vec<u8>>();
    assert_eq!(
        scope.live_bytes() - live_before,
        (count * capacity + outer) as u64,
        "{name}"
    );
    drop(buffers);
    assert_eq!(scope.live_bytes(), live_before, "{name}: freed");
}

#[test]
fn small_allocations_take_their_own_size_class() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Exact classes: a tag would make them 80 and 160 B (+25 %).
    holds_at_class_size("exact64", 64, 64);
    holds_at_class_size("exact128", 128, 128);
    assert!(
        memtel::alloc::component_arenas() >= 2,
        "small allocations were not placed in arenas"
    );
    holds_at_class_size("below64", 60, 64);
    holds_at_class_size("below112", 100, 112);
    holds_at_class_size("eight", 8, 8);
    holds_at_class_size("largest_small", 14_336, 14_336);
}

#[test]
fn large_allocations_keep_a_tag_in_their_class() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // 20 000 B plus the tag byte still fit jemalloc's 20 KiB class.
    holds_at_class_size("large", 20_000, 20_480);
}

/// `count` allocations of `layout` in component `name`: each is aligned, takes the size
/// class jemalloc itself gives that layout (`nallocx` with the alignment), and the
/// component's live bytes grow by exactly `count` × the size.
fn aligned_allocations_take_jemallocs_class(name: &str, layout: std::alloc::Layout, count: usize) {
    let scope = component(name);
    let live_before = scope.live_bytes();
    let flags = tikv_jemalloc_sys::MALLOCX_ALIGN(layout.align());
    // SAFETY: nallocx only computes a size.
    let class = unsafe { tikv_jemalloc_sys::nallocx(layout.size(), flags) };
    // SAFETY: a layout of non-zero size; each pointer is freed below with it.
    let pointers: Vec<*mut u8> = scope.in_scope(|| (0..count).map(|_| unsafe { std::alloc::alloc(layout) }).collect());
    let pointers_bytes = (pointers.capacity() * size_of::<*mut u8>()) as u64;
    for &ptr in &pointers {
        assert!(!ptr.is_null());
        assert_eq!(ptr as usize % layout.align(), 0, "{name}: {ptr:p} not aligned");
        // SAFETY: a live allocation of the global allocator (jemalloc underneath).
        let usable = unsafe { tikv_jemalloc_sys::sallocx(ptr.cast(), 0) };
        assert_eq!(
            usable, class,
            "{name}: {layout:?} takes {usable} B, jemalloc alone gives {class} B"
        );
    }
    assert_eq!(
        scope.live_bytes() - live_before,
        (count * layout.size()) as u64 + pointers_bytes,
        "{name}"
    );
    for ptr in pointers {
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) };
    }
    assert_eq!(scope.live_bytes(), live_before, "{name}: freed");
}

#[test]
fn over_aligned_small_allocations_are_placed_in_an_aligned_class() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let layout = |size, align| std::alloc::Layout::from_size_align(size, align).expect("layout");
    // Exact classes, where a tag byte would cost the next aligned class (192, 8192, 32 B).
    aligned_allocations_take_jemallocs_class("align64", layout(128, 64), 5_000);
    aligned_allocations_take_jemallocs_class("align4096", layout(4096, 4096), 500);
    aligned_allocations_take_jemallocs_class("align16", layout(16, 16), 5_000);
    // Rounded up to the alignment: 80 B aligned to 64 takes the 128 B class, as in jemalloc.
    aligned_allocations_take_jemallocs_class("align64_rounded", layout(80, 64), 5_000);
}

#[test]
fn growth_across_placed_and_tagged_sizes_keeps_the_component() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let scope = component("grower");
    let other = component("bystander");
    // 60 → 64 → 100 → 4096 → 5000 (placed, moving between classes) → 20480 (large,
    // tagged) → 64 (placed again), grown and shrunk while another component is current:
    // the buffer stays the grower's, its contents intact.
    let mut buffer: Vec<u8> = scope.in_scope(|| Vec::with_capacity(60));
    buffer.extend((0..60).map(|i| i as u8));
    other.in_scope(|| {
        for capacity in [64, 100, 4096, 5000, 20_480] {
            buffer.reserve_exact(capacity - buffer.len());
            assert_eq!(buffer.capacity(), capacity);
            buffer.resize(capacity, 7);
            assert_eq!(scope.live_bytes(), capacity as u64, "at {capacity}");
        }
        buffer.truncate(64);
        buffer.shrink_to_fit();
    });
    assert_eq!(scope.live_bytes(), 64);
    assert_eq!(other.live_bytes(), 0);
    assert!(buffer[..60].iter().enumerate().all(|(i, &b)| b == i as u8));
    assert!(buffer[60..].iter().all(|&b| b == 7));
    drop(buffer);
    assert_eq!(scope.live_bytes(), 0);
}

#[test]
fn threads_that_come_and_go_free_each_others_placed_allocations_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let maker = component("maker");
    let live_before = maker.live_bytes();
    // 300 short-lived threads, each freeing what the previous one made after that
    // thread exited and returned its caches of free regions.
    let mut handed_over: Vec<Vec<u8>> = Vec::new();
    for round in 0..300usize {
        handed_over = std::thread::spawn(move || {
            drop(handed_over);
            maker.in_scope(|| (0..20).map(|i| Vec::with_capacity(16 << (i % 8))).collect())
        })
        .join()
        .expect("thread");
        // The 20 buffers and the vector holding them.
        let expected: u64 = (0..20).map(|i| 16u64 << (i % 8)).sum::<u64>() + 20 * size_of::<Vec<u8>>() as u64;
        assert_eq!(maker.live_bytes() - live_before, expected, "round {round}");
    }
    drop(handed_over);
    assert_eq!(maker.live_bytes(), live_before);
}

/// Set in the child processes the tests below start.
const CHILD: &str = "MEMTEL_PLACEMENT_CHILD";

/// Runs this test binary's `test` alone in a child process with `CHILD` and `env` set and,
/// if given, its address space limited to `address_space` bytes (`RLIMIT_AS`); asserts
/// the child succeeded and printed `says`.
fn in_a_child(test: &str, env: &[(&str, &str)], address_space: Option<u64>, says: &str) {
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"));
    child
        .args(["--exact", test, "--nocapture"])
        .env(CHILD, "1")
        .envs(env.iter().copied());
    if let Some(bytes) = address_space {
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            child.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = child.output().expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(says),
        "child: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn without_address_space_for_the_arenas_every_allocation_keeps_its_tag() {
    if std::env::var_os(CHILD).is_some() {
        // 64 B now costs the 80 B class: correct attribution, no placement.
        holds_at_class_size("tagged64", 64, 80);
        assert_eq!(memtel::alloc::component_arenas(), 0);
        println!("child: tagged");
        return;
    }
    // 3 GiB of address space: enough for the test, too little for the arenas' smallest
    // reservation (4 GiB; 64 GiB where it can).
    in_a_child(
        "without_address_space_for_the_arenas_every_allocation_keeps_its_tag",
        &[],
        Some(3 << 30),
        "child: tagged",
    );
}

#[test]
fn with_less_address_space_a_smaller_reservation_still_places() {
    if std::env::var_os(CHILD).is_some() {
        // Placed: exactly jemalloc's class, as with the full reservation.
        holds_at_class_size("smaller64", 64, 64);
        assert!(
            memtel::alloc::component_arenas() >= 1,
            "nothing placed under a 24 GiB RLIMIT_AS"
        );
        println!("child: placed");
        return;
    }
    // 24 GiB: room for a 16 GiB reservation, not for 64.
    in_a_child(
        "with_less_address_space_a_smaller_reservation_still_places",
        &[],
        Some(24 << 30),
        "child: placed",
    );
}

#[test]
fn the_tags_scheme_chosen_by_the_environment_places_nothing_and_stays_exact() {
    if std::env::var_os(CHILD).is_some() {
        // With a tag, a 64 B buffer takes the 80 B class; attribution is exact all the same.
        holds_at_class_size("tags64", 64, 80);
        holds_at_class_size("tags100", 100, 112);
        assert_eq!(
            memtel::alloc::component_arenas(),
            0,
            "an arena was made with tags chosen"
        );
        assert_eq!(memtel::alloc::cached_bytes(), 0);
        println!("child: tags");
        return;
    }
    in_a_child(
        "the_tags_scheme_chosen_by_the_environment_places_nothing_and_stays_exact",
        &[(memtel::alloc::SCHEME_VARIABLE, "tags")],
        None,
        "child: tags",
    );
}

#[test]
fn purging_returns_placed_pages_to_the_kernel() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let scope = component("purged");
    // 24 MiB of 4 KiB buffers (placed), each page touched.
    let buffers: Vec<Vec<u8>> = scope.in_scope(|| (0..6144).map(|_| vec![1u8; 4096]).collect());
    assert!(memtel::alloc::component_arenas() >= 1, "4 KiB buffers were not placed");
    let (_, resident_held) = process::jemalloc_allocated_resident();
    drop(buffers);
    assert!(memtel::purge_jemalloc(), "arena.<all>.purge failed");
    let (_, resident_purged) = process::jemalloc_allocated_resident();
    // jemalloc counts pages its purge hook (madvise) returned as no longer resident.
    assert!(
        resident_held.saturating_sub(resident_purged) >= 20 << 20,
        "resident {resident_held} → {resident_purged} after freeing 24 MiB of placed buffers and purging"
    );
}
