//! Bearer-token authentication for memtel's routes, as an axum layer.
//!
//! [`BearerAuth::layer`] wraps any router: every request then needs
//! `Authorization: Bearer <token>`, compared in constant time; otherwise 401 with
//! `WWW-Authenticate: Bearer` and a JSON error. The token never appears in a message or a
//! `Debug` output. An application may use its own authentication instead.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use subtle::ConstantTimeEq;

use crate::http::ErrorBody;

/// A bearer token that memtel's routes require.
///
/// ```
/// # #[global_allocator]
/// # static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// let auth = memtel::auth::BearerAuth::new("s3cret").expect("a token");
/// let app: axum::Router = auth.layer(memtel::router(memtel::MemoryMonitor::new()));
/// # let _ = app;
/// ```
#[derive(Clone)]
pub struct BearerAuth {
    token: Arc<[u8]>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth { token: <hidden> }")
    }
}

impl BearerAuth {
    /// A token: surrounding whitespace (a file's trailing newline) is removed; `None` if
    /// nothing is left, or it holds characters a header cannot carry.
    pub fn new(token: &str) -> Option<Self> {
        let token = token.trim();
        let valid = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
        valid.then(|| Self {
            token: Arc::from(token.as_bytes()),
        })
    }

    /// Whether `header` (an `Authorization` value) carries this token.
    pub fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        let Some(value) = header.map(HeaderValue::as_bytes) else {
            return false;
        };
        let Some(given) = value
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"Bearer "))
            .map(|_| value[7..].trim_ascii())
        else {
            return false;
        };
        // Constant time in the token's bytes (lengths may differ: that is not secret).
        bool::from(given.ct_eq(&self.token))
    }

    /// `router` with every route behind this token.
    pub fn layer<S: Clone + Send + Sync + 'static>(&self, router: Router<S>) -> Router<S> {
        let auth = self.clone();
        router.layer(axum::middleware::from_fn(move |request: Request, next: Next| {
            let auth = auth.clone();
            async move {
                if auth.accepts(request.headers().get(header::AUTHORIZATION)) {
                    next.run(request).await
                } else {
                    unauthorized()
                }
            }
        }))
    }
}

/// 401 with `WWW-Authenticate: Bearer` and a JSON error.
pub fn unauthorized() -> Response {
    let mut response = (
        StatusCode::UNAUTHORIZED,
        Json(ErrorBody {
            error: "authentication required: send Authorization: Bearer <token>".into(),
        }),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"memtel\""),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_accepted() {
        let auth = BearerAuth::new(" s3cret\n").expect("token");
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(auth.accepts(Some(&h("Bearer s3cret"))));
        assert!(auth.accepts(Some(&h("bearer s3cret"))));
        for wrong in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer", ""] {
            assert!(!auth.accepts(Some(&h(wrong))), "{wrong:?}");
        }
        assert!(!auth.accepts(None));
        assert!(BearerAuth::new("  \n").is_none());
        assert!(BearerAuth::new("two words").is_none());
        assert!(!format!("{auth:?}").contains("s3cret"));
    }
}
