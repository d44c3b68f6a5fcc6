//! Per-component jemalloc arenas, for the allocations a tag byte would push into a bigger
//! size class.
//!
//! A request of exactly a jemalloc size class (16, 32, 48, 64, 80, …, 128, 160, …) has no
//! room for the tag: one byte more takes the next class, 12.5–25 % more memory. Rust's
//! doubling growth of `Vec` and `String` lands on class sizes often (about 40 % of the
//! allocations of the realistic benchmark workload). Small ones (16 B to 14 KiB, see
//! [`wants`]) go instead to a jemalloc arena of their component's own, whose memory comes
//! from chunks of a reserved address range recorded as that component's: the address names
//! the component, so they carry no tag.
//!
//! One `PROT_NONE` reservation of 64 GiB of address space is made on first use (no memory:
//! pages are made accessible as the arenas take them). The arenas take it in 2 MiB chunks
//! by bumping one pointer, and a table records which arena owns each chunk; jemalloc
//! retains and reuses what it was given and returns unused pages to the kernel with `madvise`, as it
//! does for its own arenas. Each thread uses one explicit tcache per arena it touches: the
//! thread's automatic tcache would hand out whatever any arena last freed into it.
//!
//! Whatever cannot be done — the reservation refused (e.g. by `RLIMIT_AS`), an arena or a
//! tcache not created, the reservation used up — falls back to the tag, which is always right.

use std::cell::{Cell, UnsafeCell};
use std::ffi::{c_uint, c_void, CStr};
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use tikv_jemalloc_sys as sys;

use super::counters::{self, ThreadState, SLOTS};

/// The reservation: 64 GiB of address space, shared by every arena and handed out in
/// 2 MiB chunks, each recorded in [`CHUNK_SLOT`] as its arena's slot. (Dense, so the
/// arenas share jemalloc's page-map nodes; past 64 GiB of placed allocations, new
/// allocations carry tags again.)
const TOTAL: usize = 64 << 30;
const CHUNK_SHIFT: u32 = 21;
const CHUNK: usize = 1 << CHUNK_SHIFT;
const CHUNKS: usize = TOTAL >> CHUNK_SHIFT;

/// Until the reservation exists `BASE` holds an address no user pointer is within
/// `TOTAL` of (the kernel's half), so [`slot_of`] is false for every pointer.
const UNRESERVED: usize = 1 << 63;
static BASE: AtomicUsize = AtomicUsize::new(UNRESERVED);

const UNTRIED: u8 = 0;
const RESERVING: u8 = 1;
const READY: u8 = 2;
const UNAVAILABLE: u8 = 3;
static RESERVATION: AtomicU8 = AtomicU8::new(UNTRIED);

/// Per slot: 0 no arena yet, [`BUSY`] being created, [`FAILED`], else the arena index + 1.
static ARENAS: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];
const BUSY: u32 = u32::MAX;
const FAILED: u32 = u32::MAX - 1;
/// How much of the reservation the arenas have taken, in bytes.
static TAKEN: AtomicUsize = AtomicUsize::new(0);
/// The slot whose arena owns each chunk of the reservation (32 KiB; untouched entries
/// cost no memory).
static CHUNK_SLOT: [AtomicU8; CHUNKS] = [const { AtomicU8::new(0) }; CHUNKS];

/// A thread's tcache for a slot, in `ThreadState::tcaches`: 0 none yet,
/// [`NO_TCACHE`] go without one, else the tcache index + 1.
pub(crate) const NO_TCACHE: u16 = u16::MAX;

/// One hook table per slot: jemalloc passes the table to every hook, which is how a
/// hook knows its slot.
#[repr(C)]
struct SlotHooks(UnsafeCell<sys::extent_hooks_t>);

// SAFETY: the tables are never written after construction; jemalloc only reads them.
unsafe impl Sync for SlotHooks {}

static HOOKS: [SlotHooks; SLOTS] = [const {
    SlotHooks(UnsafeCell::new(sys::extent_hooks_t {
        alloc: Some(hook_alloc),
        dalloc: Some(hook_dalloc),
        destroy: Some(hook_destroy),
        commit: Some(hook_answer::<false>),
        decommit: Some(hook_answer::<true>),
        purge_lazy: Some(hook_purge::<{ libc::MADV_FREE }>),
        purge_forced: Some(hook_purge::<{ libc::MADV_DONTNEED }>),
        split: Some(hook_split),
        merge: Some(hook_merge),
    }))
}; SLOTS];

