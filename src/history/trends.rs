//! Trends over a window of the history: growth rates, suspected leaks, time to the limit.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::leak::{assess, Assessment, LeakDetection};
use super::store::{Point, FIXED};

/// What the history shows over one window ([`History::trends`](super::History::trends)).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Trends {
    /// The window asked for.
    pub window: Duration,
    /// Recorded samples in the window.
    pub samples: u64,
    /// The process's resident set size: its growth and whether it is sustained.
    pub growth: Assessment,
    /// Resident set size at the newest sample.
    pub usage_bytes: Option<u64>,
    /// The limit at the newest sample.
    pub limit_bytes: Option<u64>,
    /// At the current rate, how long until RSS reaches the limit: only while RSS shows
    /// sustained growth and a limit is known.
    pub time_to_limit: Option<Duration>,
    /// Each component's trend (`other` included).
    pub components: Vec<ComponentTrend>,
    /// Times the pressure rose from normal in the window.
    pub pressure_episodes: u32,
    /// The highest RSS in the window.
    pub peak_bytes: Option<u64>,
    /// When the window's first sample was taken.
    pub first_sample: Option<SystemTime>,
}

/// One component's trend.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ComponentTrend {
    /// The component.
    pub name: Arc<str>,
    /// Its growth; `sustained_growth` is a suspected leak.
    pub growth: Assessment,
    /// Its bytes at the newest sample.
    pub bytes: Option<u64>,
}

impl ComponentTrend {
    /// Whether a leak is suspected (sustained growth of the component's floor).
    pub fn leak_suspected(&self) -> bool {
        self.growth.sustained_growth
    }
}

/// Each point's (seconds since the first, floor) for series `index`: a point's floor is
/// its minimum (a sample's own value at full resolution).
fn series(points: &[&Point], index: usize) -> Vec<(f64, f64)> {
    let Some(first) = points.first() else {
        return Vec::new();
    };
    points
        .iter()
        .filter_map(|p| {
            let agg = p.values.get(index).filter(|a| a.n > 0)?;
            Some(((p.start_ms - first.start_ms) as f64 / 1000.0, agg.min as f64))
        })
        .collect()
}

fn newest(points: &[&Point], index: usize) -> Option<u64> {
    points.iter().rev().find_map(|p| {
        let agg = p.values.get(index).filter(|a| a.n > 0)?;
        // At full resolution min = max = the sample; for an aggregate, its mean.
        Some(if p.count == 1 {
            agg.min
        } else {
            agg.mean().unwrap_or(0.0) as u64
        })
    })
}

pub(super) fn judge(window: Duration, points: &[&Point], names: &[Arc<str>], rules: &LeakDetection) -> Trends {
    let samples: u64 = points.iter().map(|p| u64::from(p.count)).sum();
    // RSS carries every component's rhythms at once: its floor is judged by the same
    // rules but the line's fit, which those rhythms' sum would fail while it still rises.
    let growth = assess_points(
        points,
        0,
        &LeakDetection {
            min_fit: f64::NEG_INFINITY,
            ..*rules
        },
    );
    let usage = newest(points, 0);
    let limit = newest(points, 3);
    let time_to_limit = match (growth.sustained_growth, usage, limit) {
        (true, Some(usage), Some(limit)) if growth.rate_bytes_per_sec > 0.0 => Some(Duration::from_secs_f64(
            (limit.saturating_sub(usage) as f64 / growth.rate_bytes_per_sec).min(1e12),
        )),
        _ => None,
    };
    let components = names
        .iter()
        .enumerate()
        .filter(|(i, _)| points.iter().any(|p| p.values.get(FIXED + i).is_some_and(|a| a.n > 0)))
        .map(|(i, name)| ComponentTrend {
            name: Arc::clone(name),
            growth: assess_points(points, FIXED + i, rules),
            bytes: newest(points, FIXED + i),
        })
        .collect();
    Trends {
        window,
        samples,
        growth,
        usage_bytes: usage,
        limit_bytes: limit,
        time_to_limit,
        components,
        pressure_episodes: points.iter().map(|p| p.episodes).sum(),
        peak_bytes: points
            .iter()
            .filter_map(|p| p.values.first().filter(|a| a.n > 0).map(|a| a.max))
            .max(),
        first_sample: points.first().map(|p| UNIX_EPOCH + Duration::from_millis(p.start_ms)),
    }
}

fn assess_points(points: &[&Point], index: usize, rules: &LeakDetection) -> Assessment {
    let s = series(points, index);
    let samples: usize = points
        .iter()
        .filter(|p| p.values.get(index).is_some_and(|a| a.n > 0))
        .map(|p| p.count as usize)
        .sum();
    let mut found = assess(&s, rules);
    // The series has one point per span; the rule on data counts the samples behind them.
    if !found.sustained_growth && s.len() < rules.min_samples && samples >= rules.min_samples {
        let relaxed = LeakDetection {
            min_samples: s.len(),
            ..*rules
        };
        found = assess(&s, &relaxed);
    }
    // Times on the series' axis become seconds since the window's first point: shift
    // `since` to absolute time in the view (first_sample + since).
    found
}
