//! A randomized stress of the tracking allocator that checks every byte and every count.
//!
//! Blocks of 1 B to 64 KiB with alignments from 1 to 8192 are made with
//! `std::alloc::{alloc, alloc_zeroed}` and as `Vec<u8>`, `String` and `Box<[u8]>`, resized
//! (often across the 14 KiB / 16 KiB border between jemalloc's small and large sizes, both
//! ways) and freed, each filled with a pattern of its own and checked before every resize
//! and free. The work runs in 100 components (more than the 64 that get a slot: the rest
//! fold into `other`), on more threads than cores, in four phases:
//!
//! 1. 8 long-lived threads make, resize and free blocks and hand some to each other;
//! 2. 2,000 short-lived threads in waves: each frees or resizes blocks made by threads that
//!    have exited, and allocates in a destructor, which hands blocks to a long-lived thread:
//!    a `thread_local!` one (run before jemalloc's per-thread cleanup) or a pthread key's
//!    made after jemalloc's (run after it, when jemalloc serves the thread re-entrantly);
//!    two fifths of them do nothing before it, so it makes their first allocation;
//! 3. Tokio tasks in components (`in_component`) on a 4-worker runtime, yielding between
//!    allocations so they move between workers, freeing blocks other tasks made;
//! 4. everything left is freed by one more thread.
//!
//! Before the last phase each component's live bytes must exceed its start by exactly the
//! bytes of the blocks still held in it (for the components with a slot); after it, every
//! component, `other` included, must be back at its start, exactly.
//!
//! The choices come from a seeded PRNG, one stream per thread and task: the seed is
//! printed, and `MEMTEL_STRESS_SEED` repeats a run.
#![cfg(feature = "jemalloc")]

#[path = "support/rng.rs"]
mod rng;

use rng::Rng;
use std::alloc::Layout;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use memtel::alloc::TrackingAllocator;
use memtel::{component, Component, InComponent};

#[global_allocator]
static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> = TrackingAllocator::new(tikv_jemallocator::Jemalloc);

/// Component names: more than the 64 that get a slot of their own.
const NAMES: usize = 100;
const WORKERS: usize = 8;
const WORKER_OPS: usize = 30_000;
/// Blocks a long-lived thread holds at most.
const HELD: usize = 256;
const WAVES: usize = 40;
const WAVE_THREADS: usize = 50;
/// Blocks passed from one wave to the next at most.
const POOL: usize = 600;
const RUNTIME_WORKERS: usize = 4;
const TASKS: usize = 128;
const TASK_STEPS: usize = 40;
const MAX_SIZE: usize = 64 << 10;
/// jemalloc's largest small size class (with 4 KiB pages) and the first large one.
const SMALL_MAX: usize = 14 << 10;
const LARGE_MIN: usize = 16 << 10;
const MAX_ALIGN_SHIFT: usize = 13;

