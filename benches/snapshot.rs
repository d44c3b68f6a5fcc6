//! What one memory snapshot costs: the cheapest exact work done by hand (the floor),
//! memtel's `MemoryMonitor::snapshot()` in its configurations, and the original
//! endpoint's way (a new `sysinfo::System` refreshed twice per request), in one run.
//!
//! `cargo bench --bench snapshot`. Results and ratios are written up in BENCHMARKS.md.
//!
//! Two things about this process shape the figures, and both are printed to stderr:
//! - The peak path. cargo starts this binary, and the kernel carries the parent's
//!   `ru_maxrss` across `execve`; when the start value is above this image's `VmHWM`,
//!   memtel reads `/proc/self/status` for the peak until `ru_maxrss` moves. After the
//!   main comparison, the bench raises its own peak (touches and unmaps an anonymous
//!   mapping) so `ru_maxrss` moves, and measures memtel again on the `getrusage` path.
//! - jemalloc arenas. `epoch` costs more with more arenas, and criterion's analysis
//!   threads (rayon) would create two arenas after the first benchmark. Two short-lived
//!   threads allocate before any measurement, so every benchmark sees the same three
//!   arenas (criterion's threads reuse the idle ones); the count is printed at start and
//!   end. The last benchmark measures `epoch` once every automatic arena is in use.
//!
//! Criterion runs one benchmark after another; on this shared 2-core machine the load
//! drifts between them, and a ratio of two such medians carries that drift. So the
//! ratios the project tracks are also measured interleaved (the candidates take turns
//! in short batches, see [`interleaved`]) and printed to stderr; BENCHMARKS.md uses those.

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion};
use memtel::MemoryMonitor;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
use tikv_jemalloc_ctl::{arenas, epoch, epoch_mib, raw, stats};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const MIB: f64 = 1024.0 * 1024.0;

/// What the floor reads, so nothing is optimised away.
#[derive(Debug, Clone, Copy)]
struct FloorSnap {
    rss: u64,
    virt: u64,
    peak: u64,
    jemalloc: [u64; 6],
}

/// The cheapest exact work, by hand: kept-open fds, one `pread` each, MIBs resolved once.
struct Floor {
    statm: File,
    status: File,
    page_size: u64,
    epoch: epoch_mib,
    allocated: stats::allocated_mib,
    active: stats::active_mib,
    resident: stats::resident_mib,
    metadata: stats::metadata_mib,
    mapped: stats::mapped_mib,
    retained: stats::retained_mib,
}

impl Floor {
    fn open() -> Self {
        // SAFETY: sysconf has no preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Self {
            statm: File::open("/proc/self/statm").expect("open /proc/self/statm"),
            status: File::open("/proc/self/status").expect("open /proc/self/status"),
            page_size: u64::try_from(page_size).expect("page size"),
            epoch: epoch::mib().expect("epoch mib"),
            allocated: stats::allocated::mib().expect("mib"),
            active: stats::active::mib().expect("mib"),
            resident: stats::resident::mib().expect("mib"),
            metadata: stats::metadata::mib().expect("mib"),
            mapped: stats::mapped::mib().expect("mib"),
            retained: stats::retained::mib().expect("mib"),
        }
    }

    /// One `pread` at offset 0: a single-record procfs file comes whole in one read
    /// when the buffer is larger than its text.
    fn statm(&self) -> (u64, u64) {
        let mut buf = [0u8; 128];
        let n = self.statm.read_at(&mut buf, 0).expect("pread statm");
        let (size, rest) = parse_u64(&buf[..n]);
        let (resident, _) = parse_u64(rest);
        (size * self.page_size, resident * self.page_size)
    }

    /// `VmHWM` from one `pread` of the kept-open `/proc/self/status`.
    fn status_hwm(&self) -> u64 {
        let mut buf = [0u8; 4096];
        let n = self.status.read_at(&mut buf, 0).expect("pread status");
        hwm_of(&buf[..n]).expect("VmHWM in status")
    }

    fn jemalloc(&self, advance: bool) -> [u64; 6] {
        if advance {
            self.epoch.advance().expect("epoch");
        }
        self.six_stats()
    }

    fn six_stats(&self) -> [u64; 6] {
        [
            self.allocated.read().expect("allocated") as u64,
            self.active.read().expect("active") as u64,
            self.resident.read().expect("resident") as u64,
            self.metadata.read().expect("metadata") as u64,
            self.mapped.read().expect("mapped") as u64,
            self.retained.read().expect("retained") as u64,
        ]
    }

    fn snapshot(&self, advance: bool, status_peak: bool) -> FloorSnap {
        let (virt, rss) = self.statm();
        let peak = if status_peak { self.status_hwm() } else { maxrss_bytes() };
        FloorSnap {
            rss,
            virt,
            // Both high-water figures are updated lazily: never below the RSS just read.
            peak: peak.max(rss),
            jemalloc: self.jemalloc(advance),
        }
    }
}