/// The largest small size class: bigger allocations keep their tag. (A large class is a
/// whole number of pages, and jemalloc hands freed large extents of an explicit arena
/// back more slowly than its own: they would cost more resident memory than the tag.)
const PLACED_MAX: usize = 14_336;

/// Whether a layout goes to an arena: exactly a small jemalloc size class of at least 16
/// bytes (8-byte allocations are frequent and their tag costs 8 bytes: not worth the
/// slower path), with an alignment jemalloc gives that size anyway (so no alignment flags
/// are needed).
///
/// jemalloc's small classes (16-byte quantum, 4 classes per doubling) are the multiples
/// of 16 up to 128, then 4 evenly spaced classes in each power-of-two interval: a multiple
/// of 16 with at most 3 significant bits, i.e. `size < 8 × its lowest set bit`. [`reserve`]
/// checks this against jemalloc's own `nallocx` before any arena is used.
#[inline(always)]
pub(crate) fn wants(size: usize, align: usize) -> bool {
    align <= 16 && size & 15 == 0 && size <= PLACED_MAX && size < (size & size.wrapping_neg()) << 3
}

/// A cheap first test for [`wants`] (false means `wants` is false), small enough to keep
/// the allocator's common path inlinable: every size `wants` takes is a multiple of 16.
#[inline(always)]
pub(crate) fn may_want(size: usize) -> bool {
    size & 15 == 0
}

/// Whether [`wants`] picks exactly this jemalloc build's small classes from 16 bytes (it
/// could differ only with a nonstandard quantum); otherwise arenas stay unused.
fn wants_matches_jemalloc() -> bool {
    (1..=PLACED_MAX + 4096).all(|size| {
        // SAFETY: nallocx only computes a size.
        let class = unsafe { sys::nallocx(size, 0) };
        wants(size, 8) == (class == size && (16..=PLACED_MAX).contains(&size))
    })
}

/// The slot whose arena placed `ptr`, if an arena did.
///
/// The chunk's entry was written before its arena returned any pointer into it, and a
/// pointer reaches the thread freeing it through whatever synchronization handed it
/// over, so a relaxed load sees the entry.
#[inline(always)]
pub(crate) fn slot_of(ptr: *mut u8) -> Option<u8> {
    let offset = (ptr as usize).wrapping_sub(BASE.load(Relaxed));
    if offset < TOTAL {
        Some(CHUNK_SLOT[offset >> CHUNK_SHIFT].load(Relaxed))
    } else {
        None
    }
}

/// Allocates `size` bytes (an exact class, see [`wants`]) in `slot`'s arena; null if the
/// arena path is unavailable, in which case the caller uses the tag.
#[inline(always)]
pub(crate) unsafe fn alloc(state: &ThreadState, slot: u8, size: usize, zeroed: bool) -> *mut u8 {
    let Some(flags) = alloc_flags(state, slot) else {
        return std::ptr::null_mut();
    };
    let flags = if zeroed { flags | sys::MALLOCX_ZERO } else { flags };
    sys::mallocx(size, flags).cast()
}

/// Frees an allocation [`slot_of`] says `slot`'s arena placed.
#[inline(always)]
pub(crate) unsafe fn free(state: &ThreadState, slot: u8, ptr: *mut u8, size: usize) {
    // jemalloc finds the arena from the pointer: only the tcache needs naming.
    sys::sdallocx(ptr.cast(), size, tcache_flag(state, slot));
}

/// Resizes an allocation of `slot`'s arena to `new_size` (an exact class) within the
/// same arena; null if that failed (the allocation is then untouched).
#[inline(always)]
pub(crate) unsafe fn realloc(state: &ThreadState, slot: u8, ptr: *mut u8, new_size: usize) -> *mut u8 {
    match alloc_flags(state, slot) {
        Some(flags) => sys::rallocx(ptr.cast(), new_size, flags).cast(),
        None => std::ptr::null_mut(),
    }
}

/// `mallocx` flags for `slot`'s arena and this thread's tcache for it, creating either on
/// first use; `None` if the arena does not exist and cannot be created.
#[inline(always)]
fn alloc_flags(state: &ThreadState, slot: u8) -> Option<i32> {
    let arena = match ARENAS[usize::from(slot)].load(Acquire) {
        0 => create_arena(usize::from(slot))?,
        BUSY | FAILED => return None,
        index => index - 1,
    };
    Some(sys::MALLOCX_ARENA(arena as usize) | tcache_flag(state, slot))
}

