//! Allocations made while a thread is being torn down keep their bytes and their counts.
//!
//! jemalloc cleans up a thread's state in a pthread-key destructor made when jemalloc starts.
//! glibc runs key destructors in the order the keys were made, so the destructor of a key
//! made later runs after jemalloc's cleanup: jemalloc then serves the thread re-entrantly,
//! and answers `MALLOCX_ARENA(..)` requests from arena 0 (jemalloc.c, `imalloc_body`), so
//! an allocator that trusts the arena it asked for hands out regions it did not place.
//! (Built with its assertions, `tikv-jemalloc-sys/debug`, jemalloc aborts on such a
//! request instead: `dopts->arena_ind == ARENA_IND_AUTOMATIC`.)
//! `thread_local!` destructors run earlier, before jemalloc's, but after (or before) the
//! tracking allocator's own per-thread teardown, depending on which registered first.
//!
//! Each test makes blocks in a component inside such a destructor, grows one there, and
//! hands them to a long-lived thread that checks their bytes and frees them. The
//! component's live bytes must return exactly to where they started, what the destructor
//! allocated must be attributed to it, and the exited threads must leave nothing in
//! memtel's per-thread caches (`cached_bytes`), threads whose very first allocation
//! happens in the destructor included.
#![cfg(feature = "jemalloc")]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

use memtel::alloc::TrackingAllocator;
use memtel::{component, Component};

/// The tracking allocator, counting the allocations each thread makes: a thread whose count
/// is still 0 when its destructor runs makes its first allocation there.
struct CountingAllocations<A>(A);

thread_local! {
    // No destructor: readable at any point of a thread's life, from inside the allocator.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_allocation() {
    ALLOCATIONS.with(|n| n.set(n.get() + 1));
}

unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAllocations<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        self.0.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        self.0.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.0.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        self.0.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAllocations<TrackingAllocator<tikv_jemallocator::Jemalloc>> =
    CountingAllocations(TrackingAllocator::new(tikv_jemallocator::Jemalloc));

/// The tests compare process-wide figures (`cached_bytes`): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Blocks each destructor makes, their size, and the size one of them grows to there.
const BLOCKS: usize = 256;
const BLOCK: usize = 112;
const GROWN: usize = 200;
/// Threads alive at once.
const WAVE: usize = 25;
/// Sizes the destructor also allocates and frees in bursts, so that a thread whose caches
/// outlive it would leave them well filled: small classes up to 14 KiB.
const BURST_SIZES: [usize; 12] = [8, 24, 48, 96, 200, 384, 768, 1536, 3072, 6144, 12288, 14336];
const BURST: usize = 16;
/// What may stay in the per-thread caches of the threads that live on (the test's own and
/// the harness's) across a test. A thread that kept its caches after exiting would leave
/// about 400 KiB there (the bursts above): hundreds of MiB for the threads of one test.
const CACHED_SLACK: u64 = 1 << 20;

/// The byte at `i` of block `block` made by thread `thread`: neighbouring blocks, and the
/// byte past each block, differ.
fn pattern(thread: usize, block: usize, i: usize) -> u8 {
    (thread.wrapping_mul(151) ^ block.wrapping_mul(37) ^ i.wrapping_mul(7) ^ 0x5a) as u8
}

/// Bytes of `bytes` that are not block `block` of thread `thread`.
fn damaged(thread: usize, block: usize, bytes: &[u8]) -> usize {
    bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b != pattern(thread, block, i))
        .count()
}

/// What a destructor is given: where to send its blocks, and which component to use.
struct Job {
    thread: usize,
    component: Component,
    to_checker: Sender<Batch>,
}

/// What a destructor sends: its blocks, and what it saw.
struct Batch {
    thread: usize,
    blocks: Vec<Vec<u8>>,
    /// Bytes found wrong in the destructor itself (after the growth, in the bursts).
    damaged: usize,
    /// No allocation on this thread before the destructor.
    first_allocation: bool,
    /// jemalloc's `thread.tcache.enabled` at the end of the destructor: false once jemalloc
    /// has cleaned up the thread's state (a thread it serves after that has no tcache).
    jemalloc_tcache: bool,
}

