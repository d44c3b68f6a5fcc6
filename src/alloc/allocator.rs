//! The tracking global allocator: each allocation's component is named by a tag byte
//! after it, or, over jemalloc, by the address range it was placed in.

use std::alloc::{GlobalAlloc, Layout};

#[cfg(feature = "jemalloc")]
use super::arenas;
use super::counters;

/// A `#[global_allocator]` wrapper that attributes every heap byte to a component.
///
/// Each allocation is asked of the inner allocator one byte larger, and that byte,
/// just past the caller's memory, holds the slot of the component that was current
/// when it was made. A free reads the byte and credits the bytes back to that
/// component, whichever thread or component frees them, so live bytes per component
/// (allocated − freed) are exact.
///
/// The extra byte costs nothing when a request leaves room in its size class, and a
/// whole class step when the request is exactly a class size — which Rust's doubling
/// growth of `Vec` and `String` hits often (about 40 % of the allocations of a
/// serde_json/HashMap workload). So over jemalloc (`A` = `tikv_jemallocator::Jemalloc`,
/// feature `jemalloc`), small exact-class requests carry no tag: they are served by a
/// jemalloc arena of their component's own, whose pages come from chunks of a reserved
/// address range recorded as that component's, and a free finds the component from the
/// address. That brings the memory cost of attribution from about 6 % to about 2 %
/// (BENCHMARKS.md). It reserves 64 GiB of address space (`PROT_NONE`, no memory) on first
/// use; where that is refused, every allocation is tagged.
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

/// Whether `A` is jemalloc, whose arenas can hold exact-class allocations untagged.
/// (Both sides are constants: the comparison folds away.)
#[cfg(feature = "jemalloc")]
#[inline(always)]
fn places_in_arenas<A: 'static>() -> bool {
    std::any::TypeId::of::<A>() == std::any::TypeId::of::<tikv_jemallocator::Jemalloc>()
}

impl<A: GlobalAlloc> TrackingAllocator<A> {
    /// Allocates with a tag byte after the caller's memory.
    #[inline(always)]
    unsafe fn alloc_tagged(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let Some(tagged) = tagged(layout) else {
            return std::ptr::null_mut();
        };
        let ptr = if zeroed {
            self.inner.alloc_zeroed(tagged)
        } else {
            self.inner.alloc(tagged)
        };
        if !ptr.is_null() {
            ptr.add(layout.size()).write(counters::on_alloc(layout.size()));
        }
        ptr
    }

    /// Resizes a tagged allocation, keeping its tag.
    #[inline(always)]
    unsafe fn realloc_tagged(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
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

    /// Frees a tagged allocation.
    #[inline(always)]
    unsafe fn dealloc_tagged(&self, ptr: *mut u8, layout: Layout) {
        let slot = ptr.add(layout.size()).read();
        counters::on_free(slot, layout.size());
        // The tagged layout was valid when this allocation was made.
        self.inner.dealloc(
            ptr,
            Layout::from_size_align_unchecked(layout.size() + 1, layout.align()),
        );
    }
}

#[cfg(feature = "jemalloc")]
impl<A: GlobalAlloc> TrackingAllocator<A> {
    /// Allocates a size [`arenas::may_want`] in the current component's arena if it is an
    /// exact class and the arena is available, else with a tag.
    /// Out of line, like the other placed paths, so the tagged path stays small enough
    /// to be inlined into every allocation site. (`cold` only steers inlining and code
    /// layout; the branch itself is predicted at run time.)
    #[cold]
    #[inline(never)]
    unsafe fn alloc_placed(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let size = layout.size();
        if !arenas::wants(size, layout.align()) {
            return self.alloc_tagged(layout, zeroed);
        }
        let ptr = counters::STATE
            .try_with(|s| {
                let slot = s.current.get();
                let ptr = arenas::alloc(s, slot, size, zeroed);
                if !ptr.is_null() {
                    counters::record_alloc(s, slot, size);
                }
                ptr
            })
            .unwrap_or(std::ptr::null_mut());
        if ptr.is_null() {
            return self.alloc_tagged(layout, zeroed);
        }
        ptr
    }

