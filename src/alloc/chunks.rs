//! The reserved address range the component arenas take their pages from, in 2 MiB chunks.
//!
//! Every chunk belongs to one component at a time, recorded in [`CHUNK_SLOT`], so an
//! address names its component (see [`slot_of`]). A component's extents are packed into
//! the chunk it has open (jemalloc asks for extents of any size from a page up; with
//! `retain:false` every slab is its own request), and a chunk whose extents are all given
//! back goes to a free list and is handed to whichever component needs one next: the
//! reservation is reused, not used up, whatever the arenas' pattern. Pages given back are
//! replaced by fresh `PROT_NONE` ones, so their memory returns to the kernel and what is
//! handed out again reads as zeros.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use super::counters::SLOTS;

/// At most 64 GiB of address space, shared by every arena. (Dense, so the arenas share
/// jemalloc's page-map nodes; if it is ever all in use, new allocations carry tags.)
const TOTAL: usize = 64 << 30;
/// Where 64 GiB of address space is refused (an `RLIMIT_AS`, valgrind), the reservation
/// halves down to this.
const SMALLEST: usize = 4 << 30;
const CHUNK_SHIFT: u32 = 21;
pub(crate) const CHUNK: usize = 1 << CHUNK_SHIFT;
const CHUNKS: usize = TOTAL >> CHUNK_SHIFT;

/// The reservation: its start, and its size (0 until it exists, so [`slot_of`] is `None`
/// for every pointer).
#[repr(C, align(16))]
struct Reservation {
    base: AtomicUsize,
    size: AtomicUsize,
}

static RESERVED: Reservation = Reservation {
    base: AtomicUsize::new(0),
    size: AtomicUsize::new(0),
};

/// The slot whose arena owns each chunk (32 KiB; untouched entries cost no memory).
static CHUNK_SLOT: [AtomicU8; CHUNKS] = [const { AtomicU8::new(0) }; CHUNKS];

/// Which chunks are in use, and by how much; changed only under the lock (the extent
/// hooks are jemalloc's slow path: a slab or a large extent at a time).
struct Space {
    /// Chunks ever taken from the start of the reservation.
    bumped: usize,
    /// Chunks given back, to be reused (a stack of indices; `free_len` of them).
    free: [u32; CHUNKS],
    free_len: usize,
    /// Bytes of live extents in each chunk.
    used: [u32; CHUNKS],
    /// Per slot: the chunk its small extents are packed into (index + 1, 0 for none), and
    /// how far into it they reach.
    open: [u32; SLOTS],
    open_end: [u32; SLOTS],
}

/// [`Space`] behind a spin lock (held for a few stores, or one `mmap`): a lock a child
/// process can take over after `fork` ([`after_fork_in_child`]), which `std`'s cannot.
struct Locked {
    held: AtomicBool,
    space: UnsafeCell<Space>,
}

// SAFETY: `space` is reached only through `lock`, which holds `held`.
unsafe impl Sync for Locked {}

static SPACE: Locked = Locked {
    held: AtomicBool::new(false),
    space: UnsafeCell::new(Space {
        bumped: 0,
        free: [0; CHUNKS],
        free_len: 0,
        used: [0; CHUNKS],
        open: [0; SLOTS],
        open_end: [0; SLOTS],
    }),
};

/// After a `fork` the child never reuses a chunk: a thread of the parent may have been
/// halfway through an update, and a wrong count must never free a chunk in use.
static NO_REUSE: AtomicBool = AtomicBool::new(false);

struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        SPACE.held.store(false, Release);
    }
}

impl std::ops::Deref for Guard {
    type Target = Space;
    fn deref(&self) -> &Space {
        // SAFETY: the guard holds the lock.
        unsafe { &*SPACE.space.get() }
    }
}

impl std::ops::DerefMut for Guard {
    fn deref_mut(&mut self) -> &mut Space {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *SPACE.space.get() }
    }
}

fn lock() -> Guard {
    let mut spins = 0u32;
    while SPACE.held.compare_exchange_weak(false, true, Acquire, Relaxed).is_err() {
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }
    Guard
}

/// In a child after `fork`: the parent's threads are gone, so a lock one of them held is
/// released, and chunks are no longer reused (see [`NO_REUSE`]).
pub(crate) extern "C" fn after_fork_in_child() {
    NO_REUSE.store(true, Relaxed);
    SPACE.held.store(false, Release);
}

