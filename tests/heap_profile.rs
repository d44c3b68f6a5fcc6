//! Heap profiles against truth: known bytes held from two functions in two components,
//! sampled at a 64 KiB interval; the profile read back by `go tool pprof`.
#![cfg(all(feature = "profiling", feature = "jemalloc"))]

use std::hint::black_box;

#[path = "support/pprof.rs"]
mod pprof;

use pprof::go_pprof;

#[global_allocator]
static GLOBAL: memtel::alloc::TrackingAllocator<tikv_jemallocator::Jemalloc> =
    memtel::alloc::TrackingAllocator::new(tikv_jemallocator::Jemalloc).with_heap_profiling();

const MIB: f64 = 1_048_576.0;

/// The sampling interval is process-wide: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
const CACHE_BYTES: usize = 48 << 20;
const API_BYTES: usize = 12 << 20;

/// Mixed sizes, 24 B to 256 KiB, adding up to exactly `total`.
fn sizes(total: usize, seed: u64) -> Vec<usize> {
    let mut x = seed;
    let mut left = total;
    let mut out = Vec::new();
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = match x % 4 {
            0 => 24 + (x >> 8) as usize % 200,
            1 => 1024 + (x >> 8) as usize % 4096,
            2 => 16 << 10,
            _ => 100_000 + (x >> 8) as usize % 160_000,
        }
        .min(left);
        out.push(size);
        left -= size;
    }
    out
}

// Not inlined, and the `collect` not a tail call (`black_box` after it): either would leave
// the function without a frame of its own in an optimized build's stacks.
#[inline(never)]
fn fill_the_cache_component(sizes: &[usize]) -> Vec<Vec<u8>> {
    black_box(sizes.iter().map(|&n| black_box(vec![7u8; n])).collect())
}

#[inline(never)]
fn buffer_api_requests(sizes: &[usize]) -> Vec<Vec<u8>> {
    black_box(sizes.iter().map(|&n| black_box(vec![9u8; n])).collect())
}

/// In-use and cumulative bytes of the samples whose stack passes through `function`,
/// by component.
fn through(profile: &memtel::profile::HeapProfile, function: &str) -> (f64, f64, Vec<&'static str>) {
    let stacks = profile.symbolize();
    let mut inuse = 0.0;
    let mut alloc = 0.0;
    let mut components = Vec::new();
    for (sample, names) in profile.samples.iter().zip(&stacks) {
        if names.iter().any(|n| n.contains(function)) {
            inuse += sample.inuse_space;
            alloc += sample.alloc_space;
            if !components.contains(&sample.component) {
                components.push(sample.component);
            }
        }
    }
    (inuse, alloc, components)
}

/// Asserts that the profile's `estimate` of `what` is within `tolerance` (a fraction) of the
/// `truth` in bytes.
fn assert_near(estimate: f64, truth: usize, tolerance: f64, what: &str) {
    assert!(
        (estimate / truth as f64 - 1.0).abs() <= tolerance,
        "{what}: {:.1} MiB in the profile, {:.1} MiB true (tolerance {:.0} %)",
        estimate / MIB,
        truth as f64 / MIB,
        tolerance * 100.0
    );
}

