//! The tracking allocator under jemalloc options that change how arenas get, keep and give
//! back memory: `retain:false`, `narenas:1`, `tcache:false`, `background_thread:true`.
//!
//! Each test re-runs this binary as a child with `_RJEM_MALLOC_CONF` set (jemalloc reads it
//! once, at start) and the child runs a 12-thread stress: first every thread takes peaks in
//! components of its own, one after another, then ~3 s of mixed sizes from 8 B to 64 KiB,
//! reallocs growing and shrinking across the 14 KiB small/large border, bursts of blocks
//! freed at once (slabs made and emptied again and again), and blocks freed by other threads.
//! Every block's bytes are checked before it is resized or freed, and every component's
//! live bytes must be back where they started at the end. A child that aborts (an
//! allocation or realloc refused while jemalloc could serve it: `memory allocation of N
//! bytes failed`) or crashes fails its test.
//!
//! With `retain:false` jemalloc asks its extent hooks for exactly each extent it needs. At
//! its peak each of the 48 peak components' arenas holds 1,024 one-page slabs (4 KiB is a
//! size class whose slab is one page holding one region, checked below): 49,152 requests.
//! A reservation handing out one 2 MiB chunk per request and never reusing any would need
//! 96 GiB, more than its 64 GiB: it runs out during the peaks, between their reallocs.
#![cfg(feature = "jemalloc")]

#[path = "support/rng.rs"]
mod rng;

use rng::Rng;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use memtel::alloc::TrackingAllocator;
use memtel::{component, Component};

#[global_allocator]
static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> = TrackingAllocator::new(tikv_jemallocator::Jemalloc);

/// Set in the child: the jemalloc options it runs under.
const CHILD: &str = "MEMTEL_MALLOC_CONF_CHILD";
/// Each child takes the machine alone: a time-bounded stress shares it with nothing else.
static SERIAL: Mutex<()> = Mutex::new(());

const THREADS: usize = 12;
/// Peaks: each thread fills `PEAK_BLOCKS` blocks of `PEAK_BLOCK` bytes in each of its own
/// components in turn, resizes them, and frees them.
const PEAK_COMPONENTS: usize = 4;
const PEAK_BLOCK: usize = 4096;
const PEAK_BLOCKS: usize = 1024;
/// The mixed stress, in components every thread uses.
const MIXED_COMPONENTS: usize = 6;
const MIXED_FOR: Duration = Duration::from_secs(3);
const MAX_SIZE: usize = 64 << 10;
/// jemalloc's largest small size class (with 4 KiB pages) and the first large one.
const SMALL_MAX: usize = 14 << 10;
const LARGE_MIN: usize = 16 << 10;
const HELD_MAX: usize = 400;

