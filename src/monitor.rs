//! [`MemoryMonitor`]: the sources, the component registry and the latest snapshot.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, TryLockError};
use std::time::{Duration, Instant, SystemTime};

use crate::snapshot::{next_level, Actions, Pressure};
use crate::snapshot::{utilization, ComponentSource, ComponentUsage, Limit, Snapshot, Thresholds};
use crate::source::cgroup::Cgroup;
use crate::source::limit::{self, KernelReading};
use crate::source::{peak::Peak, statm::Statm};
use crate::Error;

/// At most this many components can be registered, so metric attribute sets stay bounded.
pub const MAX_COMPONENTS: usize = 64;

/// The name of the heap remainder, reserved.
pub const OTHER_COMPONENT: &str = "other";

type Report = Box<dyn Fn() -> u64 + Send + Sync>;

struct Component {
    name: Arc<str>,
    report: Report,
}

/// Reads the process's memory and hands out [`Snapshot`]s.
///
/// Cheap to clone (an `Arc` inside): give one to the HTTP router, one to the
/// OpenTelemetry callbacks, one to your own code. Every clone shares the sources,
/// the component registry and the latest snapshot.
///
/// ```
/// # #[global_allocator]
/// # static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// use std::sync::{atomic::{AtomicU64, Ordering}, Arc};
///
/// let monitor = memtel::MemoryMonitor::builder()
///     .limit_bytes(2 << 30)
///     .thresholds(memtel::Thresholds::new(0.80, 0.90)?)
///     .build();
///
/// let cache_bytes = Arc::new(AtomicU64::new(0));
/// let reported = cache_bytes.clone();
/// monitor.component("cache", move || reported.load(Ordering::Relaxed))?;
/// cache_bytes.store(4096, Ordering::Relaxed);
///
/// let snap = monitor.snapshot();
/// assert_eq!(snap.limit.unwrap().bytes, 2 << 30);
/// assert_eq!(snap.components[0].bytes, 4096);
/// # Ok::<(), memtel::Error>(())
/// ```
#[derive(Clone)]
pub struct MemoryMonitor {
    inner: Arc<Inner>,
}

struct Inner {
    statm: Option<Statm>,
    peak: Option<Peak>,
    #[cfg(feature = "jemalloc")]
    jemalloc: Option<crate::source::jemalloc::Jemalloc>,
    jemalloc_max_age: Duration,
    configured_limit: Option<u64>,
    cgroup: Option<Cgroup>,
    kernel: Mutex<(Instant, KernelReading)>,
    kernel_max_age: Duration,
    thresholds: Thresholds,
    hysteresis: f64,
    psi_full_escalation: Option<f64>,
    level: Mutex<Pressure>,
    pub(crate) actions: ActionStats,
    components: RwLock<Vec<Component>>,
    cache_window: Duration,
    latest: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    /// Held by the caller taking a new snapshot.
    retaking: Mutex<()>,
    history: Option<crate::History>,
}

