//! The JSON view: `GET /api/v1/memory/profile` as an axum router.
//!
//! Bytes become megabytes here and only here (MB = MiB = 1,048,576 bytes).
//! `by_component` is rounded so that it adds up to `total_allocated_mb` (see [`mb_parts`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::body_cache::{encode, respond, BodyCache, SameSnapshot, Wants};
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
    profile_router(monitor.clone()).merge(history_router(monitor))
}

/// The profile route alone ([`PROFILE_PATH`]): one snapshot, cheap to serve.
pub fn profile_router(monitor: MemoryMonitor) -> Router {
    Router::new()
        .route(PROFILE_PATH, get(profile).fallback(method_not_allowed))
        .with_state(Arc::new(Rendered {
            monitor,
            // Plain and gzipped: a script and the page polling side by side share a snapshot.
            body: BodyCache::new(2),
        }))
}

/// The history and trends routes alone: their cost grows with the window asked for.
pub fn history_router(monitor: MemoryMonitor) -> Router {
    Router::new()
        .route(
            crate::history::HISTORY_PATH,
            get(crate::history::history_route).fallback(method_not_allowed),
        )
        .route(
            crate::history::TRENDS_PATH,
            get(crate::history::trends_route).fallback(method_not_allowed),
        )
        .with_state(Arc::new(crate::history::Views::new(monitor)))
}

/// The monitor and the document rendered for its latest snapshot: requests that
/// share a snapshot (within its cache window) share the serialized body too.
struct Rendered {
    monitor: MemoryMonitor,
    /// Keyed by whether the body is gzipped.
    body: BodyCache<SameSnapshot, bool>,
}

async fn profile(State(rendered): State<Arc<Rendered>>, wants: Wants) -> Response {
    let snap = rendered.monitor.snapshot();
    let gzip = wants.gzip;
    let stale_ok = |old: &SameSnapshot| old.may_stand_in_for(&snap, &rendered.monitor);
    let body = rendered
        .body
        .get_or_render(SameSnapshot(Arc::clone(&snap)), gzip, stale_ok, || {
            serde_json::to_vec(&MemoryProfile::from_snapshot(&snap)).map(|json| encode(json, gzip))
        });
    json_body(body, gzip, "the profile")
}

/// A rendered JSON body (gzipped or not) as a response; a rendering error as a 500 with a
/// JSON error that names `what`.
pub(crate) fn json_body(body: Result<Bytes, serde_json::Error>, gzip: bool, what: &str) -> Response {
    match body {
        Ok(body) => respond(body, gzip, "application/json"),
        Err(e) => {
            let error = ErrorBody {
                error: format!("cannot render {what}: {e}"),
            };
            (StatusCode::INTERNAL_SERVER_ERROR, Json(error)).into_response()
        }
    }
}

async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    let mut response = (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody {
            error: format!("method not allowed on {}: use GET", uri.path()),
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
    /// What `by_component` adds up to, in MB; `null` when the live heap is unknown.
    ///
    /// The live heap: with the tracking allocator, the bytes live allocations requested
    /// (not rounded to size classes), plus the bytes components report (memory the
    /// allocator cannot see); without it, jemalloc's `stats.allocated`. In a tracked
    /// process `jemalloc.allocated_mb` is larger: it counts whole size classes and the
    /// free regions caches hold (`tracking.cache_mb`, jemalloc's thread caches).
    pub total_allocated_mb: Option<u64>,
    /// Peak resident set size of this process in MB.
    pub peak_usage_mb: Option<u64>,
    /// Resident set size now, in MB.
    pub current_usage_mb: Option<u64>,
    /// The effective limit in MB.
    pub limit_mb: Option<u64>,
    /// Where the limit came from: `configured`, `cgroup` or `system`.
    pub limit_source: Option<String>,
    /// MB per component, plus `other` when the heap is known: with the tracking
    /// allocator, the tracked bytes allocated outside every component; without it, the
    /// live heap minus the reported components, floored at 0.
    ///
    /// The entries add up to `total_allocated_mb` exactly (unless, without the tracking
    /// allocator, the reported components alone exceed the heap): each is its bytes
    /// rounded down or up, within 1 MB, the largest remainders rounded up.
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
    /// The tracking allocator's own figures; absent when it is not the global allocator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<TrackingProfile>,
    /// The kernel's own signals; each part absent where the system does not provide it.
    pub kernel: KernelProfile,
}

/// The `tracking` object of [`MemoryProfile`], in MB (three decimals).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct TrackingProfile {
    /// Freed small allocations the tracking allocator keeps in its per-thread lists for
    /// reuse ([`alloc::cached_bytes`](crate::alloc::cached_bytes)): memory memtel holds
    /// for itself. jemalloc counts it as allocated; no component, nor `other`, does.
    pub cache_mb: f64,
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
    /// The utilization thresholds of the pressure levels, as fractions of the limit.
    pub thresholds: ThresholdsProfile,
}

