//! One measurement of the process's memory: plain data in bytes.
//!
//! A [`Snapshot`] knows nothing of OpenTelemetry, JSON or megabytes; the views in
//! [`otel`](crate::register) and [`http`](crate::router) only convert it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use crate::source::cgroup::CgroupEvents;
pub use crate::source::psi::{Psi, PsiLine};
use crate::Error;

/// One reading of the process's memory, taken by [`MemoryMonitor::snapshot`].
///
/// Every figure is in bytes. A field is `None` where the platform or the build cannot
/// tell (not Linux, jemalloc not the global allocator, a file absent or malformed).
///
/// [`MemoryMonitor::snapshot`]: crate::MemoryMonitor::snapshot
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// When the snapshot was taken (wall clock).
    pub taken_at: SystemTime,
    /// Resident set size: the RAM the process holds now (`/proc/self/statm`).
    pub rss_bytes: Option<u64>,
    /// Virtual size of the address space (`/proc/self/statm`).
    pub virtual_bytes: Option<u64>,
    /// Highest resident set size of this process image since `exec`.
    ///
    /// Never below [`rss_bytes`](Self::rss_bytes) of the same snapshot.
    pub peak_rss_bytes: Option<u64>,
    /// The limit that pressure is measured against.
    pub limit: Option<Limit>,
    /// Live heap bytes. With the tracking allocator: the tracked total, the bytes live
    /// allocations requested (not rounded to size classes) in every component and in none,
    /// so exactly the tracked [`components`](Self::components) plus
    /// [`other_bytes`](Self::other_bytes). Without it: jemalloc's `stats.allocated`.
    ///
    /// jemalloc's own `allocated` (in [`jemalloc`](Self::jemalloc)) is larger in a tracked
    /// process: it counts whole size classes, and the free regions that caches hold for
    /// reuse (the tracking allocator's, [`allocator_cache_bytes`](Self::allocator_cache_bytes),
    /// and jemalloc's thread caches).
    pub heap_allocated_bytes: Option<u64>,
    /// jemalloc's statistics, when jemalloc is the global allocator and built with stats.
    pub jemalloc: Option<JemallocStats>,
    /// The components: tracked ones (interned with [`component`](crate::component)) in
    /// interning order, then reported ones (registered with
    /// [`MemoryMonitor::component`](crate::MemoryMonitor::component)). A name that is
    /// both appears once, with the sum.
    pub components: Vec<ComponentUsage>,
    /// Heap bytes in no component. With the tracking allocator: the tracked bytes
    /// allocated outside every component scope. Without it: the live heap minus the
    /// reported components, floored at 0, and `None` when the live heap is unknown.
    pub other_bytes: Option<u64>,
    /// What [`components`](Self::components) and [`other_bytes`](Self::other_bytes) add
    /// up to: the live heap ([`heap_allocated_bytes`](Self::heap_allocated_bytes)), plus,
    /// with the tracking allocator, the bytes components report (memory outside the Rust
    /// heap, which the allocator cannot see); `None` when the live heap is unknown.
    ///
    /// The parts add up to it exactly, except without the tracking allocator when the
    /// reported components alone exceed the live heap: `other` is then 0 and they add up
    /// to more.
    pub total_bytes: Option<u64>,
    /// Bytes of freed small allocations the tracking allocator keeps in its per-thread
    /// lists for reuse, as [`alloc::cached_bytes`](crate::alloc::cached_bytes) reads them
    /// (tracking allocator only). jemalloc counts them as allocated; no component, nor
    /// `other`, does.
    pub allocator_cache_bytes: Option<u64>,
    /// Cumulative bytes allocated outside every component (tracking allocator only).
    pub other_allocated_total_bytes: Option<u64>,
    /// How the component figures were obtained.
    pub component_source: ComponentSource,
    /// The pressure level: from [`utilization`](Self::utilization) with hysteresis,
    /// raised to at least `warning` by PSI when so configured (see [`next_level`]).
    pub pressure: Pressure,
    /// The utilization thresholds the level is judged against (the monitor's).
    pub thresholds: Thresholds,
    /// The kernel's own signals, at most [`kernel_max_age`] old.
    ///
    /// [`kernel_max_age`]: crate::MemoryMonitorBuilder::kernel_max_age
    pub kernel: Arc<KernelSignals>,
    /// What a [`MemoryManager`](crate::MemoryManager) has done.
    pub actions: Actions,
    /// The monitor's history's trends as of its last judgement, when it has a history
    /// ([`History::refresh`](crate::History::refresh)).
    pub trends: Option<Arc<crate::history::Trends>>,
}