/// The slot whose arena placed `ptr`, if an arena did.
///
/// The chunk's entry was written before its arena returned any pointer into it, and a
/// pointer reaches the thread freeing it through whatever synchronization handed it
/// over, so a relaxed load sees the entry. (A chunk changes owner only after every
/// extent in it was given back, when no live allocation points into it.)
#[inline(always)]
pub(crate) fn slot_of(ptr: *mut u8) -> Option<u8> {
    Owners::now().slot_of(ptr)
}

/// The slot owning each of many addresses, with the reservation read once: for a refill's
/// batch of regions, where [`slot_of`] per region read the reservation's bounds again for
/// each (relaxed atomics are not hoisted out of a loop).
#[derive(Clone, Copy)]
pub(crate) struct Owners {
    base: usize,
    size: usize,
}

impl Owners {
    /// The reservation as it is now (it is installed once, and never changes after).
    #[inline(always)]
    pub(crate) fn now() -> Self {
        Self {
            base: RESERVED.base.load(Relaxed),
            size: RESERVED.size.load(Relaxed),
        }
    }

    /// [`slot_of`] `ptr`, for a pointer from an arena (see [`slot_of`] on ordering).
    #[inline(always)]
    pub(crate) fn slot_of(self, ptr: *mut u8) -> Option<u8> {
        let offset = (ptr as usize).wrapping_sub(self.base);
        if offset < self.size {
            // SAFETY: the reservation is at most the table's chunks long.
            Some(unsafe { CHUNK_SLOT.get_unchecked(offset >> CHUNK_SHIFT) }.load(Relaxed))
        } else {
            None
        }
    }
}

/// Maps as much address space as it can, from 64 GiB down to 4 GiB, with no access and
/// starting on a chunk boundary: jemalloc asks for aligned extents, and chunks are aligned
/// in absolute terms, so the table's entries must be too. Returns its start and size.
pub(crate) fn map_aligned_reservation() -> Option<(*mut u8, usize)> {
    let mut size = TOTAL;
    while size >= SMALLEST {
        if let Some(base) = map_aligned(size) {
            return Some((base, size));
        }
        size /= 2;
    }
    None
}

/// Maps `size` bytes with no access on a chunk boundary. The kernel aligns large mappings on
/// some versions only, so this maps a chunk more and unmaps the slack on either side.
fn map_aligned(size: usize) -> Option<*mut u8> {
    // SAFETY: a fresh anonymous mapping with no access; nothing else refers to it.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size + CHUNK,
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
    // SAFETY: both ranges lie in the mapping just made, outside [base, base + size).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((base + size) as *mut c_void, tail);
        }
    }
    Some(base as *mut u8)
}

/// Makes `base`, `size` (from [`map_aligned_reservation`]) the reservation.
pub(crate) fn install(base: *mut u8, size: usize) {
    RESERVED.base.store(base as usize, Relaxed);
    RESERVED.size.store(size, Release);
}

/// The reservation's size in chunks.
fn chunks_reserved() -> usize {
    RESERVED.size.load(Relaxed) >> CHUNK_SHIFT
}

/// Replaces `[address, address + size)` with fresh inaccessible pages: their memory goes
/// back to the kernel, and they read as zeros when made accessible again.
///
/// # Safety
/// The range lies in the reservation and no allocation lives in it.
unsafe fn reset(address: usize, size: usize) {
    libc::mmap(
        address as *mut c_void,
        size,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
        -1,
        0,
    );
}

