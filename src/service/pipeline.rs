//! The OpenTelemetry SDK pipeline, configured from the standard `OTEL_*` variables.

use std::time::Duration;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use super::settings::{parse_bool, SettingsError};

/// Where a signal goes (`OTEL_METRICS_EXPORTER`, `OTEL_TRACES_EXPORTER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exporter {
    Otlp,
    Console,
    None,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// The `OTEL_*` settings memtel validates itself (the exporter builders read
/// endpoint, headers, timeout and compression from the same variables).
#[derive(Debug, Clone)]
pub(crate) struct OtelSettings {
    pub(crate) metrics: Exporter,
    pub(crate) traces: Exporter,
    pub(crate) metrics_protocol: OtlpProtocol,
    pub(crate) traces_protocol: OtlpProtocol,
    pub(crate) interval: Option<Duration>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn bad(name: &str, value: &str, expected: &str) -> SettingsError {
    SettingsError(format!("invalid {name} {value:?}: {expected}"))
}

impl OtelSettings {
    pub(crate) fn from_env() -> Result<Self, SettingsError> {
        let disabled = match env("OTEL_SDK_DISABLED") {
            Some(v) => parse_bool(&v).ok_or_else(|| bad("OTEL_SDK_DISABLED", &v, "expected true or false"))?,
            None => false,
        };
        let exporter = |name: &str| match env(name) {
            _ if disabled => Ok(Exporter::None),
            None => Ok(Exporter::Otlp),
            Some(v) => match v.trim() {
                "otlp" => Ok(Exporter::Otlp),
                "console" => Ok(Exporter::Console),
                "none" => Ok(Exporter::None),
                _ => Err(bad(name, &v, "expected otlp, console or none")),
            },
        };
        let protocol = |signal_var: &'static str| {
            let (var, value) = [signal_var, "OTEL_EXPORTER_OTLP_PROTOCOL"]
                .into_iter()
                .find_map(|name| env(name).map(|v| (name, v)))
                .unwrap_or(("", "http/protobuf".to_owned()));
            match value.trim() {
                "grpc" => Ok(OtlpProtocol::Grpc),
                "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
                _ => Err(bad(
                    var,
                    &value,
                    "expected grpc or http/protobuf (http/json is not supported)",
                )),
            }
        };
        let millis = |name: &str, allow_zero: bool| -> Result<Option<Duration>, SettingsError> {
            match env(name) {
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|ms| allow_zero || *ms > 0)
                    .map(|ms| Some(Duration::from_millis(ms)))
                    .ok_or_else(|| bad(name, &v, "expected a whole number of milliseconds")),
                None => Ok(None),
            }
        };
        let interval = millis("OTEL_METRIC_EXPORT_INTERVAL", false)?;
        for name in [
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        ] {
            millis(name, true)?;
        }
        for name in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ] {
            if let Some(v) = env(name) {
                if v.starts_with("https://") {
                    return Err(bad(
                        name,
                        &v,
                        "https needs TLS, which memtel does not include: send plaintext OTLP to a local collector and let it speak TLS",
                    ));
                }
                if !v.starts_with("http://") {
                    return Err(bad(name, &v, "expected a URL such as http://localhost:4318"));
                }
            }
        }
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(v) = env(name) {
                let well_formed = v
                    .split(',')
                    .all(|pair| pair.split_once('=').is_some_and(|(k, _)| !k.trim().is_empty()));
                if !well_formed {
                    return Err(bad(name, &v, "expected key=value pairs separated by commas"));
                }
            }
        }
        Ok(Self {
            metrics: exporter("OTEL_METRICS_EXPORTER")?,
            traces: exporter("OTEL_TRACES_EXPORTER")?,
            metrics_protocol: protocol("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")?,
            traces_protocol: protocol("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")?,
            interval,
        })
    }
}

/// The meter and tracer providers, for the signals that are exported.
pub(crate) struct Pipeline {
    meters: Option<SdkMeterProvider>,
    tracers: Option<SdkTracerProvider>,
}

