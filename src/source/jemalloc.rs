//! jemalloc statistics through `tikv-jemalloc-ctl`, with names resolved to MIBs once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tikv_jemalloc_ctl::{epoch, epoch_mib, raw, stats, thread};

use crate::snapshot::JemallocStats;

/// jemalloc's stats MIBs plus the last refreshed figures.
///
/// Advancing `epoch` is the costly part (≈ 9 µs with one thread, ≈ 50 µs with a few
/// arenas here, under jemalloc's global ctl lock), so it is advanced at most once per
/// `max_age`; reading six stats by MIB costs ≈ 0.2 µs.
pub(crate) struct Jemalloc {
    epoch: epoch_mib,
    allocated: stats::allocated_mib,
    active: stats::active_mib,
    resident: stats::resident_mib,
    metadata: stats::metadata_mib,
    mapped: stats::mapped_mib,
    retained: stats::retained_mib,
    last: Mutex<Option<(Instant, JemallocStats)>>,
}

impl std::fmt::Debug for Jemalloc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jemalloc").finish_non_exhaustive()
    }
}

impl Jemalloc {
    /// The source, when jemalloc is built with stats *and* is the global allocator.
    ///
    /// A library cannot choose its user's allocator. jemalloc's `thread.allocated`
    /// counts what this thread allocated through jemalloc: if a 1 MiB allocation from
    /// the global allocator does not move it, jemalloc is linked but not in use, and
    /// its stats would describe an idle allocator.
    pub(crate) fn detect() -> Option<Self> {
        // SAFETY: config.stats is a bool.
        let stats_built = unsafe { raw::read::<bool>(b"config.stats\0") }.ok()?;
        if !stats_built || !is_global_allocator()? {
            return None;
        }
        Some(Self {
            epoch: epoch::mib().ok()?,
            allocated: stats::allocated::mib().ok()?,
            active: stats::active::mib().ok()?,
            resident: stats::resident::mib().ok()?,
            metadata: stats::metadata::mib().ok()?,
            mapped: stats::mapped::mib().ok()?,
            retained: stats::retained::mib().ok()?,
            last: Mutex::new(None),
        })
    }

    /// The stats, refreshed (one `epoch` advance) when older than `max_age`.
    pub(crate) fn read(&self, max_age: Duration) -> Option<JemallocStats> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some((at, stats)) = *last {
            let age = now.saturating_duration_since(at);
            if age < max_age {
                return Some(JemallocStats { age, ..stats });
            }
        }
        let stats = self.refresh()?;
        *last = Some((now, stats));
        Some(stats)
    }

    fn refresh(&self) -> Option<JemallocStats> {
        self.epoch.advance().ok()?;
        let get = |r: tikv_jemalloc_ctl::Result<usize>| r.ok().map(|v| v as u64);
        Some(JemallocStats {
            allocated: get(self.allocated.read())?,
            active: get(self.active.read())?,
            resident: get(self.resident.read())?,
            metadata: get(self.metadata.read())?,
            mapped: get(self.mapped.read())?,
            retained: get(self.retained.read())?,
            age: Duration::ZERO,
        })
    }
}

/// Asks jemalloc to return the dirty and muzzy pages of every arena to the OS
/// (`arena.<all>.purge`); `false` when jemalloc refuses. RSS falls only by what was
/// dirty: freed memory jemalloc kept for reuse. [`MemoryManager`](crate::MemoryManager)
/// calls this for its gc cycles and measures what it returned.
///
/// ```
/// # #[global_allocator]
/// # static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// drop(vec![1u8; 32 << 20]);
/// assert!(memtel::purge_jemalloc());
/// ```
pub fn purge_jemalloc() -> bool {
    const MALLCTL_ARENAS_ALL: usize = 4096;
    purge_arena(MALLCTL_ARENAS_ALL)
}

/// Purges one arena's dirty pages (`index` 4096: every arena); false if jemalloc refused.
// tikv-jemalloc-ctl has no typed purge, and writing a value to the name fails
// (jemalloc expects none): resolve `arena.0.purge`, point index 1 at the arena and call it
// with no value.
pub(crate) fn purge_arena(index: usize) -> bool {
    let mut mib = [0usize; 3];
    if raw::name_to_mib(b"arena.0.purge\0", &mut mib).is_err() {
        return false;
    }
    mib[1] = index;
    run_mib(&mib)
}

/// Runs a control that takes and returns no value (`arena.<i>.purge`, `arena.<i>.decay`)
/// by its MIB; false if jemalloc refused.
pub(crate) fn run_mib(mib: &[usize]) -> bool {
    // SAFETY: a MIB resolved from a control name; these controls take and return no value.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctlbymib(
            mib.as_ptr(),
            mib.len(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    rc == 0
}

fn is_global_allocator() -> Option<bool> {
    const PROBE: usize = 1 << 20;
    let counter = thread::allocatedp::mib().ok()?.read().ok()?;
    let before = counter.get();
    let probe = std::hint::black_box(Vec::<u8>::with_capacity(PROBE));
    let after = counter.get();
    drop(probe);
    Some(after.wrapping_sub(before) >= PROBE as u64)
}
