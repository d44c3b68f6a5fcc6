//! Per-component jemalloc arenas: an allocation's address names its component.
//!
//! Small allocations (up to 14 KiB, see [`classes`](super::classes)) carry no tag: they
//! are placed in a jemalloc arena of their component's own, whose memory comes from
//! chunks of a reserved address range recorded as that component's. A tag byte would
//! push a request of exactly a size class (16, 32, 48, 64, 80, …, 128, 160, …) into the
//! next class, 12.5–25 % more memory, and Rust's doubling growth of `Vec` and `String`
//! lands on class sizes often; reading the tag on free would also touch a cache line the
//! caller may never have.
//!
//! One `PROT_NONE` reservation of 64 GiB of address space is made on first use (no memory:
//! pages are made accessible as the arenas take them). The arenas take it in 2 MiB chunks
//! by bumping one pointer, and a table records which arena owns each chunk; jemalloc
//! retains and reuses what it was given and returns unused pages to the kernel with
//! `madvise`, as it does for its own arenas. Threads reach the arenas through caches of
//! their own (`bins`, which also says how jemalloc's tcaches are used without mixing
//! components).
//!
//! Whatever cannot be done — the reservation refused (e.g. by `RLIMIT_AS`), an arena not
//! created, the reservation used up — falls back to the tag, which is always right.

use std::cell::UnsafeCell;
use std::ffi::{c_uint, c_void};
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use tikv_jemalloc_sys as sys;

use super::counters::SLOTS;

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

/// The `mallocx` flag naming `slot`'s arena (created on first use); `None` if the arena
/// does not exist and cannot be created.
#[inline]
pub(crate) fn flag(slot: u8) -> Option<i32> {
    let arena = match ARENAS[usize::from(slot)].load(Acquire) {
        0 => create_arena(usize::from(slot))?,
        BUSY | FAILED => return None,
        index => index - 1,
    };
    Some(sys::MALLOCX_ARENA(arena as usize))
}

/// Maps `TOTAL` bytes with no access, starting on a chunk boundary: chunks are aligned
/// to [`CHUNK`] in absolute terms (jemalloc asks for aligned extents), so the table's
/// entries must be too. The kernel aligns large mappings on some versions only, so this
/// maps a chunk more and unmaps the slack on either side.
fn map_aligned_reservation() -> Option<*mut u8> {
    // SAFETY: a fresh anonymous mapping with no access; nothing else refers to it.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            TOTAL + CHUNK,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let base = start.next_multiple_of(CHUNK);
    let (head, tail) = (base - start, start + CHUNK - base);
    // SAFETY: both ranges lie in the mapping just made, outside [base, base + TOTAL).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((base + TOTAL) as *mut c_void, tail);
        }
    }
    Some(base as *mut u8)
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
    let Some(base) = map_aligned_reservation() else {
        RESERVATION.store(UNAVAILABLE, Release);
        return false;
    };
    if !super::classes::matches_jemalloc() {
        // SAFETY: unmapping the mapping made just above, which nothing uses.
        unsafe { libc::munmap(base.cast(), TOTAL) };
        RESERVATION.store(UNAVAILABLE, Release);
        return false;
    }
    BASE.store(base as usize, Release);
    RESERVATION.store(READY, Release);
    true
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
    fn the_reservation_starts_on_a_chunk_boundary() {
        for _ in 0..8 {
            let base = map_aligned_reservation().expect("reserve");
            assert_eq!(base as usize % CHUNK, 0, "{base:p}");
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(base.cast(), TOTAL) };
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
