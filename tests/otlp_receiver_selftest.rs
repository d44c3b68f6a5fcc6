//! Proves the in-process OTLP receivers in `support/otlp.rs` decode what the
//! real `opentelemetry-otlp` 0.33 exporters send, over gRPC and HTTP/protobuf.
#![cfg(all(feature = "http", feature = "service"))]

#[path = "support/otlp.rs"]
mod otlp;

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{MetricExporter, Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

use otlp::{Kind, OtlpReceiver, Point};

const WAIT: Duration = Duration::from_secs(10);

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("memtel.selftest")
        .with_version("9.8.7")
        .build()
}

fn resource() -> Resource {
    Resource::builder().with_service_name("selftest").build()
}

/// Record one i64 up-down counter and one observable f64 gauge, flush, shut
/// down. Runs on a blocking thread (force_flush/shutdown block; the reqwest
/// blocking client must not be dropped on an async worker).
fn record_metrics(exporter: MetricExporter) {
    let reader = PeriodicReader::builder(exporter)
        // Long interval: only force_flush and shutdown export.
        .with_interval(Duration::from_secs(3600))
        .build();
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource())
        .build();
    let meter = provider.meter_with_scope(scope());

    let counter = meter
        .i64_up_down_counter("selftest.value")
        .with_unit("By")
        .with_description("a value")
        .build();
    counter.add(42, &[KeyValue::new("k", "v")]);

    let _gauge = meter
        .f64_observable_gauge("selftest.gauge")
        .with_unit("1")
        .with_callback(|obs| obs.observe(0.25, &[KeyValue::new("g", "h")]))
        .build();

    provider.force_flush().expect("metrics force_flush");
    provider.shutdown().expect("metrics shutdown");
}

fn record_span(exporter: SpanExporter) {
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build();
    let tracer = provider.tracer_with_scope(scope());
    let mut span = tracer
        .span_builder("selftest.span")
        .with_attributes([KeyValue::new("n", 7_i64), KeyValue::new("s", "x")])
        .start(&tracer);
    span.set_attribute(KeyValue::new("late", true));
    span.end();
    provider.force_flush().expect("traces force_flush");
    provider.shutdown().expect("traces shutdown");
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn find<'a>(points: &'a [Point], name: &str) -> &'a Point {
    let found: Vec<&Point> = otlp::points_named(points, name);
    assert_eq!(found.len(), 1, "exactly one {name} point in {points:#?}");
    found[0]
}

fn check_metric_points(points: &[Point]) {
    let p = find(points, "selftest.value");
    assert_eq!(p.unit, "By");
    assert_eq!(p.description, "a value");
    assert_eq!(p.kind, Kind::Sum { monotonic: false });
    assert_eq!(p.attributes, map(&[("k", "v")]));
    assert_eq!(p.value, 42.0);
    assert_eq!(p.int_value, Some(42));
    assert_eq!(p.resource.get("service.name").map(String::as_str), Some("selftest"));
    assert_eq!(
        p.resource.get("telemetry.sdk.language").map(String::as_str),
        Some("rust")
    );
    assert_eq!(p.scope_name, "memtel.selftest");
    assert_eq!(p.scope_version, "9.8.7");

    let g = find(points, "selftest.gauge");
    assert_eq!(g.kind, Kind::Gauge);
    assert_eq!(g.unit, "1");
    assert_eq!(g.attributes, map(&[("g", "h")]));
    assert_eq!(g.value, 0.25);
    assert_eq!(g.int_value, None);
    assert_eq!(g.scope_name, "memtel.selftest");
}

async fn check_metrics(rx: &OtlpReceiver) {
    assert!(
        rx.wait_for_metrics(|r| r.len() >= 2, WAIT).await,
        "expected flush + shutdown exports, got {:?} (errors: {:?})",
        rx.metric_requests().len(),
        rx.errors()
    );
    let reqs = rx.metric_requests();
    assert_eq!(reqs.len(), 2, "one export per force_flush and shutdown");
    // First request: the force_flush export.
    check_metric_points(&otlp::points(&reqs[..1]));
    // Last request: the shutdown export (cumulative, so same values).
    check_metric_points(&otlp::last_export_points(&reqs));
    assert_eq!(otlp::points(&reqs).len(), 4);
    assert!(rx.errors().is_empty(), "{:?}", rx.errors());
    assert!(rx.trace_requests().is_empty());
}