/// The leading decimal after spaces, and the rest.
fn parse_u64(s: &[u8]) -> (u64, &[u8]) {
    let start = s.iter().position(|b| *b != b' ').unwrap_or(s.len());
    let s = &s[start..];
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    let value = s[..digits].iter().fold(0u64, |v, b| v * 10 + u64::from(b - b'0'));
    (value, &s[digits..])
}

/// `VmHWM:   1234 kB` in status text, in bytes.
fn hwm_of(status: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\nVmHWM:";
    let at = status.windows(KEY.len()).position(|w| w == KEY)?;
    let rest = &status[at + KEY.len()..];
    let start = rest.iter().position(|b| *b != b' ' && *b != b'\t')?;
    Some(parse_u64(&rest[start..]).0 * 1024)
}

/// `getrusage(RUSAGE_SELF).ru_maxrss`, in bytes.
fn maxrss_bytes() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole rusage on success, checked below.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: rc == 0, so the struct was written.
    let kib = unsafe { usage.assume_init() }.ru_maxrss;
    u64::try_from(kib).expect("ru_maxrss") * 1024
}

fn read_status_hwm() -> u64 {
    hwm_of(&std::fs::read("/proc/self/status").expect("read status")).expect("VmHWM")
}

/// memtel's `ProcFile::read_into` way, copied: `pread` until a read returns 0.
fn read_until_eof<'b>(file: &File, buf: &'b mut [u8]) -> &'b [u8] {
    let mut filled = 0;
    loop {
        match file.read_at(&mut buf[filled..], filled as u64) {
            Ok(0) => return &buf[..filled],
            Ok(n) => filled += n,
            Err(e) => panic!("pread: {e}"),
        }
    }
}

/// The original endpoint's way, per request: a new `System`, this process refreshed twice.
fn sysinfo_per_request(pid: Pid) -> (u64, u64) {
    let mut sys = System::new().expect("sysinfo System::new");
    let kind = ProcessRefreshKind::nothing().with_memory();
    sys.refresh_processes_specifics(ProcessesToUpdate::Some(&[pid]), true, kind);
    sys.refresh_processes_specifics(ProcessesToUpdate::Some(&[pid]), true, kind);
    let process = sys.process(pid).expect("this process in sysinfo");
    (process.memory(), process.virtual_memory())
}

/// The way `PITFALLS.md` describes the write-up: two new `System`s per request, each
/// refreshing this process with sysinfo's default process refresh (memory, CPU, disk
/// usage, exe, tasks).
fn sysinfo_two_systems_default_refresh(pid: Pid) -> (u64, u64) {
    let mut figures = (0, 0);
    for _ in 0..2 {
        let mut sys = System::new().expect("sysinfo System::new");
        sys.refresh_processes(ProcessesToUpdate::Some(&[pid]), true);
        let process = sys.process(pid).expect("this process in sysinfo");
        figures = (figures.0.max(process.memory()), process.virtual_memory());
    }
    figures
}

/// Three components with cheap callbacks (an atomic load each), as a service would register.
fn with_components(monitor: MemoryMonitor) -> MemoryMonitor {
    for (name, bytes) in [("cache", 4 << 20), ("sessions", 1 << 20), ("queue", 64 << 10)] {
        let counter = Arc::new(AtomicU64::new(bytes));
        monitor
            .component(name, move || counter.load(Ordering::Relaxed))
            .expect("register component");
    }
    monitor
}

fn fresh_with_epoch() -> MemoryMonitor {
    with_components(
        MemoryMonitor::builder()
            .cache_window(Duration::ZERO)
            .jemalloc_max_age(Duration::ZERO)
            .build(),
    )
}

fn fresh_cached_jemalloc() -> MemoryMonitor {
    with_components(MemoryMonitor::builder().cache_window(Duration::ZERO).build())
}

fn default_monitor() -> MemoryMonitor {
    with_components(MemoryMonitor::builder().build())
}