#[test]
fn randomized_stress_returns_every_component_to_its_start() {
    let seed = seed();
    println!("alloc_stress seed {seed:#x} (MEMTEL_STRESS_SEED={seed:#x} repeats the choices)");
    let components = components();
    let distinct: Vec<Component> = components.iter().copied().collect::<HashSet<_>>().into_iter().collect();
    assert!(
        components.contains(&Component::OTHER) && distinct.len() == memtel::MAX_COMPONENTS + 1,
        "names beyond the table fold into other: {} slots for {NAMES} names",
        distinct.len()
    );
    // Whatever the phases set up lazily once per process (the reference patterns, the
    // runtime's and the channels' statics) is set up before the counts are read.
    Component::OTHER.in_scope(|| {
        run(seed ^ 0x5741_524d, Scale::WARM_UP);
        free_all(std::mem::take(&mut *SURVIVORS.lock().unwrap()), seed);
    });
    STATS.reset();
    // Everything alive at the first reading of `other` is alive at the last one.
    let mut start: HashMap<Component, u64> = HashMap::with_capacity(distinct.len());
    let mut off: Vec<(&str, i64)> = Vec::with_capacity(distinct.len());
    for &c in &distinct {
        start.insert(c, c.live_bytes());
    }

    // The phases run on a thread of their own, which has exited (and freed whatever it
    // kept for itself) when the counts are read again.
    let survivors = std::thread::spawn(move || {
        run(seed, Scale::FULL);
        std::mem::take(&mut *SURVIVORS.lock().unwrap())
    })
    .join()
    .expect("the stress (the seed is printed above)");

    // Everything still allocated in a component with a slot is a block held here.
    let mut held: HashMap<Component, u64> = HashMap::new();
    for block in &survivors {
        *held.entry(block.owner).or_default() += block.tracked();
    }
    for &c in distinct.iter().filter(|&&c| c != Component::OTHER) {
        let grown = c.live_bytes() as i64 - start[&c] as i64;
        let expected = held.get(&c).copied().unwrap_or(0) as i64;
        assert_eq!(
            grown,
            expected,
            "{}: live bytes − start = held blocks (seed {seed:#x})",
            c.name()
        );
    }
    drop(held);
    let kept = survivors.len();
    std::thread::spawn(move || free_all(survivors, seed))
        .join()
        .expect("the last frees");

    assert_eq!(
        DAMAGE.load(Relaxed),
        0,
        "blocks damaged or refused (seed {seed:#x}): see stderr"
    );
    for &c in &distinct {
        let delta = c.live_bytes() as i64 - start[&c] as i64;
        if delta != 0 {
            off.push((c.name(), delta));
        }
    }
    off.sort();
    assert!(
        off.is_empty(),
        "live bytes not back to the start (seed {seed:#x}): {off:?}"
    );
    println!(
        "alloc_stress: {} blocks made, {kept} kept to the end, {} threads, {} of {TASKS} tasks ran on more \
         than one worker; {} component arenas",
        STATS.blocks.load(Relaxed),
        STATS.threads.load(Relaxed),
        STATS.migrated.load(Relaxed),
        memtel::alloc::component_arenas()
    );
}

/// The run's seed: `MEMTEL_STRESS_SEED` (decimal or 0x-hex), else from the clock.
fn seed() -> u64 {
    match std::env::var("MEMTEL_STRESS_SEED") {
        Ok(s) => s
            .strip_prefix("0x")
            .map_or_else(|| s.parse(), |hex| u64::from_str_radix(hex, 16))
            .expect("MEMTEL_STRESS_SEED: a number"),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            now.as_nanos() as u64 ^ (u64::from(std::process::id()) << 40)
        }
    }
}

/// The components, interned once (interning a name allocates it).
fn components() -> &'static [Component] {
    static COMPONENTS: OnceLock<Vec<Component>> = OnceLock::new();
    COMPONENTS.get_or_init(|| (0..NAMES).map(|i| component(&format!("stress_{i:03}"))).collect())
}

fn pick(rng: &mut Rng) -> Component {
    components()[rng.below(NAMES)]
}

/// Counts for the summary.
struct Stats {
    blocks: AtomicUsize,
    threads: AtomicUsize,
    migrated: AtomicUsize,
}

impl Stats {
    fn reset(&self) {
        for count in [&self.blocks, &self.threads, &self.migrated] {
            count.store(0, Relaxed);
        }
    }
}

static STATS: Stats = Stats {
    blocks: AtomicUsize::new(0),
    threads: AtomicUsize::new(0),
    migrated: AtomicUsize::new(0),
};

/// How much work each phase does.
#[derive(Clone, Copy)]
struct Scale {
    workers: usize,
    worker_ops: usize,
    waves: usize,
    wave_threads: usize,
    tasks: usize,
}

impl Scale {
    const FULL: Scale = Scale {
        workers: WORKERS,
        worker_ops: WORKER_OPS,
        waves: WAVES,
        wave_threads: WAVE_THREADS,
        tasks: TASKS,
    };
    const WARM_UP: Scale = Scale {
        workers: 2,
        worker_ops: 500,
        waves: 2,
        wave_threads: 5,
        tasks: 4,
    };
}

/// Blocks the phases leave, for the last one.
static SURVIVORS: Mutex<Vec<Block>> = Mutex::new(Vec::new());

