//! The JSON view: `GET /api/v1/memory/profile` as an axum router.
//!
//! Bytes become megabytes here and only here (MB = MiB = 1,048,576 bytes).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::monitor::OTHER_COMPONENT;
use crate::snapshot::{Pressure, Snapshot};
use crate::MemoryMonitor;

/// The path of the profile document.
pub const PROFILE_PATH: &str = "/api/v1/memory/profile";

const MIB: f64 = 1_048_576.0;

/// An axum router serving [`PROFILE_PATH`]; merge it into your application's router.
///
/// `GET` (and `HEAD`) answer the [`MemoryProfile`] document as `application/json`;
/// any other method answers 405 with `Allow: GET, HEAD` and a JSON error.
///
/// ```no_run
/// # #[global_allocator]
/// # static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// # async fn run() -> std::io::Result<()> {
/// let monitor = memtel::MemoryMonitor::new();
/// let app = axum::Router::new()
///     .route("/", axum::routing::get(|| async { "hello" }))
///     .merge(memtel::router(monitor));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// axum::serve(listener, app).await
/// # }
/// ```
pub fn router(monitor: MemoryMonitor) -> Router {
    Router::new()
        .route(PROFILE_PATH, get(profile).fallback(method_not_allowed))
        .with_state(monitor)
}

async fn profile(State(monitor): State<MemoryMonitor>) -> Json<MemoryProfile> {
    Json(MemoryProfile::from_snapshot(&monitor.snapshot()))
}

async fn method_not_allowed() -> Response {
    let mut response = (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody {
            error: format!("method not allowed on {PROFILE_PATH}: use GET"),
        }),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

/// The body of every error answer: `{"error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// The profile document. Field names are the contract scripts depend on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct MemoryProfile {
    /// When the snapshot was taken, RFC 3339 in UTC with milliseconds.
    pub timestamp: String,
    /// Live heap in MB (jemalloc's `stats.allocated`); `null` when unknown.
    pub total_allocated_mb: Option<u64>,
    /// Peak resident set size of this process in MB.
    pub peak_usage_mb: Option<u64>,
    /// Resident set size now, in MB.
    pub current_usage_mb: Option<u64>,
    /// The effective limit in MB.
    pub limit_mb: Option<u64>,
    /// Where the limit came from: `configured`, `cgroup` or `system`.
    pub limit_source: Option<String>,
    /// MB per registered component, plus `other` (the heap remainder) when the heap is known.
    pub by_component: BTreeMap<String, u64>,
    /// How the component figures were obtained: `tracked` (by the tracking
    /// allocator), `reported` (by the components' own callbacks) or `mixed` (both).
    pub by_component_source: String,
    /// `normal`, `warning` or `critical`.
    pub pressure: String,
    /// Utilization and actions.
    pub stats: ProfileStats,
    /// jemalloc's figures; absent when jemalloc stats are not available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jemalloc: Option<JemallocProfile>,
}

/// The `stats` object of [`MemoryProfile`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct ProfileStats {
    /// Resident set size ÷ limit × 100.
    pub usage_percentage: Option<f64>,
    /// `pressure != "normal"`.
    pub is_under_pressure: bool,
    /// Seconds since the last cleanup ran; `null` when none has.
    pub last_cleanup_secs_ago: Option<u64>,
    /// Seconds since the last allocator purge; `null` when none has.
    pub last_gc_secs_ago: Option<u64>,
    /// Cleanups run. A monitor alone takes no action, so this is 0 until a manager acts.
    pub cleanup_count: u64,
    /// Allocator purges run.
    pub gc_count: u64,
}

/// The `jemalloc` object of [`MemoryProfile`], in MB (three decimals).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct JemallocProfile {
    /// Live allocations.
    pub allocated_mb: f64,
    /// Active pages.
    pub active_mb: f64,
    /// Resident pages held by the allocator.
    pub resident_mb: f64,
    /// Allocator metadata.
    pub metadata_mb: f64,
    /// Mapped extents.
    pub mapped_mb: f64,
    /// Virtual memory kept for reuse (not RAM).
    pub retained_mb: f64,
    /// resident ÷ allocated.
    pub fragmentation_ratio: Option<f64>,
    /// metadata ÷ allocated.
    pub metadata_overhead_ratio: Option<f64>,
    /// How old these figures are, in milliseconds.
    pub stats_age_ms: u64,
}

impl MemoryProfile {
    /// The document for one snapshot.
    pub fn from_snapshot(snap: &Snapshot) -> Self {
        let mut by_component: BTreeMap<String, u64> = snap
            .components
            .iter()
            .map(|c| (c.name.to_string(), mb(c.bytes)))
            .collect();
        if let Some(other) = snap.other_bytes {
            by_component.insert(OTHER_COMPONENT.to_owned(), mb(other));
        }
        Self {
            timestamp: humantime::format_rfc3339_millis(snap.taken_at).to_string(),
            total_allocated_mb: snap.heap_allocated_bytes.map(mb),
            peak_usage_mb: snap.peak_rss_bytes.map(mb),
            current_usage_mb: snap.rss_bytes.map(mb),
            limit_mb: snap.limit.map(|l| mb(l.bytes)),
            limit_source: snap.limit.map(|l| l.source.as_str().to_owned()),
            by_component,
            by_component_source: snap.component_source.as_str().to_owned(),
            pressure: snap.pressure.as_str().to_owned(),
            stats: ProfileStats {
                usage_percentage: snap.utilization().map(|u| round(u * 100.0, 2)),
                is_under_pressure: snap.pressure != Pressure::Normal,
                last_cleanup_secs_ago: None,
                last_gc_secs_ago: None,
                cleanup_count: 0,
                gc_count: 0,
            },
            jemalloc: snap.jemalloc.map(|j| JemallocProfile {
                allocated_mb: mb_f(j.allocated),
                active_mb: mb_f(j.active),
                resident_mb: mb_f(j.resident),
                metadata_mb: mb_f(j.metadata),
                mapped_mb: mb_f(j.mapped),
                retained_mb: mb_f(j.retained),
                fragmentation_ratio: j.fragmentation_ratio().map(|r| round(r, 4)),
                metadata_overhead_ratio: j.metadata_overhead_ratio().map(|r| round(r, 4)),
                stats_age_ms: u64::try_from(j.age.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }
}

/// Bytes to whole MB, rounded to nearest.
fn mb(bytes: u64) -> u64 {
    bytes / 1_048_576 + u64::from(bytes % 1_048_576 >= 524_288)
}

fn mb_f(bytes: u64) -> f64 {
    round(bytes as f64 / MIB, 3)
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megabytes_round_to_nearest() {
        assert_eq!(mb(0), 0);
        assert_eq!(mb(524_287), 0);
        assert_eq!(mb(524_288), 1);
        assert_eq!(mb(1_048_576 * 3 + 600_000), 4);
        assert_eq!(mb_f(1_572_864), 1.5);
    }
}
