//! A component holding a known number of bytes shows them in both views.
#![cfg(all(feature = "service", feature = "jemalloc"))]

#[path = "support/http.rs"]
mod http;
#[path = "support/otlp.rs"]
mod otlp;
#[path = "support/process.rs"]
mod process;

use std::sync::{Arc, Mutex};

use memtel::{MemoryMonitor, PROFILE_PATH};
use process::{rel_diff, MIB};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A component that owns buffers and reports what it holds, as an application would.
#[derive(Default, Clone)]
struct Buffers(Arc<Mutex<Vec<Vec<u8>>>>);

impl Buffers {
    fn hold(&self, bytes: usize) {
        self.0.lock().unwrap().push(vec![0xA5; bytes]);
    }
    fn bytes(&self) -> u64 {
        self.0.lock().unwrap().iter().map(|b| b.capacity() as u64).sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_bytes_show_in_json_and_otlp() {
    const HELD: usize = 48 << 20;
    let monitor = MemoryMonitor::builder().limit_bytes(4 << 30).build();
    let (cache, api) = (Buffers::default(), Buffers::default());
    let reported = cache.clone();
    monitor.component("cache", move || reported.bytes()).unwrap();
    let reported = api.clone();
    monitor.component("api", move || reported.bytes()).unwrap();

    let (allocated_before, _) = process::jemalloc_allocated_resident();
    // 48 MiB in three pieces; the api component holds 8 MiB.
    for _ in 0..3 {
        cache.hold(HELD / 3);
    }
    api.hold(8 << 20);
    let (allocated_after, _) = process::jemalloc_allocated_resident();
    assert!(
        (allocated_after - allocated_before) as f64 >= 0.99 * (HELD + (8 << 20)) as f64,
        "the bytes are really on the heap: {allocated_before} -> {allocated_after}"
    );

    // JSON over a real socket.
    let server = tokio::task::spawn_blocking({
        let monitor = monitor.clone();
        move || {
            let server = http::TestServer::start(memtel::router(monitor));
            let client = reqwest::blocking::Client::new();
            let doc = server.get_json(&client, PROFILE_PATH);
            drop(server);
            doc
        }
    });
    let doc = server.await.unwrap();
    let cache_mb = doc["by_component"]["cache"].as_f64().unwrap();
    assert!(
        rel_diff(cache_mb * MIB, HELD as f64) < 0.03,
        "cache {cache_mb} MB vs {HELD} bytes held"
    );
    assert_eq!(doc["by_component"]["api"], 8);
    let other = doc["by_component"]["other"].as_f64().unwrap();
    let total = doc["total_allocated_mb"].as_f64().unwrap();
    assert!(
        (total - cache_mb - 8.0 - other).abs() <= 1.5,
        "other is the remainder: {doc}"
    );

    // OTLP/gRPC into a real receiver.
    let receiver = otlp::OtlpReceiver::start_grpc().await;
    receiver.export_monitor(monitor).await;
    let points = otlp::points(&receiver.metric_requests()[..1]);
    let usage = |name: &str| {
        otlp::points_named(&points, "memtel.component.usage")
            .into_iter()
            .find(|p| p.attributes["memtel.component"] == name)
            .unwrap_or_else(|| panic!("component {name} exported"))
            .value
    };
    assert!(
        rel_diff(usage("cache"), HELD as f64) < 0.03,
        "cache {} vs {HELD}",
        usage("cache")
    );
    assert!(rel_diff(usage("api"), (8 << 20) as f64) < 0.03);
    let heap = otlp::points_named(&points, "memtel.heap.allocated")[0].value;
    assert_eq!(usage("other"), heap - usage("cache") - usage("api"));
    drop((cache, api));
}