impl std::fmt::Debug for MemoryMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryMonitor")
            .field("limit", &self.limit())
            .field("thresholds", &self.inner.thresholds)
            .field("jemalloc", &self.jemalloc_available())
            .field("cache_window", &self.inner.cache_window)
            .field("jemalloc_max_age", &self.inner.jemalloc_max_age)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryMonitor {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryMonitor {
    /// A monitor with every default: detected limit, thresholds 0.80 / 0.90.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder to set the limit, thresholds and freshness bounds.
    pub fn builder() -> MemoryMonitorBuilder {
        MemoryMonitorBuilder::default()
    }

    /// Registers a component whose live bytes `report` returns.
    ///
    /// `report` is called once per snapshot, so it must be cheap (read an atomic, a
    /// `len()`); a panic in it leaves the component out of that snapshot. Without the
    /// tracking allocator its bytes count as heap bytes: the `other` component is the
    /// live heap minus the sum of all components. With it, reported bytes are taken as
    /// memory the allocator cannot see (`mmap`s, C libraries): they add to their
    /// component and to [`Snapshot::total_bytes`], not to the heap.
    ///
    /// # Errors
    /// A name that is empty, longer than 64 characters or outside `[A-Za-z0-9_.-]`,
    /// `other`, a name already registered, or more than [`MAX_COMPONENTS`].
    pub fn component<F>(&self, name: &str, report: F) -> Result<(), Error>
    where
        F: Fn() -> u64 + Send + Sync + 'static,
    {
        validate_component_name(name)?;
        let mut components = self.inner.components.write().unwrap_or_else(|p| p.into_inner());
        if components.iter().any(|c| &*c.name == name) {
            return Err(Error::DuplicateComponent(name.to_owned()));
        }
        if components.len() >= MAX_COMPONENTS {
            return Err(Error::TooManyComponents { max: MAX_COMPONENTS });
        }
        components.push(Component {
            name: Arc::from(name),
            report: Box::new(report),
        });
        Ok(())
    }

    /// The latest snapshot, taken fresh when the last one is older than the cache
    /// window (5 ms by default).
    ///
    /// OpenTelemetry calls each observable instrument's callback separately; the
    /// window makes every callback of one collection, and one JSON response, read the
    /// same snapshot, so usage, limit and utilization agree with each other.
    ///
    /// One caller at a time takes a new snapshot; a caller that comes while it does gets
    /// the previous one if that is at most two windows old (else it waits). With a
    /// window of zero every caller gets a snapshot taken after its call began.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let window = self.inner.cache_window;
        // The previous snapshot, if it is at most two windows old: what a caller gets
        // while another one retakes it.
        let previous = match self.inner.latest.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some((at, snap)) => {
                let age = at.elapsed();
                if age < window {
                    return Arc::clone(snap);
                }
                (age < self.stand_in_age()).then(|| Arc::clone(snap))
            }
            None => None,
        };
        // One caller at a time reads the sources. The others get the previous snapshot
        // rather than wait for it: a server's worker threads asleep on this lock while a
        // snapshot is taken (about 20 µs) cost more under load than the reading itself.
        let _retaking = match self.inner.retaking.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::WouldBlock) => match previous {
                Some(previous) => return previous,
                None => self.inner.retaking.lock().unwrap_or_else(|p| p.into_inner()),
            },
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        // Another caller may have retaken it while this one waited.
        if let Some((at, snap)) = self.inner.latest.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            if at.elapsed() < window {
                return Arc::clone(snap);
            }
        }
        let snap = Arc::new(self.take());
        *self.inner.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), Arc::clone(&snap)));
        snap
    }

    /// How old a snapshot may be and still stand in for the next one while another caller
    /// takes it (two cache windows): for [`snapshot`](Self::snapshot), and for bodies
    /// rendered from snapshots.
    pub(crate) fn stand_in_age(&self) -> Duration {
        self.inner.cache_window.saturating_mul(2)
    }

    /// The effective limit as last read (re-read every
    /// [`kernel_max_age`](MemoryMonitorBuilder::kernel_max_age)).
    pub fn limit(&self) -> Option<Limit> {
        self.kernel().limit
    }

    /// The kernel reading, refreshed when older than `kernel_max_age`.
    fn kernel(&self) -> KernelReading {
        let mut kernel = self.inner.kernel.lock().unwrap_or_else(|p| p.into_inner());
        if kernel.0.elapsed() >= self.inner.kernel_max_age {
            *kernel = (
                Instant::now(),
                limit::read_live(self.inner.cgroup.as_ref(), self.inner.configured_limit),
            );
        }
        kernel.1.clone()
    }

    /// The pressure thresholds.
    pub fn thresholds(&self) -> Thresholds {
        self.inner.thresholds
    }

    /// The history this monitor was built with ([`MemoryMonitorBuilder::history`]).
    pub fn history(&self) -> Option<&crate::History> {
        self.inner.history.as_ref()
    }

    /// Whether jemalloc is the global allocator and its stats are available.
    pub fn jemalloc_available(&self) -> bool {
        #[cfg(feature = "jemalloc")]
        {
            self.inner.jemalloc.is_some()
        }
        #[cfg(not(feature = "jemalloc"))]
        {
            false
        }
    }

    fn take(&self) -> Snapshot {
        let inner = &*self.inner;
        let taken_at = SystemTime::now();
        let statm = inner.statm.as_ref().and_then(Statm::read);
        let rss = statm.map(|s| s.resident_bytes);
        // Both high-water figures are updated lazily: never report a peak below now.
        let peak = inner
            .peak
            .as_ref()
            .and_then(Peak::read)
            .map(|p| p.max(rss.unwrap_or(0)));
        #[cfg(feature = "jemalloc")]
        let jemalloc = inner.jemalloc.as_ref().and_then(|j| j.read(inner.jemalloc_max_age));
        #[cfg(not(feature = "jemalloc"))]
        let jemalloc: Option<crate::snapshot::JemallocStats> = None;
        let kernel = self.kernel();
        let components = self.components();
        let tracked = crate::alloc::tracking_installed();
        let untagged = tracked.then(|| crate::alloc::counters::totals(0));
        let (heap, other, total) = match untagged {
            // The heap is the sum of the very counter readings the components and `other`
            // show, so the parts add up to it exactly whatever runs meanwhile. jemalloc's
            // `allocated` would not: it counts size classes and cached free regions, and
            // is up to `jemalloc_max_age` older than the counters.
            Some((allocated, freed)) => {
                let other = allocated.saturating_sub(freed);
                let heap = other.saturating_add(components.tracked_live);
                // Reported bytes in a tracked process are memory the allocator cannot see.
                (
                    Some(heap),
                    Some(other),
                    Some(heap.saturating_add(components.reported_total)),
                )
            }
            None => {
                let heap = jemalloc.map(|j| j.allocated);
                (heap, heap.map(|h| h.saturating_sub(components.reported_total)), heap)
            }
        };

        Snapshot {
            taken_at,
            rss_bytes: rss,
            virtual_bytes: statm.map(|s| s.virtual_bytes),
            peak_rss_bytes: peak,
            limit: kernel.limit,
            heap_allocated_bytes: heap,
            jemalloc,
            components: components.usage,
            other_bytes: other,
            total_bytes: total,
            allocator_cache_bytes: tracked.then(crate::alloc::cached_bytes),
            other_allocated_total_bytes: untagged.map(|(allocated, _)| allocated),
            component_source: components.source,
            pressure: self.level(utilization(rss, kernel.limit), &kernel, rss),
            thresholds: inner.thresholds,
            actions: inner.actions.read(),
            kernel: kernel.signals,
            trends: inner.history.as_ref().and_then(crate::History::latest_trends),
        }
    }

    #[cfg(feature = "manager")]
    pub(crate) fn inner_actions(&self) -> &ActionStats {
        &self.inner.actions
    }

    #[cfg(feature = "manager")]
    /// Live heap bytes right now: a fresh jemalloc reading, or the tracked total.
    pub(crate) fn heap_bytes_now(&self) -> Option<u64> {
        #[cfg(feature = "jemalloc")]
        if let Some(stats) = self.inner.jemalloc.as_ref().and_then(|j| j.read(Duration::ZERO)) {
            return Some(stats.allocated);
        }
        crate::alloc::tracking_installed().then(crate::alloc::counters::live_total)
    }

    #[cfg(feature = "manager")]
    /// Purges every jemalloc arena; jemalloc's resident bytes (before, after).
    pub(crate) fn purge(&self) -> Option<(u64, u64)> {
        #[cfg(feature = "jemalloc")]
        {
            let jemalloc = self.inner.jemalloc.as_ref()?;
            let before = jemalloc.read(Duration::ZERO)?.resident;
            if !crate::source::jemalloc::purge_jemalloc() {
                return None;
            }
            let after = jemalloc.read(Duration::ZERO)?.resident;
            Some((before, after))
        }
        #[cfg(not(feature = "jemalloc"))]
        None
    }

    /// The next pressure level (hysteresis, PSI escalation); a change is logged.
    fn level(&self, utilization: Option<f64>, kernel: &KernelReading, rss: Option<u64>) -> Pressure {
        let inner = &*self.inner;
        let psi = inner
            .psi_full_escalation
            .and_then(|limit| Some((kernel.signals.psi?.full?.avg10, limit)));
        let mut level = inner.level.lock().unwrap_or_else(|p| p.into_inner());
        let previous = *level;
        let next = next_level(previous, utilization, &inner.thresholds, inner.hysteresis, psi);
        *level = next;
        if next != previous {
            let limit = kernel.limit.map(|l| l.bytes);
            let psi_full_avg10 = psi.map(|(avg10, _)| avg10);
            match next {
                Pressure::Critical => tracing::error!(
                    target: "memtel::pressure", level = %next, from = %previous, usage_bytes = rss,
                    limit_bytes = limit, utilization, psi_full_avg10, "memory pressure critical"
                ),
                Pressure::Warning if previous == Pressure::Normal => tracing::warn!(
                    target: "memtel::pressure", level = %next, from = %previous, usage_bytes = rss,
                    limit_bytes = limit, utilization, psi_full_avg10, "memory pressure warning"
                ),
                _ => tracing::info!(
                    target: "memtel::pressure", level = %next, from = %previous, usage_bytes = rss,
                    limit_bytes = limit, utilization, psi_full_avg10, "memory pressure eased"
                ),
            }
        }
        next
    }

    /// Tracked components (when the tracking allocator is installed) merged by name
    /// with the reported ones.
    fn components(&self) -> Components {
        let mut list: Vec<ComponentUsage> = Vec::new();
        let mut tracked_live = 0u64;
        let tracked = crate::alloc::tracking_installed();
        if tracked {
            crate::alloc::for_each_component(|slot, name| {
                let (allocated, freed) = crate::alloc::counters::totals(usize::from(slot));
                let live = allocated.saturating_sub(freed);
                tracked_live = tracked_live.saturating_add(live);
                list.push(ComponentUsage {
                    name: Arc::clone(name),
                    bytes: live,
                    source: ComponentSource::Tracked,
                    allocated_total_bytes: Some(allocated),
                });
            });
        }
        let mut reported_total = 0u64;
        let registry = self.inner.components.read().unwrap_or_else(|p| p.into_inner());
        for c in registry.iter() {
            // A panicking callback leaves its component out of this snapshot.
            let Ok(bytes) = catch_unwind(AssertUnwindSafe(|| (c.report)())) else {
                continue;
            };
            reported_total = reported_total.saturating_add(bytes);
            match list.iter_mut().find(|u| u.name == c.name) {
                Some(usage) => {
                    usage.bytes = usage.bytes.saturating_add(bytes);
                    usage.source = ComponentSource::Mixed;
                }
                None => list.push(ComponentUsage {
                    name: Arc::clone(&c.name),
                    bytes,
                    source: ComponentSource::Reported,
                    allocated_total_bytes: None,
                }),
            }
        }
        let source = match (tracked, registry.is_empty()) {
            (false, _) => ComponentSource::Reported,
            (true, true) => ComponentSource::Tracked,
            (true, false) => ComponentSource::Mixed,
        };
        Components {
            usage: list,
            tracked_live,
            reported_total,
            source,
        }
    }
}

