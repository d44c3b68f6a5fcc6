//! Telling a leak from a rhythm: sustained growth of a series' floor.
//!
//! Memory that works in rhythms — a sawtooth that fills and clears, a cache that fills to
//! a plateau, a buffer halved when full, a one-off step — moves a lot without leaking. What
//! a leak does is raise the *floor*: the least the series comes back down to. So the window
//! is cut into [`LeakDetection::buckets`] equal spans of time, each reduced to its minimum
//! (at the time it was seen), and a leak is suspected when all of these hold:
//!
//! 1. **Enough data**: at least [`LeakDetection::min_samples`] samples in the window.
//! 2. **A monotonic rise**: the Mann–Kendall test on the floors gives
//!    `Z ≥ `[`LeakDetection::confidence_z`] (2.33: 99 %, one-sided).
//! 3. **Fast enough, and enough**: the Theil–Sen slope of the floors is at least
//!    [`LeakDetection::min_rate_bytes_per_sec`], and over the window it adds up to at least
//!    [`LeakDetection::min_growth_bytes`] (1 MiB): a few kilobytes of bookkeeping filling
//!    up over a short window are not a leak worth a warning.
//! 4. **Sustained, not a step**: in each third of the window the floors' own Theil–Sen
//!    slope is at least [`LeakDetection::persistence`] (a quarter) of the whole window's. A
//!    step rises in one third only; a cache reaching its plateau stops rising in the last.
//! 5. **A line, not noise**: the straight line explains at least [`LeakDetection::min_fit`]
//!    (half) of the floors' variance, so a floor that wanders is not called a leak.
//!
//! The rate reported is the Theil–Sen slope of the floors (bytes per second), whatever the
//! verdict. Buckets must be longer than the rhythms they are to see through: with 18 buckets,
//! a 1-hour window sees through rhythms up to 3 minutes long.

/// The thresholds of leak detection; see the module docs for how each is used. Build one
/// with struct update syntax: `LeakDetection { min_samples: 30, ..Default::default() }`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeakDetection {
    /// Spans the window is cut into, each reduced to its minimum. Default 18.
    pub buckets: usize,
    /// Samples a window needs before anything is suspected. Default 60 (10 minutes at the
    /// default 10 s interval).
    pub min_samples: usize,
    /// The Mann–Kendall Z a rise must reach. Default 2.33 (99 % one-sided).
    pub confidence_z: f64,
    /// The least growth rate called a leak, bytes per second. Default 1 MiB per hour.
    pub min_rate_bytes_per_sec: f64,
    /// The least growth over the window called a leak, bytes. Default 1 MiB.
    pub min_growth_bytes: f64,
    /// The least fraction of the window's slope each third must show. Default 0.25.
    pub persistence: f64,
    /// The least fraction of the floors' variance the line must explain. Default 0.5.
    pub min_fit: f64,
}

impl Default for LeakDetection {
    fn default() -> Self {
        Self {
            buckets: 18,
            min_samples: 60,
            confidence_z: 2.33,
            min_rate_bytes_per_sec: 1_048_576.0 / 3600.0,
            min_growth_bytes: 1_048_576.0,
            persistence: 0.25,
            min_fit: 0.5,
        }
    }
}

/// What [`assess`] found in one series.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Assessment {
    /// The Theil–Sen slope of the floors, bytes per second (0 with too few points).
    pub rate_bytes_per_sec: f64,
    /// Whether the floor shows sustained growth (a leak, for a component).
    pub sustained_growth: bool,
    /// When the floor was last at its starting level (seconds, on the series' time axis):
    /// the growth has run since then. Set only with `sustained_growth`.
    pub since: Option<f64>,
    /// The Mann–Kendall Z of the floors.
    pub z: f64,
    /// The fraction of the floors' variance the Theil–Sen line explains (may be negative).
    pub fit: f64,
}

