//! In-process OTLP receivers (gRPC via tonic, HTTP/protobuf via axum) built from
//! `opentelemetry-proto`, plus helpers that flatten the received requests into
//! easy-to-assert records.
//!
//! Include from an integration test with
//! `#[path = "support/otlp.rs"] mod otlp;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::{
    metrics_service_server::{MetricsService, MetricsServiceServer},
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, NumberDataPoint};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Everything a receiver has stored so far.
#[derive(Default)]
struct Store {
    metrics: Mutex<Vec<ExportMetricsServiceRequest>>,
    traces: Mutex<Vec<ExportTraceServiceRequest>>,
    /// Requests the HTTP receiver refused (bad content type, undecodable body).
    errors: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread must not hide the data from the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// A real OTLP receiver listening on `127.0.0.1:<ephemeral>`. Dropping it stops
/// the server.
pub struct OtlpReceiver {
    transport: Transport,
    addr: SocketAddr,
    store: Arc<Store>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl OtlpReceiver {
    /// Start an OTLP/gRPC receiver (MetricsService + TraceService) on the
    /// current tokio runtime.
    pub async fn start_grpc() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gRPC receiver");
        let addr = listener.local_addr().expect("local addr");
        let store = Arc::new(Store::default());
        let (tx, rx) = oneshot::channel::<()>();
        let svc = GrpcSvc(store.clone());
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(MetricsServiceServer::new(svc.clone()))
                .add_service(TraceServiceServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = result {
                eprintln!("OTLP gRPC receiver on {addr} stopped with error: {e}");
            }
        });
        OtlpReceiver {
            transport: Transport::Grpc,
            addr,
            store,
            shutdown: Some(tx),
            task,
        }
    }

    /// Start an OTLP/HTTP (protobuf) receiver serving `POST /v1/metrics` and
    /// `POST /v1/traces` on the current tokio runtime.
    #[cfg(feature = "http")]
    pub async fn start_http() -> Self {
        use axum::routing::post;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind HTTP receiver");
        let addr = listener.local_addr().expect("local addr");
        let store = Arc::new(Store::default());
        let (tx, rx) = oneshot::channel::<()>();
        let app = axum::Router::new()
            .route("/v1/metrics", post(http_metrics))
            .route("/v1/traces", post(http_traces))
            .with_state(store.clone());
        let task = tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = result {
                eprintln!("OTLP HTTP receiver on {addr} stopped with error: {e}");
            }
        });
        OtlpReceiver {
            transport: Transport::Http,
            addr,
            store,
            shutdown: Some(tx),
            task,
        }
    }

    /// Registers memtel's instruments for `monitor` on an SDK provider exporting to
    /// this receiver (service.name `memtel-test`), flushes once and shuts down. The SDK
    /// calls block, so they run on a blocking thread of the caller's runtime.
    #[cfg(feature = "service")]
    pub async fn export_monitor(&self, monitor: memtel::MemoryMonitor) {
        use opentelemetry::metrics::MeterProvider as _;
        use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig};
        use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};

        let (transport, endpoint) = (self.transport, self.metrics_endpoint());
        tokio::task::spawn_blocking(move || {
            let exporter = match transport {
                Transport::Grpc => MetricExporter::builder().with_tonic().with_endpoint(endpoint).build(),
                Transport::Http => MetricExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(endpoint)
                    .build(),
            }
            .expect("exporter");
            let provider = SdkMeterProvider::builder()
                // Only the flush exports.
                .with_reader(
                    PeriodicReader::builder(exporter)
                        .with_interval(Duration::from_secs(3600))
                        .build(),
                )
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("memtel-test")
                        .build(),
                )
                .build();
            memtel::register(&monitor, &provider.meter_with_scope(memtel::scope()));
            provider.force_flush().expect("flush");
            provider.shutdown().expect("shutdown");
        })
        .await
        .expect("export thread");
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (gRPC endpoint, or the HTTP base URL).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What to pass to `.with_endpoint(..)` of a metric exporter: the HTTP
    /// exporter wants the full signal URL, gRPC just the base.
    pub fn metrics_endpoint(&self) -> String {
        match self.transport {
            Transport::Grpc => self.endpoint(),
            Transport::Http => format!("{}/v1/metrics", self.endpoint()),
        }
    }

    /// Same as [`Self::metrics_endpoint`] for traces.
    pub fn traces_endpoint(&self) -> String {
        match self.transport {
            Transport::Grpc => self.endpoint(),
            Transport::Http => format!("{}/v1/traces", self.endpoint()),
        }
    }

    pub fn metric_requests(&self) -> Vec<ExportMetricsServiceRequest> {
        lock(&self.store.metrics).clone()
    }

    pub fn trace_requests(&self) -> Vec<ExportTraceServiceRequest> {
        lock(&self.store.traces).clone()
    }

    /// Requests the HTTP receiver answered with an error status (with reason).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.store.errors).clone()
    }

    /// Forget everything received so far.
    pub fn clear(&self) {
        lock(&self.store.metrics).clear();
        lock(&self.store.traces).clear();
        lock(&self.store.errors).clear();
    }

    /// Poll (every 20 ms) until `pred` holds for the metric requests received so
    /// far; `false` on timeout.
    pub async fn wait_for_metrics(
        &self,
        pred: impl Fn(&[ExportMetricsServiceRequest]) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&lock(&self.store.metrics)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Poll (every 20 ms) until `pred` holds for the trace requests received so
    /// far; `false` on timeout.
    pub async fn wait_for_traces(
        &self,
        pred: impl Fn(&[ExportTraceServiceRequest]) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&lock(&self.store.traces)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Graceful shutdown waits for open connections (exporters keep them
        // alive), so also abort the task outright.
        self.task.abort();
    }
}

// ---------------------------------------------------------------- gRPC

#[derive(Clone)]
struct GrpcSvc(Arc<Store>);

#[tonic::async_trait]
impl MetricsService for GrpcSvc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        lock(&self.0.metrics).push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for GrpcSvc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        lock(&self.0.traces).push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

// ---------------------------------------------------------------- HTTP

#[cfg(feature = "http")]
const PROTOBUF: &str = "application/x-protobuf";

#[cfg(feature = "http")]
type HttpReply = (
    axum::http::StatusCode,
    [(axum::http::header::HeaderName, &'static str); 1],
    Vec<u8>,
);

#[cfg(feature = "http")]
fn decode_http<T: prost::Message + Default>(
    store: &Store,
    path: &str,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Result<T, HttpReply> {
    use axum::http::{header, StatusCode};

    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let reject = |status: StatusCode, reason: String| {
        lock(&store.errors).push(format!("{path}: {reason}"));
        (status, [(header::CONTENT_TYPE, "text/plain")], reason.into_bytes())
    };
    if !content_type.starts_with(PROTOBUF) {
        return Err(reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported content-type {content_type:?}"),
        ));
    }
    if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
        return Err(reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported content-encoding {enc:?}"),
        ));
    }
    T::decode(body).map_err(|e| reject(StatusCode::BAD_REQUEST, format!("decode error: {e}")))
}

#[cfg(feature = "http")]
fn ok_reply(body: Vec<u8>) -> HttpReply {
    (
        axum::http::StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, PROTOBUF)],
        body,
    )
}

