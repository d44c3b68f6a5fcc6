//! memtel's allocator against bare jemalloc on the same pattern, in the same test run.
//!
//! A test binary that includes this file makes [`Switch`] its global allocator. Each process
//! decides once, at its first allocation, from `MEMTEL_TEST_ALLOCATOR`: `bare` sends every call
//! to jemalloc itself, anything else (or nothing) to [`MEMTEL`], memtel's
//! `TrackingAllocator<Jemalloc>`. A test's parent re-executes the test binary for that one test,
//! once per allocator ([`run_both`]); each child runs the pattern and prints one line
//! `RESULT {json}` ([`report`]); the parent gets both, prints them side by side and asserts its
//! bound. Both children run the same code, scopes included: only the allocator differs.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::CStr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};

use memtel::alloc::TrackingAllocator;
use serde_json::Value;
use tikv_jemallocator::Jemalloc;

/// memtel's allocator, used unless the process was started with `MEMTEL_TEST_ALLOCATOR=bare`.
pub static MEMTEL: TrackingAllocator<Jemalloc> = TrackingAllocator::new(Jemalloc);

/// Names the allocator of a child: `bare` or `memtel`. Set only in children.
pub const ALLOCATOR_ENV: &str = "MEMTEL_TEST_ALLOCATOR";

const UNDECIDED: u8 = 0;
const BARE: u8 = 1;
const TRACKING: u8 = 2;
static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// Whether this process runs on bare jemalloc.
#[inline(always)]
fn bare() -> bool {
    match CHOICE.load(Ordering::Relaxed) {
        BARE => true,
        TRACKING => false,
        _ => decide(),
    }
}

/// Reads the choice, inside the process's first allocation: `getenv` on a C literal, because
/// `std::env` would allocate. Threads racing here read the same variable and agree.
#[cold]
fn decide() -> bool {
    // SAFETY: a NUL-terminated name; the environment is not modified while tests run.
    let value = unsafe { libc::getenv(c"MEMTEL_TEST_ALLOCATOR".as_ptr()) };
    // SAFETY: getenv returns null or a NUL-terminated string.
    let bare = !value.is_null() && unsafe { CStr::from_ptr(value) } == c"bare";
    CHOICE.store(if bare { BARE } else { TRACKING }, Ordering::Relaxed);
    bare
}

/// The global allocator of a test binary that compares memtel with bare jemalloc.
pub struct Switch;

// SAFETY: every call goes to one of two allocators, chosen once per process and never
// changed, so each block is freed or resized by the allocator that made it.
unsafe impl GlobalAlloc for Switch {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if bare() {
            Jemalloc.alloc(layout)
        } else {
            MEMTEL.alloc(layout)
        }
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if bare() {
            Jemalloc.alloc_zeroed(layout)
        } else {
            MEMTEL.alloc_zeroed(layout)
        }
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if bare() {
            Jemalloc.dealloc(ptr, layout)
        } else {
            MEMTEL.dealloc(ptr, layout)
        }
    }
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if bare() {
            Jemalloc.realloc(ptr, layout, new_size)
        } else {
            MEMTEL.realloc(ptr, layout, new_size)
        }
    }
}

/// Declares [`Switch`] as the test binary's global allocator.
#[macro_export]
macro_rules! memtel_or_bare_allocator {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::versus_bare::Switch = $crate::versus_bare::Switch;
    };
}

/// The allocator this process runs on, if it is a child started by [`run_both`].
pub fn child() -> Option<&'static str> {
    std::env::var_os(ALLOCATOR_ENV)?;
    Some(if bare() { "bare" } else { "memtel" })
}

/// Prints a child's measurements for its parent. Adds which allocator served the child, by
/// memtel's own account, so the parent knows the switch did switch.
pub fn report(mut figures: Value) {
    let allocator = child().expect("report() is for children of run_both()");
    figures["allocator"] = allocator.into();
    figures["tracking_installed"] = memtel::alloc::tracking_installed().into();
    // On a line of its own: libtest may have printed "test name ... " without a newline.
    println!("\nRESULT {figures}");
}

/// How the two children of [`run_both`] share the machine.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Runs {
    /// One after the other: nothing else of the test disturbs a child's figures.
    OneAfterTheOther,
    /// Both at once: for patterns whose figures do not depend on CPU time (a sleep).
    Together,
}

