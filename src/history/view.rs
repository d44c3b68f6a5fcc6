//! The history's JSON views: `GET /api/v1/memory/profile/history` and `.../trends`.
//!
//! Bytes become MB (MiB) here, with three decimals: history figures are means.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{History, QueryError, Sample, Stat, Trends};
use crate::body_cache::{encode, BodyCache, SameSnapshot, Wants};
use crate::http::{json_body, ErrorBody, MemoryProfile};
use crate::MemoryMonitor;

/// The path of the history document.
pub const HISTORY_PATH: &str = "/api/v1/memory/profile/history";
/// The path of the trends document.
pub const TRENDS_PATH: &str = "/api/v1/memory/profile/trends";

const MIB: f64 = 1_048_576.0;

/// The history document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct HistoryDocument {
    /// Seconds between two samples below: the recording interval, the span of the
    /// aggregates kept for that far back, or the `step` asked for.
    pub interval_secs: f64,
    /// The recording interval, seconds.
    pub recorded_every_secs: f64,
    /// The window asked for, seconds.
    pub window_secs: f64,
    /// The samples, oldest first. With a `step` (or aggregates), each figure is the mean
    /// of the samples in its span.
    pub samples: Vec<HistorySampleDoc>,
}

/// One sample of [`HistoryDocument`], in MB.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct HistorySampleDoc {
    /// The sample's time (or its span's start), RFC 3339 in UTC.
    pub timestamp: String,
    /// Recorded samples this one averages (1 at full resolution).
    pub samples: u32,
    /// Resident set size.
    pub current_usage_mb: Option<f64>,
    /// Peak resident set size.
    pub peak_usage_mb: Option<f64>,
    /// The live heap (as the profile's `total_allocated_mb`).
    pub total_allocated_mb: Option<f64>,
    /// The effective limit.
    pub limit_mb: Option<f64>,
    /// The highest pressure level in the span.
    pub pressure: String,
    /// Each component's MB.
    pub by_component: BTreeMap<String, f64>,
}

/// The trends document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct TrendsDocument {
    /// The profile document now.
    pub current: MemoryProfile,
    /// Growth over the window.
    pub trends: TrendsSummaryDoc,
    /// What looks wrong: sustained growth of a component's floor (a suspected leak).
    pub anomalies: Vec<AnomalyDoc>,
    /// What to do about it, each naming the measured figure behind it.
    pub recommendations: Vec<String>,
}

/// The `trends` object of [`TrendsDocument`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct TrendsSummaryDoc {
    /// The window, seconds.
    pub window_secs: f64,
    /// Recorded samples in the window.
    pub samples: u64,
    /// The growth rate of resident memory's floor (Theil–Sen slope), MB per hour.
    pub growth_rate_mb_per_hour: f64,
    /// At that rate, hours until RSS reaches the limit; `null` unless RSS shows sustained
    /// growth and a limit is known.
    pub projected_exhaustion_hours: Option<f64>,
    /// Whether any anomaly was found.
    pub anomalies_detected: bool,
    /// Per component.
    pub by_component: BTreeMap<String, ComponentTrendDoc>,
}

/// One component in [`TrendsSummaryDoc`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct ComponentTrendDoc {
    /// The growth rate of its floor, MB per hour.
    pub growth_rate_mb_per_hour: f64,
    /// Whether its floor shows sustained growth.
    pub leak_suspected: bool,
}

/// One anomaly of [`TrendsDocument`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct AnomalyDoc {
    /// `sustained_growth`.
    pub kind: String,
    /// The component.
    pub component: String,
    /// Since when (RFC 3339): the floor was last at its level at the window's start.
    pub since: String,
    /// MB per hour.
    pub growth_rate_mb_per_hour: f64,
}

fn mb(bytes: f64) -> f64 {
    (bytes / MIB * 1000.0).round() / 1000.0
}