/// An extent of `size` bytes (a multiple of the page) aligned to `alignment`, owned by
/// `slot`, its pages accessible and zero; `None` if the reservation has no room.
pub(crate) fn take(slot: usize, size: usize, alignment: usize) -> Option<*mut c_void> {
    let base = RESERVED.base.load(Relaxed);
    if RESERVED.size.load(Acquire) == 0 || size == 0 || !alignment.is_power_of_two() {
        return None;
    }
    let address = {
        let mut space = lock();
        if size <= CHUNK && alignment <= CHUNK {
            take_packed(&mut space, slot, size, alignment)?
        } else {
            take_chunks(&mut space, slot, size, alignment)?
        }
    };
    let address = base + address;
    // SAFETY: the pages lie inside the reservation and belong to this extent alone.
    if unsafe { libc::mprotect(address as *mut c_void, size, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
        give_back(address as *mut c_void, size);
        return None;
    }
    Some(address as *mut c_void)
}

/// An extent inside `slot`'s open chunk, opening another (a reused one first) when it
/// does not fit. Returns its offset in the reservation.
fn take_packed(space: &mut Space, slot: usize, size: usize, alignment: usize) -> Option<usize> {
    if let Some(chunk) = space.open[slot].checked_sub(1).map(|c| c as usize) {
        let start = (space.open_end[slot] as usize).next_multiple_of(alignment);
        if start + size <= CHUNK {
            space.open_end[slot] = (start + size) as u32;
            space.used[chunk] += size as u32;
            return Some((chunk << CHUNK_SHIFT) + start);
        }
        // Closed: it goes back to the free list once its last extent does.
        space.open[slot] = 0;
        if space.used[chunk] == 0 {
            free_chunk(space, chunk);
        }
    }
    let chunk = if space.free_len > 0 {
        space.free_len -= 1;
        space.free[space.free_len] as usize
    } else if space.bumped < chunks_reserved() {
        space.bumped += 1;
        space.bumped - 1
    } else {
        return None;
    };
    CHUNK_SLOT[chunk].store(slot as u8, Relaxed);
    space.open[slot] = chunk as u32 + 1;
    space.open_end[slot] = size as u32;
    space.used[chunk] = size as u32;
    Some(chunk << CHUNK_SHIFT)
}

/// An extent of whole fresh chunks (larger than a chunk, or aligned more than one).
fn take_chunks(space: &mut Space, slot: usize, size: usize, alignment: usize) -> Option<usize> {
    let count = size.div_ceil(CHUNK);
    let first = space.bumped.next_multiple_of((alignment >> CHUNK_SHIFT).max(1));
    if first.checked_add(count)? > chunks_reserved() {
        return None;
    }
    // Chunks skipped for the alignment are free for later extents.
    for chunk in space.bumped..first {
        free_chunk(space, chunk);
    }
    space.bumped = first + count;
    let mut left = size;
    for (entry, used) in CHUNK_SLOT[first..first + count]
        .iter()
        .zip(&mut space.used[first..first + count])
    {
        entry.store(slot as u8, Relaxed);
        *used = left.min(CHUNK) as u32;
        left = left.saturating_sub(CHUNK);
    }
    Some(first << CHUNK_SHIFT)
}

/// Puts a chunk no extent lives in on the free list (unless chunks are not reused).
fn free_chunk(space: &mut Space, chunk: usize) {
    if NO_REUSE.load(Relaxed) {
        return;
    }
    space.free[space.free_len] = chunk as u32;
    space.free_len += 1;
}

/// Gives back an extent [`take`] handed out (jemalloc no longer uses it): its pages go
/// back to the kernel, and each chunk it leaves empty is free for any component.
pub(crate) fn give_back(address: *mut c_void, size: usize) {
    let base = RESERVED.base.load(Relaxed);
    let (start, end) = (
        (address as usize).wrapping_sub(base),
        (address as usize).wrapping_sub(base) + size,
    );
    if end > RESERVED.size.load(Relaxed) || start > end {
        return;
    }
    let mut space = lock();
    // SAFETY: jemalloc gave the extent back, so nothing lives in it.
    unsafe { reset(address as usize, size) };
    let mut offset = start;
    while offset < end {
        let chunk = offset >> CHUNK_SHIFT;
        let chunk_end = ((chunk + 1) << CHUNK_SHIFT).min(end);
        space.used[chunk] = space.used[chunk].saturating_sub((chunk_end - offset) as u32);
        let slot = usize::from(CHUNK_SLOT[chunk].load(Relaxed));
        if space.used[chunk] == 0 && space.open[slot] != chunk as u32 + 1 {
            // SAFETY: every extent in the chunk was given back.
            unsafe { reset(base + (chunk << CHUNK_SHIFT), CHUNK) };
            free_chunk(&mut space, chunk);
        }
        offset = chunk_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reservation_starts_on_a_chunk_boundary() {
        for _ in 0..8 {
            let (base, size) = map_aligned_reservation().expect("reserve");
            assert_eq!(base as usize % CHUNK, 0, "{base:p}");
            assert!((SMALLEST..=TOTAL).contains(&size));
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(base.cast(), size) };
        }
    }
}
