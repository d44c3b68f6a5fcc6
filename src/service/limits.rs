//! Bounded cost under abuse: a per-client rate limit (tighter on the expensive routes),
//! a global concurrency limit, a timeout on every route, and no request bodies.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use axum::Router;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::{GovernorError, GovernorLayer};

/// Requests handled at once over every memtel route; more wait for a slot.
const CONCURRENCY: usize = 64;
/// The longest a snapshot route may take.
const CHEAP_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an expensive route may take (a `seconds=300` delta profile included).
const EXPENSIVE_TIMEOUT: Duration = Duration::from_secs(320);
/// How much tighter the expensive routes' rate limit is.
const EXPENSIVE_FACTOR: u64 = 10;

/// The profile, `/metrics` (`cheap`) and the history, trends and debug routes (`expensive`)
/// behind the limits; `rate` requests per second per client address, with a burst of twice
/// that (0: no rate limit).
pub(crate) fn apply(cheap: Router, expensive: Router, rate: u64) -> Router {
    let body_refused = tower_http::limit::RequestBodyLimitLayer::new(0);
    let mut cheap = cheap.layer(timeout(CHEAP_TIMEOUT));
    let mut expensive = expensive.layer(timeout(EXPENSIVE_TIMEOUT));
    if rate > 0 {
        cheap = cheap.layer(governor(rate, 2 * rate));
        let tight = rate.div_ceil(EXPENSIVE_FACTOR).max(1);
        expensive = expensive.layer(governor(tight, 2 * tight));
    }
    cheap
        .merge(expensive)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(CONCURRENCY))
        .layer(body_refused)
}

/// `/healthz` and the page's HTML shell: the same timeout as the snapshot routes and no
/// request bodies, but neither the rate limit nor the concurrency limit, so that a health
/// check still answers while clients saturate the data routes.
pub(crate) fn apply_open(open: Router) -> Router {
    open.layer(timeout(CHEAP_TIMEOUT))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(0))
}

/// A 408 for a request not answered within `limit`.
fn timeout(limit: Duration) -> tower_http::timeout::TimeoutLayer {
    tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limit)
}

type Governor = GovernorLayer<
    tower_governor::key_extractor::PeerIpKeyExtractor,
    governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>,
    Body,
>;

/// A per-client-address limiter of `per_second` requests, bursts of `burst`.
fn governor(per_second: u64, burst: u64) -> Governor {
    let config = GovernorConfigBuilder::default()
        .per_nanosecond((1_000_000_000 / per_second.max(1)).max(1))
        .burst_size(u32::try_from(burst.max(1)).unwrap_or(u32::MAX))
        .finish()
        .expect("a positive period and burst");
    GovernorLayer::new(config).error_handler(move |e| too_many(e, per_second))
}

/// 429 with `Retry-After` and a JSON error.
fn too_many(error: GovernorError, per_second: u64) -> Response<Body> {
    let (status, wait, headers) = match error {
        GovernorError::TooManyRequests { wait_time, headers } => (StatusCode::TOO_MANY_REQUESTS, wait_time, headers),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, 0, None),
    };
    let body = serde_json::json!({
        "error": format!("rate limit: {per_second} requests per second per client; retry after {}s", wait.max(1))
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    if let Some(headers) = headers {
        response.headers_mut().extend(headers);
    }
    let retry = HeaderValue::from(wait.max(1));
    response.headers_mut().insert(header::RETRY_AFTER, retry);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