/// The flag naming this thread's tcache for `slot`'s arena (created on first use), or
/// going without one.
#[inline(always)]
fn tcache_flag(state: &ThreadState, slot: u8) -> i32 {
    match state.tcaches[usize::from(slot)].get() {
        0 => create_tcache(state, usize::from(slot)),
        NO_TCACHE => sys::MALLOCX_TCACHE_NONE,
        index => sys::MALLOCX_TCACHE(usize::from(index - 1)),
    }
}

/// Creates `slot`'s arena, its pages taken from the reservation. Another thread creating it meanwhile
/// makes this allocation use the tag.
#[cold]
#[inline(never)]
fn create_arena(slot: usize) -> Option<u32> {
    if !reserve() {
        return None;
    }
    if ARENAS[slot].compare_exchange(0, BUSY, Acquire, Acquire).is_err() {
        return None;
    }
    let mut index: c_uint = 0;
    let mut len = std::mem::size_of::<c_uint>();
    let mut hooks: *mut sys::extent_hooks_t = HOOKS[slot].0.get();
    // SAFETY: "arenas.create" reads an `extent_hooks_t *` and writes an unsigned.
    let rc = unsafe {
        sys::mallctl(
            c"arenas.create".as_ptr(),
            (&raw mut index).cast(),
            &mut len,
            (&raw mut hooks).cast(),
            std::mem::size_of::<*mut sys::extent_hooks_t>(),
        )
    };
    if rc != 0 {
        ARENAS[slot].store(FAILED, Release);
        return None;
    }
    ARENAS[slot].store(index + 1, Release);
    Some(index)
}

/// How many component arenas exist.
pub(crate) fn count() -> usize {
    ARENAS
        .iter()
        .filter(|a| !matches!(a.load(Relaxed), 0 | BUSY | FAILED))
        .count()
}

/// Reserves the address space once; false if it is unavailable.
fn reserve() -> bool {
    match RESERVATION.compare_exchange(UNTRIED, RESERVING, Acquire, Acquire) {
        Ok(_) => {}
        Err(READY) => return true,
        // Unavailable, or another thread is reserving: this allocation uses the tag.
        Err(_) => return false,
    }
    // SAFETY: a fresh anonymous mapping with no access; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            TOTAL,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED || !wants_matches_jemalloc() {
        if base != libc::MAP_FAILED {
            // SAFETY: unmapping the mapping made just above, which nothing uses.
            unsafe { libc::munmap(base, TOTAL) };
        }
        RESERVATION.store(UNAVAILABLE, Release);
        return false;
    }
    BASE.store(base as usize, Release);
    RESERVATION.store(READY, Release);
    true
}