fn mb_per_hour(bytes_per_sec: f64) -> f64 {
    mb(bytes_per_sec * 3600.0)
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

impl HistoryDocument {
    /// The document for `samples` of a window.
    pub fn new(history: &History, window: Duration, samples: &super::Samples) -> Self {
        let mean = |s: &Option<Stat>| s.map(|s| mb(s.mean));
        Self {
            interval_secs: samples.spacing.as_secs_f64(),
            recorded_every_secs: history.config().interval.as_secs_f64(),
            window_secs: window.as_secs_f64(),
            samples: samples
                .samples
                .iter()
                .map(|s: &Sample| HistorySampleDoc {
                    timestamp: rfc3339(s.at),
                    samples: s.samples,
                    current_usage_mb: mean(&s.rss),
                    peak_usage_mb: mean(&s.peak),
                    total_allocated_mb: mean(&s.heap),
                    limit_mb: mean(&s.limit),
                    pressure: s.pressure.as_str().to_owned(),
                    by_component: s
                        .components
                        .iter()
                        .map(|(n, st)| (n.to_string(), mb(st.mean)))
                        .collect(),
                })
                .collect(),
        }
    }
}

impl TrendsDocument {
    /// The document for `trends`, the current snapshot's profile and the
    /// recommendations drawn from both.
    pub fn new(trends: &Trends, snap: &crate::Snapshot) -> Self {
        let first = trends.first_sample.unwrap_or(snap.taken_at);
        let anomalies: Vec<AnomalyDoc> = trends
            .components
            .iter()
            .filter(|c| c.leak_suspected())
            .map(|c| AnomalyDoc {
                kind: "sustained_growth".into(),
                component: c.name.to_string(),
                since: rfc3339(first + Duration::from_secs_f64(c.growth.since.unwrap_or(0.0).max(0.0))),
                growth_rate_mb_per_hour: mb_per_hour(c.growth.rate_bytes_per_sec),
            })
            .collect();
        Self {
            current: MemoryProfile::from_snapshot(snap),
            trends: TrendsSummaryDoc {
                window_secs: trends.window.as_secs_f64(),
                samples: trends.samples,
                growth_rate_mb_per_hour: mb_per_hour(trends.growth.rate_bytes_per_sec),
                projected_exhaustion_hours: trends
                    .time_to_limit
                    .map(|d| (d.as_secs_f64() / 3600.0 * 1000.0).round() / 1000.0),
                anomalies_detected: !anomalies.is_empty(),
                by_component: trends
                    .components
                    .iter()
                    .map(|c| {
                        (
                            c.name.to_string(),
                            ComponentTrendDoc {
                                growth_rate_mb_per_hour: mb_per_hour(c.growth.rate_bytes_per_sec),
                                leak_suspected: c.leak_suspected(),
                            },
                        )
                    })
                    .collect(),
            },
            anomalies,
            recommendations: super::advice::recommendations(trends, snap, || {
                #[cfg(feature = "jemalloc")]
                return crate::memory_pools();
                #[cfg(not(feature = "jemalloc"))]
                None
            }),
        }
    }
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(ErrorBody { error: message })).into_response()
}

/// Reads a duration parameter (`90s`, `15m`, `1h`, `1h30m`); the error names it.
fn duration_param(params: &HashMap<String, String>, name: &str) -> Result<Option<Duration>, String> {
    let Some(text) = params.get(name) else {
        return Ok(None);
    };
    humantime::parse_duration(text.trim())
        .map(Some)
        .map_err(|e| format!("{name}: {text:?} is not a duration like 90s, 15m or 1h ({e})"))
}

fn check_known(params: &HashMap<String, String>, known: &[&str]) -> Result<(), String> {
    match params.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(format!("{unknown}: unknown parameter (expected {})", known.join(", "))),
        None => Ok(()),
    }
}

fn no_history() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: "this monitor keeps no history (MemoryMonitorBuilder::history)".into(),
        }),
    )
        .into_response()
}