/// Runs this test in a child with `_RJEM_MALLOC_CONF=conf` (and does the child's part when
/// this process is that child).
fn under(test: &str, conf: &str) {
    if let Some(child_conf) = std::env::var_os(CHILD) {
        return child(&child_conf.to_string_lossy());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture"])
        .env(CHILD, conf)
        .env("_RJEM_MALLOC_CONF", conf)
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("child under {conf}: {}\n{stdout}{stderr}", out.status);
    assert!(
        out.status.success() && stdout.contains("child: done"),
        "child under _RJEM_MALLOC_CONF={conf}: {} (its output above)",
        out.status
    );
}

#[test]
fn retain_false() {
    under("retain_false", "retain:false");
}

/// Without decay, jemalloc hands every emptied slab's extent back at once: the extent
/// hooks see the most requests.
#[test]
fn retain_false_without_decay() {
    under(
        "retain_false_without_decay",
        "retain:false,dirty_decay_ms:0,muzzy_decay_ms:0",
    );
}

#[test]
fn narenas_1() {
    under("narenas_1", "narenas:1");
}

#[test]
fn tcache_false() {
    under("tcache_false", "tcache:false");
}

#[test]
fn background_thread_true() {
    under("background_thread_true", "background_thread:true");
}

/// The child: checks that jemalloc took the options, runs the stress, checks the counts.
fn child(conf: &str) {
    for option in conf.split(',') {
        let (name, value) = option.split_once(':').expect("name:value");
        let key = format!("opt.{name}\0");
        // SAFETY: each `opt.*` read with the type jemalloc documents for it.
        let actual = unsafe {
            match name {
                "retain" | "tcache" | "background_thread" => {
                    tikv_jemalloc_ctl::raw::read::<bool>(key.as_bytes()).map(|v| v.to_string())
                }
                "narenas" => tikv_jemalloc_ctl::raw::read::<u32>(key.as_bytes()).map(|v| v.to_string()),
                _ => tikv_jemalloc_ctl::raw::read::<isize>(key.as_bytes()).map(|v| v.to_string()),
            }
        }
        .unwrap_or_else(|e| panic!("read opt.{name}: {e}"));
        assert_eq!(actual, value, "jemalloc runs with {name}:{value}");
    }

    let peaks: Vec<Vec<Component>> = (0..THREADS)
        .map(|t| {
            (0..PEAK_COMPONENTS)
                .map(|k| component(&format!("peak_{t}_{k}")))
                .collect()
        })
        .collect();
    let mixed: Vec<Component> = (0..MIXED_COMPONENTS)
        .map(|k| component(&format!("mixed_{k}")))
        .collect();
    let all: Vec<Component> = peaks.iter().flatten().chain(&mixed).copied().collect();
    assert!(
        all.iter().all(|c| *c != Component::OTHER),
        "every name has a slot of its own"
    );
    assert_eq!(
        slab_of(PEAK_BLOCK),
        (4096, 1),
        "the peaks' blocks take one-page slabs of one region"
    );
    reference();
    let start: Vec<u64> = all.iter().map(|c| c.live_bytes()).collect();

    let exchange: Arc<Mutex<Vec<Block>>> = Arc::default();
    let began = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (peaks, mixed, exchange) = (peaks[t].clone(), mixed.clone(), Arc::clone(&exchange));
            std::thread::spawn(move || {
                for &scope in &peaks {
                    peak(scope, t);
                }
                stress(t, &mixed, &exchange)
            })
        })
        .collect();
    let ops: u64 = handles.into_iter().map(|h| h.join().expect("stress thread")).sum();
    // Blocks left for other threads to free: freed here.
    for block in std::mem::take(&mut *exchange.lock().unwrap()) {
        block.free();
    }
    let elapsed = began.elapsed();

    for ((scope, before), name) in all.iter().zip(&start).zip(all.iter().map(|c| c.name())) {
        assert_eq!(
            scope.live_bytes(),
            *before,
            "{name}: live bytes back to the start (off by {} B)",
            scope.live_bytes() as i64 - *before as i64
        );
    }
    // SAFETY: `stats.*` read as size_t after an epoch advance.
    let (mapped, retained) = unsafe {
        let _ = tikv_jemalloc_ctl::epoch::advance();
        (
            tikv_jemalloc_ctl::raw::read::<usize>(b"stats.mapped\0").unwrap_or(0),
            tikv_jemalloc_ctl::raw::read::<usize>(b"stats.retained\0").unwrap_or(0),
        )
    };
    println!(
        "child: {ops} mixed operations in {:.1} s; component arenas {}, memtel cached {} B, \
         jemalloc mapped {} MiB, retained {} MiB",
        elapsed.as_secs_f64(),
        memtel::alloc::component_arenas(),
        memtel::alloc::cached_bytes(),
        mapped >> 20,
        retained >> 20,
    );
    println!("child: done");
}

/// jemalloc's slab for the size class of `size`: (bytes, regions).
fn slab_of(size: usize) -> (usize, u32) {
    // SAFETY: `arenas.nbins` is an unsigned, `arenas.bin.<i>.size` and `.slab_size` size_t,
    // `.nregs` uint32_t.
    unsafe {
        let bins = tikv_jemalloc_ctl::raw::read::<u32>(b"arenas.nbins\0").expect("arenas.nbins");
        for bin in 0..bins {
            let read =
                |field: &str| tikv_jemalloc_ctl::raw::read::<usize>(format!("arenas.bin.{bin}.{field}\0").as_bytes());
            if read("size").expect("bin size") == size {
                let regions = tikv_jemalloc_ctl::raw::read::<u32>(format!("arenas.bin.{bin}.nregs\0").as_bytes());
                return (read("slab_size").expect("slab size"), regions.expect("regions"));
            }
        }
    }
    panic!("no small size class of {size} B");
}

/// Fills `PEAK_BLOCKS` one-page blocks in `scope`, moves half of them across size classes
/// (8 KiB and back to 2 KiB: placed to placed) and a quarter across the small/large border
/// (20 KiB, then 10 KiB), checking every byte, and frees them all.
fn peak(scope: Component, t: usize) {
    let mut blocks: Vec<Block> = scope.in_scope(|| (0..PEAK_BLOCKS).map(|i| Block::new(PEAK_BLOCK, t + i)).collect());
    scope.in_scope(|| {
        for (i, block) in blocks.iter_mut().enumerate() {
            match i % 4 {
                0 | 1 => {
                    block.resize(2 * PEAK_BLOCK);
                    block.resize(PEAK_BLOCK / 2);
                }
                2 => {
                    block.resize(20 << 10);
                    block.resize(10 << 10);
                }
                _ => {}
            }
        }
    });
    for block in blocks.drain(..) {
        block.free();
    }
}