/// Creates this thread's tcache for `slot`, or marks the thread to go without one
/// (tcaches exhausted, or the thread is exiting and could not destroy it).
#[cold]
#[inline(never)]
fn create_tcache(state: &ThreadState, slot: usize) -> i32 {
    state.tcaches[slot].set(NO_TCACHE);
    if !counters::thread_teardown_registered() {
        return sys::MALLOCX_TCACHE_NONE;
    }
    let mut index: c_uint = 0;
    let mut len = std::mem::size_of::<c_uint>();
    // SAFETY: "tcache.create" writes an unsigned.
    let rc = unsafe {
        sys::mallctl(
            c"tcache.create".as_ptr(),
            (&raw mut index).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 || index >= u32::from(NO_TCACHE - 1) {
        return sys::MALLOCX_TCACHE_NONE;
    }
    state.tcaches[slot].set(index as u16 + 1);
    sys::MALLOCX_TCACHE(index as usize)
}

/// Destroys an exiting thread's tcaches (their cached memory goes back to the arenas);
/// anything the thread allocates later goes without one.
pub(crate) fn release_thread(tcaches: &[Cell<u16>; SLOTS]) {
    for cell in tcaches {
        let index = cell.replace(NO_TCACHE);
        if index != 0 && index != NO_TCACHE {
            let mut index = c_uint::from(index - 1);
            mallctl_write(c"tcache.destroy", &mut index);
        }
    }
}

fn mallctl_write(name: &CStr, value: &mut c_uint) {
    // SAFETY: the named control takes an unsigned.
    unsafe {
        sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            (value as *mut c_uint).cast(),
            std::mem::size_of::<c_uint>(),
        );
    }
}

/// Frees an arena allocation with no tcache (the thread's state is gone).
pub(crate) unsafe fn free_without_tcache(ptr: *mut u8, size: usize) {
    sys::sdallocx(ptr.cast(), size, sys::MALLOCX_TCACHE_NONE);
}

// ---------------------------------------------------------------------------------------
// Extent hooks: each slot's arena takes its pages from the reservation, in whole chunks.

/// The slot a hook table belongs to.
fn hook_slot(hooks: *mut sys::extent_hooks_t) -> usize {
    (hooks as usize - HOOKS.as_ptr() as usize) / std::mem::size_of::<SlotHooks>()
}

unsafe extern "C" fn hook_alloc(
    hooks: *mut sys::extent_hooks_t,
    new_addr: *mut c_void,
    size: usize,
    alignment: usize,
    zero: *mut bool,
    commit: *mut bool,
    _arena: c_uint,
) -> *mut c_void {
    // Extending an extent in place would need that exact address; decline.
    if !new_addr.is_null() || size == 0 || !alignment.is_power_of_two() {
        return std::ptr::null_mut();
    }
    let slot = hook_slot(hooks);
    let base = BASE.load(Acquire);
    // Whole chunks, so every chunk belongs to one arena.
    let Some(size) = size.checked_next_multiple_of(CHUNK) else {
        return std::ptr::null_mut();
    };
    let alignment = alignment.max(CHUNK);
    let mut taken = TAKEN.load(Relaxed);
    let address = loop {
        let Some(address) = (base + taken).checked_next_multiple_of(alignment) else {
            return std::ptr::null_mut();
        };
        let Some(end) = address.checked_add(size).filter(|&end| end <= base + TOTAL) else {
            return std::ptr::null_mut();
        };
        match TAKEN.compare_exchange_weak(taken, end - base, Relaxed, Relaxed) {
            Ok(_) => break address,
            Err(now) => taken = now,
        }
    };
    let first = (address - base) >> CHUNK_SHIFT;
    for entry in &CHUNK_SLOT[first..first + (size >> CHUNK_SHIFT)] {
        entry.store(slot as u8, Relaxed);
    }
    // SAFETY: the pages lie inside the reservation and belong to this extent alone.
    if libc::mprotect(address as *mut c_void, size, libc::PROT_READ | libc::PROT_WRITE) != 0 {
        return std::ptr::null_mut();
    }
    // Never handed out before: the kernel's zero pages.
    *zero = true;
    *commit = true;
    address as *mut c_void
}

/// Declines, so jemalloc keeps the extent for reuse (as it does with `opt.retain`).
unsafe extern "C" fn hook_dalloc(
    _hooks: *mut sys::extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    true
}

/// Arenas are never destroyed; the pages stay reserved.
unsafe extern "C" fn hook_destroy(
    _hooks: *mut sys::extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _committed: bool,
    _arena: c_uint,
) {
}

/// `commit` answers false ("committed": pages stay accessible from allocation on) and
/// `decommit` true ("declined": jemalloc purges instead).
unsafe extern "C" fn hook_answer<const ANSWER: bool>(
    _hooks: *mut sys::extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _offset: usize,
    _length: usize,
    _arena: c_uint,
) -> bool {
    ANSWER
}

/// `purge_lazy` (`MADV_FREE`) and `purge_forced` (`MADV_DONTNEED`: the pages read as
/// zeros afterwards); false on success.
unsafe extern "C" fn hook_purge<const ADVICE: i32>(
    _hooks: *mut sys::extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    libc::madvise(addr.cast::<u8>().add(offset).cast(), length, ADVICE) != 0
}

/// Extents are plain address ranges: splitting needs nothing.
unsafe extern "C" fn hook_split(
    _hooks: *mut sys::extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _size_a: usize,
    _size_b: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    false
}

/// Adjacent extents of one arena lie in one mapping: merging needs nothing.
unsafe extern "C" fn hook_merge(
    _hooks: *mut sys::extent_hooks_t,
    _addr_a: *mut c_void,
    _size_a: usize,
    _addr_b: *mut c_void,
    _size_b: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placed_sizes_are_jemallocs_small_classes_from_16() {
        assert!(wants_matches_jemalloc());
        for size in [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 4096, 14_336] {
            assert!(wants(size, 8), "{size}");
            assert!(!wants(size, 32), "{size}, over-aligned");
        }
        for size in [0, 8, 24, 40, 144, 4095, 4097, 12_287, 16_384, 20_480] {
            assert!(!wants(size, 8), "{size}");
        }
    }

    #[test]
    fn no_pointer_is_placed_before_the_reservation() {
        if RESERVATION.load(Relaxed) == UNTRIED {
            let local = 0u8;
            assert_eq!(slot_of((&raw const local).cast_mut()), None);
        }
    }
}