fn bench_monitor(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, id: &str, m: &MemoryMonitor) {
    let snap = m.snapshot();
    assert!(snap.jemalloc.is_some(), "jemalloc stats available to memtel");
    assert_eq!(snap.components.len(), 3);
    group.bench_function(id, |b| b.iter(|| black_box(m.snapshot())));
}

/// Which peak path memtel takes in this process (same test as memtel's `Peak::open`).
fn report_peak_path(when: &str, start_maxrss: u64) {
    let maxrss = maxrss_bytes();
    let hwm = read_status_hwm();
    let inherited = start_maxrss > hwm;
    let path = if inherited && maxrss <= start_maxrss {
        "/proc/self/status VmHWM (ru_maxrss inherited from the parent and not moved)"
    } else {
        "getrusage ru_maxrss only"
    };
    eprintln!(
        "[snapshot bench] {when}: ru_maxrss at start {:.1} MiB, ru_maxrss now {:.1} MiB, VmHWM now {:.1} MiB \
         -> memtel peak path: {path}",
        start_maxrss as f64 / MIB,
        maxrss as f64 / MIB,
        hwm as f64 / MIB,
    );
}

fn report_arenas(when: &str) {
    // `arena.<i>.initialized` is ctl data, refreshed by an epoch advance.
    epoch::advance().expect("epoch");
    let narenas = arenas::narenas::read().expect("arenas.narenas");
    let initialized = (0..narenas)
        .filter(|i| {
            let name = format!("arena.{i}.initialized\0");
            // SAFETY: arena.<i>.initialized is a bool.
            unsafe { raw::read::<bool>(name.as_bytes()) }.unwrap_or(false)
        })
        .count();
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .map_or("?", str::trim);
    eprintln!("[snapshot bench] {when}: jemalloc arenas in use {initialized} of {narenas}, threads {threads}");
}

/// `n` threads, alive at the same time, each allocate and exit: jemalloc gives each
/// its own arena (up to its automatic arena count), and the arenas stay in use for
/// stats after the threads exit. Later threads (criterion's) reuse the idle ones.
fn spawn_arenas(n: usize) {
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let len = black_box(vec![1u8; 64 << 10]).len();
                barrier.wait();
                len
            })
        })
        .collect();
    for t in threads {
        t.join().expect("arena thread");
    }
}

/// Makes `ru_maxrss` rise above `start_maxrss` by touching an anonymous mapping,
/// then unmaps it (RSS falls back, the high-water mark stays). jemalloc is not
/// involved, so its stats are unchanged. Returns false when it would take too much.
fn raise_peak_above(start_maxrss: u64) -> bool {
    const MARGIN: u64 = 16 << 20;
    const CAP: u64 = 2 << 30;
    if maxrss_bytes() > start_maxrss {
        return true;
    }
    let (_, rss) = Floor::open().statm();
    let len = start_maxrss.saturating_sub(rss) + MARGIN;
    if len > CAP {
        eprintln!(
            "[snapshot bench] not raising the peak: would need {:.0} MiB",
            len as f64 / MIB
        );
        return false;
    }
    let len = usize::try_from(len).expect("len");
    // SAFETY: a fresh private anonymous mapping, written only within its length, then unmapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        let bytes = p.cast::<u8>();
        for off in (0..len).step_by(4096) {
            std::ptr::write_volatile(bytes.add(off), 1);
        }
        assert_eq!(libc::munmap(p, len), 0, "munmap");
    }
    maxrss_bytes() > start_maxrss
}

/// The floor and memtel read the same figures (a wrong floor would be a meaningless baseline).
fn sanity_check(floor: &Floor) {
    let f = floor.snapshot(true, false);
    let s = floor.snapshot(true, true);
    let m = MemoryMonitor::builder().cache_window(Duration::ZERO).build().snapshot();
    let (rss, virt) = (
        m.rss_bytes.expect("memtel rss"),
        m.virtual_bytes.expect("memtel virtual"),
    );
    assert!(
        f.rss > 0 && f.virt >= f.rss && f.peak >= f.rss && s.peak >= s.rss,
        "{f:?} {s:?}"
    );
    assert!(
        f.jemalloc[0] > 0 && f.jemalloc.iter().skip(1).take(3).all(|v| *v > 0),
        "{f:?}"
    );
    assert!(
        f.rss.abs_diff(rss) < 64 << 20 && f.virt.abs_diff(virt) < 256 << 20,
        "{f:?} vs {m:?}"
    );
    eprintln!(
        "[snapshot bench] floor: rss {:.1} MiB, virtual {:.1} MiB, peak (getrusage) {:.1} MiB, \
         peak (VmHWM) {:.1} MiB, jemalloc allocated {:.1} MiB; memtel: rss {:.1} MiB, peak {:.1} MiB",
        f.rss as f64 / MIB,
        f.virt as f64 / MIB,
        f.peak as f64 / MIB,
        s.peak as f64 / MIB,
        f.jemalloc[0] as f64 / MIB,
        rss as f64 / MIB,
        m.peak_rss_bytes.unwrap_or(0) as f64 / MIB,
    );
}

