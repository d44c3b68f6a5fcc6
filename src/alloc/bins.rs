//! Per-thread caches of placed allocations, by component and size class.
//!
//! jemalloc's fast paths (`malloc`, `sdallocx` without flags) serve a thread from its
//! automatic tcache, which mixes every arena's regions; naming an arena or an explicit
//! tcache takes its general path: an allocation and free cost about twice the instructions. So placed allocations are served
//! from caches of their own: each thread keeps, per component it touches, one free list
//! per size class of regions of that component's arena. Taking or giving a region is a
//! few loads and stores; only an empty list (refilled with half its capacity from the
//! arena) or a full one (its older half returned to the arena) reaches jemalloc.
//!
//! A region freed by another thread or inside another component joins the freeing
//! thread's list for the region's own component (known from its address), so a list only
//! ever holds its component's regions. The lists are bounded (see [`CAP_BYTES`]) and
//! returned to the arenas when the thread exits; a thread that is exiting, or has
//! exited, uses the arenas directly.
//!
//! Refills come from an explicit jemalloc tcache per thread and component
//! (`tcache.create`, on the first refill), which takes regions from the arena in batches; a refill takes its
//! regions from that tcache in one `experimental.batch_alloc` call. (Without a tcache
//! every region would take the arena's lock: the realistic benchmark took 1.38× the
//! instructions.)
//! Returns go through the thread's automatic tcache, jemalloc's fast path, which hands
//! each region back to its own arena in batches. That tcache therefore mixes components,
//! so nothing allocates small sizes from it: small tagged allocations bypass it
//! (`allocator`). jemalloc has at most 4,093 explicit tcaches at once; past that, refills
//! go to the arena directly, slower but as exact. An explicit tcache keeps what it
//! fetched until its thread exits (jemalloc trims only automatic ones): up to half of
//! jemalloc's per-class tcache capacity, for each component a thread allocates in.

use std::cell::Cell;
use std::ffi::{c_uint, c_void};
use std::sync::OnceLock;

use tikv_jemalloc_ctl::raw;
use tikv_jemalloc_sys as sys;

use super::arenas;
use super::classes::{CLASSES, CLASS_SIZE};
use super::counters::{self, ThreadState, SLOTS};

/// Bytes a thread's list of one class may hold for one component (at least
/// [`CAP_MIN`] and at most [`CAP_MAX`] regions): what a list holds between refills.
const CAP_BYTES: usize = 16 << 10;
const CAP_MIN: u32 = 12;
const CAP_MAX: u32 = 64;

/// Each class's list capacity, in regions.
static CAP: [u32; CLASSES] = caps();

const fn caps() -> [u32; CLASSES] {
    let mut caps = [0; CLASSES];
    let mut class = 0;
    while class < CLASSES {
        let cap = (CAP_BYTES / CLASS_SIZE[class] as usize) as u32;
        caps[class] = if cap < CAP_MIN {
            CAP_MIN
        } else if cap > CAP_MAX {
            CAP_MAX
        } else {
            cap
        };
        class += 1;
    }
    caps
}

/// One free list: `head` is the newest free region, each region's first word the
/// next one; `room` is how many more regions it may take.
pub(crate) struct Bin {
    head: Cell<*mut u8>,
    room: Cell<u32>,
}

/// A thread's lists for one component, and how it reaches the component's arena.
pub(crate) struct Bins {
    bins: [Bin; CLASSES],
    /// The `mallocx` flag naming the component's arena.
    arena: i32,
    /// The explicit tcache refills come from, made on the first refill (a thread that only
    /// frees the component's memory needs none): [`NO_TCACHE_YET`], [`NO_TCACHE`], or
    /// its index + 1.
    tcache: Cell<u32>,
}

/// Stands for the lists of a component a thread has none for: empty (taking goes to
/// [`refill`]) and without room (giving goes to [`overflow`]), so it is never written.
pub(crate) struct NoBins(pub(crate) Bins);

// SAFETY: nothing writes `NONE`: every write to a list follows a check that a list
// without regions or room fails, and the cold paths replace it before writing.
unsafe impl Sync for NoBins {}

pub(crate) static NONE: NoBins = NoBins(Bins {
    bins: [const {
        Bin {
            head: Cell::new(std::ptr::null_mut()),
            room: Cell::new(0),
        }
    }; CLASSES],
    arena: 0,
    tcache: Cell::new(NO_TCACHE),
});

/// The lists of `slot` in `state` (possibly [`NONE`]).
#[inline(always)]
fn bins(state: &ThreadState, slot: u8) -> &Bins {
    // SAFETY: slots (the current component, a tag, an address's chunk owner) are always
    // below SLOTS, and the pointers are NONE or lists this thread made and still owns.
    unsafe { &*state.bins.get_unchecked(usize::from(slot)).get() }
}