/// Actions taken by a manager, shared with every snapshot. Lock-free: every snapshot
/// reads it, and a manager writes it at most once per cooldown.
#[derive(Debug)]
pub(crate) struct ActionStats {
    /// What the action times are measured from.
    base: Instant,
    cleanup: ActionCounter,
    gc: ActionCounter,
}

impl Default for ActionStats {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            cleanup: ActionCounter::default(),
            gc: ActionCounter::default(),
        }
    }
}

#[derive(Debug, Default)]
struct ActionCounter {
    runs: AtomicU64,
    freed: AtomicU64,
    /// When it last ran, as nanoseconds after `base` plus one; 0 = never.
    last: AtomicU64,
}

impl ActionCounter {
    #[cfg(feature = "manager")]
    fn record(&self, base: Instant, freed: u64) {
        self.runs.fetch_add(1, Relaxed);
        self.freed.fetch_add(freed, Relaxed);
        let since_base = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last.store(since_base + 1, Relaxed);
    }

    fn read(&self, base: Instant) -> (u64, u64, Option<Duration>) {
        let last = match self.last.load(Relaxed) {
            0 => None,
            at => Some(base.elapsed().saturating_sub(Duration::from_nanos(at - 1))),
        };
        (self.runs.load(Relaxed), self.freed.load(Relaxed), last)
    }
}