fn keep(blocks: impl IntoIterator<Item = Block>) {
    SURVIVORS.lock().unwrap().extend(blocks);
}

/// The first three phases; what they leave is in [`SURVIVORS`].
fn run(seed: u64, scale: Scale) {
    let survivors = long_lived(seed, scale);
    keep(short_lived(seed, scale, survivors));
    keep(in_tasks(seed, scale.tasks));
}

// ---------------------------------------------------------------------------------------
// Phase 1: long-lived threads.

fn long_lived(seed: u64, scale: Scale) -> Vec<Block> {
    let (senders, inboxes): (Vec<Sender<Block>>, Vec<Receiver<Block>>) =
        (0..scale.workers).map(|_| mpsc::channel()).unzip();
    let handles: Vec<_> = inboxes
        .into_iter()
        .enumerate()
        .map(|(t, inbox)| {
            let outboxes = senders.clone();
            std::thread::spawn(move || worker(Rng::stream(seed, t as u64), scale.worker_ops, inbox, outboxes))
        })
        .collect();
    drop(senders);
    let mut survivors = Vec::new();
    for handle in handles {
        survivors.extend(handle.join().expect("long-lived thread"));
    }
    STATS.threads.fetch_add(scale.workers, Relaxed);
    survivors
}

fn worker(mut rng: Rng, ops: usize, inbox: Receiver<Block>, outboxes: Vec<Sender<Block>>) -> Vec<Block> {
    let mut held: Vec<Block> = Vec::with_capacity(2 * HELD);
    for op in 0..ops {
        let scope = pick(&mut rng);
        match rng.below(100) {
            0..=34 if held.len() < HELD => {
                held.extend(scope.in_scope(|| Block::new(&mut rng, scope)));
            }
            0..=54 if !held.is_empty() => {
                let i = rng.below(held.len());
                let size = crossing(&mut rng, held[i].len());
                // In whichever component: a block keeps its owner.
                scope.in_scope(|| held[i].resize(size));
            }
            55..=79 if !held.is_empty() => {
                let block = held.swap_remove(rng.below(held.len()));
                scope.in_scope(|| block.free());
            }
            80..=89 if !held.is_empty() => {
                let block = held.swap_remove(rng.below(held.len()));
                if let Err(back) = outboxes[rng.below(outboxes.len())].send(block) {
                    back.0.free();
                }
            }
            _ => {}
        }
        if op % 16 == 0 {
            receive(&mut rng, inbox.try_iter(), &mut held);
        }
    }
    // Every worker's senders are gone once all have finished: then the inbox ends.
    drop(outboxes);
    receive(&mut rng, inbox.iter(), &mut held);
    held
}

