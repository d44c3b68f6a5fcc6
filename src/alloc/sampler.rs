//! Heap profiling: byte-based Poisson sampling of allocations in the tracking allocator.
//!
//! As Go's `MemProfileRate` and jemalloc's `lg_prof_sample`: each thread counts its
//! allocated bytes down from a random draw of an exponential distribution of mean
//! [`interval`](heap_sample_interval); the allocation that crosses zero is sampled. An
//! allocation of `s` bytes is then sampled with probability `1 − e^(−s/R)`, so weighting it
//! by the inverse makes the expected bytes and counts unbiased.
//!
//! A sampled allocation is always made with a tag (never placed), its tag byte carrying
//! [`SAMPLED`] besides the component: a free finds the flag in the tag it reads anyway,
//! so frees of placed allocations — the common case — are not touched at all, and frees
//! of tagged ones pay one bit test. Its stack is captured without allocating, by frame
//! pointers where they are kept, else by `backtrace` (see `unwind`),
//! while a per-thread guard keeps what the table allocates from being sampled in turn.
//!
//! The table (live samples by address, and every sampled stack's cumulative totals) sits
//! behind a spin lock; a `fork` child takes the lock over and stops sampling, and frees
//! in the child leave the inherited table alone.

use rustc_hash::FxHashMap;
use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use super::counters::{self, ThreadState};

/// The tag bit of a sampled allocation (component slots are below 128).
pub(crate) const SAMPLED: u8 = 0x80;
const _: () = assert!(super::counters::SLOTS <= SAMPLED as usize);

/// Frames kept per stack.
pub(crate) const DEPTH: usize = 64;

/// The mean sampling interval in bytes (0: off).
static INTERVAL: AtomicU64 = AtomicU64::new(0);
/// Bumped on every change of the interval: each thread redraws its countdown.
static EPOCH: AtomicU32 = AtomicU32::new(1);
/// Set in a `fork` child: sampling stops and the inherited table is left alone.
static FORKED: AtomicBool = AtomicBool::new(false);

/// Sets the mean number of bytes between two sampled allocations (`0` turns sampling off).
/// Takes effect on each thread at its next allocation that misses its caches.
///
/// ```
/// memtel::alloc::set_heap_sample_interval(512 << 10);
/// assert_eq!(memtel::alloc::heap_sample_interval(), 512 << 10);
/// memtel::alloc::set_heap_sample_interval(0);
/// ```
pub fn set_heap_sample_interval(bytes: u64) {
    if bytes > 0 {
        register_fork_handler();
    }
    INTERVAL.store(bytes, Relaxed);
    EPOCH.fetch_add(1, Release);
}

/// The mean sampling interval in bytes; 0 when sampling is off.
pub fn heap_sample_interval() -> u64 {
    INTERVAL.load(Relaxed)
}

/// Per-thread sampler state (part of the allocator's thread state). The countdown itself
/// is the thread's `alloc_left` (`counters::ThreadState`): the bytes it may still allocate
/// before the next sample; `u64::MAX` while sampling is off.
pub(crate) struct ThreadSampler {
    epoch: Cell<u32>,
    rng: Cell<u64>,
    /// Set while the thread records a sample (or reads the table): nothing it allocates
    /// meanwhile is sampled.
    busy: Cell<bool>,
    /// The thread's stack top for frame-pointer walks (see `unwind`).
    stack_top: Cell<usize>,
}

impl ThreadSampler {
    pub(crate) const fn new() -> Self {
        // The countdown starts at zero (`alloc_left`): the first allocation goes to the
        // slow path, which reads the interval and draws the real countdown.
        Self {
            epoch: Cell::new(0),
            rng: Cell::new(0),
            busy: Cell::new(false),
            stack_top: Cell::new(0),
        }
    }
}

/// Whether an allocation of `size` reaches the thread's countdown: it would take more
/// bytes than are left.
pub(crate) fn due(state: &ThreadState, size: usize) -> bool {
    size as u64 > state.alloc_left.get()
}

