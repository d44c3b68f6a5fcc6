//! The debug router: `GET /debug/pprof/heap`. Never mounted by [`router`](crate::router):
//! an application mounts it deliberately (the service only with `--debug-endpoints`).

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::Query;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::http::ErrorBody;

/// The path of the heap profile.
pub const HEAP_PATH: &str = "/debug/pprof/heap";
/// The path of jemalloc's memory pools, per arena and size class.
pub const POOLS_PATH: &str = "/debug/memory/pools";

/// The longest `seconds` a delta profile may ask for.
const MAX_SECONDS: u64 = 300;

/// An axum router serving [`HEAP_PATH`]:
///
/// - no parameter: the in-use and cumulative heap profile as gzipped `profile.proto`
///   (`go tool pprof http://host/debug/pprof/heap`);
/// - `?format=svg`: a flamegraph of in-use bytes; `?format=folded`: folded stacks;
/// - `?component=NAME`: that component's samples only;
/// - `?seconds=N`: what the next N seconds allocated (a delta, as Go's);
///
/// and [`POOLS_PATH`]: jemalloc's pools per arena and size class (live regions, slabs,
/// utilization, bytes held and live; dirty and muzzy pages) as JSON.
///
/// With sampling off it answers 409 and a JSON error saying how to turn it on.
///
/// ```no_run
/// # #[global_allocator]
/// # static GLOBAL: memtel::alloc::TrackingAllocator<tikv_jemallocator::Jemalloc> =
/// #     memtel::alloc::TrackingAllocator::new(tikv_jemallocator::Jemalloc).with_heap_profiling();
/// memtel::alloc::set_heap_sample_interval(512 << 10);
/// let app: axum::Router = axum::Router::new()
///     .merge(memtel::router(memtel::MemoryMonitor::new()))
///     .merge(memtel::profile::debug_router()); // behind your own authentication
/// # let _ = app;
/// ```
pub fn debug_router() -> Router {
    let router = Router::new().route(HEAP_PATH, get(heap));
    #[cfg(feature = "jemalloc")]
    let router = router.route(POOLS_PATH, get(pools));
    router
}

/// `GET /debug/memory/pools`: [`memory_pools`](crate::memory_pools) as JSON
/// `{"arenas": [...]}`; 503 without jemalloc stats.
#[cfg(feature = "jemalloc")]
async fn pools() -> Response {
    match tokio::task::spawn_blocking(crate::memory_pools).await {
        Ok(Some(arenas)) => Json(serde_json::json!({ "arenas": arenas })).into_response(),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "jemalloc stats are not available (jemalloc is not the global allocator)".into(),
        ),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(ErrorBody { error: message })).into_response()
}

async fn heap(Query(params): Query<HashMap<String, String>>) -> Response {
    if let Some(unknown) = params
        .keys()
        .find(|k| !["format", "component", "seconds"].contains(&k.as_str()))
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{unknown}: unknown parameter (expected format, component, seconds)"),
        );
    }
    let format = params.get("format").map_or("pprof", String::as_str).to_owned();
    if !["pprof", "proto", "svg", "folded"].contains(&format.as_str()) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("format: {format:?} is not one of pprof, svg, folded"),
        );
    }
    let seconds = match params.get("seconds").map(|s| s.trim().parse::<u64>()) {
        None => None,
        Some(Ok(n)) if (1..=MAX_SECONDS).contains(&n) => Some(n),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("seconds: expected a whole number from 1 to {MAX_SECONDS}"),
            )
        }
    };
    if crate::alloc::heap_sample_interval() == 0 || !crate::alloc::tracking_installed() {
        return error(
            StatusCode::CONFLICT,
            "heap sampling is off: run the service with --heap-profile-sample 512KiB \
             (MEMTEL_HEAP_PROFILE_SAMPLE), or call memtel::alloc::set_heap_sample_interval \
             with memtel's TrackingAllocator as the global allocator"
                .into(),
        );
    }
    let mut profile = crate::profile::heap_profile();
    if let Some(n) = seconds {
        tokio::time::sleep(Duration::from_secs(n)).await;
        profile = crate::profile::heap_profile().since(&profile);
    }
    if let Some(component) = params.get("component") {
        profile = profile.component(component);
    }
    // Symbolizing reads debug information: off the async workers.
    let rendered = tokio::task::spawn_blocking(move || match format.as_str() {
        "svg" => profile.to_svg().map(|svg| ("image/svg+xml", svg)),
        "folded" => Ok(("text/plain; charset=utf-8", profile.to_folded().into_bytes())),
        _ => Ok(("application/octet-stream", profile.to_pprof())),
    })
    .await;
    match rendered {
        Ok(Ok((content_type, body))) => {
            ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response()
        }
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render the profile: {e}"),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render the profile: {e}"),
        ),
    }
}