/// Checks blocks from other threads; frees half, keeps the rest while there is room.
fn receive(rng: &mut Rng, blocks: impl Iterator<Item = Block>, held: &mut Vec<Block>) {
    for block in blocks {
        if held.len() < 2 * HELD && rng.below(2) == 0 {
            block.check("received");
            held.push(block);
        } else {
            block.free();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Phase 2: short-lived threads, and destructors that allocate.

/// What a thread's last destructor (a `thread_local!`'s or a pthread key's) does: allocate,
/// resize and free blocks, free the blocks it was given, and hand some to the collector.
struct LastWork {
    rng: Rng,
    given: Vec<Block>,
    to_collector: Sender<Vec<Block>>,
}

impl Drop for LastWork {
    fn drop(&mut self) {
        let rng = &mut self.rng;
        let scope = pick(rng);
        let mut made: Vec<Block> = Vec::with_capacity(8);
        let more: Vec<Block> = scope.in_scope(|| {
            let mut more = Vec::new();
            for _ in 0..8 {
                more.extend(Block::new(rng, scope));
            }
            for block in more.iter_mut().step_by(2) {
                let size = crossing(rng, block.len());
                block.resize(size);
            }
            for _ in 0..4 {
                if !more.is_empty() {
                    more.swap_remove(rng.below(more.len())).free();
                }
            }
            more
        });
        made.extend(more);
        for block in self.given.drain(..) {
            if rng.below(2) == 0 {
                block.free();
            } else {
                made.push(block);
            }
        }
        let _ = self.to_collector.send(made);
    }
}

thread_local! {
    static LAST_WORK: RefCell<Option<LastWork>> = const { RefCell::new(None) };
}

/// Where a thread's last work runs.
#[derive(Clone, Copy, PartialEq)]
enum Last {
    /// A `thread_local!` destructor: before jemalloc's own per-thread cleanup.
    ThreadLocal,
    /// The destructor of a pthread key made after jemalloc's: after its cleanup, when
    /// jemalloc serves the thread re-entrantly.
    PthreadKey,
}

impl Last {
    /// Makes `last` this thread's last work. (Boxed by the thread that spawned this one, so
    /// a thread can schedule it without allocating.)
    fn schedule(self, last: Box<LastWork>) {
        match self {
            Last::ThreadLocal => LAST_WORK.with(|slot| *slot.borrow_mut() = Some(*last)),
            // SAFETY: the key exists; its destructor takes the Box back.
            Last::PthreadKey => unsafe {
                assert_eq!(libc::pthread_setspecific(late_key(), Box::into_raw(last).cast()), 0);
            },
        }
    }
}

/// A pthread key whose destructor drops a `Box<LastWork>`. Made (in the warm-up) long
/// after jemalloc's, so glibc, which runs key destructors in the order the keys were made,
/// runs it after jemalloc's cleanup.
fn late_key() -> libc::pthread_key_t {
    static KEY: OnceLock<libc::pthread_key_t> = OnceLock::new();
    *KEY.get_or_init(|| {
        unsafe extern "C" fn run(value: *mut std::ffi::c_void) {
            // SAFETY: set from `Box::into_raw` of a LastWork; glibc clears it before the call.
            drop(unsafe { Box::from_raw(value.cast::<LastWork>()) });
        }
        let mut key = 0;
        // SAFETY: `key` is written by pthread_key_create; `run` has the C signature.
        assert_eq!(unsafe { libc::pthread_key_create(&mut key, Some(run)) }, 0);
        key
    })
}

fn short_lived(seed: u64, scale: Scale, mut pool: Vec<Block>) -> Vec<Block> {
    let (waves, wave_threads) = (scale.waves, scale.wave_threads);
    let mut rng = Rng::stream(seed, 1 << 20);
    let (to_collector, collected) = mpsc::channel::<Vec<Block>>();
    let collector = std::thread::spawn(move || {
        let mut rng = Rng::stream(seed, 1 << 21);
        let mut kept = Vec::new();
        for blocks in collected {
            receive(&mut rng, blocks.into_iter(), &mut kept);
        }
        kept
    });
    for wave in 0..waves {
        let handles: Vec<_> = (0..wave_threads)
            .map(|i| {
                let id = (1 << 22) + (wave * wave_threads + i) as u64;
                let take = pool.len().min(rng.below(12));
                let start = pool.len() - take;
                let given: Vec<Block> = pool.drain(start..).collect();
                let mut last = Box::new(LastWork {
                    rng: Rng::stream(seed, id ^ (1 << 30)),
                    given: Vec::new(),
                    to_collector: to_collector.clone(),
                });
                let (first, at) = match i % 5 {
                    0 => (true, Last::ThreadLocal),
                    1 => (true, Last::PthreadKey),
                    2 => (false, Last::PthreadKey),
                    _ => (false, Last::ThreadLocal),
                };
                if at == Last::PthreadKey {
                    late_key();
                }
                std::thread::spawn(move || {
                    if first {
                        // Nothing allocated before the destructor: it frees what this thread
                        // was given and makes its first allocation.
                        last.given = given;
                        at.schedule(last);
                        return Vec::new();
                    }
                    brief_life(Rng::stream(seed, id), given, last, at)
                })
            })
            .collect();
        for handle in handles {
            // join returns once the thread has ended, its destructors run.
            pool.extend(handle.join().expect("short-lived thread"));
        }
        STATS.threads.fetch_add(wave_threads, Relaxed);
        // Too many left: some freed here, made by threads that have exited.
        while pool.len() > POOL {
            pool.swap_remove(rng.below(pool.len())).free();
        }
    }
    drop(to_collector);
    pool.extend(collector.join().expect("collector"));
    pool
}

/// A short-lived thread: frees, resizes or keeps the blocks it was given (made by threads
/// that have exited), makes a few, and leaves some for its destructor to hand over.
fn brief_life(mut rng: Rng, given: Vec<Block>, mut last: Box<LastWork>, at: Last) -> Vec<Block> {
    let mut kept = Vec::with_capacity(given.len() + 8);
    for mut block in given {
        match rng.below(3) {
            0 => block.free(),
            1 => {
                let size = crossing(&mut rng, block.len());
                pick(&mut rng).in_scope(|| block.resize(size));
                kept.push(block);
            }
            _ => {
                block.check("given");
                kept.push(block);
            }
        }
    }
    for _ in 0..1 + rng.below(8) {
        let scope = pick(&mut rng);
        kept.extend(scope.in_scope(|| Block::new(&mut rng, scope)));
    }
    last.given = kept.split_off(kept.len() - kept.len().min(2));
    at.schedule(last);
    kept
}

// ---------------------------------------------------------------------------------------
// Phase 3: Tokio tasks moving between workers.

fn in_tasks(seed: u64, tasks: usize) -> Vec<Block> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .build()
        .expect("runtime");
    let shared: Arc<Mutex<Vec<Block>>> = Arc::default();
    let mut left = runtime.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|k| {
                let mut rng = Rng::stream(seed, (1 << 40) + k as u64);
                let scope = pick(&mut rng);
                tokio::spawn(task(rng, scope, Arc::clone(&shared)).in_component(scope))
            })
            .collect();
        let mut left = Vec::new();
        for handle in handles {
            left.extend(handle.await.expect("task"));
        }
        left
    });
    drop(runtime); // its workers have exited when this returns
    left.append(&mut Arc::try_unwrap(shared).ok().expect("tasks done").into_inner().unwrap());
    STATS.threads.fetch_add(RUNTIME_WORKERS, Relaxed);
    left
}