impl ActionStats {
    #[cfg(feature = "manager")]
    pub(crate) fn record_cleanup(&self, freed: u64) {
        self.cleanup.record(self.base, freed);
    }

    #[cfg(feature = "manager")]
    pub(crate) fn record_gc(&self, freed: u64) {
        self.gc.record(self.base, freed);
    }

    fn read(&self) -> Actions {
        let (cleanup_runs, cleanup_freed_bytes, last_cleanup_ago) = self.cleanup.read(self.base);
        let (gc_runs, gc_freed_bytes, last_gc_ago) = self.gc.read(self.base);
        Actions {
            cleanup_runs,
            cleanup_freed_bytes,
            last_cleanup_ago,
            gc_runs,
            gc_freed_bytes,
            last_gc_ago,
        }
    }
}

/// Component figures of one snapshot, before they become `ComponentUsage`s.
struct Components {
    usage: Vec<ComponentUsage>,
    /// Σ tracked live bytes.
    tracked_live: u64,
    /// Σ reported bytes.
    reported_total: u64,
    source: ComponentSource,
}

pub(crate) fn validate_component_name(name: &str) -> Result<(), Error> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if name.is_empty() || name.len() > 64 || !valid_chars {
        return Err(Error::InvalidComponentName(name.to_owned()));
    }
    if name == OTHER_COMPONENT {
        return Err(Error::ReservedComponentName(name.to_owned()));
    }
    Ok(())
}

