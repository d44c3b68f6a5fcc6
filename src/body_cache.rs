//! Rendered response bodies, kept for the requests that share what they were rendered
//! from: under load, many requests fall within one snapshot's cache window (or one
//! recorded history sample), and rendering each anew was most of their cost. A client
//! that accepts gzip (Prometheus, browsers) gets the body compressed, once per body kept:
//! most of a larger route's cost under load is the kernel copying its bytes.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, TryLockError};

use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::snapshot::Snapshot;
use crate::MemoryMonitor;

/// Bodies rendered for the latest generation `G` of the inputs (a snapshot, a count of
/// recorded samples), at most `capacity` of them, one per key `K` (a format, a query),
/// and those of the generation before it. A body of an older generation is served only
/// while another request renders the current one, and only if the caller allows it
/// (`stale_ok`): under load, every request that missed at once rendered the same body.
pub(crate) struct BodyCache<G, K> {
    capacity: usize,
    entries: Mutex<Kept<G, K>>,
    /// Held by the request rendering a body.
    rendering: Mutex<()>,
}

/// The latest generation's bodies, and the previous generation's.
struct Kept<G, K> {
    latest: Option<Generation<G, K>>,
    previous: Option<Generation<G, K>>,
}

/// One generation and its bodies by key.
type Generation<G, K> = (G, Vec<(K, Bytes)>);

impl<G: PartialEq, K: PartialEq> BodyCache<G, K> {
    /// An empty cache of at most `capacity` bodies per generation.
    pub(crate) const fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(Kept {
                latest: None,
                previous: None,
            }),
            rendering: Mutex::new(()),
        }
    }

    /// The body for `key` of `generation`: the kept one, or `render`'s, then kept. While
    /// another request renders, a kept body for `key` of an older generation that
    /// `stale_ok` accepts is returned instead; without one, both render and the later is
    /// kept.
    ///
    /// # Errors
    /// `render`'s error, which is not kept.
    pub(crate) fn get_or_render<E>(
        &self,
        generation: G,
        key: K,
        stale_ok: impl Fn(&G) -> bool,
        render: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Bytes, E> {
        let stale = {
            let kept = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match body_of(&kept.latest, &key) {
                Some((g, body)) if *g == generation => return Ok(body.clone()),
                Some((g, body)) if stale_ok(g) => Some(body.clone()),
                _ => body_of(&kept.previous, &key)
                    .filter(|(g, _)| **g != generation && stale_ok(g))
                    .map(|(_, body)| body.clone()),
            }
        };
        let _rendering = match self.rendering.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::WouldBlock) => match stale {
                Some(body) => return Ok(body),
                None => None,
            },
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        };
        let body = Bytes::from(render()?);
        let mut kept = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match kept.latest.as_mut() {
            Some((latest, entries)) if *latest == generation => {
                entries.retain(|(k, _)| *k != key);
                if entries.len() >= self.capacity {
                    entries.remove(0);
                }
                entries.push((key, body.clone()));
            }
            _ => {
                kept.previous = kept.latest.replace((generation, vec![(key, body.clone())]));
            }
        }
        Ok(body)
    }
}

/// A generation's body for `key`, if it has one.
fn body_of<'a, G, K: PartialEq>(generation: &'a Option<Generation<G, K>>, key: &K) -> Option<(&'a G, &'a Bytes)> {
    let (g, entries) = generation.as_ref()?;
    Some((g, &entries.iter().find(|(k, _)| k == key)?.1))
}

/// A snapshot as a generation: the very same snapshot, not an equal one (holding it keeps
/// its address from being reused by another).
pub(crate) struct SameSnapshot(pub(crate) Arc<Snapshot>);

impl SameSnapshot {
    /// Whether a body of this snapshot may stand in for `newer`'s while that one renders:
    /// taken at most `monitor`'s stand-in age before it, as for the snapshot itself.
    pub(crate) fn may_stand_in_for(&self, newer: &Snapshot, monitor: &MemoryMonitor) -> bool {
        newer
            .taken_at
            .duration_since(self.0.taken_at)
            .is_ok_and(|age| age <= monitor.stand_in_age())
    }
}

impl PartialEq for SameSnapshot {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// What a request asks of a kept body, read from its headers in place: the `HeaderMap`
/// extractor copies every header of every request, which under load was a visible part
/// of a cached route's cost.
pub(crate) struct Wants {
    /// The client accepts gzip ([`accepts_gzip`]).
    pub(crate) gzip: bool,
    /// `Accept` asks for OpenMetrics text.
    pub(crate) openmetrics: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for Wants {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        let openmetrics = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("application/openmetrics-text"));
        Ok(Self {
            gzip: accepts_gzip(&parts.headers),
            openmetrics,
        })
    }
}

/// Whether the request's `Accept-Encoding` accepts gzip (`gzip`, `x-gzip` or `*`, with a
/// quality above 0).
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            !refused && ["gzip", "x-gzip", "*"].iter().any(|g| name.eq_ignore_ascii_case(g))
        })
}

/// `body` gzipped when `gzip`, at the fastest level (a body is compressed once per
/// generation, and the point is fewer bytes to copy, not the fewest).
///
/// One compressor is kept and reset for each body: a fresh one zeroes a few hundred KiB
/// of tables, which under load (a render per snapshot) was a larger cost than compressing.
pub(crate) fn encode(body: Vec<u8>, gzip: bool) -> Vec<u8> {
    static COMPRESSOR: Mutex<Option<flate2::Compress>> = Mutex::new(None);
    if !gzip {
        return body;
    }
    let mut kept = COMPRESSOR.lock().unwrap_or_else(|p| p.into_inner());
    let compressor = kept.get_or_insert_with(|| flate2::Compress::new(flate2::Compression::fast(), false));
    compressor.reset();
    // RFC 1952: magic, deflate, no flags, no time, no extra flags, unknown OS.
    let mut out = Vec::with_capacity(body.len() / 3 + 64);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    loop {
        let status = compressor.compress_vec(
            &body[compressor.total_in() as usize..],
            &mut out,
            flate2::FlushCompress::Finish,
        );
        match status {
            Ok(flate2::Status::StreamEnd) => break,
            Ok(_) => out.reserve(out.capacity().max(1024)),
            Err(_) => return body,
        }
    }
    let mut crc = flate2::Crc::new();
    crc.update(&body);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    // ISIZE: the length modulo 2^32, as the format defines it.
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out
}