fn query_error(e: QueryError) -> Response {
    bad_request(e.to_string())
}

/// The history routes' state: the monitor, and the documents last rendered, so that polls
/// between two recorded samples (and, for trends, within one snapshot's cache window)
/// share one rendering.
pub(crate) struct Views {
    monitor: MemoryMonitor,
    /// Per recorded-sample count: a few `(window, step)` queries, gzipped or not.
    history: BodyCache<u64, (Duration, Option<Duration>, bool)>,
    /// Per recorded-sample count and snapshot (the document holds the current profile): a
    /// few windows, gzipped or not.
    trends: BodyCache<(u64, SameSnapshot), (Duration, bool)>,
}

/// Distinct queries kept per generation: a dashboard polls a few windows (each plain and
/// gzipped).
const QUERIES_KEPT: usize = 8;

impl Views {
    pub(crate) fn new(monitor: MemoryMonitor) -> Self {
        Self {
            monitor,
            history: BodyCache::new(QUERIES_KEPT),
            trends: BodyCache::new(QUERIES_KEPT),
        }
    }
}

/// Why a body could not be rendered: the query, or the encoding.
enum RenderError {
    Query(QueryError),
    Json(serde_json::Error),
}

fn rendered(body: Result<axum::body::Bytes, RenderError>, gzip: bool, what: &str) -> Response {
    match body {
        Ok(body) => json_body(Ok(body), gzip, what),
        Err(RenderError::Query(e)) => query_error(e),
        Err(RenderError::Json(e)) => json_body(Err(e), gzip, what),
    }
}

/// `GET /api/v1/memory/profile/history?window=1h&step=1m`; `window` defaults to the trend
/// window.
pub(crate) async fn history(
    State(views): State<Arc<Views>>,
    Query(params): Query<HashMap<String, String>>,
    wants: Wants,
) -> Response {
    let Some(history) = views.monitor.history() else {
        return no_history();
    };
    if let Err(e) = check_known(&params, &["window", "step"]) {
        return bad_request(e);
    }
    let (window, step) = match (duration_param(&params, "window"), duration_param(&params, "step")) {
        (Ok(w), Ok(s)) => (w.unwrap_or(history.config().trend_window), s),
        (Err(e), _) | (_, Err(e)) => return bad_request(e),
    };
    let gzip = wants.gzip;
    let body = views.history.get_or_render(
        history.records(),
        (window, step, gzip),
        |_| false,
        || {
            let samples = history.samples(window, step).map_err(RenderError::Query)?;
            let json =
                serde_json::to_vec(&HistoryDocument::new(history, window, &samples)).map_err(RenderError::Json)?;
            Ok(encode(json, gzip))
        },
    );
    rendered(body, gzip, "the history")
}

/// `GET /api/v1/memory/profile/trends?window=1h`; `window` defaults to the trend window.
pub(crate) async fn trends(
    State(views): State<Arc<Views>>,
    Query(params): Query<HashMap<String, String>>,
    wants: Wants,
) -> Response {
    let Some(history) = views.monitor.history() else {
        return no_history();
    };
    if let Err(e) = check_known(&params, &["window"]) {
        return bad_request(e);
    }
    let window = match duration_param(&params, "window") {
        Ok(w) => w.unwrap_or(history.config().trend_window),
        Err(e) => return bad_request(e),
    };
    let snap = views.monitor.snapshot();
    let generation = (history.records(), SameSnapshot(Arc::clone(&snap)));
    let gzip = wants.gzip;
    let body = views.trends.get_or_render(
        generation,
        (window, gzip),
        |_| false,
        || {
            let trends = history.trends(window).map_err(RenderError::Query)?;
            let json = serde_json::to_vec(&TrendsDocument::new(&trends, &snap)).map_err(RenderError::Json)?;
            Ok(encode(json, gzip))
        },
    );
    rendered(body, gzip, "the trends")
}