/// Builds a [`MemoryMonitor`].
#[derive(Debug, Clone)]
pub struct MemoryMonitorBuilder {
    limit_bytes: Option<u64>,
    thresholds: Thresholds,
    hysteresis: f64,
    psi_full_escalation: Option<f64>,
    cache_window: Duration,
    jemalloc_max_age: Duration,
    kernel_max_age: Duration,
    history: Option<crate::History>,
}

impl Default for MemoryMonitorBuilder {
    fn default() -> Self {
        Self {
            limit_bytes: None,
            thresholds: Thresholds::default(),
            hysteresis: 0.05,
            psi_full_escalation: None,
            cache_window: Duration::from_millis(5),
            jemalloc_max_age: Duration::from_millis(100),
            kernel_max_age: Duration::from_secs(1),
            history: None,
        }
    }
}

impl MemoryMonitorBuilder {
    /// An explicit limit (source `configured`). Defaults to the cgroup's limit when
    /// the process runs in a limited cgroup, else physical RAM.
    pub fn limit_bytes(mut self, bytes: u64) -> Self {
        self.limit_bytes = Some(bytes);
        self
    }

    /// Pressure thresholds. Defaults to 0.80 (warning) and 0.90 (critical).
    pub fn thresholds(mut self, thresholds: Thresholds) -> Self {
        self.thresholds = thresholds;
        self
    }

