//! Per-component byte counters, sharded so the allocator's hot path never contends.
//!
//! Each thread claims a shard of its own on its first allocation and updates it with
//! plain loads and stores (no atomic read-modify-write: only the owner writes). A
//! thread's shard is released when it exits and reused by a later thread, which keeps
//! adding to the same cumulative counts. Threads beyond the owned shards, and
//! allocations made while a thread is being torn down, go to one shared shard updated
//! with atomic adds. Readers sum every shard.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::monitor::MAX_COMPONENTS;

/// Counter slots: slot 0 is "no component", slots 1..=MAX_COMPONENTS the interned components.
pub(crate) const SLOTS: usize = MAX_COMPONENTS + 1;
/// Counter arrays are indexed by the tag byte itself, so the hot path needs no bounds
/// check; only the first `SLOTS` entries are ever used.
const TAGS: usize = 256;
const OWNED_SHARDS: usize = 64;

#[repr(align(128))]
pub(crate) struct Shard {
    allocated: [AtomicU64; TAGS],
    freed: [AtomicU64; TAGS],
}

impl Shard {
    const fn new() -> Self {
        Self {
            allocated: [const { AtomicU64::new(0) }; TAGS],
            freed: [const { AtomicU64::new(0) }; TAGS],
        }
    }
}

static OWNED: [Shard; OWNED_SHARDS] = [const { Shard::new() }; OWNED_SHARDS];
static CLAIMED: [AtomicBool; OWNED_SHARDS] = [const { AtomicBool::new(false) }; OWNED_SHARDS];
static SHARED_SHARD: Shard = Shard::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Everything the hot path needs from thread-local storage, in one place.
///
/// `repr(C)` keeps `alloc_left` and `alloc_count` apart: adjacent, the compiler merges
/// their two updates into a slower vector load, add and store.
#[repr(C)]
pub(crate) struct ThreadState {
    /// The component allocations are attributed to (a slot).
    pub(crate) current: Cell<u8>,
    /// The shard this thread owns (plain stores); null until claimed, and for a thread
    /// that uses the shared shard (atomic adds).
    shard: Cell<*const Shard>,
    /// Whether the thread has tried to claim a shard (it claims at most once).
    tried: Cell<bool>,
    /// The owned shard's index, to release it at exit.
    index: Cell<usize>,
    /// The shard of every component's arenas this thread allocates from
    /// (`arenas::bind_thread`); [`UNBOUND`] until its first placed allocation.
    #[cfg(feature = "jemalloc")]
    arena_shard: Cell<u8>,
    /// This thread's cumulative totals, for span accounting. The bytes allocated are
    /// `alloc_base − alloc_left` ([`allocated_total`]): `alloc_left` counts down with every
    /// allocation, so that the heap profiler's countdown is the same counter (a sample is
    /// due when it would go below zero, `sampler`) and an allocator that samples pays one
    /// branch for it, not a second counter. (An allocator that does not sample lets it
    /// wrap on its fast path; the slow paths stop it at zero, `note_alloc`.)
    pub(crate) alloc_left: Cell<u64>,
    pub(crate) alloc_base: Cell<u64>,
    pub(crate) free_bytes: Cell<u64>,
    pub(crate) alloc_count: Cell<u64>,
    /// The thread's caches of placed regions (see `bins`).
    #[cfg(feature = "jemalloc")]
    pub(crate) placement: super::bins::ThreadBins,
    /// The heap profiler's per-thread state (see `sampler`).
    #[cfg(feature = "profiling")]
    pub(crate) sampler: super::sampler::ThreadSampler,
}

thread_local! {
    // const-initialised and without a destructor: usable from inside the allocator,
    // at any point of a thread's life (`with` never fails), without allocating. What
    // must happen at thread exit is done by `RELEASE`'s destructor.
    pub(crate) static STATE: ThreadState = const {
        ThreadState {
            current: Cell::new(0),
            shard: Cell::new(std::ptr::null()),
            tried: Cell::new(false),
            index: Cell::new(usize::MAX),
            #[cfg(feature = "jemalloc")]
            arena_shard: Cell::new(UNBOUND),
            alloc_left: Cell::new(0),
            alloc_base: Cell::new(0),
            free_bytes: Cell::new(0),
            alloc_count: Cell::new(0),
            #[cfg(feature = "jemalloc")]
            placement: super::bins::ThreadBins::new(),
            #[cfg(feature = "profiling")]
            sampler: super::sampler::ThreadSampler::new(),
        }
    };
    // Its destructor hands the shard back when the thread exits.
    static RELEASE: Release = const { Release };
}

// `STATE.with` never fails only while `ThreadState` has nothing to drop.
const _: () = assert!(!std::mem::needs_drop::<ThreadState>());

struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        STATE.with(|s| {
            // Its lists first: they go back to jemalloc while the thread still owns its shard.
            #[cfg(all(feature = "jemalloc", feature = "profiling"))]
            super::spares::release_thread();
            #[cfg(feature = "jemalloc")]
            super::bins::release_thread(&s.placement);
            #[cfg(feature = "jemalloc")]
            {
                let shard = s.arena_shard.replace(UNBOUND);
                if shard != UNBOUND {
                    super::arenas::unbind_thread(shard);
                }
            }
            // Later allocations of this exiting thread go to the shared shard.
            s.shard.set(std::ptr::null());
            s.tried.set(true);
            let index = s.index.replace(usize::MAX);
            if index < OWNED_SHARDS {
                CLAIMED[index].store(false, std::sync::atomic::Ordering::Release);
            }
        });
    }
}

/// Whether this thread's exit will run [`Release`] (false once it is exiting).
#[cfg(feature = "jemalloc")]
pub(crate) fn thread_teardown_registered() -> bool {
    RELEASE.try_with(|_| ()).is_ok()
}

/// Gives the thread a shard of its own if one is free; otherwise it keeps using the
/// shared one.
fn claim(state: &ThreadState) {
    INSTALLED.store(true, Relaxed);
    // Anything allocated while claiming (registering the release destructor may
    // allocate on some platforms) goes to the shared shard.
    state.tried.set(true);
    // A thread whose first allocation comes after jemalloc cleaned it up (a late pthread-key
    // destructor) is exiting: a destructor registered now would never run to release a shard.
    #[cfg(feature = "jemalloc")]
    if !super::arenas::jemalloc_serves_thread() {
        return;
    }
    for (index, claimed) in CLAIMED.iter().enumerate() {
        if claimed
            .compare_exchange(false, true, std::sync::atomic::Ordering::Acquire, Relaxed)
            .is_ok()
        {
            if RELEASE.try_with(|_| ()).is_err() {
                // Thread already tearing down: no destructor would release it.
                claimed.store(false, std::sync::atomic::Ordering::Release);
                return;
            }
            state.index.set(index);
            state.shard.set(&OWNED[index]);
            return;
        }
    }
}

#[cfg(feature = "jemalloc")]
/// No arena shard chosen yet.
const UNBOUND: u8 = u8::MAX;

#[cfg(feature = "jemalloc")]
/// Which of a component's arenas this thread allocates from: the shard it was bound to at
/// its first placed allocation (`arenas::bind_thread`), the same for every component.
pub(crate) fn arena_shard(state: &ThreadState) -> usize {
    let mut shard = state.arena_shard.get();
    if shard == UNBOUND {
        shard = super::arenas::bind_thread();
        state.arena_shard.set(shard);
    }
    usize::from(shard)
}

#[cfg(feature = "jemalloc")]
/// The shard this thread owns, if it owns one (its counts then take plain stores).
#[inline(always)]
pub(crate) fn owned_shard(state: &ThreadState) -> Option<&'static Shard> {
    // SAFETY: a non-null shard pointer points at one of the OWNED statics.
    unsafe { state.shard.get().as_ref() }
}

#[cfg(feature = "jemalloc")]
/// Records an allocation in the thread's own shard (see [`owned_shard`]).
#[inline(always)]
pub(crate) fn record_alloc_owned(state: &ThreadState, shard: &Shard, slot: u8, size: usize) {
    // The fast path of an allocator that does not sample: the countdown may wrap.
    state.alloc_left.set(state.alloc_left.get().wrapping_sub(size as u64));
    record_counted_alloc_owned(state, shard, slot, size);
}

#[cfg(feature = "jemalloc")]
/// Records a free in the thread's own shard (see [`owned_shard`]).
#[inline(always)]
pub(crate) fn record_free_owned(state: &ThreadState, shard: &Shard, slot: u8, size: usize) {
    bump(&shard.freed[usize::from(slot)], size as u64);
    note_free(state, size);
}

/// Records an allocation in the thread's own shard whose bytes the sampler's countdown
/// already took (`sampler::count_down_unless_due`).
#[cfg(feature = "jemalloc")]
#[inline(always)]
pub(crate) fn record_counted_alloc_owned(state: &ThreadState, shard: &Shard, slot: u8, size: usize) {
    bump(&shard.allocated[usize::from(slot)], size as u64);
    state.alloc_count.set(state.alloc_count.get().wrapping_add(1));
}

/// Adds an allocation to the thread's totals for span accounting. The countdown stops at
/// zero rather than wrap (the total moves to `alloc_base`): an allocation the sampler did
/// not test (a `realloc`, one made while a sample is recorded) leaves a sample due at the
/// next allocation, never a countdown of 2^64 bytes.
#[inline(always)]
fn note_alloc(state: &ThreadState, size: usize) {
    let (size, left) = (size as u64, state.alloc_left.get());
    if size <= left {
        state.alloc_left.set(left - size);
    } else {
        state
            .alloc_base
            .set(state.alloc_base.get().wrapping_sub(left).wrapping_add(size));
        state.alloc_left.set(0);
    }
    state.alloc_count.set(state.alloc_count.get().wrapping_add(1));
}