#[test]
fn profiles_attribute_known_bytes_to_their_functions_and_components() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    memtel::alloc::set_heap_sample_interval(64 << 10);
    let cache = memtel::component("cache");
    let api = memtel::component("api");
    let (cache_sizes, api_sizes) = (sizes(CACHE_BYTES, 7), sizes(API_BYTES, 11));
    let held_cache = cache.in_scope(|| fill_the_cache_component(&cache_sizes));
    let held_api = api.in_scope(|| buffer_api_requests(&api_sizes));

    let profile = memtel::profile::heap_profile();
    let (cache_inuse, _, cache_components) = through(&profile, "fill_the_cache_component");
    let (api_inuse, _, api_components) = through(&profile, "buffer_api_requests");
    assert_near(cache_inuse, CACHE_BYTES, 0.15, "the cache function's bytes in use");
    assert_near(api_inuse, API_BYTES, 0.15, "the api function's bytes in use");
    println!(
        "in-use by function at a 64 KiB interval: cache {:.2} MiB of {} ({:+.1} %), api {:.2} MiB of {} ({:+.1} %)",
        cache_inuse / MIB,
        CACHE_BYTES >> 20,
        (cache_inuse / CACHE_BYTES as f64 - 1.0) * 100.0,
        api_inuse / MIB,
        API_BYTES >> 20,
        (api_inuse / API_BYTES as f64 - 1.0) * 100.0
    );
    // The component labels split them exactly.
    assert_eq!(cache_components, ["cache"]);
    assert_eq!(api_components, ["api"]);
    // Stacks were walked by frame pointers where the build keeps them, else unwound from
    // DWARF; the figures above hold either way. CI also builds this test with
    // `-C force-frame-pointers=yes` and names the unwinder it must have used in
    // MEMTEL_EXPECT_UNWINDER ("frame pointers" or "dwarf").
    let unwinder = memtel::alloc::heap_profile_unwinder();
    println!("stacks captured by: {unwinder}");
    if let Ok(expected) = std::env::var("MEMTEL_EXPECT_UNWINDER") {
        assert_eq!(unwinder, expected, "this build's stacks were not captured as expected");
    }

    // The served form: go tool pprof reads it and prints the functions.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("heap.pb.gz");
    std::fs::write(&file, profile.to_pprof()).expect("write");
    let top = go_pprof(&["-top", "-sample_index=inuse_space"], &file);
    assert!(
        top.contains("fill_the_cache_component") && top.contains("buffer_api_requests"),
        "{top}"
    );
    let tagged = go_pprof(&["-top", "-sample_index=inuse_space", "-tagfocus=component=api"], &file);
    assert!(
        tagged.contains("buffer_api_requests") && !tagged.contains("fill_the_cache_component"),
        "{tagged}"
    );
    let svg = profile.to_svg().expect("svg");
    let svg = String::from_utf8(svg).expect("utf-8");
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"), "not an SVG");
    assert!(svg.contains("fill_the_cache_component"));

    // Freed allocations leave the in-use profile; the cumulative one keeps them.
    drop(held_cache);
    let after = memtel::profile::heap_profile();
    let (cache_inuse, cache_alloc, _) = through(&after, "fill_the_cache_component");
    assert!(
        cache_inuse < 0.01 * CACHE_BYTES as f64,
        "{:.1} MiB still in use",
        cache_inuse / MIB
    );
    assert_near(cache_alloc, CACHE_BYTES, 0.15, "the cache function's cumulative bytes");

    // A delta holds only what was allocated in between.
    let before = memtel::profile::heap_profile();
    let more = api.in_scope(|| buffer_api_requests(&sizes(8 << 20, 13)));
    let delta = memtel::profile::heap_profile().since(&before);
    let (_, delta_api, _) = through(&delta, "buffer_api_requests");
    let (_, delta_cache, _) = through(&delta, "fill_the_cache_component");
    assert_near(delta_api, 8 << 20, 0.25, "the api function's bytes in the delta");
    assert_eq!(delta_cache, 0.0);
    drop((held_api, more));
    memtel::alloc::set_heap_sample_interval(0);
}

#[inline(never)]
fn render_pages() -> Vec<Vec<u8>> {
    (0..64).map(|i| black_box(vec![i as u8; 64 << 10])).collect()
}

#[cfg(feature = "tracing")]
#[test]
fn samples_carry_the_innermost_span_with_the_component_layer() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber = tracing_subscriber::registry().with(memtel::ComponentLayer::new());
    let _guard = tracing::subscriber::set_default(subscriber);
    memtel::alloc::set_heap_sample_interval(64 << 10);
    let pages = tracing::info_span!("render", component = "browser").in_scope(render_pages);
    let profile = memtel::profile::heap_profile();
    let stacks = profile.symbolize();
    let rendered: Vec<_> = profile
        .samples
        .iter()
        .zip(&stacks)
        .filter(|(_, names)| names.iter().any(|n| n.contains("render_pages")))
        .map(|(s, _)| s)
        .collect();
    assert!(!rendered.is_empty(), "no sample from render_pages");
    for s in rendered {
        assert_eq!((s.component, s.span), ("browser", Some("render")), "{s:?}");
    }
    drop(pages);
    memtel::alloc::set_heap_sample_interval(0);
}

