//! The tracking global allocator: each allocation's component is named, over jemalloc,
//! by the address range it was placed in, or else by a tag byte after it.

use std::alloc::{GlobalAlloc, Layout};

use super::counters;
#[cfg(feature = "profiling")]
use super::sampler;
#[cfg(all(feature = "jemalloc", feature = "profiling"))]
use super::spares;
#[cfg(feature = "jemalloc")]
use super::{arenas, bins, classes};

/// A `#[global_allocator]` wrapper that attributes every heap byte to a component.
///
/// A free must learn which component made the allocation, whichever thread or component
/// frees it, so live bytes per component (allocated − freed) are exact. Two ways:
///
/// - **Placement** (over jemalloc: `A` = `tikv_jemallocator::Jemalloc`, feature
///   `jemalloc`). Small allocations (up to 14 KiB once rounded to their alignment, which
///   may be up to a page) come from a jemalloc arena of their component's own, whose
///   pages come from 2 MiB chunks of one reserved address range; a table records which
///   component owns each chunk, and a free finds the component from the address. Each
///   thread keeps short lists of free regions per component and size class (at most
///   16 KiB or 8 regions per class, and 512 KiB in all per thread), so most allocations
///   and frees take a few loads and stores and never reach jemalloc; the lists go back to
///   jemalloc when the thread exits. An allocation takes exactly the size class jemalloc
///   alone would give it. The range is 64 GiB of address space (`PROT_NONE`, no memory),
///   reserved on first use. Why this is safe in every case (threads jemalloc already
///   cleaned up, `fork`, `retain:false`, a full reservation) is in `bins` and the README.
/// - **A tag** for everything else — large allocations, alignments above a page, any
///   inner allocator but jemalloc, every allocation that cannot be placed (the
///   reservation refused by an `RLIMIT_AS` or full, a thread jemalloc has cleaned up), and
///   everything with [`tags_only`](Self::tags_only) or `MEMTEL_ALLOC_SCHEME=tags`: each is
///   asked of the inner allocator one byte larger, and that byte, just past the caller's
///   memory, holds the component. It costs nothing when the request leaves room in its
///   size class, and a whole class step when it does not.
///
/// Over jemalloc, attribution costs about 1 % more resident memory on a realistic data set
/// and 1.0–1.2× bare jemalloc's time, depending on the workload (BENCHMARKS.md).
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
#[derive(Debug)]
pub struct TrackingAllocator<A> {
    inner: A,
    /// Whether small allocations may be placed (over jemalloc).
    #[cfg(feature = "jemalloc")]
    placement: bool,
    /// Whether this allocator samples for heap profiles
    /// ([`with_heap_profiling`](Self::with_heap_profiling)).
    #[cfg(feature = "profiling")]
    profiling: bool,
}

impl<A: Default> Default for TrackingAllocator<A> {
    fn default() -> Self {
        Self::new(A::default())
    }
}

impl<A> TrackingAllocator<A> {
    /// Wraps `inner`, which serves the actual memory: over jemalloc, small allocations are
    /// placed (unless the environment variable `MEMTEL_ALLOC_SCHEME` is `tags`), the rest
    /// tagged.
    pub const fn new(inner: A) -> Self {
        Self {
            inner,
            #[cfg(feature = "jemalloc")]
            placement: true,
            #[cfg(feature = "profiling")]
            profiling: false,
        }
    }

    /// Wraps `inner` and attributes every allocation with a tag, never by placement: the
    /// simplest scheme, for an environment where placement misbehaves. Attribution is as
    /// exact; allocations of exactly a size class take the next class.
    ///
    /// ```
    /// use memtel::alloc::TrackingAllocator;
    ///
    /// #[global_allocator]
    /// static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> =
    ///     TrackingAllocator::tags_only(tikv_jemallocator::Jemalloc);
    ///
    /// let cache = memtel::component("cache");
    /// let buffer = cache.in_scope(|| vec![0u8; 64]);
    /// assert_eq!(cache.live_bytes(), 64);
    /// assert_eq!(memtel::alloc::component_arenas(), 0);
    /// # drop(buffer);
    /// ```
    pub const fn tags_only(inner: A) -> Self {
        Self {
            inner,
            #[cfg(feature = "jemalloc")]
            placement: false,
            #[cfg(feature = "profiling")]
            profiling: false,
        }
    }

