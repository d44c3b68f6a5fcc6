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
//! pages are made accessible as the arenas take them); `chunks` hands it out in 2 MiB
//! chunks, one component each, and takes back and reuses what jemalloc gives back.
//! jemalloc returns unused pages to the kernel with `madvise`, as it does for its own
//! arenas. Threads reach the arenas through caches of their own (`bins`, which also says
//! how jemalloc's tcaches are used without mixing components).
//!
//! A component whose threads allocate at the same time has up to one arena per CPU
//! (shards, 16 beyond the first ones for the whole process; see [`SHARDS`]), as jemalloc
//! gives its own threads arenas of their own.
//!
//! Whatever cannot be done — the reservation refused (e.g. by `RLIMIT_AS`), an arena not
//! created, the reservation used up — falls back to the tag, which is always right.

use std::cell::UnsafeCell;
use std::ffi::{c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use tikv_jemalloc_sys as sys;

use super::chunks;
use super::counters::SLOTS;

pub(crate) use chunks::{slot_of, Owners};

const UNTRIED: u8 = 0;
const RESERVING: u8 = 1;
const READY: u8 = 2;
const UNAVAILABLE: u8 = 3;
static RESERVATION: AtomicU8 = AtomicU8::new(UNTRIED);

/// Per slot and shard: 0 no arena yet, [`BUSY`] being created, [`FAILED`], else the arena
/// index + 1.
static ARENAS: [[AtomicU32; MAX_SHARDS]; SLOTS] = [const { [const { AtomicU32::new(0) }; MAX_SHARDS] }; SLOTS];
const BUSY: u32 = u32::MAX;
const FAILED: u32 = u32::MAX - 1;

/// At most this many arenas per component ([`SHARDS`]).
const MAX_SHARDS: usize = 4;

/// How many arenas each component has: one per CPU the process may run on, at most
/// [`MAX_SHARDS`] (set when the reservation is made).
///
/// Why more than one: threads that allocate in one component at the same time would
/// otherwise share one arena, as jemalloc never lets its own threads do (it gives each of
/// them one of 4 arenas per CPU). Every refill and return of theirs would take the same
/// bin locks, and one slab's neighbouring regions would go to different threads, whose
/// writes to them then move the cache lines between cores: two threads parsing JSON
/// documents in one component took 1.17–1.20× bare jemalloc's CPU time, against
/// 0.95–1.01× with a component each. Each thread is bound to the shard the fewest live
/// threads use ([`bind_thread`]), so the threads alive at once spread over the shards.
///
/// Each arena costs memory of its own: jemalloc's metadata for it (120–250 KiB resident)
/// and its partly used slabs. So the extra shards are few for the whole process, whatever
/// the number of components or CPUs: [`EXTRA_ARENAS`] in all, given to the components whose
/// threads first allocate from a shard other than the first; after that every thread of a
/// component without its own shard shares the component's first arena.
static SHARDS: AtomicU32 = AtomicU32::new(1);

/// How many arenas beyond each component's first may be made (see [`SHARDS`]): at most
/// about 4 MiB of jemalloc metadata.
const EXTRA_ARENAS: u32 = 16;
static EXTRA_LEFT: AtomicU32 = AtomicU32::new(EXTRA_ARENAS);

/// Takes one of the [`EXTRA_ARENAS`]; false when they are all made.
fn take_extra() -> bool {
    EXTRA_LEFT
        .fetch_update(Relaxed, Relaxed, |left| left.checked_sub(1))
        .is_ok()
}

/// How many live threads allocate from each shard (see [`bind_thread`]).
static THREADS_ON: [AtomicU32; MAX_SHARDS] = [const { AtomicU32::new(0) }; MAX_SHARDS];

/// The shard a thread allocates from in every component, chosen when it first needs one:
/// the one fewest live threads use, as jemalloc binds a thread to its least used arena.
/// (By the thread's counter index instead, two threads started while others were still
/// exiting could share a shard with the other idle: a DOM-heavy benchmark's second pair of
/// workers took 1.17× bare jemalloc's CPU time in 4 of 5 rounds.) Give it back with
/// [`unbind_thread`] when the thread exits.
pub(crate) fn bind_thread() -> u8 {
    let shards = (SHARDS.load(Relaxed) as usize).clamp(1, MAX_SHARDS);
    let shard = (0..shards).min_by_key(|&i| THREADS_ON[i].load(Relaxed)).unwrap_or(0);
    THREADS_ON[shard].fetch_add(1, Relaxed);
    shard as u8
}

/// A thread bound to `shard` exits.
pub(crate) fn unbind_thread(shard: u8) {
    if let Some(count) = THREADS_ON.get(usize::from(shard)) {
        let _ = count.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }
}

/// The CPUs this process may run on (its affinity mask), clamped to `1..=MAX_SHARDS`.
fn shard_count() -> u32 {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the call fills it for this thread.
    let cpus = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        libc::CPU_COUNT(&set)
    };
    (cpus.max(1) as u32).min(MAX_SHARDS as u32)
}

