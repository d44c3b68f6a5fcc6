//! `GET /memory`: one self-contained page (compiled into the binary, no external requests)
//! that polls the profile, history and trends routes and draws them with its own small SVG
//! code. The page holds no figures itself, so it needs no token; it asks for one when the
//! data routes answer 401 and keeps it in the tab's session storage only.

use axum::http::{header, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// The path of the page.
pub const PAGE_PATH: &str = "/memory";

const PAGE: &str = include_str!("memory.html");

/// An axum router serving the page at [`PAGE_PATH`]; mount it next to
/// [`router`](crate::router), whose routes it reads.
pub fn page_router() -> Router {
    Router::new().route(
        PAGE_PATH,
        get(|| async {
            (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/html; charset=utf-8"),
                    ),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                ],
                PAGE,
            )
                .into_response()
        }),
    )
}