/// A free region of `class` for `slot` if the thread's list has one (no refill).
#[inline(always)]
pub(crate) unsafe fn pop(state: &ThreadState, slot: u8, class: usize) -> *mut u8 {
    // SAFETY: class indices come from `classes`, below CLASSES.
    let bin = unsafe { bins(state, slot).bins.get_unchecked(class) };
    let head = bin.head.get();
    if !head.is_null() {
        bin.head.set(head.cast::<*mut u8>().read());
        bin.room.set(bin.room.get() + 1);
    }
    head
}

/// Gives back a region of `class` of `slot` if the thread's list has room; false if
/// not (the region is untouched).
#[inline(always)]
pub(crate) unsafe fn push(state: &ThreadState, slot: u8, class: usize, region: *mut u8) -> bool {
    // SAFETY: as in `pop`.
    let bin = unsafe { bins(state, slot).bins.get_unchecked(class) };
    let room = bin.room.get();
    if room == 0 {
        return false;
    }
    region.cast::<*mut u8>().write(bin.head.get());
    bin.head.set(region);
    bin.room.set(room - 1);
    true
}

/// A free region of `class` for `slot`, refilling the list if it is empty; null if
/// placement is unavailable (the caller then tags the allocation).
#[inline(always)]
pub(crate) unsafe fn take(state: &ThreadState, slot: u8, class: usize) -> *mut u8 {
    let region = pop(state, slot, class);
    if region.is_null() {
        return refill(state, slot, class);
    }
    region
}

/// Gives back a region of `class` that `slot`'s arena placed, making room if the list
/// is full.
#[inline(always)]
pub(crate) unsafe fn give(state: &ThreadState, slot: u8, class: usize, region: *mut u8) {
    if !push(state, slot, class, region) {
        overflow(state, slot, class, region);
    }
}

fn class_size(class: usize) -> usize {
    CLASS_SIZE[class] as usize
}

/// The thread's lists for `slot`, made on first use (with the slot's arena); `None`
/// if the arena is unavailable or the thread is exiting (nothing would return them).
fn bins_or_make(state: &ThreadState, slot: u8) -> Option<&Bins> {
    let cell = &state.bins[usize::from(slot)];
    if !std::ptr::eq(cell.get(), &NONE.0) {
        return Some(bins(state, slot));
    }
    if !counters::thread_teardown_registered() {
        return None;
    }
    let arena = arenas::flag(slot)?;
    // SAFETY: a plain allocation from jemalloc's default arena, outside the Rust heap.
    let made = unsafe { sys::mallocx(std::mem::size_of::<Bins>(), sys::MALLOCX_TCACHE_NONE) }.cast::<Bins>();
    if made.is_null() {
        return None;
    }
    // SAFETY: `made` is a fresh allocation of the right size and alignment.
    unsafe {
        made.write(Bins {
            bins: std::array::from_fn(|class| Bin {
                head: Cell::new(std::ptr::null_mut()),
                room: Cell::new(CAP[class]),
            }),
            arena,
            tcache: Cell::new(NO_TCACHE_YET),
        });
    }
    cell.set(made);
    Some(bins(state, slot))
}

const NO_TCACHE_YET: u32 = 0;
const NO_TCACHE: u32 = u32::MAX;

impl Bins {
    /// `mallocx` flags for a refill: the arena and the explicit tcache, made on first use.
    fn alloc_flags(&self) -> i32 {
        let tcache = match self.tcache.get() {
            NO_TCACHE_YET => {
                let made = create_tcache().map_or(NO_TCACHE, |index| index + 1);
                self.tcache.set(made);
                made
            }
            state => state,
        };
        match tcache {
            NO_TCACHE => self.arena | sys::MALLOCX_TCACHE_NONE,
            index => self.arena | sys::MALLOCX_TCACHE((index - 1) as usize),
        }
    }
}

/// A new explicit tcache, if jemalloc has one to give.
fn create_tcache() -> Option<c_uint> {
    // SAFETY: "tcache.create" reads as an unsigned.
    let index = unsafe { raw::read::<c_uint>(b"tcache.create\0") }.ok()?;
    (index < NO_TCACHE - 1).then_some(index)
}

/// Destroys a tcache (a [`Bins::tcache`] state); what it cached goes back to the arenas.
fn destroy_tcache(tcache: u32) {
    if !matches!(tcache, NO_TCACHE_YET | NO_TCACHE) {
        // SAFETY: "tcache.destroy" takes an unsigned. It fails only for an index that
        // is not a live tcache, which leaves nothing to do.
        let _ = unsafe { raw::write::<c_uint>(b"tcache.destroy\0", tcache - 1) };
    }
}

/// Regions per refill at most (half the largest capacity).
const BATCH: usize = CAP_MAX as usize / 2;

