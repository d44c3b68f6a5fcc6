//! Per-thread spare regions for sampled small allocations: the last freed one of each size
//! class up to [`SPARE_MAX`], kept for the thread's next sample of that class.
//!
//! A sampled allocation carries a tag, so it cannot come from the thread's lists of placed
//! regions nor from its automatic tcache (which holds placed regions too, see `bins`): it
//! takes jemalloc's arena path. The automatic arenas hold little else while placement is
//! on, so a sample of a class with few regions per slab took a fresh slab, and its free
//! gave the slab back: on the churn workload a sample's region cost 836 instructions,
//! against about 20 for a spare. A sample's region usually dies before the thread's next
//! sample of its class, so keeping one region per class serves most samples.
//!
//! What a thread keeps is bounded by construction: one region of each class up to 4 KiB,
//! 26,376 bytes in all, counted in `alloc::cached_bytes`, and given back when the thread
//! exits. A spare is a jemalloc region of an automatic arena (never placed), so it is used
//! and given back exactly as a region `mallocx` returned.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use tikv_jemalloc_sys as sys;

use super::classes::{CLASSES, CLASS_SIZE};

/// The largest class kept.
const SPARE_MAX: usize = 4096;

/// How many classes are kept: those up to [`SPARE_MAX`].
const SPARE_CLASSES: usize = {
    let mut n = 0;
    while n < CLASSES && CLASS_SIZE[n] as usize <= SPARE_MAX {
        n += 1;
    }
    n
};

/// The most a thread keeps: one region of each kept class.
#[cfg(test)]
const MOST_KEPT: usize = {
    let (mut sum, mut n) = (0, 0);
    while n < SPARE_CLASSES {
        sum += CLASS_SIZE[n] as usize;
        n += 1;
    }
    sum
};

/// Bytes of spare regions all threads keep.
static KEPT: AtomicUsize = AtomicUsize::new(0);

/// A thread's spare regions.
struct Spares {
    regions: [Cell<*mut u8>; SPARE_CLASSES],
    /// Set when the thread gave its spares back at exit: it keeps none after that.
    closed: Cell<bool>,
}

thread_local! {
    // Apart from the allocator's `ThreadState`, which the fast paths reach: only the
    // sampler's slow paths come here. Const-initialised and without a destructor, as
    // `ThreadState` (`with` never fails); the thread's exit gives the regions back
    // (`release_thread`, from `counters`).
    static SPARES: Spares = const {
        Spares {
            regions: [const { Cell::new(std::ptr::null_mut()) }; SPARE_CLASSES],
            closed: Cell::new(false),
        }
    };
}

/// The thread's spare region of `class`, if it keeps one (it keeps it no longer).
pub(crate) fn take(class: usize) -> Option<*mut u8> {
    let region = SPARES.with(|s| {
        s.regions
            .get(class)
            .map_or(std::ptr::null_mut(), |c| c.replace(std::ptr::null_mut()))
    });
    if region.is_null() {
        return None;
    }
    KEPT.fetch_sub(CLASS_SIZE[class] as usize, Relaxed);
    Some(region)
}

/// Keeps the freed region of a sampled allocation of `class` as the thread's spare, unless
/// it keeps one of that class already (or none at all): false if the caller is to free it.
///
/// # Safety
/// `region` is a region of `class` from an automatic arena that nothing uses any more.
pub(crate) unsafe fn keep(class: usize, region: *mut u8) -> bool {
    // Only a thread whose exit gives its spares back keeps any (one that has only ever
    // freed has not registered that yet: this does).
    if !super::counters::thread_teardown_registered() {
        return false;
    }
    let kept = SPARES.with(|s| match s.regions.get(class) {
        Some(cell) if !s.closed.get() && cell.get().is_null() => {
            cell.set(region);
            true
        }
        _ => false,
    });
    if kept {
        KEPT.fetch_add(CLASS_SIZE[class] as usize, Relaxed);
    }
    kept
}

/// Gives an exiting thread's spare regions back to jemalloc; it keeps none after that.
pub(crate) fn release_thread() {
    SPARES.with(|s| s.closed.set(true));
    for (class, &size) in CLASS_SIZE[..SPARE_CLASSES].iter().enumerate() {
        if let Some(region) = take(class) {
            // SAFETY: a region of this class that `mallocx` returned and nothing uses.
            unsafe { sys::sdallocx(region.cast(), size as usize, 0) };
        }
    }
}

/// Bytes of spare regions all threads keep.
pub(crate) fn kept_bytes() -> usize {
    KEPT.load(Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_one_region_of_each_class_up_to_4_kib_and_26_kib_in_all() {
        assert_eq!(CLASS_SIZE[SPARE_CLASSES - 1], 4096);
        // The bound the module docs state.
        assert_eq!(MOST_KEPT, 26_376);
    }
}
