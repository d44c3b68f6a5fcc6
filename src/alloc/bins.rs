//! Per-thread caches of placed allocations, by component and size class.
//!
//! jemalloc's fast paths (`malloc`, `sdallocx` without flags) serve a thread from its
//! automatic tcache, which mixes every arena's regions; naming an arena or an explicit
//! tcache takes its general path, about twice the instructions. So placed allocations are
//! served from caches of their own: each thread keeps, per component it touches, one free
//! list per size class of regions of that component's arena. Taking or giving a region is
//! a few loads and stores; only an empty list (refilled from the arena) or a full one
//! reaches jemalloc. A free that finds its list full at its full capacity goes straight to
//! jemalloc's fast path, from the inlined `dealloc` (in a burst of frees, pushing it only to
//! return it later with the list's older half cost a DOM-heavy workload 2 % more
//! instructions); a list still growing its capacity takes the slow path ([`overflow`]).
//!
//! What makes this safe and bounded:
//!
//! - **A region is placed only if its address proves it.** Every region a refill gets is
//!   checked against the chunk table (`chunks::slot_of`): after jemalloc has cleaned up a
//!   thread's state (a TLS or pthread-key destructor that allocates later), jemalloc serves
//!   `MALLOCX_ARENA` requests from arena 0, and such a region is handed straight back
//!   (the allocation then takes a tag). A free decides placed-or-tagged by the address
//!   alone, so no tag is ever read that was not written, and every region goes back with
//!   its own class size.
//! - **A thread's lists hold at most [`BUDGET`] bytes, whatever the number of
//!   components**, by construction: each list has a capacity (at most [`CAP_BYTES`], or
//!   [`CAP_MIN`] regions), the fast paths never pass it, and capacities are handed out in
//!   the slow paths only while their sum stays within the budget. A list starts with none
//!   and grows as it refills or overflows; when the budget is spent a full list gives back
//!   its older half, a list without capacity sends frees to jemalloc, and every so often
//!   all the thread's capacities are halved so that lists of components it no longer uses
//!   do not keep the budget. (Counting bytes on every allocation and free instead cost a
//!   churn loop 1.23× bare jemalloc's time, against 0.95×.) Each list is a stack of
//!   pointers ([`Bin`]) sized for its full capacity: a thread's lists for one component
//!   take at most 20 KiB, made when it allocates in that component and freed when their
//!   capacity is taken back, so a thread keeps them only for the few components its budget
//!   is spread over (at most `MAX_COMPONENTS` × 20 KiB in any case).
//! - **A thread has at most one explicit tcache** (`tcache.create`, made on its first
//!   refill), used only for refills, which take regions from it in one
//!   `experimental.batch_alloc` call (without a tcache every region would take the arena's
//!   lock: 1.38× the instructions on the realistic benchmark). It holds at most what one
//!   component's refills fetched ahead (jemalloc's fill for each class it was asked for);
//!   before it serves another component it is flushed (`tcache.flush`), so it never mixes
//!   components. A refill asks for fewer regions than a
//!   slab holds, so jemalloc takes them from partly used slabs first (a batch of a slab's
//!   region count or more takes fresh slabs only, and freed holes would never be reused).
//! - **Returns go through the thread's automatic tcache**, jemalloc's fast path, which
//!   hands each region back to its own arena in batches and is trimmed by jemalloc as usual.
//!   That tcache therefore mixes components, so nothing allocates small sizes from it while
//!   placement is on: small tagged allocations bypass it (`allocator`).
//! - **A thread's lists and its tcache go back to jemalloc when it exits.** After a `fork`,
//!   the child forgets the explicit tcache it inherited (jemalloc relinks only automatic
//!   ones in the child; destroying an inherited explicit one trips its assertions): what it
//!   held stays unused in the child, at most one tcache's worth.
//!
//! What the lists hold is published in [`CACHED`] at each refill, return and thread exit
//! ([`cached_bytes`]).

use std::cell::{Cell, UnsafeCell};
use std::ffi::{c_uint, c_void};
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;

use tikv_jemalloc_ctl::raw;
use tikv_jemalloc_sys as sys;

use super::arenas;
use super::classes::{CLASSES, CLASS_SIZE};
use super::counters::{self, ThreadState, SLOTS};