/// A candidate of an interleaved comparison: a name and one call.
type Candidate<'a> = (&'static str, &'a dyn Fn());

/// Criterion measures one benchmark after another, so on a shared machine the load
/// can differ between the two sides of a ratio. This runs the candidates in turns
/// (`batch` calls each, the order rotated every round), so every round compares them
/// under the same load, and prints each candidate's median time per call and, for
/// each `(numerator, denominator)` pair, the median and quartiles of the per-round ratio.
fn interleaved(title: &str, candidates: &[Candidate<'_>], pairs: &[(usize, usize)], rounds: usize, batch: u32) {
    let n = candidates.len();
    let mut per_call: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); n];
    // Round 0 warms up and is not recorded.
    for round in 0..=rounds {
        for k in 0..n {
            let i = (round + k) % n;
            let start = Instant::now();
            for _ in 0..batch {
                (candidates[i].1)();
            }
            if round > 0 {
                per_call[i].push(start.elapsed().as_nanos() as f64 / f64::from(batch));
            }
        }
    }
    eprintln!("[snapshot bench] interleaved, {title}: {rounds} rounds of {batch} calls each");
    for (i, (name, _)) in candidates.iter().enumerate() {
        let q = quartiles(per_call[i].clone());
        eprintln!(
            "[snapshot bench]   {name:<40} median {:>9.3} µs/call (p25 {:.3}, p75 {:.3})",
            q[1] / 1e3,
            q[0] / 1e3,
            q[2] / 1e3
        );
    }
    for &(a, b) in pairs {
        let ratios: Vec<f64> = per_call[a].iter().zip(&per_call[b]).map(|(x, y)| x / y).collect();
        let q = quartiles(ratios);
        eprintln!(
            "[snapshot bench]   ratio {} ÷ {}: median {:.2}× (p25 {:.2}×, p75 {:.2}×)",
            candidates[a].0, candidates[b].0, q[1], q[0], q[2]
        );
    }
}

fn quartiles(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    [at(0.25), at(0.5), at(0.75)]
}

/// The interleaved comparisons: everything that reads the sources on every call.
fn interleaved_all(title: &str, floor: &Floor, with_epoch: &MemoryMonitor, cached: &MemoryMonitor, pid: Pid) {
    let fw = || {
        black_box(floor.snapshot(true, false));
    };
    let fs = || {
        black_box(floor.snapshot(true, true));
    };
    let mw = || {
        black_box(with_epoch.snapshot());
    };
    let si = || {
        black_box(sysinfo_per_request(pid));
    };
    let s2 = || {
        black_box(sysinfo_two_systems_default_refresh(pid));
    };
    let epoch_set: [Candidate<'_>; 5] = [
        ("floor/with_epoch", &fw),
        ("floor/status_peak", &fs),
        ("memtel/fresh_with_epoch", &mw),
        ("sysinfo/per_request", &si),
        ("sysinfo/two_systems_default_refresh", &s2),
    ];
    interleaved(
        &format!("{title}, with epoch"),
        &epoch_set,
        &[(2, 0), (2, 1), (3, 2), (4, 2)],
        150,
        20,
    );

    let fne = || {
        black_box(floor.snapshot(false, false));
    };
    let fsn = || {
        black_box(floor.snapshot(false, true));
    };
    let mc = || {
        black_box(cached.snapshot());
    };
    let no_epoch_set: [Candidate<'_>; 4] = [
        ("floor/no_epoch", &fne),
        ("floor/status_peak_no_epoch", &fsn),
        ("memtel/fresh_cached_jemalloc", &mc),
        ("sysinfo/per_request", &si),
    ];
    interleaved(
        &format!("{title}, no epoch"),
        &no_epoch_set,
        &[(2, 0), (2, 1), (3, 2)],
        150,
        20,
    );
}

