//! Memory over time: bounded history, trends, leak detection and recommendations.
//!
//! A [`History`] records one sample per interval (10 s by default) from the monitor's
//! snapshot — RSS, peak, heap, limit, pressure and every component's bytes — into bounded
//! multi-resolution storage (see `store`), and answers:
//!
//! - [`History::samples`]: the samples of a window, optionally averaged into steps;
//! - [`History::trends`]: growth rates of the process and of each component, leaks
//!   suspected by the rules in [`leak`], the time until the limit at the current rate.
//!
//! ```
//! # #[global_allocator]
//! # static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
//! use std::time::Duration;
//! use memtel::history::{History, HistoryConfig};
//!
//! let history = History::new(HistoryConfig::default().interval(Duration::from_secs(1)))?;
//! let monitor = memtel::MemoryMonitor::builder().history(history.clone()).build();
//! history.record(&monitor.snapshot());
//! let recent = history.samples(Duration::from_secs(60), None)?;
//! assert_eq!(recent.samples.len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! With the `manager` feature, [`History::spawn_recorder`] records on a Tokio interval.

#[cfg(feature = "http")]
mod advice;
pub mod leak;
pub mod stats;
mod store;
mod trends;
#[cfg(feature = "http")]
mod view;

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::snapshot::{Pressure, Snapshot};
use crate::Error;

pub use leak::{Assessment, LeakDetection};
pub use trends::{ComponentTrend, Trends};
#[cfg(feature = "http")]
pub(crate) use view::{history as history_route, trends as trends_route, Views};
#[cfg(feature = "http")]
pub use view::{
    AnomalyDoc, ComponentTrendDoc, HistoryDocument, HistorySampleDoc, TrendsDocument, TrendsSummaryDoc, HISTORY_PATH,
    TRENDS_PATH,
};

/// How a [`History`] records and judges.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct HistoryConfig {
    /// Time between two samples. Default 10 s.
    pub interval: Duration,
    /// How long samples are kept (older ones as aggregates). Default 24 h.
    pub retention: Duration,
    /// The window trends are judged over when none is asked for (the metrics, the leak
    /// events): [`DEFAULT_TREND_SAMPLES`] intervals, 1 h at the default interval.
    pub trend_window: Duration,
    /// The leak detection rules.
    pub leak: LeakDetection,
}

/// Samples in the default trend window.
pub const DEFAULT_TREND_SAMPLES: u32 = 360;

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            retention: Duration::from_secs(24 * 3600),
            trend_window: Duration::from_secs(10) * DEFAULT_TREND_SAMPLES,
            leak: LeakDetection::default(),
        }
    }
}

impl HistoryConfig {
    /// Sets the sampling interval; the default trend window follows it (360 intervals)
    /// unless set after this.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self.trend_window = interval * DEFAULT_TREND_SAMPLES;
        self
    }

    /// Sets how long samples are kept.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets the default trend window.
    pub fn trend_window(mut self, window: Duration) -> Self {
        self.trend_window = window;
        self
    }

    /// Sets the leak detection rules.
    pub fn leak_detection(mut self, rules: LeakDetection) -> Self {
        self.leak = rules;
        self
    }
}

/// A figure over a span of samples: its least, mean and greatest value, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Stat {
    /// The least value.
    pub min: u64,
    /// The mean of the values.
    pub mean: f64,
    /// The greatest value.
    pub max: u64,
}

/// One sample, or the aggregate of the samples of one span.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Sample {
    /// The sample's time, or the span's start.
    pub at: SystemTime,
    /// How many recorded samples this aggregates.
    pub samples: u32,
    /// Resident set size.
    pub rss: Option<Stat>,
    /// Peak resident set size.
    pub peak: Option<Stat>,
    /// The live heap (the snapshot's `total_bytes`).
    pub heap: Option<Stat>,
    /// The effective limit.
    pub limit: Option<Stat>,
    /// The highest pressure level seen.
    pub pressure: Pressure,
    /// Each component's bytes (`other` included), in the order first seen.
    pub components: Vec<(Arc<str>, Stat)>,
}

/// The samples of a window ([`History::samples`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Samples {
    /// Time between two samples returned: the recording interval, a tier's span, or
    /// the step asked for.
    pub spacing: Duration,
    /// The samples, oldest first.
    pub samples: Vec<Sample>,
}

/// A query the history cannot answer; names the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// `window` is zero or longer than the retention.
    #[error("window: {0}")]
    Window(String),
    /// `step` is zero, longer than the window, or finer than the samples kept.
    #[error("step: {0}")]
    Step(String),
}

/// The trends as of the latest judgement, and the components suspected then.
type Latest = (Option<Arc<Trends>>, Vec<Arc<str>>);