/// The kernel's pressure signals, where the system provides them.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct KernelSignals {
    /// Memory pressure stall information.
    pub psi: Option<Psi>,
    /// Whose PSI: the process's cgroup (v2) or the whole system.
    pub psi_source: Option<PsiSource>,
    /// The process's memory cgroup.
    pub cgroup: Option<CgroupSignals>,
}

/// Whose pressure stall information a snapshot carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PsiSource {
    /// The cgroup's `memory.pressure` (v2).
    Cgroup,
    /// `/proc/pressure/memory`.
    System,
}

impl PsiSource {
    /// `cgroup` or `system`.
    pub fn as_str(self) -> &'static str {
        match self {
            PsiSource::Cgroup => "cgroup",
            PsiSource::System => "system",
        }
    }
}

/// The process's memory cgroup and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CgroupSignals {
    /// 1 or 2.
    pub version: u8,
    /// The group's path in its hierarchy.
    pub path: String,
    /// The tightest hard limit on the path to the root; `None` when unlimited.
    pub limit_bytes: Option<u64>,
    /// The tightest `memory.high` (v2); `None` when unset or v1.
    pub high_bytes: Option<u64>,
    /// Event counters; `None` when unreadable.
    pub events: Option<CgroupEvents>,
}

/// What a [`MemoryManager`](crate::MemoryManager) has done: the counts are zero and
/// the times `None` when no manager runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Actions {
    /// Cleanup cycles run (cleanup hooks fired on entering a pressure level).
    pub cleanup_runs: u64,
    /// Heap bytes the cleanup cycles freed, measured before and after.
    pub cleanup_freed_bytes: u64,
    /// Time since the last cleanup cycle.
    pub last_cleanup_ago: Option<Duration>,
    /// Allocator purges run ("gc cycles").
    pub gc_runs: u64,
    /// Resident bytes the purges returned to the OS, measured before and after.
    pub gc_freed_bytes: u64,
    /// Time since the last purge.
    pub last_gc_ago: Option<Duration>,
}

impl Snapshot {
    /// Resident set size divided by the limit (0..1, above 1 past the limit).
    ///
    /// ```
    /// # #[global_allocator]
    /// # static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
    /// let monitor = memtel::MemoryMonitor::builder().limit_bytes(1 << 40).build();
    /// let snap = monitor.snapshot();
    /// let expected = snap.rss_bytes.unwrap() as f64 / (1u64 << 40) as f64;
    /// assert_eq!(snap.utilization(), Some(expected));
    /// ```
    pub fn utilization(&self) -> Option<f64> {
        utilization(self.rss_bytes, self.limit)
    }
}

pub(crate) fn utilization(rss: Option<u64>, limit: Option<Limit>) -> Option<f64> {
    match (rss, limit) {
        (Some(rss), Some(limit)) if limit.bytes > 0 => Some(rss as f64 / limit.bytes as f64),
        _ => None,
    }
}

/// The live bytes of one component.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ComponentUsage {
    /// The component's name.
    pub name: Arc<str>,
    /// Live bytes: tracked heap bytes, reported bytes, or their sum.
    pub bytes: u64,
    /// Where `bytes` came from.
    pub source: ComponentSource,
    /// Cumulative bytes allocated (tracked components only).
    pub allocated_total_bytes: Option<u64>,
}

/// How component bytes were obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ComponentSource {
    /// Measured by the tracking allocator: exact live heap bytes.
    Tracked,
    /// Returned by the application's callbacks.
    Reported,
    /// Both: tracked heap bytes plus reported bytes.
    Mixed,
}

impl ComponentSource {
    /// The value of `by_component_source` in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentSource::Tracked => "tracked",
            ComponentSource::Reported => "reported",
            ComponentSource::Mixed => "mixed",
        }
    }
}

