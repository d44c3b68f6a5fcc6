//! Bounded multi-resolution storage of samples.
//!
//! Tier 0 keeps every sample; each further tier keeps aggregates (min, mean, max) over
//! spans six times longer than the tier before. Every tier holds at most [`TIER_POINTS`]
//! points, and there are as many tiers as it takes to cover the retention (the last one cut
//! to it): at the defaults (10 s, 24 h) 1 h of 10 s samples, 6 h of 1-minute aggregates and
//! 24 h of 6-minute ones, 960 points in all. Each sample is added to every tier's open
//! aggregate, so no tier depends on another's rounding.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Points a tier holds at most.
pub(crate) const TIER_POINTS: usize = 360;
/// How much longer each tier's spans are than the previous tier's.
pub(crate) const TIER_FACTOR: u64 = 6;
/// The series every sample has before its components: RSS, peak RSS, heap, limit.
pub(crate) const FIXED: usize = 4;
/// Component names the history keeps series for (the monitor's and the tracking
/// allocator's registries are bounded; this bounds the history whatever they hold).
pub(crate) const MAX_NAMES: usize = 2 * crate::MAX_COMPONENTS + 1;

/// Min, max and sum of the values a span saw; `n` how many samples had a value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Agg {
    pub(crate) min: u64,
    pub(crate) max: u64,
    pub(crate) sum: u64,
    pub(crate) n: u32,
}

impl Agg {
    fn add(&mut self, value: Option<u64>) {
        let Some(v) = value else { return };
        if self.n == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.sum = self.sum.saturating_add(v);
        self.n += 1;
    }

    pub(crate) fn merge(&mut self, other: &Agg) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *other;
            return;
        }
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum = self.sum.saturating_add(other.sum);
        self.n += other.n;
    }

    pub(crate) fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum as f64 / f64::from(self.n))
    }
}

/// One point of a tier: a sample (tier 0) or the aggregate of a span's samples.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Point {
    /// The span's start (tier 0: the sample's time), ms since the Unix epoch.
    pub(crate) start_ms: u64,
    /// Samples aggregated.
    pub(crate) count: u32,
    /// The highest pressure level seen (0 normal, 1 warning, 2 critical).
    pub(crate) pressure: u8,
    /// Pressure episodes that began in the span (a rise from normal).
    pub(crate) episodes: u32,
    /// [`FIXED`] series, then one per component name, in the store's name order.
    pub(crate) values: Box<[Agg]>,
}

/// One sample as the store takes it.
pub(crate) struct Record<'a> {
    pub(crate) at_ms: u64,
    pub(crate) fixed: [Option<u64>; FIXED],
    pub(crate) pressure: u8,
    pub(crate) components: &'a [(Arc<str>, u64)],
}

struct Tier {
    step_ms: u64,
    capacity: usize,
    points: VecDeque<Point>,
    open: Option<Point>,
}

/// Every tier, and the component names in the order first seen.
pub(crate) struct Store {
    tiers: Vec<Tier>,
    names: Vec<Arc<str>>,
    index: HashMap<Arc<str>, usize>,
    last_pressure: u8,
}

impl Store {
    /// Tiers for samples every `interval_ms`, kept `retention_ms`.
    pub(crate) fn new(interval_ms: u64, retention_ms: u64) -> Self {
        let mut tiers = Vec::new();
        let mut step = interval_ms.max(1);
        let mut covered = 0;
        while covered < retention_ms {
            let capacity = (retention_ms.div_ceil(step) as usize).clamp(1, TIER_POINTS);
            tiers.push(Tier {
                step_ms: step,
                capacity,
                points: VecDeque::with_capacity(capacity),
                open: None,
            });
            covered = step.saturating_mul(capacity as u64);
            step = step.saturating_mul(TIER_FACTOR);
        }
        Self {
            tiers,
            names: Vec::new(),
            index: HashMap::new(),
            last_pressure: 0,
        }
    }

    pub(crate) fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    /// Each tier's span length and capacity, finest first.
    #[cfg(test)]
    pub(crate) fn tiers(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.tiers.iter().map(|t| (t.step_ms, t.capacity))
    }

    pub(crate) fn add(&mut self, record: &Record<'_>) {
        for (name, _) in record.components {
            if !self.index.contains_key(name) && self.names.len() < MAX_NAMES {
                self.index.insert(Arc::clone(name), self.names.len());
                self.names.push(Arc::clone(name));
            }
        }
        let width = FIXED + self.names.len();
        let mut values = vec![Agg::default(); width].into_boxed_slice();
        for (agg, value) in values.iter_mut().zip(record.fixed) {
            agg.add(value);
        }
        for (name, bytes) in record.components {
            if let Some(&i) = self.index.get(name) {
                values[FIXED + i].add(Some(*bytes));
            }
        }
        let episode = u32::from(record.pressure > 0 && self.last_pressure == 0);
        self.last_pressure = record.pressure;
        let sample = Point {
            start_ms: record.at_ms,
            count: 1,
            pressure: record.pressure,
            episodes: episode,
            values,
        };
        for (level, tier) in self.tiers.iter_mut().enumerate() {
            if level == 0 {
                push(tier, sample.clone());
                continue;
            }
            let start = record.at_ms - record.at_ms % tier.step_ms;
            match &mut tier.open {
                Some(open) if open.start_ms == start => merge(open, &sample),
                open => {
                    let mut fresh = sample.clone();
                    fresh.start_ms = start;
                    if let Some(done) = open.replace(fresh) {
                        push(tier, done);
                    }
                }
            }
        }
    }