fn main() {
    // Before anything else, so the figure is the one memtel's monitors see at build time.
    let start_maxrss = maxrss_bytes();
    report_peak_path("start", start_maxrss);
    report_arenas("start");
    // Criterion's two analysis threads would create two arenas after the first benchmark.
    spawn_arenas(2);
    report_arenas("after prewarm");

    let mut c = Criterion::default().without_plots().configure_from_args();
    // Criterion's test mode (`cargo test --benches`) runs without `--bench`: skip the extra pass.
    let interleave = std::env::args().any(|a| a == "--bench");
    let floor = Floor::open();
    let pid = Pid::from_u32(std::process::id());
    sanity_check(&floor);

    {
        let mut group = c.benchmark_group("snapshot");
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_secs(1));

        group.bench_function("floor/with_epoch", |b| {
            b.iter(|| black_box(floor.snapshot(true, false)))
        });
        group.bench_function("floor/no_epoch", |b| b.iter(|| black_box(floor.snapshot(false, false))));
        group.bench_function("floor/status_peak", |b| {
            b.iter(|| black_box(floor.snapshot(true, true)))
        });
        group.bench_function("floor/status_peak_no_epoch", |b| {
            b.iter(|| black_box(floor.snapshot(false, true)))
        });

        let (with_epoch, cached) = (fresh_with_epoch(), fresh_cached_jemalloc());
        bench_monitor(&mut group, "memtel/fresh_with_epoch", &with_epoch);
        bench_monitor(&mut group, "memtel/fresh_cached_jemalloc", &cached);
        bench_monitor(&mut group, "memtel/default", &default_monitor());

        group.bench_function("sysinfo/per_request", |b| {
            b.iter(|| black_box(sysinfo_per_request(pid)))
        });
        group.bench_function("sysinfo/two_systems_default_refresh", |b| {
            b.iter(|| black_box(sysinfo_two_systems_default_refresh(pid)))
        });

        report_peak_path("after the main comparison", start_maxrss);
        if interleave {
            interleaved_all("peak path as at start", &floor, &with_epoch, &cached, pid);
        }

        // The same monitors once ru_maxrss has moved: memtel's getrusage-only peak path.
        if raise_peak_above(start_maxrss) {
            report_peak_path("after raising the peak", start_maxrss);
            let (with_epoch, cached) = (fresh_with_epoch(), fresh_cached_jemalloc());
            if interleave {
                interleaved_all("getrusage peak path", &floor, &with_epoch, &cached, pid);
            }
            bench_monitor(&mut group, "memtel_rusage_path/fresh_with_epoch", &with_epoch);
            bench_monitor(&mut group, "memtel_rusage_path/fresh_cached_jemalloc", &cached);
        }
        group.finish();
    }
    report_arenas("after the snapshot group");

    // The parts, each alone, to say where a snapshot's time goes.
    {
        let mut group = c.benchmark_group("parts");
        group.measurement_time(Duration::from_millis(1500));
        group.warm_up_time(Duration::from_millis(500));

        group.bench_function("statm/pread_once", |b| b.iter(|| black_box(floor.statm())));
        group.bench_function("statm/pread_until_eof", |b| {
            b.iter(|| {
                let mut buf = [0u8; 192];
                let (size, rest) = parse_u64(read_until_eof(&floor.statm, &mut buf));
                black_box((size, parse_u64(rest).0))
            })
        });
        group.bench_function("peak/getrusage", |b| b.iter(|| black_box(maxrss_bytes())));
        group.bench_function("peak/status_pread_once", |b| b.iter(|| black_box(floor.status_hwm())));
        group.bench_function("peak/status_until_eof_8k", |b| {
            b.iter(|| {
                let mut buf = [0u8; 8192];
                black_box(hwm_of(read_until_eof(&floor.status, &mut buf)))
            })
        });
        group.bench_function("jemalloc/epoch_advance", |b| {
            b.iter(|| black_box(floor.epoch.advance().expect("epoch")))
        });
        group.bench_function("jemalloc/six_mib_reads", |b| b.iter(|| black_box(floor.six_stats())));

        // Last, as it cannot be undone: a multi-threaded service uses all automatic arenas.
        spawn_arenas(16);
        report_arenas("after 16 more threads");
        group.bench_function("jemalloc/epoch_advance_all_arenas", |b| {
            b.iter(|| black_box(floor.epoch.advance().expect("epoch")))
        });
        group.finish();
    }

    report_peak_path("end", start_maxrss);
    report_arenas("end");
    c.final_summary();
}
