//! Which attribution scheme the tracking allocator uses over jemalloc: placement (the
//! default: small allocations in their component's arena, see `arenas`) or tags only.
//!
//! Tags alone are the simplest scheme — one byte after each allocation, jemalloc's own
//! paths for everything — and always exact; placement saves the tag's class step and
//! most of its time. The escape hatch for an environment where placement misbehaves is
//! [`TrackingAllocator::tags_only`](super::TrackingAllocator::tags_only), or the
//! environment variable [`VARIABLE`] set to `tags`, read once, before the first
//! allocation is placed.

/// The environment variable that chooses the scheme: `tags` or `placement` (the default).
pub const VARIABLE: &str = "MEMTEL_ALLOC_SCHEME";

/// The attribution scheme, as [`VARIABLE`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Small allocations in their component's arena (the default).
    Placement,
    /// A tag byte after every allocation.
    Tags,
}

impl Scheme {
    /// The scheme a value of [`VARIABLE`] names (`tags` or `placement`, in any case);
    /// `None` for anything else.
    ///
    /// ```
    /// use memtel::alloc::Scheme;
    /// assert_eq!(Scheme::parse(b"TAGS"), Some(Scheme::Tags));
    /// assert_eq!(Scheme::parse(b"tag"), None);
    /// ```
    pub fn parse(value: &[u8]) -> Option<Scheme> {
        if value.eq_ignore_ascii_case(b"tags") {
            Some(Scheme::Tags)
        } else if value.eq_ignore_ascii_case(b"placement") {
            Some(Scheme::Placement)
        } else {
            None
        }
    }
}

/// Whether the environment leaves placement on: anything but `tags` does (the service
/// refuses other values at start; the allocator cannot report them). Read with `getenv`,
/// which does not allocate (this runs inside the allocator).
pub(crate) fn placement_wanted() -> bool {
    // SAFETY: a NUL-terminated name; the value, if any, is a C string owned by the
    // environment, read before returning.
    let value = unsafe { libc::getenv(c"MEMTEL_ALLOC_SCHEME".as_ptr()) };
    if value.is_null() {
        return true;
    }
    // SAFETY: getenv returned a C string.
    let value = unsafe { std::ffi::CStr::from_ptr(value) };
    Scheme::parse(value.to_bytes()) != Some(Scheme::Tags)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_variable_name_matches_the_one_read() {
        assert_eq!(c"MEMTEL_ALLOC_SCHEME".to_str(), Ok(super::VARIABLE));
    }
}
