//! What attribution costs in memory, by jemalloc's own account: allocations of exactly a
//! size class (which a tag byte would push into the next class) are placed untagged in
//! their component's arena, and everything else keeps its tag within its class's slack.
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

/// jemalloc's `stats.allocated` grows by `BUFFERS` × `class` while `BUFFERS` buffers of
/// `capacity` bytes are held in `name`, and the component's live bytes by exactly
/// `BUFFERS` × `capacity`.
fn holds_at_class_size(name: &str, capacity: usize, class: usize) {
    let scope = component(name);
    let live_before = scope.live_bytes();
    let mut outer = Vec::with_capacity(BUFFERS); // outside the component, made first
    let (allocated_before, _) = process::jemalloc_allocated_resident();
    scope.in_scope(|| {
        for _ in 0..BUFFERS {
            outer.push(Vec::<u8>::with_capacity(capacity));
        }
    });
    let (allocated_after, _) = process::jemalloc_allocated_resident();
    let grown = allocated_after - allocated_before;
    let expected = (BUFFERS * class) as u64;
    // jemalloc counts objects cached in thread caches as allocated, and the process frees
    // a little meanwhile: a few hundred objects either way. A tag costing a class step
    // would be +25 % (64 → 80 B, 128 → 160 B).
    assert!(
        grown.abs_diff(expected) <= expected / 50,
        "{name}: {BUFFERS} × {capacity} B grew jemalloc's allocated by {grown}, expected {expected} ({class} B each)"
    );
    assert_eq!(scope.live_bytes() - live_before, (BUFFERS * capacity) as u64, "{name}");
    drop(outer);
    assert_eq!(scope.live_bytes(), live_before, "{name}: freed");
}

#[test]
fn tags_cost_no_size_class_step() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Exact classes: untagged, in the component's arena. A tag would make them 80 and
    // 160 B (+25 %).
    holds_at_class_size("exact64", 64, 64);
    holds_at_class_size("exact128", 128, 128);
    assert!(
        memtel::alloc::component_arenas() >= 2,
        "exact-class allocations were not placed in arenas"
    );
    // Below a class: the tag fits in the slack.
    holds_at_class_size("slack60", 60, 64);
    holds_at_class_size("slack100", 100, 112);
}

#[test]
fn growth_across_placed_and_tagged_sizes_keeps_the_component() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let scope = component("grower");
    let other = component("bystander");
    // 60 (tagged) → 64 (placed) → 100 (tagged) → 4096 (placed) → 5000 (tagged) →
    // 20480 (placed, large) → 64 (placed), grown and shrunk while another component is
    // current: the buffer stays the grower's, its contents intact.
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