#[cfg(feature = "http")]
async fn http_metrics(
    axum::extract::State(store): axum::extract::State<Arc<Store>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> HttpReply {
    use prost::Message;
    match decode_http::<ExportMetricsServiceRequest>(&store, "/v1/metrics", &headers, &body) {
        Ok(req) => {
            lock(&store.metrics).push(req);
            ok_reply(ExportMetricsServiceResponse::default().encode_to_vec())
        }
        Err(reply) => reply,
    }
}

#[cfg(feature = "http")]
async fn http_traces(
    axum::extract::State(store): axum::extract::State<Arc<Store>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> HttpReply {
    use prost::Message;
    match decode_http::<ExportTraceServiceRequest>(&store, "/v1/traces", &headers, &body) {
        Ok(req) => {
            lock(&store.traces).push(req);
            ok_reply(ExportTraceServiceResponse::default().encode_to_vec())
        }
        Err(reply) => reply,
    }
}

// ---------------------------------------------------------------- flattening

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Gauge,
    Sum { monotonic: bool },
    Histogram,
    Other,
}

/// One data point with everything around it flattened in.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub metric: String,
    pub unit: String,
    pub description: String,
    pub kind: Kind,
    pub attributes: BTreeMap<String, String>,
    /// `as_double`, or `as_int` converted; for histograms the sum (0 if absent).
    pub value: f64,
    /// `Some` only for `as_int` number points.
    pub int_value: Option<i64>,
    pub resource: BTreeMap<String, String>,
    pub scope_name: String,
    pub scope_version: String,
}

/// Render an OTLP `AnyValue` as a string: strings as-is, ints in decimal,
/// bools as `true`/`false`, doubles with `{}`, arrays as `[a,b]`, kv-lists as
/// `{k=v,..}`, bytes as lowercase hex.
pub fn any_value_string(v: Option<&AnyValue>) -> String {
    use any_value::Value;
    match v.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(|v| any_value_string(Some(v))).collect();
            format!("[{}]", items.join(","))
        }
        Some(Value::KvlistValue(kv)) => {
            let items: Vec<String> = kv
                .values
                .iter()
                .map(|kv| format!("{}={}", kv.key, any_value_string(kv.value.as_ref())))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        Some(Value::BytesValue(b)) => b.iter().map(|b| format!("{b:02x}")).collect(),
        Some(Value::StringValueStrindex(i)) => format!("strindex:{i}"),
    }
}