/// The fast path's test: takes `size` bytes from the thread's countdown unless that would
/// go below zero, i.e. unless the allocation is [`due`] (true: the countdown is left as it
/// was, and the caller takes the slow path). One subtraction that the thread's totals make
/// anyway, and a branch on its borrow: the rare undo reads the countdown again rather than
/// keep a copy from before the subtraction, so the subtraction stays one instruction on
/// memory.
#[cfg(feature = "jemalloc")]
#[inline(always)]
pub(crate) fn count_down_unless_due(state: &ThreadState, size: usize) -> bool {
    let (left, borrow) = state.alloc_left.get().overflowing_sub(size as u64);
    state.alloc_left.set(left);
    if borrow {
        // SAFETY: the thread's own countdown, a plain aligned u64 only this thread touches.
        let left = unsafe { state.alloc_left.as_ptr().read_volatile() };
        state.alloc_left.set(left.wrapping_add(size as u64));
    }
    borrow
}

/// For an allocation of `size` in a slow path: whether it is to be sampled. Redraws the
/// countdown first when the interval changed (a thread with sampling off notices a new
/// interval here, at its next allocation that misses its caches); false while the thread
/// is recording a sample.
pub(crate) fn take_sample(state: &ThreadState, size: usize) -> bool {
    let t = &state.sampler;
    if t.busy.get() {
        return false;
    }
    let epoch = EPOCH.load(Acquire);
    if t.epoch.get() != epoch {
        t.epoch.set(epoch);
        redraw(state);
    }
    if !due(state, size) {
        return false;
    }
    if INTERVAL.load(Relaxed) == 0 || FORKED.load(Relaxed) {
        counters::set_countdown(state, u64::MAX);
        return false;
    }
    true
}

/// Draws the next countdown: exponential of mean [`INTERVAL`], from the thread's total.
fn redraw(state: &ThreadState) {
    let interval = INTERVAL.load(Relaxed);
    if interval == 0 || FORKED.load(Relaxed) {
        counters::set_countdown(state, u64::MAX);
        return;
    }
    let t = &state.sampler;
    let mut x = t.rng.get();
    if x == 0 {
        // Seeded per thread from its state's address and the clock.
        x = (std::ptr::from_ref(state) as u64) ^ nanos() ^ 0x9E37_79B9_7F4A_7C15;
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    t.rng.set(x);
    let unit = ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let next = ((-unit.ln() * interval as f64).min(1e18) as u64).max(1);
    counters::set_countdown(state, next);
}

fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The weight of a sample of `size` bytes: how many allocations of its size it stands for.
fn scale(size: usize) -> f64 {
    let interval = INTERVAL.load(Relaxed).max(1) as f64;
    let p = 1.0 - (-(size.max(1) as f64) / interval).exp();
    if p > 0.0 {
        1.0 / p
    } else {
        1.0
    }
}

/// Records the sampled allocation `ptr` of `size` bytes of `slot`, with the caller's stack,
/// and draws the next countdown.
pub(crate) fn record(state: &ThreadState, ptr: *mut u8, size: usize, slot: u8) {
    let t = &state.sampler;
    t.busy.set(true);
    let mut frames = [0usize; DEPTH];
    let depth = super::unwind::capture(&t.stack_top, &mut frames);
    let weight = scale(size);
    #[cfg(feature = "tracing")]
    let span = super::layer::innermost_span();
    #[cfg(not(feature = "tracing"))]
    let span = None;
    with_table(state, |table| {
        table.insert(ptr as usize, &frames[..depth], slot, span, size, weight)
    });
    redraw(state);
    t.busy.set(false);
}

/// A sampled allocation at `ptr` was freed (or moved to where it is no longer sampled).
pub(crate) fn forget(ptr: *mut u8) {
    if FORKED.load(Relaxed) {
        return;
    }
    super::counters::STATE.with(|s| {
        let was = s.sampler.busy.replace(true);
        with_table(s, |table| {
            table.live.remove(&(ptr as usize));
        });
        s.sampler.busy.set(was);
    });
}

/// A sampled allocation moved from `old` to `new` and is now `size` bytes.
pub(crate) fn moved(old: *mut u8, new: *mut u8, size: usize) {
    if FORKED.load(Relaxed) {
        return;
    }
    super::counters::STATE.with(|s| {
        let was = s.sampler.busy.replace(true);
        let weight = scale(size);
        with_table(s, |table| {
            if let Some(mut live) = table.live.remove(&(old as usize)) {
                live.size = size;
                live.weight = weight;
                table.live.insert(new as usize, live);
            }
        });
        s.sampler.busy.set(was);
    });
}

/// One live sampled allocation.
#[derive(Clone, Copy)]
struct Live {
    stack: u32,
    size: usize,
    weight: f64,
}

/// A sampled stack and what was allocated from it since sampling began.
pub(crate) struct Stack {
    pub(crate) frames: Box<[usize]>,
    pub(crate) slot: u8,
    /// The innermost span entered when it was sampled (with `ComponentLayer`).
    pub(crate) span: Option<&'static str>,
    pub(crate) alloc_objects: f64,
    pub(crate) alloc_space: f64,
    /// The next stack with the same [`stack_hash`], or [`NO_STACK`].
    next: u32,
}

const NO_STACK: u32 = u32::MAX;

/// A hash of a sampled stack's frames and component (FxHash's step per word); stacks that
/// differ only by span share it. Known stacks are found by it without building a key (a
/// boxed copy of the frames and a SipHash over them cost about a third of a sample).
fn stack_hash(frames: &[usize], slot: u8) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let step = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(K);
    let mut h = step(0, u64::from(slot));
    for &frame in frames {
        h = step(h, frame as u64);
    }
    h
}

