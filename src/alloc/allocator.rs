//! The tracking global allocator: one tag byte after each allocation names its component.

use std::alloc::{GlobalAlloc, Layout};

use super::counters;

/// A `#[global_allocator]` wrapper that attributes every heap byte to a component.
///
/// Each allocation is asked of the inner allocator one byte larger, and that byte,
/// just past the caller's memory, holds the slot of the component that was current
/// when it was made. A free reads the byte and credits the bytes back to that
/// component, whichever thread or component frees them, so live bytes per component
/// (allocated − freed) are exact.
///
/// The extra byte costs nothing when a request leaves room in its jemalloc size class
/// (4 classes per doubling), and a whole class step when the request is exactly a
/// class size — which Rust's doubling growth of `Vec` and `String` hits often. On a
/// serde_json/HashMap workload that came to about 6 % more resident memory (see
/// BENCHMARKS.md).
///
/// A `realloc` keeps the allocation's component: a buffer belongs to whoever created
/// it, wherever it grows. Counters are sharded per thread (see the crate docs).
///
/// ```
/// use memtel::alloc::TrackingAllocator;
///
/// #[global_allocator]
/// static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> =
///     TrackingAllocator::new(tikv_jemallocator::Jemalloc);
///
/// let cache = memtel::component("cache");
/// let buffer = cache.in_scope(|| vec![0u8; 1 << 20]);
/// assert!(cache.live_bytes() >= 1 << 20);
/// drop(buffer);
/// ```
#[derive(Debug, Default)]
pub struct TrackingAllocator<A> {
    inner: A,
}

impl<A> TrackingAllocator<A> {
    /// Wraps `inner`, which serves the actual memory.
    pub const fn new(inner: A) -> Self {
        Self { inner }
    }
}

/// The layout asked of the inner allocator: one byte more for the tag.
#[inline(always)]
fn tagged(layout: Layout) -> Option<Layout> {
    let size = layout.size() + 1;
    // Layout's invariant: the size rounded up to the alignment fits in isize. The
    // alignment is already valid, so that is the only check needed.
    if size > isize::MAX as usize - (layout.align() - 1) {
        return None;
    }
    // SAFETY: the alignment comes from a valid Layout and the size was checked above.
    Some(unsafe { Layout::from_size_align_unchecked(size, layout.align()) })
}

// SAFETY: every method forwards to the inner allocator with the tagged layout, which
// is the layout that allocation was made with; the tag byte lies inside that
// allocation, just past the caller's `layout.size()` bytes.
unsafe impl<A: GlobalAlloc> GlobalAlloc for TrackingAllocator<A> {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(tagged) = tagged(layout) else {
            return std::ptr::null_mut();
        };
        let ptr = self.inner.alloc(tagged);
        if !ptr.is_null() {
            ptr.add(layout.size()).write(counters::on_alloc(layout.size()));
        }
        ptr
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let Some(tagged) = tagged(layout) else {
            return std::ptr::null_mut();
        };
        let ptr = self.inner.alloc_zeroed(tagged);
        if !ptr.is_null() {
            ptr.add(layout.size()).write(counters::on_alloc(layout.size()));
        }
        ptr
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let slot = ptr.add(layout.size()).read();
        counters::on_free(slot, layout.size());
        // The tagged layout was valid when this allocation was made.
        self.inner.dealloc(
            ptr,
            Layout::from_size_align_unchecked(layout.size() + 1, layout.align()),
        );
    }

    #[inline(always)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(new_tagged) = tagged(Layout::from_size_align_unchecked(new_size, layout.align())) else {
            return std::ptr::null_mut();
        };
        let slot = ptr.add(layout.size()).read();
        let old = Layout::from_size_align_unchecked(layout.size() + 1, layout.align());
        let new_ptr = self.inner.realloc(ptr, old, new_tagged.size());
        if !new_ptr.is_null() {
            new_ptr.add(new_size).write(slot);
            counters::on_realloc(slot, layout.size(), new_size);
        }
        new_ptr
    }
}