    /// The points of the finest tier that covers `since_ms`..now (its open aggregate
    /// included), from `since_ms` on; and that tier's span length.
    pub(crate) fn points_since(&self, since_ms: u64, now_ms: u64) -> (u64, Vec<&Point>) {
        let Some(tier) = self
            .tiers
            .iter()
            .find(|t| now_ms.saturating_sub(t.step_ms.saturating_mul(t.capacity as u64)) <= since_ms)
            .or(self.tiers.last())
        else {
            return (0, Vec::new());
        };
        let points = tier
            .points
            .iter()
            .chain(tier.open.as_ref())
            .filter(|p| p.start_ms >= since_ms)
            .collect();
        (tier.step_ms, points)
    }

    /// Bytes the store holds on the heap (points, names and their index), by its own count.
    pub(crate) fn heap_bytes(&self) -> usize {
        let point = |p: &Point| std::mem::size_of::<Point>() + std::mem::size_of_val(&*p.values);
        let tiers: usize = self
            .tiers
            .iter()
            .map(|t| {
                t.points.capacity() * std::mem::size_of::<Point>()
                    + t.points
                        .iter()
                        .chain(t.open.as_ref())
                        .map(|p| point(p) - std::mem::size_of::<Point>())
                        .sum::<usize>()
            })
            .sum();
        tiers + self.names.iter().map(|n| n.len() + 16).sum::<usize>() * 2
    }
}

fn push(tier: &mut Tier, point: Point) {
    if tier.points.len() == tier.capacity {
        tier.points.pop_front();
    }
    tier.points.push_back(point);
}

/// Merges `sample` (a sample or a finer span) into `into`.
pub(crate) fn merge(into: &mut Point, sample: &Point) {
    into.count += sample.count;
    into.pressure = into.pressure.max(sample.pressure);
    into.episodes += sample.episodes;
    if into.values.len() < sample.values.len() {
        let mut wider = vec![Agg::default(); sample.values.len()].into_boxed_slice();
        wider[..into.values.len()].copy_from_slice(&into.values);
        into.values = wider;
    }
    for (agg, other) in into.values.iter_mut().zip(sample.values.iter()) {
        agg.merge(other);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(store: &mut Store, at_ms: u64, rss: u64, comps: &[(Arc<str>, u64)]) {
        store.add(&Record {
            at_ms,
            fixed: [Some(rss), None, Some(rss / 2), None],
            pressure: 0,
            components: comps,
        });
    }

    #[test]
    fn tiers_cover_the_retention() {
        let store = Store::new(10_000, 24 * 3_600_000);
        let tiers: Vec<_> = store.tiers().collect();
        assert_eq!(tiers, [(10_000, 360), (60_000, 360), (360_000, 240)]);
        let short = Store::new(1_000, 60_000);
        assert_eq!(short.tiers().collect::<Vec<_>>(), [(1_000, 60)]);
    }

    #[test]
    fn aggregates_keep_min_mean_max_of_the_raw_samples() {
        let mut store = Store::new(1_000, 3_600_000);
        let cache: Arc<str> = Arc::from("cache");
        for i in 0..600u64 {
            record(
                &mut store,
                1_000_000 + i * 1_000,
                100 + i,
                &[(Arc::clone(&cache), i % 7)],
            );
        }
        // Tier 1 spans 6 s: the span starting at 1,002,000 holds samples 2..=7.
        let (step, points) = store.points_since(1_000_000, 3_000_000);
        assert_eq!(step, 6_000);
        let p = points.iter().find(|p| p.start_ms == 1_002_000).expect("span");
        assert_eq!(p.count, 6);
        assert_eq!((p.values[0].min, p.values[0].max), (102, 107));
        assert_eq!(p.values[0].mean(), Some(104.5));
        assert_eq!(p.values[1].n, 0, "peak was absent");
        let comp: Vec<u64> = (2..=7).map(|i| i % 7).collect();
        assert_eq!(p.values[FIXED].min, *comp.iter().min().unwrap());
        assert_eq!(p.values[FIXED].sum, comp.iter().sum::<u64>());
        // Tier 0 keeps the last 360 raw samples.
        let (step, raw) = store.points_since(1_599_000 - 300_000, 1_599_000);
        assert_eq!(step, 1_000);
        assert_eq!(raw.len(), 301);
    }
}