/// The work of every destructor: blocks in the job's component, one grown past its size
/// class, bursts allocated and freed; then the blocks go to the checker.
fn late_work(job: Job) {
    let first_allocation = ALLOCATIONS.with(Cell::get) == 0;
    let (blocks, damage) = job.component.in_scope(|| {
        let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(BLOCKS);
        for block in 0..BLOCKS {
            let mut bytes = Vec::with_capacity(BLOCK);
            bytes.extend((0..BLOCK).map(|i| pattern(job.thread, block, i)));
            blocks.push(bytes);
        }
        // A realloc to another size class, here in the destructor.
        let grown = &mut blocks[0];
        grown.reserve_exact(GROWN - BLOCK);
        let mut damage = damaged(job.thread, 0, grown);
        grown.extend((BLOCK..GROWN).map(|i| pattern(job.thread, 0, i)));
        for &size in &BURST_SIZES {
            let burst: Vec<Vec<u8>> = (0..BURST).map(|b| vec![pattern(job.thread, b, size); size]).collect();
            damage += burst
                .iter()
                .enumerate()
                .map(|(b, bytes)| bytes.iter().filter(|&&x| x != pattern(job.thread, b, size)).count())
                .sum::<usize>();
        }
        (blocks, damage)
    });
    // SAFETY: "thread.tcache.enabled" reads a bool.
    let jemalloc_tcache = unsafe { tikv_jemalloc_ctl::raw::read::<bool>(b"thread.tcache.enabled\0") }.unwrap_or(true);
    // A panic here would abort the process: whatever happens is sent and checked there.
    let _ = job.to_checker.send(Batch {
        thread: job.thread,
        blocks,
        damaged: damage,
        first_allocation,
        jemalloc_tcache,
    });
}

/// A pthread key whose destructor runs [`late_work`]. Made on first use, when jemalloc has
/// long been serving this process (the test harness allocated before any test ran), so its
/// index is above jemalloc's key: glibc runs its destructor after jemalloc's cleanup.
fn late_key() -> libc::pthread_key_t {
    static KEY: OnceLock<libc::pthread_key_t> = OnceLock::new();
    *KEY.get_or_init(|| {
        unsafe extern "C" fn run(value: *mut c_void) {
            // SAFETY: the value was set from `Box::into_raw` of a Job, and glibc calls the
            // destructor once per non-null value, after clearing it.
            late_work(*unsafe { Box::from_raw(value.cast::<Job>()) });
        }
        let mut key = 0;
        // SAFETY: `key` is written by pthread_key_create; `run` has the C signature.
        assert_eq!(unsafe { libc::pthread_key_create(&mut key, Some(run)) }, 0);
        key
    })
}

/// A `thread_local!` whose destructor runs [`late_work`].
struct TlsJob(Option<Job>);

impl Drop for TlsJob {
    fn drop(&mut self) {
        if let Some(job) = self.0.take() {
            late_work(job);
        }
    }
}

thread_local! {
    static TLS_JOB: RefCell<TlsJob> = const { RefCell::new(TlsJob(None)) };
}

#[derive(Clone, Copy, PartialEq)]
enum Destructor {
    /// A pthread key made after jemalloc's.
    PthreadKey,
    /// A `thread_local!` value's `Drop`.
    ThreadLocal,
}

/// What the checker found.
#[derive(Default)]
struct Checked {
    batches: usize,
    blocks: usize,
    damaged: usize,
    wrong_length: usize,
    first_allocations: usize,
    with_jemalloc_tcache: usize,
}

/// The long-lived thread: checks every block it is sent, then frees it.
fn checker(batches: Receiver<Batch>) -> Checked {
    let mut seen = Checked::default();
    for batch in batches {
        seen.batches += 1;
        seen.damaged += batch.damaged;
        seen.first_allocations += usize::from(batch.first_allocation);
        seen.with_jemalloc_tcache += usize::from(batch.jemalloc_tcache);
        for (block, bytes) in batch.blocks.iter().enumerate() {
            seen.blocks += 1;
            let expected = if block == 0 { GROWN } else { BLOCK };
            seen.wrong_length += usize::from(bytes.len() != expected);
            seen.damaged += damaged(batch.thread, block, bytes);
        }
        drop(batch); // freed here, on another thread than the one that made them
    }
    seen
}