/// ~3 s of random allocations, resizes and frees in the mixed components; some blocks go to
/// the exchange for another thread to free. Returns how many operations it made.
fn stress(t: usize, components: &[Component], exchange: &Mutex<Vec<Block>>) -> u64 {
    let mut rng = Rng::new(0x6d61_6c6c_6f63 ^ ((t as u64) << 32));
    let mut held: Vec<Block> = Vec::with_capacity(HELD_MAX);
    let until = Instant::now() + MIXED_FOR;
    let mut ops = 0u64;
    while ops == 0 || Instant::now() < until {
        ops += 1;
        let scope = components[rng.below(components.len())];
        match rng.below(100) {
            0..=39 if held.len() < HELD_MAX => {
                let size = rng.log_size(3, 13);
                held.push(scope.in_scope(|| Block::new(size, rng.next() as usize)));
            }
            0..=64 if !held.is_empty() => {
                let i = rng.below(held.len());
                let size = crossing(&mut rng, held[i].len());
                scope.in_scope(|| held[i].resize(size));
            }
            65..=89 if !held.is_empty() => held.swap_remove(rng.below(held.len())).free(),
            90..=94 if !held.is_empty() => {
                let block = held.swap_remove(rng.below(held.len()));
                let mut shared = exchange.lock().unwrap();
                shared.push(block);
                // Someone else's, most likely.
                let i = rng.below(shared.len());
                let other = shared.swap_remove(i);
                drop(shared);
                other.free();
            }
            95..=96 => {
                // A burst: blocks of one small class made and freed together, so their
                // slabs fill and empty at once.
                let size = [64, 112, 256, 640, 1024, 3072, 4096, 7168, 14336][rng.below(9)];
                let burst: Vec<Block> = scope.in_scope(|| (0..256).map(|i| Block::new(size, i)).collect());
                for block in burst {
                    block.free();
                }
            }
            _ => {}
        }
    }
    for block in held {
        block.free();
    }
    ops
}

// ---------------------------------------------------------------------------------------
// Blocks whose bytes are checked: each a window into one reference sequence, at an offset
// of its own, compared with memcmp (fast in a debug build).

const REFERENCE_LEN: usize = MAX_SIZE + 4096;

fn reference() -> &'static [u8] {
    static REFERENCE: OnceLock<Vec<u8>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let mut rng = Rng::new(0x7265_6665_7265_6e63);
        (0..REFERENCE_LEN).map(|_| rng.next() as u8).collect()
    })
}

struct Block {
    bytes: Vec<u8>,
    offset: usize,
}

impl Block {
    fn new(size: usize, key: usize) -> Block {
        let offset = key.wrapping_mul(2_654_435_761) % 4096;
        let mut bytes = Vec::with_capacity(size);
        bytes.extend_from_slice(&reference()[offset..offset + size]);
        Block { bytes, offset }
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn check(&self) {
        let expected = &reference()[self.offset..self.offset + self.bytes.len()];
        if self.bytes != expected {
            let at = self.bytes.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "block of {} B at {:p} damaged from byte {at}",
                self.bytes.len(),
                self.bytes.as_ptr()
            );
        }
    }

    /// A realloc to exactly `size` bytes, checking the bytes kept.
    fn resize(&mut self, size: usize) {
        self.check();
        let len = self.bytes.len();
        if size > len {
            self.bytes.reserve_exact(size - len);
            self.bytes
                .extend_from_slice(&reference()[self.offset + len..self.offset + size]);
        } else {
            self.bytes.truncate(size);
            self.bytes.shrink_to_fit();
        }
        self.check();
    }

    fn free(self) {
        self.check();
    }
}

/// A new size for a block of `len` bytes: half the time on the other side of the
/// small/large border.
fn crossing(rng: &mut Rng, len: usize) -> usize {
    match (rng.below(2), len <= SMALL_MAX) {
        (0, true) => LARGE_MIN + rng.below(MAX_SIZE - LARGE_MIN),
        (0, false) => 8 + rng.below(SMALL_MAX - 8),
        _ => rng.log_size(3, 13).min(MAX_SIZE),
    }
}
