//! The JSON view: `GET /api/v1/memory/profile` as an axum router.
//!
//! Bytes become megabytes here and only here (MB = MiB = 1,048,576 bytes).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::monitor::OTHER_COMPONENT;
use crate::snapshot::{KernelSignals, Pressure, PsiLine, Snapshot};
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
        .with_state(Arc::new(Rendered {
            monitor,
            latest: Mutex::new(None),
        }))
}

/// The monitor and the document rendered for its latest snapshot: requests that
/// share a snapshot (within its cache window) share the serialized body too.
struct Rendered {
    monitor: MemoryMonitor,
    latest: Mutex<Option<(Arc<Snapshot>, Bytes)>>,
}

async fn profile(State(rendered): State<Arc<Rendered>>) -> Response {
    let snap = rendered.monitor.snapshot();
    let cached = {
        let latest = rendered.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest
            .as_ref()
            .filter(|(s, _)| Arc::ptr_eq(s, &snap))
            .map(|(_, body)| body.clone())
    };
    let body = match cached {
        Some(body) => body,
        None => match serde_json::to_vec(&MemoryProfile::from_snapshot(&snap)) {
            Ok(json) => {
                let body = Bytes::from(json);
                *rendered.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some((snap, body.clone()));
                body
            }
            Err(e) => {
                let error = ErrorBody {
                    error: format!("cannot render the profile: {e}"),
                };
                return (StatusCode::INTERNAL_SERVER_ERROR, Json(error)).into_response();
            }
        },
    };
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
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
    /// The kernel's own signals; each part absent where the system does not provide it.
    pub kernel: KernelProfile,
}

/// The `kernel` object of [`MemoryProfile`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[non_exhaustive]
pub struct KernelProfile {
    /// Memory pressure stall information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psi: Option<PsiProfile>,
    /// The process's memory cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupProfile>,
}

/// PSI as reported by the kernel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct PsiProfile {
    /// `cgroup` (the group's `memory.pressure`) or `system` (`/proc/pressure/memory`).
    pub source: String,
    /// Some task stalled.
    pub some: PsiLineProfile,
    /// All non-idle tasks stalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<PsiLineProfile>,
}

/// One PSI line: averages in percent, total stall in seconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct PsiLineProfile {
    /// Percent of the last 10 s.
    pub avg10: f64,
    /// Percent of the last 60 s.
    pub avg60: f64,
    /// Percent of the last 300 s.
    pub avg300: f64,
    /// Total stall time, seconds.
    pub total_secs: f64,
}

/// The memory cgroup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct CgroupProfile {
    /// 1 or 2.
    pub version: u8,
    /// The group's path in its hierarchy.
    pub path: String,
    /// The tightest hard limit in MB; `null` when unlimited.
    pub limit_mb: Option<u64>,
    /// The tightest `memory.high` in MB (v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_mb: Option<u64>,
    /// Event counters, those the cgroup version provides.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub events: BTreeMap<String, u64>,
}

/// The `stats` object of [`MemoryProfile`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct ProfileStats {
    /// Resident set size ÷ limit × 100.
    pub usage_percentage: Option<f64>,
    /// `pressure != "normal"`.
    pub is_under_pressure: bool,
    /// Seconds since the last cleanup ran; `null` when none has (a manager runs them).
    pub last_cleanup_secs_ago: Option<u64>,
    /// Seconds since the last allocator purge; `null` when none has.
    pub last_gc_secs_ago: Option<u64>,
    /// Cleanup cycles run by a [`MemoryManager`](crate::MemoryManager); 0 without one.
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
                last_cleanup_secs_ago: snap.actions.last_cleanup_ago.map(|d| d.as_secs()),
                last_gc_secs_ago: snap.actions.last_gc_ago.map(|d| d.as_secs()),
                cleanup_count: snap.actions.cleanup_runs,
                gc_count: snap.actions.gc_runs,
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
            kernel: kernel_profile(&snap.kernel),
        }
    }
}

fn kernel_profile(kernel: &KernelSignals) -> KernelProfile {
    let line = |l: &PsiLine| PsiLineProfile {
        avg10: l.avg10,
        avg60: l.avg60,
        avg300: l.avg300,
        total_secs: l.total_us as f64 / 1e6,
    };
    KernelProfile {
        psi: kernel.psi.map(|p| PsiProfile {
            source: kernel.psi_source.map_or("system", |s| s.as_str()).to_owned(),
            some: line(&p.some),
            full: p.full.as_ref().map(line),
        }),
        cgroup: kernel.cgroup.as_ref().map(|cg| CgroupProfile {
            version: cg.version,
            path: cg.path.clone(),
            limit_mb: cg.limit_bytes.map(mb),
            high_mb: cg.high_bytes.map(mb),
            events: cg
                .events
                .map(|e| {
                    [
                        ("high", e.high),
                        ("max", e.max),
                        ("oom", e.oom),
                        ("oom_kill", e.oom_kill),
                    ]
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.to_owned(), v?)))
                    .collect()
                })
                .unwrap_or_default(),
        }),
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