    /// `realloc` when allocations may be placed: an allocation whose new size is an
    /// exact class moves to (or stays in) its component's arena, any other size to (or
    /// in) the tagged heap. Its component never changes.
    #[cold]
    #[inline(never)]
    unsafe fn realloc_placed(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old_size, align) = (layout.size(), layout.align());
        let to_arena = arenas::wants(new_size, align);
        let Some(slot) = arenas::slot_of(ptr) else {
            if to_arena {
                let slot = ptr.add(old_size).read();
                let new_ptr = counters::STATE
                    .try_with(|s| arenas::alloc(s, slot, new_size, false))
                    .unwrap_or(std::ptr::null_mut());
                if !new_ptr.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new_ptr, old_size.min(new_size));
                    self.inner
                        .dealloc(ptr, Layout::from_size_align_unchecked(old_size + 1, align));
                    counters::on_realloc(slot, old_size, new_size);
                    return new_ptr;
                }
            }
            return self.realloc_tagged(ptr, layout, new_size);
        };
        if to_arena {
            let new_ptr = counters::STATE
                .try_with(|s| arenas::realloc(s, slot, ptr, new_size))
                .unwrap_or(std::ptr::null_mut());
            if !new_ptr.is_null() {
                counters::on_realloc(slot, old_size, new_size);
                return new_ptr;
            }
        }
        // To the tagged heap, keeping the component.
        let Some(tagged) = tagged(Layout::from_size_align_unchecked(new_size, align)) else {
            return std::ptr::null_mut();
        };
        let new_ptr = self.inner.alloc(tagged);
        if new_ptr.is_null() {
            return new_ptr;
        }
        std::ptr::copy_nonoverlapping(ptr, new_ptr, old_size.min(new_size));
        new_ptr.add(new_size).write(slot);
        free_placed(slot, ptr, old_size, false);
        counters::on_realloc(slot, old_size, new_size);
        new_ptr
    }
}

/// Frees an allocation of `slot`'s arena, crediting its bytes back if `count`.
#[cfg(feature = "jemalloc")]
#[cold]
#[inline(never)]
unsafe fn free_placed(slot: u8, ptr: *mut u8, size: usize, count: bool) {
    let freed = counters::STATE.try_with(|s| {
        if count {
            counters::record_free(s, slot, size);
        }
        arenas::free(s, slot, ptr, size);
    });
    if freed.is_err() {
        if count {
            counters::on_free(slot, size);
        }
        arenas::free_without_tcache(ptr, size);
    }
}

// SAFETY: a tagged allocation is made, resized and freed by the inner allocator with
// the tagged layout, its tag byte inside it just past the caller's `layout.size()`
// bytes. A placed allocation (jemalloc only) is made, resized and freed by jemalloc
// with the caller's own size; `arenas::slot_of` tells the two apart by address, since
// only arenas' pages lie in the reserved range.
unsafe impl<A: GlobalAlloc + 'static> GlobalAlloc for TrackingAllocator<A> {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(feature = "jemalloc")]
        if places_in_arenas::<A>() && arenas::may_want(layout.size()) {
            return self.alloc_placed(layout, false);
        }
        self.alloc_tagged(layout, false)
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(feature = "jemalloc")]
        if places_in_arenas::<A>() && arenas::may_want(layout.size()) {
            return self.alloc_placed(layout, true);
        }
        self.alloc_tagged(layout, true)
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(feature = "jemalloc")]
        if places_in_arenas::<A>() {
            if let Some(slot) = arenas::slot_of(ptr) {
                free_placed(slot, ptr, layout.size(), true);
                return;
            }
        }
        self.dealloc_tagged(ptr, layout)
    }

    #[inline(always)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        #[cfg(feature = "jemalloc")]
        if places_in_arenas::<A>() && (arenas::may_want(new_size) || arenas::slot_of(ptr).is_some()) {
            return self.realloc_placed(ptr, layout, new_size);
        }
        self.realloc_tagged(ptr, layout, new_size)
    }
}