async fn check_traces(rx: &OtlpReceiver) {
    assert!(
        rx.wait_for_traces(|r| !otlp::spans(r).is_empty(), WAIT).await,
        "no span received (errors: {:?})",
        rx.errors()
    );
    let spans = otlp::spans(&rx.trace_requests());
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let s = &spans[0];
    assert_eq!(s.name, "selftest.span");
    assert_eq!(s.attributes, map(&[("n", "7"), ("s", "x"), ("late", "true")]));
    assert_eq!(s.resource.get("service.name").map(String::as_str), Some("selftest"));
    assert_eq!(s.scope_name, "memtel.selftest");
    assert!(rx.errors().is_empty(), "{:?}", rx.errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_receiver_decodes_sdk_metrics() {
    let rx = OtlpReceiver::start_grpc().await;
    assert_eq!(rx.metrics_endpoint(), rx.endpoint());
    // The tonic exporter needs a runtime context when built (its channel
    // spawns a worker); a spawn_blocking thread has one.
    let endpoint = rx.metrics_endpoint();
    tokio::task::spawn_blocking(move || {
        let exporter = MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .expect("build tonic metric exporter");
        record_metrics(exporter);
    })
    .await
    .expect("metrics thread");
    check_metrics(&rx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_receiver_decodes_sdk_metrics() {
    let rx = OtlpReceiver::start_http().await;
    assert_eq!(rx.metrics_endpoint(), format!("{}/v1/metrics", rx.endpoint()));
    let endpoint = rx.metrics_endpoint();
    tokio::task::spawn_blocking(move || {
        let exporter = MetricExporter::builder()
            .with_http()
            // Pin protobuf: the default depends on features/env
            // (http-json wins if enabled, OTEL_EXPORTER_OTLP_PROTOCOL next).
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .expect("build http metric exporter");
        record_metrics(exporter);
    })
    .await
    .expect("metrics thread");
    check_metrics(&rx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_receiver_decodes_sdk_spans() {
    let rx = OtlpReceiver::start_grpc().await;
    let endpoint = rx.traces_endpoint();
    tokio::task::spawn_blocking(move || {
        let exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .expect("build tonic span exporter");
        record_span(exporter);
    })
    .await
    .expect("trace thread");
    check_traces(&rx).await;
    assert!(rx.metric_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_receiver_decodes_sdk_spans() {
    let rx = OtlpReceiver::start_http().await;
    assert_eq!(rx.traces_endpoint(), format!("{}/v1/traces", rx.endpoint()));
    let endpoint = rx.traces_endpoint();
    tokio::task::spawn_blocking(move || {
        let exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .expect("build http span exporter");
        record_span(exporter);
    })
    .await
    .expect("trace thread");
    check_traces(&rx).await;
    assert!(rx.metric_requests().is_empty());
}

/// The HTTP receiver refuses non-protobuf bodies and answers protobuf on success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_receiver_rejects_bad_requests() {
    let rx = OtlpReceiver::start_http().await;
    let url = rx.metrics_endpoint();
    let (json_status, bad_status, ok) = tokio::task::spawn_blocking(move || {
        let client = reqwest::blocking::Client::new();
        let json = client
            .post(&url)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .expect("post json");
        let bad = client
            .post(&url)
            .header("content-type", "application/x-protobuf")
            .body(vec![0xff_u8, 0xff, 0xff])
            .send()
            .expect("post garbage");
        let ok = client
            .post(&url)
            .header("content-type", "application/x-protobuf")
            .body(Vec::new())
            .send()
            .expect("post empty request");
        let ok_ct = ok
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (
            json.status().as_u16(),
            bad.status().as_u16(),
            (ok.status().as_u16(), ok_ct),
        )
    })
    .await
    .expect("client thread");
    assert_eq!(json_status, 415);
    assert_eq!(bad_status, 400);
    assert_eq!(ok, (200, Some("application/x-protobuf".to_owned())));
    assert_eq!(rx.errors().len(), 2, "{:?}", rx.errors());
    assert_eq!(rx.metric_requests().len(), 1);
    assert!(otlp::points(&rx.metric_requests()).is_empty());
}

/// Dropping the receiver stops the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_stops_server() {
    for rx in [OtlpReceiver::start_grpc().await, OtlpReceiver::start_http().await] {
        let addr = rx.addr();
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
        drop(rx);
        let mut refused = false;
        for _ in 0..50 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "{addr} still accepting after drop");
    }
}