pub fn attr_map(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), any_value_string(kv.value.as_ref())))
        .collect()
}

fn resource_map(r: Option<&Resource>) -> BTreeMap<String, String> {
    r.map(|r| attr_map(&r.attributes)).unwrap_or_default()
}

fn scope_parts(s: Option<&InstrumentationScope>) -> (String, String) {
    s.map(|s| (s.name.clone(), s.version.clone())).unwrap_or_default()
}

/// All data points of all requests, in order received.
pub fn points(reqs: &[ExportMetricsServiceRequest]) -> Vec<Point> {
    let mut out = Vec::new();
    for req in reqs {
        for rm in &req.resource_metrics {
            let resource = resource_map(rm.resource.as_ref());
            for sm in &rm.scope_metrics {
                let (scope_name, scope_version) = scope_parts(sm.scope.as_ref());
                for m in &sm.metrics {
                    let base = Point {
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        description: m.description.clone(),
                        kind: Kind::Other,
                        attributes: BTreeMap::new(),
                        value: 0.0,
                        int_value: None,
                        resource: resource.clone(),
                        scope_name: scope_name.clone(),
                        scope_version: scope_version.clone(),
                    };
                    let number = |kind: Kind, dp: &NumberDataPoint| {
                        let (value, int_value) = match dp.value {
                            Some(number_data_point::Value::AsDouble(d)) => (d, None),
                            Some(number_data_point::Value::AsInt(i)) => (i as f64, Some(i)),
                            None => (0.0, None),
                        };
                        Point {
                            kind,
                            attributes: attr_map(&dp.attributes),
                            value,
                            int_value,
                            ..base.clone()
                        }
                    };
                    match &m.data {
                        Some(metric::Data::Gauge(g)) => {
                            out.extend(g.data_points.iter().map(|dp| number(Kind::Gauge, dp)))
                        }
                        Some(metric::Data::Sum(s)) => {
                            let kind = Kind::Sum {
                                monotonic: s.is_monotonic,
                            };
                            out.extend(s.data_points.iter().map(|dp| number(kind.clone(), dp)))
                        }
                        Some(metric::Data::Histogram(h)) => out.extend(h.data_points.iter().map(|dp| Point {
                            kind: Kind::Histogram,
                            attributes: attr_map(&dp.attributes),
                            value: dp.sum.unwrap_or(0.0),
                            ..base.clone()
                        })),
                        Some(metric::Data::ExponentialHistogram(h)) => {
                            out.extend(h.data_points.iter().map(|dp| Point {
                                attributes: attr_map(&dp.attributes),
                                value: dp.sum.unwrap_or(0.0),
                                ..base.clone()
                            }))
                        }
                        Some(metric::Data::Summary(s)) => out.extend(s.data_points.iter().map(|dp| Point {
                            attributes: attr_map(&dp.attributes),
                            value: dp.sum,
                            ..base.clone()
                        })),
                        None => out.push(base),
                    }
                }
            }
        }
    }
    out
}

/// The points of the last request only (empty if nothing was received).
pub fn last_export_points(reqs: &[ExportMetricsServiceRequest]) -> Vec<Point> {
    match reqs.last() {
        Some(last) => points(std::slice::from_ref(last)),
        None => Vec::new(),
    }
}

/// Points named `metric`, in order.
pub fn points_named<'a>(points: &'a [Point], metric: &str) -> Vec<&'a Point> {
    points.iter().filter(|p| p.metric == metric).collect()
}

/// One span, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRec {
    pub name: String,
    /// Attribute values rendered with [`any_value_string`] (ints in decimal).
    pub attributes: BTreeMap<String, String>,
    pub resource: BTreeMap<String, String>,
    pub scope_name: String,
}

/// All spans of all requests, in order received.
pub fn spans(reqs: &[ExportTraceServiceRequest]) -> Vec<SpanRec> {
    let mut out = Vec::new();
    for req in reqs {
        for rs in &req.resource_spans {
            let resource = resource_map(rs.resource.as_ref());
            for ss in &rs.scope_spans {
                let (scope_name, _) = scope_parts(ss.scope.as_ref());
                for s in &ss.spans {
                    out.push(SpanRec {
                        name: s.name.clone(),
                        attributes: attr_map(&s.attributes),
                        resource: resource.clone(),
                        scope_name: scope_name.clone(),
                    });
                }
            }
        }
    }
    out
}