/// An empty list: refills half of it and returns one more region; null if the arena is
/// unavailable.
#[cold]
#[inline(never)]
unsafe fn refill(state: &ThreadState, slot: u8, class: usize) -> *mut u8 {
    let size = class_size(class);
    let Some(bins) = bins_or_make(state, slot) else {
        return match arenas::flag(slot) {
            Some(arena) => sys::mallocx(size, arena | sys::MALLOCX_TCACHE_NONE).cast(),
            None => std::ptr::null_mut(),
        };
    };
    let mut regions = [std::ptr::null_mut::<c_void>(); BATCH];
    let want = (CAP[class] / 2) as usize;
    let flags = bins.alloc_flags();
    let mut filled = batch_alloc(&mut regions[..want], size, flags);
    while filled < want {
        let region = sys::mallocx(size, flags);
        if region.is_null() {
            break;
        }
        regions[filled] = region;
        filled += 1;
    }
    let Some((first, rest)) = regions[..filled].split_first() else {
        return std::ptr::null_mut();
    };
    let bin = &bins.bins[class];
    for &region in rest {
        let region = region.cast::<u8>();
        region.cast::<*mut u8>().write(bin.head.get());
        bin.head.set(region);
    }
    bin.room.set(bin.room.get() - rest.len() as u32);
    first.cast()
}

/// The MIB of `experimental.batch_alloc`, looked up once; `None` if this jemalloc lacks it.
static BATCH_MIB: OnceLock<Option<[usize; 2]>> = OnceLock::new();

/// The argument of `experimental.batch_alloc`.
#[repr(C)]
struct BatchPacket {
    ptrs: *mut *mut c_void,
    num: usize,
    size: usize,
    flags: i32,
}

/// Fills `regions` with `experimental.batch_alloc` (taking from the tcache in bulk);
/// returns how many it filled (0 if the control is missing).
unsafe fn batch_alloc(regions: &mut [*mut c_void], size: usize, flags: i32) -> usize {
    let mib = BATCH_MIB.get_or_init(|| {
        let mut mib = [0usize; 2];
        raw::name_to_mib(b"experimental.batch_alloc\0", &mut mib)
            .ok()
            .map(|()| mib)
    });
    let Some(mib) = mib else {
        return 0;
    };
    let mut packet = BatchPacket {
        ptrs: regions.as_mut_ptr(),
        num: regions.len(),
        size,
        flags,
    };
    let mut filled = 0usize;
    let mut len = std::mem::size_of::<usize>();
    let rc = sys::mallctlbymib(
        mib.as_ptr(),
        mib.len(),
        (&raw mut filled).cast(),
        &mut len,
        (&raw mut packet).cast(),
        std::mem::size_of::<BatchPacket>(),
    );
    if rc != 0 {
        return 0;
    }
    filled.min(regions.len())
}

/// A full list (or none): keeps its newer half, returns the older half to the arena,
/// and then takes `region`.
#[cold]
#[inline(never)]
unsafe fn overflow(state: &ThreadState, slot: u8, class: usize, region: *mut u8) {
    let Some(bins) = bins_or_make(state, slot) else {
        return release(region, class);
    };
    let bin = &bins.bins[class];
    if bin.room.get() == 0 {
        let keep = CAP[class] / 2;
        let mut last_kept = bin.head.get();
        for _ in 1..keep {
            last_kept = last_kept.cast::<*mut u8>().read();
        }
        let rest = last_kept.cast::<*mut u8>().replace(std::ptr::null_mut());
        release_list(rest, class);
        bin.room.set(CAP[class] - keep);
    }
    give(state, slot, class, region);
}

/// Returns a region to its arena, through the thread's automatic tcache: jemalloc's fast
/// path, which batches regions back to whichever arena each belongs to. (That tcache
/// mixes arenas, so nothing allocates small sizes from it: placed regions come from
/// explicit tcaches, and small tagged allocations bypass tcaches; see `allocator`.)
unsafe fn release(region: *mut u8, class: usize) {
    sys::sdallocx(region.cast(), class_size(class), 0);
}

/// Returns a list of regions of `class` to their arena.
unsafe fn release_list(mut region: *mut u8, class: usize) {
    while !region.is_null() {
        let next = region.cast::<*mut u8>().read();
        release(region, class);
        region = next;
    }
}

/// Returns an exiting thread's regions to their arenas and frees its lists; anything the
/// thread allocates or frees later uses the arenas directly.
pub(crate) fn release_thread(all: &[Cell<*const Bins>; SLOTS]) {
    for cell in all {
        let bins = cell.replace(&NONE.0);
        if std::ptr::eq(bins, &NONE.0) {
            continue;
        }
        // SAFETY: lists this thread made, no longer reachable from its state; each
        // holds free regions of its class only.
        unsafe {
            for (class, bin) in (*bins).bins.iter().enumerate() {
                release_list(bin.head.get(), class);
            }
            destroy_tcache((*bins).tcache.get());
            sys::sdallocx(
                bins.cast_mut().cast(),
                std::mem::size_of::<Bins>(),
                sys::MALLOCX_TCACHE_NONE,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_hold_a_few_regions_and_bounded_bytes() {
        for class in 0..CLASSES {
            let (cap, size) = (CAP[class], CLASS_SIZE[class] as usize);
            assert!((CAP_MIN..=CAP_MAX).contains(&cap), "class {size}");
            assert!(cap == CAP_MIN || cap as usize * size <= CAP_BYTES, "class {size}");
        }
    }
}