/// Bytes a thread's lists may hold in all, over every component and class.
pub(crate) const BUDGET: usize = 512 << 10;
/// Bytes one list (a component and class) may hold, at least [`CAP_MIN`] and at most
/// [`CAP_MAX`] regions ([`CAP_MAX_TINY`] for classes of at most [`TINY`] bytes): what a list
/// holds between refills. A list of the larger classes with room for only 4 regions ran
/// empty or full every few operations of a churn loop mixing sizes (1.07× bare jemalloc's
/// instructions, against 0.99× with 8); 32 KiB per list instead of 16 gained nothing more
/// and left idle threads holding more. Up to 128 regions of the smallest classes, not 64: a
/// DOM-heavy workload's bursts refilled half as often (1.040× bare jemalloc's instructions,
/// against 1.058×). Up to 256 of the 8, 16 and 32-byte classes (a DOM's short strings and
/// small nodes): that workload's CPU time went from 1.06–1.08× bare jemalloc's to 1.01–1.04×;
/// 256 for every class up to 64 bytes did as well on it but left 8 idle threads × 64
/// components at bare + 16–17 MiB, against bare + 5–9 MiB.
const CAP_BYTES: usize = 16 << 10;
const CAP_MIN: u32 = 8;
const CAP_MAX: u32 = 128;
const CAP_MAX_TINY: u32 = 256;
const TINY: u32 = 32;

/// Each class's list capacity, in regions.
static CAP: [u32; CLASSES] = caps();

const fn caps() -> [u32; CLASSES] {
    let mut caps = [0; CLASSES];
    let mut class = 0;
    while class < CLASSES {
        let cap = (CAP_BYTES / CLASS_SIZE[class] as usize) as u32;
        let max = if CLASS_SIZE[class] <= TINY {
            CAP_MAX_TINY
        } else {
            CAP_MAX
        };
        caps[class] = if cap < CAP_MIN {
            CAP_MIN
        } else if cap > max {
            max
        } else {
            cap
        };
        class += 1;
    }
    caps
}

/// Regions per refill of each class: half a list, and fewer than a slab holds (read from
/// jemalloc by [`init`]).
static REFILL: [AtomicU32; CLASSES] = [const { AtomicU32::new(1) }; CLASSES];

/// Reads each class's slab size from jemalloc and checks its bins are the classes placed;
/// registers the `fork` handler. False if placement must stay off.
pub(crate) fn init() -> bool {
    let (mut nregs_mib, mut size_mib) = ([0usize; 4], [0usize; 4]);
    if raw::name_to_mib(b"arenas.bin.0.nregs\0", &mut nregs_mib).is_err()
        || raw::name_to_mib(b"arenas.bin.0.size\0", &mut size_mib).is_err()
    {
        return false;
    }
    for class in 0..CLASSES {
        nregs_mib[2] = class;
        size_mib[2] = class;
        // SAFETY: these controls read as an unsigned and a size_t.
        let (Ok(nregs), Ok(size)) = (unsafe { raw::read_mib::<u32>(&nregs_mib) }, unsafe {
            raw::read_mib::<usize>(&size_mib)
        }) else {
            return false;
        };
        if size != CLASS_SIZE[class] as usize || nregs == 0 {
            return false;
        }
        let refill = (CAP[class] / 2).min(nregs.saturating_sub(1)).max(1);
        REFILL[class].store(refill, Relaxed);
    }
    // SAFETY: registering a handler with no arguments; it touches this thread's state only.
    unsafe { libc::pthread_atfork(None, None, Some(forget_tcache_in_child)) == 0 }
}

/// Where each class's stack starts in a component's [`Bins::stacks`], and their length.
const STACK_AT: [usize; CLASSES + 1] = stack_offsets();
const STACKS: usize = STACK_AT[CLASSES];

const fn stack_offsets() -> [usize; CLASSES + 1] {
    let caps = caps();
    let mut at = [0; CLASSES + 1];
    let mut class = 0;
    while class < CLASSES {
        at[class + 1] = at[class] + caps[class] as usize;
        class += 1;
    }
    at
}

/// One free list: a stack of pointers to free regions, the newest on top, of a capacity
/// of at most the class's [`CAP`] (the stack's length in [`Bins::stacks`]).
///
/// `top` is the stack's next free slot; `bottom` and `limit` are the low 32 bits of the
/// addresses of its first slot and of the slot past its capacity, so the fast paths test
/// "empty" and "full" with one comparison each (exact: a stack spans far less than 4 GiB).
///
/// A stack of pointers, not a list linked through the regions: taking a region then reads
/// the stack, not the region, and a free or a refill writes the stack, not the region. A
/// linked list read each region's first word as it was taken (a cache miss on a region
/// another core freed or jemalloc just handed out: 60 % of the allocation path's time on a
/// DOM-heavy workload) and wrote it into every region a refill fetched.
pub(crate) struct Bin {
    top: Cell<*mut NonNull<u8>>,
    bottom: Cell<u32>,
    limit: Cell<u32>,
}