/// Allocates in its component (current on every poll, whichever worker polls), yields,
/// and frees or resizes blocks other tasks left in `shared`.
async fn task(mut rng: Rng, scope: Component, shared: Arc<Mutex<Vec<Block>>>) -> Vec<Block> {
    let mut held: Vec<Block> = Vec::new();
    let first_worker = std::thread::current().id();
    let mut moved = false;
    for _ in 0..TASK_STEPS {
        held.extend(Block::new(&mut rng, scope));
        tokio::task::yield_now().await;
        moved |= std::thread::current().id() != first_worker;
        if !held.is_empty() && rng.below(2) == 0 {
            let i = rng.below(held.len());
            let size = crossing(&mut rng, held[i].len());
            held[i].resize(size);
        }
        tokio::task::yield_now().await;
        let theirs = {
            let mut shared = shared.lock().unwrap();
            if !held.is_empty() {
                shared.push(held.swap_remove(rng.below(held.len())));
            }
            let i = rng.below(shared.len().max(1));
            (shared.len() > 1).then(|| shared.swap_remove(i))
        };
        if let Some(mut block) = theirs {
            if rng.below(3) == 0 {
                let size = crossing(&mut rng, block.len());
                block.resize(size);
                held.push(block);
            } else {
                block.free();
            }
        }
        tokio::task::yield_now().await;
    }
    if moved {
        STATS.migrated.fetch_add(1, Relaxed);
    }
    held
}

// ---------------------------------------------------------------------------------------
// Phase 4.

fn free_all(mut blocks: Vec<Block>, seed: u64) {
    let mut rng = Rng::stream(seed, 1 << 50);
    while !blocks.is_empty() {
        blocks.swap_remove(rng.below(blocks.len())).free();
    }
}

// ---------------------------------------------------------------------------------------
// Blocks. Each is a window, at an offset of its own, into a reference sequence (random
// bytes, or ASCII letters for strings): copied in and compared with memcpy and memcmp,
// fast even in a debug build.

