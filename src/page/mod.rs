//! `GET /memory`: one self-contained page (compiled into the binary, no external requests)
//! that polls the profile, history and trends routes and draws them with its own small SVG
//! code. The page holds no figures itself, so it needs no token; it asks for one when the
//! data routes answer 401 and keeps it in the tab's session storage only.

use std::sync::OnceLock;

use axum::body::Bytes;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use crate::body_cache::{encode, respond, Wants};

/// The path of the page.
pub const PAGE_PATH: &str = "/memory";

const PAGE: &str = include_str!("memory.html");

/// An axum router serving the page at [`PAGE_PATH`]; mount it next to
/// [`router`](crate::router), whose routes it reads.
pub fn page_router() -> Router {
    Router::new().route(PAGE_PATH, get(page))
}

/// The page, gzipped (once, at the first request that accepts it) for a browser that
/// accepts it: 11 KB of HTML otherwise.
async fn page(wants: Wants) -> Response {
    static GZIPPED: OnceLock<Bytes> = OnceLock::new();
    let body = if wants.gzip {
        GZIPPED
            .get_or_init(|| Bytes::from(encode(PAGE.as_bytes().to_vec(), true)))
            .clone()
    } else {
        Bytes::from_static(PAGE.as_bytes())
    };
    let mut response = respond(body, wants.gzip, "text/html; charset=utf-8");
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