/// A kept body as a `200` of `content_type`, marked gzipped when it is; `Vary:
/// Accept-Encoding` either way, so caches keep the two apart.
pub(crate) fn respond(body: Bytes, gzip: bool, content_type: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
        accepts_gzip(&headers)
    }

    #[test]
    fn gzip_is_accepted_as_clients_say_it() {
        assert!(!accepts_gzip(&HeaderMap::new()));
        assert!(accept("gzip"));
        assert!(accept("gzip, deflate, br, zstd"));
        assert!(accept("br;q=1.0, GZIP;q=0.5"));
        assert!(accept("*"));
        assert!(!accept("identity"));
        assert!(!accept("gzip;q=0"));
        assert!(!accept("gzip; q=0.0, deflate"));
        assert!(!accept("gzipx"));
    }

    #[test]
    fn a_gzipped_body_decodes_to_the_body() {
        // Text that compresses well, and bytes that do not (more output than input).
        let mut noise = 0x9E37_79B9_7F4A_7C15_u64;
        let random: Vec<u8> = (0..200_000)
            .map(|_| {
                noise ^= noise << 13;
                noise ^= noise >> 7;
                noise ^= noise << 17;
                noise as u8
            })
            .collect();
        for body in [b"memtel ".repeat(500), random, Vec::new()] {
            // Twice: the kept compressor is reset between bodies.
            for _ in 0..2 {
                let compressed = encode(body.clone(), true);
                let mut decoded = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&compressed[..]), &mut decoded).unwrap();
                assert_eq!(decoded, body);
            }
            assert_eq!(encode(body.clone(), false), body);
        }
        assert!(encode(b"memtel ".repeat(500), true).len() < 350);
    }

    #[test]
    fn a_body_is_rendered_once_per_generation_and_key() {
        let cache = BodyCache::<u64, &str>::new(2);
        let mut renders = 0;
        let mut get = |generation, key: &'static str| {
            cache
                .get_or_render(
                    generation,
                    key,
                    |_| false,
                    || {
                        renders += 1;
                        Ok::<_, ()>(format!("{generation}{key}").into_bytes())
                    },
                )
                .unwrap()
        };
        assert_eq!(get(1, "a"), "1a");
        assert_eq!(get(1, "a"), "1a");
        assert_eq!(get(1, "b"), "1b");
        assert_eq!(get(1, "c"), "1c"); // evicts "a"
        assert_eq!(get(1, "a"), "1a");
        assert_eq!(get(2, "a"), "2a"); // a new generation
        assert_eq!(get(2, "a"), "2a");
        assert_eq!(renders, 5);
    }

    #[test]
    fn an_older_body_stands_in_only_while_another_renders_and_if_allowed() {
        let cache = BodyCache::<u64, &str>::new(2);
        let ok = |body: &'static str| move || Ok::<_, ()>(body.as_bytes().to_vec());
        assert_eq!(cache.get_or_render(1, "a", |_| true, ok("1a")).unwrap(), "1a");
        // A request that misses while another renders generation 2 (here: from inside
        // that rendering) gets generation 1's body, when allowed and only for its key.
        let seen = cache
            .get_or_render(
                2,
                "a",
                |_| true,
                || {
                    let stand_in = cache.get_or_render(2, "a", |old| *old == 1, ok("never")).unwrap();
                    let refused = cache.get_or_render(2, "a", |_| false, ok("2a, rendered too")).unwrap();
                    let other_key = cache.get_or_render(2, "b", |_| true, ok("2b")).unwrap();
                    Ok::<_, ()>([&stand_in[..], &refused[..], &other_key[..]].join(&b'|'))
                },
            )
            .unwrap();
        assert_eq!(seen, "1a|2a, rendered too|2b");
        // The rendering that finished is kept; the previous generation still stands in
        // for a third while that renders, and nothing older does.
        assert_eq!(
            cache.get_or_render(2, "a", |_| true, ok("never")).unwrap(),
            "1a|2a, rendered too|2b"
        );
        cache
            .get_or_render(
                3,
                "a",
                |_| true,
                || {
                    assert_eq!(
                        cache.get_or_render(3, "a", |_| true, ok("never")).unwrap(),
                        "1a|2a, rendered too|2b"
                    );
                    assert_eq!(cache.get_or_render(3, "c", |_| true, ok("3c")).unwrap(), "3c");
                    Ok::<_, ()>(b"3a".to_vec())
                },
            )
            .unwrap();
        // No render in progress: never a stand-in.
        assert_eq!(cache.get_or_render(4, "a", |_| true, ok("4a")).unwrap(), "4a");
    }

    #[test]
    fn an_error_is_not_kept() {
        let cache = BodyCache::<u64, ()>::new(1);
        assert_eq!(
            cache.get_or_render(1, (), |_| true, || Err::<Vec<u8>, _>("no")),
            Err("no")
        );
        assert_eq!(
            cache
                .get_or_render(1, (), |_| true, || Ok::<_, &str>(b"yes".to_vec()))
                .unwrap(),
            "yes"
        );
    }
}
