//! The clock the allocator benches measure with: the process's CPU time by default, wall
//! clock time with `ALLOC_BENCH_CLOCK=wall`.
//!
//! Why CPU time: on a shared machine, wall clock time also counts the moments the
//! benchmark's threads wait for a core that another job holds, which come and go over
//! minutes and spread one allocator's rounds by ±15 %. What an allocator costs is the CPU
//! its callers spend in it, which is also what the bars compare ("CPU ≤ 1.05× bare
//! jemalloc"). `CLOCK_PROCESS_CPUTIME_ID` sums every thread of the process (the DOM and
//! realistic workers, and the bench's main thread, which blocks while they work); cache
//! and memory effects are counted, since a thread stalled on memory is on its core.

use std::time::Instant;

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::Throughput;

/// Which clock the benches read, chosen once from `ALLOC_BENCH_CLOCK` (`cpu`, the default,
/// or `wall`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchClock {
    /// The process's CPU time, all threads (`CLOCK_PROCESS_CPUTIME_ID`).
    ProcessCpu,
    /// Elapsed time (`Instant`), criterion's default.
    Wall,
}

impl BenchClock {
    /// The clock `ALLOC_BENCH_CLOCK` names; exits with status 2 on any other value.
    pub fn from_env() -> Self {
        match std::env::var("ALLOC_BENCH_CLOCK").as_deref() {
            Err(_) | Ok("") | Ok("cpu") => Self::ProcessCpu,
            Ok("wall") => Self::Wall,
            Ok(other) => {
                eprintln!("ALLOC_BENCH_CLOCK={other:?}: expected `cpu` or `wall`");
                std::process::exit(2);
            }
        }
    }

    /// A short name for reports (`cpu` or `wall`).
    pub fn name(self) -> &'static str {
        match self {
            Self::ProcessCpu => "cpu",
            Self::Wall => "wall",
        }
    }
}

/// Nanoseconds of the process's CPU time since an arbitrary start.
fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; this clock exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A reading taken at the start of a batch of iterations.
pub enum Reading {
    Cpu(u64),
    Wall(Instant),
}

impl Measurement for BenchClock {
    type Intermediate = Reading;
    /// Nanoseconds.
    type Value = u64;

    fn start(&self) -> Reading {
        match self {
            Self::ProcessCpu => Reading::Cpu(process_cpu_ns()),
            Self::Wall => Reading::Wall(Instant::now()),
        }
    }

    fn end(&self, start: Reading) -> u64 {
        match start {
            Reading::Cpu(ns) => process_cpu_ns().saturating_sub(ns),
            Reading::Wall(at) => at.elapsed().as_nanos() as u64,
        }
    }

    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }

    fn zero(&self) -> u64 {
        0
    }

    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        &Nanoseconds
    }
}

/// Formats nanoseconds as criterion's wall clock does (ns, µs, ms, s; bytes per second).
struct Nanoseconds;

impl ValueFormatter for Nanoseconds {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical < 1e3 {
            (1.0, "ns")
        } else if typical < 1e6 {
            (1e-3, "µs")
        } else if typical < 1e9 {
            (1e-6, "ms")
        } else {
            (1e-9, "s")
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }

    fn scale_throughputs(&self, _typical: f64, throughput: &Throughput, values: &mut [f64]) -> &'static str {
        let (per_iteration, unit) = match *throughput {
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) => (n as f64 / (1 << 20) as f64, "MiB/s"),
            Throughput::Bits(n) => (n as f64 / 1e6, "Mb/s"),
            Throughput::Elements(n) | Throughput::ElementsAndBytes { elements: n, .. } => (n as f64 / 1e6, "Melem/s"),
        };
        values.iter_mut().for_each(|v| *v = per_iteration * 1e9 / *v);
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}
