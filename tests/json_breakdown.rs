//! `by_component` is a breakdown of `total_allocated_mb`: with the tracking allocator the
//! entries add up to the total exactly, on a live document whose components hold known
//! bytes in fractions of a MB (rounded one by one, they would add up to 2 MB less), and
//! still when a component also reports memory the allocator cannot see. The total is
//! checked against the known bytes below and jemalloc's own figure above; memtel's own
//! cache is shown beside it, in the JSON and as `memtel.alloc.cache` over OTLP, within
//! what jemalloc holds beyond the tracked bytes.
#![cfg(all(feature = "service", feature = "jemalloc"))]

#[path = "support/http.rs"]
mod http;
#[path = "support/otlp.rs"]
mod otlp;
#[path = "support/process.rs"]
mod process;

use std::collections::BTreeMap;
use std::time::Duration;

use memtel::alloc::TrackingAllocator;
use memtel::{component, MemoryMonitor, PROFILE_PATH};
use process::MIB;
use serde_json::Value;

#[global_allocator]
static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> = TrackingAllocator::new(tikv_jemallocator::Jemalloc);

/// Tests here compare process-wide figures: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const M: usize = 1 << 20;

/// Known bytes per component: three of a few MB and a fraction, six of 0.4 MB. Each
/// rounded alone: 6 + 3 + 8 + 6 × 0 = 17 MB, against 18.9 MB held.
fn known() -> Vec<(String, usize)> {
    let mut parts = vec![
        ("sum_a".to_owned(), 5 * M + M / 2),
        ("sum_b".to_owned(), 3 * M + M * 4 / 10),
        ("sum_c".to_owned(), 7 * M + M * 6 / 10),
    ];
    parts.extend((0..6).map(|i| (format!("sum_small{i}"), M * 4 / 10)));
    parts
}

/// Buffers of exactly the known sizes, each allocated in its component's scope.
fn hold(parts: &[(String, usize)]) -> Vec<Vec<u8>> {
    parts
        .iter()
        .map(|(name, bytes)| {
            let buffer = component(name).in_scope(|| vec![0x5A; *bytes]);
            assert_eq!(component(name).live_bytes(), *bytes as u64, "{name} holds its buffer");
            buffer
        })
        .collect()
}

/// A monitor whose snapshots live for `window`: zero for one document per snapshot, long
/// for one snapshot behind every callback of an export.
fn monitor(window: Duration) -> MemoryMonitor {
    MemoryMonitor::builder()
        .limit_bytes(8 << 30)
        .cache_window(window)
        .jemalloc_max_age(Duration::ZERO)
        .build()
}

fn by_component(doc: &Value) -> BTreeMap<String, u64> {
    doc["by_component"]
        .as_object()
        .unwrap_or_else(|| panic!("by_component is an object: {doc}"))
        .iter()
        .map(|(name, mb)| {
            (
                name.clone(),
                mb.as_u64().unwrap_or_else(|| panic!("{name} is an integer")),
            )
        })
        .collect()
}

fn num(doc: &Value, path: &str) -> f64 {
    doc.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} is not a number in {doc}"))
}