/// The `stats.thresholds` object of [`MemoryProfile`]: `pressure` is `warning` from
/// `warning × limit_mb` of resident memory, `critical` from `critical × limit_mb` (with
/// hysteresis on the way down).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct ThresholdsProfile {
    /// The warning threshold, a fraction of the limit.
    pub warning: f64,
    /// The critical threshold, a fraction of the limit.
    pub critical: f64,
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
        let mut parts: Vec<(&str, u64)> = snap.components.iter().map(|c| (&*c.name, c.bytes)).collect();
        if let Some(other) = snap.other_bytes {
            parts.push((OTHER_COMPONENT, other));
        }
        let megabytes = mb_parts(&parts.iter().map(|&(_, bytes)| bytes).collect::<Vec<_>>());
        let by_component = parts
            .iter()
            .zip(megabytes)
            .map(|(&(name, _), mb)| (name.to_owned(), mb))
            .collect();
        Self {
            timestamp: humantime::format_rfc3339_millis(snap.taken_at).to_string(),
            total_allocated_mb: snap.total_bytes.map(mb),
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
                thresholds: ThresholdsProfile {
                    warning: snap.thresholds.warning(),
                    critical: snap.thresholds.critical(),
                },
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
            tracking: snap
                .allocator_cache_bytes
                .map(|cache| TrackingProfile { cache_mb: mb_f(cache) }),
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

/// Whole MB for parts of a sum, adding up to the sum's MB rounded to nearest ([`mb`]):
/// largest-remainder rounding. Each part is first rounded down; then as many parts as
/// the rounded sum needs are rounded up, those with the largest remainders first (ties
/// in order), so every part stays within 1 MB of its bytes. Rounding each part to
/// nearest would not add up: 64 parts of 0.4 MB are 0 MB each but 26 MB together.
fn mb_parts(parts: &[u64]) -> Vec<u64> {
    const MIB_BYTES: u64 = 1_048_576;
    let sum: u128 = parts.iter().map(|&b| u128::from(b)).sum();
    let target = sum / u128::from(MIB_BYTES) + u128::from(sum % u128::from(MIB_BYTES) >= 524_288);
    let mut megabytes: Vec<u64> = parts.iter().map(|b| b / MIB_BYTES).collect();
    let floors: u128 = megabytes.iter().map(|&m| u128::from(m)).sum();
    // At most the number of parts with a remainder: the remainders add up to less than
    // that count, and rounding their sum to nearest cannot reach past it.
    let ups = usize::try_from(target - floors).unwrap_or(usize::MAX);
    let mut order: Vec<usize> = (0..parts.len())
        .filter(|&i| !parts[i].is_multiple_of(MIB_BYTES))
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(parts[i] % MIB_BYTES), i));
    for i in order.into_iter().take(ups) {
        megabytes[i] += 1;
    }
    megabytes
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

    const M: u64 = 1_048_576;

    #[test]
    fn parts_add_up_where_rounding_each_would_not() {
        // 64 components of 0.4 MB: each rounds to 0 alone, 25.6 MB together.
        let parts = vec![M * 4 / 10; 64];
        assert_eq!(parts.iter().map(|&b| mb(b)).sum::<u64>(), 0);
        let rounded = mb_parts(&parts);
        assert_eq!(rounded.iter().sum::<u64>(), 26);
        assert!(rounded.iter().all(|&m| m <= 1));
        // The first 26 (ties go in order) are the ones rounded up.
        assert_eq!(rounded, [vec![1; 26], vec![0; 38]].concat());
        // Three of 0.6 MB: each rounds to 1 alone, 1.8 MB together.
        assert_eq!(mb_parts(&[M * 6 / 10; 3]), [1, 1, 0]);
    }

    #[test]
    fn largest_remainders_are_rounded_up_and_whole_parts_kept() {
        assert_eq!(mb_parts(&[]), Vec::<u64>::new());
        assert_eq!(mb_parts(&[8 * M, 3 * M, 0]), [8, 3, 0]);
        // 2.3 + 1.45 + 0.25 = 4.0: one part is rounded up, the 0.45 remainder.
        assert_eq!(mb_parts(&[2 * M + M * 3 / 10, M + M * 45 / 100, M / 4]), [2, 2, 0]);
        // A part below half a MB is rounded up when the sum needs it.
        assert_eq!(mb_parts(&[10 * M, M * 3 / 10, M * 3 / 10]), [10, 1, 0]);
        assert_eq!(mb_parts(&[u64::MAX, u64::MAX]).len(), 2);
    }

    #[test]
    fn random_parts_add_up_each_within_one_megabyte() {
        // xorshift64*: deterministic, no dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for _ in 0..3_000 {
            let n = (next() % 70) as usize;
            let parts: Vec<u64> = (0..n)
                .map(|_| match next() % 4 {
                    0 => next() % M,             // below a MB
                    1 => (next() % 64) * M,      // whole MBs
                    2 => next() % (512 * M),     // anything up to 512 MB
                    _ => M / 2 + next() % 3 - 1, // around the half
                })
                .collect();
            let rounded = mb_parts(&parts);
            assert_eq!(rounded.iter().sum::<u64>(), mb(parts.iter().sum()), "{parts:?}");
            for (&bytes, &m) in parts.iter().zip(&rounded) {
                assert!(m == bytes / M || m == bytes.div_ceil(M), "{bytes} -> {m}");
            }
        }
    }
}
