//! Tracked component bytes in the JSON and OTLP views, and span attributes carrying
//! the bytes a span allocated, received by a real OTLP trace receiver.
#![cfg(all(feature = "service", feature = "jemalloc", feature = "tracing"))]

#[path = "support/http.rs"]
mod http;
#[path = "support/otlp.rs"]
mod otlp;
#[path = "support/truth.rs"]
mod truth;

use memtel::alloc::TrackingAllocator;
use memtel::{component, MemoryMonitor, PROFILE_PATH};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use truth::{record, Truth};

#[global_allocator]
static GLOBAL: Truth<TrackingAllocator<tikv_jemallocator::Jemalloc>> =
    Truth(TrackingAllocator::new(tikv_jemallocator::Jemalloc));

const MIB: f64 = 1_048_576.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_bytes_in_json_and_otlp_within_one_percent() {
    let cache = component("view_cache");
    let (held, allocated, freed) = record(|| {
        cache.in_scope(|| {
            let mut pages: Vec<Vec<u8>> = (0..40).map(|i| vec![i as u8; 1 << 20]).collect();
            pages.extend((0..24).map(|i| vec![i as u8; 1 << 20]));
            pages
        })
    });
    let truth = allocated - freed;
    assert_eq!(cache.live_bytes(), truth);
    let monitor = MemoryMonitor::builder().limit_bytes(8 << 30).build();
    // A reported component for memory the allocator cannot see.
    monitor.component("view_external", || 10 << 20).unwrap();

    let doc = tokio::task::spawn_blocking({
        let monitor = monitor.clone();
        move || {
            let server = http::TestServer::start(memtel::router(monitor));
            server.get_json(&reqwest::blocking::Client::new(), PROFILE_PATH)
        }
    })
    .await
    .unwrap();
    let json_mb = doc["by_component"]["view_cache"].as_f64().unwrap();
    assert!(
        (json_mb * MIB - truth as f64).abs() / (truth as f64) < 0.01,
        "JSON {json_mb} MB vs {truth}"
    );
    assert_eq!(doc["by_component"]["view_external"], 10);
    assert_eq!(doc["by_component_source"], "mixed", "tracked and reported together");
    assert!(doc["by_component"]["other"].is_u64());

    let receiver = otlp::OtlpReceiver::start_grpc().await;
    receiver.export_monitor(monitor).await;
    let points = otlp::points(&receiver.metric_requests()[..1]);
    let find = |metric: &str, name: &str| {
        otlp::points_named(&points, metric)
            .into_iter()
            .find(|p| p.attributes["memtel.component"] == name)
            .unwrap_or_else(|| panic!("{metric}{{{name}}} exported"))
            .clone()
    };
    let usage = find("memtel.component.usage", "view_cache");
    assert!(
        (usage.value - truth as f64).abs() / (truth as f64) < 0.01,
        "OTLP {} vs {truth}",
        usage.value
    );
    let allocated_counter = find("memtel.component.allocated", "view_cache");
    assert_eq!(allocated_counter.kind, otlp::Kind::Sum { monotonic: true });
    assert_eq!(allocated_counter.unit, "By");
    assert!(allocated_counter.value >= allocated as f64);
    assert!(find("memtel.component.allocated", "other").value > 0.0);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_bytes_they_allocated_to_an_otlp_receiver() {
    let receiver = otlp::OtlpReceiver::start_grpc().await;
    let endpoint = receiver.endpoint();
    let (kept, truth) = tokio::task::spawn_blocking(move || {
        let exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .unwrap();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter).build();
        let subscriber = tracing_subscriber::registry()
            .with(memtel::ComponentLayer::new())
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("alloc-views")));
        let result = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("build_cache", component = "span_cache");
            // The truth: what the code inside the span asked for, counted independently.
            let (kept, allocated, freed) = span.in_scope(|| {
                record(|| {
                    let kept = vec![1u8; 300_000];
                    let temporary: Vec<String> = (0..100).map(|i| i.to_string()).collect();
                    drop(temporary);
                    kept
                })
            });
            drop(span);
            (kept, (allocated, freed))
        });
        provider.force_flush().unwrap();
        provider.shutdown().unwrap();
        result
    })
    .await
    .unwrap();
    assert!(
        component("span_cache").live_bytes() >= 300_000,
        "the span's component scope attributed the heap"
    );

    let spans = otlp::spans(&receiver.trace_requests());
    let span = spans.iter().find(|s| s.name == "build_cache").expect("span exported");
    let bytes: u64 = span.attributes["memtel.alloc.bytes"].parse().unwrap();
    let count: u64 = span.attributes["memtel.alloc.count"].parse().unwrap();
    let freed: u64 = span.attributes["memtel.dealloc.bytes"].parse().unwrap();
    let (allocated_truth, freed_truth) = truth;
    // The span's figures also include what other tracing layers allocate while it is
    // entered (tracing-opentelemetry's context on enter: a few hundred bytes at most).
    assert!(
        bytes >= allocated_truth && bytes - allocated_truth < 2048,
        "{bytes} vs {allocated_truth}"
    );
    assert!(
        freed >= freed_truth && freed - freed_truth < 2048,
        "{freed} vs {freed_truth}"
    );
    assert!(count >= 102, "one Vec + 100 Strings + the Vec of Strings: {count}");
    drop(kept);
}