/// Bytes of one stack slot.
const SLOT: u32 = std::mem::size_of::<*mut u8>() as u32;

impl Bin {
    /// The low 32 bits of an address (see [`Bin`]).
    #[inline(always)]
    fn low(slot: *mut NonNull<u8>) -> u32 {
        slot as usize as u32
    }

    /// Regions the list holds.
    fn held(&self) -> u32 {
        Self::low(self.top.get()).wrapping_sub(self.bottom.get()) / SLOT
    }

    /// Regions the list may hold.
    fn cap(&self) -> u32 {
        self.limit.get().wrapping_sub(self.bottom.get()) / SLOT
    }

    /// Sets the list's capacity: at most the class's stack length, at least what it holds.
    fn set_cap(&self, cap: u32) {
        self.limit.set(self.bottom.get().wrapping_add(cap * SLOT));
    }

    /// Whether the list's capacity is `regions` (one comparison, no division).
    #[inline(always)]
    fn has_cap(&self, regions: u32) -> bool {
        self.limit.get().wrapping_sub(self.bottom.get()) == regions * SLOT
    }

    /// The stack's first slot.
    fn base(&self) -> *mut NonNull<u8> {
        self.top.get().wrapping_sub(self.held() as usize)
    }

    /// Puts `region` on top of the stack.
    ///
    /// # Safety
    /// The stack is below its limit, and `region` is not null.
    #[inline(always)]
    unsafe fn put(&self, region: *mut u8) {
        let top = self.top.get();
        top.write(NonNull::new_unchecked(region));
        self.top.set(top.add(1));
    }
}

/// A thread's lists for one component.
#[repr(C)]
pub(crate) struct Bins {
    bins: [Bin; CLASSES],
    /// The `mallocx` flag naming the component's arena.
    arena: i32,
    /// The capacity of these lists, in bytes.
    capacity: Cell<usize>,
    /// When the thread last refilled or overflowed one of these lists (its `clock`).
    used: Cell<u64>,
    /// Every class's stack of free regions, one after another (`STACK_AT`).
    /// Written and read only below each list's `held`.
    stacks: UnsafeCell<[MaybeUninit<NonNull<u8>>; STACKS]>,
}

// `ThreadBins::joined` has a bit per slot.
const _: () = assert!(SLOTS <= 128);

/// A thread's caches: its lists per component, what they hold, and its explicit tcache.
pub(crate) struct ThreadBins {
    lists: [Cell<*const Bins>; SLOTS],
    /// The lists' capacities, in bytes (at most [`BUDGET`]).
    committed: Cell<usize>,
    /// What the lists held when last counted in [`CACHED`].
    published: Cell<usize>,
    /// Slow-path calls since the lists were last counted.
    events: Cell<u32>,
    /// Counts the thread's refills and overflows: which component's lists were used last.
    clock: Cell<u64>,
    /// Frees that found the budget spent and their own list empty, since the last trim.
    starved: Cell<u32>,
    /// The explicit tcache refills come from: [`NO_TCACHE_YET`], [`NO_TCACHE`], or its
    /// index + 1; and the slot whose regions it may hold.
    tcache: Cell<u32>,
    tcache_slot: Cell<u8>,
    /// The slots this thread has made lists for (`arenas::user_joined`) since it started,
    /// one bit each: lists whose capacity is taken back are freed, the thread stays a user.
    joined: Cell<u128>,
}

impl ThreadBins {
    pub(crate) const fn new() -> Self {
        Self {
            lists: [const { Cell::new(&NONE.0) }; SLOTS],
            committed: Cell::new(0),
            published: Cell::new(0),
            events: Cell::new(0),
            clock: Cell::new(0),
            starved: Cell::new(0),
            tcache: Cell::new(NO_TCACHE_YET),
            tcache_slot: Cell::new(0),
            joined: Cell::new(0),
        }
    }
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
            top: Cell::new(std::ptr::null_mut()),
            bottom: Cell::new(0),
            limit: Cell::new(0),
        }
    }; CLASSES],
    arena: 0,
    capacity: Cell::new(0),
    used: Cell::new(0),
    stacks: UnsafeCell::new([MaybeUninit::uninit(); STACKS]),
});

/// Bytes in every thread's lists, as each last published them.
static CACHED: AtomicUsize = AtomicUsize::new(0);

/// Bytes of free placed regions the threads' lists hold for reuse: exact as each thread
/// last counted them (at least every [`COUNT_EVERY`] refills or returns, and at exit), so
/// within [`BUDGET`] per thread of the figure at this instant.
pub(crate) fn cached_bytes() -> usize {
    CACHED.load(Relaxed)
}