    /// The same allocator, able to sample allocations for heap profiles
    /// ([`memtel::profile`](crate::profile)) once
    /// [`set_heap_sample_interval`](crate::alloc::set_heap_sample_interval) turns sampling
    /// on. An allocator built without it has no sampling code on its paths at all; with it
    /// and sampling off, each allocation pays one branch (BENCHMARKS.md).
    ///
    /// ```
    /// use memtel::alloc::TrackingAllocator;
    ///
    /// #[global_allocator]
    /// static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> =
    ///     TrackingAllocator::new(tikv_jemallocator::Jemalloc).with_heap_profiling();
    ///
    /// memtel::alloc::set_heap_sample_interval(512 << 10);
    /// let kept = memtel::component("cache").in_scope(|| vec![1u8; 8 << 20]);
    /// let profile = memtel::profile::heap_profile();
    /// assert!(profile.samples.iter().any(|s| s.component == "cache"));
    /// # drop(kept);
    /// ```
    #[cfg(feature = "profiling")]
    pub const fn with_heap_profiling(mut self) -> Self {
        self.profiling = true;
        self
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

/// Whether `A` is jemalloc, whose arenas can hold small allocations untagged.
/// (Both sides are constants: the comparison folds away.)
#[cfg(feature = "jemalloc")]
#[inline(always)]
fn places_in_arenas<A: 'static>() -> bool {
    std::any::TypeId::of::<A>() == std::any::TypeId::of::<tikv_jemallocator::Jemalloc>()
}

impl<A: GlobalAlloc> TrackingAllocator<A> {
    /// The component slot a tag names (without the sampled flag).
    #[inline(always)]
    fn owner(&self, tag: u8) -> u8 {
        #[cfg(feature = "profiling")]
        if self.profiling {
            return tag & !sampler::SAMPLED;
        }
        tag
    }

    /// Whether a tag marks a sampled allocation (only a profiling allocator makes them).
    #[cfg(feature = "profiling")]
    #[inline(always)]
    fn sampled(&self, tag: u8) -> bool {
        self.profiling && tag & sampler::SAMPLED != 0
    }

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
            // The tag moves with the allocation, sampled flag included.
            new_ptr.add(new_size).write(slot);
            counters::on_realloc(self.owner(slot), layout.size(), new_size);
            #[cfg(feature = "profiling")]
            if self.sampled(slot) {
                sampler::moved(ptr, new_ptr, new_size);
            }
        }
        new_ptr
    }

    /// Frees a tagged allocation.
    #[inline(always)]
    unsafe fn dealloc_tagged(&self, ptr: *mut u8, layout: Layout) {
        let slot = ptr.add(layout.size()).read();
        #[cfg(feature = "profiling")]
        if self.sampled(slot) {
            sampler::forget(ptr);
        }
        counters::on_free(self.owner(slot), layout.size());
        // The tagged layout was valid when this allocation was made.
        self.inner.dealloc(
            ptr,
            Layout::from_size_align_unchecked(layout.size() + 1, layout.align()),
        );
    }
}

#[cfg(feature = "profiling")]
impl<A: GlobalAlloc + 'static> TrackingAllocator<A> {
    /// A sampled allocation if one is due now (see `sampler`): made with a tag carrying
    /// the sampled flag, and recorded with its stack.
    #[inline(always)]
    unsafe fn maybe_sampled(&self, layout: Layout, zeroed: bool) -> Option<*mut u8> {
        if !self.profiling {
            return None;
        }
        let size = layout.size();
        if !counters::STATE.with(|s| sampler::take_sample(s, size)) {
            return None;
        }
        Some(self.alloc_sampled(layout, zeroed))
    }

    #[cold]
    #[inline(never)]
    unsafe fn alloc_sampled(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let Some(tagged) = tagged(layout) else {
            return std::ptr::null_mut();
        };
        #[cfg(feature = "jemalloc")]
        let small = if places_in_arenas::<A>() && self.placement {
            classes::placed_class(tagged.size(), tagged.align())
        } else {
            None
        };
        #[cfg(not(feature = "jemalloc"))]
        let small: Option<usize> = None;
        let ptr = match small {
            #[cfg(feature = "jemalloc")]
            Some(class) => small_sampled(tagged, zeroed, class),
            _ if zeroed => self.inner.alloc_zeroed(tagged),
            _ => self.inner.alloc(tagged),
        };
        if ptr.is_null() {
            return ptr;
        }
        let size = layout.size();
        counters::STATE.with(|s| {
            let slot = s.current.get();
            counters::record_alloc(s, slot, size);
            ptr.add(size).write(slot | sampler::SAMPLED);
            sampler::record(s, ptr, size, slot);
        });
        ptr
    }
}