/// The effective memory limit and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limit {
    /// The limit in bytes.
    pub bytes: u64,
    /// Where the figure came from.
    pub source: LimitSource,
}

impl Limit {
    /// A limit of `bytes` from `source`.
    pub fn new(bytes: u64, source: LimitSource) -> Self {
        Self { bytes, source }
    }
}

/// Where the effective limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitSource {
    /// Set explicitly ([`MemoryMonitorBuilder::limit_bytes`](crate::MemoryMonitorBuilder::limit_bytes), `MEMTEL_LIMIT_MB`).
    Configured,
    /// The process's cgroup memory limit: what the kernel enforces in a container.
    Cgroup,
    /// Physical RAM (`MemTotal` in `/proc/meminfo`).
    System,
}

impl LimitSource {
    /// The value used in JSON (`limit_source`) and in the `memtel.limit.source` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitSource::Configured => "configured",
            LimitSource::Cgroup => "cgroup",
            LimitSource::System => "system",
        }
    }
}

impl fmt::Display for LimitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// jemalloc's own statistics, in bytes.
///
/// jemalloc only refreshes these when its `epoch` is advanced, which is costly and
/// takes a global lock; memtel advances it at most once per
/// [`jemalloc_max_age`](crate::MemoryMonitorBuilder::jemalloc_max_age), and
/// [`age`](Self::age) says how old the figures are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct JemallocStats {
    /// Bytes in live allocations (`stats.allocated`).
    pub allocated: u64,
    /// Bytes in active pages: allocated plus internal fragmentation (`stats.active`).
    pub active: u64,
    /// Bytes in physically resident pages the allocator holds, metadata and
    /// freed-but-not-yet-purged pages included (`stats.resident`).
    pub resident: u64,
    /// Bytes of allocator metadata (`stats.metadata`).
    pub metadata: u64,
    /// Bytes in mapped extents (`stats.mapped`).
    pub mapped: u64,
    /// Virtual memory kept mapped for reuse; not RAM (`stats.retained`).
    pub retained: u64,
    /// How long ago jemalloc's epoch was advanced for these figures.
    pub age: Duration,
}

impl JemallocStats {
    /// `resident ÷ allocated`, the write-up's "fragmentation ratio".
    ///
    /// It measures everything jemalloc holds in RAM beyond the live bytes: page
    /// rounding, size-class slack, metadata, and dirty pages awaiting purge. A freshly
    /// freed large buffer raises it until jemalloc's decay returns the pages.
    /// `None` when nothing is allocated.
    pub fn fragmentation_ratio(&self) -> Option<f64> {
        ratio(self.resident, self.allocated)
    }

    /// `metadata ÷ allocated`: the allocator's bookkeeping cost per live byte.
    pub fn metadata_overhead_ratio(&self) -> Option<f64> {
        ratio(self.metadata, self.allocated)
    }
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

/// How close the process is to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Pressure {
    /// Below the warning threshold (or unknown).
    #[default]
    Normal,
    /// At or above the warning threshold.
    Warning,
    /// At or above the critical threshold.
    Critical,
}

impl Pressure {
    /// Every level, lowest first: the members of the `memtel.memory.pressure` state set.
    pub const ALL: [Pressure; 3] = [Pressure::Normal, Pressure::Warning, Pressure::Critical];

    /// The value used in JSON (`pressure`) and in the `memtel.pressure.level` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Pressure::Normal => "normal",
            Pressure::Warning => "warning",
            Pressure::Critical => "critical",
        }
    }
}

impl fmt::Display for Pressure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Utilization thresholds for the pressure levels, as fractions of the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    warning: f64,
    critical: f64,
}

impl Thresholds {
    /// Thresholds with `0 < warning < critical <= 1`.
    ///
    /// ```
    /// use memtel::Thresholds;
    /// assert!(Thresholds::new(0.80, 0.90).is_ok());
    /// assert!(Thresholds::new(0.90, 0.80).is_err());
    /// assert!(Thresholds::new(0.50, 1.50).is_err());
    /// ```
    pub fn new(warning: f64, critical: f64) -> Result<Self, Error> {
        // NaN fails every comparison, so it is refused here too.
        if warning > 0.0 && warning < critical && critical <= 1.0 {
            Ok(Self { warning, critical })
        } else {
            Err(Error::InvalidThresholds { warning, critical })
        }
    }