#[derive(Default)]
pub(crate) struct Table {
    live: FxHashMap<usize, Live>,
    /// The first stack of each [`stack_hash`]; the others follow its `next`.
    index: FxHashMap<u64, u32>,
    stacks: Vec<Stack>,
}

impl Table {
    /// The index of the stack with these frames, component and span, if sampled before.
    fn find(&self, hash: u64, frames: &[usize], slot: u8, span: Option<&'static str>) -> Option<u32> {
        let mut i = *self.index.get(&hash)?;
        while i != NO_STACK {
            let stack = &self.stacks[i as usize];
            if stack.slot == slot && stack.span == span && *stack.frames == *frames {
                return Some(i);
            }
            i = stack.next;
        }
        None
    }

    /// A new stack entry, first of its hash's chain; returns its index.
    fn add_stack(&mut self, hash: u64, frames: &[usize], slot: u8, span: Option<&'static str>) -> u32 {
        let i = self.stacks.len() as u32;
        let next = self.index.insert(hash, i).unwrap_or(NO_STACK);
        self.stacks.push(Stack {
            frames: frames.into(),
            slot,
            span,
            alloc_objects: 0.0,
            alloc_space: 0.0,
            next,
        });
        i
    }

    fn insert(&mut self, ptr: usize, frames: &[usize], slot: u8, span: Option<&'static str>, size: usize, weight: f64) {
        let hash = stack_hash(frames, slot);
        let stack = match self.find(hash, frames, slot, span) {
            Some(i) => i,
            None => self.add_stack(hash, frames, slot, span),
        };
        let s = &mut self.stacks[stack as usize];
        s.alloc_objects += weight;
        s.alloc_space += weight * size as f64;
        self.live.insert(ptr, Live { stack, size, weight });
    }

    /// Each stack with its in-use objects and bytes (the live samples' weights).
    pub(crate) fn each(&self, mut f: impl FnMut(&Stack, f64, f64)) {
        let mut inuse = vec![(0.0f64, 0.0f64); self.stacks.len()];
        for live in self.live.values() {
            let entry = &mut inuse[live.stack as usize];
            entry.0 += live.weight;
            entry.1 += live.weight * live.size as f64;
        }
        for (stack, (objects, space)) in self.stacks.iter().zip(inuse) {
            f(stack, objects, space);
        }
    }
}

/// The table and its spin lock.
struct Locked {
    lock: AtomicBool,
    table: UnsafeCell<Option<Table>>,
}

// SAFETY: the table is only reached through `with_table`, which holds the lock.
unsafe impl Sync for Locked {}

static TABLE: Locked = Locked {
    lock: AtomicBool::new(false),
    table: UnsafeCell::new(None),
};