/// Slow-path calls between two counts of a thread's lists.
const COUNT_EVERY: u32 = 16;

/// Counts what the thread's lists hold in [`CACHED`], every [`COUNT_EVERY`] calls.
fn publish_now_and_then(t: &ThreadBins) {
    let events = t.events.get() + 1;
    if events < COUNT_EVERY {
        t.events.set(events);
        return;
    }
    t.events.set(0);
    publish(t);
}

/// What the thread's lists hold, in bytes.
fn held(t: &ThreadBins) -> usize {
    let mut held = 0;
    for cell in &t.lists {
        let bins = cell.get();
        if std::ptr::eq(bins, &NONE.0) {
            continue;
        }
        // SAFETY: lists this thread made and owns.
        for (class, bin) in unsafe { &*bins }.bins.iter().enumerate() {
            held += bin.held() as usize * class_size(class);
        }
    }
    held
}

/// Counts what the thread's lists hold in [`CACHED`].
fn publish(t: &ThreadBins) {
    let (now, before) = (held(t), t.published.get());
    if now != before {
        if now > before {
            CACHED.fetch_add(now - before, Relaxed);
        } else {
            CACHED.fetch_sub(before - now, Relaxed);
        }
        t.published.set(now);
    }
}

/// The lists of `slot` in `t` (possibly [`NONE`]).
#[inline(always)]
fn bins(t: &ThreadBins, slot: u8) -> &Bins {
    // SAFETY: slots (the current component, a tag, an address's chunk owner) are always
    // below SLOTS, and the pointers are NONE or lists this thread made and still owns.
    unsafe { &*t.lists.get_unchecked(usize::from(slot)).get() }
}

#[inline(always)]
fn class_size(class: usize) -> usize {
    // SAFETY: class indices come from `classes`, below CLASSES.
    unsafe { *CLASS_SIZE.get_unchecked(class) as usize }
}

/// A free region of `class` for `slot` if the thread's list has one (no refill).
#[inline(always)]
pub(crate) unsafe fn pop(state: &ThreadState, slot: u8, class: usize) -> *mut u8 {
    pop_unless(state, slot, class, || false)
}

/// [`pop`], unless `refuse` (called only when the list has a region) says not to: then
/// null, and the list is untouched.
#[inline(always)]
pub(crate) unsafe fn pop_unless(state: &ThreadState, slot: u8, class: usize, refuse: impl FnOnce() -> bool) -> *mut u8 {
    let t = &state.placement;
    // SAFETY: class indices come from `classes`, below CLASSES.
    let bin = unsafe { bins(t, slot).bins.get_unchecked(class) };
    let top = bin.top.get();
    if Bin::low(top) == bin.bottom.get() || refuse() {
        return std::ptr::null_mut();
    }
    // SAFETY: below `top` and above the stack's bottom are the list's regions.
    unsafe {
        let top = top.sub(1);
        bin.top.set(top);
        // Regions are never null, which the caller's test then knows.
        top.read().as_ptr()
    }
}

/// Gives back a region of `class` of `slot` if the thread's list has room; false if not
/// (the region is untouched).
#[inline(always)]
pub(crate) unsafe fn push(state: &ThreadState, slot: u8, class: usize, region: *mut u8) -> bool {
    let t = &state.placement;
    // SAFETY: as in `pop`.
    let bin = unsafe { bins(t, slot).bins.get_unchecked(class) };
    let top = bin.top.get();
    if Bin::low(top) == bin.limit.get() {
        return false;
    }
    // SAFETY: below the limit, within the stack (a list with capacity has one).
    unsafe { bin.put(region) };
    true
}

/// Where a freed region of a thread's own component goes ([`push_or_pass`]).
pub(crate) enum Freed {
    /// Into the thread's list ([`push_unchecked`]).
    Kept,
    /// Straight to jemalloc ([`release`]): the list is full at its full capacity, a burst
    /// of frees (pushing the region only to return it later with the list's older half
    /// costs a pass over the list).
    Passed,
    /// Neither yet: the list has no room and may grow ([`overflow`] decides).
    No,
}

/// Where a region of `class` of `slot` freed now goes; see [`Freed`].
#[inline(always)]
pub(crate) fn push_or_pass(state: &ThreadState, slot: u8, class: usize) -> Freed {
    let t = &state.placement;
    // SAFETY: as in `pop`.
    let bin = unsafe { bins(t, slot).bins.get_unchecked(class) };
    if Bin::low(bin.top.get()) != bin.limit.get() {
        return Freed::Kept;
    }
    // SAFETY: as in `pop`. `NONE`'s lists have no capacity, so they are never passed.
    if bin.has_cap(unsafe { *CAP.get_unchecked(class) }) {
        Freed::Passed
    } else {
        Freed::No
    }
}