/// The floor of each of `buckets` equal time spans of `series` (time, value), at the time
/// it was seen; spans without samples are left out. With fewer than two samples per
/// bucket the samples themselves are the floors.
pub fn floors(series: &[(f64, f64)], buckets: usize) -> Vec<(f64, f64)> {
    let (Some(first), Some(last)) = (series.first(), series.last()) else {
        return Vec::new();
    };
    let span = last.0 - first.0;
    if buckets == 0 || series.len() < 2 * buckets || span <= 0.0 {
        return series.to_vec();
    }
    let width = span / buckets as f64;
    let mut out: Vec<Option<(f64, f64)>> = vec![None; buckets];
    for &(t, v) in series {
        let i = (((t - first.0) / width) as usize).min(buckets - 1);
        match out[i] {
            Some((_, m)) if m <= v => {}
            _ => out[i] = Some((t, v)),
        }
    }
    out.into_iter().flatten().collect()
}

/// Assesses one series of (seconds, bytes), in time order, by the rules in the module docs.
///
/// ```
/// use memtel::history::leak::{assess, LeakDetection};
/// // 2 hours at 10 s: a 50 MB sawtooth (period 5 min) over a floor growing 10 MB/h.
/// let series: Vec<(f64, f64)> = (0..720)
///     .map(|i| {
///         let t = i as f64 * 10.0;
///         let floor = 100e6 + t * 10e6 / 3600.0;
///         (t, floor + 50e6 * ((t % 300.0) / 300.0))
///     })
///     .collect();
/// let found = assess(&series, &LeakDetection::default());
/// assert!(found.sustained_growth);
/// assert!((found.rate_bytes_per_sec * 3600.0 / 10e6 - 1.0).abs() < 0.05);
/// ```
pub fn assess(series: &[(f64, f64)], rules: &LeakDetection) -> Assessment {
    let floors = floors(series, rules.buckets);
    let none = Assessment {
        rate_bytes_per_sec: 0.0,
        sustained_growth: false,
        since: None,
        z: 0.0,
        fit: 0.0,
    };
    let Some(rate) = super::stats::theil_sen(&floors) else {
        return none;
    };
    let values: Vec<f64> = floors.iter().map(|&(_, v)| v).collect();
    let z = super::stats::mann_kendall(&values).z;
    let fit = explained(&floors, rate);
    let thirds_rise = floors.len() >= 6
        && floors
            .chunks(floors.len().div_ceil(3))
            .all(|part| super::stats::theil_sen(part).is_some_and(|s| s >= rules.persistence * rate));
    let span = floors.last().map_or(0.0, |l| l.0) - floors[0].0;
    let sustained = series.len() >= rules.min_samples
        && z >= rules.confidence_z
        && rate >= rules.min_rate_bytes_per_sec
        && rate * span >= rules.min_growth_bytes
        && thirds_rise
        && fit >= rules.min_fit;
    let since = sustained.then(|| {
        let start = floors[0].1;
        floors
            .iter()
            .rev()
            .find(|&&(_, v)| v <= start)
            .map_or(floors[0].0, |&(t, _)| t)
    });
    Assessment {
        rate_bytes_per_sec: rate,
        sustained_growth: sustained,
        since,
        z,
        fit,
    }
}

/// 1 − (residual variance ÷ variance) of `points` around the Theil–Sen line of `slope`.
fn explained(points: &[(f64, f64)], slope: f64) -> f64 {
    let Some(b) = super::stats::intercept(points, slope) else {
        return 0.0;
    };
    let mean = points.iter().map(|&(_, y)| y).sum::<f64>() / points.len() as f64;
    let total: f64 = points.iter().map(|&(_, y)| (y - mean).powi(2)).sum();
    if total == 0.0 {
        return 0.0;
    }
    let residual: f64 = points.iter().map(|&(x, y)| (y - (b + slope * x)).powi(2)).sum();
    1.0 - residual / total
}