#[cfg(feature = "jemalloc")]
impl<A: GlobalAlloc + 'static> TrackingAllocator<A> {
    /// The common case of `alloc` over jemalloc, kept small enough to inline: a small
    /// layout with an alignment of at most 16, a region in this thread's cache for the
    /// current component, and a shard of its own for the counts. Anything else goes to
    /// [`alloc_slow`](Self::alloc_slow), from a tail position so this path needs no stack
    /// frame.
    #[inline(always)]
    unsafe fn alloc_fast(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        #[cfg(feature = "profiling")]
        if self.profiling {
            return self.alloc_fast_profiled(layout, zeroed);
        }
        let (size, align) = (layout.size(), layout.align());
        if align > 16 {
            return self.alloc_slow(layout, zeroed);
        }
        let Some(class) = classes::class_of(size.max(align)) else {
            return self.alloc_slow(layout, zeroed);
        };
        let ptr = counters::STATE.with(|s| {
            let slot = s.current.get();
            let Some(shard) = counters::owned_shard(s) else {
                return std::ptr::null_mut();
            };
            let ptr = bins::pop(s, slot, class);
            if !ptr.is_null() {
                counters::record_alloc_owned(s, shard, slot, size);
            }
            ptr
        });
        if ptr.is_null() {
            return self.alloc_slow(layout, zeroed);
        }
        if zeroed {
            ptr.write_bytes(0, size);
        }
        ptr
    }

    /// [`alloc_fast`](Self::alloc_fast) for an allocator that samples: the same, plus the
    /// test of the thread's sampling countdown.
    #[cfg(feature = "profiling")]
    #[inline(always)]
    unsafe fn alloc_fast_profiled(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        let class = if align > 16 {
            None
        } else {
            classes::class_of(size.max(align))
        };
        // One way out to the slow path, not one per test: each call site counts against
        // inlining this into `__rust_alloc`'s callers, which the extra countdown test
        // otherwise tipped over (the allocation shim became a call: 1.08× the instructions
        // of a churn loop with sampling off).
        let mut ptr = std::ptr::null_mut();
        if let Some(class) = class {
            // Through `STATE.with`'s closure, as in `alloc_fast`. With rustc 1.95 a pointer
            // taken out of `STATE.with` left the thread-local access a call, and `RawVec`'s
            // allocation too big to inline: a churn loop with sampling off took 1.44× the
            // instructions of `new()`'s allocator, against 1.013× so.
            ptr = counters::STATE.with(|s| {
                let Some(shard) = counters::owned_shard(s) else {
                    return std::ptr::null_mut();
                };
                let slot = s.current.get();
                // The countdown is the thread's byte total (see `counters::ThreadState`):
                // testing it costs one branch after the subtraction every allocation makes.
                // The region is taken only once the test has passed, so a sample due has
                // only the subtraction to undo (putting a popped region back made this path
                // too big to inline again: 1.44× the instructions of `new()`'s, against
                // 1.0067×).
                let ptr = bins::pop_unless(s, slot, class, || sampler::count_down_unless_due(s, size));
                if !ptr.is_null() {
                    counters::record_counted_alloc_owned(s, shard, slot, size);
                }
                ptr
            });
        }
        if ptr.is_null() {
            return self.alloc_slow(layout, zeroed);
        }
        if zeroed {
            ptr.write_bytes(0, size);
        }
        ptr
    }

    /// `alloc` over jemalloc, every case: a small layout (`class`) from the current
    /// component's cache of its arena's regions (refilled as needed), else with a tag.
    #[cold]
    #[inline(never)]
    unsafe fn alloc_slow(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        #[cfg(feature = "profiling")]
        if let Some(ptr) = self.maybe_sampled(layout, zeroed) {
            return ptr;
        }
        let size = layout.size();
        if arenas::never_placed() {
            return self.alloc_tagged(layout, zeroed);
        }
        let Some(class) = classes::placed_class(size, layout.align()) else {
            return self.alloc_tagged_outlined(layout, zeroed);
        };
        let ptr = counters::STATE.with(|s| {
            let slot = s.current.get();
            let ptr = bins::take(s, slot, class);
            if !ptr.is_null() {
                counters::record_alloc(s, slot, size);
            }
            ptr
        });
        if ptr.is_null() {
            return self.alloc_tagged_outlined(layout, zeroed);
        }
        if zeroed {
            ptr.write_bytes(0, size);
        }
        ptr
    }

    /// The common case of `dealloc` of a placed allocation (see
    /// [`alloc_fast`](Self::alloc_fast)): room in this thread's cache.
    #[inline(always)]
    unsafe fn dealloc_placed(&self, ptr: *mut u8, layout: Layout, slot: u8) {
        let (size, align) = (layout.size(), layout.align());
        if align > 16 {
            return dealloc_placed_slow(ptr, layout, slot);
        }
        let Some(class) = classes::class_of(size.max(align)) else {
            return dealloc_placed_slow(ptr, layout, slot);
        };
        let freed = counters::STATE.with(|s| {
            let Some(shard) = counters::owned_shard(s) else {
                return bins::Freed::No;
            };
            let freed = bins::push_or_pass(s, slot, class);
            if !matches!(freed, bins::Freed::No) {
                counters::record_free_owned(s, shard, slot, size);
                if matches!(freed, bins::Freed::Kept) {
                    bins::push_unchecked(s, slot, class, ptr);
                }
            }
            freed
        });
        // Both calls in tail position, so this path needs no stack frame.
        match freed {
            bins::Freed::Kept => {}
            bins::Freed::Passed => bins::release(ptr, class),
            bins::Freed::No => dealloc_placed_slow(ptr, layout, slot),
        }
    }

    /// [`alloc_tagged`](Self::alloc_tagged) over jemalloc, out of line: tags are for
    /// large allocations, alignments above a page, and small allocations where placement
    /// is unavailable.
    #[inline(never)]
    unsafe fn alloc_tagged_outlined(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let Some(tagged) = tagged(layout) else {
            return std::ptr::null_mut();
        };
        if classes::placed_class(tagged.size(), tagged.align()).is_none() {
            // Large: jemalloc's own path (its tcache caches large sizes apart).
            return self.alloc_tagged(layout, zeroed);
        }
        let ptr = small_tagged(tagged, zeroed);
        if !ptr.is_null() {
            ptr.add(layout.size()).write(counters::on_alloc(layout.size()));
        }
        ptr
    }

    #[inline(never)]
    unsafe fn dealloc_tagged_outlined(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(feature = "profiling")]
        {
            let tag = ptr.add(layout.size()).read();
            if self.sampled(tag) {
                return self.dealloc_sampled(ptr, layout, tag);
            }
        }
        self.dealloc_tagged(ptr, layout)
    }

    /// Frees a sampled allocation when allocations may be placed: a small one's region is
    /// kept as the thread's spare for its next sample of that class if it has none
    /// (`spares`).
    #[cfg(feature = "profiling")]
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_sampled(&self, ptr: *mut u8, layout: Layout, tag: u8) {
        let Some(class) = classes::placed_class(layout.size() + 1, layout.align()) else {
            return self.dealloc_tagged(ptr, layout);
        };
        sampler::forget(ptr);
        let slot = self.owner(tag);
        counters::on_free(slot, layout.size());
        if !spares::keep(class, ptr) {
            // The tagged layout was valid when this allocation was made.
            self.inner.dealloc(
                ptr,
                Layout::from_size_align_unchecked(layout.size() + 1, layout.align()),
            );
        }
    }

    /// `realloc` when allocations may be placed: a small new size moves the allocation
    /// to (or keeps it in) a region of its component's arena, a large one to (or in) the
    /// tagged heap. Its component never changes.
    #[inline(never)]
    unsafe fn realloc_placed(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old_size, align) = (layout.size(), layout.align());
        let new_class = classes::placed_class(new_size, align);
        let Some(slot) = arenas::slot_of(ptr) else {
            if let Some(class) = new_class {
                let tag = ptr.add(old_size).read();
                // Moved into a region of its component's arena, it is no longer sampled.
                #[cfg(feature = "profiling")]
                if self.sampled(tag) {
                    sampler::forget(ptr);
                }
                let slot = self.owner(tag);
                let mut new_ptr = counters::STATE.with(|s| bins::take(s, slot, class));
                if new_ptr.is_null() {
                    // Placement unavailable: a small tagged allocation.
                    let new_layout = Layout::from_size_align_unchecked(new_size, align);
                    new_ptr = tagged(new_layout).map_or(std::ptr::null_mut(), |t| small_tagged(t, false));
                    if new_ptr.is_null() {
                        return new_ptr;
                    }
                    new_ptr.add(new_size).write(slot);
                }
                std::ptr::copy_nonoverlapping(ptr, new_ptr, old_size.min(new_size));
                self.inner
                    .dealloc(ptr, Layout::from_size_align_unchecked(old_size + 1, align));
                counters::on_realloc(slot, old_size, new_size);
                return new_ptr;
            }
            return self.realloc_tagged(ptr, layout, new_size);
        };
        // A placed allocation's layout always has a class.
        let Some(old_class) = classes::placed_class(old_size, align) else {
            return std::ptr::null_mut();
        };
        if new_class == Some(old_class) {
            // The region holds any size of its class.
            counters::on_realloc(slot, old_size, new_size);
            return ptr;
        }
        let placed = match new_class {
            Some(class) => counters::STATE.with(|s| bins::take(s, slot, class)),
            None => std::ptr::null_mut(),
        };
        // Not placed (a large size, or the arena cannot serve it now): tagged, small or large.
        let new_ptr = if placed.is_null() {
            match tagged(Layout::from_size_align_unchecked(new_size, align)) {
                Some(tagged) => {
                    let new_ptr = if new_class.is_some() {
                        small_tagged(tagged, false)
                    } else {
                        self.inner.alloc(tagged)
                    };
                    if !new_ptr.is_null() {
                        new_ptr.add(new_size).write(slot);
                    }
                    new_ptr
                }
                None => std::ptr::null_mut(),
            }
        } else {
            placed
        };
        if new_ptr.is_null() {
            return new_ptr;
        }
        std::ptr::copy_nonoverlapping(ptr, new_ptr, old_size.min(new_size));
        counters::STATE.with(|s| bins::give(s, slot, old_class, ptr));
        counters::on_realloc(slot, old_size, new_size);
        new_ptr
    }
}