/// Both children's measurements.
pub struct Pair {
    pub bare: Value,
    pub memtel: Value,
}

impl Pair {
    /// A number both children reported: (bare, memtel).
    pub fn get(&self, key: &str) -> (f64, f64) {
        let read = |v: &Value, who: &str| {
            v.pointer(key)
                .or_else(|| v.get(key))
                .and_then(Value::as_f64)
                .unwrap_or_else(|| panic!("{who} reported no number {key}: {v}"))
        };
        (read(&self.bare, "bare"), read(&self.memtel, "memtel"))
    }

    /// Prints byte figures side by side in MiB, with memtel ÷ bare.
    pub fn print_mib(&self, title: &str, rows: &[(&str, &str)]) {
        println!("{title}");
        println!(
            "  {:<28} {:>12} {:>12} {:>12}",
            "", "bare MiB", "memtel MiB", "memtel/bare"
        );
        for (label, key) in rows {
            let (bare, memtel) = self.get(key);
            let ratio = if bare != 0.0 {
                format!("{:.2}×", memtel / bare)
            } else {
                "-".to_owned()
            };
            println!(
                "  {label:<28} {:>12.2} {:>12.2} {ratio:>12}",
                bare / 1_048_576.0,
                memtel / 1_048_576.0
            );
        }
    }
}

/// Re-executes this test binary for `test` alone (a top-level test name), once on bare jemalloc
/// and once on memtel's allocator, with `env` added to each child's environment (say,
/// `_RJEM_MALLOC_CONF`; otherwise the parent's is inherited), and returns what each reported.
pub fn run_both(test: &str, runs: Runs, env: &[(&str, &str)]) -> Pair {
    let command = |allocator: &str| {
        let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
        cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(ALLOCATOR_ENV, allocator)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let (bare, memtel) = match runs {
        Runs::OneAfterTheOther => {
            let bare = command("bare").output().expect("run the bare child");
            let memtel = command("memtel").output().expect("run the memtel child");
            (bare, memtel)
        }
        Runs::Together => {
            let bare = command("bare").spawn().expect("start the bare child");
            let memtel = command("memtel").spawn().expect("start the memtel child");
            // Each child prints a few lines: neither blocks on a full pipe while the other is read.
            (
                bare.wait_with_output().expect("wait for the bare child"),
                memtel.wait_with_output().expect("wait for the memtel child"),
            )
        }
    };
    let pair = Pair {
        bare: parse(test, "bare", &bare),
        memtel: parse(test, "memtel", &memtel),
    };
    assert_eq!(
        pair.bare["tracking_installed"], false,
        "the bare child ran memtel's allocator"
    );
    assert_eq!(
        pair.memtel["tracking_installed"], true,
        "the memtel child did not run memtel's allocator"
    );
    pair
}

fn parse(test: &str, allocator: &str, out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let result = stdout.lines().find_map(|line| line.strip_prefix("RESULT "));
    match (out.status.success(), result) {
        (true, Some(json)) => serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("{test} on {allocator}: bad RESULT {json}: {e}\n{stdout}\n{stderr}")),
        _ => panic!(
            "{test} on {allocator}: child {} without a RESULT line\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        ),
    }
}

/// jemalloc's `stats.active` after advancing its epoch: bytes in pages of active extents.
/// Small allocations jemalloc's own (automatic) arenas have served, by jemalloc's counters:
/// where memtel's tagged small allocations go, so a measure of how many were not placed.
pub fn automatic_arenas_small_allocations() -> u64 {
    use tikv_jemalloc_ctl::raw;
    tikv_jemalloc_ctl::epoch::advance().expect("epoch");
    // SAFETY: "opt.narenas" reads as an unsigned, each arena's count as a u64.
    let automatic = unsafe { raw::read::<u32>(b"opt.narenas\0") }.expect("opt.narenas");
    (0..automatic)
        .map(|i| {
            let name = format!("stats.arenas.{i}.small.nmalloc\0");
            unsafe { raw::read::<u64>(name.as_bytes()) }.expect("stats.arenas.<i>.small.nmalloc")
        })
        .sum()
}

pub fn jemalloc_active() -> u64 {
    tikv_jemalloc_ctl::epoch::advance().expect("epoch");
    tikv_jemalloc_ctl::stats::active::read().expect("stats.active") as u64
}