/// Damaged blocks and refused requests, reported on stderr: a panic inside a destructor
/// would abort the process before the report.
static DAMAGE: AtomicUsize = AtomicUsize::new(0);

fn damage(what: std::fmt::Arguments) {
    if DAMAGE.fetch_add(1, Relaxed) < 20 {
        eprintln!("alloc_stress: {what}");
    }
}

const REFERENCE_LEN: usize = MAX_SIZE + 4096;
static ZEROS: [u8; MAX_SIZE] = [0; MAX_SIZE];

fn reference(text: bool) -> &'static [u8] {
    static BYTES: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    let (bytes, letters) = BYTES.get_or_init(|| {
        let mut rng = Rng(0x7265_6665_7265_6e63);
        let bytes: Vec<u8> = (0..REFERENCE_LEN).map(|_| rng.next() as u8).collect();
        let letters = bytes.iter().map(|b| b'a' + b % 26).collect();
        (bytes, letters)
    });
    if text {
        letters
    } else {
        bytes
    }
}

enum Data {
    Raw { ptr: NonNull<u8>, layout: Layout },
    Bytes(Vec<u8>),
    Text(String),
    Boxed(Box<[u8]>),
}

struct Block {
    data: Data,
    /// The component current when it was made: its bytes count there until freed.
    owner: Component,
    offset: usize,
}

// SAFETY: a raw block is an allocation of the global allocator owned by the Block alone.
unsafe impl Send for Block {}