/// The entries add up to the total, to the MB.
fn assert_adds_up(doc: &Value) -> u64 {
    let parts = by_component(doc);
    let total = doc["total_allocated_mb"]
        .as_u64()
        .expect("total_allocated_mb is an integer");
    assert_eq!(
        parts.values().sum::<u64>(),
        total,
        "by_component adds up to total_allocated_mb: {doc}"
    );
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_components_add_up_to_the_total() {
    let _serial = SERIAL.lock().await;
    let parts = known();
    let held = hold(&parts);
    let monitor = monitor(Duration::ZERO);
    let (doc, allocated_after) = tokio::task::spawn_blocking({
        let monitor = monitor.clone();
        move || {
            let server = http::TestServer::start(memtel::router(monitor));
            let doc = server.get_json(&reqwest::blocking::Client::new(), PROFILE_PATH);
            (doc, process::jemalloc_allocated_resident().0)
        }
    })
    .await
    .unwrap();

    assert_eq!(doc["by_component_source"], "tracked");
    let total = assert_adds_up(&doc);
    let shown = by_component(&doc);
    for (name, bytes) in &parts {
        let mb = shown[name] as f64;
        assert!(
            (mb - *bytes as f64 / MIB).abs() < 1.0,
            "{name}: {mb} MB for {bytes} bytes: {doc}"
        );
    }
    // Below: every known byte is in the total. Above: the total is requested bytes, so
    // never more than jemalloc allocated for them (read directly, after the document).
    let known_total: usize = parts.iter().map(|(_, bytes)| bytes).sum();
    assert!(
        total as f64 >= (known_total / M) as f64,
        "total {total} MB holds {known_total} bytes"
    );
    assert!(
        total as f64 <= allocated_after as f64 / MIB + 1.0,
        "total {total} MB within jemalloc's {allocated_after} bytes"
    );
    // The document's own jemalloc figure: the total plus size-class rounding and caches,
    // memtel's among them.
    let jemalloc_allocated = num(&doc, "/jemalloc/allocated_mb");
    let cache = num(&doc, "/tracking/cache_mb");
    assert!(jemalloc_allocated >= total as f64 - 1.0, "{doc}");
    assert!(
        (0.0..=jemalloc_allocated - total as f64 + 1.0).contains(&cache),
        "memtel's cache {cache} MB is within jemalloc's allocated beyond the tracked bytes: {doc}"
    );

    // A component that also reports memory outside the heap: its bytes join the
    // component and the total, and the breakdown still adds up.
    const EXTERNAL: u64 = 10 << 20;
    monitor.component("sum_a", || EXTERNAL).unwrap();
    let doc2 = tokio::task::spawn_blocking(move || {
        let server = http::TestServer::start(memtel::router(monitor));
        server.get_json(&reqwest::blocking::Client::new(), PROFILE_PATH)
    })
    .await
    .unwrap();
    assert_eq!(doc2["by_component_source"], "mixed");
    let total2 = assert_adds_up(&doc2);
    let a = by_component(&doc2)["sum_a"] as f64;
    let expected = (parts[0].1 as u64 + EXTERNAL) as f64 / MIB;
    assert!(
        (a - expected).abs() < 1.0,
        "sum_a: {a} MB, {expected} held and reported: {doc2}"
    );
    assert!(
        (total2 as f64 - total as f64 - EXTERNAL as f64 / MIB).abs() <= 1.0,
        "the reported bytes join the total: {total} -> {total2}"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_add_up_and_carry_the_allocator_cache() {
    let _serial = SERIAL.lock().await;
    let parts = known();
    let held = hold(&parts);
    let receiver = otlp::OtlpReceiver::start_grpc().await;
    receiver.export_monitor(monitor(Duration::from_secs(60))).await;
    let points = otlp::points(&receiver.metric_requests()[..1]);
    let single = |name: &str| {
        let found = otlp::points_named(&points, name);
        assert_eq!(found.len(), 1, "{name} has one data point");
        found[0].clone()
    };

    // In bytes, exactly: the components and other are the heap.
    let heap = single("memtel.heap.allocated").value;
    let usage: f64 = otlp::points_named(&points, "memtel.component.usage")
        .iter()
        .map(|p| p.value)
        .sum();
    assert_eq!(usage, heap, "memtel.component.usage adds up to memtel.heap.allocated");

    let cache = single("memtel.alloc.cache");
    assert_eq!(cache.kind, otlp::Kind::Sum { monotonic: false });
    assert_eq!(cache.unit, "By");
    assert!(cache.attributes.is_empty());
    let jemalloc_allocated = otlp::points_named(&points, "jemalloc.memory")
        .into_iter()
        .find(|p| p.attributes["jemalloc.stat"] == "allocated")
        .expect("jemalloc.memory{allocated}")
        .value;
    assert!(
        cache.value >= 0.0 && cache.value <= jemalloc_allocated - heap + MIB,
        "cache {} within jemalloc's allocated {jemalloc_allocated} beyond the heap {heap}",
        cache.value
    );
    drop(held);
}