/// Runs `threads` threads whose `destructor` allocates in `name`, and checks that
/// everything came back. `first` threads allocate nothing before the destructor.
fn run(name: &str, threads: usize, destructor: Destructor, first: bool) -> Checked {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let late = component(name);
    if destructor == Destructor::PthreadKey {
        late_key();
    }
    let (live_before, allocated_before) = (late.live_bytes(), late.allocated_bytes());
    let cached_before = memtel::alloc::cached_bytes();

    let (to_checker, batches) = mpsc::channel();
    let checker = std::thread::spawn(move || checker(batches));
    for wave in 0..threads.div_ceil(WAVE) {
        let handles: Vec<_> = (wave * WAVE..threads.min((wave + 1) * WAVE))
            .map(|thread| {
                let job = Job {
                    thread,
                    component: late,
                    to_checker: to_checker.clone(),
                };
                // Made here, so a `first` thread need not allocate to hold it.
                let job = Box::new(job);
                std::thread::spawn(move || {
                    if !first {
                        // An ordinary life before the destructor, in the component too.
                        let held = late.in_scope(|| vec![thread as u8; 4096]);
                        std::hint::black_box((held, format!("thread {thread}")));
                    }
                    match destructor {
                        // SAFETY: the key exists; its destructor takes the Box back.
                        Destructor::PthreadKey => unsafe {
                            assert_eq!(libc::pthread_setspecific(late_key(), Box::into_raw(job).cast()), 0);
                        },
                        Destructor::ThreadLocal => TLS_JOB.with(|slot| slot.borrow_mut().0 = Some(*job)),
                    }
                })
            })
            .collect();
        for handle in handles {
            // join waits for the thread's end, after its destructors ran.
            handle.join().expect("thread");
        }
    }
    drop(to_checker);
    let seen = checker.join().expect("checker");

    assert_eq!(seen.batches, threads, "every destructor ran and sent its blocks");
    assert_eq!(seen.blocks, threads * BLOCKS);
    assert_eq!(seen.wrong_length, 0, "block lengths");
    assert_eq!(seen.damaged, 0, "bytes changed between allocation, growth and free");
    if first {
        // Not every one: starting a thread, std at times allocates a node of the map in
        // which its stack-overflow handler keeps each thread's guard page, before the
        // thread's own code runs.
        assert!(
            seen.first_allocations >= threads / 2,
            "most threads made their first allocation in the destructor: {} of {threads}",
            seen.first_allocations
        );
    } else {
        assert_eq!(seen.first_allocations, 0);
    }
    let made = (threads * (BLOCKS * BLOCK + GROWN - BLOCK)) as u64;
    assert!(
        late.allocated_bytes() - allocated_before >= made,
        "what the destructors allocated is attributed to {name}: {} B, at least {made} B",
        late.allocated_bytes() - allocated_before
    );
    assert_eq!(
        late.live_bytes(),
        live_before,
        "{name}: everything freed, live bytes back to the start (off by {} B)",
        late.live_bytes() as i64 - live_before as i64
    );
    let cached_after = memtel::alloc::cached_bytes();
    println!("{name}: memtel's per-thread caches held {cached_before} B before, {cached_after} B after");
    assert!(
        cached_after <= cached_before + CACHED_SLACK,
        "exited threads left their caches: {cached_before} B cached before, {cached_after} B after"
    );
    seen
}

#[test]
fn a_pthread_key_destructor_after_jemallocs_cleanup_allocates_grows_and_hands_over_blocks() {
    let seen = run("late", 300, Destructor::PthreadKey, false);
    assert_eq!(
        seen.with_jemalloc_tcache, 0,
        "the destructor ran after jemalloc cleaned up the thread (which then has no tcache)"
    );
}

#[test]
fn a_pthread_key_destructor_makes_a_threads_first_allocation() {
    run("late_first", 100, Destructor::PthreadKey, true);
}

#[test]
fn a_thread_local_destructor_allocates_grows_and_hands_over_blocks() {
    let seen = run("late_tls", 300, Destructor::ThreadLocal, false);
    assert_eq!(
        seen.with_jemalloc_tcache, 300,
        "thread_local! destructors run before jemalloc's"
    );
}

#[test]
fn a_thread_local_destructor_makes_a_threads_first_allocation() {
    run("late_tls_first", 100, Destructor::ThreadLocal, true);
}