/// jemalloc's `opt.retain`: whether it keeps extents it no longer needs (then the hooks
/// decline to give them back, as jemalloc's own do) or hands them back (then the pages
/// go back to the kernel and the chunks are reused).
static RETAIN: AtomicBool = AtomicBool::new(true);

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

/// The arena indices of `slot`'s shards that exist.
pub(crate) fn arena_indices(slot: usize) -> impl Iterator<Item = u32> {
    (0..MAX_SHARDS).filter_map(move |shard| index_of(slot, shard))
}

/// The arena index of `slot`'s `shard`, if that arena exists.
fn index_of(slot: usize, shard: usize) -> Option<u32> {
    match ARENAS[slot][shard].load(Acquire) {
        0 | BUSY | FAILED => None,
        index => Some(index - 1),
    }
}

/// The `mallocx` flag naming the arena of `slot`'s `shard` (created on first use), or of
/// its first shard if this one has no arena of its own ([`EXTRA_ARENAS`] all made); `None`
/// if the arena does not exist and cannot be created.
pub(crate) fn flag(slot: u8, shard: usize) -> Option<i32> {
    let shard = shard % MAX_SHARDS;
    let cell = &ARENAS[usize::from(slot)][shard];
    let mut state = cell.load(Acquire);
    if state == BUSY {
        state = wait_while(|| cell.load(Acquire) == BUSY).then(|| cell.load(Acquire))?;
    }
    let arena = match state {
        0 => match create_arena(usize::from(slot), shard) {
            Some(arena) => arena,
            None if shard > 0 => return flag(slot, 0),
            None => return None,
        },
        FAILED if shard > 0 => return flag(slot, 0),
        BUSY | FAILED => return None,
        index => index - 1,
    };
    Some(sys::MALLOCX_ARENA(arena as usize))
}