/// Runs `f` on the table under its lock. The caller must have set its thread's `busy`
/// flag: what `f` allocates must not be sampled (that would take the lock again).
///
/// What the table allocates (its maps, each new stack's frames) is the profiler's own
/// memory, so it is made outside any component (`other`), whatever component the thread
/// is in: counted in the sampled allocation's component, it showed there as growth, and
/// its long-lived regions in that component's arena left the pages a purge returns in
/// three times as many pieces (sampling at 512 KiB took 1.056x the time of sampling off
/// on a workload whose threads each exit after a batch).
fn with_table<R>(state: &ThreadState, f: impl FnOnce(&mut Table) -> R) -> R {
    let component = state.current.replace(0);
    while TABLE.lock.compare_exchange_weak(false, true, Acquire, Relaxed).is_err() {
        std::hint::spin_loop();
    }
    // SAFETY: the lock is held.
    let result = f(unsafe { &mut *TABLE.table.get() }.get_or_insert_with(Table::default));
    TABLE.lock.store(false, Release);
    state.current.set(component);
    result
}

/// Runs `f` on the table for a reader (the profile views), with this thread's sampling
/// held off while it holds the lock.
pub(crate) fn read<R>(f: impl FnOnce(&Table) -> R) -> R {
    if FORKED.load(Relaxed) {
        return f(&Table::default());
    }
    super::counters::STATE.with(|s| {
        let was = s.sampler.busy.replace(true);
        let result = with_table(s, |t| f(t));
        s.sampler.busy.set(was);
        result
    })
}

fn register_fork_handler() {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if !REGISTERED.swap(true, Relaxed) {
        // SAFETY: a handler without arguments that only stores to atomics.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    }
}

/// In a `fork` child: another thread may have held the lock mid-update. Sampling stops,
/// the lock is taken over, and the inherited table is never touched again.
extern "C" fn after_fork_in_child() {
    FORKED.store(true, Relaxed);
    TABLE.lock.store(false, Relaxed);
    EPOCH.fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stack's frames, component, span, allocated objects and in-use objects.
    type Seen = (Vec<usize>, u8, Option<&'static str>, f64, f64);

    fn stacks(table: &Table) -> Vec<Seen> {
        let mut out = Vec::new();
        table.each(|s, inuse, _| out.push((s.frames.to_vec(), s.slot, s.span, s.alloc_objects, inuse)));
        out
    }

    #[test]
    fn samples_of_one_stack_component_and_span_share_an_entry_and_others_do_not() {
        let mut table = Table::default();
        table.insert(0x10, &[1, 2, 3], 1, None, 8, 1.0);
        table.insert(0x20, &[1, 2, 3], 1, None, 8, 1.0);
        table.insert(0x30, &[1, 2, 3], 2, None, 8, 1.0);
        table.insert(0x40, &[1, 2, 3], 1, Some("request"), 8, 1.0);
        // The same name from another string: spans are told apart by name, not by address.
        let name: &'static str = String::from("request").leak();
        table.insert(0x50, &[1, 2, 3], 1, Some(name), 8, 1.0);
        table.insert(0x60, &[1, 2], 1, None, 8, 1.0);
        assert_eq!(
            stacks(&table),
            vec![
                (vec![1, 2, 3], 1, None, 2.0, 2.0),
                (vec![1, 2, 3], 2, None, 1.0, 1.0),
                (vec![1, 2, 3], 1, Some("request"), 2.0, 2.0),
                (vec![1, 2], 1, None, 1.0, 1.0),
            ]
        );
    }

    #[test]
    fn stacks_whose_hashes_collide_stay_apart() {
        let mut table = Table::default();
        // Put two different stacks under one hash, as a collision would.
        table.insert(0x10, &[7], 1, None, 8, 1.0);
        let hash = stack_hash(&[7], 1);
        table.add_stack(hash, &[9], 1, None);
        assert_eq!(table.find(hash, &[7], 1, None), Some(0));
        assert_eq!(table.find(hash, &[9], 1, None), Some(1));
        assert_eq!(table.find(hash, &[8], 1, None), None);
    }
}