/// The recorded history of one monitor; cheap to clone (shared).
#[derive(Clone)]
pub struct History {
    inner: Arc<Inner>,
}

struct Inner {
    config: HistoryConfig,
    store: RwLock<store::Store>,
    /// The trends over the default window as of the latest sample, and the components
    /// suspected then (for the events on change).
    latest: Mutex<Latest>,
    /// Samples recorded so far: what the trends cache (and the routes' bodies) are keyed on.
    records: std::sync::atomic::AtomicU64,
    /// The last trends judged, and for which window and record count: polls between two
    /// samples share one judgement (the recorder's refresh and the trends route). The
    /// history route keeps its rendered bodies itself (`view::Views`).
    trends_cache: Mutex<Option<(Duration, u64, Arc<Trends>)>>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, ms)
}

impl History {
    /// A history recording every `config.interval`, keeping `config.retention`.
    ///
    /// # Errors
    /// [`Error::InvalidHistory`] for an interval under 1 ms, a retention shorter than the
    /// interval, or a trend window shorter than two intervals.
    pub fn new(config: HistoryConfig) -> Result<Self, Error> {
        if config.interval < Duration::from_millis(1) {
            return Err(Error::InvalidHistory("the interval must be at least 1ms".into()));
        }
        if config.retention < config.interval {
            return Err(Error::InvalidHistory(
                "the retention must be at least one interval".into(),
            ));
        }
        if config.trend_window < 2 * config.interval {
            return Err(Error::InvalidHistory(
                "the trend window must span at least two intervals".into(),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store: RwLock::new(store::Store::new(ms(config.interval), ms(config.retention))),
                config,
                latest: Mutex::new((None, Vec::new())),
                records: std::sync::atomic::AtomicU64::new(0),
                trends_cache: Mutex::new(None),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HistoryConfig {
        &self.inner.config
    }

    /// Records one sample from `snap`. Its cost is a few hundred bytes copied; judging
    /// trends is [`refresh`](Self::refresh).
    pub fn record(&self, snap: &Snapshot) {
        let mut components: Vec<(Arc<str>, u64)> =
            snap.components.iter().map(|c| (Arc::clone(&c.name), c.bytes)).collect();
        if let Some(other) = snap.other_bytes {
            components.push((Arc::from(crate::OTHER_COMPONENT), other));
        }
        let record = store::Record {
            at_ms: unix_ms(snap.taken_at),
            fixed: [
                snap.rss_bytes,
                snap.peak_rss_bytes,
                snap.total_bytes,
                snap.limit.map(|l| l.bytes),
            ],
            pressure: level(snap.pressure),
            components: &components,
        };
        self.inner.store.write().unwrap_or_else(|p| p.into_inner()).add(&record);
        self.inner.records.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn records(&self) -> u64 {
        self.inner.records.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Judges the trends over the default window as of now, keeps them for
    /// [`latest_trends`](Self::latest_trends) (the metrics read them), and logs a `tracing`
    /// warning when a component becomes suspected of leaking, an info event when it clears.
    pub fn refresh(&self) -> Option<Arc<Trends>> {
        let trends = self.trends(self.inner.config.trend_window).ok().map(Arc::new);
        let mut latest = self.inner.latest.lock().unwrap_or_else(|p| p.into_inner());
        let suspected: Vec<Arc<str>> = trends.as_ref().map_or_else(Vec::new, |t| {
            t.components
                .iter()
                .filter(|c| c.growth.sustained_growth)
                .map(|c| Arc::clone(&c.name))
                .collect()
        });
        if let Some(t) = &trends {
            for c in t.components.iter().filter(|c| c.growth.sustained_growth) {
                if !latest.1.contains(&c.name) {
                    tracing::warn!(
                        component = &*c.name,
                        growth_rate_mb_per_hour = c.growth.rate_bytes_per_sec * 3600.0 / 1_048_576.0,
                        window_secs = t.window.as_secs_f64(),
                        "memory leak suspected: the component's floor keeps rising"
                    );
                }
            }
        }
        for name in latest.1.iter().filter(|n| !suspected.contains(n)) {
            tracing::info!(component = &**name, "memory leak no longer suspected");
        }
        *latest = (trends.clone(), suspected);
        trends
    }

    /// The trends as of the last [`refresh`](Self::refresh).
    pub fn latest_trends(&self) -> Option<Arc<Trends>> {
        self.inner.latest.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// The samples of the last `window`, oldest first, at the finest resolution kept for
    /// that far back; with `step`, averaged into spans of `step` aligned to the Unix epoch
    /// (the mean of the samples in each; min and max over them).
    ///
    /// # Errors
    /// A zero window or one longer than the retention; a zero step, one longer than the
    /// window, or one finer than the resolution kept for the window.
    pub fn samples(&self, window: Duration, step: Option<Duration>) -> Result<Samples, QueryError> {
        self.check_window(window)?;
        let store = self.inner.store.read().unwrap_or_else(|p| p.into_inner());
        let now = unix_ms(SystemTime::now());
        let (spacing, points) = store.points_since(now.saturating_sub(ms(window)), now);
        let names = store.names();
        let Some(step) = step else {
            return Ok(Samples {
                spacing: Duration::from_millis(spacing),
                samples: points.iter().map(|p| sample(p, names)).collect(),
            });
        };
        if step.is_zero() || step > window {
            return Err(QueryError::Step("must be above zero and at most the window".into()));
        }
        if ms(step) < spacing {
            return Err(QueryError::Step(format!(
                "finer than the {} ms resolution kept for this window",
                spacing
            )));
        }
        let step_ms = ms(step);
        let mut merged: Vec<store::Point> = Vec::new();
        for p in points {
            let start = p.start_ms - p.start_ms % step_ms;
            match merged.last_mut() {
                Some(last) if last.start_ms == start => store::merge(last, p),
                _ => {
                    let mut fresh = p.clone();
                    fresh.start_ms = start;
                    merged.push(fresh);
                }
            }
        }
        Ok(Samples {
            spacing: step,
            samples: merged.iter().map(|p| sample(p, names)).collect(),
        })
    }

    /// The trends over the last `window` (see [`Trends`] and [`leak`]).
    ///
    /// # Errors
    /// A zero window or one longer than the retention.
    pub fn trends(&self, window: Duration) -> Result<Trends, QueryError> {
        self.check_window(window)?;
        let records = self.records();
        if let Some((_, _, cached)) = self
            .inner
            .trends_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(w, r, _)| *w == window && *r == records)
        {
            return Ok((**cached).clone());
        }
        let judged = {
            let store = self.inner.store.read().unwrap_or_else(|p| p.into_inner());
            let now = unix_ms(SystemTime::now());
            let (_, points) = store.points_since(now.saturating_sub(ms(window)), now);
            trends::judge(window, &points, store.names(), &self.inner.config.leak)
        };
        *self.inner.trends_cache.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((window, records, Arc::new(judged.clone())));
        Ok(judged)
    }

    /// Bytes the history holds on the heap, by its own count (see README for the bound).
    pub fn heap_bytes(&self) -> usize {
        self.inner.store.read().unwrap_or_else(|p| p.into_inner()).heap_bytes()
    }

    fn check_window(&self, window: Duration) -> Result<(), QueryError> {
        if window.is_zero() {
            return Err(QueryError::Window("must be above zero".into()));
        }
        if window > self.inner.config.retention {
            return Err(QueryError::Window(format!(
                "longer than the retention ({})",
                humantime_like(self.inner.config.retention)
            )));
        }
        Ok(())
    }
}

/// A duration as seconds, minutes or hours, for messages.
fn humantime_like(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

fn level(p: Pressure) -> u8 {
    match p {
        Pressure::Normal => 0,
        Pressure::Warning => 1,
        _ => 2,
    }
}

fn pressure_of(level: u8) -> Pressure {
    match level {
        0 => Pressure::Normal,
        1 => Pressure::Warning,
        _ => Pressure::Critical,
    }
}

fn stat(agg: &store::Agg) -> Option<Stat> {
    Some(Stat {
        min: agg.min,
        mean: agg.mean()?,
        max: agg.max,
    })
}

fn sample(p: &store::Point, names: &[Arc<str>]) -> Sample {
    let v = &p.values;
    Sample {
        at: UNIX_EPOCH + Duration::from_millis(p.start_ms),
        samples: p.count,
        rss: stat(&v[0]),
        peak: stat(&v[1]),
        heap: stat(&v[2]),
        limit: stat(&v[3]),
        pressure: pressure_of(p.pressure),
        components: names
            .iter()
            .zip(v.iter().skip(store::FIXED))
            .filter_map(|(n, agg)| Some((Arc::clone(n), stat(agg)?)))
            .collect(),
    }
}

#[cfg(feature = "manager")]
impl History {
    /// Spawns a Tokio task that records a sample of `monitor` every interval and judges
    /// the trends after each ([`refresh`](Self::refresh)).
    pub fn spawn_recorder(&self, monitor: crate::MemoryMonitor) -> tokio::task::JoinHandle<()> {
        let history = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(history.inner.config.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                history.record(&monitor.snapshot());
                history.refresh();
            }
        })
    }
}