    /// How far below a threshold (as a fraction of the limit) utilization must fall
    /// before its level is left, so the level does not flap. Defaults to 0.05.
    /// Values outside `0..=1` are clamped.
    pub fn hysteresis(mut self, margin: f64) -> Self {
        self.hysteresis = if margin.is_finite() {
            margin.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Raise the level to at least `warning` while PSI `full` avg10 (percent of time
    /// all tasks stalled on memory) exceeds `percent`. Off by default.
    pub fn psi_full_escalation(mut self, percent: f64) -> Self {
        self.psi_full_escalation = Some(percent);
        self
    }

    /// How often the limit and the kernel's signals (PSI, cgroup events) are re-read.
    /// Defaults to 1 s: limits change under in-place resize, and PSI averages only
    /// move every 2 s.
    pub fn kernel_max_age(mut self, max_age: Duration) -> Self {
        self.kernel_max_age = max_age;
        self
    }

    /// How long a snapshot is reused. Defaults to 5 ms: long enough for every
    /// callback of one OpenTelemetry collection to share one snapshot, short enough
    /// that every scrape and every request sees a fresh one. `Duration::ZERO` reads
    /// the sources on every call.
    pub fn cache_window(mut self, window: Duration) -> Self {
        self.cache_window = window;
        self
    }

    /// The oldest jemalloc figures a snapshot may carry. Defaults to 100 ms.
    ///
    /// jemalloc's stats only move when its `epoch` is advanced, which costs tens of
    /// microseconds under a global lock; under a burst of requests it is advanced at
    /// most once per this bound, and [`JemallocStats::age`](crate::JemallocStats::age)
    /// says how old the figures are. `Duration::ZERO` advances it for every snapshot.
    pub fn jemalloc_max_age(mut self, max_age: Duration) -> Self {
        self.jemalloc_max_age = max_age;
        self
    }

    /// Opens the sources and detects the limit. Never fails: what cannot be read is
    /// `None` in every snapshot.
    /// Keeps `history` with the monitor: the history routes of
    /// [`router`](crate::router) serve it, the trend metrics read it, and every snapshot
    /// carries its latest trends. Recording is the history's own
    /// ([`History::record`](crate::History::record), or
    /// [`History::spawn_recorder`](crate::History::spawn_recorder)).
    pub fn history(mut self, history: crate::History) -> Self {
        self.history = Some(history);
        self
    }

    /// Builds the monitor.
    pub fn build(self) -> MemoryMonitor {
        let cgroup = limit::discover_live();
        let kernel = limit::read_live(cgroup.as_ref(), self.limit_bytes);
        MemoryMonitor {
            inner: Arc::new(Inner {
                statm: Statm::open(),
                peak: Peak::open(),
                #[cfg(feature = "jemalloc")]
                jemalloc: crate::source::jemalloc::Jemalloc::detect(),
                jemalloc_max_age: self.jemalloc_max_age,
                configured_limit: self.limit_bytes,
                cgroup,
                kernel: Mutex::new((Instant::now(), kernel)),
                kernel_max_age: self.kernel_max_age,
                thresholds: self.thresholds,
                hysteresis: self.hysteresis,
                psi_full_escalation: self.psi_full_escalation,
                level: Mutex::new(Pressure::Normal),
                actions: ActionStats::default(),
                components: RwLock::new(Vec::new()),
                cache_window: self.cache_window,
                latest: Mutex::new(None),
                retaking: Mutex::new(()),
                history: self.history,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_names_are_validated() {
        let m = MemoryMonitor::builder().limit_bytes(1 << 30).build();
        assert!(m.component("cache", || 1).is_ok());
        assert_eq!(
            m.component("cache", || 1),
            Err(Error::DuplicateComponent("cache".into()))
        );
        assert_eq!(
            m.component("other", || 1),
            Err(Error::ReservedComponentName("other".into()))
        );
        assert!(matches!(m.component("", || 1), Err(Error::InvalidComponentName(_))));
        assert!(matches!(m.component("a b", || 1), Err(Error::InvalidComponentName(_))));
        for i in 1..MAX_COMPONENTS {
            m.component(&format!("c{i}"), || 0).unwrap();
        }
        assert_eq!(
            m.component("one-more", || 0),
            Err(Error::TooManyComponents { max: MAX_COMPONENTS })
        );
    }

    #[test]
    fn a_panicking_component_is_left_out() {
        let m = MemoryMonitor::builder().cache_window(Duration::ZERO).build();
        m.component("bad", || panic!("boom")).unwrap();
        m.component("good", || 7).unwrap();
        let snap = m.snapshot();
        assert_eq!(snap.components.len(), 1);
        assert_eq!(snap.components[0].bytes, 7);
    }

    /// A caller that comes while another takes a snapshot: given the snapshot the taker
    /// replaces, taken `age` ago, what it gets, and what the taker got.
    fn meanwhile(window: Duration, age: Duration) -> (Arc<Snapshot>, Arc<Snapshot>, Arc<Snapshot>) {
        use std::sync::atomic::AtomicBool;
        let m = MemoryMonitor::builder().cache_window(window).build();
        let during = Arc::new(AtomicBool::new(false));
        let other = Arc::new(Mutex::new(None));
        let (m2, during2, other2) = (m.clone(), Arc::clone(&during), Arc::clone(&other));
        m.component("probe", move || {
            if during2.swap(false, Relaxed) {
                let m3 = m2.clone();
                *other2.lock().unwrap() = Some(std::thread::spawn(move || m3.snapshot()));
                // Long enough for it to find the snapshot being taken.
                std::thread::sleep(Duration::from_millis(200));
            }
            0
        })
        .unwrap();
        let before = m.snapshot();
        std::thread::sleep(age);
        during.store(true, Relaxed);
        let taken = m.snapshot();
        let got = other.lock().unwrap().take().unwrap().join().unwrap();
        (before, taken, got)
    }

    #[test]
    fn a_caller_gets_the_previous_snapshot_while_another_takes_one() {
        let (before, taken, got) = meanwhile(Duration::from_secs(2), Duration::from_millis(2100));
        assert!(!Arc::ptr_eq(&before, &taken));
        assert!(Arc::ptr_eq(&got, &before), "it did not wait");
    }

    #[test]
    fn a_caller_waits_when_the_previous_snapshot_is_older_than_two_windows() {
        let (before, taken, got) = meanwhile(Duration::from_millis(300), Duration::from_millis(700));
        assert!(!Arc::ptr_eq(&before, &taken));
        assert!(Arc::ptr_eq(&got, &taken), "it got a snapshot older than two windows");
    }

    #[test]
    fn snapshots_are_reused_within_the_window() {
        let m = MemoryMonitor::builder().cache_window(Duration::from_secs(60)).build();
        let a = m.snapshot();
        let b = m.snapshot();
        assert!(Arc::ptr_eq(&a, &b));
        let fresh = MemoryMonitor::builder().cache_window(Duration::ZERO).build();
        assert!(!Arc::ptr_eq(&fresh.snapshot(), &fresh.snapshot()));
    }
}