/// `dealloc` of a placed allocation, every case.
#[cfg(feature = "jemalloc")]
#[cold]
#[inline(never)]
unsafe fn dealloc_placed_slow(ptr: *mut u8, layout: Layout, slot: u8) {
    // A placed allocation's layout always has a class.
    let Some(class) = classes::placed_class(layout.size(), layout.align()) else {
        return;
    };
    let size = layout.size();
    counters::STATE.with(|s| {
        counters::record_free(s, slot, size);
        bins::give(s, slot, class, ptr);
    });
}

/// A small tagged allocation over jemalloc, bypassing the thread's automatic tcache, whose
/// small bins take freed placed regions (see `bins`) and must never hand them out — unless
/// nothing is ever placed in this process.
#[cfg(feature = "jemalloc")]
#[cold]
unsafe fn small_tagged(tagged: Layout, zeroed: bool) -> *mut u8 {
    use tikv_jemalloc_sys as sys;
    let mut flags = sys::MALLOCX_LG_ALIGN(tagged.align().trailing_zeros() as usize);
    if !arenas::never_placed() {
        flags |= sys::MALLOCX_TCACHE_NONE;
    }
    if zeroed {
        flags |= sys::MALLOCX_ZERO;
    }
    sys::mallocx(tagged.size(), flags).cast()
}