/// How long a thread waits for another to finish creating an arena (or the reservation)
/// before its allocation takes a tag instead.
const CREATION_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Yields while `busy()`, at most [`CREATION_WAIT`]; whether it stopped being busy. Threads
/// that meet a component's arena being made wait for it, as for a `Once`: tagging their
/// allocations meanwhile would put them in jemalloc's own arenas, one lock each (8 threads
/// starting a component at once tagged up to 22,000 allocations each while the creating
/// thread was descheduled). The bound covers a creator that never finishes, such as one
/// that was mid-creation when another thread called `fork`. Neither yielding nor reading
/// the clock allocates.
#[cold]
fn wait_while(busy: impl Fn() -> bool) -> bool {
    let start = std::time::Instant::now();
    while busy() {
        if start.elapsed() > CREATION_WAIT {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// Creates the arena of `slot`'s `shard`, its pages taken from the reservation (every
/// shard of a slot shares the slot's hooks, so its chunks are the slot's). Another thread
/// creating it at the same instant makes this allocation use the tag.
#[cold]
#[inline(never)]
fn create_arena(slot: usize, shard: usize) -> Option<u32> {
    if !reserve() {
        return None;
    }
    let cell = &ARENAS[slot][shard];
    if cell.compare_exchange(0, BUSY, Acquire, Acquire).is_err() {
        return None;
    }
    if shard > 0 && !take_extra() {
        // For good: arenas are never destroyed, so no extra one comes free.
        cell.store(FAILED, Release);
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
        cell.store(FAILED, Release);
        return None;
    }
    set_dirty_decay(index);
    cell.store(index + 1, Release);
    start_decay_thread();
    Some(index)
}

/// Per slot: how many live threads keep lists for its arena (see `bins`).
static USERS: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];

/// A thread now keeps lists for `slot`'s arena.
pub(crate) fn user_joined(slot: u8) {
    USERS[usize::from(slot)].fetch_add(1, Relaxed);
}

/// A thread that kept lists for `slot`'s arena exited, its regions returned. When it was
/// the last, the arena's dirty pages are purged, as jemalloc does for an arena whose last
/// thread exits: no thread is bound to a component arena, so jemalloc itself never would,
/// and an arena nobody allocates from gets no decay ticks.
pub(crate) fn user_left(slot: u8) {
    if USERS[usize::from(slot)].fetch_sub(1, Relaxed) != 1 {
        return;
    }
    for index in arena_indices(usize::from(slot)) {
        crate::source::jemalloc::purge_arena(index as usize);
    }
}

/// How long a component arena keeps freed pages for reuse before they go back to the
/// kernel (`dirty_decay_ms`; jemalloc's own arenas keep them 10 s). Freed memory in one
/// component's arena cannot serve another's, so what jemalloc keeps dirty would be held once
/// per component: a burst in each of 64 components left 64 bursts' worth resident. A second
/// keeps pages that a busy component reuses (returning them at once cost 2.35× the time
/// of a DOM-heavy workload, each burst's slabs faulting back in) and returns an idle
/// component's soon.
const DIRTY_DECAY_MS: isize = 1_000;

/// Sets a component arena's decay (see [`DIRTY_DECAY_MS`]).
fn set_dirty_decay(index: c_uint) {
    let mut mib = [0usize; 3];
    if tikv_jemalloc_ctl::raw::name_to_mib(b"arena.0.dirty_decay_ms\0", &mut mib).is_err() {
        return;
    }
    mib[1] = index as usize;
    // SAFETY: "arena.<i>.dirty_decay_ms" takes an ssize_t.
    let _ = unsafe { tikv_jemalloc_ctl::raw::write_mib::<isize>(&mib, DIRTY_DECAY_MS) };
}

/// How often the decay thread lets jemalloc decay the component arenas.
const DECAY_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Whether the decay thread was started. A `fork` child inherits the flag but not the
/// thread, and starts none: a thread of its own would keep a child whose last thread ends
/// with `pthread_exit` alive. A child's component arenas decay as they are used, and when
/// their last thread exits.
static DECAYING: AtomicBool = AtomicBool::new(false);

/// Starts the decay thread once: jemalloc decays an arena only as it is used (and purges
/// one whose last bound thread exits), and no thread is bound to a component arena, so a
/// component that goes idle would keep its freed pages until its next allocation. The thread
/// runs `arena.<i>.decay` on each component arena every [`DECAY_EVERY`], which returns what
/// is older than [`DIRTY_DECAY_MS`] by jemalloc's own curve. It is a bare pthread that never
/// touches the Rust heap. (jemalloc's own background threads would do it too, but turning
/// them on changes every arena of the process: its arenas no longer purge when their last
/// thread exits.)
fn start_decay_thread() {
    if DECAYING.swap(true, Relaxed) {
        return;
    }
    let mut thread: libc::pthread_t = 0;
    // SAFETY: default attributes; the routine takes no argument and never returns.
    if unsafe { libc::pthread_create(&mut thread, std::ptr::null(), decay_loop, std::ptr::null_mut()) } != 0 {
        DECAYING.store(false, Relaxed);
        return;
    }
    // SAFETY: a thread just created; names are at most 15 bytes.
    unsafe {
        libc::pthread_setname_np(thread, c"memtel-decay".as_ptr());
        libc::pthread_detach(thread);
    }
}

extern "C" fn decay_loop(_: *mut c_void) -> *mut c_void {
    let mut mib = [0usize; 3];
    if tikv_jemalloc_ctl::raw::name_to_mib(b"arena.0.decay\0", &mut mib).is_err() {
        return std::ptr::null_mut();
    }
    loop {
        std::thread::sleep(DECAY_EVERY);
        for index in (0..SLOTS).flat_map(arena_indices) {
            mib[1] = index as usize;
            crate::source::jemalloc::run_mib(&mib);
        }
    }
}

/// Whether jemalloc still serves this thread normally: false once it has cleaned up the
/// thread's state (a TLS or pthread-key destructor running after jemalloc's), when it
/// serves every request from arena 0 and must not be asked for another (its debug build
/// asserts it). jemalloc turns the thread's tcache off then; placement is off when
/// tcaches are (`reserve`), so the tcache's state tells.
pub(crate) fn jemalloc_serves_thread() -> bool {
    // SAFETY: "thread.tcache.enabled" reads as a bool.
    unsafe { tikv_jemalloc_ctl::raw::read::<bool>(b"thread.tcache.enabled\0") }.unwrap_or(false)
}

/// How many component arenas exist (every shard counted).
pub(crate) fn count() -> usize {
    (0..SLOTS).flat_map(arena_indices).count()
}

/// Reserves the address space once; false if it is unavailable (or placement is turned
/// off: see [`super::scheme`]).
fn reserve() -> bool {
    match RESERVATION.compare_exchange(UNTRIED, RESERVING, Acquire, Acquire) {
        Ok(_) => {}
        Err(READY) => return true,
        // Another thread is reserving: wait for it (see `wait_while`).
        Err(RESERVING) => {
            return wait_while(|| RESERVATION.load(Acquire) == RESERVING) && RESERVATION.load(Acquire) == READY
        }
        // Unavailable: this allocation uses the tag.
        Err(_) => return false,
    }
    if !super::scheme::placement_wanted() || !super::classes::matches_jemalloc() || !super::bins::init() {
        RESERVATION.store(UNAVAILABLE, Release);
        return false;
    }
    let Some((base, size)) = chunks::map_aligned_reservation() else {
        RESERVATION.store(UNAVAILABLE, Release);
        return false;
    };
    // SAFETY: "opt.tcache" reads as a bool. Without tcaches, whether jemalloc has cleaned
    // up a thread cannot be told (`jemalloc_serves_thread`): every allocation is tagged.
    if !unsafe { tikv_jemalloc_ctl::raw::read::<bool>(b"opt.tcache\0") }.unwrap_or(false) {
        RESERVATION.store(UNAVAILABLE, Release);
        return false;
    }
    // SAFETY: "opt.retain" reads as a bool.
    let retain = unsafe { tikv_jemalloc_ctl::raw::read::<bool>(b"opt.retain\0") }.unwrap_or(true);
    RETAIN.store(retain, Relaxed);
    // SAFETY: registering a handler with no arguments that only stores to atomics.
    if unsafe { libc::pthread_atfork(None, None, Some(chunks::after_fork_in_child)) } != 0 {
        // SAFETY: unmapping the mapping made just above, which nothing uses.
        unsafe { libc::munmap(base.cast(), size) };
        RESERVATION.store(UNAVAILABLE, Release);
        return false;
    }
    SHARDS.store(shard_count(), Relaxed);
    chunks::install(base, size);
    RESERVATION.store(READY, Release);
    true
}

/// Whether placement is known never to happen in this process (the reservation was refused
/// or placement is turned off): then nothing placed ever reaches jemalloc's tcaches.
#[inline]
pub(crate) fn never_placed() -> bool {
    RESERVATION.load(Relaxed) == UNAVAILABLE
}

// ---------------------------------------------------------------------------------------
// Extent hooks: each slot's arena takes its pages from the reservation (see `chunks`).

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
    if !new_addr.is_null() {
        return std::ptr::null_mut();
    }
    let Some(address) = chunks::take(hook_slot(hooks), size, alignment) else {
        return std::ptr::null_mut();
    };
    // Never handed out since the pages were last replaced: the kernel's zero pages.
    *zero = true;
    *commit = true;
    address
}

/// With `opt.retain` (jemalloc's default) declines, so jemalloc keeps the extent for
/// reuse as it does with its own; otherwise takes it back for any component to reuse.
unsafe extern "C" fn hook_dalloc(
    _hooks: *mut sys::extent_hooks_t,
    addr: *mut c_void,
    size: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    if RETAIN.load(Relaxed) {
        return true;
    }
    chunks::give_back(addr, size);
    false
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
    fn no_pointer_is_placed_before_the_reservation() {
        if RESERVATION.load(Relaxed) == UNTRIED {
            let local = 0u8;
            assert_eq!(slot_of((&raw const local).cast_mut()), None);
        }
    }
}
