//! `GET /metrics`: one snapshot in Prometheus's text exposition format (OpenMetrics when the
//! scraper asks for it), encoded by the official `prometheus-client` crate.
//!
//! Names, types and labels are the ones the OpenTelemetry Collector's Prometheus exporter
//! gives the same instruments (README's table): dots become underscores; unit `By` adds
//! `_bytes`, `By/s` `_bytes_per_second`, `s` `_seconds`; a gauge of unit `1` adds `_ratio`
//! (an up-down counter does not); units in braces add nothing; counters end in `_total`;
//! every series carries `otel_scope_name`, `otel_scope_version` and `otel_scope_schema_url`.
//! Use it when Prometheus scrapes the service directly; with a collector in between, the
//! collector's own exporter gives the same series.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::body_cache::{encode, respond, BodyCache, SameSnapshot, Wants};
use crate::otel::{Instrument, METRICS};
use crate::snapshot::Snapshot;
use crate::MemoryMonitor;

/// The path of the exposition.
pub const METRICS_PATH: &str = "/metrics";

type Labels = Vec<(String, String)>;

/// An axum router serving [`METRICS_PATH`] from `monitor`'s snapshots.
///
/// ```no_run
/// # #[global_allocator]
/// # static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// let monitor = memtel::MemoryMonitor::new();
/// let app: axum::Router = axum::Router::new()
///     .merge(memtel::router(monitor.clone()))
///     .merge(memtel::metrics_router(monitor));
/// # let _ = app;
/// ```
pub fn metrics_router(monitor: MemoryMonitor) -> Router {
    Router::new()
        .route(METRICS_PATH, get(metrics))
        .with_state(Arc::new(Rendered {
            monitor,
            body: BodyCache::new(4),
        }))
}

/// The monitor and the exposition rendered for its latest snapshot (one per format):
/// scrapes that share a snapshot (within its cache window) share the text too.
struct Rendered {
    monitor: MemoryMonitor,
    /// Keyed by (OpenMetrics, gzipped).
    body: BodyCache<SameSnapshot, (bool, bool)>,
}

async fn metrics(State(rendered): State<Arc<Rendered>>, wants: Wants) -> Response {
    let Wants { gzip, openmetrics } = wants;
    let snap = rendered.monitor.snapshot();
    let stale_ok = |old: &SameSnapshot| old.may_stand_in_for(&snap, &rendered.monitor);
    let body = rendered
        .body
        .get_or_render(SameSnapshot(Arc::clone(&snap)), (openmetrics, gzip), stale_ok, || {
            render(&snap, openmetrics).map(|text| encode(text.into_bytes(), gzip))
        });
    match body {
        Ok(body) => {
            let content_type = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE
            };
            respond(body, gzip, content_type)
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}\n"),
        )
            .into_response(),
    }
}

/// The Prometheus name of an instrument, without the `_total` a counter gets on encoding.
pub fn prometheus_name(name: &str, unit: &str, instrument: Instrument) -> String {
    let mut out = name.replace('.', "_");
    let gauge = matches!(instrument, Instrument::GaugeI64 | Instrument::GaugeF64);
    match unit {
        "By" => out.push_str("_bytes"),
        "By/s" => out.push_str("_bytes_per_second"),
        "s" => out.push_str("_seconds"),
        "1" if gauge => out.push_str("_ratio"),
        _ => {}
    }
    out
}

/// One snapshot as text: Prometheus 0.0.4, or OpenMetrics 1.0.
///
/// # Errors
/// Only a formatting error of the encoder.
pub fn render(snap: &Snapshot, openmetrics: bool) -> Result<String, std::fmt::Error> {
    let scope = [
        ("otel_scope_name".to_owned(), "memtel".to_owned()),
        ("otel_scope_schema_url".to_owned(), String::new()),
        ("otel_scope_version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
    ];
    let mut families = Vec::with_capacity(METRICS.len());
    for def in METRICS {
        let mut points: Vec<(f64, Labels)> = Vec::new();
        def.observe_into(snap, &mut |value, attrs| {
            let mut labels: Labels = Vec::with_capacity(attrs.len() + scope.len());
            labels.extend(
                attrs
                    .iter()
                    .map(|kv| (kv.key.as_str().replace('.', "_"), kv.value.as_str().into_owned())),
            );
            labels.extend(scope.iter().cloned());
            labels.sort();
            points.push((value, labels));
        });
        if points.is_empty() {
            continue;
        }
        families.push(Points {
            name: prometheus_name(def.name, def.unit, def.instrument),
            // As `Registry::register` would say it: one closing period.
            help: format!("{}.", def.description.trim_end_matches('.')),
            instrument: def.instrument,
            points,
        });
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families)));
    let mut out = String::new();
    if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    }
    Ok(out)
}

/// One snapshot's instruments, encoded as they are by a collector: a `Family` per
/// instrument first hashed every label set into a map, a quarter of a rendering's time,
/// and listed the series in that map's order. Here they come in the snapshot's order.
#[derive(Debug)]
struct Families(Vec<Points>);

/// One instrument's points.
#[derive(Debug)]
struct Points {
    name: String,
    help: String,
    instrument: Instrument,
    points: Vec<(f64, Labels)>,
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let counter = matches!(family.instrument, Instrument::CounterU64 | Instrument::CounterF64);
            let metric_type = if counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut metric = encoder.encode_descriptor(&family.name, &family.help, None, metric_type)?;
            for (value, labels) in &family.points {
                let series = metric.encode_family(labels)?;
                match family.instrument {
                    Instrument::CounterU64 => ConstCounter::new(*value as u64).encode(series)?,
                    Instrument::CounterF64 => ConstCounter::new(*value).encode(series)?,
                    Instrument::GaugeF64 => ConstGauge::new(*value).encode(series)?,
                    Instrument::UpDownCounterI64 | Instrument::GaugeI64 => {
                        ConstGauge::new(*value as i64).encode(series)?;
                    }
                }
            }
        }
        Ok(())
    }
}