/// A small sampled allocation of `class` over jemalloc: the thread's spare region of that
/// class if it keeps one (`spares`), else a new one from [`small_tagged`].
#[cfg(all(feature = "jemalloc", feature = "profiling"))]
#[cold]
unsafe fn small_sampled(tagged: Layout, zeroed: bool, class: usize) -> *mut u8 {
    let Some(spare) = spares::take(class) else {
        return small_tagged(tagged, zeroed);
    };
    if zeroed {
        spare.write_bytes(0, tagged.size());
    }
    spare
}

// SAFETY: a tagged allocation is made, resized and freed by the inner allocator with
// the tagged layout, its tag byte inside it just past the caller's `layout.size()`
// bytes. A placed allocation (jemalloc only) is a region of its layout's size class in
// its component's arena, served and taken back by `bins`; `arenas::slot_of` tells the
// two apart by address, since only arenas' pages lie in the reserved range.
unsafe impl<A: GlobalAlloc + 'static> GlobalAlloc for TrackingAllocator<A> {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(feature = "jemalloc")]
        if places_in_arenas::<A>() && self.placement {
            return self.alloc_fast(layout, false);
        }
        #[cfg(feature = "profiling")]
        if let Some(ptr) = self.maybe_sampled(layout, false) {
            return ptr;
        }
        self.alloc_tagged(layout, false)
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(feature = "jemalloc")]
        if places_in_arenas::<A>() && self.placement {
            return self.alloc_fast(layout, true);
        }
        #[cfg(feature = "profiling")]
        if let Some(ptr) = self.maybe_sampled(layout, true) {
            return ptr;
        }
        self.alloc_tagged(layout, true)
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(feature = "jemalloc")]
        if places_in_arenas::<A>() && self.placement {
            return match arenas::slot_of(ptr) {
                Some(slot) => self.dealloc_placed(ptr, layout, slot),
                None => self.dealloc_tagged_outlined(ptr, layout),
            };
        }
        self.dealloc_tagged(ptr, layout)
    }

    #[inline(always)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        #[cfg(feature = "jemalloc")]
        if places_in_arenas::<A>() && self.placement {
            return self.realloc_placed(ptr, layout, new_size);
        }
        self.realloc_tagged(ptr, layout, new_size)
    }
}
