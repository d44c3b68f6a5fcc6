//! Rendered response bodies, kept for the requests that share what they were rendered
//! from: under load, many requests fall within one snapshot's cache window (or one
//! recorded history sample), and rendering each anew was most of their cost. A client
//! that accepts gzip (Prometheus, browsers) gets the body compressed, once per body kept:
//! most of a larger route's cost under load is the kernel copying its bytes.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::snapshot::Snapshot;

/// Bodies rendered for one generation `G` of the inputs (a snapshot, a count of recorded
/// samples), at most `capacity` of them, one per key `K` (a format, a query). A new
/// generation drops every body of the old one, so the cache holds one generation's worth.
pub(crate) struct BodyCache<G, K> {
    capacity: usize,
    entries: Mutex<Option<Generation<G, K>>>,
}

/// One generation and its bodies by key.
type Generation<G, K> = (G, Vec<(K, Bytes)>);

impl<G: PartialEq, K: PartialEq> BodyCache<G, K> {
    /// An empty cache of at most `capacity` bodies.
    pub(crate) const fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(None),
        }
    }

    /// The body for `key` of `generation`: the kept one, or `render`'s, then kept. Two
    /// requests that miss at once both render; the later one is kept.
    ///
    /// # Errors
    /// `render`'s error, which is not kept.
    pub(crate) fn get_or_render<E>(
        &self,
        generation: G,
        key: K,
        render: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Bytes, E> {
        if let Some((kept, entries)) = self.entries.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            if *kept == generation {
                if let Some((_, body)) = entries.iter().find(|(k, _)| *k == key) {
                    return Ok(body.clone());
                }
            }
        }
        let body = Bytes::from(render()?);
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some((kept, entries)) if *kept == generation => {
                entries.retain(|(k, _)| *k != key);
                if entries.len() >= self.capacity {
                    entries.remove(0);
                }
                entries.push((key, body.clone()));
            }
            _ => *guard = Some((generation, vec![(key, body.clone())])),
        }
        Ok(body)
    }
}

/// A snapshot as a generation: the very same snapshot, not an equal one (holding it keeps
/// its address from being reused by another).
pub(crate) struct SameSnapshot(pub(crate) Arc<Snapshot>);

impl PartialEq for SameSnapshot {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
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
                .get_or_render(generation, key, || {
                    renders += 1;
                    Ok::<_, ()>(format!("{generation}{key}").into_bytes())
                })
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
    fn an_error_is_not_kept() {
        let cache = BodyCache::<u64, ()>::new(1);
        assert_eq!(cache.get_or_render(1, (), || Err::<Vec<u8>, _>("no")), Err("no"));
        assert_eq!(
            cache.get_or_render(1, (), || Ok::<_, &str>(b"yes".to_vec())).unwrap(),
            "yes"
        );
    }
}