    /// The warning threshold (fraction of the limit).
    pub fn warning(&self) -> f64 {
        self.warning
    }

    /// The critical threshold (fraction of the limit).
    pub fn critical(&self) -> f64 {
        self.critical
    }
}

impl Default for Thresholds {
    /// 0.80 and 0.90.
    fn default() -> Self {
        Self {
            warning: 0.80,
            critical: 0.90,
        }
    }
}

/// The pressure level for a utilization: `critical` at or above the critical
/// threshold, `warning` at or above the warning threshold, else `normal`.
/// An unknown utilization is `normal`: memtel never raises an alarm it cannot back.
///
/// ```
/// use memtel::{classify, Pressure, Thresholds};
/// let t = Thresholds::default();
/// assert_eq!(classify(Some(0.79), &t), Pressure::Normal);
/// assert_eq!(classify(Some(0.80), &t), Pressure::Warning);
/// assert_eq!(classify(Some(0.90), &t), Pressure::Critical);
/// assert_eq!(classify(None, &t), Pressure::Normal);
/// ```
pub fn classify(utilization: Option<f64>, thresholds: &Thresholds) -> Pressure {
    match utilization {
        Some(u) if u >= thresholds.critical => Pressure::Critical,
        Some(u) if u >= thresholds.warning => Pressure::Warning,
        _ => Pressure::Normal,
    }
}