impl Block {
    /// A block of a random kind, size and alignment, made in the current component (which
    /// must be `owner`); `None` if the allocator refused (reported).
    fn new(rng: &mut Rng, owner: Component) -> Option<Block> {
        let size = rng.log_size(0, 16);
        let offset = rng.below(4096);
        let data = match rng.below(10) {
            0..=5 => {
                let layout = Layout::from_size_align(size, 1 << rng.below(MAX_ALIGN_SHIFT + 1)).unwrap();
                let zeroed = rng.below(4) == 0;
                // SAFETY: the layout has a non-zero size.
                let ptr = unsafe {
                    if zeroed {
                        std::alloc::alloc_zeroed(layout)
                    } else {
                        std::alloc::alloc(layout)
                    }
                };
                let Some(ptr) = NonNull::new(ptr) else {
                    damage(format_args!("alloc({layout:?}) returned null"));
                    return None;
                };
                // SAFETY: `size` bytes allocated just above.
                let bytes = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), size) };
                if zeroed && bytes != &ZEROS[..size] {
                    damage(format_args!("alloc_zeroed({layout:?}) not zeroed"));
                }
                bytes.copy_from_slice(&reference(false)[offset..offset + size]);
                Data::Raw { ptr, layout }
            }
            6 => {
                // Grown by pushes: a chain of reallocs, as code that builds a buffer does.
                let mut bytes = Vec::new();
                for chunk in reference(false)[offset..offset + size].chunks(1 + rng.below(1000)) {
                    bytes.extend_from_slice(chunk);
                }
                Data::Bytes(bytes)
            }
            7 => {
                let mut bytes = Vec::with_capacity(size);
                bytes.extend_from_slice(&reference(false)[offset..offset + size]);
                Data::Bytes(bytes)
            }
            8 => {
                let mut text = String::with_capacity(size);
                text.push_str(std::str::from_utf8(&reference(true)[offset..offset + size]).unwrap());
                Data::Text(text)
            }
            _ => Data::Boxed(reference(false)[offset..offset + size].into()),
        };
        STATS.blocks.fetch_add(1, Relaxed);
        let block = Block { data, owner, offset };
        block.check("new");
        Some(block)
    }

    fn bytes(&self) -> &[u8] {
        match &self.data {
            // SAFETY: a live allocation of `layout.size()` bytes, all written.
            Data::Raw { ptr, layout } => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), layout.size()) },
            Data::Bytes(bytes) => bytes,
            Data::Text(text) => text.as_bytes(),
            Data::Boxed(bytes) => bytes,
        }
    }

    fn len(&self) -> usize {
        self.bytes().len()
    }

    /// The bytes the allocator counts for it: the size asked for.
    fn tracked(&self) -> u64 {
        (match &self.data {
            Data::Raw { layout, .. } => layout.size(),
            Data::Bytes(bytes) => bytes.capacity(),
            Data::Text(text) => text.capacity(),
            Data::Boxed(bytes) => bytes.len(),
        }) as u64
    }

    fn expected(&self, len: usize) -> &'static [u8] {
        &reference(matches!(self.data, Data::Text(_)))[self.offset..self.offset + len]
    }

    /// Reports the block if its bytes are not its pattern or its address is misaligned.
    fn check(&self, when: &str) {
        let (bytes, expected) = (self.bytes(), self.expected(self.len()));
        if bytes != expected {
            let at = bytes.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(0);
            damage(format_args!(
                "{when}: block of {} B at {:p} in {} damaged from byte {at}",
                bytes.len(),
                bytes.as_ptr(),
                self.owner.name()
            ));
        }
        if let Data::Raw { ptr, layout } = &self.data {
            if !(ptr.as_ptr() as usize).is_multiple_of(layout.align()) {
                damage(format_args!("{when}: {ptr:p} not aligned for {layout:?}"));
            }
        }
    }

    /// Resizes to exactly `size` bytes (a realloc), checking what it keeps.
    fn resize(&mut self, size: usize) {
        self.check("before resize");
        let len = self.len();
        let tail = &reference(matches!(self.data, Data::Text(_)))[self.offset + len.min(size)..self.offset + size];
        match &mut self.data {
            Data::Raw { ptr, layout } => {
                // SAFETY: `ptr` was allocated with `layout`; the new size is non-zero and
                // fits `isize` once rounded to the alignment.
                let grown = unsafe { std::alloc::realloc(ptr.as_ptr(), *layout, size) };
                let Some(grown) = NonNull::new(grown) else {
                    damage(format_args!("realloc({layout:?} → {size} B) returned null"));
                    return;
                };
                *ptr = grown;
                *layout = Layout::from_size_align(size, layout.align()).unwrap();
                if size > len {
                    // SAFETY: `size` bytes allocated; the first `len` kept by realloc.
                    unsafe { std::slice::from_raw_parts_mut(grown.as_ptr().add(len), size - len) }
                        .copy_from_slice(tail);
                }
            }
            Data::Bytes(bytes) => resize_vec(bytes, size, tail),
            Data::Text(text) => {
                if size > len {
                    text.reserve_exact(size - len);
                    text.push_str(std::str::from_utf8(tail).unwrap());
                } else {
                    text.truncate(size);
                    text.shrink_to_fit();
                }
            }
            Data::Boxed(boxed) => {
                let mut bytes = std::mem::take(boxed).into_vec();
                resize_vec(&mut bytes, size, tail);
                *boxed = bytes.into_boxed_slice();
            }
        }
        self.check("after resize");
    }

    /// Checks and frees it.
    fn free(self) {
        self.check("before free");
    }
}

fn resize_vec(bytes: &mut Vec<u8>, size: usize, tail: &[u8]) {
    if size > bytes.len() {
        bytes.reserve_exact(size - bytes.len());
        bytes.extend_from_slice(tail);
    } else {
        bytes.truncate(size);
        bytes.shrink_to_fit();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Data::Raw { ptr, layout } = self.data {
            // SAFETY: allocated with `layout` by the global allocator, freed once.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }
    }
}

/// A new size for a block of `len` bytes: a third of the time across the small/large
/// border, often right at it.
fn crossing(rng: &mut Rng, len: usize) -> usize {
    match (rng.below(6), len <= SMALL_MAX) {
        (0 | 1, true) => LARGE_MIN + rng.below(MAX_SIZE - LARGE_MIN),
        (0 | 1, false) => 1 + rng.below(SMALL_MAX),
        (2, _) => [
            SMALL_MAX - 1,
            SMALL_MAX,
            SMALL_MAX + 1,
            LARGE_MIN - 1,
            LARGE_MIN,
            LARGE_MIN + 1,
        ][rng.below(6)],
        _ => rng.log_size(0, 16),
    }
}