/// `depth` frames of its own above the allocations, so that each depth is a stack of its own.
#[inline(never)]
fn allocate_at_depth(depth: usize) -> Vec<Vec<u8>> {
    if depth == 0 {
        return black_box((0..64).map(|i| black_box(vec![3u8; 512 + 8 * i])).collect());
    }
    black_box(allocate_at_depth(depth - 1))
}

#[test]
fn the_profilers_own_memory_is_outside_the_sampled_component() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // A sample every KiB or so: a thousand live samples, from 40 stacks.
    memtel::alloc::set_heap_sample_interval(1 << 10);
    let sampled = memtel::component("sampled_often");
    let start = sampled.live_bytes();
    let held_bytes = sampled.in_scope(|| {
        let held: Vec<Vec<Vec<u8>>> = (0..40).map(allocate_at_depth).collect();
        let bytes: usize = held.iter().flatten().map(Vec::len).sum();
        drop(black_box(held));
        bytes
    });
    let profile = memtel::profile::heap_profile();
    memtel::alloc::set_heap_sample_interval(0);
    assert!(
        profile.samples.len() >= 20,
        "{} stacks sampled from {held_bytes} bytes",
        profile.samples.len()
    );
    // Everything the component allocated is freed; the profiler's table still holds every
    // stack it saw, and its maps their capacity, but in memory of its own.
    assert_eq!(
        sampled.live_bytes(),
        start,
        "the component kept bytes after freeing all of its {held_bytes}"
    );
}

/// Grows one buffer by doubling to `bytes`: reallocations, which the sampler does not test.
#[inline(never)]
fn grow_one_buffer(bytes: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; 1];
    while buffer.len() < bytes {
        buffer.resize(buffer.len() * 2, 1);
    }
    black_box(buffer)
}

#[inline(never)]
fn allocate_after_the_growth(sizes: &[usize]) -> Vec<Vec<u8>> {
    black_box(sizes.iter().map(|&n| black_box(vec![5u8; n])).collect())
}

#[test]
fn sampling_goes_on_after_reallocations_pass_the_countdown() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    memtel::alloc::set_heap_sample_interval(64 << 10);
    // A thread of its own: its countdown starts with this interval. The growth's
    // reallocations pass it many times over (128 MiB against 64 KiB); the next allocations
    // must still be sampled, at the same rate.
    const AFTER: usize = 16 << 20;
    let (profile, held) = std::thread::spawn(|| {
        let grown = memtel::component("grown").in_scope(|| grow_one_buffer(64 << 20));
        let held = allocate_after_the_growth(&sizes(AFTER, 29));
        let profile = memtel::profile::heap_profile();
        drop(grown);
        (profile, held)
    })
    .join()
    .expect("the growing thread");
    memtel::alloc::set_heap_sample_interval(0);
    let (inuse, _, _) = through(&profile, "allocate_after_the_growth");
    assert_near(inuse, AFTER, 0.25, "the bytes allocated after the growth, in use");
    drop(held);
}

#[test]
fn a_freed_samples_region_serves_the_threads_next_sample_of_its_class_zeroed_when_asked() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Every allocation is sampled (a mean of one byte between samples).
    memtel::alloc::set_heap_sample_interval(1);
    let component = memtel::component("spare_regions");
    let start = component.live_bytes();
    let reused = std::thread::spawn(move || {
        component.in_scope(|| {
            [24usize, 100, 1000, 4000]
                .iter()
                .map(|&size| {
                    let written = black_box(vec![0xABu8; size]);
                    let first = written.as_ptr() as usize;
                    drop(written);
                    // `vec![0; n]` asks for zeroed memory: the spare held 0xAB bytes.
                    let zeroed = black_box(vec![0u8; size]);
                    assert!(zeroed.iter().all(|&b| b == 0), "{size} B: not zeroed");
                    (size, zeroed.as_ptr() as usize == first)
                })
                .collect::<Vec<_>>()
        })
    })
    .join()
    .expect("the sampling thread");
    memtel::alloc::set_heap_sample_interval(0);
    for (size, same) in reused {
        assert!(
            same,
            "{size} B: the next sample of the class did not get the freed region"
        );
    }
    assert_eq!(
        component.live_bytes(),
        start,
        "a kept region still counted in its component"
    );
}
