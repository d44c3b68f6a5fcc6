//! # memtel
//!
//! Measured process memory for Rust services, in the two forms their users consume:
//! OpenTelemetry metrics (observable instruments, exported over OTLP by your SDK
//! pipeline) and a JSON document at `GET /api/v1/memory/profile`.
//!
//! Every number is measured: resident and virtual size from `/proc/self/statm`, the
//! exact peak of this process image, jemalloc's own statistics, the limit the kernel
//! will enforce (the cgroup's, else RAM), and per-component bytes your components
//! report. One [`Snapshot`] feeds both views.
//!
//! ```no_run
//! # #[global_allocator]
//! # static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
//! use opentelemetry::metrics::MeterProvider;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let monitor = memtel::MemoryMonitor::builder()
//!     .thresholds(memtel::Thresholds::new(0.80, 0.90)?)
//!     .build();
//! let cache: std::sync::Arc<std::sync::Mutex<Vec<u8>>> = Default::default();
//! let held = cache.clone();
//! monitor.component("cache", move || held.lock().unwrap().capacity() as u64)?;
//!
//! // Metrics: register the instruments with your meter provider.
//! let provider = opentelemetry::global::meter_provider();
//! memtel::register(&monitor, &provider.meter_with_scope(memtel::scope()));
//!
//! // JSON: merge the route into your axum app.
//! let app = axum::Router::new().merge(memtel::router(monitor.clone()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! ## Features
//! - `jemalloc` (default): jemalloc statistics. Your binary must still make jemalloc
//!   its `#[global_allocator]`; memtel detects whether it is and reports `None` otherwise.
//! - `http` (default): [`router`], the JSON view on axum.
//! - `service` (default): the `memtel` binary's dependencies (SDK, OTLP exporter,
//!   settings). Libraries take `default-features = false, features = ["jemalloc"]`.
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

pub mod alloc;
mod error;
pub mod history;
#[cfg(feature = "manager")]
mod manager;
mod monitor;
mod otel;
#[cfg(feature = "profiling")]
pub mod profile;
mod snapshot;
mod source;

#[cfg(feature = "http")]
pub mod auth;
#[cfg(feature = "http")]
mod body_cache;
#[cfg(feature = "http")]
mod http;
#[cfg(feature = "http")]
pub mod page;
#[cfg(feature = "http")]
mod prometheus;
#[cfg(feature = "http")]
pub use prometheus::{metrics_router, prometheus_name, render as render_prometheus, METRICS_PATH};

#[cfg(feature = "tracing")]
pub use alloc::ComponentLayer;
pub use alloc::{component, current_component, Component, InComponent};
pub use error::Error;
pub use history::{History, HistoryConfig};
#[cfg(feature = "manager")]
pub use manager::{MemoryManager, Plan};
pub use monitor::{MemoryMonitor, MemoryMonitorBuilder, MAX_COMPONENTS, OTHER_COMPONENT};
pub use otel::{register, scope, Instrument, MetricDef, METRICS};
pub use snapshot::{
    classify, next_level, Actions, CgroupEvents, CgroupSignals, ComponentSource, ComponentUsage, JemallocStats,
    KernelSignals, Limit, LimitSource, Pressure, Psi, PsiLine, PsiSource, Snapshot, Thresholds,
};
#[cfg(feature = "jemalloc")]
pub use source::jemalloc::purge_jemalloc;
#[cfg(feature = "jemalloc")]
pub use source::pools::{memory_pools, ArenaPool, ClassPool};

#[cfg(feature = "http")]
pub use http::{
    history_router, profile_router, router, CgroupProfile, ErrorBody, JemallocProfile, KernelProfile, MemoryProfile,
    ProfileStats, PsiLineProfile, PsiProfile, ThresholdsProfile, TrackingProfile, PROFILE_PATH,
};