impl Pipeline {
    /// Builds the providers. Must run inside a Tokio runtime context: the gRPC
    /// exporters' channels are bound to it.
    pub(crate) fn start(settings: &OtelSettings) -> Result<Self, SettingsError> {
        let invalid = |e: opentelemetry_otlp::ExporterBuildError| {
            SettingsError(format!("invalid OTLP exporter settings (OTEL_EXPORTER_OTLP_*): {e}"))
        };
        let resource = resource();
        let meters = match settings.metrics {
            Exporter::None => None,
            Exporter::Console => Some(
                SdkMeterProvider::builder()
                    .with_reader(periodic(
                        opentelemetry_stdout::MetricExporter::default(),
                        settings.interval,
                    ))
                    .with_resource(resource.clone())
                    .build(),
            ),
            Exporter::Otlp => {
                let exporter = match settings.metrics_protocol {
                    OtlpProtocol::Grpc => opentelemetry_otlp::MetricExporter::builder().with_tonic().build(),
                    OtlpProtocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
                        .with_http()
                        .with_protocol(Protocol::HttpBinary)
                        .build(),
                }
                .map_err(invalid)?;
                Some(
                    SdkMeterProvider::builder()
                        .with_reader(periodic(exporter, settings.interval))
                        .with_resource(resource.clone())
                        .build(),
                )
            }
        };
        let tracers = match settings.traces {
            Exporter::None => None,
            Exporter::Console => Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(opentelemetry_stdout::SpanExporter::default())
                    .with_resource(resource)
                    .build(),
            ),
            Exporter::Otlp => {
                let exporter = match settings.traces_protocol {
                    OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder().with_tonic().build(),
                    OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_protocol(Protocol::HttpBinary)
                        .build(),
                }
                .map_err(invalid)?;
                Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource)
                        .build(),
                )
            }
        };
        Ok(Self { meters, tracers })
    }

    /// memtel's meter, when metrics are exported.
    pub(crate) fn meter(&self) -> Option<Meter> {
        self.meters.as_ref().map(|p| p.meter_with_scope(memtel::scope()))
    }

    /// The tracer for tracing-opentelemetry, when traces are exported.
    pub(crate) fn tracer(&self) -> Option<SdkTracer> {
        self.tracers.as_ref().map(|p| p.tracer_with_scope(memtel::scope()))
    }

    /// Flushes the last interval and stops, waiting at most `timeout` so a dead
    /// collector cannot hold the process at exit.
    pub(crate) fn shutdown(self, timeout: Duration) {
        let Self { meters, tracers } = self;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let metrics = meters.map(|p| p.shutdown());
            let traces = tracers.map(|p| p.shutdown());
            let _ = done_tx.send((metrics, traces));
        });
        match done_rx.recv_timeout(timeout) {
            Ok((metrics, traces)) => {
                if let Some(Err(e)) = metrics {
                    tracing::warn!("metrics were not flushed at shutdown: {e}");
                }
                if let Some(Err(e)) = traces {
                    tracing::warn!("spans were not flushed at shutdown: {e}");
                }
            }
            Err(_) => tracing::warn!("telemetry flush did not finish within {timeout:?}; exiting without it"),
        }
    }
}

/// A fresh identifier for this process: the kernel's random UUID, else host and pid.
fn instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| u.trim().to_owned())
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
}

/// A periodic reader; without an interval the SDK reads `OTEL_METRIC_EXPORT_INTERVAL` (default 60 s).
fn periodic<E: PushMetricExporter>(exporter: E, interval: Option<Duration>) -> PeriodicReader<E> {
    let builder = PeriodicReader::builder(exporter);
    match interval {
        Some(interval) => builder.with_interval(interval).build(),
        None => builder.build(),
    }
}

/// The SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) with memtel's
/// defaults: `service.name` = memtel unless set, `service.version`,
/// `service.instance.id` (a UUID per start) unless set, `process.pid`.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let has = |key: &'static str| detected.get(&opentelemetry::Key::from_static_str(key)).is_some();
    // The SDK's fallback is `unknown_service:<executable>`: not a name anyone chose.
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let mut builder = Resource::builder();
    if !named {
        builder = builder.with_service_name("memtel");
    }
    if !has("service.version") {
        builder = builder.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    // The collector maps service.instance.id to Prometheus' `instance` label and only
    // then emits `target_info` with the other resource attributes.
    if !has("service.instance.id") {
        builder = builder.with_attribute(KeyValue::new("service.instance.id", instance_id()));
    }
    builder
        .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
        .build()
}