/// Pushes a region of `class` of `slot` onto the thread's list, which [`push_or_pass`]
/// found room in.
#[inline(always)]
pub(crate) unsafe fn push_unchecked(state: &ThreadState, slot: u8, class: usize, region: *mut u8) {
    let t = &state.placement;
    // SAFETY: as in `pop`.
    let bin = unsafe { bins(t, slot).bins.get_unchecked(class) };
    // SAFETY: `push_or_pass` found the stack below its limit.
    unsafe { bin.put(region) };
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

/// Gives back a region of `class` that `slot`'s arena placed, making room if needed.
#[inline(always)]
pub(crate) unsafe fn give(state: &ThreadState, slot: u8, class: usize, region: *mut u8) {
    if !push(state, slot, class, region) {
        overflow(state, slot, class, region);
    }
}

/// The thread's lists for `slot`, made on first use (with the slot's arena); `None`
/// if the arena is unavailable or the thread is exiting (nothing would return them).
fn bins_or_make(state: &ThreadState, slot: u8) -> Option<&Bins> {
    let t = &state.placement;
    let cell = &t.lists[usize::from(slot)];
    if !std::ptr::eq(cell.get(), &NONE.0) {
        return Some(bins(t, slot));
    }
    // An exiting thread (nothing would return the lists), or one jemalloc has cleaned up.
    if !counters::thread_teardown_registered() || !arenas::jemalloc_serves_thread() {
        return None;
    }
    let arena = arenas::flag(slot, counters::arena_shard(state))?;
    // SAFETY: a plain allocation from jemalloc's default arena, outside the Rust heap.
    let made = unsafe { sys::mallocx(std::mem::size_of::<Bins>(), sys::MALLOCX_TCACHE_NONE) }.cast::<Bins>();
    if made.is_null() {
        return None;
    }
    // SAFETY: `made` is a fresh allocation of the right size and alignment; each class's
    // stack lies within its `stacks`, which never moves.
    unsafe {
        let stacks = (&raw mut (*made).stacks).cast::<NonNull<u8>>();
        (&raw mut (*made).bins).write(std::array::from_fn(|class| {
            let base = stacks.add(STACK_AT[class]);
            // Empty, and no capacity yet: lists get it as they refill or overflow (`grow`).
            Bin {
                top: Cell::new(base),
                bottom: Cell::new(Bin::low(base)),
                limit: Cell::new(Bin::low(base)),
            }
        }));
        (&raw mut (*made).arena).write(arena);
        (&raw mut (*made).capacity).write(Cell::new(0));
        (&raw mut (*made).used).write(Cell::new(0));
    }
    cell.set(made);
    let bit = 1u128 << slot;
    if t.joined.get() & bit == 0 {
        t.joined.set(t.joined.get() | bit);
        arenas::user_joined(slot);
    }
    Some(bins(t, slot))
}

const NO_TCACHE_YET: u32 = 0;
const NO_TCACHE: u32 = u32::MAX;

/// `mallocx` flags for a refill of `slot`'s arena (`arena`): through the thread's explicit
/// tcache, made on first use and flushed first if it holds another component's regions.
fn refill_flags(t: &ThreadBins, slot: u8, arena: i32) -> i32 {
    let mut tcache = t.tcache.get();
    if tcache == NO_TCACHE_YET {
        tcache = create_tcache().map_or(NO_TCACHE, |index| index + 1);
        t.tcache.set(tcache);
        t.tcache_slot.set(slot);
    }
    if tcache == NO_TCACHE {
        return arena | sys::MALLOCX_TCACHE_NONE;
    }
    if t.tcache_slot.get() != slot {
        // SAFETY: "tcache.flush" takes an unsigned; the tcache is this thread's. A failure
        // leaves it as it was, so it is not used for another component.
        if unsafe { raw::write::<c_uint>(b"tcache.flush\0", tcache - 1) }.is_err() {
            return arena | sys::MALLOCX_TCACHE_NONE;
        }
        t.tcache_slot.set(slot);
    }
    arena | sys::MALLOCX_TCACHE((tcache - 1) as usize)
}

/// A new explicit tcache, if jemalloc has one to give.
fn create_tcache() -> Option<c_uint> {
    // SAFETY: "tcache.create" reads as an unsigned.
    let index = unsafe { raw::read::<c_uint>(b"tcache.create\0") }.ok()?;
    (index < NO_TCACHE - 1).then_some(index)
}

/// In a child after `fork`: the explicit tcache this thread inherited is left alone (see
/// the module docs); a new one is made on the next refill.
extern "C" fn forget_tcache_in_child() {
    let _ = counters::STATE.try_with(|s| s.placement.tcache.set(NO_TCACHE_YET));
}

/// Regions per refill at most (half the largest capacity).
const BATCH: usize = CAP_MAX_TINY as usize / 2;

/// An empty list: refills part of it and returns one more region; null if the arena is
/// unavailable or jemalloc does not place in it now.
#[cold]
#[inline(never)]
unsafe fn refill(state: &ThreadState, slot: u8, class: usize) -> *mut u8 {
    let t = &state.placement;
    let size = class_size(class);
    // Without lists (an exiting thread) the allocation takes a tag: jemalloc may have
    // cleaned the thread up, and then an arena must not be named.
    let Some(bins) = bins_or_make(state, slot) else {
        return std::ptr::null_mut();
    };
    touch(t, bins);
    let bin = &bins.bins[class];
    let extra = REFILL[class].load(Relaxed).saturating_sub(1);
    // The list is empty: its room is its capacity.
    if bin.cap() < extra {
        grow(t, bins, bin, class, extra - bin.cap());
    }
    let want = extra.min(bin.cap()) as usize + 1;
    // Written by jemalloc before they are read (`filled` of them): zeroing the array took
    // a call to `memset` per refill.
    let mut regions = [const { MaybeUninit::<*mut c_void>::uninit() }; BATCH];
    let flags = refill_flags(t, slot, bins.arena);
    let mut filled = batch_alloc(&mut regions[..want], size, flags);
    while filled < want {
        let region = sys::mallocx(size, flags);
        if region.is_null() {
            break;
        }
        regions[filled].write(region);
        filled += 1;
    }
    // SAFETY: jemalloc wrote the first `filled` (`batch_alloc`, then the loop above).
    let regions = unsafe { &*(&raw const regions[..filled] as *const [*mut c_void]) };
    // Each region is placed only if its address lies in `slot`'s chunks. They all do
    // unless jemalloc ignored the arena (see the module docs), so they are checked in one
    // tight pass (the reservation's bounds read once) and copied onto the stack at once:
    // checking and pushing each in turn took 15 instructions a region.
    let owners = arenas::Owners::now();
    let first = match regions.split_first() {
        Some((&first, rest)) if regions.iter().all(|&r| owners.slot_of(r.cast()) == Some(slot)) => {
            // At most `cap` regions besides the first: `want` is at most `cap + 1`. A
            // stack slot is a `NonNull<u8>`, of a pointer's layout; regions are not null.
            let top = bin.top.get();
            std::ptr::copy_nonoverlapping(rest.as_ptr().cast::<NonNull<u8>>(), top, rest.len());
            bin.top.set(top.add(rest.len()));
            first.cast::<u8>()
        }
        // None at all, or some jemalloc did not place in the arena.
        _ => {
            let mut first = std::ptr::null_mut::<u8>();
            for &region in regions {
                if owners.slot_of(region.cast()) != Some(slot) {
                    // jemalloc did not honour the arena: handed back.
                    sys::sdallocx(region, size, sys::MALLOCX_TCACHE_NONE);
                } else if first.is_null() {
                    first = region.cast::<u8>();
                } else {
                    bin.put(region.cast::<u8>());
                }
            }
            first
        }
    };
    publish_now_and_then(t);
    first
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
unsafe fn batch_alloc(regions: &mut [MaybeUninit<*mut c_void>], size: usize, flags: i32) -> usize {
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
        ptrs: regions.as_mut_ptr().cast(),
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

/// Marks `bins` as the thread's most recently used lists.
fn touch(t: &ThreadBins, bins: &Bins) {
    let clock = t.clock.get() + 1;
    t.clock.set(clock);
    bins.used.set(clock);
}

/// Gives `bin` (of `bins`) up to `more` regions of capacity, as far as the thread's budget
/// allows, taking back first what the least recently used other component's lists have;
/// returns how many it got.
unsafe fn grow(t: &ThreadBins, bins: &Bins, bin: &Bin, class: usize, more: u32) -> u32 {
    let size = class_size(class);
    let more = more.min(CAP[class] - bin.cap());
    while t.committed.get() + more as usize * size > BUDGET && reclaim_least_recent(t, bins) {}
    let more = more.min((BUDGET.saturating_sub(t.committed.get()) / size) as u32);
    if more > 0 {
        bin.set_cap(bin.cap() + more);
        t.committed.set(t.committed.get() + more as usize * size);
        bins.capacity.set(bins.capacity.get() + more as usize * size);
    }
    more
}

/// Takes all capacity from the lists of the component (other than `keep`'s) the thread
/// used least recently, returning what they hold to jemalloc; false if none has any.
/// The lists themselves are freed (a component's take up to 20 KiB of stacks): a thread keeps
/// lists only for the components that hold some of its budget, and lists without any
/// capacity are freed on the way.
unsafe fn reclaim_least_recent(t: &ThreadBins, keep: &Bins) -> bool {
    let mut oldest: Option<usize> = None;
    for (slot, cell) in t.lists.iter().enumerate() {
        let bins = &*cell.get();
        if std::ptr::eq(bins, &NONE.0) || std::ptr::eq(bins, keep) {
            continue;
        }
        if bins.capacity.get() == 0 {
            drop_bins(t, slot);
            continue;
        }
        if oldest.is_none_or(|o| bins.used.get() < (*t.lists[o].get()).used.get()) {
            oldest = Some(slot);
        }
    }
    let Some(slot) = oldest else {
        return false;
    };
    drop_bins(t, slot);
    true
}

/// Returns what the thread's lists for `slot` hold to jemalloc, takes back their capacity
/// and frees them; the slot then has none (`NONE`).
unsafe fn drop_bins(t: &ThreadBins, slot: usize) {
    let bins = t.lists[slot].replace(&NONE.0);
    if std::ptr::eq(bins, &NONE.0) {
        return;
    }
    for (class, bin) in (*bins).bins.iter().enumerate() {
        release_oldest(bin, class, bin.held());
    }
    t.committed.set(t.committed.get() - (*bins).capacity.get());
    sys::sdallocx(
        bins.cast_mut().cast(),
        std::mem::size_of::<Bins>(),
        sys::MALLOCX_TCACHE_NONE,
    );
}

/// A free that found its list full (or no list): the list grows if the budget allows; if
/// not, it returns its older half, and a list without capacity sends the region to
/// jemalloc (every [`TRIM_AFTER`] such frees, all the thread's capacities are halved).
#[cold]
#[inline(never)]
unsafe fn overflow(state: &ThreadState, slot: u8, class: usize, region: *mut u8) {
    let t = &state.placement;
    let Some(bins) = bins_or_make(state, slot) else {
        return release(region, class);
    };
    touch(t, bins);
    let bin = &bins.bins[class];
    if grow(t, bins, bin, class, REFILL[class].load(Relaxed)) == 0 {
        if bin.cap() > 0 {
            halve(bin, class);
        } else {
            release(region, class);
            let starved = t.starved.get() + 1;
            t.starved.set(starved);
            if starved >= TRIM_AFTER {
                t.starved.set(0);
                trim_all(t);
            }
            return publish_now_and_then(t);
        }
    }
    if !push(state, slot, class, region) {
        release(region, class);
    }
    publish_now_and_then(t);
}

/// Frees without a list's capacity after which a thread's capacities are all halved.
const TRIM_AFTER: u32 = 256;

/// Returns the older half of a list (rounded up) to jemalloc.
unsafe fn halve(bin: &Bin, class: usize) {
    let held = bin.held();
    release_oldest(bin, class, held - held / 2);
}

/// Returns the `count` oldest regions of a list (the bottom of its stack) to jemalloc and
/// moves the rest down.
unsafe fn release_oldest(bin: &Bin, class: usize, count: u32) {
    let (base, held) = (bin.base(), bin.held());
    let count = count.min(held);
    if count == 0 {
        return;
    }
    for i in 0..count as usize {
        release(base.add(i).read().as_ptr(), class);
    }
    std::ptr::copy(base.add(count as usize), base, (held - count) as usize);
    bin.top.set(base.add((held - count) as usize));
}

/// Halves the capacity of every list of the thread (returning what no longer fits), and
/// flushes its automatic tcache of the regions returns put there: a thread whose frees find
/// no capacity is done allocating for now, and regions of many components' arenas left in
/// a tcache would each keep a slab of its own resident. (Its explicit tcache keeps what
/// refills fetched ahead: flushing that too made a DOM-heavy workload's bursts refill from
/// the arena each time.)
unsafe fn trim_all(t: &ThreadBins) {
    for cell in &t.lists {
        let bins = cell.get();
        if std::ptr::eq(bins, &NONE.0) {
            continue;
        }
        for (class, bin) in (*bins).bins.iter().enumerate() {
            let cap = bin.cap();
            if cap == 0 {
                continue;
            }
            let new_cap = cap / 2;
            let held = bin.held();
            release_oldest(bin, class, held - held.min(new_cap));
            bin.set_cap(new_cap);
            let freed = (cap - new_cap) as usize * class_size(class);
            t.committed.set(t.committed.get() - freed);
            (*bins).capacity.set((*bins).capacity.get() - freed);
        }
    }
    flush_automatic_tcache();
    publish(t);
}

/// Flushes this thread's automatic tcache back to the arenas.
fn flush_automatic_tcache() {
    // SAFETY: "thread.tcache.flush" takes no value; it flushes this thread's own automatic
    // tcache (nothing to do if it has none).
    unsafe {
        sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
}

/// Returns a region to its arena, through the thread's automatic tcache: jemalloc's fast
/// path, which batches regions back to whichever arena each belongs to. (That tcache
/// mixes arenas, so nothing allocates small sizes from it: placed regions come from
/// explicit tcaches, and small tagged allocations bypass tcaches; see `allocator`.)
#[inline(always)]
pub(crate) unsafe fn release(region: *mut u8, class: usize) {
    sys::sdallocx(region.cast(), class_size(class), 0);
}

/// Returns an exiting thread's regions to their arenas, frees its lists and destroys its
/// tcache; its later small allocations take a tag, and placed regions it frees go to
/// jemalloc directly. Arenas no other live thread keeps lists for are then purged
/// (`arenas::user_left`), once everything the thread held is back in them: its automatic
/// tcache is flushed first.
pub(crate) fn release_thread(t: &ThreadBins) {
    let joined = t.joined.replace(0);
    for slot in 0..SLOTS {
        // SAFETY: lists this thread made (or none), each holding free regions of its
        // class only.
        unsafe { drop_bins(t, slot) };
    }
    t.committed.set(0);
    publish(t);
    let tcache = t.tcache.replace(NO_TCACHE);
    if !matches!(tcache, NO_TCACHE_YET | NO_TCACHE) {
        // SAFETY: "tcache.destroy" takes an unsigned. It fails only for an index that
        // is not a live tcache, which leaves nothing to do.
        let _ = unsafe { raw::write::<c_uint>(b"tcache.destroy\0", tcache - 1) };
    }
    if joined != 0 {
        flush_automatic_tcache();
    }
    for slot in (0..SLOTS as u8).filter(|&slot| joined & (1u128 << slot) != 0) {
        arenas::user_left(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_hold_a_few_regions_and_bounded_bytes() {
        for class in 0..CLASSES {
            let (cap, size) = (CAP[class], CLASS_SIZE[class] as usize);
            assert!((CAP_MIN..=CAP_MAX_TINY).contains(&cap), "class {size}");
            assert!(size <= TINY as usize || cap <= CAP_MAX, "class {size}");
            assert!(cap == CAP_MIN || cap as usize * size <= CAP_BYTES, "class {size}");
            assert!(
                cap as usize * size <= BUDGET / 4,
                "class {size}: one list may not take the budget"
            );
        }
    }

    #[test]
    fn a_components_lists_take_at_most_20_kib_with_a_stack_slot_per_region_of_capacity() {
        // The bound README and the module docs state.
        assert!(
            std::mem::size_of::<Bins>() <= 20 << 10,
            "{}",
            std::mem::size_of::<Bins>()
        );
        for class in 0..CLASSES {
            assert_eq!(STACK_AT[class + 1] - STACK_AT[class], CAP[class] as usize);
        }
    }

    #[test]
    fn a_stack_counts_what_it_holds_and_its_capacity_from_its_addresses() {
        let mut slots = [NonNull::<u8>::dangling(); 8];
        let base = slots.as_mut_ptr();
        let bin = Bin {
            top: Cell::new(base),
            bottom: Cell::new(Bin::low(base)),
            limit: Cell::new(Bin::low(base)),
        };
        assert_eq!((bin.held(), bin.cap()), (0, 0));
        bin.set_cap(8);
        assert!(bin.has_cap(8));
        let mut regions = [0u8; 8];
        for region in &mut regions {
            // SAFETY: `slots` has room for 8, and a reference is not null.
            unsafe { bin.put(region) };
        }
        assert_eq!((bin.held(), bin.cap(), bin.base()), (8, 8, base));
        assert_eq!(Bin::low(bin.top.get()), bin.limit.get(), "full");
        bin.top.set(bin.top.get().wrapping_sub(3));
        assert_eq!((bin.held(), bin.cap(), bin.base()), (5, 8, base));
    }
}
