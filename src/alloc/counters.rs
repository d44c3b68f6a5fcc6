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
const OWNED_SHARDS: usize = 64;
const UNCLAIMED: u8 = u8::MAX;
const SHARED: u8 = u8::MAX - 1;

#[repr(align(128))]
struct Shard {
    allocated: [AtomicU64; SLOTS],
    freed: [AtomicU64; SLOTS],
}

impl Shard {
    const fn new() -> Self {
        Self {
            allocated: [const { AtomicU64::new(0) }; SLOTS],
            freed: [const { AtomicU64::new(0) }; SLOTS],
        }
    }
}

static OWNED: [Shard; OWNED_SHARDS] = [const { Shard::new() }; OWNED_SHARDS];
static CLAIMED: [AtomicBool; OWNED_SHARDS] = [const { AtomicBool::new(false) }; OWNED_SHARDS];
static SHARED_SHARD: Shard = Shard::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Everything the hot path needs from thread-local storage, in one place.
pub(crate) struct ThreadState {
    /// The component allocations are attributed to (a slot).
    pub(crate) current: Cell<u8>,
    shard: Cell<u8>,
    /// This thread's cumulative totals, for span accounting.
    pub(crate) alloc_bytes: Cell<u64>,
    pub(crate) alloc_count: Cell<u64>,
    pub(crate) free_bytes: Cell<u64>,
}

thread_local! {
    // const-initialised and without a destructor: usable from inside the allocator,
    // at any point of a thread's life, without allocating.
    pub(crate) static STATE: ThreadState = const {
        ThreadState {
            current: Cell::new(0),
            shard: Cell::new(UNCLAIMED),
            alloc_bytes: Cell::new(0),
            alloc_count: Cell::new(0),
            free_bytes: Cell::new(0),
        }
    };
    // Its destructor hands the shard back when the thread exits.
    static RELEASE: Release = const { Release };
}

struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        let _ = STATE.try_with(|s| {
            let index = s.shard.replace(SHARED);
            if usize::from(index) < OWNED_SHARDS {
                CLAIMED[usize::from(index)].store(false, std::sync::atomic::Ordering::Release);
            }
        });
    }
}

/// The thread's shard, claiming one on first use.
#[inline]
fn shard_of(state: &ThreadState) -> (&'static Shard, bool) {
    let index = state.shard.get();
    if usize::from(index) < OWNED_SHARDS {
        return (&OWNED[usize::from(index)], true);
    }
    if index == UNCLAIMED {
        return claim(state);
    }
    (&SHARED_SHARD, false)
}

#[cold]
fn claim(state: &ThreadState) -> (&'static Shard, bool) {
    INSTALLED.store(true, Relaxed);
    // Anything allocated while claiming (registering the release destructor may
    // allocate on some platforms) goes to the shared shard.
    state.shard.set(SHARED);
    for (index, claimed) in CLAIMED.iter().enumerate() {
        if claimed
            .compare_exchange(false, true, std::sync::atomic::Ordering::Acquire, Relaxed)
            .is_ok()
        {
            if RELEASE.try_with(|_| ()).is_err() {
                // Thread already tearing down: no destructor would release it.
                claimed.store(false, std::sync::atomic::Ordering::Release);
                return (&SHARED_SHARD, false);
            }
            state.shard.set(index as u8);
            return (&OWNED[index], true);
        }
    }
    (&SHARED_SHARD, false)
}

#[inline]
fn add(counter: &AtomicU64, value: u64, owned: bool) {
    if owned {
        counter.store(counter.load(Relaxed).wrapping_add(value), Relaxed);
    } else {
        counter.fetch_add(value, Relaxed);
    }
}

/// Records an allocation of `size` bytes attributed to the current component and
/// returns that component's slot (the tag to store with the allocation).
#[inline]
pub(crate) fn on_alloc(size: usize) -> u8 {
    STATE
        .try_with(|s| {
            let slot = s.current.get();
            let (shard, owned) = shard_of(s);
            add(&shard.allocated[usize::from(slot)], size as u64, owned);
            s.alloc_bytes.set(s.alloc_bytes.get().wrapping_add(size as u64));
            s.alloc_count.set(s.alloc_count.get().wrapping_add(1));
            slot
        })
        .unwrap_or_else(|_| {
            SHARED_SHARD.allocated[0].fetch_add(size as u64, Relaxed);
            0
        })
}

/// Records that `size` bytes allocated by `slot` were freed (by any thread).
#[inline]
pub(crate) fn on_free(slot: u8, size: usize) {
    let slot = usize::from(slot).min(SLOTS - 1);
    let recorded = STATE.try_with(|s| {
        let (shard, owned) = shard_of(s);
        add(&shard.freed[slot], size as u64, owned);
        s.free_bytes.set(s.free_bytes.get().wrapping_add(size as u64));
    });
    if recorded.is_err() {
        SHARED_SHARD.freed[slot].fetch_add(size as u64, Relaxed);
    }
}

/// Records a reallocation from `old` to `new` bytes of an allocation owned by `slot`.
#[inline]
pub(crate) fn on_realloc(slot: u8, old: usize, new: usize) {
    let slot = usize::from(slot).min(SLOTS - 1);
    let recorded = STATE.try_with(|s| {
        let (shard, owned) = shard_of(s);
        add(&shard.allocated[slot], new as u64, owned);
        add(&shard.freed[slot], old as u64, owned);
        s.alloc_bytes.set(s.alloc_bytes.get().wrapping_add(new as u64));
        s.alloc_count.set(s.alloc_count.get().wrapping_add(1));
        s.free_bytes.set(s.free_bytes.get().wrapping_add(old as u64));
    });
    if recorded.is_err() {
        SHARED_SHARD.allocated[slot].fetch_add(new as u64, Relaxed);
        SHARED_SHARD.freed[slot].fetch_add(old as u64, Relaxed);
    }
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