/// The bytes this thread has allocated since it started (wrapping).
#[cfg(any(feature = "tracing", feature = "profiling"))]
#[inline(always)]
pub(crate) fn allocated_total(state: &ThreadState) -> u64 {
    state.alloc_base.get().wrapping_sub(state.alloc_left.get())
}

/// Restarts the thread's countdown at `left` bytes, keeping its total.
#[cfg(feature = "profiling")]
pub(crate) fn set_countdown(state: &ThreadState, left: u64) {
    let total = allocated_total(state);
    state.alloc_left.set(left);
    state.alloc_base.set(total.wrapping_add(left));
}

/// Adds a free to the thread's totals for span accounting.
#[inline(always)]
fn note_free(state: &ThreadState, size: usize) {
    state.free_bytes.set(state.free_bytes.get().wrapping_add(size as u64));
}

/// Adds to a counter of the thread's own shard: only this thread writes it, so a plain
/// load and store.
#[inline(always)]
fn bump(counter: &AtomicU64, value: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(value), Relaxed);
}

/// Adds `value` to entry `slot` of `pick`'s counters in this thread's shard.
#[inline(always)]
fn add(state: &ThreadState, pick: fn(&Shard) -> &[AtomicU64; TAGS], slot: u8, value: u64) {
    let shard = state.shard.get();
    if shard.is_null() {
        return add_unowned(state, pick, slot, value);
    }
    // SAFETY: a non-null shard pointer points at one of the OWNED statics.
    bump(&pick(unsafe { &*shard })[usize::from(slot)], value);
}

/// [`add`] for a thread without a shard: claims one on first use, else adds atomically
/// to the shared shard.
#[cold]
#[inline(never)]
fn add_unowned(state: &ThreadState, pick: fn(&Shard) -> &[AtomicU64; TAGS], slot: u8, value: u64) {
    if !state.tried.get() {
        claim(state);
        if !state.shard.get().is_null() {
            return add(state, pick, slot, value);
        }
    }
    pick(&SHARED_SHARD)[usize::from(slot)].fetch_add(value, Relaxed);
}

fn allocated(shard: &Shard) -> &[AtomicU64; TAGS] {
    &shard.allocated
}

fn freed(shard: &Shard) -> &[AtomicU64; TAGS] {
    &shard.freed
}

/// Records an allocation of `size` bytes attributed to the current component and
/// returns that component's slot (the tag to store with the allocation).
#[inline(always)]
pub(crate) fn on_alloc(size: usize) -> u8 {
    STATE.with(|s| {
        let slot = s.current.get();
        record_alloc(s, slot, size);
        slot
    })
}

/// Records an allocation of `size` bytes attributed to `slot`, in this thread's state.
#[inline(always)]
pub(crate) fn record_alloc(s: &ThreadState, slot: u8, size: usize) {
    add(s, allocated, slot, size as u64);
    note_alloc(s, size);
}

/// Records that `size` bytes allocated by `slot` were freed (by any thread).
#[inline(always)]
pub(crate) fn on_free(slot: u8, size: usize) {
    STATE.with(|s| record_free(s, slot, size));
}

/// Records that `size` bytes allocated by `slot` were freed, in this thread's state.
#[inline(always)]
pub(crate) fn record_free(s: &ThreadState, slot: u8, size: usize) {
    add(s, freed, slot, size as u64);
    note_free(s, size);
}

/// Records a reallocation from `old` to `new` bytes of an allocation owned by `slot`.
#[inline(always)]
pub(crate) fn on_realloc(slot: u8, old: usize, new: usize) {
    STATE.with(|s| {
        record_alloc(s, slot, new);
        record_free(s, slot, old);
    });
}

/// Whether a [`TrackingAllocator`](super::TrackingAllocator) has served any allocation.
pub(crate) fn installed() -> bool {
    INSTALLED.load(Relaxed)
}

/// Cumulative bytes allocated and freed for one slot, summed over every shard.
///
/// All `allocated` counts are read before the `freed` ones, so a concurrent
/// allocate-then-free is never seen as freed-but-not-allocated.
pub(crate) fn totals(slot: usize) -> (u64, u64) {
    let shards = || OWNED.iter().chain(std::iter::once(&SHARED_SHARD));
    let allocated = shards()
        .map(|s| s.allocated[slot].load(Relaxed))
        .fold(0u64, u64::wrapping_add);
    let freed = shards()
        .map(|s| s.freed[slot].load(Relaxed))
        .fold(0u64, u64::wrapping_add);
    (allocated, freed)
}

#[cfg(feature = "manager")]
/// Live tracked bytes over every slot.
pub(crate) fn live_total() -> u64 {
    (0..SLOTS)
        .map(|slot| {
            let (allocated, freed) = totals(slot);
            allocated.saturating_sub(freed)
        })
        .sum()
}