/// The next pressure level, with hysteresis: a level is entered at its threshold and
/// left only below its threshold minus `hysteresis` (a fraction of the limit), so a
/// process hovering at a threshold does not flap. When `psi_escalation` is given and
/// PSI `full` avg10 (percent) exceeds it, the level is at least `warning`.
///
/// ```
/// use memtel::{next_level, Pressure, Thresholds};
/// let t = Thresholds::default(); // 0.80, 0.90
/// let level = next_level(Pressure::Normal, Some(0.80), &t, 0.05, None);
/// assert_eq!(level, Pressure::Warning);
/// // Stays in warning until below 0.75.
/// assert_eq!(next_level(level, Some(0.76), &t, 0.05, None), Pressure::Warning);
/// assert_eq!(next_level(level, Some(0.74), &t, 0.05, None), Pressure::Normal);
/// ```
pub fn next_level(
    previous: Pressure,
    utilization: Option<f64>,
    thresholds: &Thresholds,
    hysteresis: f64,
    psi_escalation: Option<(f64, f64)>,
) -> Pressure {
    let entered = classify(utilization, thresholds);
    // Where the previous level would still hold, given the margin.
    let held = match (previous, utilization) {
        (Pressure::Critical, Some(u)) if u >= thresholds.critical - hysteresis => Pressure::Critical,
        (Pressure::Critical | Pressure::Warning, Some(u)) if u >= thresholds.warning - hysteresis => Pressure::Warning,
        _ => Pressure::Normal,
    };
    let level = entered.max(held);
    match psi_escalation {
        Some((full_avg10, limit)) if full_avg10 > limit => level.max(Pressure::Warning),
        _ => level,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_at_the_boundaries() {
        let t = Thresholds::new(0.8, 0.9).unwrap();
        let h = 0.05;
        let step = |prev, u| next_level(prev, Some(u), &t, h, None);
        // Entering happens exactly at each threshold.
        assert_eq!(step(Pressure::Normal, 0.7999), Pressure::Normal);
        assert_eq!(step(Pressure::Normal, 0.80), Pressure::Warning);
        assert_eq!(step(Pressure::Warning, 0.8999), Pressure::Warning);
        assert_eq!(step(Pressure::Warning, 0.90), Pressure::Critical);
        assert_eq!(step(Pressure::Normal, 0.95), Pressure::Critical);
        // Leaving critical only below 0.85, warning only below 0.75.
        assert_eq!(step(Pressure::Critical, 0.8501), Pressure::Critical);
        assert_eq!(step(Pressure::Critical, 0.85), Pressure::Critical);
        assert_eq!(step(Pressure::Critical, 0.8499), Pressure::Warning);
        assert_eq!(step(Pressure::Critical, 0.7501), Pressure::Warning);
        assert_eq!(step(Pressure::Critical, 0.70), Pressure::Normal);
        assert_eq!(step(Pressure::Warning, 0.75), Pressure::Warning);
        assert_eq!(step(Pressure::Warning, 0.7499), Pressure::Normal);
        // A normal process below a threshold does not enter because of the margin.
        assert_eq!(step(Pressure::Normal, 0.78), Pressure::Normal);
        // Unknown utilization holds nothing.
        assert_eq!(next_level(Pressure::Critical, None, &t, h, None), Pressure::Normal);
    }

    #[test]
    fn hovering_at_a_threshold_does_not_flap() {
        let t = Thresholds::new(0.8, 0.9).unwrap();
        let mut level = Pressure::Normal;
        let mut changes = 0;
        for i in 0..100 {
            let u = 0.80 + if i % 2 == 0 { 0.01 } else { -0.02 };
            let next = next_level(level, Some(u), &t, 0.05, None);
            changes += usize::from(next != level);
            level = next;
        }
        assert_eq!(changes, 1, "entered once, never left");
        // Without a margin the same signal flaps on every sample.
        let mut level = Pressure::Normal;
        let mut flaps = 0;
        for i in 0..100 {
            let u = 0.80 + if i % 2 == 0 { 0.01 } else { -0.02 };
            let next = next_level(level, Some(u), &t, 0.0, None);
            flaps += usize::from(next != level);
            level = next;
        }
        assert_eq!(flaps, 100);
    }

    #[test]
    fn psi_full_escalates_to_at_least_warning() {
        let t = Thresholds::default();
        assert_eq!(
            next_level(Pressure::Normal, Some(0.1), &t, 0.05, Some((12.0, 10.0))),
            Pressure::Warning
        );
        assert_eq!(
            next_level(Pressure::Normal, Some(0.1), &t, 0.05, Some((10.0, 10.0))),
            Pressure::Normal
        );
        assert_eq!(
            next_level(Pressure::Normal, Some(0.95), &t, 0.05, Some((50.0, 10.0))),
            Pressure::Critical
        );
    }

    #[test]
    fn classify_at_just_below_and_just_above_each_threshold() {
        let t = Thresholds::new(0.8, 0.9).unwrap();
        let below = |x: f64| x - 1e-9;
        let above = |x: f64| x + 1e-9;
        assert_eq!(classify(Some(below(0.8)), &t), Pressure::Normal);
        assert_eq!(classify(Some(0.8), &t), Pressure::Warning);
        assert_eq!(classify(Some(above(0.8)), &t), Pressure::Warning);
        assert_eq!(classify(Some(below(0.9)), &t), Pressure::Warning);
        assert_eq!(classify(Some(0.9), &t), Pressure::Critical);
        assert_eq!(classify(Some(above(0.9)), &t), Pressure::Critical);
        assert_eq!(classify(Some(1.7), &t), Pressure::Critical);
        assert_eq!(classify(Some(0.0), &t), Pressure::Normal);
    }

    #[test]
    fn thresholds_refuse_bad_orders_and_ranges() {
        for (w, c) in [
            (0.9, 0.8),
            (0.8, 0.8),
            (0.0, 0.5),
            (-0.1, 0.5),
            (0.5, 1.01),
            (f64::NAN, 0.9),
        ] {
            assert!(Thresholds::new(w, c).is_err(), "{w} {c}");
        }
        assert!(Thresholds::new(0.5, 1.0).is_ok());
    }

    #[test]
    fn ratios_are_none_without_allocations() {
        let stats = JemallocStats {
            allocated: 0,
            active: 0,
            resident: 4096,
            metadata: 10,
            mapped: 0,
            retained: 0,
            age: Duration::ZERO,
        };
        assert_eq!(stats.fragmentation_ratio(), None);
        let stats = JemallocStats {
            allocated: 2048,
            ..stats
        };
        assert_eq!(stats.fragmentation_ratio(), Some(2.0));
    }
}
